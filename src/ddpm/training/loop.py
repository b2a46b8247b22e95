"""The training loop: Algorithm 1 of Ho et al. 2020 with EMA, warm-up, clipping and DDP.

``train`` is one visible loop (nanoGPT style); the helpers it calls are named after what they
do. One optimizer step (``_optimizer_step``)::

    t ~ U{0..T-1}, eps ~ N(0, I), flip ~ B(1/2)    Algorithm 1, lines 3-4, drawn for the whole
                                                   global batch B from a generator seeded by
                                                   (seed, step); flips only with data.hflip
                                                   (objective "vlb": t ~ p_t of the loss
                                                   history, on the CPU, weights 1 / (T p_t))
    drop ~ B(cond_drop_prob)                       class-conditional runs only, drawn after the
                                                   rest: the label becomes the null label
                                                   (classifier-free guidance, Ho & Salimans 2022)
    for each of grad_accum micro-batches:          (B = micro-batch * grad_accum * world size)
        x0 ~ q(x0)                                 line 2: index stream shared by all ranks,
                                                   sliced per rank (with x0's labels c)
        loss = ||eps - eps_theta(x_t, t)||^2       line 5 (ddpm.core.diffusion.training_loss;
                                                   eps_theta(x_t, t, c) when conditional)
    clip grad norm, Adam step with warmed-up lr    line 5: the gradient step (skipped if non-finite)
    ema <- lerp(ema, theta, 1 - decay_t)           one multi-tensor update (rank 0; skipped with it)

and after it, when due: a log record (``ddpm.training.runlog``), the stop check (time budget, a stop signal),
once, a copy of the EMA as the autoguidance guide (``train.guide_at``; saved in every later
checkpoint), the divergence check, previews, checkpoints and evaluation (``_periodic_work``).
Every resource (process group, run-directory lock, prefetch threads, log file, TensorBoard writer, progress
bar, signal handlers) is entered on one ``ExitStack`` and released on every exit: the end of the
run, a signal or an exception.

Non-finite guard: a step whose loss or gradient norm is NaN/Inf is skipped (no Adam step, no EMA
update) and counted in the log; ``train.max_nonfinite`` skipped steps in a row stop the run with
``TrainingDiverged``, leaving the last checkpoint (finite: non-finite weights are never saved)
as the latest. With the fused Adam kernel the skip costs no host sync: the flag is computed on
the device and handed to the kernel as ``found_inf`` (the way ``torch.amp.GradScaler`` skips
steps) and masks the EMA weight; the host reads the count of skipped steps only where it
synchronises anyway (log records) or every ``max_nonfinite`` steps. Without a fused kernel the
flag is read every step (free on a CPU, where nothing runs ahead of the host).

fp16 (``train.amp``, or "auto" on GPUs without fast bf16): the loss is scaled by a
``torch.amp.GradScaler`` before backward and the gradients unscaled before clipping; a step whose
gradients overflow (finite loss, inf gradients) is skipped the same way, logged as
``skipped_overflow`` and answered by halving the scale: it is not divergence. The scale is saved
in each checkpoint, so a resumed fp16 run is still the uninterrupted one.

Because the randomness of step k depends only on (seed, k) and the data position is a function
of k, a run stopped at step k and resumed reproduces the uninterrupted run bit for bit on CPU
(unless ``train.max_minutes`` is set: then the clock drives the learning rate, ``ddpm.training.budget``),
and N ranks (or grad_accum micro-steps) with global batch B see exactly the data and noise of
one process with batch B.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import TrainConfig, build_model, item_shape
from ..core import device as accel
from ..core import threads as cpu_threads
from ..core.diffusion import training_loss
from ..data.loader import IndexStream, Prefetcher
from ..errors import UserError
from ..evaluation.evaluate import periodic_eval
from ..io.checkpoint import (check_run_dir, latest_checkpoint, list_checkpoints, read_guide, restore_training_state,
                             save_checkpoint)
from ..io.files import RunLock, atomic_write_text, sweep_temporaries
from ..io.run import LoadedRun
from ..nets import fast
from . import guards, optim
from .budget import TimeBudget, lr_at, schedule_progress
from .data import get_batch, open_training_data, with_class_names
from .distributed import init_distributed, resume_from, rng_states, shared_run_dir
from .previews import preview_kwargs, save_preview
from .runlog import LogWindow, RunLog
from .timestep_sampling import LossAwareTimestepSampler, record_vlb_losses

__all__ = ["train", "TrainingInterrupted", "TrainingDiverged", "IndexStream"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP during ``train``: a checkpoint of the last completed step was saved
    first. ``exit_code`` is 128 + the signal number (130, 143, 129), as a shell reports it."""

    def __init__(self, run_dir: Path, step: int, signum: int = signal.SIGINT):
        by = "" if signum == signal.SIGINT else f" by {guards.signal_name(signum)}"
        super().__init__(f"interrupted{by} at step {step}; checkpoint saved in {run_dir}")
        self.run_dir, self.step, self.signum, self.exit_code = run_dir, step, signum, 128 + signum


