"""What stops a training run from outside: signals, exhausted memory or disk, unwritable paths.

- ``stop_signals()``: the first SIGINT (Ctrl-C), SIGTERM (schedulers: SLURM, Kubernetes,
  preemptible clouds, ``kill``) or SIGHUP (the terminal went away) only records its number; the
  loop finishes the step in flight, saves a checkpoint and raises ``TrainingInterrupted``,
  which the CLI turns into exit code 128 + the signal number (130, 143, 129), the code a shell
  reports for a process ended by that signal. A second Ctrl-C stops at once; a repeated
  SIGTERM/SIGHUP is ignored so that it cannot cut the save short (a scheduler's SIGKILL ends
  the process anyway).
- ``check_memory(config, device)``: a batch whose noise alone exceeds the memory available is
  refused before anything is allocated (a batch of 1e9 would otherwise start allocating).
- ``resource_errors()``: out-of-memory errors of torch or Python and OSErrors that mean a full
  disk, a read-only file system or missing permissions become a one-line UserError.
- ``lost_peers(world, run_dir)``: under torchrun, a collective that fails because another rank
  died (``kill -9``, the OOM killer, a lost node) becomes a one-line UserError naming the run to
  resume, instead of a traceback from inside the backward pass.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading

import torch
import torch.distributed as dist

from ..config import item_shape
from ..core.device import available_memory
from ..errors import UserError, first_line
from ..io.files import RESOURCE_ERRNOS

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                     if s is not None)


@contextlib.contextmanager
def stop_signals():
    """Yield ``flag``: ``flag[0]`` becomes the number of the first stop signal received."""
    flag: list[int | None] = [None]
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield flag
        return

    def handler(signum, frame):
        if flag[0] is None:
            flag[0] = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def check_memory(config, device: torch.device) -> None:
    """Refuse a global batch whose float32 noise alone (drawn whole each step) cannot fit."""

    shape = item_shape(config)
    numel = math.prod(shape)
    size = config.data.image_size  # the data is resized to it before its shape is compared
    if size is not None and len(shape) == 3:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        numel = max(numel, (config.data.channels or shape[0]) * h * w)
    need = config.train.batch_size * numel * 4
    free = available_memory(device)
    if free is not None and need > free:
        raise UserError(f"batch_size {config.train.batch_size} of items of {numel} values needs {need / 1e9:.3g} GB "
                        f"for one batch of noise alone, but {free / 1e9:.3g} GB are available on {device}; "
                        f"lower train.batch_size or the image size")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("not enough memory", "can't allocate memory", "out of memory", "DefaultCPUAllocator"))


@contextlib.contextmanager
def resource_errors(what: str):
    """Turn exhausted memory/disk and unwritable paths inside the block into one-line UserErrors."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise UserError(f"{what} ran out of memory ({first_line(exc)[:200]}); lower train.batch_size, the image size or "
                        f"the model size") from None
    except OSError as exc:
        if exc.errno not in RESOURCE_ERRNOS:
            raise
        where = f" {exc.filename}:" if exc.filename else ""
        raise UserError(f"{what}:{where} {exc.strerror or exc}") from None


# What the gloo and NCCL backends say when the other end of a collective has gone away.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket Timeout",
              "timed out", "Timeout", "NCCL communicator was aborted", "ProcessGroup")


@contextlib.contextmanager
def lost_peers(world: int, run_dir):
    """Turn a failed collective of a ``world``-rank run into one line (see the module docstring)."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError and DistNetworkError are RuntimeErrors
        text = str(exc)
        if world <= 1 or not (isinstance(exc, getattr(dist, "DistError", ())) or any(s in text for s in _PEER_GONE)):
            raise
        said = first_line(exc).rpartition("] ")[2].partition(". ")[0][:160]  # gloo: "[file:line] Read error ...: ..."
        raise UserError(f"another process of this {world}-rank run stopped or became unreachable ({said}); the "
                        f"newest complete checkpoint in {run_dir} is intact: relaunch with --resume") from None
