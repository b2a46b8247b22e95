"""Class labels of a data source: checked on the way in, counted for a class-conditional run.

Every source has ``.labels``, a LongTensor (N,) of class indices 0..K-1 aligned with its items,
or None; ``.class_names``, K names or None; and ``get_batch_labels(indices) -> (B,)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import UserError


def check_labels(labels, n: int, where: str) -> torch.Tensor:
    """``labels`` as a LongTensor (n,) after checking: integers, one per item, all >= 0."""
    array = np.asarray(labels)
    if array.dtype.kind not in "iu":
        raise UserError(f"{where}: labels must be integers, got dtype {array.dtype}")
    if array.shape != (n,):
        raise UserError(f"{where}: labels have shape {array.shape}, expected ({n},): one per image")
    if n and array.min() < 0:
        raise UserError(f"{where}: labels must be >= 0, found {array.min()}")
    return torch.from_numpy(array.astype(np.int64))


def check_class_names(names, labels: torch.Tensor, where: str) -> list[str]:
    names = [str(name) for name in names]
    if len(labels) and int(labels.max()) >= len(names):
        raise UserError(f"{where}: label {int(labels.max())} has no class name ({len(names)} names)")
    return names


def require_labels(source, purpose: str = "a class-conditional run") -> int:
    """The number of classes K of ``source`` (its labels lie in 0..K-1): ``len(class_names)`` when
    it names them, else the largest label + 1. A source without labels raises a one-line UserError."""
    labels = getattr(source, "labels", None)
    if labels is None:
        # A source that knows where its labels may be says so (hf: an integer column it did not detect).
        hint = getattr(source, "labels_hint", None) or (
            "mnist, cifar10:DIR, folder:DIR with one sub-folder per class, npz:FILE with a 'labels' array, or "
            "hf:NAME with a label column (--label-column)")
        raise UserError(f"data source {getattr(source, 'name', source)} has no labels; {purpose} needs labelled "
                        f"data: {hint}")
    names = getattr(source, "class_names", None)
    return len(names) if names else int(labels.max()) + 1


class Labelled:
    """``labels`` (LongTensor (N,) or None), ``class_names`` and ``get_batch_labels``."""

    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    labels_hint: str | None = None  # without labels: how this source could have them (require_labels says it)

    def get_batch_labels(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Labels (B,) int64 of the items that ``get_batch(indices)`` returns."""
        require_labels(self)
        return self.labels[torch.as_tensor(indices, dtype=torch.long)]
