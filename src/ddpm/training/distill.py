"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): N sampling steps become N / 2, round by round.

Notation (0-based model timesteps, as in ``ddpm.sampling.samplers``)::

    T                  training timesteps of the schedule; the model takes t in 0..T-1
    N                  the student's steps in a round; the teacher takes 2N on the same interval
    g^N_0 > ... > g^N_{N-1}   the N-step grid, ``distill_grid(T, N)``; g^N_N = -1 stands for x0
                       (abar_{-1} = 1: alpha = 1, sigma = 0), where the last DDIM step lands
    alpha_t, sigma_t   sqrt(abar_t), sqrt(1 - abar_t);  z_t = alpha_t x + sigma_t eps  (eq. 4)
    t, t', t''         g^N_i, g^2N_{2i+1}, g^N_{i+1}: one student step, two teacher steps
    x~                 the target: the x0 whose one DDIM step t -> t'' lands on the teacher's z_t''
    w(t)               the loss weight, truncated SNR max(alpha_t^2 / sigma_t^2, 1) (the paper's section 4)

Grid rule. The grids are diffusers' "trailing" spacing (``timestep_grid(T, N, "trailing")``):
g^N_i = round(T - i T / N) - 1, i = 0..N-1, which starts at T - 1 and, extended by g^N_N = -1,
ends at x0. Every other point of the 2N grid is the N grid (2i T / 2N = i T / N, exactly in float64
too), so one student step covers exactly two teacher steps. A distillation therefore starts from a
teacher grid of N0 <= T steps and ends at ``steps`` = N0 / 2^k, k >= 1 (``check_steps``); the
student samples with ``ddpm.sample(..., sampler="ddim", eta=0, spacing="trailing", steps=N,
prediction="v", clip_denoised=False)``.

Parametrisation. The student predicts v = alpha_t eps - sigma_t x (Salimans & Ho, appendix D), so
x0 = alpha_t z_t - sigma_t v stays well defined where alpha_t -> 0 (the first step of a one-step
student, zero terminal SNR), where eps-prediction divides by alpha_t and fails. The teacher may
use any parametrisation (it is converted to x0 by ``x0_eps_from_output``); a teacher that clips
x0 to [-1, 1] has its clipping baked into the targets, and the student is sampled unclipped, since
x~ itself lies outside the data range whenever the teacher's two steps do.

Guidance is baked in (Meng et al. 2023): the teacher of the first round is the guided model (a
callable that combines classifier-free guidance or autoguidance itself), so the student learns
the guided two-step map with one network call per step. With ``match_round`` that happens in a
round of its own first, Meng et al.'s stage one: the student takes the teacher's own grid
(N = teacher_steps) and one student step matches one guided teacher step (``teacher_substeps`` 1,
where the target x~ is the teacher's x0 prediction). The student there learns the guidance and its
new parametrisation (v, from a teacher that predicts eps) on the easiest target; the halvings that
follow have a v-prediction teacher of one network call instead of the guided two.

Each round (``distill``) initialises the student from the teacher's weights (the caller's student
in the first round), trains it with Adam on ``iters`` batches at a learning rate that decays
linearly to 0 over the round (as the paper anneals it), then freezes it as the next teacher. All
randomness of iteration k is drawn from a generator seeded by (seed, k), and the data of
iteration k is ``data(k)``, so a run stopped at iteration k and resumed is the uninterrupted run
bit for bit (``ddpm.training.distill_run``).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..core.diffusion import PREDICTIONS, check_choice, predict_eps_from_x0, split_output, x0_eps_from_output
from ..core.schedules import NoiseSchedule
from ..errors import UserError
from ..sampling.samplers import timestep_grid

__all__ = ["distill", "distill_grid", "check_steps", "round_steps", "round_plan", "distill_loss", "round_lr",
           "sample_kwargs", "STUDENT_PREDICTION", "SPACING"]

STUDENT_PREDICTION = "v"
SPACING = "trailing"


def distill_grid(T: int, steps: int) -> torch.Tensor:
    """The N = ``steps`` model timesteps of the N-step grid, descending: LongTensor (N,); see the
    module docstring ("Grid rule")."""
    return timestep_grid(T, steps, SPACING)


def check_steps(T: int, teacher_steps: int, steps: int) -> None:
    """A one-line UserError unless ``steps`` = ``teacher_steps`` / 2^k, k >= 1, and the teacher's
    grid fits in T timesteps."""
    for name, n in (("teacher steps", teacher_steps), ("--steps", steps)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"{name} must be a positive integer, got {n!r}")
    if teacher_steps > T:
        raise UserError(f"the teacher grid of {teacher_steps} steps does not fit in the schedule's T={T} timesteps")
    if steps >= teacher_steps:
        raise UserError(f"--steps {steps} is not fewer than the teacher's {teacher_steps} steps: distillation "
                        f"halves the steps, it cannot add any")
    k = teacher_steps // steps
    if teacher_steps % steps or k & (k - 1):
        allowed = ", ".join(str(teacher_steps >> j) for j in range(1, teacher_steps.bit_length()) if
                            (teacher_steps >> j) << j == teacher_steps)
        raise UserError(f"--steps {steps} is not the teacher's {teacher_steps} steps halved k >= 1 times; "
                        f"choose one of {allowed}")


def round_steps(teacher_steps: int, steps: int) -> list[int]:
    """The student's N of each halving: teacher_steps / 2, / 4, ..., ``steps``."""
    out, n = [], teacher_steps
    while n > steps:
        n //= 2
        out.append(n)
    return out


def round_plan(teacher_steps: int, steps: int, match_round: bool) -> list[int]:
    """The student's N of each round: the match round's teacher_steps first when asked for."""
    return ([teacher_steps] if match_round else []) + round_steps(teacher_steps, steps)


def substeps(r: int, match_round: bool) -> int:
    """Teacher steps per student step in round r: 1 in the match round, else 2."""
    return 1 if match_round and r == 0 else 2


def round_lr(lr: float, it: int, iters: int, time_fraction: float = 0.0) -> float:
    """Linear decay from ``lr`` to 0 over a round, by iterations or by the round's share of a time
    budget, whichever is further (as ``ddpm.training.budget.schedule_progress``)."""
    return lr * (1.0 - min(1.0, max(it / iters, time_fraction)))


def sample_kwargs(steps: int) -> dict:
    """``ddpm.sample``'s options for an N-step student: one DDIM step per grid point."""
    return {"sampler": "ddim", "steps": steps, "eta": 0.0, "spacing": SPACING, "prediction": STUDENT_PREDICTION,
            "clip_denoised": False}


def _call(model, x: torch.Tensor, t: torch.Tensor, labels) -> torch.Tensor:
    out = model(x, t) if labels is None else model(x, t, labels)
    doubled = out.ndim == x.ndim > 1 and out.shape[1] == 2 * x.shape[1]  # a learned variance: not used by DDIM
    # Under autocast the output is half precision: the DDIM arithmetic and the loss stay in x's dtype.
    return split_output(out, x.shape, "learned_range" if doubled else "fixed_small")[0].to(x.dtype)


def _ddim_step(schedule, model, z, t, ab_next, labels, prediction, clip):
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with sigma = 0) from t to the timestep
    of abar ``ab_next`` (B,): (z_next, x0_pred)."""
    x0, eps = x0_eps_from_output(schedule, z, t, _call(model, z, t, labels), prediction)
    if clip:  # as the sampler clips: eps follows the clipped x0
        x0 = x0.clamp(-1.0, 1.0)
        eps = predict_eps_from_x0(schedule, z, t, x0)
    shape = (-1,) + (1,) * (z.ndim - 1)
    a, s = ab_next.sqrt().view(shape).to(z.dtype), (1 - ab_next).sqrt().view(shape).to(z.dtype)
    return a * x0 + s * eps, x0


def distill_loss(student, teacher, schedule: NoiseSchedule, x: torch.Tensor, steps: int, *,
                 generator: torch.Generator, labels: torch.Tensor | None = None, teacher_prediction: str = "eps",
                 teacher_clip: bool = False, teacher_substeps: int = 2) -> torch.Tensor:
    """Algorithm 2's loss for one batch ``x`` (B, ...) of data: the student's one step on the
    N-step grid (N = ``steps``) against the teacher's two on the 2N grid (``teacher_substeps`` 1:
    one on the N grid, the match round), weighted by truncated SNR. ``generator`` (on x's device)
    draws the grid index and the noise; the teacher runs without gradients; ``labels`` (B,) go to
    both networks when given."""
    check_choice("teacher_prediction", teacher_prediction, PREDICTIONS)
    B, device, T, k = x.shape[0], x.device, schedule.num_timesteps, teacher_substeps
    ab = schedule.alphas_cumprod.to(device)
    fine = distill_grid(T, k * steps).to(device)
    ab_fine = torch.cat([ab[fine], ab.new_ones(1)])  # abar at g^kN_0..g^kN_{kN-1}, then 1 (x0)
    # Algorithm 2, lines 3-5: x ~ data, t = g^N_i with i ~ U{0..N-1}, eps ~ N(0, I), z_t = alpha_t x + sigma_t eps.
    i = torch.randint(0, steps, (B,), device=device, generator=generator)
    eps = torch.randn(x.shape, device=device, generator=generator, dtype=x.dtype)
    t, ab_t, ab_t2 = fine[k * i], ab_fine[k * i], ab_fine[k * i + k]
    shape = (-1,) + (1,) * (x.ndim - 1)
    alpha_t, sigma_t = ab_t.sqrt().view(shape), (1 - ab_t).sqrt().view(shape)
    z = alpha_t.to(x.dtype) * x + sigma_t.to(x.dtype) * eps
    with torch.no_grad():
        # Lines 6-7: two DDIM steps of the teacher, t -> t' -> t'' (one, t -> t'', in the match round).
        z2 = z
        for j in range(k):
            z2, _ = _ddim_step(schedule, teacher, z2, fine[k * i + j], ab_fine[k * i + j + 1], labels,
                               teacher_prediction, teacher_clip)
        # Line 8: x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t);
        # at the last step (t'' = x0: sigma_t'' = 0) x~ is the teacher's z_t'' itself.
        alpha2, sigma2 = ab_t2.sqrt().view(shape), (1 - ab_t2).clamp(min=0).sqrt().view(shape)
        ratio = sigma2 / sigma_t
        target = (z2.double() - ratio * z.double()) / (alpha2 - ratio * alpha_t)
        target = target.to(x.dtype)
    # Line 9: the student's x0 from its v, and the truncated-SNR weight max(SNR_t, 1).
    out = _call(student, z, t, labels)
    x0_student, _ = x0_eps_from_output(schedule, z, t, out, STUDENT_PREDICTION)
    weight = (ab_t / (1 - ab_t)).clamp(min=1.0).to(x.dtype)
    per_item = ((target - x0_student) ** 2).flatten(1).mean(1)
    return (weight * per_item).mean()


def distill(teacher: Callable, schedule: NoiseSchedule, student: torch.nn.Module, data: Callable, *, steps: int,
            teacher_steps: int, iters: int | list[int] = 1000, lr: float = 1e-4, seed: int = 0,
            teacher_prediction: str = "eps", teacher_clip: bool = False, grad_clip: float = 1.0,
            match_round: bool = False, progress: bool = False, on_round: Callable | None = None) -> torch.nn.Module:
    """Distil ``teacher`` (a callable ``model(x_t, t)`` or ``model(x_t, t, labels)``, guidance combined,
    in ``teacher_prediction``) on a ``teacher_steps`` DDIM grid into a v-prediction ``student`` of
    ``steps`` DDIM steps, halving the steps each round (Salimans & Ho 2022, Algorithm 2).

    ``student`` (an ``nn.Module``, trained in place and returned) is the first round's initial
    network, e.g. the teacher network itself or a fresh one. ``data(k)`` returns the batch x (B, ...)
    of iteration k (counted over all rounds), or (x, labels). ``iters``: iterations per round, one
    number or one per round. ``match_round`` adds a first round on the teacher's own grid (see the
    module docstring). ``on_round(round, N, student)`` is called after each round. Sample the
    result with ``ddpm.sample(student, schedule, shape, **ddpm.training.distill.sample_kwargs(steps))``.
    """
    check_steps(schedule.num_timesteps, teacher_steps, steps)
    plan = round_plan(teacher_steps, steps, match_round)
    iters = [iters] * len(plan) if isinstance(iters, int) else list(iters)
    if len(iters) != len(plan) or min(iters) < 1:
        raise ValueError(f"iters must be a positive number or one per round ({len(plan)}), got {iters}")
    device = next(student.parameters()).device
    gen = torch.Generator(device=device)
    k = 0
    for r, (n, n_iters) in enumerate(zip(plan, iters)):
        optimizer = torch.optim.Adam(student.parameters(), lr=lr)
        bar = _round_bar(r, len(plan), n, n_iters, progress, substeps=substeps(r, match_round))
        for it in range(n_iters):
            for group in optimizer.param_groups:
                group["lr"] = round_lr(lr, it, n_iters)
            gen.manual_seed(iteration_seed(seed, k))
            x, labels = split_batch(data(k))
            loss = distill_loss(student, teacher, schedule, x.to(device), n, generator=gen, labels=labels,
                                teacher_prediction=teacher_prediction if r == 0 else STUDENT_PREDICTION,
                                teacher_clip=teacher_clip and r == 0, teacher_substeps=substeps(r, match_round))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip or math.inf)
            if torch.isfinite(loss) and torch.isfinite(norm):  # a non-finite step is skipped
                optimizer.step()
            k += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        bar.close()
        if on_round is not None:
            on_round(r, n, student)
        # Algorithm 2, end of the outer loop: the student becomes the teacher, N halves.
        teacher = frozen_copy(student)
    return student


def iteration_seed(seed: int, k: int) -> int:
    """The generator seed of iteration k: the grid index and noise depend on (seed, k) alone."""
    return (seed * 1_000_003 + k) % (2**63)


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    return batch if isinstance(batch, tuple) else (batch, None)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The student of a finished round as the next round's teacher: a copy without gradients."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def _round_bar(r: int, rounds: int, n: int, iters: int, progress: bool, initial: int = 0, substeps: int = 2):
    what = f"{2 * n}->{n} steps" if substeps == 2 else f"{n} steps, the guided teacher's"
    return tqdm(total=iters, initial=initial, desc=f"round {r + 1}/{rounds}: {what}", unit="it",
                dynamic_ncols=True, disable=not progress)
