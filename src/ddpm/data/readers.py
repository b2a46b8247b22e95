"""Readers of the standard data set files: MNIST's IDX files and CIFAR-10's python pickles.

``load_mnist(split)`` reads the copy of MNIST bundled in the package (or one at ``root``) and
checks each file's SHA-256; ``load_cifar10(directory, split)`` reads the ``cifar-10-batches-py``
pickles, allowing only the numpy globals they need, and downloads the official archive
(md5-verified) when they are missing and downloads are allowed. Both return uint8 images
(N, C, H, W) and int64 labels (N,); ``ddpm.data.sources`` turns them into data sources.
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

import numpy as np
import torch

from ..errors import UserError

__all__ = ["load_mnist", "load_cifar10", "MNIST_FILES", "MNIST_CLASSES", "CIFAR10_URL", "CIFAR10_MD5",
           "CIFAR10_CLASSES", "DOWNLOAD_ENV"]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIRNAME = "cifar-10-batches-py"
# The names of labels 0..9, in the order of the data sets' own label files (CIFAR-10: batches.meta).
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Set DDPM_DOWNLOAD=0 to never touch the network (the tests do, through ``download=False``).
DOWNLOAD_ENV = "DDPM_DOWNLOAD"


# -- MNIST (bundled) ------------------------------------------------------------------------------

_MNIST_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _bundled_mnist_dir() -> Path:
    return Path(__file__).resolve().parent / "mnist"


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


def load_cifar10(directory: str, split: str = "train", download: bool | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as (images uint8 (N, 3, 32, 32), labels int64 (N,)) from DIR or DIR/cifar-10-batches-py.

    When no batches are there and ``download`` allows it (default: env DDPM_DOWNLOAD, else on),
    the official archive is fetched into ``directory`` first.
    """
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
            warnings.warn(f"CIFAR-10 in {found} has {len(paths)} training batches, not 5", stacklevel=2)
    else:
        paths = [found / "test_batch"]
        if not paths[0].is_file():
            raise UserError(f"CIFAR-10 test batch {paths[0]} is missing")
    batches = [_load_cifar_batch(p) for p in paths]
    images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    return images, labels