class TrainingDiverged(UserError):
    """``train.max_nonfinite`` optimizer steps in a row had a NaN/Inf loss or gradient norm."""


def train(config: TrainConfig, *, out: str | Path | None = None, resume: bool = False,
          threads: str | int | None = None) -> Path:
    """Train ``config`` into run directory ``out`` (default ``runs/NAME-DATE-TIME``); return it.

    ``resume=True`` continues from the newest intact checkpoint in ``out`` (from step 0 when the
    run has a config.json but no checkpoint yet; a directory with neither is an error). The run
    directory is locked for the whole run. Under torchrun (WORLD_SIZE > 1) each rank trains on
    its shard of every global batch with DistributedDataParallel; EMA, previews, logs and
    checkpoints live on rank 0. Raises ``TrainingInterrupted`` after saving a checkpoint on
    Ctrl-C, SIGTERM or SIGHUP, ``TrainingDiverged`` when the loss stays non-finite, and a
    one-line UserError when memory or disk run out.

    ``threads`` (one process on the CPU): ``"auto"`` lets torch's thread count follow the load of
    other processes (``ddpm.core.threads``), an integer fixes it, and None (default) follows
    the load only in a budgeted run: a count that changes mid-run can change a step's low bits,
    so a step-counted run keeps its count for a bit-exact ``resume``. OMP_NUM_THREADS, when set,
    wins over "auto" and None.
    """
    c = config.train
    if threads is not None and threads != "auto" and (not isinstance(threads, int) or isinstance(threads, bool)
                                                      or threads < 1):
        raise UserError(f"threads must be 'auto' or a count >= 1, got {threads!r}")
    with guards.resource_errors("training"), contextlib.ExitStack() as stack:  # closed on every way out
        r = _setup(config, out, resume, stack)  # process group, lock, data, model, EMA, optimizer, resume
        _cpu_threads(c, r.device, r.world, threads, stack)
        stack.enter_context(guards.lost_peers(r.world, r.run_dir))  # a rank killed under torchrun: one line
        log = RunLog(r.run_dir, rank=r.rank, world=r.world, step=r.step, steps=c.steps, progress=c.progress,
                     window=r.log_window, log_every=c.log_every, stack=stack, time_fraction=r.time_fraction)  # log.jsonl, TensorBoard, bar
        signals = stack.enter_context(guards.stop_signals())  # the first SIGINT/SIGTERM/SIGHUP -> signals[0]
        r.budget.start()
        while r.step < c.steps:  # Algorithm 1, lines 1 and 6: repeat until the step budget is spent
            lr = lr_at(config, r.step, r.time_fraction)  # the decay follows steps or the clock (ddpm.training.budget)
            grad_norm = _optimizer_step(r, lr, log)  # Algorithm 1, lines 2-5; EMA (skipped when non-finite)
            r.step += 1
            log.bar.update(1)
            cpu_threads.tick()  # a few seconds since the last look: follow the others' load

            at_log = r.step % c.log_every == 0 or r.step == c.steps
            stop, fraction = _stop_reason(r, signals[0], at_log)  # "time", a signal number or None
            if fraction is not None:
                r.time_fraction = fraction  # drives the next steps' learning rate
            p = schedule_progress(config, r.step, r.time_fraction)
            if at_log or stop is not None:  # the last record holds the step and progress reached
                follower = cpu_threads.current()
                log.write(r.step, lr, grad_norm, _ema_decay_at(config, r.step - 1),
                          loss_scale=r.scaler.get_scale() if r.scaler.is_enabled() else None,
                          progress=p,
                          elapsed=r.budget.elapsed(), time_fraction=r.time_fraction if c.max_minutes else None,
                          threads=follower.threads if follower is not None else None)
            if r.rank == 0 and c.guide_at is not None and r.guide is None and p >= c.guide_at:
                r.guide, r.guide_step = copy.deepcopy(r.ema), r.step  # the EMA kept as the autoguidance guide
            if at_log or r.step % c.max_nonfinite == 0:
                _check_divergence(r)  # before any save: a diverged run keeps its last checkpoint
            # (no final grid after a signal: the user wants out, the checkpoint is what matters)
            _periodic_work(r, final=stop is not None or r.step == c.steps, final_preview=stop in (None, "time"))
            if stop is not None:
                if stop != "time":  # the checkpoint is saved; the stack closes the rest on the way out
                    raise TrainingInterrupted(r.run_dir, r.step, stop)
                break
    return r.run_dir


