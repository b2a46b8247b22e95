"""Negative log-likelihood bound in bits/dim (Ho et al. 2020, eq. 5 and section 3.3).

The variational bound on -log p(x0), term by term (paper's 1-based names, our 0-based t)::

    L      = L_T + sum_{t=1}^{T-1} L_t + L_0                                        (eq. 5)
    L_T    = KL(q(x_T | x0) || N(0, I))                                  prior term
    L_t    = E_q KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)),  t = 1..T-1  (paper's L_{t-1}, t = 2..T)
    L_0    = E_q -log p(x0 | x_1)  with the discretised Gaussian decoder     (eq. 13)

Here "timestep t" is the index of the model call: at t >= 1 it is a KL between two Gaussians, at
t = 0 it is the decoder. Everything is summed over the D data dimensions and reported in
bits/dim = nats / (D ln 2). The expectation over x_t ~ q(x_t | x0) is estimated with one draw of
eps per (example, timestep), which is what the paper's code does.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from . import threads
from .device import autocast_model, model_device
from .diffusion import DECODERS, VARIANCES, check_choice, normal_kl, q_mean_variance, q_sample, vlb_term
from .schedules import NoiseSchedule

Decoder = Literal["discretized", "continuous"]

def prior_kl(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) summed over dimensions, nats, shape (B,)."""
    T = schedule.num_timesteps
    t = torch.full((x0.shape[0],), T - 1, device=x0.device, dtype=torch.long)
    mean, _, log_var = q_mean_variance(schedule, x0, t)
    zeros = torch.zeros_like(mean)
    return normal_kl(mean, log_var, zeros, zeros).flatten(1).sum(1)


def vlb_terms(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    prediction: str = "eps",
    variance: str = "fixed_large",
    clip_denoised: bool = False,
    timesteps: torch.Tensor | None = None,
    decoder: Decoder = "discretized",
    generator: torch.Generator | None = None,
    analytic=None,
) -> dict:
    """The terms of eq. 5 for a batch x0 (B, ...), in nats summed over dimensions.

    ``timesteps``: long (K,) shared by the batch or (B, K) per example; default all of 0..T-1.
    Returns ``prior`` (B,), ``terms`` (B, K) with L_t for each requested t (the decoder L_0 where
    t = 0, a KL otherwise) and ``timesteps`` (B, K). ``decoder="discretized"`` is the paper's
    8-bit decoder and needs x0 on the 256 levels in [-1, 1]; ``"continuous"`` is a Gaussian
    density, for real-valued data. ``variance`` is the model's sigma_t^2 (``p_mean_variance``):
    ``learned_range`` for a model returning 2C channels, ``analytic`` with ``analytic`` an
    ``AnalyticVariance`` estimated for the model (``ddpm.analytic_variance``).
    """
    check_choice("decoder", decoder, DECODERS)
    check_choice("variance", variance, VARIANCES)
    table = None
    if variance == "analytic":
        if analytic is None:
            raise ValueError("variance='analytic' needs analytic=ddpm.analytic_variance(model, schedule, data)")
        table = analytic.variances(schedule).to(x0.device)
    B, T = x0.shape[0], schedule.num_timesteps
    if timesteps is None:
        timesteps = torch.arange(T, device=x0.device)
    timesteps = timesteps.to(x0.device).long()
    if timesteps.ndim == 1:
        timesteps = timesteps.expand(B, -1)
    if timesteps.ndim != 2 or timesteps.shape[0] != B:
        raise ValueError(f"timesteps must have shape (K,) or (B, K) with B={B}, got {tuple(timesteps.shape)}")
    if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() >= T):
        raise ValueError(f"timesteps must lie in 0..{T - 1}")
    terms = []
    for k in range(timesteps.shape[1]):
        t = timesteps[:, k].contiguous()
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = q_sample(schedule, x0, t, noise)
        # L_t: a KL between the true posterior (eqs. 6-7) and the model's Gaussian, the decoder at t = 0.
        terms.append(vlb_term(schedule, model(x_t, t), x0, x_t, t, prediction=prediction, variance=variance,
                              clip_denoised=clip_denoised, decoder=decoder, analytic_variances=table))
    out_terms = torch.stack(terms, 1) if terms else x0.new_zeros(B, 0)
    return {"prior": prior_kl(schedule, x0), "terms": out_terms, "timesteps": timesteps}


