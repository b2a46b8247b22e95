"""Hugging Face data sets as a data source: ``hf:PATH_OR_NAME[:SPLIT]`` (``pip install 'ddpm[hf]'``).

PATH_OR_NAME is one of

- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``; no network),
- any other local directory, read with ``datasets.load_dataset(DIR)``: a tree of images becomes an
  ``imagefolder`` data set whose sub-folders are its classes (no network),
- a data set name on the Hub (``load_dataset(NAME, split=SPLIT)``), which needs the network the
  first time and is then read from the Hugging Face cache (``HF_HUB_OFFLINE=1`` to stay offline).

SPLIT defaults to the ``split`` argument of ``open_source`` ("train", or "test" for ``ddpm eval
nll``); a saved ``DatasetDict`` with a single split uses that split. The image column is
``image_column`` or the first ``Image`` feature; the label column is ``label_column``, or a
``ClassLabel`` feature named label, labels, class, ... (or the only ``ClassLabel``), or an integer
column of one of those names. ``ClassLabel`` names become the source's ``class_names``. Images are
decoded when indexed and resized/centre-cropped like the images of ``folder:`` sources; ddpm
decodes them itself (``ddpm.data.images.read_image``, the column read with ``decode=False``), so
a damaged, foreign or oversized image is one line naming its row and file. Unlike a folder's files
they are not all checked before training: that would read the whole data set.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError, first_line
from .images import PILSource, read_image
from .labels import check_labels

__all__ = ["HFSource", "open_hf", "LABEL_NAMES", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'ddpm[hf]'"
# Column names that hold a class label in common data sets (mnist, cifar10: label; cifar100:
# fine_label; food101, beans: labels or label).
LABEL_NAMES = ("label", "labels", "class", "classes", "target", "targets", "fine_label", "category")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(f"hf: data sources need the Hugging Face datasets library: {INSTALL_HINT}") from None
    return datasets


def _load(target: str, split: str, explicit: bool):
    """The ``datasets.Dataset`` of split ``split`` named by ``target`` (see the module docstring)."""
    datasets = _datasets()
    path = Path(target).expanduser()
    if path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        try:
            loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
        except Exception as exc:  # any failure of the library on the user's files is a user error
            raise UserError(f"cannot read Hugging Face data set {target}: {first_line(exc)}") from None
    elif target.startswith(("/", "./", "../", "~")) or path.exists():
        raise UserError(f"Hugging Face data set {target} is not a directory (write one with save_to_disk)"
                        if path.exists() else f"Hugging Face data set directory {target} does not exist")
    else:
        try:
            return datasets.load_dataset(target, split=split)
        except ConnectionError as exc:  # also raised in offline mode (HF_HUB_OFFLINE=1) when not cached
            raise UserError(f"cannot reach the Hugging Face Hub for data set {target!r} ({first_line(exc)}): "
                            "load it once with network access (it is then cached), or point hf: at a "
                            "directory written by save_to_disk") from None
        except Exception as exc:
            raise UserError(f"cannot load Hugging Face data set {target!r}: {first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split in loaded:
            return loaded[split]
        if len(loaded) == 1 and not explicit:
            return next(iter(loaded.values()))
        raise UserError(f"Hugging Face data set {target} has splits {', '.join(loaded)}, not {split!r}; "
                        f"name one: hf:{target}:SPLIT")
    if explicit:
        raise UserError(f"Hugging Face data set {target} was saved as a single split; drop ':{split}'")
    return loaded


def _image_column(ds, chosen: str | None, where: str) -> str:
    datasets = _datasets()
    if chosen is not None:
        if chosen not in ds.features:
            raise UserError(f"{where} has no column {chosen!r}; columns: {', '.join(ds.features)}")
        return chosen
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise UserError(f"{where} has no Image column (columns: {', '.join(ds.features)}); name the image column "
                    "with data.image_column (--image-column)")


def _label_column(ds, chosen: str | None, where: str) -> str | None:
    datasets = _datasets()
    features = ds.features
    if chosen is not None:
        if chosen not in features:
            raise UserError(f"{where} has no column {chosen!r}; columns: {', '.join(features)}")
        return chosen
    class_labels = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
    named = [name for name in LABEL_NAMES if name in class_labels]
    if named or len(class_labels) == 1:
        return (named or class_labels)[0]
    integers = [name for name in LABEL_NAMES if isinstance(features.get(name), datasets.Value)
                and features[name].dtype.startswith(("int", "uint"))]
    return integers[0] if integers else None


def _labels_hint(ds) -> str:
    """What ``require_labels`` says of a data set whose label column was not detected: the integer
    and ClassLabel columns that may hold the labels, and the option that names one."""
    datasets = _datasets()
    candidates = [name for name, f in ds.features.items() if isinstance(f, datasets.ClassLabel)
                  or (isinstance(f, datasets.Value) and f.dtype.startswith(("int", "uint")))]
    if not candidates:
        return (f"it has no integer or ClassLabel column (columns: {', '.join(ds.features)}); a label column is "
                "named with --label-column (data.label_column)")
    listed = " or ".join(repr(name) for name in candidates)
    return (f"no column is named as labels are ({', '.join(LABEL_NAMES)}); if {listed} holds them, name it with "
            f"--label-column {candidates[0]} (data.label_column)")


class HFSource(PILSource):
    """A ``datasets.Dataset`` with an image column (decoded with PIL when indexed) and optional labels."""

    def __init__(self, ds, name: str, image_column: str, label_column: str | None, *, image_size=None,
                 channels: int | None = None, label_chosen: bool = False):
        if len(ds) == 0:
            raise UserError(f"{name} has no rows")
        self.name = name
        self.image_column, self.label_column = image_column, label_column
        self._images = ds.select_columns([image_column])  # decode only the image column
        if isinstance(ds.features[image_column], _datasets().Image):  # decoded here, by read_image
            self._images = self._images.cast_column(image_column, _datasets().Image(decode=False))
        self._set_shape(image_size, channels)
        if label_column is not None:
            values = ds.select_columns([label_column]).with_format("numpy")[:][label_column]
            if label_chosen or not (np.asarray(values) < 0).any():
                self.labels = check_labels(values, len(ds), f"{name} column {label_column!r}")
                feature = ds.features[label_column]
                self.class_names = list(feature.names) if hasattr(feature, "names") else None
            else:  # ClassLabel's -1 marks a missing label: such a split is unlabelled
                warnings.warn(f"{name}: column {label_column!r} has missing labels (-1); reading it as unlabelled",
                              stacklevel=3)
                self.label_column = None
                self.labels_hint = f"its column {label_column!r} marks its labels missing (-1): use a labelled split"
        else:
            self.labels_hint = _labels_hint(ds)

    def __len__(self) -> int:
        return len(self._images)

    def _image(self, index: int):

        value = self._images[int(index)][self.image_column]
        if isinstance(value, dict) and set(value) == {"bytes", "path"}:  # an Image column, undecoded
            where = f"{self.name} row {int(index)}" + (f" ({value['path']})" if value["path"] else "")
            if value["bytes"] is not None:
                return read_image(io.BytesIO(value["bytes"]), name=where)
            if value["path"]:
                return read_image(value["path"], name=where)
            raise UserError(f"{where} holds no image (neither bytes nor a path)")
        if isinstance(value, Image.Image):
            return value
        array = np.asarray(value)  # an array column (H, W) or (H, W, C) of 0..255 integers
        if array.dtype.kind not in "iu" or array.ndim not in (2, 3) or array.min() < 0 or array.max() > 255:
            raise UserError(f"{self.name} column {self.image_column!r} holds neither images nor uint8 arrays "
                            f"(H, W[, C]); got {array.dtype} of shape {array.shape}")
        return Image.fromarray(array.astype(np.uint8))


def open_hf(rest: str, *, image_size=None, channels: int | None = None, split: str = "train",
            image_column: str | None = None, label_column: str | None = None) -> HFSource:
    """``open_source("hf:" + rest, ...)``: ``rest`` is PATH_OR_NAME[:SPLIT] (the first ':' splits)."""
    target, colon, named_split = rest.partition(":")
    if colon and not named_split:
        raise UserError(f"hf:{rest} names an empty split; use hf:{target} or hf:{target}:SPLIT")
    ds = _load(target, named_split or split, bool(named_split))
    where = f"hf:{rest}"
    image_col = _image_column(ds, image_column, where)
    label_col = _label_column(ds, label_column, where)
    return HFSource(ds, where, image_col, label_col, image_size=image_size, channels=channels,
                    label_chosen=label_column is not None)
