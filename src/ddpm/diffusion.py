"""The forward process, its posterior, parametrisation conversions, the training objective and
the variational-bound terms (Ho et al. 2020, sections 2-3).

Notation::

    x0            clean data, (B, ...)
    x_t           noised data at 0-based timestep t (the paper's step t+1)
    eps           standard Gaussian noise with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (eq. 4)
    v             sqrt(abar_t) eps - sqrt(1 - abar_t) x0   (Salimans & Ho 2022)
    t             long tensor of shape (B,), values in 0..T-1

Schedule terms are float64; ``extract`` gathers them on the device of ``t`` and casts to the
working dtype, so nothing is copied from the host inside a sampling loop once the schedule has
been moved with ``schedule.to(device)``.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("simple", "min_snr")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """Refuse an option outside its allowed values with a message that lists them."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    return value


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size | tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gather ``a[t]`` and reshape to (B, 1, ..., 1) to broadcast against ``x_shape``."""
    if a.device != t.device:
        a = a.to(t.device)
    out = a.gather(0, t.long()).to(dtype)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # Coefficients are applied in at least float32 even when the network runs in bf16.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_timesteps(schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor) -> None:
    """Refuse a ``t`` that is not an integer tensor of shape (B,) with values in 0..T-1.

    The range is checked only for CPU tensors: on an accelerator it would cost a host sync.
    """
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != x.shape[0]:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be a tensor of shape (B,) = ({x.shape[0]},), got {shape}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"t must hold integer timesteps (torch.long), got dtype {t.dtype}")
    if t.device.type == "cpu" and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= schedule.num_timesteps:
            bad = lo if lo < 0 else hi
            raise ValueError(f"timestep {bad} out of range; t must lie in 0..{schedule.num_timesteps - 1}")


# ---------------------------------------------------------------------------------------------
# Forward process q
# ---------------------------------------------------------------------------------------------

def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4 in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    check_timesteps(schedule, x0, t)
    if noise is None:
        noise = torch.randn_like(x0)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
    dt = _work_dtype(x0)
    out = extract(schedule.sqrt_alphas_cumprod, t, x0.shape, dt) * x0 + extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape, dt
    ) * noise
    return out.to(x0.dtype)


def q_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor):
    """Mean, variance and log-variance of q(x_t | x0) (eq. 4)."""
    dt = _work_dtype(x0)
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape, dt) * x0
    var = extract(1.0 - schedule.alphas_cumprod, t, x0.shape, dt)
    log_var = extract(schedule.log_one_minus_alphas_cumprod, t, x0.shape, dt)
    return mean, var, log_var


def q_posterior_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Eqs. 6-7: q(x_{t-1} | x_t, x0) = N(mu~_t, beta~_t I); returns (mean, variance, clipped log-variance)."""
    dt = _work_dtype(x_t)
    mean = extract(schedule.posterior_mean_coef1, t, x_t.shape, dt) * x0 + extract(
        schedule.posterior_mean_coef2, t, x_t.shape, dt
    ) * x_t
    var = extract(schedule.posterior_variance, t, x_t.shape, dt)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.shape, dt)
    return mean, var, log_var


# ---------------------------------------------------------------------------------------------
# Parametrisations: eps <-> x0 <-> v
# ---------------------------------------------------------------------------------------------

def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert eq. 4: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).

    Undefined where abar_t = 0 (the last step of a zero-terminal-SNR schedule): eps carries no
    information about x0 there, so such schedules need the x0 or v parametrisation.
    """
    dt = _work_dtype(x_t)
    return extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape, dt) * x_t - extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape, dt
    ) * eps


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).

    Written without 1/sqrt(abar_t) (unlike improved-diffusion) so that it stays finite at a
    zero-terminal-SNR step, where abar_T = 0 and eps = x_T.
    """
    dt = _work_dtype(x_t)
    return (x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t.shape, dt) * x0) / extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape, dt
    )


def v_from_x0_eps(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    dt = _work_dtype(x0)
    return extract(schedule.sqrt_alphas_cumprod, t, x0.shape, dt) * eps - extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape, dt
    ) * x0


def x0_eps_from_v(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v and eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    dt = _work_dtype(x_t)
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t.shape, dt)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape, dt)
    return a * x_t - s * v, s * x_t + a * v


def x0_eps_from_output(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor, prediction: Prediction = "eps"
):
    """Turn a network output of any parametrisation into (x0, eps)."""
    output = output.to(_work_dtype(x_t))
    if prediction == "eps":
        return predict_x0_from_eps(schedule, x_t, t, output), output
    if prediction == "x0":
        return output, predict_eps_from_x0(schedule, x_t, t, output)
    if prediction == "v":
        return x0_eps_from_v(schedule, x_t, t, output)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


