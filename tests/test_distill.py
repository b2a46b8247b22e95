"""Progressive distillation (ddpm.training.distill): the grid rule, the oracle test, runs and their resume.

The oracle: the teacher is the exact eps of the Gaussian mixture of tests/gmm.py, distilled into a
small MLP from a 64-step grid down to 4 steps. The 4-step student must be inside the truth-vs-truth
bar of the energy distance, while 4 DDIM steps of the exact teacher are far outside it (the
negative control: what the distillation buys).
"""

from __future__ import annotations

import pytest
import torch

import ddpm
from ddpm.errors import UserError
from ddpm.training.distill import check_steps, distill, distill_grid, round_steps, sample_kwargs
from gmm import GaussianMixture, energy_distance

N = 2000


def test_grids_nest_and_end_at_x0():
    for T, n in ((1000, 4), (1000, 64), (1000, 500), (1024, 8), (77, 2)):
        coarse, fine = distill_grid(T, n), distill_grid(T, 2 * n) if 2 * n <= T else None
        assert int(coarse[0]) == T - 1 and bool((coarse[:-1] > coarse[1:]).all())
        if fine is not None:
            assert torch.equal(fine[::2], coarse)  # one student step = two teacher steps
    assert torch.equal(distill_grid(1000, 4), torch.tensor([999, 749, 499, 249]))


def test_steps_rule():
    check_steps(1000, 64, 4)
    assert round_steps(64, 4) == [32, 16, 8, 4]
    for teacher_steps, steps, match in ((64, 3, "halved"), (64, 64, "not fewer"), (64, 128, "not fewer"),
                                        (2000, 4, "does not fit"), (48, 5, "choose one of 24, 12, 6, 3")):
        with pytest.raises(UserError, match=match):
            check_steps(1000, teacher_steps, steps)


def test_oracle_student_in_four_steps_matches_the_mixture():
    torch.manual_seed(0)
    schedule = ddpm.NoiseSchedule.from_name("sqrt_linear", 1000)
    gmm = GaussianMixture(k=8, radius=1.0, std=0.1)
    gen = torch.Generator().manual_seed(123)
    bar = 2 * max(energy_distance(gmm.sample(N, gen), gmm.sample(N, gen)) for _ in range(6))
    fresh = gmm.sample(N, torch.Generator().manual_seed(9))
    teacher = gmm.eps_oracle(schedule)
    student = ddpm.MLPDenoiser(ddpm.MLPConfig(dim=2, hidden=64, depth=3))
    data = lambda k: gmm.sample(256, torch.Generator().manual_seed(10_000 + k))  # noqa: E731
    distill(teacher, schedule, student, data, steps=4, teacher_steps=64, iters=[1500, 200, 200, 200], lr=2e-3)
    x = ddpm.sample(student, schedule, (N, 2), generator=1, **sample_kwargs(4))
    plain = ddpm.sample(teacher, schedule, (N, 2), sampler="ddim", steps=4, spacing="trailing", generator=1)
    assert energy_distance(x, fresh) < bar
    assert energy_distance(plain, fresh) > 10 * bar  # negative control: 4 plain DDIM steps of the exact teacher
