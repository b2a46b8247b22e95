"""Devices and numeric precision: which device, which autocast mode, and what the host allows.

- ``pick_device(name)``                 a ``--device`` value: "auto" -> CUDA when visible, else the CPU.
- ``model_device(model, default)``     where a network's weights live (``default`` for a plain function).
- ``resolve_amp(requested, device)``   ``"auto"`` -> the fastest safe mode of the device: bf16, fp16 or off.
- ``describe_amp(amp, requested)``     how a command line says which mode it runs in.
- ``autocast(device, amp)``            bf16 or fp16 autocast on CUDA and CPU, or a no-op for ``"off"``.
- ``autocast_model(model, device, amp)`` a network called under autocast, its output back in float32.
- ``keep_freed_memory()``              glibc: stop handing freed activations back to the OS.
- ``available_memory(device)``         bytes that can be allocated now (before a large allocation).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import Literal

import torch

from ..errors import UserError

Amp = Literal["off", "bf16", "fp16"]
AMP_MODES = ("off", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc malloc.h)


def keep_freed_memory() -> bool:
    """Keep freed CPU tensor memory in the process (glibc only); True when applied.

    By default glibc serves each large allocation (an activation of a few MB) with a fresh
    ``mmap`` and unmaps it when freed, so every training step page-faults all of its activations
    in again: measured 14,000 page faults and 11% of a step of the mnist preset on a 2-core CPU.
    Raising the mmap threshold to its 32 MB maximum and the trim threshold to 1 GB lets freed
    blocks be reused, at the cost of the process keeping its peak memory. Process-wide; other
    C libraries (musl, macOS, Windows) are left alone.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def autocast(device: str | torch.device, amp: Amp = "off") -> contextlib.AbstractContextManager:
    """Context manager running matmuls/convolutions in bfloat16 (``"bf16"``) or float16 (``"fp16"``).

    bf16 keeps float32's exponent range, so no loss scaling is needed; fp16 has 3 more mantissa
    bits but overflows above 65504 and flushes small gradients to zero, so training with it needs
    ``make_grad_scaler``. It is the fast mode of GPUs without bf16 tensor cores (T4, V100).
    Parameters, gradients and optimizer state stay float32; only the activations of
    autocast-eligible ops are half precision. ``"off"`` gives a ``nullcontext``. Works for
    ``cuda`` and ``cpu`` (on CPUs without native support it is correct but slow).
    """
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp {amp!r}; choose one of {', '.join(AMP_MODES)}")
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=_AMP_DTYPES[amp])


def autocast_model(model, device: str | torch.device, amp: Amp = "off", on_call=None):
    """``model(x, *args)`` run under ``autocast(device, amp)`` with its output cast back to ``x``'s
    dtype, so that only the network runs in half precision and the arithmetic around it (a bound's
    KL terms, sums of squared predictions) stays in float32; ``on_call(batch)`` after each call
    (a progress bar's ``update``). The model itself when there is nothing to add."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp {amp!r}; choose one of {', '.join(AMP_MODES)}")
    if amp == "off" and on_call is None:
        return model

    def call(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with autocast(device, amp):
            out = model(x, *args, **kwargs)
        if on_call is not None:
            on_call(x.shape[0])
        return out.to(x.dtype)

    return call


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes in bf16 natively: AMX (``amx_bf16``) or AVX-512 BF16.

    Elsewhere bf16 autocast on the CPU converts in software and is slower than float32. Asks
    torch's cpuinfo (any OS) and falls back to the kernel's flags in /proc/cpuinfo (Linux);
    the vendor alone says nothing (AMD Zen 4 has AVX-512 BF16, many Intel CPUs have neither).
    """
    get_capabilities = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get_capabilities is not None:
        try:
            caps = get_capabilities()
            return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
        except Exception:  # cpuinfo failed to initialise: fall back to the kernel's view
            pass
    return bool({"amx_bf16", "avx512_bf16"} & _proc_cpuinfo_flags())


def _proc_cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cuda_has_native_bf16(device: str | torch.device) -> bool:
    """True for CUDA devices with bf16 tensor cores (compute capability 8.0+, or ROCm)."""
    with torch.cuda.device(torch.device(device)):
        try:
            # Without emulation: a T4 "supports" bf16 tensors, but computes them slower than fp16.
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.4: no emulation to exclude
            return bool(torch.cuda.is_bf16_supported())


def resolve_amp(requested: str, device: str | torch.device) -> Amp:
    """The autocast mode for ``requested`` (``"auto"`` or one of AMP_MODES) on ``device``.

    ``"auto"``: bf16 on CUDA devices with bf16 tensor cores, fp16 on older CUDA devices, bf16 on
    CPUs with native bf16 (``cpu_has_native_bf16``), float32 (``"off"``) everywhere else. An
    explicit mode is returned as asked.
    """
    if requested in AMP_MODES:
        return requested
    if requested != "auto":
        raise ValueError(f"unknown amp {requested!r}; choose one of auto, {', '.join(AMP_MODES)}")
    kind = device_type(device)
    if kind == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_has_native_bf16() else "off"
    return "off"


def describe_amp(amp: Amp, requested: str = "auto", *, source: str | None = None) -> str:
    """``amp`` (resolved from ``requested``) as a command line reports it, with the way out:
    ``"bf16 autocast (auto; --amp off for float32)"``, ``"float32 (--amp off)"``; ``source``
    replaces the parenthesis of an explicit mode (e.g. where a config set it)."""
    mode = "float32" if amp == "off" else f"{amp} autocast"
    if requested != "auto":
        return f"{mode} ({source or f'--amp {requested}'})"
    hint = "--amp off for float32" if amp != "off" else "no native half precision on this device"
    return f"{mode} (auto; {hint})"


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """The device a command or function runs on: ``"auto"`` is CUDA when a GPU is visible, else the
    CPU; an unknown name or CUDA asked for but absent is a ``UserError`` naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but CUDA is not available; use --device cpu or auto")
    return device


def model_device(model, default: str | torch.device = "cpu") -> torch.device:
    """The device of ``model``'s first parameter; ``default`` for a function or a network without any."""
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return param.device if param is not None else torch.device(default)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated now on ``device`` (Linux: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