# -- set-up -----------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Run:
    """What the loop's helpers share: where this process stands and what it trains."""

    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    amp: str  # "off", "bf16" or "fp16" ("auto" resolved)
    run_dir: Path
    dataset: Any
    loader: Prefetcher  # this rank's slice of micro-batch j, fetched ahead
    schedule: Any  # NoiseSchedule, on the device
    model: torch.nn.Module  # theta
    net: torch.nn.Module  # model, wrapped in DistributedDataParallel under torchrun
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int  # optimizer steps completed (skipped non-finite ones included)
    scaler: torch.amp.GradScaler  # loss scaling under fp16 (disabled: every call a pass-through)
    budget: TimeBudget  # train.max_minutes and the training time used, across resumes
    log_window: LogWindow  # the loss summed since the last log record on the cadence, across resumes
    timestep_sampler: LossAwareTimestepSampler | None = None  # objective "vlb": t ~ p_t (section 3.3)
    time_fraction: float = 0.0  # share of the time budget used, as of the last stop check
    guide: torch.nn.Module | None = None  # the EMA as it was at train.guide_at (autoguidance), once reached
    guide_step: int = 0

    # Derived in __post_init__ from the fields above:
    noise_gen: torch.Generator = dataclasses.field(init=False)  # reseeded with (seed, step) every step
    t_gen: torch.Generator = dataclasses.field(init=False)  # the same seed, on the CPU where the loss-aware sampler draws
    saved_step: int = dataclasses.field(init=False)  # the step of the newest checkpoint written or resumed from
    nonfinite_run: torch.Tensor = dataclasses.field(init=False)  # skipped steps in a row, on the device
    masked_skip: bool = dataclasses.field(init=False)  # fused Adam skips a step on the device when told found_inf
    params: list = dataclasses.field(init=False)  # the trainable parameters, for clipping
    ema_tensors: list = dataclasses.field(init=False)  # EMA over every floating tensor of the state dict
    model_tensors: list = dataclasses.field(init=False)  # (parameters and float buffers), paired with these

    def __post_init__(self):
        self.noise_gen = torch.Generator(device=self.device)
        self.t_gen = torch.Generator()
        self.saved_step = self.step
        self.nonfinite_run = torch.zeros((), device=self.device)
        self.masked_skip = bool(self.optimizer.defaults.get("fused"))  # see the module docstring
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_tensors = [v for v in self.ema.state_dict().values() if v.is_floating_point()]
        self.model_tensors = [v for v in self.model.state_dict().values() if v.is_floating_point()]


