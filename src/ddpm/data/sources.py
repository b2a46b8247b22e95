"""Data sources: the bundled MNIST, CIFAR-10 pickles, image folders, ``.npz`` arrays, Hugging Face
data sets, 2-D toy sets.

``open_source(spec)`` is the one entry point (``open_data(DataConfig)`` passes it every field of a
run's data config); every source is a ``torch.utils.data.Dataset`` whose items are float32 tensors
in [-1, 1] (the paper scales pixels to [-1, 1], section 4) of shape (C, H, W) for images or (2,)
for toy sets. Each source also has ``.shape`` (per item), ``.kind`` ("image" or "toy"), ``.name``
and ``get_batch(indices) -> (B, ...)`` for loops that index without a DataLoader.

Labels (for class-conditional runs): every source has ``.labels``, a LongTensor (N,) of class
indices 0..K-1 aligned with the items, or None; ``.class_names``, a list of K names or None; and
``get_batch_labels(indices) -> (B,)``, the labels of the items ``get_batch(indices)`` returns.
``require_labels(source)`` returns K, or raises a one-line UserError for a source without labels.

Specs::

    mnist[:train|test]  the MNIST copy bundled in the package (SHA-256 verified on load); labels 0..9
    cifar10:DIR         the ``cifar-10-batches-py`` pickles in DIR or DIR/cifar-10-batches-py;
                        downloaded (md5-verified) when missing and the network is reachable; labels
    folder:DIR          a tree of .png/.jpg/.jpeg, resized to cover the size, then centre-cropped;
                        when every image lies in a sub-folder, one class per top-level sub-folder
                        (sorted names -> 0..K-1)
    npz:FILE            array ``images`` (or the only other array): uint8 (N, H, W[, C]) or float;
                        optional ``labels`` (N,) integers >= 0 and ``class_names`` (K,) strings
    hf:PATH_OR_NAME[:SPLIT]  a Hugging Face data set (``pip install 'ddpm[hf]'``; ``ddpm.data.hf``)
    toy:NAME            2-D sets: gaussian_mixture, two_moons, swiss_roll, checkerboard

``image_size`` is S (square) or (H, W); ``channels`` is 1 (grey), 3 (RGB) or 4 (RGBA). The file
formats of MNIST and CIFAR-10 are read by ``ddpm.data.readers``, the toy distributions live in
``ddpm.data.toy``. Augmentation (the paper's random horizontal flips) is the training loop's: it flips
batches with its own seeded generator, so that a resumed run continues exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..core.shapes import image_hw
from ..errors import UserError
from .hf import open_hf
from .images import (CHANNELS, IMAGE_SUFFIXES, PILSource, check_image_file, convert_channels, fit_size, read_image,
                     to_unit_range)
from .labels import Labelled, check_class_names, check_labels, require_labels
from .readers import CIFAR10_CLASSES, MNIST_CLASSES, load_cifar10, load_mnist
from .toy import TOY_SETS, ToySource, check_toy, toy_log_density, toy_sample

__all__ = [
    "SCHEMES", "TOY_SETS", "CHANNELS", "open_source", "open_data", "require_labels", "check_labels",
    "load_mnist", "toy_sample", "toy_log_density", "check_toy",
    "ImageSource", "PILSource", "FolderSource", "ToySource",
]

SCHEMES = ("mnist", "cifar10", "folder", "npz", "hf", "toy")


# -- in-memory image sources ----------------------------------------------------------------------

class ImageSource(Labelled, Dataset):
    """Images held in memory as uint8 (or float32 in [-1, 1]) of shape (N, C, H, W)."""

    kind = "image"

    def __init__(self, images: torch.Tensor, name: str, labels: torch.Tensor | None = None,
                 class_names: Sequence[str] | None = None):
        assert images.ndim == 4, f"images must be (N, C, H, W), got {tuple(images.shape)}"
        self.images = images
        self.labels = None if labels is None else check_labels(labels, images.shape[0], name)
        self.class_names = None if class_names is None else check_class_names(class_names, self.labels, name)
        self.name = name
        self.shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_unit_range(self.images[index])

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 in [-1, 1] for the given item indices."""
        return to_unit_range(self.images[torch.as_tensor(indices, dtype=torch.long)])

    def __repr__(self) -> str:
        return f"ImageSource({self.name!r}, n={len(self)}, shape={self.shape})"


