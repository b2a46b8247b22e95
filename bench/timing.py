"""Measurement helpers for the benchmarks: synchronised timing, interleaved (ABAB) repetitions with
medians, peak memory, FLOP counts and the bf16 matrix-multiply peak of the device.

The CPU of a shared machine is noisy, so contestants are measured in alternation (A B A B ...)
and each reports the median of its repetitions: a slow spell then hits both sides alike.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, iters: int = 1) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per call of ``fn``, averaged over ``iters`` back-to-back
    calls (device-synchronised). On a CPU shared with other jobs the CPU time of a one-thread run
    counts only the cycles the work itself got, so it is the steadier measure there."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters, (time.process_time() - cpu_start) / iters


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, reps: int, iters: int = 1,
                warmup: int = 1) -> tuple[dict[str, dict], dict[str, str]]:
    """Per function: median wall-clock and CPU seconds per call, measured A B A B ... ``reps``
    times, and all wall-clock samples; and the error of each function that failed during its
    warm-up (it is then left out).

    Every function first runs ``warmup`` times (compilation, autotuning, allocator growth), using
    its ``.warm`` attribute when it has one (a cheaper call on the same shapes).
    """
    errors: dict[str, str] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                getattr(fn, "warm", fn)()
            sync(device)
        except Exception as e:  # one contestant's failure (a mode this torch cannot do) spares the rest
            errors[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    live = {name: fn for name, fn in fns.items() if name not in errors}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in live}
    for _ in range(reps):
        for name, fn in live.items():
            samples[name].append(time_call(fn, device, iters))
    out = {
        name: {"wall": statistics.median(w for w, _ in v), "cpu": statistics.median(c for _, c in v),
               "wall_samples": [round(w, 4) for w, _ in v]}
        for name, v in samples.items()
    }
    return out, errors


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    # Writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    # Return freed heap pages to the OS so that the RSS before a run counts live data only.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float | None, str]:
    """Peak memory (bytes) while ``fn`` runs once, and what the number means.

    CUDA: ``torch.cuda.max_memory_allocated`` (weights, gradients, optimizer state and activations).
    CPU: peak resident set size during the call minus the RSS just before it (after
    ``malloc_trim``), i.e. the working memory on top of the resident weights and optimizer state;
    ``None`` where /proc cannot reset the peak.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device)), "max_memory_allocated"
    _malloc_trim()
    before = _proc_status_kib("VmRSS")
    if before is None or not _reset_rss_peak():
        fn()
        return None, "n/a"
    fn()
    peak = _proc_status_kib("VmHWM")
    return float(max(peak - before, 0) * 1024), "peak RSS increase"


# ---------------------------------------------------------------------------------------------
# FLOPs and the matmul ceiling
# ---------------------------------------------------------------------------------------------

def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of matmuls, convolutions and attention executed by ``fn`` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """Measured dense bf16 matrix-multiply rate (TFLOP/s) on random operands: the MFU ceiling."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        times.append(time_call(lambda: a @ b, device)[0])
    return 2 * n**3 / statistics.median(times) / 1e12