# ---------------------------------------------------------------------------------------------
# Objective (Algorithm 1)
# ---------------------------------------------------------------------------------------------

def training_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    prediction: Prediction = "eps",
    weighting: Literal["simple", "min_snr"] = "simple",
    min_snr_gamma: float = 5.0,
    reduction: Literal["mean", "none"] = "mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Algorithm 1: L_simple = E_{t, x0, eps} || eps - eps_theta(x_t, t) ||^2 (eq. 14).

    ``t`` defaults to uniform over 0..T-1 and ``noise`` to N(0, I), both drawn from
    ``generator``. ``prediction`` picks the regression target (eps, x0 or v). With
    ``weighting="min_snr"`` each example's loss is scaled by the min-SNR-gamma weight (Hang et al.
    2023), expressed for the chosen target so that all three optimise the same x0-space weighting
    min(SNR, gamma). ``reduction="none"`` returns the per-example losses, shape (B,).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("reduction", reduction, ("mean", "none"))
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
    if x0.ndim < 2:
        raise ValueError(f"x0 must have shape (B, ...), got {tuple(x0.shape)}")
    B = x0.shape[0]
    T = schedule.num_timesteps
    # Algorithm 1, line 3: t ~ Uniform({1, ..., T}) (0-based here).
    if t is None:
        t = torch.randint(0, T, (B,), device=x0.device, generator=generator)
    check_timesteps(schedule, x0, t)
    # Algorithm 1, line 4: eps ~ N(0, I).
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = q_sample(schedule, x0, t, noise)
    # Algorithm 1, line 5: gradient step on || eps - eps_theta(sqrt(abar) x0 + sqrt(1-abar) eps, t) ||^2.
    output = model(x_t, t)
    if output.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} does not match x shape {tuple(x0.shape)}")
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    else:
        target = v_from_x0_eps(schedule, x0, noise, t).to(x0.dtype)
    dt = _work_dtype(x0)  # float32 at least, even for a bf16 network
    per_example = F.mse_loss(output.to(dt), target.to(dt), reduction="none").flatten(1).mean(1)
    if weighting == "min_snr":
        # Hang et al. 2023: weight min(SNR, gamma) on the x0-space error. Since
        # ||eps - eps^||^2 = SNR ||x0 - x0^||^2 and ||v - v^||^2 = (SNR + 1) ||x0 - x0^||^2,
        # the eps and v losses are weighted by min(SNR, gamma)/SNR and min(SNR, gamma)/(SNR + 1).
        snr = extract(schedule.snr(), t, (B,), dt)
        if prediction == "eps":
            weight = (min_snr_gamma / snr).clamp(max=1.0)  # = min(SNR, gamma)/SNR, and 1 at SNR = 0
        elif prediction == "x0":
            weight = snr.clamp(max=min_snr_gamma)
        else:
            weight = snr.clamp(max=min_snr_gamma) / (snr + 1)
        per_example = per_example * weight
    return per_example.mean() if reduction == "mean" else per_example


# ---------------------------------------------------------------------------------------------
# Reverse process p and the variational bound (section 3.3, eq. 5)
# ---------------------------------------------------------------------------------------------

VARIANCES = ("fixed_small", "fixed_large")


def p_mean_variance(
    schedule: NoiseSchedule,
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction: Prediction = "eps",
    variance: Literal["fixed_small", "fixed_large"] = "fixed_small",
    clip_denoised: bool = True,
):
    """p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) from a network output (section 3.2).

    ``fixed_small`` is sigma_t^2 = beta~_t (the posterior variance), ``fixed_large`` is
    sigma_t^2 = beta_t (with beta~_1 at t=0 for the log, as in the paper's code). The mean is the
    posterior mean at the predicted x0, which for eps-prediction equals eq. 11 when no clipping
    is applied. Returns (mean, variance, log_variance, x0_pred).
    """
    check_choice("variance", variance, VARIANCES)
    check_choice("prediction", prediction, PREDICTIONS)
    if output.shape != x_t.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} does not match x_t shape {tuple(x_t.shape)}")
    x0, _ = x0_eps_from_output(schedule, x_t, t, output, prediction)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean, var, log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    if variance == "fixed_large":
        dt = _work_dtype(x_t)
        var = extract(schedule.fixed_large_variance, t, x_t.shape, dt)
        log_var = torch.log(var)
    return mean, var, log_var, x0


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation used by the paper's code; exact enough at the bin edges of 8-bit data.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Section 3.3, eq. 13: log p(x0 | x1) for data on 256 levels scaled to [-1, 1].

    Each level owns a bin of width 2/255; the outermost bins extend to -inf and +inf so that the
    probabilities over the 256 levels sum to 1. ``log_scales`` is the log standard deviation.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
