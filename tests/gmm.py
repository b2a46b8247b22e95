"""A 2-D Gaussian mixture with its exact optimal noise predictor, and a two-sample statistic.

For data x0 ~ sum_k w_k N(mu_k, s^2 I), the forward marginal (eq. 4) is again a mixture,
q(x_t) = sum_k w_k N(sqrt(abar_t) mu_k, (abar_t s^2 + 1 - abar_t) I), and the minimiser of the
simple loss is eps*(x_t, t) = E[eps | x_t] = -sqrt(1 - abar_t) grad log q(x_t) (Tweedie). Fed to a
sampler this "oracle" must reproduce the mixture, which tests samplers without any training.
"""

from __future__ import annotations

import math

import torch

from ddpm.core.schedules import NoiseSchedule


class GaussianMixture:
    """K equal-weight isotropic components of std ``std`` on a circle of radius ``radius``."""

    def __init__(self, k: int = 8, radius: float = 1.0, std: float = 0.05):
        angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        self.means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (K, 2)
        self.std = std

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n points (n, 2), float32."""
        comp = torch.randint(0, len(self.means), (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.std * noise).float()

    def eps_oracle(self, schedule: NoiseSchedule, time_shift: int = 0):
        """model(x_t (B, 2), t (B,)) -> eps*(x_t, t) (B, 2); ``time_shift`` evaluates it at t + shift (a broken model)."""
        ab_all = schedule.alphas_cumprod  # on the schedule's device: nothing is copied per call
        mu = self.means.to(ab_all.device)  # (K, 2)
        T = schedule.num_timesteps

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            ab = ab_all[(t + time_shift).clamp(0, T - 1)][:, None]  # (B, 1)
            a, var = ab.sqrt(), ab * self.std**2 + (1 - ab)  # component means a mu_k, shared variance
            x = x_t.double()
            # log N(x; a mu_k, var I) up to terms shared by all k (equal weights): a x.mu_k - a^2 |mu_k|^2 / 2.
            logits = (a * (x @ mu.T) - 0.5 * ab * (mu**2).sum(1)[None]) / var  # (B, K)
            resp = torch.softmax(logits, dim=1)
            score = -(x - a * (resp @ mu)) / var  # grad log q(x_t), (B, 2)
            return (-(1 - ab).sqrt() * score).to(x_t.dtype)

        return model


    def residuals(self, x: torch.Tensor) -> torch.Tensor:
        """(x - nearest mean) / std, (n, 2): a zoom on the components' shape and spread."""
        x = x.double()
        nearest = torch.cdist(x, self.means).argmin(1)
        return (x - self.means[nearest]) / self.std

    def distances(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Energy distances between two samples (n, 2): of the points (weights, placement of the
        components) and of their residuals (each component's spread, which a model with the
        wrong time gets wrong first)."""
        return energy_distance(x, y), energy_distance(self.residuals(x), self.residuals(y))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Szekely's energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic), x (n, d), y (m, d)."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
