"""Pictures: exact uint8 mapping, grid geometry and pixels, strips, scatters, schedule plot/table."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.errors import UserError
from ddpm.core.schedules import SCHEDULES, make_beta_schedule
from ddpm.evaluation.viz import (plot_schedules, save_grid, save_scatter, save_trajectory_strip,
                      schedule_table, to_uint8)


def test_to_uint8_exact_mapping_and_round_trip():
    x = torch.tensor([-1.0, 1.0, 0.0, -3.0, 7.0, float("nan")]).view(1, 1, 1, 6)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6, 1)
    assert out.ravel().tolist() == [0, 255, 128, 0, 255, 0]
    # The loaders map u -> u / 127.5 - 1 in float32; to_uint8 must invert that for every u.
    u = torch.arange(256, dtype=torch.uint8)
    back = to_uint8((u.float() / 127.5 - 1).view(1, 1, 16, 16))
    assert np.array_equal(back.ravel(), u.numpy())
    assert to_uint8(np.zeros((3, 4, 5), np.float32)).shape == (4, 5, 3)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_save_grid_size_and_pixels(tmp_path, channels):
    images = torch.rand(5, channels, 8, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_grid(images, tmp_path / "out" / "grid.png", nrow=3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        # 3 columns, 2 rows, 2 px of padding around and between tiles.
        assert im.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)
        pixels = np.asarray(im).reshape(im.size[1], im.size[0], channels)
    tiles = to_uint8(images)
    for i in range(5):
        top, left = 2 + (i // 3) * 10, 2 + (i % 3) * 8
        assert np.array_equal(pixels[top:top + 8, left:left + 6], tiles[i])
    assert (pixels[0] == 0).all() and (pixels[-11:, -8:] == 0).all()  # padding and empty 6th tile
    with pytest.raises(ValueError, match="1, 3 or 4"):
        save_grid(images[:, :1].expand(-1, 2, -1, -1), tmp_path / "two.png")


def test_trajectory_strip_rows_are_samples_columns_decreasing_t(tmp_path):
    # Column k holds the constant value of its timestep; row b adds nothing: check the layout.
    preds = {t: torch.full((2, 1, 4, 4), value) for t, value in ((0, 1.0), (999, -1.0), (500, 0.0))}
    path = save_trajectory_strip(preds, tmp_path / "strip.png", padding=1)
    with Image.open(path) as im:
        pixels = np.asarray(im)
    width = 3 * (4 + 1) + 1
    assert pixels.shape[1] == width
    body = pixels[-(2 * 5 + 1):]  # below the header of t labels
    header = pixels[:-(2 * 5 + 1)]
    assert header.shape[0] > 5 and (header < 128).any()  # some dark label text
    for row in range(2):
        top = 1 + row * 5
        values = [body[top:top + 4, 1 + k * 5:5 + k * 5] for k in range(3)]
        assert [int(v.mean()) for v in values] == [0, 128, 255]  # t = 999, 500, 0
    plain = save_trajectory_strip([torch.zeros(3, 3, 4, 4)] * 2, tmp_path / "plain.png")
    with Image.open(plain) as im:
        assert im.size == (2 * 6 + 2, 3 * 6 + 2) and im.mode == "RGB"


def test_save_scatter_places_points(tmp_path):
    points = torch.tensor([[0.0, 0.0]] * 50 + [[0.9, 0.9]] * 50)
    path = save_scatter(points, tmp_path / "s.png", size=101, lim=1.0)
    with Image.open(path) as im:
        pixels = np.asarray(im).astype(int)
    assert pixels.shape == (101, 101, 3)
    centre, corner = pixels[50, 50], pixels[5, 95]   # y up: (0.9, 0.9) is near the top right
    assert centre[2] > centre[0] + 60 and corner[2] > corner[0] + 60
    assert (pixels[90, 10] == 255).all()               # nothing at (-0.8, -0.8)


def test_schedule_table_agrees_with_make_beta_schedule():
    text = schedule_table(T=200, every=50)
    blocks = text.split("\n\n")
    assert "scaled_linear" in blocks[-1] and "paper's linear" in blocks[-1]
    rows = {}
    for block in blocks[:3]:
        lines = block.splitlines()
        assert lines[1].split() == ["t", *SCHEDULES]
        rows[lines[0].split()[0]] = np.array([[float(v) for v in line.split()] for line in lines[2:]])
    steps = [0, 50, 100, 150, 199]
    for j, name in enumerate(SCHEDULES):
        betas = make_beta_schedule(name, 200)
        abar = np.cumprod(1 - betas)
        assert rows["beta_t"][:, 0].tolist() == steps
        np.testing.assert_allclose(rows["beta_t"][:, j + 1], betas[steps], rtol=1e-5)
        np.testing.assert_allclose(rows["alphas_cumprod"][:, j + 1], abar[steps], rtol=1e-5)
        np.testing.assert_allclose(rows["log-SNR"][:, j + 1], np.log(abar / (1 - abar))[steps],
                                   rtol=1e-5, atol=1e-5)


def test_plot_schedules_writes_png_and_needs_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    path = plot_schedules(tmp_path / "schedules.png", T=100)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 3 * im.size[1] / 2
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"plotting needs matplotlib: pip install 'ddpm\[plot\]'"):
        plot_schedules(tmp_path / "again.png")
