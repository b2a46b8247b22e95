"""Classifier-free guidance (Ho & Salimans 2022): one conditional network, two predictions.

Notation::

    c               a class label in 0..K-1, K = model.num_classes
    K               the null label ("no class"), on which the network was trained by dropping labels
    w               the guidance scale: w = 1 plain conditional, w = 0 unconditional, w > 1 guided
    out(x_t, t, c)  the network's output in its own parametrisation (eps, x0 or v)

The guided output is out_null + w (out_c - out_null) (Ho & Salimans eq. 6 with their w = ours - 1).
It is formed in the network's own parametrisation, which gives the same x0 and eps as guiding the
eps: for fixed x_t and t, the conversions eps <-> x0 <-> v are affine maps, and an affine map
commutes with a combination whose weights (1 - w, w) sum to one (docs/math.md, "Classifier-free
guidance"). So every sampler and every prediction type works unchanged on the wrapped model.

A network with a learned variance returns (B, 2C, ...): the first C channels are guided, the last C
(the variance interpolation) are the conditional half's, as GLIDE and improved-diffusion do.

Guidance interval (Kynkäänniemi et al. 2024): guidance pays off in the middle of the noise range
only; at high noise it pulls every sample of a class towards one mode (less variety), at low noise
it barely changes anything. ``interval_model`` applies the guided model for timesteps t in
[t_lo, t_hi] and the unguided one (plain conditional, or the model without its guide) elsewhere,
with one network call per step there.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import UserError
from ..nets.unet import batch_labels

Model = Callable[..., torch.Tensor]


def check_guidance(guidance) -> float:
    """Refuse a guidance scale that is not a finite real number."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number (1: conditional, 0: unconditional), got {guidance!r}")
    return float(guidance)


def guided_model(model: Model, labels, guidance: float, batch: int, device: torch.device | str | None = None) -> Model:
    """``model(x_t, t, labels)`` as a ``model(x_t, t)`` that returns the guided output.

    ``labels`` is a long tensor (B,) with values in 0..K (K = ``model.num_classes``, the null
    label), an int for the whole batch, or None for the null label; ``batch`` is B. With
    ``labels=None`` and ``guidance=1`` the model is returned as it is (an unconditional call).
    Otherwise the model must carry ``num_classes``. With w = 1 (or 0) the network runs once on
    the conditional (or null) labels; any other w runs both halves as one batch of 2B, so the two
    predictions share every batch-dependent numeric of the network.
    """
    w = check_guidance(guidance)
    num_classes = getattr(model, "num_classes", None)
    if labels is None and w == 1.0:
        return model
    if num_classes is None:
        what = "class labels" if labels is not None else f"guidance={guidance}"
        raise ValueError(f"{what} need a class-conditional model (one with num_classes); this model is unconditional")
    if labels is None:
        raise ValueError(f"guidance={guidance} needs class labels (labels=); without them every sample is unconditional")
    cond = batch_labels(labels, batch, num_classes, device, "the model")
    null = torch.full_like(cond, num_classes)
    if w == 1.0:
        return lambda x, t: model(x, t, cond)
    if w == 0.0:
        return lambda x, t: model(x, t, null)
    both_labels = torch.cat([cond, null])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), both_labels)
        out_c, out_null = out.to(x.dtype).chunk(2)
        return _combine(out_c, out_null, w, x)

    return guided


def _combine(out: torch.Tensor, base: torch.Tensor, w: float, x: torch.Tensor) -> torch.Tensor:
    """base + w (out - base); for a learned variance, (B, 2C, ...), only the prediction channels
    are combined and the variance channels are ``out``'s."""
    C = x.shape[1]
    if out.shape[1] == 2 * C and out.shape[2:] == x.shape[2:]:
        mixed = base[:, :C] + w * (out[:, :C] - base[:, :C])
        return torch.cat([mixed, out[:, C:]], dim=1)
    return base + w * (out - base)


def autoguided_model(model: Model, guide: Model, autoguidance: float) -> Model:
    """``model`` guided by a worse version of itself (autoguidance, Karras et al. 2024, eq. 2):
    out_guide + w (out_model - out_guide), where ``guide`` is the same network earlier in its
    training (``train.guide_at``). Both take ``(x_t, t)``: wrap each in ``guided_model`` first for
    class labels, so that the classifier-free guided outputs are what is combined.

    Unlike classifier-free guidance the two predictions come from two networks, so they run as two
    calls. w = 1 returns ``model`` itself; a learned variance keeps ``model``'s channels, as in
    ``guided_model``.
    """
    w = check_guidance(autoguidance)
    if w == 1.0:
        return model

    def autoguided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _combine(model(x, t).to(x.dtype), guide(x, t).to(x.dtype), w, x)

    return autoguided


def guide_kwargs(guide, autoguidance: float) -> dict:
    """``ddpm.sample``'s autoguidance options: none without a guide, or at scale 1."""
    return {"guide": guide, "autoguidance": autoguidance} if guide is not None and autoguidance != 1 else {}


def check_interval(interval, T: int) -> tuple[int, int] | None:
    """Refuse a guidance interval that is not two timesteps 0 <= t_lo <= t_hi <= T - 1 (None: no interval)."""
    if interval is None:
        return None
    ok = (isinstance(interval, (tuple, list)) and len(interval) == 2 and
          all(isinstance(v, int) and not isinstance(v, bool) for v in interval))
    if not ok or not 0 <= interval[0] <= interval[1] <= T - 1:
        raise ValueError(f"guidance_interval must be two model timesteps (t_lo, t_hi) with 0 <= t_lo <= t_hi <= "
                         f"{T - 1} (T - 1), got {interval!r}")
    return int(interval[0]), int(interval[1])


def resolve_interval(given, default: tuple[int, int] | None, T: int) -> tuple[int, int] | None:
    """A ``--guidance-interval`` request: ``"all"`` is every step (None), None the run's ``default``,
    else (t_lo, t_hi), refused with a one-line UserError unless 0 <= t_lo <= t_hi <= T - 1."""
    if given == "all":
        return None
    if given is None:
        return default
    lo, hi = given
    if hi > T - 1:
        raise UserError(f"--guidance-interval {lo},{hi} goes past the last timestep T - 1 = {T - 1}")
    try:
        return check_interval(tuple(given), T)
    except ValueError as exc:
        raise UserError(f"--guidance-interval: {exc}") from None


def interval_model(guided: Model, unguided: Model, interval: tuple[int, int]) -> Model:
    """``guided`` for timesteps t in [t_lo, t_hi] (inclusive, 0-based model timesteps), ``unguided``
    elsewhere (Kynkäänniemi et al. 2024). A batch whose timesteps straddle an end of the interval
    (no sampler here makes one) evaluates both and picks per sample."""
    lo, hi = interval

    def in_interval(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = (t >= lo) & (t <= hi)
        if bool(inside.all()):
            return guided(x, t)
        if not bool(inside.any()):
            return unguided(x, t)
        a, b = guided(x, t).to(x.dtype), unguided(x, t).to(x.dtype)
        return torch.where(inside.view(-1, *([1] * (a.ndim - 1))), a, b)

    return in_interval
