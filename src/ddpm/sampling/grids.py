"""Timestep grids: the S of T model timesteps a sampler visits, descending (DDIM's sub-sequence tau, Song et al. 2021)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.diffusion import check_choice
from ..core.schedules import NoiseSchedule

SPACINGS = ("uniform", "leading", "trailing", "quad", "logsnr")


def _strictly_increasing(a: np.ndarray, T: int) -> np.ndarray:
    # Push repeated indices apart: a_i in [i, T - S + i] keeps room for the others, then bump up.
    S = a.size
    a = np.clip(a, np.arange(S), T - S + np.arange(S))
    for i in range(1, S):
        a[i] = max(a[i], a[i - 1] + 1)
    return a


def timestep_grid(T: int, steps: int, spacing: str = "uniform", *, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """The S = ``steps`` model timesteps a sampler visits, descending: LongTensor (S,) on CPU.

    With a_i the ascending grid, i = 0..S-1:

    - ``uniform``: a_i = floor(i (T-1)/(S-1) + 1/2), evenly spaced from 0 to T-1 inclusive (round
      half up); S = 1 gives [T-1]. Like diffusers' "linspace".
    - ``leading``: a_i = i * (T // S), diffusers' "leading" (steps_offset 0) and the DDIM paper's
      "uniform"; for S > 1 it never visits t = T-1 (the noisiest step).
    - ``trailing``: t_i = round(T - i T/S) - 1 in float64 with numpy's round half to even,
      diffusers' "trailing": starts at T-1, ends at T/S - 1.
    - ``quad``: a_i = floor((i sqrt(0.8 T)/(S-1))^2), the DDIM paper's quadratic skip, with repeats
      pushed up by one so that the S timesteps are distinct.
    - ``logsnr``: uniform in lambda = log(alpha/sigma) (DPM-Solver's advice for discrete-time
      models): the first S of S+1 evenly spaced values from lambda(T-1) to lambda(0), each mapped
      to the timestep of nearest lambda, repeats pushed apart. The dropped endpoint is where the
      final step, which goes to sigma = 0, would start: ending the grid one lambda-step early gives
      clearly better samples for few steps (as diffusers' DPM-Solver grids do). Needs ``schedule``.
    """
    check_choice("spacing", spacing, SPACINGS)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..T={T}, got {steps!r}")
    S = int(steps)
    i = np.arange(S, dtype=np.int64)
    if spacing == "uniform":
        a = (2 * i * (T - 1) + (S - 1)) // (2 * (S - 1)) if S > 1 else np.array([T - 1])
    elif spacing == "leading":
        a = i * (T // S)
    elif spacing == "trailing":
        a = (np.round(T - i * (T / S)).astype(np.int64) - 1)[::-1]
    elif spacing == "quad":
        a = _strictly_increasing(np.floor(np.linspace(0, math.sqrt(0.8 * T), S) ** 2).astype(np.int64), T)
    else:
        if schedule is None or schedule.num_timesteps != T:
            raise ValueError("spacing 'logsnr' needs the noise schedule (schedule=) with T timesteps")
        neg_lam = -0.5 * schedule.log_snr.cpu().numpy()  # increasing in t
        # A zero-terminal-SNR schedule has lambda(T-1) = -inf: span the finite range, start at T-1.
        top = neg_lam[np.isfinite(neg_lam)].max()
        targets = np.linspace(top, neg_lam[0], S + 1)[:S][::-1]  # ascending in t
        right = np.clip(np.searchsorted(neg_lam, targets), 1, T - 1)
        nearer_left = targets - neg_lam[right - 1] < neg_lam[right] - targets
        a = np.where(nearer_left, right - 1, right) if T > 1 else np.zeros(S, np.int64)
        a[-1] = T - 1
        a = _strictly_increasing(a, T)
    return torch.from_numpy(np.array(a[::-1], dtype=np.int64))
