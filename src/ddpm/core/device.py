"""Fast paths shared by training, sampling and the benchmarks.

Everything here is optional: each function is the identity (or eager execution) when its fast
path is switched off or unavailable, so callers can pass user flags straight through.

- ``resolve_amp(requested, device)``   ``"auto"`` -> the fastest safe mode of the device: bf16, fp16 or off.
- ``describe_amp(amp, requested)``     how a command line says which mode it runs in.
- ``prefers_channels_last(model)``     whether NHWC weights speed this network up (its width decides).
- ``autocast(device, amp)``            bf16 or fp16 autocast on CUDA and CPU, or a no-op for ``"off"``.
- ``make_grad_scaler(amp, device)``    a loss scaler, enabled for fp16 only.
- ``prepare_model(model, ...)``        channels_last weights and/or ``torch.compile``, in place.
- ``ema_update(ema, params, decay)``   one fused ``lerp_`` over all tensors (EMA of the weights).
- ``make_optimizer(params, ...)``      Adam with the fused kernel (CUDA and CPU), else multi-tensor.
- ``GraphedModel(model)``              CUDA-graph replay of ``model(x_t, t)`` for sampling loops.
- ``keep_freed_memory()``              glibc: stop handing freed activations back to the OS.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from pathlib import Path
from typing import Iterable, Literal

import torch
from torch import nn

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


def _device_type(device: str | torch.device) -> str:
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
    return torch.autocast(device_type=_device_type(device), dtype=_AMP_DTYPES[amp])


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
    kind = _device_type(device)
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


# Measured on this project's 2-core AVX-512 BF16 CPU, one sampling forward pass (process CPU
# time, layouts alternated, torch 2.x, 1 thread). bf16 autocast: NHWC weights take 2.5x as long for
# the `tiny` U-Net (ch 8), 1.8x for `mnist` (ch 16), 1.3x at ch 32, 1.0x at ch 64 and 0.96-0.98x
# for `cifar10` (ch 128). float32: within noise for tiny and mnist (0.84-1.06x across repeats),
# 1.0x at ch 64, 0.95-0.97x for cifar10. So NHWC only from ch 64 up, where it is never slower:
# narrow layers are memory-bound and oneDNN's bf16 NHWC kernels add reorders they cannot repay.
CHANNELS_LAST_MIN_WIDTH = 64


def prefers_channels_last(model: nn.Module) -> bool:
    """True when ``model``'s first convolution is at least ``CHANNELS_LAST_MIN_WIDTH`` wide (the
    U-Net's base width ``ch``): then channels_last is at least as fast; narrower nets lose."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first is not None and first.out_channels >= CHANNELS_LAST_MIN_WIDTH


def make_grad_scaler(amp: Amp, device: str | torch.device) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler`` for ``device``, enabled only under ``amp="fp16"``.

    Use it unconditionally (``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``):
    disabled, each call is a pass-through. Enabled, the loss is multiplied by a scale that keeps
    fp16 gradients from flushing to zero; a step whose gradients hold inf/NaN is skipped and the
    scale halved, which shows as ``get_scale()`` dropping in ``update()``. Its ``state_dict()``
    belongs in checkpoints so that a resumed run continues with the same scale.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp {amp!r}; choose one of {', '.join(AMP_MODES)}")
    return torch.amp.GradScaler(_device_type(device), enabled=amp == "fp16")


