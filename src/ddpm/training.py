"""The training loop: Algorithm 1 of Ho et al. 2020 with EMA, warm-up, clipping and DDP.

``train`` is one visible loop (nanoGPT style); the helpers it calls are named after what they
do. One optimizer step (``_optimizer_step``)::

    t ~ U{0..T-1}, eps ~ N(0, I), flip ~ B(1/2)    Algorithm 1, lines 3-4, drawn for the whole
                                                   global batch B from a generator seeded by
                                                   (seed, step); flips only with data.hflip
    for each of grad_accum micro-batches:          (B = micro-batch * grad_accum * world size)
        x0 ~ q(x0)                                 line 2: index stream shared by all ranks,
                                                   sliced per rank
        loss = ||eps - eps_theta(x_t, t)||^2       line 5 (ddpm.diffusion.training_loss)
    clip grad norm, Adam step with warmed-up lr    line 5: the gradient step
    ema <- lerp(ema, theta, 1 - decay_t)           one fused lerp_ (rank 0)

and after it, when due: a log record (``_Log``), the stop check (time budget, Ctrl-C), previews,
checkpoints and evaluation (``_periodic_work``). Every resource (process group, prefetch
threads, log file, TensorBoard writer, progress bar, SIGINT handler) is entered on one
``ExitStack`` and released on every exit: the end of the run, Ctrl-C or an exception.

Because the randomness of step k depends only on (seed, k) and the data position is a function
of k, a run stopped at step k and resumed reproduces the uninterrupted run bit for bit on CPU,
and N ranks (or grad_accum micro-steps) with global batch B see exactly the data and noise of
one process with batch B.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import accel
from .checkpoint import (atomic_write_text, item_shape, latest_checkpoint, restore_training_state, sample_kwargs,
                         save_checkpoint)
from .config import TrainConfig, build_model
from .diffusion import training_loss
from .errors import UserError
from .loader import IndexStream, Prefetcher

__all__ = ["train", "TrainingInterrupted", "IndexStream"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: a checkpoint of the last completed step was saved first."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {run_dir}")
        self.run_dir, self.step = run_dir, step


def train(config: TrainConfig, *, out: str | Path | None = None, resume: bool = False) -> Path:
    """Train ``config`` into run directory ``out`` (default ``runs/NAME-DATE-TIME``); return it.

    ``resume=True`` continues from the latest complete checkpoint in ``out`` (starting fresh when
    there is none). Under torchrun (WORLD_SIZE > 1) each rank trains on its shard of every global
    batch with DistributedDataParallel; EMA, previews, logs and checkpoints live on rank 0.
    Raises ``TrainingInterrupted`` after saving a checkpoint when Ctrl-C is pressed.
    """
    c = config.train
    with contextlib.ExitStack() as stack:  # closes everything below on every way out
        r = _setup(config, out, resume, stack)  # process group, data, model, EMA, optimizer, resume
        log = _Log(r, stack)  # log.jsonl, TensorBoard, progress bar
        sigint = stack.enter_context(_sigint_flag())
        while r.step < c.steps:  # Algorithm 1, lines 1 and 6: repeat until the step budget is spent
            lr = _lr_at(config, r.step)
            grad_norm = _optimizer_step(r, lr, log.loss_sum)  # Algorithm 1, lines 2-5; EMA
            r.step += 1
            log.bar.update(1)

            at_log = r.step % c.log_every == 0 or r.step == c.steps
            stop = _should_stop(r, log.t_start, sigint[0], at_log)  # time budget spent or Ctrl-C
            if at_log:
                log.write(r, lr, grad_norm)
            # (no final grid after Ctrl-C: the user wants out, the checkpoint is what matters)
            _periodic_work(r, final=stop or r.step == c.steps, final_preview=not sigint[0])
            if stop:
                if sigint[0]:  # the checkpoint is saved; the stack closes the rest on the way out
                    raise TrainingInterrupted(r.run_dir, r.step)
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
    amp: str  # "off" or "bf16" ("auto" resolved)
    run_dir: Path
    dataset: Any
    loader: Prefetcher  # this rank's slice of micro-batch j, fetched ahead
    schedule: Any  # NoiseSchedule, on the device
    model: torch.nn.Module  # theta
    net: torch.nn.Module  # model, wrapped in DistributedDataParallel under torchrun
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int  # optimizer steps completed

    def __post_init__(self):
        self.noise_gen = torch.Generator(device=self.device)  # reseeded with (seed, step) every step
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # EMA over every floating tensor of the state dict (parameters and float buffers).
        self.ema_tensors = [v for v in self.ema.state_dict().values() if v.is_floating_point()]
        self.model_tensors = [v for v in self.model.state_dict().values() if v.is_floating_point()]


def _setup(config: TrainConfig, out, resume: bool, stack: contextlib.ExitStack) -> _Run:
    """Process group, run directory, data, model, EMA copy and optimizer, restored from the latest
    checkpoint in ``out`` when resuming; what needs closing goes on ``stack``."""
    c = config.train
    rank, world, device, started_dist = _init_distributed(config)
    if started_dist:
        stack.callback(lambda: dist.is_initialized() and dist.destroy_process_group())
    micro_global = c.batch_size // c.grad_accum
    if micro_global % world:
        raise UserError(f"batch_size / grad_accum = {micro_global} is not divisible by world size {world}")
    micro_local = micro_global // world
    amp = ("bf16" if device.type == "cuda" else "off") if c.amp == "auto" else c.amp
    run_dir = _run_dir(config, out, world)
    latest = latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
    if device.type == "cpu":
        accel.keep_freed_memory()  # ~11% faster CPU steps (fewer page faults); see its docstring

    dataset = _open_data(config)
    stream = IndexStream(len(dataset), micro_global, c.seed)
    loader = stack.enter_context(Prefetcher(lambda j: stream.batch(j)[rank * micro_local:(rank + 1) * micro_local],
                                            lambda idx: _get_batch(dataset, idx), device, workers=c.num_workers))
    schedule = config.diffusion.make_schedule().to(device)
    torch.manual_seed(c.seed)  # identical initial weights on every rank
    model = build_model(config.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = accel.make_optimizer(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                     weight_decay=config.optim.weight_decay, eps=config.optim.eps)
    step = 0
    if latest is not None:
        step = restore_training_state(latest, model, ema, optimizer, rank=rank, world=world)
    else:
        torch.manual_seed(c.seed + rank)  # dropout differs per rank, as with independent shards
    accel.prepare_model(model, channels_last=c.channels_last, compile=c.compile)
    accel.prepare_model(ema, channels_last=c.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if rank == 0:  # only now: a refused resume leaves the run's config.json as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", config.to_json() + "\n")
    return _Run(config=config, rank=rank, world=world, device=device, amp=amp, run_dir=run_dir, dataset=dataset,
                loader=loader, schedule=schedule, model=model, net=net, ema=ema, optimizer=optimizer, step=step)


def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, we_initialised) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = config.train.device
    use_cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return 0, 1, device, False
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, started


def _run_dir(config: TrainConfig, out, world: int) -> Path:
    """``out``, else ``runs/NAME-DATE-TIME``; under DDP every rank takes the directory rank 0 named."""
    run_dir = Path(out) if out is not None else Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if world > 1:
        holder = [str(run_dir)]
        dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    return run_dir


def _open_data(config: TrainConfig):
    from .data import open_source

    dataset = open_source(config.data.source, image_size=config.data.image_size, channels=config.data.channels)
    want = item_shape(config)
    if tuple(dataset.shape) != want:
        raise UserError(f"data {config.data.source!r} has items of shape {tuple(dataset.shape)} but the model "
                        f"expects {want}; set data.image_size/data.channels or the model's size")
    return dataset


def _get_batch(dataset, indices: torch.Tensor) -> torch.Tensor:
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    return torch.stack([dataset[int(i)] for i in indices])


# -- one step ---------------------------------------------------------------------------------

def _lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to ``min_lr_ratio * lr``."""
    o, steps = config.optim, config.train.steps
    if o.warmup and step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    if o.decay == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup) / max(1, steps - o.warmup))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _ema_decay_at(config: TrainConfig, step: int) -> float:
    # Warm-up: a young average forgets its random initialisation quickly (1 + t) / (w + t).
    c = config.train
    if c.ema_warmup == 0:
        return c.ema_decay
    return min(c.ema_decay, (1 + step) / (c.ema_warmup + step))


