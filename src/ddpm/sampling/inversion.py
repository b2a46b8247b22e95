"""DDIM inversion (Song, Meng & Ermon 2021, section 4.3): the deterministic DDIM ODE run forwards.

Notation (as in ``ddpm.sampling.samplers``; their alpha is our abar)::

    t_0 > ... > t_{S-1}   the grid ``sample(..., sampler="ddim", steps=S)`` visits (``timestep_grid``)
    y_k             the state at t_{S-1-k}, k = 0..S-1, so y_{S-1} = x_T; y_{-1} = x0 (abar = 1)
    abar_k          abar at t_{S-1-k}, abar_{-1} = 1

DDIM with eta = 0 (eq. 12) steps y_k -> y_{k-1} with the model's prediction e = eps(y_k, t of y_k):
y_{k-1} = sqrt(abar_{k-1}) (y_k - sqrt(1 - abar_k) e) / sqrt(abar_k) + sqrt(1 - abar_{k-1}) e.
Solved for y_k, that is the same update run upwards,

    y_k = sqrt(abar_k) (y_{k-1} - sqrt(1 - abar_{k-1}) e) / sqrt(abar_{k-1}) + sqrt(1 - abar_k) e,

except that e should be the prediction at y_k, which is not known yet. Inversion takes it at the
state it has, e = eps(y_{k-1}, t of y_k) (the Euler step of the ODE, eq. 14, in the encoding
direction, evaluated at the timestep it moves to as diffusers' DDIMInverseScheduler does). The
error is one step's change of eps along the path, so the reconstruction error falls as S grows.
``refine=n`` repeats the step n more times with e taken at the latest estimate of y_k: a
fixed-point iteration of the exact inverse (Pan et al. 2023, AIDI), n more model calls per step.
With clipping, e is the eps recomputed from the clipped x0_pred, as the sampler uses it.
"""

from __future__ import annotations

import torch

from ..core.diffusion import PREDICTIONS, check_choice
from ..core.schedules import NoiseSchedule
from .grids import SPACINGS, timestep_grid
from .guidance import guided_model
from .samplers import DEFAULT_SPACING, Model, call_model, clean_prediction, default_steps


@torch.no_grad()
def invert(
    model: Model,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    steps: int | None = None,
    spacing: str | None = None,
    clip_denoised: bool = True,
    prediction: str = "eps",
    labels: torch.Tensor | int | None = None,
    guidance: float = 1.0,
    refine: int = 0,
    progress: bool = False,
    return_trajectory: bool = False,
):
    """The x_T (B, ...) from which ``sample(model, schedule, x0.shape, sampler="ddim", steps=steps,
    eta=0.0, x_T=x_T)`` returns (approximately) ``x0`` (B, ...).

    ``steps`` and ``spacing`` default as for ``sample(..., sampler="ddim")`` (50 steps, uniform), and
    the grid is the one that call uses; pass the same ``clip_denoised``, ``prediction``, ``labels``
    and ``guidance`` to both. Runs on the device and in the dtype of ``x0`` (float64 gives the most
    exact round trip). ``refine`` adds fixed-point iterations per step (see the module docstring):
    each makes the round trip more exact at the cost of S more model calls. With ``return_trajectory`` also returns {"timesteps": (S,) ascending,
    "x_t": (S+1, B, ...) from x0 to x_T}.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be a non-negative integer, got {refine!r}")
    spacing = DEFAULT_SPACING["ddim"] if spacing is None else spacing
    check_choice("spacing", spacing, SPACINGS)
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a float tensor of shape (B, ...), got {getattr(x0, 'shape', type(x0))}")
    T = schedule.num_timesteps
    steps = default_steps("ddim", T) if steps is None else steps
    ascending = timestep_grid(T, steps, spacing, schedule=schedule).flip(0).to(x0.device)
    B, device = x0.shape[0], x0.device
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    fn = guided_model(model, labels, guidance, B, device)
    schedule = schedule.to(device)
    ab = schedule.alphas_cumprod[ascending]
    ab_cur = torch.cat([ab.new_ones(1), ab[:-1]])  # abar of y_{k-1}: 1 for x0
    c_y = (ab / ab_cur).sqrt().to(dtype)
    c_e = ((1 - ab).sqrt() - (ab / ab_cur).sqrt() * (1 - ab_cur).sqrt()).to(dtype)

    x = x0.to(dtype)
    trajectory = [x]
    ks = range(len(ascending))
    if progress:
        from tqdm.auto import tqdm

        ks = tqdm(ks, desc="invert")
    for k in ks:
        t = ascending[k].expand(B)
        guess = x
        for _ in range(1 + refine):
            _, eps = clean_prediction(schedule, guess, t, call_model(fn, guess, t), prediction, clip_denoised)
            guess = c_y[k] * x + c_e[k] * eps  # eq. 12 with eta = 0, solved for y_k
        x = guess
        trajectory.append(x)
    if not return_trajectory:
        return x
    return x, {"timesteps": ascending.cpu(), "x_t": torch.stack(trajectory)}