def prepare_model(
    model: nn.Module,
    *,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
) -> nn.Module:
    """Apply the chosen fast paths to ``model`` in place and return it.

    ``channels_last`` stores 4-D conv weights as NHWC, which cuDNN and oneDNN convolve fastest
    (tensor cores want channels innermost); activations follow the weights' layout. ``compile``
    uses ``nn.Module.compile`` (in place), so ``state_dict()`` keys keep their names, unlike the
    ``_orig_mod.`` wrapper that ``torch.compile(model)`` returns. ``compile_mode`` is passed to
    torch.compile (e.g. ``"max-autotune"``; leave ``"reduce-overhead"`` out when the model is
    also wrapped in ``GraphedModel``).
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile(mode=compile_mode)
    return model


@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float,
               keep: torch.Tensor | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * param for every pair, in one multi-tensor kernel.

    ``lerp_(ema, param, w)`` computes ``ema + w * (param - ema)``, which equals the EMA update
    with ``w = 1 - decay``. Tensors are paired in order; shapes, dtypes and devices must match.
    ``keep`` (a 0-d tensor on the tensors' device, 1 or 0) scales the weight without a host sync:
    0 leaves the average unchanged (a skipped training step), 1 gives the plain update bit for bit.
    """
    ema_list = [p.detach() if isinstance(p, nn.Parameter) else p for p in ema_params]
    param_list = [p.detach() for p in params]
    if len(ema_list) != len(param_list):
        raise ValueError(f"ema_update: {len(ema_list)} EMA tensors for {len(param_list)} parameters")
    if ema_list:
        weight = 1.0 - float(decay) if keep is None else keep * (1.0 - float(decay))
        torch._foreach_lerp_(ema_list, param_list, weight)


def make_optimizer(
    params: Iterable[torch.Tensor],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Adam (AdamW when ``weight_decay > 0``) with the fused kernel: one pass over parameters,
    gradients and moments instead of one per elementwise op (measured 10x faster than
    ``foreach`` for the CIFAR-10 U-Net on a CPU). Falls back to multi-tensor ``foreach`` where
    this torch has no fused kernel for the parameters' device. Numerically the textbook update."""
    params = [p for p in params if p.requires_grad]
    cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # e.g. CPU parameters on torch < 2.4
        return cls(params, foreach=True, **kwargs)


def _autocast_state(device_type: str) -> tuple:
    try:
        return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    except TypeError:  # torch < 2.4: no per-device query
        return (torch.is_autocast_enabled(), None)


class GraphedModel(nn.Module):
    """Wrap ``model(x_t, t)`` so that on CUDA each new (shape, dtype, autocast) signature is
    captured once into a CUDA graph and replayed afterwards; on CPU it simply calls the model.

    A sampling step launches hundreds of small kernels; replaying a graph launches them with one
    host call, so the GPU never waits for Python. Usable by every sampler (it is a callable with
    the model's signature). Constraints of graph replay:

    - inference only: capture and replay run under ``torch.no_grad()``; outputs carry no grad;
    - the autocast mode active at the first call of a signature is baked into its graph (the
      autocast state is part of the cache key, so switching mode captures a new graph);
    - inputs are copied into static buffers, so any tensors with the captured shape may be passed;
    - ``clone_output=True`` (default) returns a fresh tensor; with ``False`` the returned tensor
      is the graph's static output, overwritten by the next call with the same signature — only
      safe when the caller consumes it before calling again (all samplers here do).
    - the model's weights must not be reassigned (in-place updates are fine: the graph reads
      the same storage).
    """

    def __init__(self, model: nn.Module, *, warmup: int = 3, clone_output: bool = True):
        super().__init__()
        self.model = model
        self.warmup = warmup
        self.clone_output = clone_output
        self._graphs: dict[tuple, tuple] = {}

    def __getattr__(self, name: str):
        # Let callers read attributes such as ``config`` of the wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return self.model(x, t)
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, x.device, x.is_contiguous(), _autocast_state("cuda"))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x, t)
            self._graphs[key] = entry
        graph, static_x, static_t, static_out = entry
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        return static_out.clone() if self.clone_output else static_out

    @torch.no_grad()
    def _capture(self, x: torch.Tensor, t: torch.Tensor) -> tuple:
        static_x, static_t = x.clone(), t.clone()
        # Warm up on a side stream (cuDNN autotuning, lazy init, torch.compile) before capture,
        # as the CUDA-graph docs require.
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.model(static_x, static_t)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        # Each graph gets its own memory pool: a shared pool could hand one graph's temporaries
        # to another graph's static output, which a replay of the first would then overwrite.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model(static_x, static_t)
        return graph, static_x, static_t, static_out

    def reset(self) -> None:
        """Drop all captured graphs (e.g. after replacing the model's parameter tensors)."""
        self._graphs.clear()
