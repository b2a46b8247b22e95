"""Many samples from a trained run, batch by batch: what ``ddpm sample`` and ``ddpm eval`` draw.

``ddpm.sample`` draws one batch. Here a request for ``num`` samples (64 for a grid, 50,000 for
FID) is cut into batches, each with the per-sample seeds ``per_sample_seeds(seed, n, offset=start)``,
so sample i depends only on (seed, i) and never on the batch size (EDM's convention). The sampler
settings default to the run's own preview settings (``config.sample``), so that ``ddpm sample RUN``
and ``ddpm eval toy RUN`` draw what the trainer previewed unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import accel
from .samplers import default_steps, per_sample_seeds, sample


@dataclass(frozen=True)
class SamplerSettings:
    """A sampler with every default filled in, as reports record it (FID depends on each field)."""

    sampler: str
    steps: int
    eta: float = 0.0


def sampler_settings(run, sampler: str | None = None, steps: int | None = None,
                     eta: float | None = None) -> SamplerSettings:
    """Fill the unset options from the run's preview config (``run.config.sample``).

    The preview's steps and eta apply only when the sampler is the preview's own: a run that
    previews with ddim at 100 steps asked for dpm++2m gets dpm++2m's default steps, not 100.
    """
    preview = run.config.sample
    sampler = sampler or preview.sampler
    same = sampler == preview.sampler
    if steps is None:
        steps = preview.steps if same and preview.steps is not None else default_steps(sampler, run.schedule.num_timesteps)
    if eta is None:
        eta = preview.eta if same else 0.0
    return SamplerSettings(sampler, int(steps), float(eta))


@torch.no_grad()
def sample_batches(run, num: int, settings: SamplerSettings, *, seed: int = 0, batch_size: int = 256,
                   device: str | torch.device = "cpu", amp: str = "off", progress: bool = False,
                   return_trajectory: bool = False):
    """Draw ``num`` samples (num, *run.shape) as float32 on the CPU, ``batch_size`` at a time.

    ``run`` is a ``ddpm.LoadedRun`` or anything with its ``model``, ``schedule``, ``shape`` and
    ``sample_kwargs``. ``amp="bf16"`` runs the network under bf16 autocast. ``progress`` shows
    the sampler's per-step bar for a single batch and one bar over the batches otherwise (one
    bar per batch would scroll 200 bars past for a 50,000-sample FID run).
    With ``return_trajectory`` returns ``(x0, trajectory)``, the trajectory of the first batch
    as ``ddpm.sample`` gives it (on ``device``).
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    model = run.model
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    schedule = run.schedule.to(device)
    starts = range(0, num, batch_size)
    several = len(starts) > 1
    if progress and several:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sampling ({settings.sampler})", unit="batch")
    chunks, trajectory = [], None
    for start in starts:
        n = min(batch_size, num - start)
        with accel.autocast(device, amp):
            result = sample(model, schedule, (n, *run.shape), sampler=settings.sampler, steps=settings.steps,
                            eta=settings.eta, generator=per_sample_seeds(seed, n, offset=start, device=device),
                            device=device, progress=progress and not several,
                            return_trajectory=return_trajectory and start == 0, **run.sample_kwargs)
        if isinstance(result, tuple):
            result, trajectory = result
        chunks.append(result.float().cpu())
    x0 = torch.cat(chunks)
    return (x0, trajectory) if return_trajectory else x0
