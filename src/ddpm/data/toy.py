"""2-D toy distributions for the MLP denoiser: gaussian_mixture, two_moons, swiss_roll, checkerboard.

Each set is drawn in its natural coordinates, then shifted and scaled by closed-form constants
(the distribution's exact mean, and sqrt of half the trace of its covariance) so that it has
mean 0 and average per-axis variance 1. Fixed constants, not estimates: ``toy_sample``, the
fixed ``ToySource`` set and ``toy_log_density`` all describe the same distribution.
gaussian_mixture and checkerboard have a closed-form density (``toy_log_density``), which the
evaluation and the sampler tests use as ground truth. ``ToySource`` is the training set of a toy
run (``ddpm.data.sources.open_source("toy:NAME")``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .labels import require_labels

__all__ = ["TOY_SETS", "check_toy", "toy_sample", "toy_log_density", "ToySource"]

TOY_SETS = ("gaussian_mixture", "two_moons", "swiss_roll", "checkerboard")
_GM_RADIUS, _GM_STD, _GM_K = 2.0, 0.1, 8      # 8 sharp components on a circle
_MOONS_NOISE, _ROLL_NOISE = 0.08, 0.3
_TOY_CENTER = {
    "gaussian_mixture": (0.0, 0.0),
    "two_moons": (0.5, 0.25),                    # y: (2/pi + (0.5 - 2/pi)) / 2 over both moons
    "swiss_roll": (2.0, 2.0 / (3 * np.pi)),      # E[t cos t], E[t sin t], t ~ U(1.5 pi, 4.5 pi)
    "checkerboard": (0.0, 0.0),
}
_TOY_SCALE = {
    "gaussian_mixture": np.sqrt(_GM_RADIUS**2 / 2 + _GM_STD**2),
    "two_moons": np.sqrt((0.75 + 0.5625 - 1 / np.pi) / 2 + _MOONS_NOISE**2),
    "swiss_roll": np.sqrt((9.75 * np.pi**2 - 4 - (2 / (3 * np.pi)) ** 2) / 2 + _ROLL_NOISE**2),
    "checkerboard": np.sqrt(4 / 3),              # each axis is uniform on [-2, 2]
}


def check_toy(name: str) -> None:
    """Raise UserError listing the valid names unless ``name`` is a toy set."""
    if name not in TOY_SETS:
        raise UserError(f"unknown toy set {name!r}; choose one of {', '.join(TOY_SETS)}")


def _gm_means() -> torch.Tensor:
    angles = torch.arange(_GM_K, dtype=torch.float64) * (2 * np.pi / _GM_K)
    return _GM_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)


def toy_sample(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` fresh draws (n, 2) float32 from toy set ``name``, standardized as the data set is."""
    check_toy(name)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if name == "gaussian_mixture":
        k = torch.randint(_GM_K, (n,), generator=generator)
        x = _gm_means()[k] + _GM_STD * randn(n, 2)
    elif name == "two_moons":
        theta, inner = np.pi * rand(n), rand(n) < 0.5
        outer_pts = torch.stack([theta.cos(), theta.sin()], 1)
        inner_pts = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], 1)
        x = torch.where(inner[:, None], inner_pts, outer_pts) + _MOONS_NOISE * randn(n, 2)
    elif name == "swiss_roll":
        t = 1.5 * np.pi * (1 + 2 * rand(n))
        x = torch.stack([t * t.cos(), t * t.sin()], 1) + _ROLL_NOISE * randn(n, 2)
    else:  # checkerboard: uniform on the 8 cells (i, j) of a 4 x 4 board on [-2, 2]^2 with i + j even
        k = torch.randint(8, (n,), generator=generator)
        row = k // 2
        col = 2 * (k % 2) + row % 2
        x = torch.stack([col, row], 1).to(torch.float64) + rand(n, 2) - 2
    x = (x - torch.tensor(_TOY_CENTER[name], dtype=torch.float64)) / _TOY_SCALE[name]
    return x.to(torch.float32)


def toy_log_density(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log density (n,) float64 at standardized points x (n, 2), for the sets that have one.

    gaussian_mixture: log (1/8) sum_k N(x; mu_k, s^2 I); checkerboard: log(1/6) on the black cells
    (area 8 * (1/s)^2 = 6 after scaling by 1/s, s^2 = 4/3), -inf elsewhere.
    """
    check_toy(name)
    x = torch.as_tensor(x, dtype=torch.float64)
    assert x.ndim == 2 and x.shape[1] == 2, f"expected points (n, 2), got {tuple(x.shape)}"
    scale = _TOY_SCALE[name]
    if name == "gaussian_mixture":
        means, std = _gm_means().to(x.device) / scale, _GM_STD / scale
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)                      # (n, K)
        log_comp = -sq / (2 * std**2) - np.log(2 * np.pi * std**2)
        return torch.logsumexp(log_comp, dim=1) - np.log(_GM_K)
    if name == "checkerboard":
        raw = x * scale + 2                      # board coordinates in [0, 4)^2
        cell = raw.floor()
        inside = ((raw >= 0) & (raw < 4)).all(1) & (cell.sum(1) % 2 == 0)
        out = torch.full((x.shape[0],), -np.inf, dtype=torch.float64, device=x.device)
        return out.masked_fill(inside, float(np.log(scale**2 / 8)))
    raise UserError(f"toy set {name!r} has no closed-form density; known for gaussian_mixture, "
                    "checkerboard")


class ToySource(Dataset):
    """A fixed set of 2-D points (N, 2) drawn once from a fixed seed; items have shape (2,)."""

    kind = "toy"
    shape = (2,)
    SIZE = 100_000
    SEED = 20200619  # the DDPM paper's arXiv date, any fixed value would do

    def __init__(self, toy_name: str):
        generator = torch.Generator().manual_seed(self.SEED)
        self.points = toy_sample(toy_name, self.SIZE, generator)
        self.toy_name = toy_name
        self.name = f"toy:{toy_name}"
        self.labels = self.class_names = None  # unlabelled, as every source without classes

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.points[index]

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return self.points[torch.as_tensor(indices, dtype=torch.long)]

    def get_batch_labels(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """As every source's; a toy set has no labels, so this raises the one-line UserError."""

        require_labels(self)

    def __repr__(self) -> str:
        return f"ToySource({self.name!r}, n={len(self)})"
