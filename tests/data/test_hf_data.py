"""hf: data sources: save_to_disk directories, imagefolder directories, column choice, labels, errors.

Every data set is built here in tmp_path; nothing touches the network (the Hub case runs the CLI
in offline mode). Skipped without the optional ``datasets`` library, except the test that its
absence gives the install hint.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data.sources import open_source, require_labels
from ddpm.errors import UserError


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # imagefolder directories are converted to Arrow in the cache: keep that in tmp_path.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def _rgba(i: int, h: int = 6, w: int = 10) -> np.ndarray:
    """An RGBA image whose red channel is 20 * column + i and alpha 100 + i: crops are checkable."""
    a = np.zeros((h, w, 4), np.uint8)
    a[..., 0] = (np.arange(w) * 20 + i)[None, :]
    a[..., 1] = 7 * i
    a[..., 3] = 100 + i
    return a


def _save_labelled(datasets, path, n=5, split_dict=False):
    arrays = [_rgba(i) for i in range(n)]
    features = datasets.Features({"picture": datasets.Image(), "id": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["ant", "bee", "cow"])})
    ds = datasets.Dataset.from_dict({"picture": [Image.fromarray(a) for a in arrays], "id": list(range(n)),
                                     "label": [i % 3 for i in range(n)]}, features=features)
    (datasets.DatasetDict({"train": ds, "test": ds.select([3, 4])}) if split_dict else ds).save_to_disk(str(path))
    return arrays


def test_save_to_disk_detects_columns_keeps_rgba_and_crops(datasets, tmp_path):
    arrays = _save_labelled(datasets, tmp_path / "ds")
    source = open_source(f"hf:{tmp_path / 'ds'}", channels=4, image_size=(6, 4))
    assert source.image_column == "picture" and source.label_column == "label"
    assert len(source) == 5 and source.shape == (4, 6, 4) and source.kind == "image"
    x = source.get_batch([2])[0]
    # The centre crop of width 4 from 10 keeps columns 3..6; alpha is kept.
    expected = torch.tensor(arrays[2][:, 3:7].transpose(2, 0, 1) / 127.5 - 1, dtype=torch.float32)
    assert torch.allclose(x, expected, atol=1e-6)
    assert source.labels.tolist() == [0, 1, 2, 0, 1] and source.class_names == ["ant", "bee", "cow"]
    assert source.get_batch_labels([4, 2]).tolist() == [1, 2] and require_labels(source) == 3
    rgb = open_source(f"hf:{tmp_path / 'ds'}")  # default: RGB, square of the shorter side
    assert rgb.shape == (3, 6, 6)


def test_dataset_dict_splits(datasets, tmp_path):
    _save_labelled(datasets, tmp_path / "dd", split_dict=True)
    assert len(open_source(f"hf:{tmp_path / 'dd'}")) == 5
    test = open_source(f"hf:{tmp_path / 'dd'}:test")
    assert len(test) == 2 and test.labels.tolist() == [0, 1] and test.name == f"hf:{tmp_path / 'dd'}:test"
    assert len(open_source(f"hf:{tmp_path / 'dd'}", split="test")) == 2  # as ddpm eval nll asks
    with pytest.raises(UserError, match="has splits train, test, not 'valid'; name one"):
        open_source(f"hf:{tmp_path / 'dd'}:valid")
    _save_labelled(datasets, tmp_path / "single")
    with pytest.raises(UserError, match="saved as a single split; drop ':train'"):
        open_source(f"hf:{tmp_path / 'single'}:train")


def test_imagefolder_matches_folder_source(datasets, tmp_path):
    root = tmp_path / "pets"
    for k, cls in enumerate(("dog", "cat")):  # sorted class names: cat -> 0, dog -> 1
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_rgba(10 * k + i, 8, 12)[..., :3]).save(root / cls / f"{i}.png")
    hf = open_source(f"hf:{root}", image_size=8)
    folder = open_source(f"folder:{root}", image_size=8)
    assert hf.class_names == folder.class_names == ["cat", "dog"]
    assert hf.shape == folder.shape == (3, 8, 8) and len(hf) == len(folder) == 6

    def by_content(source):  # the two may list files in different orders
        items = [(source.labels[i].item(), source[i]) for i in range(len(source))]
        return sorted(items, key=lambda item: (item[0], item[1].sum().item()))

    for (label_a, x_a), (label_b, x_b) in zip(by_content(hf), by_content(folder)):
        assert label_a == label_b and torch.equal(x_a, x_b)


def test_explicit_columns_integer_labels_and_missing_labels(datasets, tmp_path):
    arrays = [_rgba(i)[..., :3] for i in range(4)]
    ds = datasets.Dataset.from_dict({"a": [Image.fromarray(x) for x in arrays],
                                     "b": [Image.fromarray(255 - x) for x in arrays],
                                     "digit": [3, 1, 4, 1], "note": ["w", "x", "y", "z"]})
    ds.save_to_disk(str(tmp_path / "two"))
    spec = f"hf:{tmp_path / 'two'}"
    auto = open_source(spec)
    assert auto.image_column == "a" and auto.labels is None and auto.label_column is None
    with pytest.raises(UserError, match=r"has no labels; a class-conditional run needs labelled data"):
        require_labels(auto)
    with pytest.raises(UserError, match="has no labels"):
        auto.get_batch_labels([0])
    chosen = open_source(spec, image_column="b", label_column="digit", channels=1)
    assert chosen.labels.tolist() == [3, 1, 4, 1] and chosen.class_names is None and require_labels(chosen) == 5
    assert chosen[0].shape == (1, 6, 6) and chosen[0].mean() > 0  # the inverted, brighter image
    with pytest.raises(UserError, match="column 'note'.*labels must be integers"):
        open_source(spec, label_column="note")
    with pytest.raises(UserError, match="has no column 'pic'; columns: a, b, digit, note"):
        open_source(spec, image_column="pic")
    with pytest.raises(UserError, match="image_column/label_column choose columns of hf: data sources"):
        open_source("mnist", label_column="digit")

    unlabelled = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(x) for x in arrays], "label": [-1] * 4},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["p", "q"])}))
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.warns(UserWarning, match="missing labels"):
        missing = open_source(f"hf:{tmp_path / 'unlabelled'}")
    assert missing.labels is None
    with pytest.raises(UserError, match=r"its column 'label' marks its labels missing \(-1\): use a labelled split"):
        require_labels(missing)
    with pytest.raises(UserError, match="labels must be >= 0, found -1"):
        open_source(f"hf:{tmp_path / 'unlabelled'}", label_column="label")

    numbers = datasets.Dataset.from_dict({"n": [1, 2]})
    numbers.save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(UserError, match="has no Image column .*data.image_column"):
        open_source(f"hf:{tmp_path / 'numbers'}")


def test_bad_paths_and_missing_library(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="hf needs a data set: hf:PATH_OR_NAME"):
        open_source("hf:")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(UserError, match=r"need the Hugging Face datasets library: pip install 'ddpm\[hf\]'"):
        open_source(f"hf:{tmp_path}")


def test_hub_name_offline_is_a_one_line_error(tmp_path):
    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "ddpm", "train", "--preset", "tiny", "--data", "hf:someone/no-such-set",
                           "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ddpm: error:")]
    assert len(errors) == 1 and "cannot reach the Hugging Face Hub for data set 'someone/no-such-set'" in errors[0]
    assert "Traceback" not in done.stderr
    with pytest.raises(UserError, match="directory .*nope does not exist"):
        open_source(f"hf:{tmp_path / 'nope'}")


def test_training_uses_the_configured_columns(datasets, tmp_path):
    """`ddpm train --label-column` reaches the data the loop opens: a conditional run on the integer
    `id` column (5 classes) instead of the detected ClassLabel `label` (3 classes) records id's classes."""
    import json

    from ddpm.cli.main import main

    _save_labelled(datasets, tmp_path / "ds", n=10)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", f"hf:{tmp_path / 'ds'}", "--image-size", "8",
                 "--channels", "3", "--label-column", "id", "--classes", "auto", "--steps", "2",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["label_column"] == "id"
    assert config["model"]["num_classes"] == 10