def _optimizer_step(r: _Run, lr: float, loss_sum: torch.Tensor) -> torch.Tensor | None:
    """Optimizer step ``r.step`` on its global batch (Algorithm 1, lines 2-5) and the EMA update.

    Adds the step's mean loss to ``loss_sum`` on the device (no host sync) and returns the
    gradient norm before clipping (None when clipping is off).
    """
    config, c = r.config, r.config.train
    for group in r.optimizer.param_groups:
        group["lr"] = lr
    # Algorithm 1, lines 3-4 for the whole global batch at once, from a generator seeded by
    # (seed, step): ranks and accumulation micro-steps take their slices.
    r.noise_gen.manual_seed(c.seed * 1_000_003 + r.step)
    shape = item_shape(config)
    t_all = torch.randint(0, r.schedule.num_timesteps, (c.batch_size,), device=r.device, generator=r.noise_gen)
    eps_all = torch.randn((c.batch_size, *shape), device=r.device, generator=r.noise_gen)
    flip_all = torch.rand(c.batch_size, device=r.device, generator=r.noise_gen) < 0.5
    micro_global = c.batch_size // c.grad_accum
    micro_local = micro_global // r.world
    for micro in range(c.grad_accum):
        x0 = r.loader.get(r.step * c.grad_accum + micro)  # Algorithm 1, line 2
        lo = micro * micro_global + r.rank * micro_local
        t, eps = t_all[lo:lo + micro_local], eps_all[lo:lo + micro_local]
        if config.data.hflip and x0.ndim == 4:
            x0 = torch.where(flip_all[lo:lo + micro_local].view(-1, 1, 1, 1), x0.flip(-1), x0)
        if c.channels_last and x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        sync = r.world == 1 or micro == c.grad_accum - 1  # DDP all-reduces gradients once, at the last
        with (contextlib.nullcontext() if sync else r.net.no_sync()), accel.autocast(r.device, r.amp):
            # Algorithm 1, line 5: ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2
            loss = training_loss(r.net, r.schedule, x0, t=t, noise=eps, prediction=config.diffusion.prediction,
                                 weighting=config.diffusion.weighting, min_snr_gamma=config.diffusion.min_snr_gamma)
        (loss / c.grad_accum).backward()
        loss_sum += loss.detach() / c.grad_accum
    grad_norm = None
    if config.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(r.params, config.optim.grad_clip, foreach=True)
    r.optimizer.step()  # Algorithm 1, line 5: the gradient step (Adam)
    r.optimizer.zero_grad(set_to_none=True)
    if r.rank == 0:
        accel.ema_update(r.ema_tensors, r.model_tensors, _ema_decay_at(config, r.step))
    return grad_norm


