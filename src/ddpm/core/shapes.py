"""Image sizes as every layer spells them: ``image_size`` S (square) or (H, W)."""

from __future__ import annotations

import numbers


def image_hw(size) -> tuple[int, int]:
    """An ``image_size`` as (H, W): an int S is the square (S, S), a 2-sequence is (H, W) as given.

    Raises ValueError for anything else (a bool, a non-positive or non-integer value, a wrong length).
    """
    pair = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in pair):
        raise ValueError(f"image_size must be a positive integer or a pair (H, W) of them, got {size!r}")
    return int(pair[0]), int(pair[1])
