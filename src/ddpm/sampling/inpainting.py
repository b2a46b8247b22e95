"""Inpainting with an unconditionally trained model: RePaint (Lugmayr et al. 2022, Algorithm 1).

Notation (chain positions of the ancestral sampler's grid, as in ``ddpm.sampling.samplers``)::

    known, keep     the image (B, C, H, W) and the mask broadcasting to it: 1 = keep, 0 = generate
    t_0 > ... > t_{S-1}   the model timesteps of the grid (``timestep_grid``, ``uniform`` by default)
    p               chain position: p = S-1-j is the state at grid point t_j, p = -1 is x0
    abar'_p         abar at position p (the respaced chain's, improved-diffusion), abar'_{-1} = 1
    R, J            resampling rounds (``resample``) and jump length (``jump``)

Every reverse step p -> p-1 is the ancestral step of Algorithm 2 on the (respaced) chain, after the
kept region of x has been replaced by a fresh forward-noised copy of ``known``,
q(x_p | known) = N(sqrt(abar'_p) known, (1 - abar'_p) I) (RePaint Algorithm 1, lines 5 and 8).
Alone (R = 1) this is the "replacement" method: the generated region only sees the kept region
through noisy copies, so it does not harmonise with it. RePaint's resampling goes back: at the
positions p = 0, J, 2J, ... (below S - J) it noises x forward J positions at once,
q(x_{p+J} | x_p) = N(sqrt(abar'_{p+J} / abar'_p) x_p, (1 - abar'_{p+J} / abar'_p) I), and denoises
them again, R - 1 times (RePaint's jump schedule, ``get_schedule_jump``). The kept pixels of the
result are ``known`` exactly.

Randomness follows the samplers' per-sample seeds: draw 0 is x_T, then each reverse step takes one
draw for the noisy known copy and one for z, and each jump one draw, in the order of the path; the
path is the same for every sample, so sample i depends only on its seed (and its label).
"""

from __future__ import annotations

import torch

from ..core.diffusion import check_choice, q_sample, respaced_schedule
from ..core.noise import Generator, gaussian_noise, resolve_seeds
from ..core.schedules import NoiseSchedule
from .grids import SPACINGS, timestep_grid
from .guidance import guided_model
from .samplers import Model, ancestral_step, call_model

# The ancestral sampler's variances that need nothing but the model (no analytic table).
_VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def repaint_path(S: int, resample: int = 1, jump: int = 1) -> list[int]:
    """The chain positions RePaint visits, from S-1 (x_T) to -1 (x0): each move is -1 (a reverse
    step) or +``jump`` (forward noising). With ``resample=1`` it is S-1, S-2, ..., 0, -1."""
    for name, value in (("resample", resample), ("jump", jump)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    pending = {p: resample - 1 for p in range(0, S - jump, jump)}
    p, path = S - 1, [S - 1]
    while p >= 0:
        p -= 1
        path.append(p)
        if pending.get(p, 0) > 0:
            pending[p] -= 1
            p += jump
            path.append(p)
    return path


def _check_inputs(known: torch.Tensor, keep) -> torch.Tensor:
    if not isinstance(known, torch.Tensor) or known.dim() < 2 or not known.is_floating_point():
        raise ValueError(f"known must be a float tensor of shape (B, ...), got {getattr(known, 'shape', type(known))}")
    keep = torch.as_tensor(keep, device=known.device)
    try:
        shape = torch.broadcast_shapes(keep.shape, known.shape)
    except RuntimeError:
        shape = None
    if shape != known.shape:
        raise ValueError(f"keep mask of shape {tuple(keep.shape)} does not broadcast to the image's {tuple(known.shape)}")
    if keep.dtype != torch.bool:
        if not ((keep == 0) | (keep == 1)).all():
            raise ValueError("keep mask must hold only 0 (generate) and 1 (keep)")
        keep = keep == 1
    return keep


@torch.no_grad()
def inpaint(
    model: Model,
    schedule: NoiseSchedule,
    known: torch.Tensor,
    keep: torch.Tensor,
    *,
    resample: int = 1,
    jump: int = 1,
    steps: int | None = None,
    spacing: str = "uniform",
    clip_denoised: bool = True,
    variance: str = "fixed_small",
    prediction: str = "eps",
    labels: torch.Tensor | int | None = None,
    guidance: float = 1.0,
    generator: Generator = None,
    progress: bool = False,
) -> torch.Tensor:
    """Fill the pixels of ``known`` (B, ...) where ``keep`` is 0; returns (B, ...) equal to
    ``known`` where ``keep`` is 1.

    ``keep`` broadcasts to ``known`` (e.g. (1, 1, H, W) for one mask) and holds 0/1 (or bools).
    ``resample`` (R) and ``jump`` (J) are RePaint's; R = 1 is plain replacement. ``steps`` and
    ``spacing`` pick the grid as ``sample(..., sampler="ddpm")`` does (all T steps by default); the
    model is called (about) S + (R - 1) S times. ``clip_denoised``, ``variance``, ``prediction``,
    ``labels``, ``guidance`` and ``generator`` mean what they mean for ``sample`` (``variance``:
    fixed_small, fixed_large or learned_range). Runs on the device of ``known``.
    """
    check_choice("variance", variance, _VARIANCES)
    check_choice("spacing", spacing, SPACINGS)
    keep = _check_inputs(known, keep)
    B, device = known.shape[0], known.device
    T = schedule.num_timesteps
    grid = timestep_grid(T, T if steps is None else steps, spacing, schedule=schedule)
    S = len(grid)
    path = repaint_path(S, resample, jump)
    chain = respaced_schedule(schedule, grid.flip(0)).to(device)
    model_t = grid.flip(0).to(device)  # model timestep of chain position p
    fn = guided_model(model, labels, guidance, B, device)
    dtype = torch.float64 if known.dtype == torch.float64 else torch.float32
    known = known.to(dtype)
    ab = chain.alphas_cumprod

    seeds = resolve_seeds(generator, B, device)
    x = gaussian_noise(seeds, 0, known.shape, dtype)  # Algorithm 1, line 1: x_T ~ N(0, I)
    draws = iter(range(1, 2 * len(path) + 1))
    moves = zip(path[:-1], path[1:])
    if progress:
        from tqdm.auto import tqdm

        moves = tqdm(moves, desc="repaint", total=len(path) - 1)
    for p, nxt in moves:
        if nxt > p:
            # Resampling (Algorithm 1, line 10, J steps at once): x_{p+J} ~ q(x_{p+J} | x_p).
            r = ab[nxt] / ab[p]
            x = r.sqrt().to(dtype) * x + (1 - r).sqrt().to(dtype) * gaussian_noise(seeds, next(draws), x.shape, dtype)
            continue
        t_chain = torch.full((B,), p, dtype=torch.long, device=device)
        # Lines 5 and 8: the kept region is the known pixels noised to this position.
        noisy_known = q_sample(chain, known, t_chain, gaussian_noise(seeds, next(draws), x.shape, dtype))
        x = torch.where(keep, noisy_known, x)
        # Lines 6-7: the ancestral step (Algorithm 2) on the whole image; no noise on the last one.
        output = call_model(fn, x, model_t[p].expand(B), variance)
        z = gaussian_noise(seeds, next(draws), x.shape, dtype)
        x, _ = ancestral_step(chain, output, x, p, z, prediction=prediction, variance=variance,
                              clip_denoised=clip_denoised)
    return torch.where(keep, known, x)