def stratified_timesteps(T: int, K: int, batch: int, *, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniform draw per stratum: {1..T-1} cut into K contiguous strata of near-equal size.

    Returns (timesteps (batch, K), stratum sizes (K,)). sum_k size_k * L_{t_k} is an unbiased
    estimate of sum_{t=1}^{T-1} L_t; with equal sizes it is (T-1) * mean_k L_{t_k}.
    """
    if not 1 <= K <= T - 1:
        raise ValueError(f"number of stratified timesteps must be in 1..{T - 1}, got {K}")
    edges = torch.from_numpy(np.linspace(1, T, K + 1).round().astype(np.int64)).to(device)
    sizes = edges[1:] - edges[:-1]
    u = torch.rand(batch, K, generator=generator, device=device, dtype=torch.float64)
    t = edges[:-1] + (u * sizes).floor().long()
    return t, sizes


def _as_batches(data, batch_size: int, limit: int | None):
    n = len(data) if limit is None else min(limit, len(data))
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if torch.is_tensor(data):
            yield data[start:stop]
        else:
            yield torch.stack([torch.as_tensor(data[i]) for i in range(start, stop)])


@torch.no_grad()
def nll_bpd(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    data,
    *,
    num_timesteps: int | None = None,
    batch_size: int = 64,
    num: int | None = None,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    variance: str = "fixed_large",
    clip_denoised: bool = False,
    decoder: Decoder = "discretized",
    device: str | torch.device | None = None,
    progress: bool | None = False,
    analytic=None,
    amp: str = "off",
) -> dict:
    """The bound of eq. 5 in bits/dim over ``data`` (a Tensor (N, ...) or a Dataset of (C, H, W)).

    ``num_timesteps=None`` evaluates every t in 0..T-1 (T model calls per example). An integer K
    evaluates the decoder (t = 0) exactly and estimates the T-1 KL terms from K stratified draws
    (``stratified_timesteps``), unbiased, for about K/T of the cost. ``stderr`` is the standard
    error of the mean bits/dim over examples; it includes the Monte Carlo noise of both estimates.
    Returns bpd, stderr, prior_bpd, decoder_bpd, kl_bpd, per-example ``bpd_per_example``, and for
    the full evaluation ``terms_bpd`` (T,), the mean L_t per timestep. ``variance`` and ``analytic``
    as in ``vlb_terms``. ``amp`` runs the network under autocast (``ddpm.core.device.autocast``; its
    output and every term stay float32). ``progress`` shows one bar over items x timesteps with its
    ETA: True always, False never, None when stderr is a terminal.
    """
    T = schedule.num_timesteps
    if device is None:  # the model's device when it has parameters, else the CPU
        device = model_device(model)
    sched = schedule.to(device)
    totals, priors, decoders, kls, per_t = [], [], [], [], []
    items = len(data) if num is None else min(num, len(data))
    per_item = T if num_timesteps is None else num_timesteps + 1  # model calls per item: the decoder and K KLs
    # One step per item and timestep, so the ETA moves within a batch (a batch is T model calls).
    bar = tqdm(total=items * per_item, unit="x_t", unit_scale=True, dynamic_ncols=True,
               desc=f"nll ({items} items x {per_item} timesteps)", disable=None if progress is None else not progress)
    model = autocast_model(model, device, amp, on_call=threads.ticking(None if bar.disable else bar.update))
    D = None
    with threads.follow_load(device=device), bar:  # threads follow the others' load
        for x0 in _as_batches(data, batch_size, num):
            x0 = x0.to(device)
            D = x0[0].numel()
            if num_timesteps is None:
                out = vlb_terms(model, sched, x0, prediction=prediction, variance=variance, clip_denoised=clip_denoised,
                                decoder=decoder, generator=generator, analytic=analytic)
                decoder_nats, kl_nats = out["terms"][:, 0], out["terms"][:, 1:].sum(1)
                per_t.append(out["terms"].double().sum(0))
            else:
                t_kl, sizes = stratified_timesteps(T, num_timesteps, x0.shape[0], generator=generator, device=device)
                t_all = torch.cat([torch.zeros_like(t_kl[:, :1]), t_kl], 1)
                out = vlb_terms(model, sched, x0, prediction=prediction, variance=variance, clip_denoised=clip_denoised,
                                timesteps=t_all, decoder=decoder, generator=generator, analytic=analytic)
                decoder_nats = out["terms"][:, 0]
                kl_nats = (out["terms"][:, 1:].double() * sizes.double()).sum(1)
            prior = out["prior"].double()
            priors.append(prior)
            decoders.append(decoder_nats.double())
            kls.append(kl_nats.double())
            totals.append(prior + decoder_nats.double() + kl_nats.double())
    if D is None:
        raise ValueError("no data to evaluate")
    to_bpd = 1.0 / (D * math.log(2.0))
    bpd = torch.cat(totals).cpu() * to_bpd
    n = bpd.numel()
    result = {
        "bpd": float(bpd.mean()),
        "stderr": float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "prior_bpd": float(torch.cat(priors).mean() * to_bpd),
        "decoder_bpd": float(torch.cat(decoders).mean() * to_bpd),
        "kl_bpd": float(torch.cat(kls).mean() * to_bpd),
        "num_examples": n,
        "dims": D,
        "num_timesteps": T,
        "estimate": "full" if num_timesteps is None else f"stratified-{num_timesteps}",
        "bpd_per_example": bpd.numpy(),
    }
    if per_t:
        result["terms_bpd"] = (torch.stack(per_t).sum(0).cpu() / n * to_bpd).numpy()
    return result
