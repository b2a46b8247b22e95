"""Images that are too large, cut short or not images at all (issue 23, item 2).

Every image ddpm opens (``ddpm inpaint``/``interpolate`` inputs, ``folder:`` and ``hf:`` data, FID
image folders) goes through ``ddpm.data.images.read_image`` or ``check_image_file``: one line naming
the file, exit 2, never a traceback; a ``folder:`` source checks every file before training.
The crafted files are made here: a decompression bomb is a large all-black 1-bit PNG (a few kB on
disk, 14000 x 14000 pixels), a truncated PNG a good one cut in half, a text file named .png.
Against the code before this fix the bomb was a traceback everywhere, and a bad file of a folder
stopped training only when the loader reached it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ddpm.cli.main import main
from ddpm.data.images import check_image_file, read_image
from ddpm.data.sources import open_source
from ddpm.errors import UserError
from ddpm.evaluation.fid import iter_batches, list_images
from ddpm.training.loop import train


def bomb(path, side=14000):
    """A 1-bit PNG of side x side pixels: about 24 kB on disk, 196 M pixels (PIL refuses past 179 M)."""
    Image.new("1", (side, side)).save(path)
    return path


def digit(path, value=128):
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(path)
    return path


def truncated(path):
    """A PNG cut in the middle of its pixel data (noise compresses poorly: ~880 bytes, header intact)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def text(path):
    path.write_text("not an image at all\n")
    return path


BAD = {"bomb": (bomb, "too large to decode safely"), "truncated": (truncated, "truncated"),
       "text": (text, "not an image file")}


@pytest.fixture(scope="module")
def run2(tmp_path_factory, tiny):
    return train(tiny(**{"train.steps": 2}), out=tmp_path_factory.mktemp("bad-images") / "r")


def one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("kind", BAD)
def test_inpaint_and_interpolate_refuse_a_bad_image_in_one_line(run2, tmp_path, capsys, kind):
    make, needle = BAD[kind]
    bad = make(tmp_path / f"{kind}.png")
    good, mask = digit(tmp_path / "good.png"), digit(tmp_path / "mask.png", 255)
    line = one_line(capsys, ["inpaint", str(run2), "--image", str(bad), "--mask", str(mask),
                             "--out", str(tmp_path / "o.png")])
    assert f"image {bad}" in line and needle in line, line
    line = one_line(capsys, ["interpolate", str(run2), str(good), str(bad), "--out", str(tmp_path / "i.png")])
    assert f"image {bad}" in line and needle in line, line
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "i.png").exists()


def test_an_image_past_the_warning_limit_is_refused_without_the_warning(run2, tmp_path, capsys):
    # 100 M pixels: past PIL.Image.MAX_IMAGE_PIXELS (89 M), under twice it, where PIL only warns
    bad = bomb(tmp_path / "large.png", 10000)
    line = one_line(capsys, ["inpaint", str(run2), "--image", str(bad), "--mask", str(bad),
                             "--out", str(tmp_path / "o.png")])
    assert "too large to decode safely: 100,000,000 pixels" in line, line
    with pytest.raises(UserError, match="too large"), pytest.warns(Image.DecompressionBombWarning):
        read_image(bad)  # the library alone: PIL's warning, then the same refusal


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_file_in_a_folder_stops_training_before_it_starts(tmp_path, capsys, kind):
    make, needle = BAD[kind]
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(6):
        digit(folder / f"{i}.png", 40 * i)
    bad = make(folder / "3-bad.png")  # sorted in the middle: not the first image the source reads
    out = tmp_path / "run"
    line = one_line(capsys, ["train", "--preset", "tiny", "--no-progress", "--data", f"folder:{folder}",
                             "--out", str(out)])
    assert f"image {bad}" in line and needle in line, line
    assert not out.exists()  # nothing trained, nothing written


def test_fid_image_folders_name_the_bad_file(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    digit(folder / "a.png")
    bad = bomb(folder / "b.png")
    with pytest.raises(UserError, match=f"image {bad} is too large"):
        list(iter_batches(list_images(folder), 8))


def test_check_image_file_tolerates_what_pil_reads(tmp_path):
    good = digit(tmp_path / "good.png")
    good.write_bytes(good.read_bytes() + b"trailing bytes after IEND")  # PIL reads it: so do we
    check_image_file(good)
    assert read_image(good).size == (28, 28)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    check_image_file(tmp_path / "x.jpg")


def test_hf_images_are_decoded_by_ddpm_and_a_bad_row_is_named(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    encoded = []
    for make in (digit, digit, bomb, truncated):
        path = make(tmp_path / f"{len(encoded)}.png")
        encoded.append({"bytes": path.read_bytes(), "path": None})
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": encoded}, features=features).save_to_disk(str(tmp_path / "ds"))
    source = open_source(f"hf:{tmp_path / 'ds'}")
    assert source.shape == (1, 28, 28) and torch_close(source[0], 128 / 127.5 - 1)
    with pytest.raises(UserError, match=r"image hf:\S+ds row 2 is too large to decode safely"):
        source[2]
    with pytest.raises(UserError, match=r"cannot read image hf:\S+ds row 3: image file is truncated"):
        source[3]


def torch_close(x, value) -> bool:
    return bool((x - value).abs().max() < 1e-6)


def test_read_image_takes_a_file_object(tmp_path):
    data = digit(tmp_path / "a.png").read_bytes()
    assert read_image(io.BytesIO(data), name="buffer").size == (28, 28)
    with pytest.raises(UserError, match="cannot read image buffer: not an image file"):
        read_image(io.BytesIO(b"nope"), name="buffer")