# -- logging and stopping ---------------------------------------------------------------------

class _Log:
    """log.jsonl, TensorBoard scalars and the progress bar; files on rank 0 only."""

    def __init__(self, r: _Run, stack: contextlib.ExitStack):
        from tqdm import tqdm

        self.file = self.tb = None
        if r.rank == 0:
            self.file = stack.enter_context(open(r.run_dir / "log.jsonl", "a", encoding="utf-8"))
            self.tb = _tensorboard(r.run_dir)
            if self.tb is not None:
                stack.callback(self.tb.close)
        c = r.config.train
        self.bar = stack.enter_context(tqdm(total=c.steps, initial=r.step, disable=not c.progress or r.rank != 0,
                                            unit="step", dynamic_ncols=True))
        self.loss_sum = torch.zeros((), device=r.device)  # summed per step, averaged per record
        self.t_start = self.t_last = time.monotonic()
        self.step_last = r.step

    def write(self, r: _Run, lr: float, grad_norm: torch.Tensor | None) -> None:
        """One record of the mean loss since the last one (averaged over ranks: every rank calls this)."""
        if r.world > 1:
            dist.all_reduce(self.loss_sum)
            self.loss_sum /= r.world
        now, steps = time.monotonic(), r.step - self.step_last
        record = {"step": r.step, "loss": self.loss_sum.item() / steps, "lr": lr,
                  "grad_norm": 0.0 if grad_norm is None else float(grad_norm),
                  "ema_decay": _ema_decay_at(r.config, r.step - 1),
                  "it_per_s": steps / max(now - self.t_last, 1e-9), "elapsed_s": now - self.t_start}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm"):
                self.tb.add_scalar(f"train/{key}", record[key], r.step)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        self.loss_sum.zero_()
        self.t_last, self.step_last = now, r.step


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _should_stop(r: _Run, t_start: float, sigint: bool, at_log: bool) -> bool:
    """Time budget spent or Ctrl-C pressed. Under DDP the ranks decide together (any rank's reason
    stops all of them), and only at log steps, where they synchronise anyway."""
    if r.world > 1 and not at_log:
        return False
    max_minutes = r.config.train.max_minutes
    stop = sigint or (max_minutes is not None and time.monotonic() - t_start > 60 * max_minutes)
    if r.world > 1:
        flag = torch.tensor([float(stop)], device=r.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


@contextlib.contextmanager
def _sigint_flag():
    """First Ctrl-C sets ``flag[0]`` (the loop saves and stops at the next step boundary);
    a second one raises KeyboardInterrupt at once."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# -- periodic work: previews, checkpoints, evaluation -----------------------------------------

def _periodic_work(r: _Run, *, final: bool, final_preview: bool) -> None:
    """What is due after step ``r.step``; ``final`` (last step or stopping) adds the final
    checkpoint and, with ``final_preview``, the final preview grid."""
    c, step = r.config.train, r.step
    if r.rank == 0 and ((c.sample_every and step % c.sample_every == 0) or (final and final_preview)):
        _save_preview(r, r.run_dir / "samples" / f"{'final' if final else f'step-{step:07d}'}.png")
    if (c.ckpt_every and step % c.ckpt_every == 0) or final:
        _checkpoint(r)
    if r.rank == 0 and r.config.eval.every and step % r.config.eval.every == 0:
        from .evaluate import periodic_eval

        periodic_eval(r.ema, r.schedule, r.config.eval, step=step, run_dir=r.run_dir, shape=item_shape(r.config),
                      sample_kwargs=sample_kwargs(r.config), data=r.dataset, device=r.device)


def _save_preview(r: _Run, path: Path) -> None:
    from . import viz
    from .samplers import sample

    s, shape, d = r.config.sample, item_shape(r.config), r.config.diffusion
    n = s.num if len(shape) == 1 else min(s.num, 64)
    with torch.no_grad(), accel.autocast(r.device, r.amp):
        x0 = sample(r.ema, r.schedule, (n, *shape), sampler=s.sampler, steps=s.steps, eta=s.eta,
                    generator=r.config.train.seed, device=r.device, prediction=d.prediction, variance=d.variance,
                    clip_denoised=d.clip_denoised)
    path.parent.mkdir(parents=True, exist_ok=True)
    x0 = x0.float().cpu()
    viz.save_scatter(x0, path) if len(shape) == 1 else viz.save_grid(x0, path)


def _checkpoint(r: _Run) -> None:
    """Rank 0 writes ``ckpt-{step}``; under DDP every rank takes part in gathering the RNG states."""
    if r.rank == 0:
        c = r.config.train
        state = {"step": r.step, "optimizer": r.optimizer.state_dict(), "data_position": r.step * c.grad_accum,
                 "rng": _rng_states(r.rank, r.world), "world_size": r.world}
        save_checkpoint(r.run_dir, r.step, r.model, r.ema, state, r.config, keep_last=c.keep_last)
    elif r.world > 1:
        _rng_states(r.rank, r.world)


def _rng_states(rank: int, world: int) -> dict:
    """Global torch RNG states (they drive dropout) of every rank, gathered to rank 0."""
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return {"ranks": [mine]}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return {"ranks": everyone}

