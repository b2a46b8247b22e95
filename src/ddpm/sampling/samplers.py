"""Samplers: ancestral DDPM (Algorithm 2), DDIM and DPM-Solver++(2M), one entry point ``sample``.

Notation (0-based model timesteps, as in ``ddpm.core.schedules``)::

    T               number of training timesteps; the model takes t in 0..T-1
    S               number of sampling steps (``steps``), 1..T
    t_0 > ... > t_{S-1}   the grid of model timesteps visited (``timestep_grid``), descending
    abar_t          alphas_cumprod[t];  abar_prev = abar at the next grid point, 1 after the last
    alpha_t, sigma_t  sqrt(abar_t), sqrt(1 - abar_t)   (x_t = alpha_t x0 + sigma_t eps, eq. 4)
    lambda_t        log(alpha_t / sigma_t), half the log-SNR (DPM-Solver's time variable)
    x0_pred         the model's estimate of x0 at the current step ("predicted x_0" in DDIM eq. 12)
    eps_pred        the model's estimate of eps ("direction pointing to x_t")
    sigma_i         DDIM's noise scale, eta * sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)
    z               fresh standard Gaussian noise (Algorithm 2, line 3)

Randomness. Every random number comes from ``generator`` through a per-sample seed
(``ddpm.core.noise``): draw 0 of sample i is its x_T, draw j + 1 the noise added at step j, so
sample i is the same whatever the batch size or the other samples.

The model receives x_t in the working dtype (float32, or float64 when ``x_T`` is float64) and may
compute in any dtype (autocast, bf16); its output is cast back and every update is done in the
working dtype with float64 schedule terms prepared on the device once, before the loop.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.device import model_device
from ..core.diffusion import (
    PREDICTIONS,
    VARIANCES,
    check_choice,
    p_mean_variance,
    predict_eps_from_x0,
    respaced_schedule,
    split_output,
    x0_eps_from_output,
)
from ..core.noise import Generator, gaussian_noise, per_sample_seeds, resolve_seeds
from ..core.schedules import NoiseSchedule
from .grids import SPACINGS, timestep_grid
from .guidance import autoguided_model, check_guidance, check_interval, guided_model, interval_model

__all__ = ["SAMPLERS", "SPACINGS", "Generator", "Model", "ancestral_step", "call_model", "clean_prediction",
           "default_steps", "gaussian_noise", "per_sample_seeds", "sample", "timestep_grid"]

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
_DEFAULT_STEPS = {"ddim": 50, "dpm++2m": 20}  # ddpm defaults to T (the paper's Algorithm 2)
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpm++2m": "logsnr"}

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

def default_steps(sampler: str, T: int) -> int:
    """The number of steps ``sample`` takes when ``steps=None``: T for ddpm (Algorithm 2 visits
    every timestep), 50 for ddim and 20 for dpm++2m, never more than T."""
    check_choice("sampler", sampler, SAMPLERS)
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    return min(_DEFAULT_STEPS.get(sampler, int(T)), int(T))


@torch.no_grad()
def sample(
    model: Model,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    sampler: Literal["ddpm", "ddim", "dpm++2m"] = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: Literal["uniform", "leading", "trailing", "quad", "logsnr"] | None = None,
    clip_denoised: bool = True,
    variance: Literal["fixed_small", "fixed_large", "learned_range", "analytic"] = "fixed_small",
    analytic=None,
    prediction: Literal["eps", "x0", "v"] = "eps",
    x_T: torch.Tensor | None = None,
    generator: Generator = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
    labels: torch.Tensor | int | None = None,
    guidance: float = 1.0,
    guide: Model | None = None,
    autoguidance: float = 1.0,
    guidance_interval: tuple[int, int] | None = None,
):
    """Draw samples of ``shape`` (B, ...) from ``model(x_t, t)``, e.g. (B, C, H, W) or (B, 2).

    ``steps`` defaults to ``default_steps(sampler, T)`` (T for ddpm, 50 for ddim, 20 for dpm++2m,
    at most T); ``spacing`` to ``uniform`` (ddpm, ddim) or ``logsnr`` (dpm++2m), see
    ``timestep_grid``. ``clip_denoised`` clamps x0_pred to [-1, 1] at every step. Randomness: see
    the module docstring; ``x_T`` replaces draw 0. Returns x0 (B, ...) in the working dtype, or
    ``(x0, trajectory)`` with trajectory = {"timesteps": (S,) the model timesteps visited, in order,
    "x_t": (S+1, B, ...) from x_T to the result, "x0": (S, B, ...) the prediction at each step}.

    Options. ``prediction``, ``variance`` and ``clip_denoised`` describe the model and its run (a
    run's ``sample_kwargs``), so every sampler accepts them. ``variance`` is the ancestral
    sampler's sigma_t^2 (fixed_small = beta~_t, fixed_large = beta_t, learned_range for a model
    returning (B, 2C, ...), analytic with ``analytic`` = ``ddpm.analytic_variance(...)``; on a
    respaced grid all are the respaced chain's); ddim and dpm++2m, which set their own noise, do
    not use it and take the first C channels of a 2C output. ``eta`` (0..1) is DDIM's alone: the
    other samplers refuse a non-zero ``eta`` with a ValueError naming it and the sampler instead of ignoring it, while
    ``eta=0`` (no added noise, the default) is accepted by all so that a command line can pass its
    default whatever the sampler. A misspelled or unknown keyword raises TypeError.

    Conditional models (``model(x_t, t, labels)`` carrying ``model.num_classes``): ``labels`` is a
    long tensor (B,) in 0..num_classes (num_classes: the null label) or one int for all, and
    ``guidance`` w the classifier-free guidance scale, output_null + w (output_cond - output_null)
    (``ddpm.sampling.guidance``). Sample i depends only on its seed and its label.

    Autoguidance (Karras et al. 2024): ``guide`` is the same network earlier in its training (a
    run's ``guide_kwargs``) and ``autoguidance`` w the scale, output_guide + w (output - output_guide),
    formed after classifier-free guidance of each (``ddpm.sampling.guidance.autoguided_model``).

    ``guidance_interval`` (t_lo, t_hi), two model timesteps 0 <= t_lo <= t_hi <= T - 1 (the units
    of ``t`` everywhere here: 0 is the first noising step, T - 1 pure noise): both guidances apply
    only at steps whose t lies in [t_lo, t_hi]; elsewhere the model runs once, conditional without
    guidance (w = 1) and without its guide (Kynkäänniemi et al. 2024). None: every step.
    """
    grid, device, dtype = _check_options(model, schedule, shape, sampler, steps, eta, spacing, variance, prediction,
                                         x_T, device, guide, autoguidance, analytic)
    interval = check_interval(guidance_interval, schedule.num_timesteps)
    unguided = guided_model(model, labels, 1.0, shape[0], device) if interval is not None else None
    model = guided_model(model, labels, guidance, shape[0], device)  # the model itself when unconditional
    if guide is not None:  # both networks guided by the labels first, then one by the other
        model = autoguided_model(model, guided_model(guide, labels, guidance, shape[0], device), autoguidance)
    if interval is not None:
        model = interval_model(model, unguided, interval)
    # Everything the loop needs lives on the device from here on: no host round trips per step.
    seeds = resolve_seeds(generator, shape[0], device)
    # Algorithm 2, line 1: x_T ~ N(0, I) (draw 0 of each sample's seed).
    x = gaussian_noise(seeds, 0, shape, dtype) if x_T is None else x_T.to(device, dtype)
    traj = {"timesteps": grid, "x_t": [x], "x0": []} if return_trajectory else None
    run, own = _SAMPLER_FUNCTIONS[sampler]
    options = {"eta": float(eta), "variance": variance, "analytic": analytic}
    x = run(model, schedule, grid, x, seeds, progress=progress, traj=traj, clip_denoised=bool(clip_denoised),
            prediction=prediction, **{name: options[name] for name in own})
    if traj is None:
        return x
    return x, {"timesteps": grid, "x_t": torch.stack(traj["x_t"]), "x0": torch.stack(traj["x0"])}


def _check_options(model, schedule, shape, sampler, steps, eta, spacing, variance, prediction, x_T, device, guide,
                   autoguidance, analytic) -> tuple[torch.Tensor, torch.device, torch.dtype]:
    """Every check of ``sample``'s arguments, in one place: returns the grid, the device and the
    working dtype, or raises ValueError naming the argument."""
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("variance", variance, VARIANCES)
    spacing = DEFAULT_SPACING[sampler] if spacing is None else spacing
    T = schedule.num_timesteps
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    own, given = _SAMPLER_FUNCTIONS[sampler][1], {"eta": eta}
    for name, off in _OFF.items():
        value = given[name]
        if name not in own and value != off:
            takers = ", ".join(repr(s) for s, (_, o) in _SAMPLER_FUNCTIONS.items() if name in o)
            raise ValueError(f"{name}={value} is not an option of sampler {sampler!r} (only of {takers}); "
                             f"leave it at {off}")
    if variance == "analytic" and analytic is None and sampler == "ddpm":
        raise ValueError("variance='analytic' needs analytic=ddpm.analytic_variance(model, schedule, data)")
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"shape must be (B, ...) with positive integers and at least 2 dims, got {shape!r}")
    grid = timestep_grid(T, default_steps(sampler, T) if steps is None else steps, spacing, schedule=schedule)
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T shape {tuple(x_T.shape)} does not match shape {shape}")
    if guide is None and check_guidance(autoguidance) != 1.0:
        raise ValueError(f"autoguidance={autoguidance} needs guide= (the network earlier in its training)")
    device = torch.device(device) if device is not None else x_T.device if x_T is not None else model_device(model)
    dtype = x_T.dtype if x_T is not None and x_T.dtype == torch.float64 else torch.float32
    return grid, device, dtype


def _steps(grid: torch.Tensor, name: str, progress: bool):
    if not progress:
        return range(len(grid))
    return tqdm(range(len(grid)), desc=name, total=len(grid))


def call_model(model: Model, x: torch.Tensor, t: torch.Tensor, variance: str | None = None) -> torch.Tensor:
    """model(x, t) with its shape checked: x's, or (B, 2C, ...) for variance="learned_range".

    Samplers that set their own noise pass no variance and get the prediction channels alone, of
    either shape: a learned variance is of no use to them.
    """
    output = model(x, t)
    if variance is not None:
        split_output(output, x.shape, variance)
        return output
    doubled = output.ndim == x.ndim > 1 and output.shape[1] == 2 * x.shape[1]
    return split_output(output, x.shape, "learned_range" if doubled else "fixed_small")[0]


def _record(traj: dict | None, x: torch.Tensor, x0: torch.Tensor) -> None:
    if traj is not None:
        traj["x_t"].append(x)
        traj["x0"].append(x0)


# ---------------------------------------------------------------------------------------------
# The samplers: f(model, schedule, grid, x_T, seeds, *, progress, traj, clip_denoised, prediction,
# <its own options>) -> x0. Each takes exactly the options it uses (registered in
# _SAMPLER_FUNCTIONS at the end), so that sample() can refuse a value that would be ignored.
# ---------------------------------------------------------------------------------------------

def _ddpm(model, schedule, grid, x, seeds, *, progress, traj, clip_denoised, prediction, variance, analytic):
    """Algorithm 2 (Ho et al. 2020) on the grid; a grid shorter than T is respaced (improved-diffusion).

    The posterior of the (respaced) chain is indexed by the step index i while the model is called
    with the original timestep grid[i]. A learned variance interpolates between the chain's beta
    and beta~ (as improved-diffusion's respacing does); an analytic one is the chain's optimum.
    """
    device, B = x.device, x.shape[0]
    S = len(grid)
    chain = respaced_schedule(schedule, grid.flip(0)).to(device)  # the schedule itself when S = T
    table = analytic.variances(schedule, grid.flip(0)).to(device) if variance == "analytic" else None
    model_t = grid.to(device)
    for j in _steps(grid, "ddpm", progress):
        i = S - 1 - j  # position in the (respaced) chain; 0 is the last step
        output = call_model(model, x, model_t[j].expand(B), variance)
        z = gaussian_noise(seeds, j + 1, x.shape, x.dtype) if i > 0 else None
        x, x0 = ancestral_step(chain, output, x, i, z, prediction=prediction, variance=variance,
                               clip_denoised=clip_denoised, analytic_variances=table)
        _record(traj, x, x0)
    return x


def ancestral_step(chain: NoiseSchedule, output: torch.Tensor, x: torch.Tensor, i: int, z: torch.Tensor | None, *,
                   prediction: str, variance: str, clip_denoised: bool,
                   analytic_variances: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Algorithm 2 from position ``i`` of ``chain`` (the schedule, or a respaced one;
    0 is the last step): returns (x_{i-1}, x0_pred) for the model ``output`` at x_i.

    Lines 3-4: x_{i-1} = mu_theta(x_i, i) + sigma_i z, z ~ N(0, I), except on the last step (z = 0,
    line 3), where mu_theta = x0_pred and the loop returns x_0 (line 6). mu_theta is the posterior
    mean at x0_pred (eq. 7), which is line 4's formula when unclipped. ``z`` may be None at i = 0.
    """
    if chain.num_timesteps == 1 and variance == "fixed_large":
        # The only step is the last (no noise): the variance is unused, and a one-step chain has no
        # fixed_large table (beta~_1, beta_2, ...).
        variance = "fixed_small"
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    mean, var, _, x0 = p_mean_variance(chain, output, x, t, prediction=prediction, variance=variance,
                                       clip_denoised=clip_denoised, analytic_variances=analytic_variances)
    return (mean + var.sqrt() * z if i > 0 else mean), x0


def clean_prediction(schedule, x, t, output, prediction, clip_denoised):
    """(x0_pred, eps_pred) from a model output; with ``clip_denoised`` x0_pred is clamped to [-1, 1]
    and eps_pred recomputed from it."""
    x0, eps = x0_eps_from_output(schedule, x, t, output, prediction)
    if clip_denoised:
        # Keep eps consistent with the clipped x0 (improved-diffusion's DDIM, diffusers'
        # use_clipped_model_output=True): then DDIM with eta=1 is exactly the posterior step.
        x0 = x0.clamp(-1.0, 1.0)
        eps = predict_eps_from_x0(schedule, x, t, x0)
    return x0, eps


def _ddim(model, schedule, grid, x, seeds, *, progress, traj, clip_denoised, prediction, eta):
    """DDIM (Song et al. 2021, eq. 12), generalised by eta; the last step lands on x0 (abar_prev = 1)."""
    device, B, dt = x.device, x.shape[0], x.dtype
    schedule = schedule.to(device)
    model_t = grid.to(device)
    ab = schedule.alphas_cumprod[model_t]
    ab_prev = torch.cat([ab[1:], ab.new_ones(1)])
    # Eq. 16: sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev).
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    c_x0, c_eps = ab_prev.sqrt().to(dt), (1 - ab_prev - sigma**2).clamp(min=0).sqrt().to(dt)
    sigma = sigma.to(dt)
    for j in _steps(grid, "ddim", progress):
        t = model_t[j].expand(B)
        x0, eps = clean_prediction(schedule, x, t, call_model(model, x, t), prediction, clip_denoised)
        # Eq. 12: sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps_pred + sigma z.
        x = c_x0[j] * x0 + c_eps[j] * eps
        if eta > 0 and j < len(grid) - 1:  # sigma is 0 on the last step
            x = x + sigma[j] * gaussian_noise(seeds, j + 1, x.shape, dt)
        _record(traj, x, x0)
    return x


def _dpmpp_2m(model, schedule, grid, x, seeds, *, progress, traj, clip_denoised, prediction):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order, data prediction.

    The first step is first order (no history yet) and so is the last, which goes from t_{S-1} to
    sigma = 0 and returns the data prediction there (lower_order_final, always on here).
    """
    device, B, dt = x.device, x.shape[0], x.dtype
    schedule = schedule.to(device)
    model_t = grid.to(device)
    ab = schedule.alphas_cumprod[model_t]
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)
    h = lam[1:] - lam[:-1]  # h_i = lambda_{t_{i+1}} - lambda_{t_i}, step i -> i+1
    c_x = (sigma[1:] / sigma[:-1]).to(dt)
    c_d = (-alpha[1:] * torch.expm1(-h)).to(dt)  # -alpha_{i+1} (e^{-h} - 1)
    # r_i = h_{i-1} / h_i; D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}.
    half_inv_r = torch.cat([h.new_zeros(1), 0.5 * h[1:] / h[:-1]]).to(dt) if len(h) else h.to(dt)
    x0_prev = None
    for j in _steps(grid, "dpm++2m", progress):
        t = model_t[j].expand(B)
        x0, _ = clean_prediction(schedule, x, t, call_model(model, x, t), prediction, clip_denoised)
        if j == len(grid) - 1:
            x = x0  # first-order step to sigma = 0: x = x0_pred.
        elif x0_prev is None:
            x = c_x[j] * x + c_d[j] * x0  # first order (DPM-Solver++1, i.e. DDIM)
        else:
            d = (1 + half_inv_r[j]) * x0 - half_inv_r[j] * x0_prev
            x = c_x[j] * x + c_d[j] * d
        x0_prev = x0
        _record(traj, x, x0)
    return x


# name -> (function, the options of sample() it takes besides the shared ones).
_SAMPLER_FUNCTIONS = {"ddpm": (_ddpm, ("variance", "analytic")), "ddim": (_ddim, ("eta",)),
                      "dpm++2m": (_dpmpp_2m, ())}
# Options that only some samplers take, with the value that means "off": a sampler that does not
# take one refuses any other value. (variance and analytic are not here: they describe the run,
# see sample().)
_OFF = {"eta": 0.0}
