"""Data sources: the bundled MNIST, CIFAR-10 pickles, image folders, ``.npz`` arrays, 2-D toy sets.

``open_source(spec)`` is the one entry point; every source is a ``torch.utils.data.Dataset``
whose items are float32 tensors in [-1, 1] (the paper scales pixels to [-1, 1], section 4) of
shape (C, H, W) for images or (2,) for toy sets. Each source also has ``.shape`` (per item),
``.kind`` ("image" or "toy"), ``.name``, ``.labels`` (a LongTensor for MNIST and CIFAR-10,
else None) and ``get_batch(indices) -> (B, ...)`` for loops that index without a DataLoader.

Specs::

    mnist[:train|test]  the MNIST copy bundled in the package (SHA-256 verified on load)
    cifar10:DIR         the ``cifar-10-batches-py`` pickles in DIR or DIR/cifar-10-batches-py;
                        downloaded (md5-verified) when missing and the network is reachable
    folder:DIR          a tree of .png/.jpg/.jpeg, shorter side resized then centre-cropped
    npz:FILE            array ``images`` (or the only array): uint8 (N, H, W[, C]) or float
    toy:NAME            2-D sets: gaussian_mixture, two_moons, swiss_roll, checkerboard

The file formats of MNIST and CIFAR-10 are read by ``ddpm.readers``, the toy distributions live
in ``ddpm.toy``. Augmentation (the paper's random horizontal flips) is the training loop's: it
flips batches with its own seeded generator, so that a resumed run continues exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import UserError
from .readers import load_cifar10, load_mnist
from .toy import TOY_SETS, ToySource, check_toy, toy_log_density, toy_sample

__all__ = [
    "SCHEMES", "TOY_SETS", "open_source", "load_mnist", "toy_sample", "toy_log_density", "check_toy",
    "ImageSource", "FolderSource", "ToySource",
]

SCHEMES = ("mnist", "cifar10", "folder", "npz", "toy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# -- in-memory image sources ----------------------------------------------------------------------

def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 [-1, 1] (x / 127.5 - 1, inverted exactly by ``viz.to_uint8``)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 127.5 - 1.0
    return x.to(torch.float32)


class ImageSource(Dataset):
    """Images held in memory as uint8 (or float32 in [-1, 1]) of shape (N, C, H, W)."""

    kind = "image"

    def __init__(self, images: torch.Tensor, name: str, labels: torch.Tensor | None = None):
        assert images.ndim == 4, f"images must be (N, C, H, W), got {tuple(images.shape)}"
        self.images = images
        self.labels = labels
        self.name = name
        self.shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return _to_unit_range(self.images[index])

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 in [-1, 1] for the given item indices."""
        return _to_unit_range(self.images[torch.as_tensor(indices, dtype=torch.long)])

    def __repr__(self) -> str:
        return f"ImageSource({self.name!r}, n={len(self)}, shape={self.shape})"


