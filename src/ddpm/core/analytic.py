"""Analytic-DPM: the optimal reverse variance of a trained model in closed form (Bao et al. 2022).

A model trained with a fixed variance predicts the mean; Bao et al. (Theorem 1) show that the
variance minimising the bound is then a function of one number per timestep,
Gamma_t = E_{q(x_t)} ||eps_theta(x_t, t)||^2 / d, which a few batches of training data estimate.
In our 0-based notation, with the DDPM choice lambda_t^2 = beta~_t of their theorem:

    sigma*_t^2 = beta~_t + (sqrt((1 - abar_t)/alpha_t) - sqrt(1 - abar_{t-1} - beta~_t))^2 (1 - Gamma_t)
               = beta~_t + c_t^2 V_t,     c_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t)   (eq. 7's x0 coefficient)
                                          V_t = (1 - abar_t)/abar_t (1 - Gamma_t)

The lines agree because both squares equal beta_t^2 / (alpha_t (1 - abar_t)). The second reads as
the posterior variance plus the error of x0_pred carried into the mean: since
x0 = (x_t - sqrt(1 - abar_t) eps)/sqrt(abar_t), V_t is E Var[x0 | x_t] averaged over dimensions.

Clipping (their Theorem 2, and their code): Gamma_t <= 1 (Jensen) and, for data in [a, b]^d,
Var[x0 | x_t] <= ((b - a)/2)^2, so the estimate of V_t is clipped to [0, ((b - a)/2)^2] and
sigma*_t^2 to [beta~_t, beta~_t + c_t^2 ((b - a)/2)^2]. (The bound is not beta_t: Gamma_t = 0 gives
beta_t / alpha_t, and near t = 0 the data bound exceeds beta_t.) We also clip V_t at the data's
variance per dimension (law of total variance: E Var[x0 | x_t] <= Var[x0]), estimated from the same
examples: it holds for unbounded data too (``data_range=None``), where near abar_t = 0 the factor
(1 - abar_t)/abar_t would otherwise blow the Monte Carlo error of Gamma_t up without limit.

Respaced grids. On a subsequence a_0 < ... < a_{S-1} of timesteps the same theorem holds for the
respaced chain (``diffusion.respaced_schedule``: its beta~, c and abar) with Gamma at the visited
timesteps, since q(x_{a_i} | x0) is unchanged. So Gamma is estimated and stored per timestep of the
full schedule, and ``AnalyticVariance.variances(schedule, grid)`` builds the table of any grid.

The decoder step (index 0 of a chain) keeps fixed_small's clipped beta~ (as Bao et al.'s code does
for the discrete decoder): Gamma there is not used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import threads
from .device import autocast_model, model_device
from .diffusion import PREDICTIONS, check_choice, q_sample, respaced_schedule, split_output, x0_eps_from_output
from .schedules import NoiseSchedule

_FORMAT = "ddpm.analytic_variance"


def reverse_variances(chain: NoiseSchedule, gamma: torch.Tensor,
                      data_range: tuple[float, float] | None = (-1.0, 1.0),
                      data_variance: float | None = None) -> torch.Tensor:
    """sigma*_i^2 of Bao et al.'s Theorem 1 (clipped by Theorem 2) for each step i of ``chain``: float64 (S,).

    ``gamma`` (S,) holds Gamma at the model timestep of each chain index (ascending). V is clipped
    to ((b - a)/2)^2 for ``data_range`` (a, b) and to ``data_variance`` (the mean over dimensions of
    Var[x0]) when given. Index 0, the decoder step, is exp(posterior_log_variance_clipped[0])
    whatever gamma[0] is.
    """
    gamma = torch.as_tensor(gamma, dtype=torch.float64).cpu()
    S = chain.num_timesteps
    if tuple(gamma.shape) != (S,):
        raise ValueError(f"gamma must have shape ({S},) for this chain, got {tuple(gamma.shape)}")
    ab = chain.alphas_cumprod.cpu()
    upper = math.inf if data_range is None else ((data_range[1] - data_range[0]) / 2) ** 2
    if data_variance is not None:
        upper = min(upper, float(data_variance))
    # V = E Var[x0 | x_t] per dimension; at abar = 0 (zero terminal SNR) only the data bound is left.
    v = torch.where(ab > 0, (1 - ab) / ab * (1 - gamma), torch.full_like(ab, math.inf))
    v = v.clamp(min=0.0, max=upper)
    out = chain.posterior_variance.cpu() + chain.posterior_mean_coef1.cpu() ** 2 * v
    out[0] = chain.posterior_log_variance_clipped[0].cpu().exp()
    if not torch.isfinite(out[1:]).all():
        raise ValueError("analytic variance is infinite where abar_t = 0 (zero terminal SNR): give a data_range "
                         "or data_variance")
    return out


@dataclass
class AnalyticVariance:
    """Gamma_t = E||eps_theta(x_t, t)||^2 / d per timestep of a schedule, estimated for one model.

    ``gamma`` is float64 (T,), NaN where not estimated; ``data_range`` the bounds (a, b) of the data
    (None: unbounded) and ``data_variance`` its variance per dimension, both used to clip;
    ``num_examples`` how many data points the estimate averaged.
    Pass it to ``ddpm.sample(..., variance="analytic", analytic=...)`` and ``ddpm.nll_bpd``.
    """

    gamma: torch.Tensor
    data_range: tuple[float, float] | None = (-1.0, 1.0)
    data_variance: float | None = None
    num_examples: int = 0

    def __post_init__(self) -> None:
        self.gamma = torch.as_tensor(self.gamma, dtype=torch.float64).detach().cpu()
        if self.gamma.ndim != 1 or self.gamma.numel() < 1:
            raise ValueError(f"gamma must be a 1-D tensor (T,), got shape {tuple(self.gamma.shape)}")
        if bool((self.gamma < 0).any()):
            raise ValueError("gamma is a mean of squares and cannot be negative")
        if self.data_range is not None:
            a, b = (float(v) for v in self.data_range)
            if not a < b:
                raise ValueError(f"data_range must be (low, high) with low < high, got {self.data_range!r}")
            self.data_range = (a, b)
        if self.data_variance is not None:
            self.data_variance = float(self.data_variance)
            if not self.data_variance >= 0:
                raise ValueError(f"data_variance must be >= 0, got {self.data_variance!r}")

    @property
    def num_timesteps(self) -> int:
        return self.gamma.numel()

    def variances(self, schedule: NoiseSchedule, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The reverse variances of the chain visiting ``timesteps`` (ascending; default all): float64 (S,).

        Index i is the step from timestep ``timesteps[i]`` (index 0 the decoder step).
        """
        T = schedule.num_timesteps
        if T != self.num_timesteps:
            raise ValueError(f"analytic variance was estimated for T={self.num_timesteps}, the schedule has T={T}")
        a = torch.arange(T) if timesteps is None else torch.as_tensor(timesteps).cpu().long()
        chain = respaced_schedule(schedule, a)
        g = self.gamma[a]
        missing = a[1:][torch.isnan(g[1:])]
        if missing.numel():
            shown = missing[:8].tolist()
            raise ValueError(f"Gamma was not estimated at timesteps {shown}{' ...' if missing.numel() > 8 else ''}; "
                             "estimate it there (analytic_variance(..., timesteps=...))")
        return reverse_variances(chain, torch.nan_to_num(g, nan=1.0), self.data_range, self.data_variance)

    def save(self, path: str | Path) -> None:
        """A small JSON file: Gamma per timestep (null where not estimated) and the data range."""
        doc = {
            "format": _FORMAT, "version": 1, "num_timesteps": self.num_timesteps, "num_examples": self.num_examples,
            "data_range": None if self.data_range is None else list(self.data_range),
            "data_variance": self.data_variance,
            "gamma": [None if math.isnan(g) else g for g in self.gamma.tolist()],
        }
        Path(path).write_text(json.dumps(doc) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AnalyticVariance":
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{path}: not an analytic variance file (format {_FORMAT!r})")
        gamma = torch.tensor([math.nan if g is None else g for g in doc["gamma"]], dtype=torch.float64)
        rng = doc.get("data_range")
        return cls(gamma, None if rng is None else tuple(rng), doc.get("data_variance"),
                   int(doc.get("num_examples", 0)))


def _random_batches(data, num: int, batch_size: int, generator: torch.Generator | None):
    # A random subset: the first examples of a dataset may be sorted (by class, say).
    idx = torch.randperm(len(data), generator=generator)[:num]
    for chunk in idx.split(batch_size):
        if torch.is_tensor(data):
            yield data[chunk]
        else:
            yield torch.stack([torch.as_tensor(data[int(i)]) for i in chunk])


@torch.no_grad()
def analytic_variance(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    data,
    *,
    num: int = 256,
    batch_size: int = 64,
    timesteps: torch.Tensor | None = None,
    prediction: str = "eps",
    data_range: tuple[float, float] | None = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = False,
    amp: str = "off",
) -> AnalyticVariance:
    """Estimate Gamma_t = E||eps_theta(x_t, t)||^2 / d (Bao et al. 2022, Theorem 1) for ``model``.

    ``data`` is a Tensor (N, ...) or a Dataset of tensors, on the model's scale (images in [-1, 1]);
    ``num`` examples drawn at random (by ``generator``, a CPU generator) are each noised once per
    timestep with fresh noise, so the cost is len(timesteps) * ceil(num / batch_size) model calls.
    ``timesteps`` defaults to all of 0..T-1 (any grid then works; a sampler grid needs Gamma only at
    its own timesteps). The model must return eps, x0 or v (``prediction``) with x's shape.
    ``amp`` runs the network under autocast (``ddpm.core.device.autocast``; its output and the sums
    stay float32). ``progress`` shows one bar over examples x timesteps with its ETA: True always,
    False never, None when stderr is a terminal.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    T = schedule.num_timesteps
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}")
    ts = torch.arange(T) if timesteps is None else torch.as_tensor(timesteps).cpu().long().unique()
    if ts.numel() == 0 or int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ValueError(f"timesteps must be non-empty and lie in 0..{T - 1}")
    if device is None:
        device = model_device(model)
    sched = schedule.to(device)
    sums = torch.zeros(T, dtype=torch.float64)
    seen, x_sum, x_sq = 0, 0.0, 0.0
    items = min(num, len(data))
    # One step per example and timestep: a batch is T model calls, minutes for a large network.
    bar = tqdm(total=items * ts.numel(), unit="x_t", unit_scale=True, dynamic_ncols=True,
               desc=f"analytic variance ({items} examples x {ts.numel()} timesteps)",
               disable=None if progress is None else not progress)
    model = autocast_model(model, device, amp, on_call=threads.ticking(None if bar.disable else bar.update))
    with threads.follow_load(device=device), bar:  # threads follow the others' load
        for x0 in _random_batches(data, num, batch_size, generator):
            x0 = x0.to(device, torch.float32 if not x0.is_floating_point() else x0.dtype)
            B = x0.shape[0]
            for t_value in ts.tolist():
                t = torch.full((B,), t_value, dtype=torch.long, device=device)
                noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(device)
                x_t = q_sample(sched, x0, t, noise)
                output, _ = split_output(model(x_t, t), x_t.shape)
                _, eps = x0_eps_from_output(sched, x_t, t, output, prediction)
                sums[t_value] += float(eps.double().pow(2).flatten(1).mean(1).sum())
            seen += B
            x_sum = x_sum + x0.double().sum(0)
            x_sq = x_sq + x0.double().pow(2).sum(0)
    if seen < 2:
        raise ValueError(f"need at least 2 examples to estimate the analytic variance, got {seen}")
    gamma = torch.full((T,), math.nan, dtype=torch.float64)
    gamma[ts] = sums[ts] / seen
    # Var[x0] per dimension (unbiased), averaged over dimensions: the law-of-total-variance clip.
    data_variance = float(((x_sq - x_sum**2 / seen) / (seen - 1)).mean())
    return AnalyticVariance(gamma, data_range, data_variance, seen)