def _finish(images: torch.Tensor, name: str, hw: tuple[int, int] | None, channels: int | None,
            labels=None, class_names=None) -> ImageSource:
    images = convert_channels(images, channels)
    if hw is not None:
        images = fit_size(images, hw)
    return ImageSource(images, name, labels, class_names)


# -- MNIST and CIFAR-10 (their files are read by ddpm.data.readers) ------------------------------------

def _open_mnist(split: str, hw: tuple[int, int] | None, channels: int | None) -> ImageSource:
    images, labels = load_mnist(split)
    name = "mnist" if split == "train" else f"mnist:{split}"
    if hw is not None and all(28 <= side <= 32 for side in hw):
        # Zero-pad (background is 0) rather than stretch: 28 + 2 + 2 = 32 is the classic LeNet
        # layout and keeps the digits' scale. Other sizes are resized.
        top, left = (hw[0] - 28) // 2, (hw[1] - 28) // 2
        images = F.pad(images, (left, hw[1] - 28 - left, top, hw[0] - 28 - top))
    return _finish(images, name, hw, channels, labels, MNIST_CLASSES)


def _open_cifar10(directory: str, split: str, hw: tuple[int, int] | None, channels: int | None,
                  download: bool | None) -> ImageSource:
    images, labels = load_cifar10(directory, split, download)
    name = f"cifar10:{directory}" + ("" if split == "train" else " (test)")
    return _finish(images, name, hw, channels, labels, CIFAR10_CLASSES)


