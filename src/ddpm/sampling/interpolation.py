"""Interpolation between two images through the model's latent spaces.

Two methods, both decoding every frame with the library's samplers:

- ``noised`` (Ho et al. 2020, section 4.3 and Figure 8): encode both images with the forward
  process to the same timestep t with the same noise, x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,
  mix the two linearly, and decode with the reverse process (Algorithm 2) from t. The forward noise
  and the reverse process's noise are the same for every frame, so the frames differ only by the
  mixing weight. Since the noise is shared, the mix is q(x_t | (1 - lam) x_a + lam x_b) with that
  noise. Small t keeps the frames close to the pixel-space cross-fade; large t gives the model more
  room, up to unrelated images at t = T-1.
- ``slerp`` (Song et al. 2021, section 5.3): invert both images to x_T with DDIM (``ddpm.invert``),
  interpolate the latents spherically, z(lam) = sin((1 - lam) theta)/sin(theta) z_a +
  sin(lam theta)/sin(theta) z_b with cos(theta) = <z_a, z_b>/(|z_a| |z_b|), and decode with DDIM
  eta = 0 on the same grid. The end frames are the images' DDIM reconstructions.

Decoding from t uses the schedule truncated to its first t+1 steps: abar_0..abar_t and so
q(x_t | x0) are unchanged, and the sampler then starts at timestep t.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..core.diffusion import q_sample
from ..core.noise import Generator, gaussian_noise, resolve_seeds
from ..core.schedules import NoiseSchedule
from .inversion import invert
from .samplers import Model, sample

METHODS = ("slerp", "noised")


def slerp(z_a: torch.Tensor, z_b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors of the same shape at the weights ``lam`` (F,):
    returns (F, *z_a.shape). Falls back to the linear mix when they are (nearly) parallel."""
    a, b = z_a.flatten().double(), z_b.flatten().double()
    lam = lam.to(a).view(-1, 1)
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if theta < 1e-4:
        out = (1 - lam) * a + lam * b
    else:
        out = (torch.sin((1 - lam) * theta) * a + torch.sin(lam * theta) * b) / torch.sin(theta)
    return out.to(z_a.dtype).view(-1, *z_a.shape)


@torch.no_grad()
def interpolate(
    model: Model,
    schedule: NoiseSchedule,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    *,
    frames: int = 8,
    method: Literal["slerp", "noised"] = "slerp",
    t: int | None = None,
    steps: int | None = None,
    clip_denoised: bool = True,
    prediction: str = "eps",
    variance: str = "fixed_small",
    labels: int | None = None,
    guidance: float = 1.0,
    refine: int = 0,
    generator: Generator = None,
    progress: bool = False,
) -> torch.Tensor:
    """``frames`` images from ``x_a`` to ``x_b`` (single images, e.g. (C, H, W)): (frames, C, H, W).

    ``method="slerp"``: DDIM inversion and decoding with ``steps`` steps (default 50, see
    ``ddpm.invert``; ``refine`` is invert's), deterministic. ``method="noised"``: the DDPM paper's
    Figure 8 at timestep ``t`` (default T // 2), decoded by Algorithm 2 with ``steps`` steps from t
    (default all t + 1); ``generator`` picks the one seed all frames share. ``labels`` is one class
    for every frame of a conditional model, with ``guidance`` as in ``sample``; ``prediction``,
    ``clip_denoised`` and ``variance`` describe the model as there (``variance`` is used by
    ``noised``, ``refine`` by ``slerp``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, x in (("x_a", x_a), ("x_b", x_b)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise ValueError(f"{name} must be one image as a float tensor, e.g. (C, H, W), got {getattr(x, 'shape', x)!r}")
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an integer >= 2, got {frames!r}")
    T = schedule.num_timesteps
    device = x_a.device
    lam = torch.linspace(0.0, 1.0, frames, dtype=torch.float64, device=device)
    common = dict(clip_denoised=clip_denoised, prediction=prediction, labels=labels, guidance=guidance,
                  progress=progress)

    if method == "slerp":
        ends = torch.stack([x_a, x_b.to(x_a)])
        z = invert(model, schedule, ends, steps=steps, refine=refine, **common)
        x_T = slerp(z[0], z[1], lam)
        return sample(model, schedule, x_T.shape, sampler="ddim", steps=steps, eta=0.0, x_T=x_T, device=device,
                      **common)

    t = T // 2 if t is None else t
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < T:
        raise ValueError(f"t must be an integer timestep in 0..{T - 1}, got {t!r}")
    # One seed for all frames: the same forward noise (its draw 0, x_T's draw) and reverse noise.
    seeds = resolve_seeds(generator, 1, device).expand(frames)
    eps = gaussian_noise(seeds, 0, (frames, *x_a.shape), x_a.dtype)
    t_batch = torch.full((frames,), t, dtype=torch.long, device=device)
    x_t_a = q_sample(schedule, x_a.expand(frames, *x_a.shape), t_batch, eps)
    x_t_b = q_sample(schedule, x_b.to(x_a).expand(frames, *x_a.shape), t_batch, eps)
    lam_x = lam.to(x_a.dtype).view(-1, *[1] * x_a.dim())
    mixed = (1 - lam_x) * x_t_a + lam_x * x_t_b
    head = NoiseSchedule(schedule.betas[: t + 1], name=schedule.name)  # abar_0..abar_t, starts at t
    return sample(model, head, mixed.shape, sampler="ddpm", steps=steps, x_T=mixed, generator=seeds,
                  variance=variance, device=device, **common)
