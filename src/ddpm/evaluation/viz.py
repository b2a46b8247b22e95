"""Pictures: sample grids, 2-D scatter plots, denoising strips (Figure 6) and the schedule plot.

Grids, scatters and strips are drawn with Pillow alone; only ``plot_schedules`` needs
matplotlib (``pip install 'ddpm[plot]'``), imported when called. Images are encoded in memory and
written with ``ddpm.io.files.atomic_write``: a viewer never reads half a PNG, and a symbolic link
planted where a preview goes is replaced, not written through.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..core.schedules import SCHEDULES, NoiseSchedule
from ..errors import UserError
from ..io.files import atomic_write

__all__ = ["to_uint8", "save_grid", "make_grid", "save_scatter", "save_trajectory_strip",
           "plot_schedules", "schedule_table"]

# The seed's names differ from the paper's and diffusers': say so wherever schedules are shown.
SCHEDULE_NAME_NOTE = ("seed 'linear' = diffusers 'scaled_linear' (linear in sqrt(beta)); "
                      "seed 'sqrt_linear' = the DDPM paper's linear schedule (1e-4 to 0.02)")


def _as_numpy(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().to("cpu", torch.float32).numpy()
    return np.asarray(images, dtype=np.float32)


def to_uint8(images) -> np.ndarray:
    """(B, C, H, W) or (C, H, W) values in [-1, 1] -> uint8 (B, H, W, C) (or (H, W, C)).

    The mapping is floor((x + 1) * 127.5 + 0.5) clipped to 0..255: -1 -> 0, 1 -> 255, and it
    inverts the data loaders' u / 127.5 - 1 exactly. NaN maps to 0.
    """
    x = _as_numpy(images)
    if x.ndim not in (3, 4):
        raise ValueError(f"images must be (B, C, H, W) or (C, H, W), got shape {x.shape}")
    u = np.floor((np.nan_to_num(x, nan=-1.0) + 1.0) * 127.5 + 0.5)
    u = np.clip(u, 0, 255).astype(np.uint8)
    return np.moveaxis(u, -3, -1)


def make_grid(images, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one uint8 (H', W', C) array.

    ``nrow`` images per row (default ceil(sqrt(B))), ``padding`` pixels of ``pad_value`` around
    and between tiles (torchvision's layout): H' = rows * (H + padding) + padding.
    """
    tiles = to_uint8(images)
    if tiles.ndim != 4 or tiles.shape[0] == 0:
        raise ValueError(f"need a non-empty batch (B, C, H, W), got shape {tuple(np.shape(images))}")
    b, h, w, c = tiles.shape
    if c not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 (RGBA) channels, got {c}")
    ncol = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / ncol)
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c),
                   pad_value, dtype=np.uint8)
    for i in range(b):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[top:top + h, left:left + w] = tiles[i]
    return grid


def _write_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Encode ``image`` in the format its suffix names and write it atomically (see the docstring)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {path.suffix!r} (use .png)")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, buffer.getvalue())


def _save_array(array: np.ndarray, path: str | os.PathLike) -> Path:
    return _write_image(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array), path)


def save_grid(images, path: str | os.PathLike, nrow: int | None = None, padding: int = 2) -> Path:
    """Save (B, C, H, W) images in [-1, 1] as one grid image (PNG by suffix); grey for C == 1,
    RGBA for C == 4."""
    return _save_array(make_grid(images, nrow=nrow, padding=padding), path)


def save_scatter(points, path: str | os.PathLike, *, reference=None, size: int = 512,
                 lim: float | None = None) -> Path:
    """Draw 2-D points (N, 2) as a PNG scatter plot; optional ``reference`` points (M, 2) behind.

    The view is the square [-lim, lim]^2, by default just wider than the 99.9th percentile of
    |coordinate| over both sets. Light grid lines mark integer coordinates (data are standardized
    to about unit scale). Dots are blended so that dense regions read darker.
    """

    pts = _as_numpy(points).reshape(-1, 2)
    ref = None if reference is None else _as_numpy(reference).reshape(-1, 2)
    if lim is None:
        both = pts if ref is None else np.concatenate([pts, ref])
        finite = np.abs(both[np.isfinite(both).all(1)])
        lim = 1.05 * float(np.quantile(finite, 0.999)) if finite.size else 1.0
        lim = max(lim, 1e-6)
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    to_px = (size - 1) / (2 * lim)
    for k in range(-math.floor(lim), math.floor(lim) + 1):
        pos = (k + lim) * to_px
        color = (170, 170, 170) if k == 0 else (225, 225, 225)
        draw.line([(pos, 0), (pos, size)], fill=color)
        draw.line([(0, size - 1 - pos), (size, size - 1 - pos)], fill=color)
    for data, color in ((ref, (255, 140, 0)), (pts, (20, 60, 160))):
        if data is None or not len(data):
            continue
        # Accumulate hits per pixel, then blend: alpha grows with the count, saturating at ~20.
        px = np.floor((data + lim) * to_px).astype(np.int64)
        ok = np.isfinite(data).all(1) & (px >= 0).all(1) & (px < size).all(1)
        counts = np.zeros((size, size))
        np.add.at(counts, (size - 1 - px[ok, 1], px[ok, 0]), 1.0)
        alpha = np.clip(np.sqrt(counts / 20.0) + (counts > 0) * 0.35, 0, 1)[..., None]
        rgb = np.asarray(canvas, dtype=np.float64)
        rgb = rgb * (1 - alpha) + np.asarray(color, dtype=np.float64) * alpha
        canvas = Image.fromarray(rgb.round().astype(np.uint8))
    return _write_image(canvas, path)


