"""A distillation as a run directory: ``distill_run`` turns a trained run into a few-step run.

The algorithm is ``ddpm.training.distill``; this module gives it what ``ddpm train`` gives
training, reusing its pieces: the run lock (``RunLock``), atomic checkpoints with a manifest
(``save_checkpoint``: the student in model.safetensors and ema.safetensors, the state in
state.pt), the stop signals (``guards.stop_signals``: a checkpoint, then ``TrainingInterrupted``),
resource errors as one line, skipped non-finite steps (``train.max_nonfinite`` in a row raise
``TrainingDiverged``) and the time budget (``TimeBudget``; the rounds share it equally).

Layout of OUT: config.json (the student's TrainConfig: v-prediction, unclipped, sampling with
ddim / ``steps`` / eta 0 / trailing, and ``distill`` naming the teacher run, its checkpoint and
grid), log.jsonl (one record per ``train.log_every`` iterations and per round end: round, N,
step, loss, lr, skipped_nonfinite, it_per_s, elapsed_s), samples/round-R-Nsteps.png after each
round and ckpt-K/ (K = iterations done over all rounds) at each round's end, every
``train.ckpt_every`` iterations and on a stop. state.pt holds the round, the iteration in it and,
after the first round, the round's teacher (the previous student), so that ``resume`` continues
mid-round; a step-counted distillation resumed is the uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..config import DistillConfig, TrainConfig, build_model
from ..core import threads as cpu_threads
from ..core.device import autocast, pick_device, resolve_amp
from ..errors import UserError, first_line
from ..io.checkpoint import latest_verified_checkpoint, list_checkpoints, read_state, restore_training_state, \
    save_checkpoint
from ..io.files import RunLock, atomic_write_text, open_append, sweep_temporaries
from ..io.run import LoadedRun, load
from ..sampling.guidance import autoguided_model, check_guidance, guided_model, interval_model, resolve_interval
from . import guards
from .budget import TimeBudget
from .data import get_batch, open_training_data
from .distill import (STUDENT_PREDICTION, _round_bar, check_steps, distill_loss, frozen_copy, iteration_seed,
                      round_lr, round_plan, substeps)
from .distributed import rng_states
from .loop import IndexStream, TrainingDiverged, TrainingInterrupted
from .previews import save_preview
from .runlog import _drop_records_after

__all__ = ["distill_run", "default_teacher_steps"]

# The first teacher grid, when the teacher is not itself distilled: 64 DDIM steps of the default mnist
# run score as its 100 ancestral ones in FD (20.8 against 20.5), and each halving saved is a round.
DEFAULT_TEACHER_GRID = 64


def default_teacher_steps(T: int, steps: int) -> int:
    """steps * 2^k for the largest k >= 1 with steps * 2^k <= max(64, 2 steps) (and <= T, checked later)."""
    n = 2 * steps
    while 2 * n <= min(T, DEFAULT_TEACHER_GRID):
        n *= 2
    return n


def distill_run(teacher: str | Path, *, steps: int, out: str | Path | None = None, teacher_steps: int | None = None,
                iters_per_round: int = 500, batch_size: int | None = None, lr: float | None = None, seed: int = 0,
                max_minutes: float | None = None, resume: bool = False, progress: bool = True,
                ckpt_every: int = 0, log_every: int = 50, stop_at: int | None = None,
                device: str = "auto", match_round: bool = False, guidance: float | None = None,
                autoguidance: float | None = None, guidance_interval: tuple[int, int] | str | None = None) -> Path:
    """Distil the finished run ``teacher`` into ``steps`` DDIM steps in run directory ``out``.

    Nothing is written when the request is refused (a one-line UserError): ``teacher`` not a
    finished run, a learned-variance teacher, ``steps`` not the teacher grid halved k >= 1 times
    (``check_steps``; a distilled teacher's grid is its own step count), ``out`` already holding
    checkpoints without ``resume``. ``stop_at`` stops (with a checkpoint) after that many
    iterations in all, as a signal would, but returns ``out`` instead of raising. ``match_round``
    (a trained teacher only) adds the first round of ``ddpm.training.distill``'s module docstring.

    The guidance baked into the student is the teacher run's default sampling guidance, as
    ``ddpm sample RUN`` draws it, unless ``guidance`` (classifier-free scale), ``autoguidance`` or
    ``guidance_interval`` ((t_lo, t_hi), or ``"all"`` for every step) say otherwise: a trained
    teacher only, since a distilled one has its teacher's guidance baked in already.
    """
    device = pick_device(device)
    teacher_run = _finished_run(Path(teacher), device)
    config, plan = _student_config(teacher_run, Path(teacher), steps, teacher_steps, iters_per_round, batch_size,
                                   lr, seed, max_minutes, ckpt_every, log_every, match_round,
                                   (guidance, autoguidance, guidance_interval))
    out = Path(out) if out is not None else Path("runs") / config.name
    if resume and not (out / "config.json").is_file():
        raise UserError(f"--resume: {out} holds no distillation (no config.json); leave out --resume to start one")
    if not resume and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; pass --resume to continue it or choose another --out")
    if resume:
        config = _resumed_config(out, config)
    with guards.resource_errors("distillation"), contextlib.ExitStack() as stack:
        stack.enter_context(RunLock(out))
        sweep_temporaries(out)
        return _loop(config, plan, teacher_run, out, resume, progress, stop_at, device, stack)


def _read_config(file: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or a value the config refuses
        raise UserError(f"{file} is not a valid run config: {first_line(exc)}") from None


def _finished_run(path: Path, device: torch.device) -> LoadedRun:
    if not (path / "config.json").is_file() or not list_checkpoints(path):
        raise UserError(f"{path} is not a run directory with a checkpoint (config.json and ckpt-NNNNNNN/): "
                        f"distil a run that `ddpm train` finished")
    config = _read_config(path / "config.json")
    latest = latest_verified_checkpoint(path)
    step = int(latest.name.split("-")[1])
    if step < config.train.steps and not (path / "samples" / "final.png").is_file():
        finish = (f"`ddpm train --resume --out {path}`" if config.distill is None else
                  f"`ddpm distill {config.distill.teacher} --steps {config.distill.steps} --out {path} --resume` "
                  f"(and the options it was started with)")
        raise UserError(f"{path} is not finished (its newest checkpoint is step {step} of {config.train.steps}); "
                        f"finish it with {finish} first")
    if config.diffusion.variance == "learned_range":
        raise UserError(f"{path} learns its variances (learned_range): distillation supports fixed-variance "
                        f"teachers only (DDIM does not use the variance, but the student network would keep "
                        f"the extra channels untrained)")
    return load(path, device=device, fast=False)


def _teacher_guidance(run: LoadedRun, path: Path, guidance, autoguidance, interval) -> tuple[float, float, tuple | None]:
    """(classifier-free scale, autoguidance scale, interval) of the first round's teacher: the
    run's sampling defaults (``ddpm sample``'s), or what the caller chose, checked as sampling checks them."""
    c = run.config
    if c.distill is not None:
        if (guidance, autoguidance, interval) != (None, None, None):
            raise UserError(f"{path} is distilled with its teacher's guidance baked in; --guidance, --autoguidance "
                            f"and --guidance-interval choose the guidance of a trained teacher only")
        return c.distill.teacher_guidance, c.distill.teacher_autoguidance, c.distill.teacher_guidance_interval
    if guidance is not None:
        if run.num_classes is None and guidance != 1:
            raise UserError(f"--guidance {guidance:g} needs a class-conditional teacher; {path} has no classes")
        try:
            guidance = check_guidance(guidance)
        except ValueError as exc:
            raise UserError(f"--guidance: {exc}") from None
    if autoguidance is not None and autoguidance != 1 and run.guide is None:
        raise UserError(f"--autoguidance {autoguidance:g} needs the run's guide network; {path} kept none "
                        f"(train.guide_at unset)")
    return (c.sample.guidance if guidance is None else guidance,
            (c.sample.autoguidance if autoguidance is None else autoguidance) if run.guide is not None else 1.0,
            resolve_interval(interval, c.sample.guidance_interval, run.schedule.num_timesteps))


def _student_config(run: LoadedRun, path: Path, steps, teacher_steps, iters, batch_size, lr, seed, max_minutes,
                    ckpt_every, log_every, match_round, guidance) -> tuple[TrainConfig, list[int]]:
    c, T = run.config, run.schedule.num_timesteps
    if c.distill is not None:  # a distilled teacher has exactly one grid: its own
        if teacher_steps not in (None, c.distill.steps):
            raise UserError(f"{path} is distilled for {c.distill.steps} steps: its grid is that one, not "
                            f"--teacher-steps {teacher_steps}")
        teacher_steps = c.distill.steps
        if steps >= teacher_steps:
            raise UserError(f"{path} is distilled for {teacher_steps} steps: it can be distilled to fewer "
                            f"(halved k >= 1 times), not to {steps}")
    teacher_steps = default_teacher_steps(T, steps) if teacher_steps is None else teacher_steps
    check_steps(T, teacher_steps, steps)
    match = match_round and c.distill is None  # a distilled teacher has its guidance baked in already
    plan = round_plan(teacher_steps, steps, match)
    w, auto, interval = _teacher_guidance(run, path, *guidance)
    distill = DistillConfig(
        teacher=str(path.resolve()), teacher_checkpoint=str(run.path.resolve()), teacher_steps=teacher_steps,
        steps=steps, iters_per_round=iters, teacher_step=run.step, teacher_guidance=w, teacher_autoguidance=auto,
        teacher_guidance_interval=interval, match_round=match)
    config = c.override(**{
        "diffusion.prediction": STUDENT_PREDICTION, "diffusion.clip_denoised": False,
        "sample.sampler": "ddim", "sample.steps": steps, "sample.eta": 0.0, "sample.guidance": 1.0,
        "sample.autoguidance": 1.0, "sample.guidance_interval": None, "train.steps": iters * len(plan), "train.seed": seed,
        "train.batch_size": batch_size or c.train.batch_size, "train.grad_accum": 1, "train.max_minutes": max_minutes,
        "train.ckpt_every": ckpt_every, "train.log_every": log_every, "train.guide_at": None,
        "optim.lr": lr or c.optim.lr, "name": f"{c.name.split('-distill')[0]}-distill{steps}"})
    return dataclasses.replace(config, distill=distill), plan


def _resumed_config(out: Path, config: TrainConfig) -> TrainConfig:
    saved = _read_config(out / "config.json")
    if saved.distill is None or dataclasses.replace(saved, train=config.train) != config:
        raise UserError(f"--resume: {out} holds another run or distillation than this command asks for "
                        f"(compare its config.json); resume it with the options it was started with")
    return saved


def _teacher_model(run: LoadedRun, d: DistillConfig):
    """The first round's teacher: the run's EMA network with the guidance ``d`` names combined,
    ``teacher(x_t, t, labels)`` (labels None for an unconditional run)."""
    distilled = run.config.distill is not None  # then its guidance is baked in already
    w = 1.0 if distilled else d.teacher_guidance
    auto = {} if distilled else run.guide_kwargs(d.teacher_autoguidance)
    interval = None if distilled else d.teacher_guidance_interval

    def teacher(x, t, labels=None):
        net = guided_model(run.model, labels, w, x.shape[0], x.device)
        if auto:
            net = autoguided_model(net, guided_model(auto["guide"], labels, w, x.shape[0], x.device),
                                   auto["autoguidance"])
        if interval is not None:  # as `ddpm sample` guides: only in the run's guidance interval
            net = interval_model(net, guided_model(run.model, labels, 1.0, x.shape[0], x.device), interval)
        return net(x, t)

    return teacher


def _loop(config: TrainConfig, plan: list[int], teacher_run: LoadedRun, out: Path, resume: bool, progress: bool,
          stop_at: int | None, device: torch.device, stack: contextlib.ExitStack) -> Path:
    c, d = config.train, config.distill
    dataset = open_training_data(teacher_run.config)
    stream = IndexStream(len(dataset), c.batch_size, c.seed)
    num_classes = config.model.num_classes
    schedule = config.diffusion.make_schedule().to(device)
    amp = resolve_amp(c.amp, device)
    student = build_model(config.model).to(device)
    student.load_state_dict(teacher_run.model.state_dict())  # round 1 starts from the teacher's weights
    teacher, r, it, k, round_s = _teacher_model(teacher_run, d), 0, 0, 0, 0.0
    optimizer = torch.optim.Adam(student.parameters(), lr=config.optim.lr)
    budget = TimeBudget(c.max_minutes)
    # threads follow the others' load where the clock drives the run anyway (a budget): a count that
    # changes can change an iteration's low bits, and a step-counted distillation resumes bit-exactly
    stack.enter_context(cpu_threads.follow_load(c.max_minutes is not None, device=device))
    latest = latest_verified_checkpoint(out) if resume else None
    if latest is not None:
        k = restore_training_state(latest, student, student, optimizer, time_budget=budget)
        state = read_state(latest)
        r, it, round_s = state["round"], state["round_iter"], state["round_elapsed_s"]
        if r > 0:
            teacher = build_model(config.model).to(device)
            teacher.load_state_dict(state["teacher"])
            teacher = frozen_copy(teacher)
    atomic_write_text(out / "config.json", config.to_json() + "\n")
    log_path = out / "log.jsonl"
    _drop_records_after(log_path, k)  # (refuses a planted link, as open_append does)
    log = stack.enter_context(open_append(log_path))
    signals = stack.enter_context(guards.stop_signals())
    gen, drop_gen = torch.Generator(device=device), torch.Generator(device=device)
    share = None if c.max_minutes is None else 60 * c.max_minutes / len(plan)  # seconds per round
    budget.start()
    while r < len(plan):
        n = plan[r]
        if it == 0:  # a new round (a mid-round checkpoint restored its teacher and optimizer instead)
            if r > 0:
                teacher = frozen_copy(student)  # Algorithm 2: the student becomes the teacher
            optimizer = torch.optim.Adam(student.parameters(), lr=config.optim.lr)
        student.train()
        bar = stack.enter_context(_round_bar(r, len(plan), n, d.iters_per_round, progress, initial=it,
                                             substeps=substeps(r, d.match_round)))
        t_round, round_before, sums, skipped_run, t_log = time.monotonic(), round_s, [0.0, 0, 0], 0, time.monotonic()
        stop = None
        while it < d.iters_per_round:
            round_s = round_before + time.monotonic() - t_round
            frac = 0.0 if share is None else round_s / share
            if share is not None and frac >= 1:
                break  # this round's share of the time budget is spent
            lr = round_lr(config.optim.lr, it, d.iters_per_round, frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen.manual_seed(iteration_seed(c.seed, k))
            x = get_batch(dataset, stream.batch(k)).to(device)
            labels = None
            if num_classes is not None:  # null labels at the run's rate: the student keeps its unconditional half
                labels = dataset.get_batch_labels(stream.batch(k)).to(device)
                drop_gen.manual_seed(iteration_seed(c.seed + 7919, k))
                drop = torch.rand(labels.shape, device=device, generator=drop_gen) < c.cond_drop_prob
                labels = torch.where(drop, num_classes, labels)
            with autocast(device, amp):  # the teacher run's train.amp: bf16 on a CPU that has it
                loss = distill_loss(student, teacher, schedule, x, n, generator=gen, labels=labels,
                                    teacher_prediction=teacher_run.config.diffusion.prediction if r == 0
                                    else STUDENT_PREDICTION,
                                    teacher_clip=teacher_run.config.diffusion.clip_denoised if r == 0 else False,
                                    teacher_substeps=substeps(r, d.match_round))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.optim.grad_clip or math.inf)
            finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
            if finite:
                optimizer.step()
                sums[0] += loss.item()
            sums[1 if finite else 2] += 1
            skipped_run = 0 if finite else skipped_run + 1
            it, k = it + 1, k + 1
            bar.update(1)
            cpu_threads.tick()
            left = "" if share is None else f", budget {max(0.0, share - round_s) / 60:.1f} min left"
            bar.set_postfix_str(f"N={n}, loss {loss.item():.4g}{left}", refresh=False)
            if skipped_run >= c.max_nonfinite:
                raise TrainingDiverged(f"distillation diverged: the last {skipped_run} iterations (up to {k}) had a "
                                       f"NaN/Inf loss or gradient; lower --lr and resume")
            if signals[0] is not None:
                stop = signals[0]
            elif stop_at is not None and k >= stop_at:
                stop = "stop_at"
            if k % c.log_every == 0 or it == d.iters_per_round or stop is not None:
                now = time.monotonic()
                record = {"round": r + 1, "N": n, "step": k, "loss": sums[0] / sums[1] if sums[1] else None, "lr": lr,
                          "skipped_nonfinite": sums[2], "it_per_s": (sums[1] + sums[2]) / max(now - t_log, 1e-9),
                          "elapsed_s": budget.elapsed()}
                log.write(json.dumps(record) + "\n")
                log.flush()
                sums, t_log = [0.0, 0, 0], now
            if stop is not None or (c.ckpt_every and k % c.ckpt_every == 0 and it < d.iters_per_round):
                _save(out, k, student, optimizer, config, budget, r, it, round_before + time.monotonic() - t_round,
                      teacher if r > 0 else None)
            if stop is not None:
                bar.close()
                if stop == "stop_at":
                    return out
                raise TrainingInterrupted(out, k, stop)
        bar.close()
        # End of the round: a preview at its N, a checkpoint from which the next round starts.
        student.eval()
        preview = dataclasses.replace(config, sample=dataclasses.replace(config.sample, steps=n))
        names = [f"round-{r + 1}-{n}steps.png"] + (["final.png"] if r == len(plan) - 1 else [])
        for name in names:  # final.png, as `ddpm train` ends: the mark of a finished run
            save_preview(student, schedule, preview, out / "samples" / name, device=device, amp="off")
        r, it, round_s = r + 1, 0, 0.0
        _save(out, k, student, optimizer, config, budget, r, 0, 0.0, None)
    return out


def _save(out: Path, k: int, student, optimizer, config: TrainConfig, budget: TimeBudget, r: int, it: int,
          round_s: float, teacher) -> None:
    state = {"step": k, "optimizer": optimizer.state_dict(), "rng": rng_states(0, 1), "data_position": k,
             "world_size": 1, "time_budget": budget.state_dict(), "round": r, "round_iter": it,
             "round_elapsed_s": round_s}
    if teacher is not None:  # mid-round: the round's teacher (the previous round's student) goes with it
        state["teacher"] = {key: v.detach().cpu().clone() for key, v in teacher.state_dict().items()}
    save_checkpoint(out, k, student, student, state, config, keep_last=config.train.keep_last)
