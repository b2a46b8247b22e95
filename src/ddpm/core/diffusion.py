"""The forward process, its posterior, parametrisation conversions, the training objective and
the variational-bound terms (Ho et al. 2020, sections 2-3).

Notation::

    x0            clean data, (B, ...)
    x_t           noised data at 0-based timestep t (the paper's step t+1)
    eps           standard Gaussian noise with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (eq. 4)
    v             sqrt(abar_t) eps - sqrt(1 - abar_t) x0   (Salimans & Ho 2022)
    t             long tensor of shape (B,), values in 0..T-1
    sigma_t^2     the reverse variance of p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I): fixed (beta~_t or
                  beta_t), learned (Nichol & Dhariwal 2021, eq. 15) or analytic (Bao et al. 2022)

Schedule terms are float64; ``extract`` gathers them on the device of ``t`` and casts to the
working dtype, so nothing is copied from the host inside a sampling loop once the schedule has
been moved with ``schedule.to(device)``.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("simple", "min_snr")
# sigma_t^2 of p(x_{t-1} | x_t): beta~_t, beta_t, learned between them (eq. 15 of Nichol & Dhariwal
# 2021; the model returns 2C channels), or the analytic optimum of Bao et al. 2022 (ddpm.core.analytic).
Variance = Literal["fixed_small", "fixed_large", "learned_range", "analytic"]
VARIANCES = ("fixed_small", "fixed_large", "learned_range", "analytic")
OBJECTIVES = ("simple", "vlb")
DECODERS = ("discretized", "continuous")


def variance_channels_problem(learn_sigma: bool, variance: str, *, training: bool) -> str | None:
    """The one rule between a network's variance channels (``learn_sigma``: it outputs eq. 15's v
    beside its prediction) and the reverse variance, as a one-line problem or None.

    ``learned_range`` reads the channels, so it needs a network that has them. In training the
    rule also runs the other way, since nothing but ``learned_range`` trains the channels; a
    learned-variance network sampled or bounded with another variance just has its channels
    dropped (``ddpm.nets.wrappers.PredictionChannels``).
    """
    if variance == "learned_range" and not learn_sigma:
        return ("diffusion.variance 'learned_range' needs a network that outputs variances: set model.learn_sigma "
                "(ddpm train --learn-sigma)")
    if training and learn_sigma and variance != "learned_range":
        return (f"model.learn_sigma outputs variances that only diffusion.variance 'learned_range' reads, not "
                f"{variance!r}; set both or neither")
    return None


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


def split_output(output: torch.Tensor, x_shape: torch.Size | tuple, variance: str = "fixed_small"):
    """A network output -> (prediction (B, C, ...), variance values v (B, C, ...) or None).

    With ``variance="learned_range"`` the output is (B, 2C, ...): the first C channels are the
    prediction (eps, x0 or v), the last C the interpolation v in [-1, 1] of eq. 15 (improved-diffusion's
    channel order, which diffusers' learned-variance models share). Otherwise it must have x's shape.
    """
    x_shape = tuple(x_shape)
    got = tuple(output.shape)
    if variance == "learned_range":
        want = (x_shape[0], 2 * x_shape[1], *x_shape[2:])
        if got != want:
            raise ValueError(f"model output shape {got} is not {want}: variance='learned_range' needs twice the "
                             f"channels of x_t {x_shape}")
        return output.chunk(2, dim=1)
    if got != x_shape:
        doubled = len(got) == len(x_shape) > 1 and got[1] == 2 * x_shape[1] and got[2:] == x_shape[2:]
        hint = " (a model with learned variances needs variance='learned_range')" if doubled else ""
        raise ValueError(f"model output shape {got} does not match x_t shape {x_shape}{hint}")
    return output, None


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

def objective_problem(objective: str, variance: str, weighting: str) -> str | None:
    """The one rule for what L_vlb can train with, as a one-line problem or None. L_vlb with a
    fixed variance is the DDPM paper's "true bound" ablation (its Table 2) and is allowed; the
    analytic variance exists only after training (``ddpm.core.analytic``), so nothing could train
    it; the weightings reweight L_simple, which L_vlb alone does not have."""
    if objective == "vlb" and variance == "analytic":
        return ("objective 'vlb' needs a variance to train with: analytic variances are estimated after training "
                "(ddpm analytic RUN); use variance learned_range (or fixed_small/fixed_large)")
    if objective == "vlb" and weighting != "simple":
        return f"weighting {weighting!r} weights L_simple; objective 'vlb' needs weighting 'simple'"
    return None


def _check_loss_options(prediction, weighting, min_snr_gamma, reduction, variance, objective, vlb_weight,
                        decoder) -> None:
    """``training_loss``'s checks, once, so that its body is the algorithm."""
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("reduction", reduction, ("mean", "none"))
    check_choice("variance", variance, VARIANCES)
    check_choice("objective", objective, OBJECTIVES)
    check_choice("decoder", decoder, DECODERS)
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
    if isinstance(vlb_weight, bool) or not isinstance(vlb_weight, (int, float)) or not vlb_weight >= 0:
        raise ValueError(f"vlb_weight must be a number >= 0, got {vlb_weight!r}")
    problem = objective_problem(objective, variance, weighting)
    if problem is not None:
        raise ValueError(problem)


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
    variance: Variance = "fixed_small",
    objective: Literal["simple", "vlb"] = "simple",
    vlb_weight: float = 0.001,
    decoder: Literal["discretized", "continuous"] = "discretized",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Algorithm 1: L_simple = E_{t, x0, eps} || eps - eps_theta(x_t, t) ||^2 (eq. 14).

    ``t`` defaults to uniform over 0..T-1 and ``noise`` to N(0, I), both drawn from
    ``generator``. ``prediction`` picks the regression target (eps, x0 or v). With
    ``weighting="min_snr"`` each example's loss is scaled by the min-SNR-gamma weight (Hang et al.
    2023), expressed for the chosen target so that all three optimise the same x0-space weighting
    min(SNR, gamma). ``reduction="none"`` returns the per-example losses, shape (B,).

    Learned variances (Nichol & Dhariwal 2021). With ``variance="learned_range"`` the model returns
    (B, 2C, ...) and the loss is L_hybrid = L_simple + ``vlb_weight`` * L_vlb (section 3.1), the
    L_vlb term seeing the prediction through a stop-gradient so that it trains the variance only.
    ``objective="vlb"`` is L_vlb alone, training mean and variance (section 3.3; draw t with
    ``ddpm.LossAwareTimestepSampler`` and weight the per-example losses). Per example, L_vlb is
    T * L_t in bits/dim (``vlb_term``), the uniform-t estimate of the whole bound: improved-diffusion's
    scale, so that vlb_weight = 0.001 is the paper's lambda whatever T. The fixed and analytic
    variances train with L_simple (the analytic one is estimated after training, ``ddpm.core.analytic``).
    ``decoder`` is the t = 0 term of L_vlb (``vlb_term``). ``labels`` (B,), for a class-conditional
    model, are passed on as ``model(x_t, t, labels)`` (the null label ``num_classes`` where dropped).
    """
    _check_loss_options(prediction, weighting, min_snr_gamma, reduction, variance, objective, vlb_weight, decoder)
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
    output = model(x_t, t) if labels is None else model(x_t, t, labels)
    pred, var_values = split_output(output, x0.shape, variance)
    dt = _work_dtype(x0)  # float32 at least, even for a bf16 network
    # L_vlb per example as T * L_t in bits/dim: improved-diffusion's mean over dims / ln 2, times T.
    vlb_scale = T / (x0[0].numel() * math.log(2.0))
    vlb_kw = dict(prediction=prediction, variance=variance, clip_denoised=False, decoder=decoder)
    if objective == "vlb":
        per_example = vlb_scale * vlb_term(schedule, output.to(dt), x0.to(dt), x_t.to(dt), t, **vlb_kw)
        return per_example.mean() if reduction == "mean" else per_example
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    else:
        target = v_from_x0_eps(schedule, x0, noise, t).to(x0.dtype)
    per_example = F.mse_loss(pred.to(dt), target.to(dt), reduction="none").flatten(1).mean(1)
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
    if var_values is not None and vlb_weight > 0:
        # Section 3.1: L_hybrid. The stop-gradient on the prediction leaves the mean to L_simple.
        frozen = torch.cat([pred.detach(), var_values], dim=1).to(dt)
        per_example = per_example + vlb_weight * vlb_scale * vlb_term(schedule, frozen, x0.to(dt), x_t.to(dt), t,
                                                                      **vlb_kw)
    return per_example.mean() if reduction == "mean" else per_example


def respaced_schedule(schedule: NoiseSchedule, timesteps: torch.Tensor) -> NoiseSchedule:
    """The chain that visits only ``timesteps`` (ascending, (S,)), improved-diffusion's respacing.

    beta'_i = 1 - abar[a_i] / abar[a_{i-1}] with abar[a_{-1}] = 1, so that q(x_{a_i} | x0) is unchanged
    and index i of the new chain is timestep a_i of the model (Nichol & Dhariwal 2021, section 4).
    """
    a = torch.as_tensor(timesteps).cpu().long()
    T = schedule.num_timesteps
    if a.ndim != 1 or not a.numel() or int(a.min()) < 0 or int(a.max()) >= T or bool((a[1:] <= a[:-1]).any()):
        raise ValueError(f"timesteps must be strictly increasing in 0..{T - 1}, got {a.tolist()}")
    if a.numel() == T:
        return schedule
    ab = schedule.alphas_cumprod.cpu()[a].numpy()
    return NoiseSchedule(1.0 - ab / np.append(1.0, ab[:-1]), name=schedule.name)


# ---------------------------------------------------------------------------------------------
# Reverse process p and the variational bound (section 3.3, eq. 5)
# ---------------------------------------------------------------------------------------------

def p_mean_variance(
    schedule: NoiseSchedule,
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction: Prediction = "eps",
    variance: Variance = "fixed_small",
    clip_denoised: bool = True,
    analytic_variances: torch.Tensor | None = None,
):
    """p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) from a network output (section 3.2).

    ``fixed_small`` is sigma_t^2 = beta~_t (the posterior variance), ``fixed_large`` is
    sigma_t^2 = beta_t (with beta~_1 at t=0 for the log, as in the paper's code). ``learned_range``
    reads an output (B, 2C, ...) whose last C channels v give, per element (Nichol & Dhariwal 2021,
    eq. 15 with frac = (v + 1)/2), log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t (clipped
    at t=0 as above). ``analytic`` takes sigma_t^2 from ``analytic_variances`` (T,), a table for this
    schedule's chain (``AnalyticVariance.variances``). On a respaced chain (``respaced_schedule``)
    beta_t and beta~_t are the chain's. The mean is the posterior mean at the predicted x0, which
    for eps-prediction equals eq. 11 when no clipping is applied. Returns (mean, variance,
    log_variance, x0_pred).
    """
    check_choice("variance", variance, VARIANCES)
    check_choice("prediction", prediction, PREDICTIONS)
    pred, var_values = split_output(output, x_t.shape, variance)
    x0, _ = x0_eps_from_output(schedule, x_t, t, pred, prediction)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean, var, log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    dt = _work_dtype(x_t)
    if variance == "fixed_large":
        var = extract(schedule.fixed_large_variance, t, x_t.shape, dt)
        log_var = torch.log(var)
    elif variance == "learned_range":
        # Eq. 15: interpolate in the log domain between the two fixed choices of the DDPM paper.
        frac = (var_values.to(dt) + 1) / 2
        max_log = extract(torch.log(schedule.betas), t, x_t.shape, dt)
        log_var = frac * max_log + (1 - frac) * log_var
        var = torch.exp(log_var)
    elif variance == "analytic":
        if analytic_variances is None or tuple(analytic_variances.shape) != (schedule.num_timesteps,):
            got = None if analytic_variances is None else tuple(analytic_variances.shape)
            raise ValueError(f"variance='analytic' needs analytic_variances of shape ({schedule.num_timesteps},) for "
                             f"this chain, got {got}: see ddpm.analytic_variance")
        var = extract(analytic_variances, t, x_t.shape, dt)
        log_var = torch.log(var)
    return mean, var, log_var, x0


def vlb_term(
    schedule: NoiseSchedule,
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction: Prediction = "eps",
    variance: Variance = "fixed_large",
    clip_denoised: bool = False,
    decoder: Literal["discretized", "continuous"] = "discretized",
    analytic_variances: torch.Tensor | None = None,
) -> torch.Tensor:
    """One term of the bound (eq. 5) per example, in nats summed over dimensions: shape (B,).

    Where t = 0 it is the decoder -log p(x0 | x_1) (``discretized``: eq. 13, for x0 on the 256
    levels in [-1, 1]; ``continuous``: a Gaussian density, for real-valued data), elsewhere
    KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) between two Gaussians (eqs. 6-7 and
    ``p_mean_variance``, whose options it takes).
    """
    check_choice("decoder", decoder, DECODERS)
    mean, _, log_var, _ = p_mean_variance(schedule, output, x_t, t, prediction=prediction, variance=variance,
                                          clip_denoised=clip_denoised, analytic_variances=analytic_variances)
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).sum(1)
    # The decoder uses the model's standard deviation as its scale.
    if decoder == "discretized":
        nll0 = -discretized_gaussian_log_likelihood(x0.to(mean.dtype), mean, 0.5 * log_var)
    else:
        nll0 = _gaussian_nll(x0.to(mean.dtype), mean, log_var)
    return torch.where(t == 0, nll0.flatten(1).sum(1), kl)


def _gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    # Continuous decoder -log N(x; mean, e^log_var), for real-valued data (toy sets, tests).
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


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
