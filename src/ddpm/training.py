"""The training loop: Algorithm 1 of Ho et al. 2020 with EMA, warm-up, clipping and DDP.

One visible loop (nanoGPT style). Per optimizer step::

    t ~ U{0..T-1}, eps ~ N(0, I)                   drawn for the whole global batch B from a
                                                   generator seeded by (seed, step)
    for each of grad_accum micro-batches:          (B = micro-batch * grad_accum * world size)
        x0 ~ q(x0)                                 index stream shared by all ranks, sliced per rank
        loss = ||eps - eps_theta(x_t, t)||^2       Algorithm 1, lines 3-5 (ddpm.diffusion.training_loss)
    clip grad norm, Adam step with warmed-up lr
    ema <- lerp(ema, theta, 1 - decay_t)           one fused lerp_ (rank 0)

Because the randomness of step k depends only on (seed, k) and the data position is a function
of k, a run stopped at step k and resumed reproduces the uninterrupted run bit for bit on CPU,
and N ranks (or grad_accum micro-steps) with global batch B see exactly the data and noise of
one process with batch B.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from . import accel
from .checkpoint import (atomic_write_text, item_shape, latest_checkpoint, load_weights_into, read_state,
                         read_weights, sample_kwargs, save_checkpoint)
from .diffusion import training_loss
from .errors import UserError
from .loader import Prefetcher
from .config import TrainConfig, build_model

__all__ = ["train", "TrainingInterrupted", "IndexStream"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: a checkpoint of the last completed step was saved first."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {run_dir}")
        self.run_dir, self.step = run_dir, step


class IndexStream:
    """Data order: the concatenation of per-epoch permutations of 0..N-1, cut into global
    micro-batches. Micro-batch j (counted from the start of training) covers stream positions
    [j*b, (j+1)*b), so the data-order state is just j and resuming needs no iterator state."""

    def __init__(self, n: int, micro_batch: int, seed: int):
        self.n, self.micro_batch, self.seed = n, micro_batch, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def batch(self, j: int) -> torch.Tensor:
        pos = torch.arange(j * self.micro_batch, (j + 1) * self.micro_batch)
        epochs, offsets = pos // self.n, pos % self.n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            mask = epochs == e
            out[mask] = self._permutation(e)[offsets[mask]]
        return out


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


def _new_run_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


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


def _save_preview(ema, schedule, config: TrainConfig, path: Path, device, amp: str) -> None:
    from . import viz
    from .samplers import sample

    s, shape = config.sample, item_shape(config)
    n = s.num if len(shape) == 1 else min(s.num, 64)
    d = config.diffusion
    with torch.no_grad(), accel.autocast(device, amp):
        x0 = sample(ema, schedule, (n, *shape), sampler=s.sampler, steps=s.steps, eta=s.eta, generator=config.train.seed,
                    device=device, prediction=d.prediction, variance=d.variance, clip_denoised=d.clip_denoised)
    path.parent.mkdir(parents=True, exist_ok=True)
    x0 = x0.float().cpu()
    viz.save_scatter(x0, path) if len(shape) == 1 else viz.save_grid(x0, path)


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


def train(config: TrainConfig, *, out: str | Path | None = None, resume: bool = False) -> Path:
    """Train ``config`` into run directory ``out`` (default ``runs/NAME-DATE-TIME``); return it.

    ``resume=True`` continues from the latest complete checkpoint in ``out`` (starting fresh when
    there is none). Under torchrun (WORLD_SIZE > 1) each rank trains on its shard of every global
    batch with DistributedDataParallel; EMA, previews, logs and checkpoints live on rank 0.
    Raises ``TrainingInterrupted`` after saving a checkpoint when Ctrl-C is pressed.
    """
    c = config.train
    rank, world, device, started_dist = _init_distributed(config)
    loader = None
    try:
        micro_global = c.batch_size // c.grad_accum
        if micro_global % world:
            raise UserError(f"batch_size / grad_accum = {micro_global} is not divisible by world size {world}")
        micro_local = micro_global // world
        amp = ("bf16" if device.type == "cuda" else "off") if c.amp == "auto" else c.amp
        run_dir = Path(out) if out is not None else _new_run_dir(config)
        if world > 1:  # every rank must write to the directory rank 0 named
            holder = [str(run_dir)]
            dist.broadcast_object_list(holder, src=0)
            run_dir = Path(holder[0])
        latest = latest_checkpoint(run_dir)
        if latest is not None and not resume:
            raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")

        if device.type == "cpu":
            accel.keep_freed_memory()  # ~11% faster CPU steps (fewer page faults); see its docstring
        # 1. Data, schedule, model, EMA copy, optimizer.
        dataset = _open_data(config)
        stream = IndexStream(len(dataset), micro_global, c.seed)
        # This rank's slice of micro-batch j, fetched ahead (threads, pinned async copies on CUDA).
        loader = Prefetcher(lambda j: stream.batch(j)[rank * micro_local:(rank + 1) * micro_local],
                            lambda idx: _get_batch(dataset, idx), device, workers=c.num_workers)
        schedule = config.diffusion.make_schedule().to(device)
        torch.manual_seed(c.seed)  # identical initial weights on every rank
        model = build_model(config.model).to(device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = accel.make_optimizer(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                         weight_decay=config.optim.weight_decay, eps=config.optim.eps)
        step = 0
        if latest is not None:
            step = _restore(latest, model, ema, optimizer, rank, world)
        else:
            torch.manual_seed(c.seed + rank)  # dropout differs per rank, as with independent shards
        accel.prepare_model(model, channels_last=c.channels_last, compile=c.compile)
        accel.prepare_model(ema, channels_last=c.channels_last)
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        params = [p for p in model.parameters() if p.requires_grad]
        # EMA over every floating tensor of the state dict (parameters and float buffers).
        ema_tensors = [v for v in ema.state_dict().values() if v.is_floating_point()]
        model_tensors = [v for v in model.state_dict().values() if v.is_floating_point()]
        noise_gen = torch.Generator(device=device)
        shape = item_shape(config)

        log_file = None
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.json", config.to_json() + "\n")
            log_file = open(run_dir / "log.jsonl", "a", encoding="utf-8")
        tb = _tensorboard(run_dir) if rank == 0 else None
        from tqdm import tqdm

        bar = tqdm(total=c.steps, initial=step, disable=not c.progress or rank != 0, unit="step", dynamic_ncols=True)
        t_start, t_log, step_log = time.monotonic(), time.monotonic(), step
        loss_sum = torch.zeros((), device=device)
        grad_norm = torch.zeros((), device=device)
        interrupted = False

        def checkpoint() -> None:
            if rank == 0:
                state = {"step": step, "optimizer": optimizer.state_dict(), "data_position": step * c.grad_accum,
                         "rng": _rng_states(rank, world), "world_size": world}
                save_checkpoint(run_dir, step, model, ema, state, config, keep_last=c.keep_last)
            elif world > 1:
                _rng_states(rank, world)  # takes part in the gather

        with _sigint_flag() as sigint:
            while step < c.steps:
                # 2. Forward/backward over grad_accum micro-batches (Algorithm 1).
                lr = _lr_at(config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # Algorithm 1, lines 3-4 for the whole global batch at once, from a generator
                # seeded by (seed, step): ranks and accumulation micro-steps take their slices.
                noise_gen.manual_seed(c.seed * 1_000_003 + step)
                t_all = torch.randint(0, schedule.num_timesteps, (c.batch_size,), device=device, generator=noise_gen)
                eps_all = torch.randn((c.batch_size, *shape), device=device, generator=noise_gen)
                flip_all = torch.rand(c.batch_size, device=device, generator=noise_gen) < 0.5
                for micro in range(c.grad_accum):
                    j = step * c.grad_accum + micro
                    x0 = loader.get(j)
                    lo = micro * micro_global + rank * micro_local
                    t, eps = t_all[lo:lo + micro_local], eps_all[lo:lo + micro_local]
                    if config.data.hflip and x0.ndim == 4:
                        x0 = torch.where(flip_all[lo:lo + micro_local].view(-1, 1, 1, 1), x0.flip(-1), x0)
                    if c.channels_last and x0.ndim == 4:
                        x0 = x0.contiguous(memory_format=torch.channels_last)
                    sync = world == 1 or micro == c.grad_accum - 1
                    with (contextlib.nullcontext() if sync else net.no_sync()), accel.autocast(device, amp):
                        loss = training_loss(net, schedule, x0, t=t, noise=eps, prediction=config.diffusion.prediction,
                                             weighting=config.diffusion.weighting,
                                             min_snr_gamma=config.diffusion.min_snr_gamma)
                    (loss / c.grad_accum).backward()
                    loss_sum += loss.detach() / c.grad_accum
                # 3. Clip, step, EMA (no host sync here: loss and norm stay on the device).
                if config.optim.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if rank == 0:
                    accel.ema_update(ema_tensors, model_tensors, _ema_decay_at(config, step))
                step += 1
                bar.update(1)

                # 4. Log, stop checks, previews, checkpoints.
                at_log = step % c.log_every == 0 or step == c.steps
                if at_log:
                    stop = _should_stop(c.max_minutes, t_start, sigint[0], world, device)
                    if world > 1:
                        dist.all_reduce(loss_sum)
                        loss_sum /= world
                    now = time.monotonic()
                    record = {"step": step, "loss": loss_sum.item() / (step - step_log), "lr": lr,
                              "grad_norm": float(grad_norm), "ema_decay": _ema_decay_at(config, step - 1),
                              "it_per_s": (step - step_log) / max(now - t_log, 1e-9), "elapsed_s": now - t_start}
                    if rank == 0:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                        if tb is not None:
                            for key in ("loss", "lr", "grad_norm"):
                                tb.add_scalar(f"train/{key}", record[key], step)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                    loss_sum.zero_()
                    t_log, step_log = now, step
                else:
                    stop = world == 1 and _should_stop(c.max_minutes, t_start, sigint[0], 1, device)
                final = step == c.steps or stop
                # (no final grid after Ctrl-C: the user wants out, the checkpoint is what matters)
                if rank == 0 and ((c.sample_every and step % c.sample_every == 0) or (final and not sigint[0])):
                    name = "final" if final else f"step-{step:07d}"
                    _save_preview(ema, schedule, config, run_dir / "samples" / f"{name}.png", device, amp)
                if (c.ckpt_every and step % c.ckpt_every == 0) or final:
                    checkpoint()
                if rank == 0 and config.eval.every and step % config.eval.every == 0:
                    from .evaluate import periodic_eval

                    periodic_eval(ema, schedule, config.eval, step=step, run_dir=run_dir, shape=shape,
                                  sample_kwargs=sample_kwargs(config), data=dataset, device=device)
                if stop:
                    interrupted = sigint[0]
                    break
        bar.close()
        if log_file is not None:
            log_file.close()
        if tb is not None:
            tb.close()
        if interrupted:
            raise TrainingInterrupted(run_dir, step)
        return run_dir
    finally:
        if loader is not None:
            loader.close()
        if started_dist and dist.is_initialized():
            dist.destroy_process_group()


def _should_stop(max_minutes, t_start: float, sigint: bool, world: int, device) -> bool:
    """Time budget spent or Ctrl-C pressed; under DDP any rank's reason stops all of them."""
    stop = sigint or (max_minutes is not None and time.monotonic() - t_start > 60 * max_minutes)
    if world > 1:
        flag = torch.tensor([float(stop)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


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


def _restore(ckpt: Path, model, ema, optimizer, rank: int, world: int) -> int:
    """Load weights, EMA, optimizer and RNG state from a checkpoint folder; return its step."""
    for module, name in ((model, "model.safetensors"), (ema, "ema.safetensors")):
        tensors, _ = read_weights(ckpt / name)
        load_weights_into(module, tensors, ckpt / name)
    state = read_state(ckpt)
    try:
        optimizer.load_state_dict(state["optimizer"])
        ranks = state["rng"]["ranks"]
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint {ckpt / 'state.pt'} does not match this model/optimizer: {exc}") from None
    if len(ranks) == world:
        torch.set_rng_state(ranks[rank]["cpu"])
        if "cuda" in ranks[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ranks[rank]["cuda"])
    else:  # a different world size: per-rank dropout streams cannot be carried over
        torch.manual_seed(int(state["step"]) * 7919 + rank)
    return int(state["step"])


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(run_dir / "tb"))
