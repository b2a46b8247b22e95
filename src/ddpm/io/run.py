"""Loading a trained run back for sampling: ``load`` and what it returns, ``LoadedRun``.

``load`` takes a run directory (its newest intact checkpoint), a ``ckpt-*`` folder, a
``.safetensors`` file or a diffusers pipeline directory, rebuilds the network from the config
stored with the weights and returns everything ``ddpm.sample`` needs. Reading and verifying the
files themselves is ``ddpm.io.checkpoint``'s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, build_model, item_shape, sample_kwargs
from ..core.device import autocast, model_device, resolve_amp
from ..errors import UserError, first_line
from ..nets.fast import prefers_channels_last, prepare_model
from ..nets.unet import UNet
from ..sampling.guidance import guide_kwargs
from .checkpoint import (
    CKPT_RE,
    FILES,
    check_architecture,
    latest_verified_checkpoint,
    load_weights_into,
    read_analytic_variance,
    read_guide,
    read_header,
    read_weights,
)
from .diffusers import is_diffusers_dir, read_diffusers, write_pipeline
from .files import verify

__all__ = ["load", "LoadedRun", "resolve_weights_path", "read_config"]


@dataclass
class LoadedRun:
    """What ``ddpm.sample`` needs: ``ddpm.sample(run.model, run.schedule, (n, *run.shape), **run.sample_kwargs)``.

    ``shape`` is one item's shape, (C, H, W) or (dim,); ``sample_kwargs`` holds the run's
    prediction, variance and clipping, which every sampler accepts, and ``analytic`` (the
    ``AnalyticVariance`` of RUN/analytic.json) when one was estimated for these weights.
    ``amp`` is the autocast mode chosen for the model's device by ``load``: sample under
    ``with run.autocast(): ...`` to use it.
    ``num_classes`` and ``class_names`` describe a class-conditional run (None otherwise): sample
    class k with ``ddpm.sample(..., labels=k, guidance=w)``.
    ``guide`` is the network as the run kept it at ``train.guide_at`` (None when it kept none):
    ``ddpm.sample(..., **run.guide_kwargs())`` samples with the run's autoguidance
    (``sample.autoguidance``), as ``ddpm sample`` does; ``guide_step`` is the step it was kept at.
    """

    model: torch.nn.Module
    schedule: Any  # NoiseSchedule
    config: TrainConfig
    shape: tuple
    sample_kwargs: dict
    path: Path
    step: int | None
    amp: str = "off"  # "off", "bf16" or "fp16" (ddpm.core.device.AMP_MODES)
    guide: torch.nn.Module | None = None
    guide_step: int | None = None

    def guide_kwargs(self, autoguidance: float | None = None) -> dict:
        """``guide`` and ``autoguidance`` for ``ddpm.sample``: at the run's ``sample.autoguidance``
        by default; empty without a guide or at scale 1 (off)."""

        w = self.config.sample.autoguidance if autoguidance is None else autoguidance
        return guide_kwargs(self.guide, w)

    def autocast(self):
        """A context manager running the network in ``amp`` on the model's device."""

        return autocast(model_device(self.model), self.amp)

    @property
    def num_classes(self) -> int | None:
        """K of a class-conditional model (labels 0..K-1; K is the null label), None if unconditional."""
        return self.config.model.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The names of classes 0..K-1 (the data's, else "0".."K-1"), None if unconditional."""
        if self.num_classes is None:
            return None
        return tuple(self.config.data.class_names or (str(k) for k in range(self.num_classes)))


def resolve_weights_path(path: str | Path, *, ema: bool = True) -> Path:
    """A run dir -> the weights of its newest intact checkpoint; a ckpt dir -> its weights; a file
    -> itself. Named checkpoints and files are verified against their manifest and refused when
    damaged; a run directory falls back to an older checkpoint instead (saying so)."""
    path = Path(path)
    name = "ema.safetensors" if ema else "model.safetensors"
    if path.is_file():
        folder, name = path.parent, path.name
    elif not path.exists():
        raise UserError(f"no such run directory or checkpoint: {path}{_hub_hint(path)}")
    elif CKPT_RE.match(path.name):
        folder = path
    else:
        latest = latest_verified_checkpoint(path, [name])
        if latest is None:
            raise UserError(f"no complete checkpoint (ckpt-NNNNNNN/ with {', '.join(FILES)}) in {path}")
        return latest / name
    if CKPT_RE.match(folder.name):
        problem = verify(folder, [name])
        if problem is not None:
            raise UserError(f"checkpoint {folder} is damaged ({problem})")
    return folder / name


def _hub_hint(path: Path) -> str:
    """For a missing path that reads like a Hugging Face Hub name (owner/name): how to fetch it."""
    parts = Path(path).parts
    if len(parts) != 2 or Path(parts[0]).exists() or not all(re.fullmatch(r"[\w.-]+", p) for p in parts):
        return ""
    return (f"; if it is a Hugging Face Hub name: those are not downloaded, fetch it first with "
            f"`huggingface-cli download {parts[0]}/{parts[1]} --local-dir {parts[1]}`, then use the folder {parts[1]}")


def load(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu", fast: bool = True,
         amp: str | None = None) -> LoadedRun:
    """Load a trained model from a run directory, a ``ckpt-*`` folder or a ``.safetensors`` file.

    Fast by default, as ``ddpm sample`` runs: ``run.amp`` is ``amp`` resolved on ``device``
    (default ``"auto"``: bf16 or fp16 autocast where the device computes it natively, see
    ``ddpm.core.device.resolve_amp``) and networks wide enough to gain get channels_last weights
    (``fast.prefers_channels_last``). ``fast=False`` keeps float32 (unless ``amp`` says otherwise)
    and the stored layout.

    The network is rebuilt from the config stored in the weights' metadata (falling back to the
    run's ``config.json``), so a checkpoint alone is enough. ``ema`` picks the EMA weights.
    A diffusers pipeline (or UNet2DModel) directory is converted (``ddpm.io.diffusers``).
    The file's tensor shapes are compared with the config's network built on the ``meta``
    device (no memory) before the real one is allocated, so a file whose config does not match
    its tensors fails at once.
    """

    if is_diffusers_dir(path):
        return _prepared(load_diffusers(path, device=device), device, fast, amp)
    for attempt in range(_ROTATION_RETRIES):
        weights_path = resolve_weights_path(path, ema=ema)
        try:
            return _prepared(_load_weights(weights_path, ema, device), device, fast, amp)
        except (UserError, OSError):
            # A run still training rotates its checkpoints (keep_last): the newest one that
            # verified a moment ago may be gone now. Then the next newest is read, never a half one.
            if weights_path.parent.exists() or attempt == _ROTATION_RETRIES - 1 or not Path(path).is_dir():
                raise
    raise AssertionError("unreachable")


_ROTATION_RETRIES = 5


def _load_weights(weights_path: Path, ema: bool, device) -> LoadedRun:
    """``load`` of one verified weights file (and what lies beside it)."""
    meta, shapes = read_header(weights_path)
    config = _stored_config(weights_path, meta)
    with torch.device("meta"):
        skeleton = build_model(config.model)
    check_architecture({k: v.shape for k, v in skeleton.state_dict().items()}, shapes, weights_path)
    tensors, _ = read_weights(weights_path)
    model = build_model(config.model)
    load_weights_into(model, tensors, weights_path)
    model.to(device).eval().requires_grad_(False)
    schedule = config.diffusion.make_schedule().to(device)
    step = int(meta["step"]) if meta.get("step", "").isdigit() else None
    analytic, _ = read_analytic_variance(weights_path, config.diffusion.timesteps)
    kept = read_guide(weights_path, config.model) if ema else None  # the guide goes with the EMA weights
    guide, guide_step = kept if kept is not None else (None, None)
    if guide is not None:
        guide.to(device).eval().requires_grad_(False)
    return LoadedRun(model=model, schedule=schedule, config=config, shape=item_shape(config),
                     sample_kwargs={**sample_kwargs(config), **({"analytic": analytic} if analytic else {})},
                     path=weights_path, step=step, guide=guide, guide_step=guide_step)


def _prepared(run: LoadedRun, device, fast: bool, amp: str | None) -> LoadedRun:
    """``load``'s fast defaults: the autocast mode for the device, channels_last where it helps."""
    run.amp = resolve_amp(amp or ("auto" if fast else "off"), device)
    if fast and isinstance(run.model, torch.nn.Module) and prefers_channels_last(run.model):
        for net in (run.model, run.guide):
            if net is not None:
                prepare_model(net, channels_last=True)
    return run


def read_config(path: str | Path, *, ema: bool = True) -> TrainConfig:
    """The ``TrainConfig`` that ``load(path, ema=ema)`` would build its network from, without the weights."""
    weights_path = resolve_weights_path(path, ema=ema)
    return _stored_config(weights_path, read_header(weights_path)[0])


def _stored_config(weights_path: Path, meta: dict[str, str]) -> TrainConfig:
    config_json = meta.get("ddpm_config")
    if config_json is None:
        candidate = weights_path.parent.parent / "config.json"
        if not candidate.is_file():
            raise UserError(f"{weights_path} carries no ddpm config and no config.json was found beside its run")
        config_json = candidate.read_text(encoding="utf-8")
    try:
        return TrainConfig.from_dict(json.loads(config_json))
    except (ValueError, UserError) as exc:
        raise UserError(f"{weights_path}: stored config is invalid: {first_line(exc)}") from None


def load_diffusers(path: str | Path, *, device: str | torch.device = "cpu",
                   scheduler_config: str | Path | None = None) -> LoadedRun:
    """A ``LoadedRun`` from a diffusers pipeline or UNet2DModel directory (``ddpm.io.diffusers``).

    ``scheduler_config`` names the scheduler's JSON explicitly (default: found beside the U-Net).
    """
    model, schedule, config, weights = read_diffusers(path, scheduler_config=scheduler_config)
    model.to(device).eval().requires_grad_(False)
    return LoadedRun(model=model, schedule=schedule.to(device), config=config, shape=item_shape(config),
                     sample_kwargs=sample_kwargs(config), path=weights, step=None)


def export_diffusers(path: str | Path, out: str | Path, *, ema: bool = True) -> Path:
    """Write the run (or checkpoint) at ``path`` as a DDPMPipeline directory ``out`` (a distilled
    run as the DDIMPipeline that takes its steps: ``ddpm.io.diffusers``).

    ``out`` must not exist or be empty; it is written in a temporary sibling and renamed into
    place, so a failed export leaves nothing behind. Returns ``out``.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory")
    run = load(path, ema=ema)
    if not isinstance(run.model, UNet):
        raise UserError(f"{path}: a {type(run.model).__name__} has no diffusers equivalent (only U-Net runs export)")
    distilled = run.config.distill
    return write_pipeline(run.model, run.config.diffusion, run.schedule, out,
                          distilled_steps=None if distilled is None else distilled.steps)
