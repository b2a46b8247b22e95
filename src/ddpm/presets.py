"""The named recipes (run presets) and how a run's config is resolved from one.

Layers of a resolved config, later ones winning::

    preset (mnist, cifar10, toy2d, tiny, mnist-learned, mnist-cond)  <-  config file (TOML / YAML / JSON)  <-  flags

Each recipe is a small function in :data:`RECIPES` returning a fresh ``TrainConfig``. The U-Net
recipes take their network from ``ddpm.nets.unet_config.UNET_PRESETS`` under the same name, so
``UNet.from_preset(name)`` is the network that ``ddpm train --preset name`` trains. The schema
itself (``TrainConfig`` and one dataclass per concern) lives in ``ddpm.config``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from .config import (
    DataConfig,
    DiffusionConfig,
    LoopConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
    merge_dicts,
    read_config_file,
)
from .errors import UserError
from .nets.mlp import MLPConfig
from .nets.unet_config import preset_config


def _mnist() -> TrainConfig:
    """The no-argument run: the most recognisable digits within 15 minutes on a 2-core CPU.

    The seed's cosine schedule, the thin ``mnist`` U-Net (0.64M parameters), min-SNR weighting
    with gamma 1, peak lr 2e-3 decayed by a cosine, bf16 autocast, an EMA whose warm-up governs
    the whole run, previews by ancestral sampling on 100 respaced steps, autoguided (Karras et al.
    2024) by the EMA as it was 30% of the way through the run at w = 3 for t in [600, 999] only
    (``sample.guidance_interval``: chosen on a sweep by pass rate and Frechet distance together,
    docs/guidance.md; 140 network calls per image instead of 200). Its length is a time
    budget: 14 minutes of training (``max_minutes``; start-up, the final grid and the report fit in
    the rest of the 15), over which the learning rate decays (``ddpm.training.budget``), so a slow or busy
    machine takes fewer steps and still finishes its schedule; 20,000 steps cap it on a fast one
    (a 2-core CPU alone reaches about 4,000-5,900 at the 4.8-7.0 steps/s measured). Measurements
    behind each choice: docs/mnist-recipe.md.
    """
    return TrainConfig(
        model=preset_config("mnist"),
        diffusion=DiffusionConfig(schedule="cosine", timesteps=1000, weighting="min_snr", min_snr_gamma=1.0),
        optim=OptimConfig(lr=2e-3, warmup=100, decay="cosine", min_lr_ratio=0.1, grad_clip=1.0),
        train=LoopConfig(steps=20_000, batch_size=64, ema_decay=0.999, ema_warmup=10, amp="bf16",
                         log_every=50, sample_every=1000, ckpt_every=500, keep_last=2, max_minutes=14.0,
                         guide_at=0.3),
        data=DataConfig(source="mnist"),
        sample=SampleConfig(sampler="ddpm", steps=100, num=64, autoguidance=3.0, guidance_interval=(600, 999)),
        name="mnist",
    )


def _mnist_learned() -> TrainConfig:
    """The ``mnist`` recipe with learned variances (Nichol & Dhariwal 2021): the same network with
    its output doubled (``learn_sigma``, 2 channels: eps and the eq. 15 interpolation v), trained
    with L_hybrid = L_simple + 0.001 L_vlb (the L_simple part min-SNR weighted as in ``mnist``) and
    sampled with ``variance="learned_range"``; same steps, time budget and previews, without
    autoguidance (measured on ``mnist`` alone).
    """
    c = _mnist().override(**{"train.guide_at": None, "sample.autoguidance": 1.0, "sample.guidance_interval": None})
    return dataclasses.replace(c, model=preset_config("mnist-learned"), name="mnist-learned",
                               diffusion=dataclasses.replace(c.diffusion, variance="learned_range"))


def _mnist_cond() -> TrainConfig:
    """``mnist`` made class-conditional: the same recipe (schedule, optimizer, the 14-minute time
    budget) and the same network with a label embedding, ``UNet.from_preset("mnist",
    num_classes=10)``; 10% of the labels are dropped to the null label (``train.cond_drop_prob``),
    so one network is both the conditional and the unconditional model of classifier-free guidance
    (Ho & Salimans 2022). Samples and previews (one row per digit) are guided at w = 1.5 for
    t in [300, 899] (``sample.guidance``, ``sample.guidance_interval``): chosen on a sweep by the
    right-class share and the Frechet distance to the data together (docs/guidance.md; w = 3 over
    every step, the earlier default, made 100% of them the right digit but 5x further from the
    data). No autoguidance (classifier-free guidance already makes every class recognisable).
    """
    return _mnist().override(**{"model.num_classes": 10, "train.cond_drop_prob": 0.1, "sample.guidance": 1.5,
                                "sample.guidance_interval": (300, 899),
                                "name": "mnist-cond", "train.guide_at": None, "sample.autoguidance": 1.0})


def _cifar10() -> TrainConfig:
    """The paper's CIFAR-10 recipe (Ho et al. 2020, section 4 and appendix B).

    The 35.7M-parameter ``cifar10`` U-Net with dropout 0.1, Adam 2e-4 with 5000 warm-up steps,
    grad clip 1, batch 128, EMA 0.9999, random horizontal flips, 800k steps, T=1000 linear betas
    1e-4..0.02 (the seed's ``sqrt_linear``).
    """
    return TrainConfig(
        model=preset_config("cifar10"),
        diffusion=DiffusionConfig(schedule="sqrt_linear", timesteps=1000, variance="fixed_large"),
        optim=OptimConfig(lr=2e-4, warmup=5000, grad_clip=1.0),
        train=LoopConfig(steps=800_000, batch_size=128, ema_decay=0.9999, amp="auto", channels_last=True,
                         sample_every=10_000, ckpt_every=10_000),
        data=DataConfig(source="cifar10:data/cifar10", hflip=True),
        sample=SampleConfig(sampler="ddim", steps=100, num=64),
        name="cifar10",
    )


def _toy2d() -> TrainConfig:
    """An MLP denoiser on a 2-D Gaussian mixture: a minute on a CPU, checked against the exact density."""
    return TrainConfig(
        model=MLPConfig(dim=2),
        diffusion=DiffusionConfig(schedule="sqrt_linear", timesteps=1000, clip_denoised=False),
        optim=OptimConfig(lr=1e-3, warmup=100, grad_clip=1.0),
        train=LoopConfig(steps=3000, batch_size=256, ema_decay=0.999, ema_warmup=10, amp="off",
                         log_every=100, sample_every=1000, ckpt_every=1000, keep_last=2),
        data=DataConfig(source="toy:gaussian_mixture"),
        sample=SampleConfig(sampler="ddim", steps=50, num=1000),
        name="toy2d",
    )


def _tiny() -> TrainConfig:
    """Seconds per run on a CPU, for tests and smoke runs: the ``tiny`` U-Net, T=100, 4 steps on MNIST."""
    return TrainConfig(
        model=preset_config("tiny"),
        diffusion=DiffusionConfig(schedule="sqrt_linear", timesteps=100),
        optim=OptimConfig(lr=1e-3, warmup=2, grad_clip=1.0),
        train=LoopConfig(steps=4, batch_size=8, ema_decay=0.9, ema_warmup=2, amp="off", log_every=2,
                         sample_every=0, ckpt_every=2, keep_last=2, progress=False),
        data=DataConfig(source="mnist"),
        sample=SampleConfig(sampler="ddim", steps=5, num=4),
        name="tiny",
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {"mnist": _mnist, "cifar10": _cifar10, "toy2d": _toy2d, "tiny": _tiny,
                                                 "mnist-learned": _mnist_learned, "mnist-cond": _mnist_cond}
PRESETS = tuple(RECIPES)


def get_preset(name: str) -> TrainConfig:
    """A fresh ``TrainConfig`` for a named recipe (see the docstring of each in :data:`RECIPES`)."""
    if name not in RECIPES:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return RECIPES[name]()


def resolve_config(preset: str | None = None, config_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Preset, then config file (which may name its own ``preset``), then dotted overrides."""
    file_dict = read_config_file(config_file) if config_file is not None else {}
    preset = preset or file_dict.pop("preset", None) or "mnist"
    file_dict.pop("preset", None)
    base = get_preset(preset).to_dict()
    model = file_dict.get("model")
    if isinstance(model, dict) and "learn_sigma" in model and "out_channels" not in model and "out_channels" in base["model"]:
        base["model"]["out_channels"] = None  # re-derived from learn_sigma: C, or 2C with learned variances
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _scale_preset_interval(base, file_dict, overrides)
    config = TrainConfig.from_dict(merge_dicts(base, file_dict))
    return config.override(**overrides)


def _scale_preset_interval(base: dict, file_dict: dict, overrides: dict) -> None:
    # A preset's guidance interval is in its own T's timesteps: with another T (--timesteps) and no
    # interval of the user's, it covers the same share of the chain.
    interval, T = base["sample"].get("guidance_interval"), base["diffusion"]["timesteps"]
    new_T = overrides.get("diffusion.timesteps", (file_dict.get("diffusion") or {}).get("timesteps", T))
    user_set = "sample.guidance_interval" in overrides or "guidance_interval" in (file_dict.get("sample") or {})
    if interval is None or user_set or not isinstance(new_T, int) or new_T == T or new_T < 2:
        return
    lo, hi = interval
    base["sample"]["guidance_interval"] = [min(new_T - 1, round(lo * new_T / T)),
                                           min(new_T - 1, round((hi + 1) * new_T / T) - 1)]