def _fit_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): shorter side resized to ``size``, then centre-cropped.

    Resizing uses antialiased bilinear interpolation on float32 values, in chunks so that a whole
    data set never exists in float32 at the new size; uint8 input comes back rounded to uint8 so
    that large data sets stay compact in memory.
    """
    n, c, h, w = x.shape
    if min(h, w) != size:
        scale = size / min(h, w)
        new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
        chunks = []
        for part in x.split(1024):
            y = F.interpolate(part.to(torch.float32), size=new_hw, mode="bilinear",
                              antialias=True, align_corners=False)
            chunks.append(y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y)
        x = torch.cat(chunks)
        h, w = new_hw
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, :, top:top + size, left:left + size].contiguous()


def _convert_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """(N, C, H, W) with C in {1, 3} -> ``channels`` channels (grey repeated, or ITU-R 601 luma)."""
    c = x.shape[1]
    if channels is None or channels == c:
        return x
    if channels == 3 and c == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and c == 3:
        # PIL's "L" conversion weights, so that folder and array sources agree; they sum to 1,
        # so the same weights are right for float values in [-1, 1].
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        y = (x.to(torch.float32) * weights).sum(1, keepdim=True)
        return y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y
    raise UserError(f"cannot convert {c}-channel images to channels={channels}; use 1 or 3")


def _finish(images: torch.Tensor, name: str, image_size: int | None, channels: int | None,
            labels: torch.Tensor | None = None) -> ImageSource:
    images = _convert_channels(images, channels)
    if image_size is not None:
        images = _fit_square(images, image_size)
    return ImageSource(images, name, labels)


# -- MNIST and CIFAR-10 (their files are read by ddpm.readers) ------------------------------------

def _open_mnist(split: str, image_size: int | None, channels: int | None) -> ImageSource:
    images, labels = load_mnist(split)
    name = "mnist" if split == "train" else f"mnist:{split}"
    if image_size is not None and 28 < image_size <= 32:
        # Zero-pad (background is 0) rather than stretch: 28 + 2 + 2 = 32 is the classic LeNet
        # layout and keeps the digits' scale. Other sizes are resized.
        lo = (image_size - 28) // 2
        images = F.pad(images, (lo, image_size - 28 - lo, lo, image_size - 28 - lo))
    return _finish(images, name, image_size, channels, labels)


def _open_cifar10(directory: str, split: str, image_size: int | None, channels: int | None,
                  download: bool | None) -> ImageSource:
    images, labels = load_cifar10(directory, split, download)
    name = f"cifar10:{directory}" + ("" if split == "train" else " (test)")
    return _finish(images, name, image_size, channels, labels)


# -- folders of images (lazy) ---------------------------------------------------------------------

class FolderSource(Dataset):
    """PNG/JPEG files under a directory (recursive, sorted), read with PIL when indexed."""

    kind = "image"

    def __init__(self, directory: str, image_size: int | None = None, channels: int | None = None):
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise UserError(f"image folder {directory} does not exist" if not root.exists()
                            else f"{directory} is not a directory")
        self.paths = sorted(p for p in root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise UserError(f"no images found in {directory} (looked for .png, .jpg, .jpeg)")
        if channels not in (None, 1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels!r}")
        if image_size is None or channels is None:
            first = self._open(self.paths[0])
            if image_size is None:
                image_size = min(first.size)
            if channels is None:
                # Grey-level modes ("1", "L", "LA", "I", "I;16", "F") give 1 channel, others 3.
                channels = 1 if first.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
        self._mode = "L" if channels == 1 else "RGB"
        self.image_size = int(image_size)
        self.name = f"folder:{directory}"
        self.shape = (channels, self.image_size, self.image_size)
        self.labels = None

    @staticmethod
    def _open(path: Path):
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(path)
            image.load()
        except (OSError, UnidentifiedImageError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
        return image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._open(self.paths[index])
        if image.mode in ("I", "I;16", "F") and self._mode == "L":
            # 16-bit/float greys: PIL's "L" conversion clips; scale the range to 8 bits first.
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode != "F" else max(float(array.max()), 1.0)
            pixels = np.round(array / top * 255.0).astype(np.uint8)[None]
        else:
            pixels = np.asarray(image.convert(self._mode), dtype=np.uint8)
            pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        x = _fit_square(torch.from_numpy(pixels.copy())[None], self.image_size)[0]
        return _to_unit_range(x)

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in torch.as_tensor(indices).tolist()])

    def __repr__(self) -> str:
        return f"FolderSource({self.name!r}, n={len(self)}, shape={self.shape})"


# -- npz arrays -----------------------------------------------------------------------------------

def _open_npz(file: str, image_size: int | None, channels: int | None) -> ImageSource:
    """``images`` (or the only array) as uint8 (N, H, W) / (N, H, W, C) with C in {1, 3}, or float.

    Float arrays are read as [0, 1] when no value is negative and as [-1, 1] otherwise; values
    outside [-1, 1] are refused. This is the layout ``ddpm sample --out FILE.npz`` writes.
    """
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"npz file {file} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "images" in archive:
                array = archive["images"]
            elif len(keys) == 1:
                array = archive[keys[0]]
            else:
                raise UserError(f"npz file {file} has arrays {keys}; name the images array 'images'")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read npz file {file}: {exc}") from None
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or array.shape[0] == 0:
        raise UserError(f"npz images in {file} have shape {array.shape}; expected (N, H, W) or "
                        "(N, H, W, C) with C 1 or 3 and N > 0")
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
    return _finish(images, f"npz:{file}", image_size, channels)


# -- entry point ----------------------------------------------------------------------------------

def open_source(spec: str, *, image_size: int | None = None, channels: int | None = None,
                split: str = "train", download: bool | None = None) -> Dataset:
    """Open a data source from its spec (see the module docstring).

    ``image_size`` resizes/crops images to (size, size) (MNIST: 29..32 pads with background,
    so 32 gives the classic 28 + 2 + 2 layout); ``channels`` (1 or 3) converts colour.
    ``split`` picks MNIST/CIFAR-10's "train" or "test" set. Both are ignored for toy sets.
    ``download`` (default: env DDPM_DOWNLOAD, else on) allows fetching CIFAR-10.
    """
    if not isinstance(spec, str) or not spec:
        raise UserError(f"data source must be a string like 'mnist' or 'folder:DIR', got {spec!r}")
    scheme, _, rest = spec.partition(":")
    if scheme not in SCHEMES:
        raise UserError(f"unknown data source {spec!r}; use one of mnist, cifar10:DIR, "
                        "folder:DIR, npz:FILE, toy:NAME")
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, float, np.integer)) \
                or int(image_size) != image_size or image_size < 1:
            raise UserError(f"image_size must be a positive integer, got {image_size!r}")
        image_size = int(image_size)
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels!r}")
    if scheme == "toy":
        check_toy(rest)
        return ToySource(rest)
    if scheme == "mnist":
        return _open_mnist(rest or split, image_size, channels)
    if scheme == "cifar10":
        return _open_cifar10(rest, split, image_size, channels, download)
    if scheme == "folder":
        if not rest:
            raise UserError("folder needs a directory: folder:DIR")
        return FolderSource(rest, image_size, channels)
    if not rest:
        raise UserError("npz needs a file: npz:FILE")
    return _open_npz(rest, image_size, channels)
