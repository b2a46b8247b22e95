"""Previews of a model during training: sample grids from the EMA weights in RUN/samples/, drawn
with the run's own sampling options (``preview_kwargs``, which periodic evaluation uses too).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainConfig, item_shape, sample_kwargs
from ..core import device as accel
from ..evaluation import viz
from ..io.files import own_dir
from ..sampling.guidance import guide_kwargs
from ..sampling.samplers import sample


def preview_kwargs(config: TrainConfig) -> dict:
    """The run's sampling options for previews and periodic evaluation; an analytic variance has no
    table before ``ddpm analytic`` estimates one after training, so they use fixed_small meanwhile."""
    kwargs = sample_kwargs(config)
    if kwargs["variance"] == "analytic":
        kwargs["variance"] = "fixed_small"
    return kwargs


def save_preview(model, schedule, config: TrainConfig, path: Path, *, device: torch.device, amp: str,
                 guide=None) -> None:
    """A grid (images) or scatter plot (2-D points) of ``config.sample`` samples from ``model``,
    seeded by ``train.seed``, so that previews of successive steps show the same noise; autoguided
    by ``guide`` (``train.guide_at``) with ``sample.autoguidance`` once the run has kept one; both
    guidances only in ``sample.guidance_interval`` when one is set."""

    s, shape = config.sample, item_shape(config)
    n = s.num if len(shape) == 1 else min(s.num, 64)
    num_classes, per_class, cond = config.model.num_classes, None, {}
    if num_classes is not None:
        # One row per class, every class (up to 64) even when sample.num is smaller, guided by
        # sample.guidance: sample i has label i // per_class, as `ddpm sample RUN --class all` draws
        # them. One sample per class is laid out as one row of classes, not a column of them.
        rows = min(num_classes, 64)
        per_class = max(1, n // rows)
        n = rows * per_class
        cond = {"labels": torch.arange(rows, device=device).repeat_interleave(per_class), "guidance": s.guidance}
    with torch.no_grad(), accel.autocast(device, amp):
        x0 = sample(model, schedule, (n, *shape), sampler=s.sampler, steps=s.steps, eta=s.eta,
                    generator=config.train.seed, device=device, **preview_kwargs(config), **cond,
                    **guide_kwargs(guide, s.autoguidance), guidance_interval=s.guidance_interval)
    own_dir(path.parent)  # RUN/samples: a link there is refused, not written through
    x0 = x0.float().cpu()
    nrow = per_class if per_class != 1 else len(x0)
    viz.save_scatter(x0, path) if len(shape) == 1 else viz.save_grid(x0, path, nrow=nrow)
