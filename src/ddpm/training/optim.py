"""The optimizer, its loss scaler and the EMA of the weights.

- ``make_optimizer(params, ...)``      Adam with the fused kernel (CUDA and CPU), else multi-tensor.
- ``make_grad_scaler(amp, device)``    a loss scaler, enabled for fp16 only.
- ``ema_update(ema, params, decay)``   one fused ``lerp_`` over all tensors (EMA of the weights).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..core.device import AMP_MODES, Amp, device_type


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
    return torch.amp.GradScaler(device_type(device), enabled=amp == "fp16")


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
