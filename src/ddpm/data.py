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

Random horizontal flips (the paper's CIFAR-10 augmentation) are a training-time choice:
``random_hflip(batch, generator)`` flips a batch with injectable randomness (what a
deterministic, resumable training loop wants); ``open_source(..., hflip=True)`` instead flips
items as they are read, using torch's global RNG.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import UserError
from .toy import TOY_SETS, check_toy, toy_log_density, toy_sample

__all__ = [
    "SCHEMES", "TOY_SETS", "open_source", "load_mnist", "random_hflip", "toy_sample",
    "toy_log_density", "check_toy", "ImageSource", "FolderSource", "ToySource",
]

SCHEMES = ("mnist", "cifar10", "folder", "npz", "toy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIRNAME = "cifar-10-batches-py"
# Set DDPM_DOWNLOAD=0 to never touch the network (the tests do, through ``download=False``).
DOWNLOAD_ENV = "DDPM_DOWNLOAD"


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


# -- MNIST (bundled) ------------------------------------------------------------------------------

_MNIST_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _bundled_mnist_dir() -> Path:
    return Path(__file__).resolve().parent / "data_files" / "mnist"


def _read_sha256sums(root: Path) -> dict[str, str]:
    sums_path = root / "SHA256SUMS"
    if not sums_path.is_file():
        raise UserError(f"MNIST checksum list {sums_path} is missing")
    sums = {}
    for line in sums_path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            sums[parts[1]] = parts[0].lower()
    return sums


def _read_idx(path: Path, expected_sha256: str | None, magic: int) -> np.ndarray:
    """Gunzip an IDX file, verify the SHA-256 of its uncompressed bytes, parse it.

    IDX format: a big-endian int32 magic (0x0801 labels / 0x0803 images: unsigned bytes with 1 or
    3 dimensions), one big-endian int32 per dimension, then the data.
    """
    if not path.is_file():
        raise UserError(f"MNIST file {path} is missing")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; truncation raises EOFError
        raise UserError(f"MNIST file {path} is damaged: {exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is None:
        raise UserError(f"MNIST file {path.name} has no entry in {path.parent / 'SHA256SUMS'}")
    if digest != expected_sha256:
        raise UserError(f"MNIST file {path} fails its SHA-256 check (got {digest[:16]}..., "
                        f"expected {expected_sha256[:16]}...)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise UserError(f"MNIST file {path} has IDX magic {found:#06x}, expected {magic:#06x}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"MNIST file {path} holds {data.size} bytes of data, header says {dims}")
    return data.reshape(dims)


def load_mnist(split: str = "train", root: str | os.PathLike | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as (images uint8 (N, 1, 28, 28), labels int64 (N,)), cached for the process.

    ``root`` defaults to the copy bundled in the package; each file's uncompressed content is
    checked against ``root/SHA256SUMS`` before use.
    """
    if split not in MNIST_FILES:
        raise UserError(f"MNIST split {split!r} unknown; choose one of {', '.join(MNIST_FILES)}")
    root = Path(root) if root is not None else _bundled_mnist_dir()
    key = (str(root.resolve()), split)
    if key not in _MNIST_CACHE:
        sums = _read_sha256sums(root)
        image_file, label_file = MNIST_FILES[split]
        labels = _read_idx(root / label_file, sums.get(label_file), 0x0801)  # small: fail fast
        images = _read_idx(root / image_file, sums.get(image_file), 0x0803)
        if images.shape[0] != labels.shape[0]:
            raise UserError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
        _MNIST_CACHE[key] = (torch.from_numpy(images.copy()).unsqueeze(1),
                             torch.from_numpy(labels.astype(np.int64)))
    return _MNIST_CACHE[key]


def _open_mnist(split: str, image_size: int | None, channels: int | None,
                root: str | os.PathLike | None = None) -> ImageSource:
    images, labels = load_mnist(split, root)
    name = "mnist" if split == "train" else f"mnist:{split}"
    if image_size is not None and 28 < image_size <= 32:
        # Zero-pad (background is 0) rather than stretch: 28 + 2 + 2 = 32 is the classic LeNet
        # layout and keeps the digits' scale. Other sizes are resized.
        lo = (image_size - 28) // 2
        images = F.pad(images, (lo, image_size - 28 - lo, lo, image_size - 28 - lo))
    return _finish(images, name, image_size, channels, labels)


# -- CIFAR-10 (python pickles) --------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR-10 batches are pickles; allow only the numpy globals they need, nothing else."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"CIFAR-10 batch {path} is unreadable: {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise UserError(f"CIFAR-10 batch {path} has data of shape {data.shape}, expected (N, 3072)")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major over 32 x 32.
    return data.reshape(-1, 3, 32, 32), labels


def _find_cifar_dir(root: Path) -> Path | None:
    for candidate in (root, root / CIFAR10_DIRNAME):
        if (candidate / "test_batch").is_file() or any(candidate.glob("data_batch_*")):
            return candidate
    return None


def _download_enabled(download: bool | None) -> bool:
    if download is not None:
        return download
    return os.environ.get(DOWNLOAD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _download_cifar10(root: Path, timeout: float = 10.0) -> None:
    """Fetch the official archive into ``root``, check its published md5, extract it.

    Raises OSError when the server cannot be reached (the caller turns that into a UserError).
    """
    root.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5()
    with tempfile.NamedTemporaryFile(dir=root, suffix=".tar.gz.part", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    md5.update(chunk)
                    tmp.write(chunk)
        except BaseException:
            tmp.close()
            tmp_path.unlink(missing_ok=True)
            raise
    try:
        if md5.hexdigest() != CIFAR10_MD5:
            raise UserError(f"downloaded {CIFAR10_URL} has md5 {md5.hexdigest()}, expected "
                            f"{CIFAR10_MD5}; delete partial files in {root} and retry")
        with tarfile.open(tmp_path, "r:gz") as tar:
            # The "data" filter refuses absolute paths, links out of root and device files.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, filter="data")
            else:  # Python < 3.10.12 without extraction filters
                tar.extractall(root)
    finally:
        tmp_path.unlink(missing_ok=True)


def _open_cifar10(directory: str, split: str, image_size: int | None, channels: int | None,
                  download: bool | None) -> ImageSource:
    if split not in ("train", "test"):
        raise UserError(f"CIFAR-10 split {split!r} unknown; choose one of train, test")
    if not directory:
        raise UserError("cifar10 needs a directory: cifar10:DIR")
    root = Path(directory).expanduser()
    found = _find_cifar_dir(root)
    if found is None:
        where = (f"download the python version from {CIFAR10_URL} and extract it so that "
                 f"{root / CIFAR10_DIRNAME}/data_batch_1 exists")
        if not _download_enabled(download):
            raise UserError(f"CIFAR-10 not found in {root} (downloads disabled); {where}")
        try:
            _download_cifar10(root)
        except OSError as exc:
            raise UserError(f"CIFAR-10 not found in {root} and the download failed "
                            f"({getattr(exc, 'reason', exc)}); {where}") from None
        found = _find_cifar_dir(root)
        if found is None:
            raise UserError(f"CIFAR-10 archive extracted into {root} but no batches found; {where}")
    if split == "train":
        paths = sorted(found.glob("data_batch_*"), key=lambda p: p.name)
        if not paths:
            raise UserError(f"no CIFAR-10 training batches (data_batch_1..5) in {found}")
        if len(paths) != 5:
            warnings.warn(f"CIFAR-10 in {found} has {len(paths)} training batches, not 5", stacklevel=3)
    else:
        paths = [found / "test_batch"]
        if not paths[0].is_file():
            raise UserError(f"CIFAR-10 test batch {paths[0]} is missing")
    batches = [_load_cifar_batch(p) for p in paths]
    images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
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


# -- toy 2-D sets (distributions in ddpm.toy) -----------------------------------------------------

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
        self.labels = None

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.points[index]

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return self.points[torch.as_tensor(indices, dtype=torch.long)]

    def __repr__(self) -> str:
        return f"ToySource({self.name!r}, n={len(self)})"


# -- augmentation and entry point -----------------------------------------------------------------

def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
                 ) -> torch.Tensor:
    """Flip each image of a (B, C, H, W) batch left-right with probability ``p``."""
    assert x.ndim == 4, f"expected (B, C, H, W), got {tuple(x.shape)}"
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device if generator
                      else x.device) < p
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


class _HFlip(Dataset):
    """Wraps an image source; flips items with probability 1/2 using torch's global RNG."""

    def __init__(self, source: Dataset):
        self.source = source
        for attr in ("kind", "name", "shape", "labels"):
            setattr(self, attr, getattr(source, attr))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = self.source[index]
        return x.flip(-1) if torch.rand(()) < 0.5 else x

    def get_batch(self, indices) -> torch.Tensor:
        return random_hflip(self.source.get_batch(indices))


def open_source(spec: str, *, image_size: int | None = None, channels: int | None = None,
                split: str = "train", hflip: bool = False, download: bool | None = None
                ) -> Dataset:
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
        source = _open_mnist(rest or split, image_size, channels)
    elif scheme == "cifar10":
        source = _open_cifar10(rest, split, image_size, channels, download)
    elif scheme == "folder":
        if not rest:
            raise UserError("folder needs a directory: folder:DIR")
        source = FolderSource(rest, image_size, channels)
    else:
        if not rest:
            raise UserError("npz needs a file: npz:FILE")
        source = _open_npz(rest, image_size, channels)
    return _HFlip(source) if hflip else source
