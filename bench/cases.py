"""The workloads of the benchmark, each built for one side (ours or diffusers) in one mode.

A builder returns a zero-argument callable doing one unit of work on fixed inputs:

- ``train_step``   Algorithm 1 once: noise the batch, forward, MSE on eps, backward, gradient
                   clipping at 1 (as the paper), Adam, EMA of the weights.
                   The model object persists across calls (its weights keep training).
- ``sample_step``  one ancestral step (Algorithm 2, line 4): forward and the scheduler update.
- ``sample_run``   a whole sampling loop: DDIM (eta = 0) or ancestral, ``steps`` model calls;
                   its ``.warm()`` runs two steps on the same shapes (compile, graph capture).

Ours uses the library (``training_loss``, ``accel``, ``sample``); diffusers' side uses its own
pieces the way its examples do (``DDPMScheduler.add_noise``, ``EMAModel``, ``DDIMScheduler``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ddpm.core import device as accel

from ddpm.nets import fast as fastpaths

from ddpm.training import optim
from ddpm.core.diffusion import p_mean_variance, training_loss
from ddpm.sampling.samplers import gaussian_noise, per_sample_seeds, sample
from ddpm.core.schedules import NoiseSchedule

T = 1000
LR = 2e-4
EMA_DECAY = 0.9999


@dataclass(frozen=True)
class Mode:
    """How a contestant runs: autocast dtype, memory format, torch.compile, CUDA graphs
    (sampling, ours only) and fused optimizer/EMA kernels."""

    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    graphs: bool = False
    fused: bool = False

    def label(self, training: bool = False) -> str:
        """The mode in words, naming only what applies to a training or a sampling workload."""
        parts = ["bf16 autocast" if self.amp == "bf16" else "fp32"]
        parts += ["eager"] if not self.compile else ["compile"]
        if self.channels_last:
            parts.append("channels_last")
        if self.graphs and not training:
            parts.append("CUDA graphs")
        if self.fused and training:
            parts.append("fused Adam/EMA")
        return ", ".join(parts)


def _schedule(device: torch.device) -> NoiseSchedule:
    # The paper's linear betas 1e-4 .. 0.02 (the seed's "sqrt_linear"; see DESIGN.md).
    return NoiseSchedule.from_name("sqrt_linear", T).to(device)


_PREPARED: dict[tuple, torch.nn.Module] = {}


def _prepared(model: torch.nn.Module, mode: Mode, device: torch.device, train: bool) -> torch.nn.Module:
    """A copy of ``model`` on ``device`` in ``mode``, shared by the workloads of one run so that
    each (model, mode, train/eval) is compiled (and, for sampling, graph-captured) only once."""
    key = (id(model), mode, str(device), train)
    if key not in _PREPARED:
        prepared = copy.deepcopy(model).to(device)
        prepared.train(train)
        inner = getattr(prepared, "unet", prepared)  # compile diffusers' UNet2DModel itself
        fastpaths.prepare_model(inner, channels_last=mode.channels_last, compile=mode.compile)
        if not train and mode.graphs:
            prepared = fastpaths.GraphedModel(prepared, clone_output=False)
        _PREPARED[key] = prepared
    return _PREPARED[key]


def _images(batch: int, device: torch.device, mode: Mode, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).clamp(-1, 1).to(device)
    return x.contiguous(memory_format=torch.channels_last) if mode.channels_last else x


def train_step(side: str, model, mode: Mode, batch: int, device: torch.device) -> Callable[[], None]:
    model = _prepared(model, mode, device, train=True)
    params = [p for p in model.parameters() if p.requires_grad]
    x0 = _images(batch, device, mode, seed=1)
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, T, (batch,), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)

    if side == "ours":
        schedule = _schedule(device)
        opt = optim.make_optimizer(params, LR) if mode.fused else torch.optim.Adam(params, LR)
        ema = [p.detach().clone() for p in params]

        def step():
            with accel.autocast(device, mode.amp):
                loss = training_loss(model, schedule, x0, t=t, noise=noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=mode.fused or None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            optim.ema_update(ema, params, EMA_DECAY)

        return step

    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    opt = torch.optim.Adam(params, LR, fused=True) if mode.fused and device.type == "cuda" else torch.optim.Adam(params, LR)
    ema = EMAModel(params, decay=EMA_DECAY, foreach=mode.fused)
    ema.to(device)

    def step():
        x_t = scheduler.add_noise(x0, noise, t)
        with accel.autocast(device, mode.amp):
            eps = model(x_t, t)
        loss = F.mse_loss(eps.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=mode.fused or None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)

    return step


def _inference_model(side: str, model, mode: Mode, device: torch.device):
    return _prepared(model, mode, device, train=False)


def sample_step(side: str, model, mode: Mode, batch: int, device: torch.device, t_step: int = 500) -> Callable[[], None]:
    model = _inference_model(side, model, mode, device)
    x = _images(batch, device, mode, seed=3)
    t = torch.full((batch,), t_step, dtype=torch.long, device=device)

    if side == "ours":
        schedule = _schedule(device)
        seeds = per_sample_seeds(0, batch, device=device)

        @torch.no_grad()
        def step():
            with accel.autocast(device, mode.amp):
                out = model(x, t)
            mean, var, _, _ = p_mean_variance(schedule, out, x, t)
            return mean + var.sqrt() * gaussian_noise(seeds, 1, x.shape)

        return step

    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True)
    gen = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def step():
        with accel.autocast(device, mode.amp):
            eps = model(x, t)
        return scheduler.step(eps, t_step, x, generator=gen).prev_sample

    return step


def sample_run(side: str, model, mode: Mode, batch: int, device: torch.device, *, sampler: str,
               steps: int, model_steps: int | None = None) -> Callable[[], torch.Tensor]:
    """A whole loop of ``steps`` steps (``sampler`` "ddim" or "ddpm"); diffusers' side may stop
    after ``model_steps`` of them (for extrapolating a long run it would take too long to time)."""
    model = _inference_model(side, model, mode, device)
    x_T = _images(batch, device, Mode(), seed=4)  # the samplers start from contiguous noise

    if side == "ours":
        schedule = _schedule(device)

        @torch.no_grad()
        def run(n: int = steps):
            with accel.autocast(device, mode.amp):
                return sample(model, schedule, x_T.shape, sampler=sampler, steps=n, x_T=x_T, generator=0)

        run.warm = lambda: run(2)  # compiles and captures on the same shapes, in a fraction of the time
        return run

    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler == "ddim":
        scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[: model_steps or steps]
    gen = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def run(timesteps=timesteps):
        x = x_T.clone()
        for t in timesteps:
            with accel.autocast(device, mode.amp):
                eps = model(x, t.to(device).expand(batch))
            kwargs = {"eta": 0.0} if sampler == "ddim" else {"generator": gen}
            x = scheduler.step(eps, t, x, **kwargs).prev_sample
        return x

    run.warm = lambda: run(timesteps[:2])
    return run