def test_classes_auto_on_an_undetected_label_column_names_label_column(datasets, tmp_path, capsys):
    """A label column named `y` is not detected (LABEL_NAMES): --classes auto says which columns
    may hold the labels and the option that names one, rather than only that there are none."""
    from ddpm.cli.main import main

    arrays = [_rgba(i)[..., :3] for i in range(4)]
    datasets.Dataset.from_dict({"image": [Image.fromarray(x) for x in arrays], "y": [0, 1, 1, 0],
                                "note": ["w", "x", "y", "z"]}).save_to_disk(str(tmp_path / "xy"))
    source = open_source(f"hf:{tmp_path / 'xy'}")
    with pytest.raises(UserError, match=r"if 'y' holds them, name it with --label-column y \(data.label_column\)"):
        require_labels(source, "--classes auto")
    capsys.readouterr()  # datasets' own progress bars
    code = main(["train", "--preset", "tiny", "--data", f"hf:{tmp_path / 'xy'}", "--image-size", "8", "--channels", "3",
                 "--classes", "auto", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--classes auto needs labelled data" in err[0], err
    assert "--label-column y" in err[0] and not (tmp_path / "run").exists()
    # Without an integer column there is no column to name, and the message says so.
    datasets.Dataset.from_dict({"image": [Image.fromarray(x) for x in arrays],
                                "note": ["w", "x", "y", "z"]}).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(UserError, match=r"it has no integer or ClassLabel column \(columns: image, note\)"):
        require_labels(open_source(f"hf:{tmp_path / 'none'}"))
