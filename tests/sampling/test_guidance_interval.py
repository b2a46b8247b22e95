"""Guidance in a limited interval (Kynkäänniemi et al. 2024) against the exact class-conditional
oracle of test_conditional.py: an interval over every step is today's guidance bit for bit, an
interval that holds no step is w = 1 (one network call per step), and guidance at high noise
only keeps the class's true distribution where guidance over the whole range collapses it."""

from __future__ import annotations

import pytest
import torch

from ddpm.core.schedules import NoiseSchedule
from ddpm.sampling.samplers import SAMPLERS, sample, timestep_grid
from gmm import GaussianMixture, energy_distance
from test_conditional import K, N, ConditionalOracle, _component

T = 1000
KW = {"ddpm": dict(steps=20), "ddim": dict(steps=20, eta=0.5), "dpm++2m": dict(steps=10)}


@pytest.fixture(scope="module")
def oracle_setup():
    schedule = NoiseSchedule.from_name("sqrt_linear", T)
    gmm = GaussianMixture(k=K, radius=1.0, std=0.1)
    truth = [energy_distance(_component(gmm, 0, N, s), _component(gmm, 0, N, s + 100)) for s in range(6)]
    return schedule, gmm, 2 * max(truth)


def draw(oracle_setup, interval, guidance=3.0, *, sampler="ddim", n=64, **kw):
    schedule, gmm, _ = oracle_setup
    oracle = ConditionalOracle(gmm, schedule)
    kw = {**KW[sampler], "clip_denoised": False, "generator": 5, **kw}
    x = sample(oracle, schedule, (n, 2), sampler=sampler, labels=torch.arange(n) % K, guidance=guidance,
               guidance_interval=interval, **kw)
    return x, [size for size, _ in oracle.calls]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_interval_over_every_step_is_todays_guidance_bit_for_bit(oracle_setup, sampler):
    guided, calls = draw(oracle_setup, None, sampler=sampler)
    full, calls_full = draw(oracle_setup, (0, T - 1), sampler=sampler)
    assert torch.equal(guided, full) and calls == calls_full == [128] * len(calls)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_interval_without_a_step_is_w_1_with_one_call_per_step(oracle_setup, sampler):
    grid = timestep_grid(T, KW[sampler]["steps"], "logsnr" if sampler == "dpm++2m" else "uniform",
                         schedule=oracle_setup[0]).tolist()
    lo = next(t for t in range(T) if t not in grid)  # an interval between two grid points
    hi = min(t for t in grid if t > lo) - 1
    outside, calls = draw(oracle_setup, (lo, hi), sampler=sampler)
    plain, _ = draw(oracle_setup, None, 1.0, sampler=sampler)
    assert torch.equal(outside, plain) and calls == [64] * len(grid)


def test_the_interval_splits_the_steps_and_counts_its_calls(oracle_setup):
    grid = timestep_grid(T, 20, "uniform").tolist()
    lo, hi = 300, 700
    _, calls = draw(oracle_setup, (lo, hi))
    assert calls == [128 if lo <= t <= hi else 64 for t in grid]


def test_guidance_at_high_noise_only_keeps_the_class_where_full_guidance_collapses_it(oracle_setup):
    schedule, gmm, bar = oracle_setup

    def distance(interval, guidance=3.0):
        oracle = ConditionalOracle(gmm, schedule)
        x = sample(oracle, schedule, (N, 2), sampler="ddim", steps=50, spacing="quad", clip_denoised=False,
                   generator=3, labels=0, guidance=guidance, guidance_interval=interval)
        return energy_distance(x, _component(gmm, 0, N, 7)), sum(n for n, _ in oracle.calls) / N

    full, full_calls = distance(None)
    high, high_calls = distance((700, T - 1))
    assert full > 50 * bar  # w = 3 everywhere narrows class 0 far below its true spread
    assert high < bar, (high, bar)  # w = 3 above t = 700 only: the class as it is
    assert full_calls == 100 and high_calls < 60  # and fewer network calls (2 per guided step, 1 otherwise)


def test_autoguidance_outside_the_interval_runs_the_model_alone(oracle_setup):
    schedule, gmm, _ = oracle_setup
    model_calls, guide_calls = [], []

    def model(x, t):
        model_calls.append(int(t[0]))
        return torch.zeros_like(x)

    def guide(x, t):
        guide_calls.append(int(t[0]))
        return torch.ones_like(x)

    sample(model, schedule, (4, 2), sampler="ddim", steps=10, generator=0, guide=guide, autoguidance=2.0,
           guidance_interval=(500, 999), clip_denoised=False)
    grid = timestep_grid(T, 10, "uniform").tolist()
    assert model_calls == grid and guide_calls == [t for t in grid if t >= 500]


@pytest.mark.parametrize("interval", [(5, 3), (-1, 10), (0, T), (0.5, 10), (1,), "0,10", (True, 10)])
def test_a_bad_interval_names_its_bounds(oracle_setup, interval):
    with pytest.raises(ValueError, match=rf"guidance_interval must be two model timesteps .* <= {T - 1}"):
        draw(oracle_setup, interval)