def save_trajectory_strip(x0_preds, path: str | os.PathLike, *, timesteps: Sequence[int] | None = None,
                          padding: int = 2) -> Path:
    """Predicted x0 along the reverse process: rows = samples, columns = timesteps (Figure 6).

    ``x0_preds`` is a sequence of K batches (B, C, H, W), an array (K, B, C, H, W), or a mapping
    {t: (B, C, H, W)}; a mapping is ordered by decreasing t (noise on the left, data on the right)
    and its keys label the columns. ``timesteps`` labels the columns of a sequence.
    """
    if isinstance(x0_preds, Mapping):
        order = sorted(x0_preds, key=int, reverse=True)
        timesteps = [int(t) for t in order] if timesteps is None else timesteps
        x0_preds = [x0_preds[t] for t in order]
    stack = np.stack([_as_numpy(x) for x in x0_preds])             # (K, B, C, H, W)
    if stack.ndim != 5:
        raise ValueError(f"expected K batches of (B, C, H, W), got shape {stack.shape}")
    k, b = stack.shape[:2]
    if timesteps is not None and len(timesteps) != k:
        raise ValueError(f"{len(timesteps)} timestep labels for {k} columns")
    # Row b holds sample b at every t: order the tiles sample-major.
    grid = make_grid(stack.transpose(1, 0, 2, 3, 4).reshape(k * b, *stack.shape[2:]),
                     nrow=k, padding=padding, pad_value=255)
    if timesteps is not None:
        grid = _label_columns(grid, [str(int(t)) for t in timesteps], stack.shape[-1], padding)
    return _save_array(grid, path)


def _label_columns(grid: np.ndarray, labels: list[str], tile: int, padding: int) -> np.ndarray:
    """Add a white header strip with one centred label per column of tiles."""

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), text, font=font) for text in labels]
    top = min(b[1] for b in boxes)
    header = Image.new("L", (grid.shape[1], max(b[3] for b in boxes) - top + 4), 255)
    draw = ImageDraw.Draw(header)
    for i, (text, box) in enumerate(zip(labels, boxes)):
        centre = padding + i * (tile + padding) + tile / 2
        draw.text((centre - (box[2] - box[0]) / 2 - box[0], 2 - top), text, fill=0, font=font)
    head = np.asarray(header, dtype=np.uint8)[..., None].repeat(grid.shape[2], axis=2)
    return np.concatenate([head, grid], axis=0)


def _schedule_curves(T: int) -> dict[str, dict[str, np.ndarray]]:
    curves = {}
    for name in SCHEDULES:
        s = NoiseSchedule.from_name(name, T)
        curves[name] = {"beta": s.betas.numpy(), "abar": s.alphas_cumprod.numpy(),
                        "log_snr": s.log_snr.numpy()}
    return curves


def plot_schedules(path: str | os.PathLike, T: int = 1000) -> Path:
    """Draw beta_t, abar_t and log-SNR(t) of the four seed schedules side by side (PNG)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'ddpm[plot]'") from None
    curves = _schedule_curves(T)
    t = np.arange(T)
    # Figure/canvas objects directly (not pyplot): no global state, no GUI backend.
    fig = Figure(figsize=(13, 4.3), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (("beta", r"$\beta_t$ (log scale)", "log"),
              ("abar", r"$\bar\alpha_t$ = product of $(1-\beta_s)$ for $s \leq t$", "linear"),
              ("log_snr", r"log-SNR $= \log \bar\alpha_t / (1-\bar\alpha_t)$", "linear"))
    styles = {"linear": "-", "cosine": "--", "sqrt_linear": "-", "sqrt": ":"}
    for ax, (key, title, yscale) in zip(axes, panels):
        for name in SCHEDULES:
            label = {"linear": "linear (diffusers: scaled_linear)",
                     "sqrt_linear": "sqrt_linear (DDPM paper's linear)"}.get(name, name)
            ax.plot(t, curves[name][key], styles[name], lw=2, label=label)
        ax.set_yscale(yscale)
        ax.set_title(title)
        ax.set_xlabel(f"t (0-based step, T = {T})")
        ax.set_xlim(0, T - 1)
        ax.grid(True, alpha=0.3)
    # The seed's "sqrt" schedule falls to about -100; cut the axis so the other three stay readable.
    lowest = min(c["log_snr"].min() for c in curves.values())
    if lowest < -25.0:
        axes[2].set_ylim(-25.0, None)
        axes[2].text(0.97, 0.04, f"axis cut at -25; lowest value {lowest:.0f}", ha="right",
                     transform=axes[2].transAxes, fontsize=8, color="0.3")
    axes[0].legend(loc="lower right", fontsize=9)
    fig.suptitle(f"The seed's four beta schedules (make_beta_schedule, T = {T})")
    fig.text(0.5, -0.02, "Names: " + SCHEDULE_NAME_NOTE, ha="center", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def schedule_table(T: int = 1000, every: int = 100) -> str:
    """A printable table of beta_t, abar_t and log-SNR of the four seed schedules.

    Rows are t = 0, every, 2 * every, ... and always the last step T - 1 (0-based).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    curves = _schedule_curves(T)
    steps = list(range(0, T, every))
    if steps[-1] != T - 1:
        steps.append(T - 1)
    head = f"{'t':>6}" + "".join(f"{name:>14}" for name in SCHEDULES)
    blocks = []
    for key, title in (("beta", "beta_t"), ("abar", "alphas_cumprod (abar_t)"),
                       ("log_snr", "log-SNR = log(abar_t / (1 - abar_t))")):
        lines = [title, head]
        for i in steps:
            lines.append(f"{i:>6}" + "".join(f"{curves[n][key][i]:>14.6g}" for n in SCHEDULES))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\nNames: " + SCHEDULE_NAME_NOTE
