"""Fast paths for running a network: channels_last weights, ``torch.compile``, CUDA-graph replay.

Each is optional and the identity (or eager execution) when switched off or unavailable:

- ``prefers_channels_last(model)``     whether NHWC weights speed this network up (its width decides).
- ``prepare_model(model, ...)``        channels_last weights and/or ``torch.compile``, in place.
- ``GraphedModel(model)``              CUDA-graph replay of ``model(x_t, t)`` for sampling loops.
"""

from __future__ import annotations

import torch
from torch import nn

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