class FolderSource(PILSource):
    """PNG/JPEG files under a directory (recursive, sorted). When every image lies in a sub-folder,
    the top-level sub-folders are the classes: sorted names -> labels 0..K-1 (``class_names``)."""

    def __init__(self, directory: str, image_size=None, channels: int | None = None):
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise UserError(f"image folder {directory} does not exist" if not root.exists()
                            else f"{directory} is not a directory")
        self.paths = sorted(p for p in root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise UserError(f"no images found in {directory} (looked for .png, .jpg, .jpeg)")
        for path in self.paths:  # headers only (~25 us a file): a bad file stops the run before training
            check_image_file(path)
        self.name = f"folder:{directory}"
        self._set_shape(image_size, channels)
        top = [p.relative_to(root).parts for p in self.paths]
        if all(len(parts) > 1 for parts in top):
            self.class_names = sorted({parts[0] for parts in top})
            index = {name: k for k, name in enumerate(self.class_names)}
            self.labels = torch.tensor([index[parts[0]] for parts in top], dtype=torch.long)

    def _image(self, index: int):
        return read_image(self.paths[index])

    def __len__(self) -> int:
        return len(self.paths)


# -- npz arrays -----------------------------------------------------------------------------------

_NPZ_EXTRAS = ("labels", "class_names")


def _open_npz(file: str, hw: tuple[int, int] | None, channels: int | None) -> ImageSource:
    """``images`` (or the only other array) as uint8 (N, H, W) / (N, H, W, C) with C in {1, 3, 4},
    or float; optional ``labels`` (N,) and ``class_names`` (K,).

    Float arrays are read as [0, 1] when no value is negative and as [-1, 1] otherwise; values
    outside [-1, 1] are refused. This is the layout ``ddpm sample --out FILE.npz`` writes.
    """
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"npz file {file} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            others = [k for k in keys if k not in _NPZ_EXTRAS]
            if "images" in archive:
                array = archive["images"]
            elif len(others) == 1:
                array = archive[others[0]]
            else:
                raise UserError(f"npz file {file} has arrays {keys}; name the images array 'images'")
            labels = archive["labels"] if "labels" in archive else None
            names = archive["class_names"] if "class_names" in archive else None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read npz file {file}: {exc}") from None
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in CHANNELS or array.shape[0] == 0:
        raise UserError(f"npz images in {file} have shape {array.shape}; expected (N, H, W) or "
                        "(N, H, W, C) with C 1, 3 or 4 and N > 0")
    if labels is not None:
        labels = check_labels(labels, array.shape[0], f"npz file {file}")
    if names is not None and (labels is None or names.dtype.kind != "U" or names.ndim != 1):
        raise UserError(f"npz file {file}: class_names must be a 1-D array of strings beside a 'labels' array")
    images = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < -1 or array.max() > 1:
            raise UserError(f"float npz images in {file} must be finite and lie in [0, 1] or [-1, 1]")
        images = images.to(torch.float32)
        if array.min() >= 0:
            images = images * 2 - 1
    else:
        raise UserError(f"npz images in {file} have dtype {array.dtype}; use uint8 or float")
    return _finish(images, f"npz:{file}", hw, channels, labels, None if names is None else names.tolist())


# -- entry points ---------------------------------------------------------------------------------

_NEEDS = {"cifar10": "a directory: cifar10:DIR", "folder": "a directory: folder:DIR", "npz": "a file: npz:FILE",
          "hf": "a data set: hf:PATH_OR_NAME[:SPLIT]"}

def open_source(spec: str, *, image_size=None, channels: int | None = None, split: str = "train",
                download: bool | None = None, image_column: str | None = None,
                label_column: str | None = None) -> Dataset:
    """Open a data source from its spec (see the module docstring).

    ``image_size`` (S or (H, W)) resizes to cover the size, then centre-crops (MNIST: 29..32 pads
    with background, so 32 gives the classic 28 + 2 + 2 layout); ``channels`` (1, 3 or 4)
    converts colour. ``split`` picks the "train" or "test" set of MNIST/CIFAR-10 and the default
    split of ``hf:`` sources. ``image_column``/``label_column`` choose the columns of ``hf:``
    sources (default: detected). Sizes and channels are ignored for toy sets. ``download``
    (default: env DDPM_DOWNLOAD, else on) allows fetching CIFAR-10.
    """
    if not isinstance(spec, str) or not spec:
        raise UserError(f"data source must be a string like 'mnist' or 'folder:DIR', got {spec!r}")
    scheme, _, rest = spec.partition(":")
    if scheme not in SCHEMES:
        raise UserError(f"unknown data source {spec!r}; use one of mnist, cifar10:DIR, "
                        "folder:DIR, npz:FILE, hf:PATH_OR_NAME[:SPLIT], toy:NAME")
    hw = None
    if image_size is not None:
        try:
            hw = image_hw(image_size)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if channels not in (None, *CHANNELS):
        raise UserError(f"channels must be 1, 3 or 4, got {channels!r}")
    if scheme != "hf" and (image_column or label_column):
        raise UserError(f"image_column/label_column choose columns of hf: data sources, not of {spec!r}")
    if scheme in _NEEDS and not rest:
        raise UserError(f"{scheme} needs {_NEEDS[scheme]}")
    if scheme == "toy":
        check_toy(rest)
        return ToySource(rest)
    if scheme == "mnist":
        return _open_mnist(rest or split, hw, channels)
    if scheme == "cifar10":
        return _open_cifar10(rest, split, hw, channels, download)
    if scheme == "folder":
        return FolderSource(rest, hw, channels)
    if scheme == "hf":

        return open_hf(rest, image_size=hw, channels=channels, split=split, image_column=image_column,
                       label_column=label_column)
    return _open_npz(rest, hw, channels)


def open_data(config, *, split: str = "train", download: bool | None = None) -> Dataset:
    """The source a run's ``DataConfig`` describes, opened with every one of its fields."""
    return open_source(config.source, image_size=config.image_size, channels=config.channels, split=split,
                       download=download, image_column=config.image_column, label_column=config.label_column)
