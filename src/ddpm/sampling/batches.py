"""Many samples from a trained run, batch by batch: what ``ddpm sample`` and ``ddpm eval`` draw.

``ddpm.sample`` draws one batch. Here a request for ``num`` samples (64 for a grid, 50,000 for
FID) is cut into batches, each with the per-sample seeds ``per_sample_seeds(seed, n, offset=start)``,
so sample i depends only on (seed, i) and never on the batch size (EDM's convention). The sampler
settings default to the run's own preview settings (``config.sample``), so that ``ddpm sample RUN``
and ``ddpm eval toy RUN`` draw what the trainer previewed unless told otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..core import device as accel
from ..core import threads as cpu_threads
from ..core.noise import logical_shift_right, mix64, per_sample_seeds
from ..errors import UserError
from .samplers import default_steps, sample


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
    distilled = run.config.distill
    if distilled is not None and (sampler, int(steps), float(eta)) != ("ddim", distilled.steps, 0.0):
        raise UserError(f"{run.path} is distilled for {distilled.steps} deterministic DDIM steps (its default), not "
                        f"{sampler} with {steps} steps and eta {eta:g}: distil the teacher again for another count")
    return SamplerSettings(sampler, int(steps), float(eta))


def uniform_labels(seed: int, num: int, num_classes: int, offset: int = 0) -> torch.Tensor:
    """Labels of samples offset..offset+num-1, each uniform over 0..num_classes-1 and a function of
    its own per-sample seed alone (as the sample's noise is): LongTensor (num,).

    Label i is floor(K u_i) with u_i the top 32 bits of splitmix64 of seed i, a key that none of the
    sample's noise draws uses (``gaussian_noise`` keys draw d with (d + 1) G).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    u = logical_shift_right(mix64(per_sample_seeds(seed, num, offset)), 32)  # uniform on 0..2^32-1
    return (u * num_classes) >> 32  # < 2^63: no overflow for any K < 2^31


# float32 copies of one batch that every sampler holds at once (x_t, the model's output, x0, the
# noise and the next x_t): a floor under the true need, which adds the network's activations.
_WORKING_COPIES = 5


def check_sampling_memory(num: int, batch: int, shape: tuple, device) -> None:
    """Refuse, in one line, ``num`` samples of ``shape`` drawn ``batch`` at a time that cannot fit:
    the samples kept on the CPU plus the sampler's working copies of one batch. ``shape`` may come
    from a file (a run's config, a checkpoint's metadata), so this runs before any allocation."""
    numel = math.prod(shape)
    device = torch.device(device)
    need_host = num * numel * 4 + (batch * numel * 4 * _WORKING_COPIES if device.type == "cpu" else 0)
    need_device = batch * numel * 4 * _WORKING_COPIES
    for where, need in ((torch.device("cpu"), need_host), (device, need_device)):
        free = accel.available_memory(where)
        if need and free is not None and need > free:
            raise UserError(f"{num} samples of shape {tuple(shape)} ({batch} at a time) need at least "
                            f"{need / 1e9:.3g} GB on {where.type}, but {free / 1e9:.3g} GB are available; lower "
                            f"--num or --batch-size (or check the run's image size)")
        if where == device:
            break


@torch.no_grad()
def sample_batches(run, num: int, settings: SamplerSettings, *, seed: int = 0, batch_size: int = 256,
                   device: str | torch.device = "cpu", amp: str | None = None, progress: bool | None = None,
                   return_trajectory: bool = False, labels: torch.Tensor | None = None, guidance: float = 1.0,
                   autoguidance: float | None = None, guidance_interval: tuple[int, int] | None = None):
    """Draw ``num`` samples (num, *run.shape) as float32 on the CPU, ``batch_size`` at a time.

    ``run`` is a ``ddpm.LoadedRun`` (``ddpm.load``'s, or one built around a network in training,
    as periodic evaluation does). The network runs under the autocast mode ``amp``: by default the
    run's own (``run.amp``, which ``ddpm.load`` chose for its device), else ``"auto"`` or one of ``accel.AMP_MODES``. The sampler's own updates stay float32 whatever
    the mode (``ddpm.sampling.samplers``: the model's output is cast back to the working dtype).
    ``progress`` shows one bar over every step of every batch, with images/s: True always, False
    never, None (default) when stderr is a terminal, so logs and captured output stay clean.
    With ``return_trajectory`` returns ``(x0, trajectory)``, the trajectory of the first batch
    as ``ddpm.sample`` gives it (on ``device``). A class-conditional run takes ``labels`` (num,),
    label i for sample i, and the classifier-free ``guidance`` scale, as ``ddpm.sample`` does.
    A run that kept an autoguidance guide (``run.guide``) is guided by it at ``autoguidance``
    (default: the run's ``sample.autoguidance``; 1 = off). ``guidance_interval`` (t_lo, t_hi) limits
    both guidances to those model timesteps (default: the run's ``sample.guidance_interval``; None:
    every step; (0, T - 1) asks for every step whatever the run's default).
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    if labels is not None and tuple(labels.shape) != (num,):
        raise ValueError(f"labels must have shape (num,) = ({num},), got {tuple(labels.shape)}")
    check_sampling_memory(num, min(batch_size, num), run.shape, device)
    amp = run.amp if amp is None else accel.resolve_amp(amp, device)
    model = run.model
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    schedule = run.schedule.to(device)
    guide = run.guide_kwargs(autoguidance)
    if guidance_interval is None:
        guidance_interval = run.config.sample.guidance_interval
    if guide:
        guide["guide"] = guide["guide"].to(device).eval()
    starts = range(0, num, batch_size)
    chunks, trajectory = [], None
    # threads follow the others' load (no sample changes: the count does not change a forward pass)
    with cpu_threads.follow_load(device=device), _StepBar(num, len(starts), settings, progress) as bar:
        for start in starts:
            n = min(batch_size, num - start)
            with accel.autocast(device, amp):
                result = sample(bar.counting(model, n), schedule, (n, *run.shape), sampler=settings.sampler,
                                steps=settings.steps, eta=settings.eta,
                                generator=per_sample_seeds(seed, n, offset=start, device=device), device=device,
                                return_trajectory=return_trajectory and start == 0, guidance=guidance,
                                labels=None if labels is None else labels[start:start + n].to(device),
                                guidance_interval=guidance_interval, **run.sample_kwargs, **guide)
            if isinstance(result, tuple):
                result, trajectory = result
            chunks.append(result.float().cpu())
    x0 = torch.cat(chunks)
    return (x0, trajectory) if return_trajectory else x0


class _StepBar:
    """One progress bar over all batches x steps; the postfix shows images/s (image-steps done
    divided by the steps per image, over the elapsed time), a rate that a single batch of 64
    images, which all finish at the last step, would otherwise show as 0 until the end."""

    def __init__(self, num: int, batches: int, settings: SamplerSettings, progress: bool | None):
        from tqdm.auto import tqdm

        self.steps = settings.steps
        # disable=None is tqdm's "only when the stream is a terminal"
        self.bar = tqdm(total=batches * settings.steps, unit="step", dynamic_ncols=True,
                        desc=f"sampling {num} ({settings.sampler}, {settings.steps} steps)",
                        disable=None if progress is None else not progress)
        self.image_steps = 0
        self.t0 = time.monotonic()

    def counting(self, model, n: int):
        """``model`` as the sampler calls it, advancing the bar by one step of ``n`` images per call
        (and letting the load follower look at the clock)."""
        if self.bar.disable and cpu_threads.current() is None:
            return model
        return _Counted(model, self, n)

    def advance(self, n: int) -> None:
        cpu_threads.tick()
        if self.bar.disable:
            return
        self.image_steps += n
        rate = self.image_steps / self.steps / max(time.monotonic() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:.3g} images/s", refresh=False)
        self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


class _Counted:
    """``model(x_t, t, ...)`` that reports each call to a ``_StepBar``; other attributes (e.g.
    ``num_classes``) are the model's."""

    def __init__(self, model, bar: _StepBar, n: int):
        self.model, self._bar, self._n = model, bar, n

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self._bar.advance(self._n)
        return out

    def __getattr__(self, name: str):
        return getattr(self.__dict__["model"], name)