def _setup(config: TrainConfig, out, resume: bool, stack: contextlib.ExitStack) -> _Run:
    """Process group, run directory, data, model, EMA copy and optimizer, restored from the latest
    checkpoint in ``out`` when resuming; what needs closing goes on ``stack``."""
    c = config.train
    rank, world, device, started_dist = init_distributed(config)
    if started_dist:
        stack.callback(lambda: dist.is_initialized() and dist.destroy_process_group())
    micro_global = c.batch_size // c.grad_accum
    if micro_global % world:
        raise UserError(f"batch_size / grad_accum = {micro_global} is not divisible by world size {world}")
    micro_local = micro_global // world
    amp = accel.resolve_amp(c.amp, device)
    run_dir = shared_run_dir(config, out, world)
    if resume and not (run_dir / "config.json").is_file() and not list_checkpoints(run_dir):
        raise UserError(f"--resume: {run_dir} holds no run (no config.json, no checkpoint); check the path, "
                        f"or leave out --resume to start a new run there")
    check_run_dir(run_dir)  # a folder of other files is refused before anything is written there
    guards.check_memory(config, device)  # an absurd batch or image size fails here, before allocating
    if rank == 0:
        stack.enter_context(RunLock(run_dir))  # one writer per run directory, until the stack closes
        sweep_temporaries(run_dir)  # e.g. the temporary config.json of a run killed while writing it
    if list_checkpoints(run_dir) and not resume:
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
    latest = resume_from(run_dir, rank, world) if resume else None
    if device.type == "cpu":
        accel.keep_freed_memory()  # ~11% faster CPU steps (fewer page faults); see its docstring

    dataset = open_training_data(config)
    config = with_class_names(config, dataset)
    stream = IndexStream(len(dataset), micro_global, c.seed)
    fetch = lambda idx: get_batch(dataset, idx)  # noqa: E731
    if config.model.num_classes is not None:  # labels travel with their images
        fetch = lambda idx: (get_batch(dataset, idx), dataset.get_batch_labels(idx))  # noqa: E731
    loader = stack.enter_context(Prefetcher(lambda j: stream.batch(j)[rank * micro_local:(rank + 1) * micro_local],
                                            fetch, device, workers=c.num_workers))
    schedule = config.diffusion.make_schedule().to(device)
    torch.manual_seed(c.seed)  # identical initial weights on every rank
    model = build_model(config.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = optim.make_optimizer(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                     weight_decay=config.optim.weight_decay, eps=config.optim.eps)
    step = 0
    # Same history on every rank: each records the whole global batch (record_vlb_losses).
    timestep_sampler = (LossAwareTimestepSampler(config.diffusion.timesteps)
                        if config.diffusion.objective == "vlb" else None)
    scaler = optim.make_grad_scaler(amp, device)  # fp16 only; a pass-through otherwise
    budget = TimeBudget(c.max_minutes)
    log_window = LogWindow(device)
    if latest is not None:
        step = restore_training_state(latest, model, ema, optimizer, rank=rank, world=world,
                                      timestep_sampler=timestep_sampler, grad_scaler=scaler, time_budget=budget,
                                      log_window=log_window)
        if budget.fraction() >= 1 and step < c.steps:
            raise UserError(f"{run_dir} already used its {c.max_minutes:g}-minute budget (train.max_minutes) at "
                            f"step {step}; to train on, resume with a larger one, e.g. --set train.max_minutes="
                            f"{2 * c.max_minutes:g}")
    else:
        torch.manual_seed(c.seed + rank)  # dropout differs per rank, as with independent shards
    fast.prepare_model(model, channels_last=c.channels_last, compile=c.compile)
    fast.prepare_model(ema, channels_last=c.channels_last)
    kept = read_guide(latest / "ema.safetensors", config.model) if latest is not None and rank == 0 else None
    guide, guide_step = kept if kept is not None else (None, 0)  # kept before the checkpoint: goes on with the run
    if guide is not None:
        fast.prepare_model(guide.to(device).requires_grad_(False).eval(), channels_last=c.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if rank == 0:  # only now: a refused resume leaves the run's config.json as it was
        atomic_write_text(run_dir / "config.json", config.to_json() + "\n")
    return _Run(config=config, rank=rank, world=world, device=device, amp=amp, run_dir=run_dir, dataset=dataset,
                loader=loader, schedule=schedule, model=model, net=net, ema=ema, optimizer=optimizer, step=step,
                scaler=scaler, budget=budget, log_window=log_window, timestep_sampler=timestep_sampler, time_fraction=budget.fraction(),
                guide=guide, guide_step=guide_step)


def _cpu_threads(c, device: torch.device, world: int, threads, stack: contextlib.ExitStack) -> None:
    # Following the load gives up bit-exactness (a reduction over the batch splits by threads), so
    # by default only where the clock already drives the run: a time budget.
    if threads is not None and threads != "auto":
        stack.callback(torch.set_num_threads, torch.get_num_threads())  # the caller's count afterwards
        torch.set_num_threads(threads)
        return
    follow = threads == "auto" or c.max_minutes is not None
    stack.enter_context(cpu_threads.follow_load(follow and world == 1, device=device))


# -- one step ---------------------------------------------------------------------------------

def _ema_decay_at(config: TrainConfig, step: int) -> float:
    # Warm-up: a young average forgets its random initialisation quickly (1 + t) / (w + t).
    c = config.train
    if c.ema_warmup == 0:
        return c.ema_decay
    return min(c.ema_decay, (1 + step) / (c.ema_warmup + step))


def _optimizer_step(r: _Run, lr: float, log: RunLog) -> torch.Tensor:
    """Optimizer step ``r.step`` on its global batch (Algorithm 1, lines 2-5) and the EMA update,
    both skipped when the loss or the gradient norm is not finite.

    Adds the step's mean loss (or the skip) to ``log`` on the device (no host sync) and returns
    the gradient norm before clipping.
    """
    config, c = r.config, r.config.train
    for group in r.optimizer.param_groups:
        group["lr"] = lr
    # Algorithm 1, lines 3-4 for the whole global batch at once, from a generator seeded by
    # (seed, step): ranks and accumulation micro-steps take their slices.
    r.noise_gen.manual_seed(c.seed * 1_000_003 + r.step)
    shape = item_shape(config)
    d, vlb = config.diffusion, r.timestep_sampler is not None
    if vlb:  # L_vlb: t ~ p_t from the loss history, examples weighted 1 / (T p_t) (Nichol & Dhariwal, 3.3)
        r.t_gen.manual_seed(c.seed * 1_000_003 + r.step)
        t_all, w_all = r.timestep_sampler.sample(c.batch_size, generator=r.t_gen, device=r.device)
    else:
        t_all = torch.randint(0, r.schedule.num_timesteps, (c.batch_size,), device=r.device, generator=r.noise_gen)
    eps_all = torch.randn((c.batch_size, *shape), device=r.device, generator=r.noise_gen)
    flip_all = torch.rand(c.batch_size, device=r.device, generator=r.noise_gen) < 0.5
    num_classes = config.model.num_classes
    if num_classes is not None:
        # Classifier-free guidance training (Ho & Salimans 2022, Algorithm 1): a label is replaced
        # by the null label with probability cond_drop_prob. Drawn after t, eps and flip, so that
        # the unconditional runs' random streams are what they were.
        drop_all = torch.rand(c.batch_size, device=r.device, generator=r.noise_gen) < c.cond_drop_prob
    micro_global = c.batch_size // c.grad_accum
    micro_local = micro_global // r.world
    step_loss = torch.zeros((), device=r.device)
    vlb_losses = []  # this rank's per-example L_vlb, in batch order
    for micro in range(c.grad_accum):
        x0 = r.loader.get(r.step * c.grad_accum + micro)  # Algorithm 1, line 2
        lo = micro * micro_global + r.rank * micro_local
        labels = None
        if num_classes is not None:
            x0, labels = x0
            labels = torch.where(drop_all[lo:lo + micro_local], num_classes, labels)
        t, eps = t_all[lo:lo + micro_local], eps_all[lo:lo + micro_local]
        if config.data.hflip and x0.ndim == 4:
            x0 = torch.where(flip_all[lo:lo + micro_local].view(-1, 1, 1, 1), x0.flip(-1), x0)
        if c.channels_last and x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        sync = r.world == 1 or micro == c.grad_accum - 1  # DDP all-reduces gradients once, at the last
        with (contextlib.nullcontext() if sync else r.net.no_sync()), accel.autocast(r.device, r.amp):
            # Algorithm 1, line 5: ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2
            # (+ vlb_weight * L_vlb with learned variances: L_hybrid; or L_vlb alone)
            loss = training_loss(r.net, r.schedule, x0, t=t, noise=eps, prediction=d.prediction,
                                 weighting=d.weighting, min_snr_gamma=d.min_snr_gamma, variance=d.variance,
                                 objective=d.objective, vlb_weight=d.vlb_weight, reduction="none" if vlb else "mean",
                                 labels=labels)
            if vlb:
                vlb_losses.append(loss.detach())
                loss = (loss * w_all[lo:lo + micro_local]).mean()
        r.scaler.scale(loss / c.grad_accum).backward()  # fp16: scaled so small gradients do not flush to 0
        step_loss += loss.detach().float() / c.grad_accum
    r.scaler.unscale_(r.optimizer)  # fp16: true gradients again (and the scaler notes any inf)
    # max_norm=inf measures without clipping (the norm feeds the non-finite check and the log)
    grad_norm = torch.nn.utils.clip_grad_norm_(r.params, config.optim.grad_clip or math.inf, foreach=True)
    bad_loss, bad_grad = ~torch.isfinite(step_loss), ~torch.isfinite(grad_norm)
    # [non-finite, overflow]: under fp16 a finite loss with inf gradients is the scaler's overflow
    # (it lowers the scale), not divergence; elsewhere any NaN/Inf counts as non-finite.
    flags = torch.stack([bad_loss | (bad_grad & (not r.scaler.is_enabled())), ~bad_loss & bad_grad]).float()
    if r.world > 1:  # the loss is per rank: all ranks must skip together or their weights part
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    flags[1] *= 1 - flags[0]  # a step is one or the other
    skip = flags.sum()
    if vlb:
        record_vlb_losses(r.timestep_sampler, t_all, torch.cat(vlb_losses), skip, world=r.world,
                          grad_accum=c.grad_accum)
    _apply_update(r, skip, _ema_decay_at(config, r.step))
    r.scaler.update()  # fp16: halve the scale after an overflow, grow it after 2000 clean steps
    log.add(step_loss, flags)
    r.nonfinite_run.add_(flags[0]).mul_(skip)  # +1 if non-finite, kept if overflow, 0 if applied
    return grad_norm


def _apply_update(r: _Run, skip: torch.Tensor, decay: float) -> None:
    """The Adam step (Algorithm 1, line 5) and the EMA update, neither of them when ``skip`` is 1."""
    if r.masked_skip:
        r.optimizer.found_inf = skip  # fused Adam: no update, moments and step count kept, when 1
        try:
            r.optimizer.step()
        finally:
            del r.optimizer.found_inf
        if r.rank == 0:  # zero EMA weight on a skipped step, decided on the device
            optim.ema_update(r.ema_tensors, r.model_tensors, decay, keep=1 - skip)
    elif not skip.item():
        r.optimizer.step()
        if r.rank == 0:
            optim.ema_update(r.ema_tensors, r.model_tensors, decay)
    r.optimizer.zero_grad(set_to_none=True)


# -- stopping ------------------------------------------------------------------------------------

def _stop_reason(r: _Run, signum: int | None, at_log: bool) -> tuple[int | str | None, float | None]:
    """(the signal number received, "time" when the time budget is spent, else None; the share of
    the budget used, None when not read). Under DDP the ranks decide together (any rank's reason
    stops all of them, with the same signal number; all take the largest clock reading, so that
    their rates stay equal), and only at log steps, where they synchronise anyway."""
    if r.world > 1 and not at_log:
        return None, None
    fraction = r.budget.fraction()
    if r.world > 1:
        flags = torch.tensor([float(signum or 0), fraction], dtype=torch.float64, device=r.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, fraction = int(flags[0].item()) or None, float(flags[1].item())
    return (signum if signum else ("time" if fraction > 1 else None)), fraction


def _check_divergence(r: _Run) -> None:
    """Raise TrainingDiverged once ``max_nonfinite`` steps in a row were skipped (every rank
    counts the same skips, so all raise at the same step)."""
    limit, run = r.config.train.max_nonfinite, int(r.nonfinite_run.item())
    if run < limit:
        return
    latest = latest_checkpoint(r.run_dir)
    kept = f"the latest checkpoint, {latest}, holds finite weights" if latest else "no checkpoint was saved"
    raise TrainingDiverged(f"training diverged: the last {run} steps (up to step {r.step}) had a NaN/Inf loss or "
                           f"gradient and were skipped (train.max_nonfinite={limit}); {kept}; lower optim.lr or "
                           f"raise optim.warmup and resume")


# -- periodic work: previews, checkpoints, evaluation -----------------------------------------

def _periodic_work(r: _Run, *, final: bool, final_preview: bool) -> None:
    """What is due after step ``r.step``; ``final`` (last step or stopping) adds the final
    checkpoint and, with ``final_preview``, the final preview grid."""
    c, step = r.config.train, r.step
    if r.rank == 0 and ((c.sample_every and step % c.sample_every == 0) or (final and final_preview)):
        path = r.run_dir / "samples" / f"{'final' if final else f'step-{step:07d}'}.png"
        save_preview(r.ema, r.schedule, r.config, path, device=r.device, amp=r.amp, guide=r.guide)
    # Not in the middle of a run of skipped (non-finite) steps: such a checkpoint would push the
    # ones from before the trouble out of keep_last while holding nothing newer.
    if final or (c.ckpt_every and step % c.ckpt_every == 0 and not r.nonfinite_run.item()):
        _checkpoint(r)
    if r.rank == 0 and r.config.eval.every and step % r.config.eval.every == 0:

        run = LoadedRun(model=r.ema, schedule=r.schedule, config=r.config, shape=item_shape(r.config),
                        sample_kwargs=preview_kwargs(r.config), path=r.run_dir, step=step)
        periodic_eval(run, step=step, run_dir=r.run_dir, data=r.dataset, device=r.device)


def _checkpoint(r: _Run) -> None:
    """Rank 0 writes ``ckpt-{step}``; under DDP every rank takes part in gathering the RNG states."""
    if r.saved_step == r.step:  # e.g. a signal right after a periodic save: that step is saved
        return
    r.saved_step = r.step
    if r.rank == 0:
        c = r.config.train
        state = {"step": r.step, "optimizer": r.optimizer.state_dict(), "data_position": r.step * c.grad_accum,
                 "rng": rng_states(r.rank, r.world), "world_size": r.world}
        if r.timestep_sampler is not None:  # the loss history: a resumed run draws the same t
            state["timestep_sampler"] = r.timestep_sampler.state_dict()
        if r.scaler.is_enabled():  # the loss scale and its growth count: a resumed run scales the same
            state["grad_scaler"] = r.scaler.state_dict()
        state["time_budget"] = r.budget.state_dict()  # training time so far: a resumed run continues its decay
        state["log_window"] = r.log_window.state_dict()  # a resumed run's log.jsonl has no seam
        save_checkpoint(r.run_dir, r.step, r.model, r.ema, state, r.config, keep_last=c.keep_last,
                        guide=None if r.guide is None else (r.guide_step, r.guide))
    elif r.world > 1:
        rng_states(r.rank, r.world)
