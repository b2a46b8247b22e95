"""Data order and batches ahead of the training step: background fetching and pinned copies.

``IndexStream`` makes the data order a pure function of the micro-batch number ``j`` (so a
resumed or multi-process run needs no iterator state). The trainer therefore knows which items
micro-batch ``j`` holds long before it needs them, and ``Prefetcher`` keeps the next ``depth``
batches in flight:

- host side: ``fetch(indices)`` (indexing an in-memory tensor, or decoding image files for a
  ``folder:`` source) runs on ``workers`` background threads; torch indexing and PIL decoding
  release the GIL, so a thread overlaps them with the training step. ``workers=0`` fetches in
  the calling thread, in order, which is what a CPU run wants (no core is idle there).
- device side (CUDA): each batch is copied into one of ``depth`` page-locked buffers allocated
  once and reused, then sent with ``non_blocking=True``, so the host never waits for the copy
  and the GPU never waits for the host. A buffer is reused only after the CUDA event recorded
  behind its previous copy has fired. (Pinning a fresh tensor every step instead costs a
  page-locking system call per step: measured about 10x slower GPU training.)

Batches come back in the order asked for and bit-identical to ``fetch(indices)``, so resuming
and multi-process runs stay exact whatever ``workers`` and ``depth`` are.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

__all__ = ["IndexStream", "Prefetcher"]


class IndexStream:
    """Data order: the concatenation of per-epoch permutations of 0..N-1, cut into global
    micro-batches. Micro-batch j (counted from the start of training) covers stream positions
    [j*b, (j+1)*b), so the data-order state is just j and resuming needs no iterator state."""

    def __init__(self, n: int, micro_batch: int, seed: int):
        self.n, self.micro_batch, self.seed = n, micro_batch, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def batch(self, j: int) -> torch.Tensor:
        pos = torch.arange(j * self.micro_batch, (j + 1) * self.micro_batch)
        epochs, offsets = pos // self.n, pos % self.n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            mask = epochs == e
            out[mask] = self._permutation(e)[offsets[mask]]
        return out


class Prefetcher:
    """``get(j)`` returns micro-batch ``j`` on ``device``, with ``j + 1 .. j + depth - 1`` started.

    ``indices_of(j)`` names the items of micro-batch ``j``; it is called in the caller's thread
    (index streams cache permutations and are not thread-safe). ``fetch(indices)`` returns them
    as a CPU tensor, or a tuple of CPU tensors (images and their class labels), which ``get``
    returns as a tuple on ``device``. Use as a context manager (or call ``close``) to stop the
    worker threads.
    """

    def __init__(self, indices_of: Callable[[int], torch.Tensor], fetch: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str = "cpu", *, workers: int = 0, depth: int = 2):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.indices_of, self.fetch = indices_of, fetch
        self.device = torch.device(device)
        self.depth = depth
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ddpm-data") if workers else None
        self._pending: dict[int, Future] = {}
        self._buffers: list[torch.Tensor | None] = [None] * depth  # pinned, per slot: the images
        self._more_buffers: dict[tuple[int, int], torch.Tensor] = {}  # (slot, part): further parts (labels)
        self._events: list = [None] * depth

    def _start(self, j: int) -> None:
        if self._pool is not None and j not in self._pending:
            self._pending[j] = self._pool.submit(self.fetch, self.indices_of(j))

    def get(self, j: int) -> torch.Tensor:
        for k in range(j, j + self.depth):
            self._start(k)
        # Batches behind j (a restart at an earlier j) are never collected: drop them.
        for stale in [k for k in self._pending if k < j]:
            self._pending.pop(stale).cancel()
        future = self._pending.pop(j, None)
        host = future.result() if future is not None else self.fetch(self.indices_of(j))
        if self.device.type != "cuda":  # pinned buffers only pay off for host-to-GPU copies
            return tuple(h.to(self.device) for h in host) if isinstance(host, tuple) else host.to(self.device)
        return self._to_device_async(j % self.depth, host)

    def _to_device_async(self, slot: int, host: torch.Tensor | tuple) -> torch.Tensor | tuple:
        parts = host if isinstance(host, tuple) else (host,)
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the previous copies out of this slot's buffers have finished
        out = []
        for i, part in enumerate(parts):  # one buffer per slot and part (images, labels)
            buf = self._buffers[slot] if i == 0 else self._more_buffers.get((slot, i))
            if buf is None or buf.shape != part.shape or buf.dtype != part.dtype:
                buf = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
                if i == 0:
                    self._buffers[slot] = buf
                else:
                    self._more_buffers[(slot, i)] = buf
            buf.copy_(part)
            out.append(buf.to(self.device, non_blocking=True))
        event = torch.cuda.Event()
        event.record()
        self._events[slot] = event
        return tuple(out) if isinstance(host, tuple) else out[0]

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
