"""Noise schedules: the seed's ``make_beta_schedule`` and every term derived from the betas.

Notation (Ho et al. 2020, section 2)::

    beta_t          variance of the forward step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    alpha_t         1 - beta_t
    abar_t          prod_{s<=t} alpha_s          (``alphas_cumprod``)
    q(x_t | x0)     N(sqrt(abar_t) x0, (1 - abar_t) I)                      (eq. 4)
    beta~_t         (1 - abar_{t-1}) / (1 - abar_t) beta_t                   (eq. 7, ``posterior_variance``)
    SNR(t)          abar_t / (1 - abar_t)

Timesteps are 0-based in code: index ``t`` in 0..T-1 is the paper's step t+1, so index 0 is the
first noising step and ``alphas_cumprod_prev[0] = 1`` stands for abar_0 of the clean data.

A name collision to beware: the seed's ``linear`` is linspace(sqrt(1e-4), sqrt(0.02))**2 (what
diffusers calls ``scaled_linear``), while the DDPM paper's linear schedule, betas evenly spaced
from 1e-4 to 0.02, is the seed's ``sqrt_linear``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """The seed's beta schedules, bit for bit: a float64 numpy array of shape (n_timestep,).

    The arithmetic follows the seed line by line in torch float64 (not numpy) so that the result
    is exactly equal, not merely close: numpy's and torch's ``linspace`` round differently.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} unknown; choose one of {', '.join(SCHEDULES)}")
    if isinstance(n_timestep, bool) or not isinstance(n_timestep, (int, np.integer)) or n_timestep < 2:
        raise ValueError(f"n_timestep must be an integer >= 2, got {n_timestep!r}")
    n_timestep = int(n_timestep)
    if schedule == "linear":
        # "linear" in the seed is linear in sqrt(beta).
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        # Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), normalised by abar(0).
        timesteps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = timesteps / (1 + cosine_s) * math.pi / 2
        alphas = torch.cos(alphas).pow(2)
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        betas = betas.clamp(min=0, max=0.999)
    elif schedule == "sqrt_linear":
        # The DDPM paper's "linear" schedule: beta_1 = 1e-4 ... beta_T = 0.02 (section 4).
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    else:  # "sqrt"
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    return betas.numpy()


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_T = 0 exactly.

    sqrt(abar_0) is kept and sqrt(abar_T) becomes 0, so the last beta is 1 and x_T carries no
    signal. An eps-predicting model cannot recover x0 at that step (1/sqrt(abar_T) is infinite):
    use ``prediction="v"`` with it.
    """
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    if not first > last:
        # T = 1 or beta_0 = 1: there is no interval of SNR to stretch (the scale would be 0/0).
        raise ValueError(
            f"cannot rescale to zero terminal SNR: need abar_0 > abar_T, got {first**2!r} and {last**2!r}"
        )
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    out = 1.0 - alphas
    out[0] = betas[0]  # abar_0 is kept by construction; keep it bit for bit despite rounding
    return out


class NoiseSchedule:
    """Every term derived from a beta schedule, in float64 (Ho et al. 2020, eqs. 4, 6, 7).

    Build it from a seed name (``NoiseSchedule.from_name("sqrt_linear")``) or from explicit betas
    (``NoiseSchedule(betas)``). Attributes are 1-D float64 torch tensors of length T on
    ``self.device``; call ``.to(device)`` once before a sampling loop so that gathers happen on
    the device (``ddpm.core.diffusion.extract``).
    """

    # Names of the derived tensors, all moved together by ``to``.
    _TERMS = (
        "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "fixed_large_variance",
        "posterior_mean_coef1", "posterior_mean_coef2", "log_snr",
    )

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray | torch.Tensor,
        *,
        num_timesteps: int | None = None,
        rescale_to_zero_terminal_snr: bool = False,
        name: str | None = None,
    ):
        if isinstance(betas, torch.Tensor):
            betas = betas.detach().cpu().numpy()
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {tuple(betas.shape)}")
        if num_timesteps is not None and betas.size != num_timesteps:
            raise ValueError(f"betas has length {betas.size}, expected num_timesteps={num_timesteps}")
        # NaN compares False with everything, so test for it explicitly; a beta so small that
        # 1 - beta rounds to 1 would make 1 - abar_0 = 0 and the t=0 terms 0/0.
        bad = np.flatnonzero(~np.isfinite(betas) | (betas <= 0) | (betas > 1) | (1.0 - betas == 1.0))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"betas must lie in (0, 1] with 1 - beta < 1 in float64; betas[{i}] = {float(betas[i])!r}"
            )
        if rescale_to_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.name = name
        self.rescaled = bool(rescale_to_zero_terminal_snr)
        self.num_timesteps = int(betas.size)
        self.device = torch.device("cpu")

        alphas = 1.0 - betas
        ab = np.cumprod(alphas)
        ab_prev = np.append(1.0, ab[:-1])
        ab_next = np.append(ab[1:], 0.0)
        with np.errstate(divide="ignore"):
            # Eq. 7: beta~_t. At t=0 it is 0 (x0 is known exactly given x_1 and x0).
            post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
            terms = {
                "betas": betas,
                "alphas": alphas,
                "alphas_cumprod": ab,
                "alphas_cumprod_prev": ab_prev,
                "alphas_cumprod_next": ab_next,
                "sqrt_alphas_cumprod": np.sqrt(ab),
                "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
                "log_one_minus_alphas_cumprod": np.log(1.0 - ab),
                "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ab),
                "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ab - 1.0),
                "posterior_variance": post_var,
                # log(0) at t=0 is replaced by the next value, as in the paper's code.
                "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:]))
                if self.num_timesteps > 1 else np.log(np.maximum(post_var, 1e-20)),
                # sigma_t^2 = beta_t ("fixed_large", section 3.2); index 0 takes beta~ of index 1, as
                # the paper's code does for the decoder step. With T=1 there is no beta~ to take.
                "fixed_large_variance": np.append(post_var[1], betas[1:]) if self.num_timesteps > 1 else betas,
                # Eq. 7: mu~_t = coef1 * x0 + coef2 * x_t.
                "posterior_mean_coef1": betas * np.sqrt(ab_prev) / (1.0 - ab),
                "posterior_mean_coef2": (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
                "log_snr": np.log(ab) - np.log(1.0 - ab),
            }
        for key, value in terms.items():
            setattr(self, key, torch.from_numpy(np.ascontiguousarray(value)))

    @classmethod
    def from_name(
        cls,
        name: str,
        n_timestep: int = 1000,
        *,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        rescale_to_zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        betas = make_beta_schedule(name, n_timestep, linear_start, linear_end, cosine_s)
        return cls(betas, rescale_to_zero_terminal_snr=rescale_to_zero_terminal_snr, name=name)

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        label = self.name or "custom"
        return f"NoiseSchedule({label!r}, T={self.num_timesteps}, device={self.device})"

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """A copy whose tensors live on ``device`` (float64 kept; cast at the point of use)."""
        device = torch.device(device)
        if device == self.device:
            return self
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for key in self._TERMS:
            setattr(new, key, getattr(self, key).to(device))
        new.device = device
        return new

    def snr(self) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), float64 of shape (T,)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)
