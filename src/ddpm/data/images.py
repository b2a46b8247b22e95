"""Images as the data sources hold them: uint8 (or float) tensors mapped to [-1, 1], resized to
cover a size and centre-cropped, converted between grey, RGB and RGBA; images decoded with PIL
when indexed (``PILSource``, the base of folder and Hugging Face sources).

Every image file this package opens goes through ``read_image`` (or ``check_image_file``, which
a folder source runs on each file before training): a file that is not an image, one cut short,
or one whose header claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (a decompression bomb:
a few kB that would decode to gigabytes) is a one-line UserError naming it, never a traceback.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path
from typing import IO, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..core.shapes import image_hw
from ..errors import UserError
from .labels import Labelled

CHANNELS = (1, 3, 4)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # what an image folder may hold (data, FID)
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes read as 1 channel when none is asked


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 [-1, 1] (x / 127.5 - 1, inverted exactly by ``viz.to_uint8``)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 127.5 - 1.0
    return x.to(torch.float32)


def fit_size(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W): scaled to cover (H, W) (for a square size: the shorter side
    resized to S), then centre-cropped.

    Resizing uses antialiased bilinear interpolation on float32 values, in chunks so that a whole
    data set never exists in float32 at the new size; uint8 input comes back rounded to uint8 so
    that large data sets stay compact in memory.
    """
    n, c, h, w = x.shape
    H, W = hw
    scale = max(H / h, W / w)
    if scale != 1:
        new_hw = (max(H, round(h * scale)), max(W, round(w * scale)))
        chunks = []
        for part in x.split(1024):
            y = F.interpolate(part.to(torch.float32), size=new_hw, mode="bilinear",
                              antialias=True, align_corners=False)
            chunks.append(y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y)
        x = torch.cat(chunks)
        h, w = new_hw
    top, left = (h - H) // 2, (w - W) // 2
    return x[:, :, top:top + H, left:left + W].contiguous()


def convert_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """(N, C, H, W) with C in {1, 3, 4} -> ``channels`` channels: grey is repeated, colour becomes
    ITU-R 601 luma, alpha is dropped, or added as opaque (255, or 1 for floats in [-1, 1])."""
    c = x.shape[1]
    if channels is None or channels == c:
        return x
    rgb = x.expand(-1, 3, -1, -1) if c == 1 else x[:, :3]
    if channels == 1:
        # PIL's "L" conversion weights (which also ignores alpha), so that folder and array sources
        # agree; they sum to 1, so the same weights are right for float values in [-1, 1].
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        y = (rgb.to(torch.float32) * weights).sum(1, keepdim=True)
        return y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y
    if channels == 3:
        return rgb.contiguous()
    opaque = torch.full_like(x[:, :1], 255 if x.dtype == torch.uint8 else 1)
    return torch.cat([rgb, opaque], dim=1)


class PILSource(Labelled, Dataset):
    """Images decoded with PIL when indexed, resized to cover ``hw`` and centre-cropped.

    Subclasses (``FolderSource``, ``ddpm.data.hf.HFSource``) implement ``_image(index)``, returning
    a PIL image, and call ``_set_shape`` in their constructor.
    """

    kind = "image"

    def _image(self, index: int):
        raise NotImplementedError

    def _set_shape(self, image_size, channels: int | None) -> None:
        """Without ``image_size``: the square of the first image's shorter side; without
        ``channels``: 1 for a grey first image, else 3 (RGB, dropping any alpha)."""
        if channels not in (None, *CHANNELS):
            raise UserError(f"channels must be 1, 3 or 4, got {channels!r}")
        first = self._image(0) if image_size is None or channels is None else None
        self.hw = (min(first.size),) * 2 if image_size is None else image_hw(image_size)
        self.channels = channels or (1 if first.mode in _GREY_MODES else 3)
        self.shape = (self.channels, *self.hw)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._image(index)
        if image.mode in ("I", "I;16", "F") and self.channels == 1:
            # 16-bit/float greys: PIL's "L" conversion clips; scale the range to 8 bits first.
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode != "F" else max(float(array.max()), 1.0)
            pixels = np.round(array / top * 255.0).astype(np.uint8)[None]
        else:
            pixels = np.asarray(image.convert(_PIL_MODES[self.channels]), dtype=np.uint8)
            pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        x = fit_size(torch.from_numpy(pixels.copy())[None], self.hw)[0]
        return to_unit_range(x)

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in torch.as_tensor(indices).tolist()])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, shape={self.shape})"


# What PIL's decoders raise on a damaged or crafted file, besides OSError (UnidentifiedImageError too).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error, zlib.error)
# Image.open's own refusal past 2 x MAX_IMAGE_PIXELS, and its warning past 1 x, which the CLI turns
# into an error (``ddpm.cli.main``): both are too large.
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk that closes every PNG


def _too_large(name, pixels: int) -> UserError:
    return UserError(f"image {name} is too large to decode safely: {pixels:,} pixels, past the limit of "
                     f"{Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS); a decompression bomb?")


def _bomb_pixels(exc: Exception) -> int:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return int(found.group(1)) if found else 0


def _open_checked(source: str | os.PathLike | IO[bytes], name) -> Image.Image:
    """``Image.open`` (the header only) with the size checked before any pixel is decoded."""
    try:
        image = Image.open(source)
    except _BOMB as exc:
        raise _too_large(name, _bomb_pixels(exc)) from None
    except _DECODE_ERRORS as exc:
        raise UserError(f"cannot read image {name}: {_reason(exc)}") from None
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise _too_large(name, width * height)
    return image


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (or a format PIL does not read)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def read_image(source: str | os.PathLike | IO[bytes], name=None) -> Image.Image:
    """A PIL image, fully decoded, from a file (or a file object, with ``name`` to call it by in
    messages); see the module docstring for what is refused."""
    name = source if name is None else name
    image = _open_checked(source, name)
    try:
        image.load()
    except _BOMB as exc:  # (formats whose frames are sized only when decoded)
        image.close()
        raise _too_large(name, _bomb_pixels(exc)) from None
    except _DECODE_ERRORS as exc:
        image.close()
        raise UserError(f"cannot read image {name}: {_reason(exc)}") from None
    return image


def check_image_file(path: Path) -> None:
    """What can be told without decoding: that ``path`` is an image PIL identifies, within the size
    limit, and, for a PNG, not cut short (it ends with its IEND chunk). A data source runs this on
    every file before training, so that a bad file stops the run at its start, named; damage
    inside a file is found when it is decoded (``read_image``), also as one line naming it."""
    with _open_checked(path, path) as image:
        png = image.format == "PNG"
    if png:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 1024))
            tail = f.read()
        if _PNG_END not in tail:  # (data after IEND is tolerated, as PIL does)
            raise UserError(f"cannot read image {path}: it is truncated (no IEND chunk at its end)")
