"""Samplers against an analytic oracle (a 2-D Gaussian mixture's exact eps), closed forms and properties.

The oracle is exact, so whatever error remains is the sampler's own discretisation; a model whose
time is off by a few steps must be told apart from it. Two energy distances are used (tests/gmm.py):
of the 2-D points, and of their residuals to the nearest component mean in units of its std (the
components' spread, which a wrong time changes first). Thresholds are twice the largest value seen
between independent draws of the true mixture.

What every sampler must do whatever its algorithm (shapes, dtypes, seeds, x_T, trajectories, x0/v
predictions, options) is tested over all of them in test_sampler_contract.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.sampling.samplers import SAMPLERS, gaussian_noise, per_sample_seeds, sample, timestep_grid
from ddpm.core.schedules import NoiseSchedule
from gmm import GaussianMixture

N = 4000  # points per oracle run


@pytest.fixture(scope="module")
def setup():
    schedule = NoiseSchedule.from_name("sqrt_linear", 1000)  # the paper's linear betas
    gmm = GaussianMixture(k=8, radius=1.0, std=0.1)
    gen = torch.Generator().manual_seed(1)
    ref = gmm.sample(N, gen)
    truth = np.array([gmm.distances(gmm.sample(N, gen), ref) for _ in range(6)])
    return schedule, gmm, ref, 2 * truth.max(0)


def _draw(setup, time_shift=0, **kw):
    schedule, gmm, _, _ = setup
    kw.setdefault("clip_denoised", False)  # the mixture reaches beyond [-1, 1]
    return sample(gmm.eps_oracle(schedule, time_shift), schedule, (N, 2), generator=3, **kw)


def _passes(setup, x):
    _, gmm, ref, threshold = setup
    dist = np.array(gmm.distances(x, ref))
    return bool(np.all(dist <= threshold)), dist, threshold


@pytest.mark.parametrize(
    "kw",
    [
        dict(sampler="ddpm"),  # Algorithm 2 with all T = 1000 steps
        dict(sampler="ddpm", variance="fixed_large"),
        # The DDIM paper's quadratic spacing: with "uniform" 50 steps the last step jumps from
        # t=20 (noise std 0.05, half a component's std) to x0 and the components come out 6% too
        # narrow, more than the errors this test must catch (see test_ddim_quad_beats_uniform).
        dict(sampler="ddim", steps=50, spacing="quad"),
        dict(sampler="dpm++2m", steps=20),
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_oracle_reproduces_mixture(setup, kw):
    ok, dist, threshold = _passes(setup, _draw(setup, **kw))
    assert ok, f"energy distances {dist} above {threshold}"


@pytest.mark.parametrize("shift", [5, -5])
def test_oracle_with_wrong_time_fails(setup, shift):
    ok, dist, threshold = _passes(setup, _draw(setup, time_shift=shift, sampler="ddpm"))
    assert not ok, f"a model {shift:+d} steps off passed: {dist} <= {threshold}"


def test_ddim_off_by_one_grid_step_fails(setup):
    # The classic respacing bug: the model sees the next grid point's timestep.
    schedule, gmm, _, _ = setup
    grid = timestep_grid(1000, 50, "quad")
    next_t = torch.zeros(1000, dtype=torch.long)
    next_t[grid] = torch.cat([grid[1:], grid.new_zeros(1)])
    oracle = gmm.eps_oracle(schedule)
    x = sample(lambda x, t: oracle(x, next_t[t]), schedule, (N, 2), sampler="ddim", steps=50,
               spacing="quad", clip_denoised=False, generator=3)
    assert not _passes(setup, x)[0]


def test_ddim_quad_beats_uniform(setup):
    _, gmm, ref, _ = setup
    quad = gmm.distances(_draw(setup, sampler="ddim", steps=50, spacing="quad"), ref)
    uniform = gmm.distances(_draw(setup, sampler="ddim", steps=50, spacing="uniform"), ref)
    assert quad[1] * 3 < uniform[1]


def test_dpmpp_2m_beats_ddim_at_10_steps(setup):
    _, gmm, ref, threshold = setup
    dpm = np.array(gmm.distances(_draw(setup, sampler="dpm++2m", steps=10), ref))
    ddim = np.array(gmm.distances(_draw(setup, sampler="ddim", steps=10), ref))
    assert np.all(dpm * 3 < ddim), (dpm, ddim)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_variance_matches_closed_form(variance):
    """For Gaussian data N(0, s^2 I) every step is linear: x_{t-1} = m_t x_t + sigma_t z with
    m_t = coef1_t k_t + coef2_t and k_t = sqrt(abar_t) s^2 / (abar_t s^2 + 1 - abar_t) (the exact
    E[x0 | x_t] = k_t x_t), so Var(x0) follows a scalar recursion. fixed_small ends 8% narrower
    than the data and fixed_large about right: the samples must follow their own prediction."""
    s, schedule = 0.05, NoiseSchedule.from_name("sqrt_linear", 1000)
    ab = schedule.alphas_cumprod.numpy()
    m = schedule.posterior_mean_coef1.numpy() * np.sqrt(ab) * s**2 / (ab * s**2 + 1 - ab)
    m += schedule.posterior_mean_coef2.numpy()
    step_var = (schedule.posterior_variance if variance == "fixed_small" else schedule.betas).numpy()
    var = 1.0
    for t in range(999, -1, -1):
        var = m[t] ** 2 * var + (step_var[t] if t > 0 else 0.0)
    gauss = GaussianMixture(k=1, radius=0.0, std=s)
    x = sample(gauss.eps_oracle(schedule), schedule, (N, 2), variance=variance, clip_denoised=False, generator=5)
    assert abs(x.double().std().item() / math.sqrt(var) - 1) < 0.03


def test_clipping_bounds_the_result(setup):
    # Components at radius 1 with std 0.1: about 1 coordinate in 8 lies outside [-1, 1].
    for sampler, steps in [("ddpm", 50), ("ddim", 20), ("dpm++2m", 10)]:
        clipped = _draw(setup, sampler=sampler, steps=steps, clip_denoised=True)
        free = _draw(setup, sampler=sampler, steps=steps, clip_denoised=False)
        assert clipped.abs().max() <= 1.0
        assert (free.abs() > 1.0).float().mean() > 0.05


def test_ddim_eta1_full_grid_equals_ddpm(setup):
    schedule, gmm, _, _ = setup
    x_T = gaussian_noise(per_sample_seeds(11, 256), 0, (256, 2), torch.float64)
    for clip in (False, True):
        kw = dict(x_T=x_T, generator=11, clip_denoised=clip, return_trajectory=True)
        ddpm, tr_ddpm = sample(gmm.eps_oracle(schedule), schedule, (256, 2), sampler="ddpm", **kw)
        ddim, tr_ddim = sample(gmm.eps_oracle(schedule), schedule, (256, 2), sampler="ddim", steps=1000,
                               eta=1.0, spacing="uniform", **kw)
        torch.testing.assert_close(tr_ddim["x_t"], tr_ddpm["x_t"], rtol=0, atol=1e-9)
        torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-9)


def test_gaussian_noise_is_standard_normal_and_exact():
    z = gaussian_noise(per_sample_seeds(0, 1000), 3, (1000, 50)).double()
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.02
    assert abs((z**4).mean().item() - 3) < 0.1  # kurtosis of a normal
    assert torch.corrcoef(torch.stack([z[:, 0], z[:, 1], z[:, 2]])).triu(1).abs().max() < 0.1
    # The hash in pure Python integers: int64 tensor arithmetic must wrap exactly like it.
    mask = (1 << 64) - 1

    def mix(v):
        v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & mask
        v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & mask
        return v ^ (v >> 31)

    seed = int(per_sample_seeds(0, 1)[0]) & mask
    h = mix((mix((seed + 4 * 0x9E3779B97F4A7C15) & mask) + 2 * 0x9E3779B97F4A7C15) & mask)
    u1, u2 = ((h >> 32) + 0.5) / 2**32, ((h & 0xFFFFFFFF) + 0.5) / 2**32
    expected = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
    assert gaussian_noise(per_sample_seeds(0, 1), 3, (1, 2), torch.float64)[0, 1].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("T,S", [(1000, 10), (1000, 50), (1000, 30), (1000, 1000), (10, 7), (7, 3), (100, 1)])
def test_timestep_grids(T, S):
    schedule = NoiseSchedule.from_name("cosine", T)
    for spacing in ("uniform", "leading", "trailing", "quad", "logsnr"):
        grid = timestep_grid(T, S, spacing, schedule=schedule)
        assert grid.dtype == torch.long and grid.shape == (S,)
        assert torch.all(grid[:-1] > grid[1:]) and grid.min() >= 0 and grid.max() <= T - 1, (spacing, grid)
    if S > 1:
        assert timestep_grid(T, S, "uniform")[[0, -1]].tolist() == [T - 1, 0]
        assert torch.equal(timestep_grid(T, S, "leading"), torch.arange(S - 1, -1, -1) * (T // S))
        assert timestep_grid(T, S, "trailing")[0] == T - 1
    if (T, S) == (1000, 10):
        # The DDIM paper's code: seq = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2].
        paper = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]
        assert timestep_grid(T, S, "quad").flip(0).tolist() == paper


def test_bad_inputs_raise_value_errors_naming_them(setup):
    schedule, gmm, _, _ = setup
    oracle = gmm.eps_oracle(schedule)
    cases = [
        (dict(sampler="euler"), ["euler", "ddpm", "ddim", "dpm++2m"]),
        (dict(sampler="ddim", spacing="cubic"), ["cubic", "uniform", "trailing", "logsnr"]),
        (dict(prediction="score"), ["score", "eps", "v"]),
        (dict(variance="learned"), ["learned", "fixed_small", "fixed_large"]),
        (dict(steps=0), ["steps", "0", "1000"]),
        (dict(sampler="ddim", steps=1001), ["steps", "1001"]),
        (dict(sampler="ddim", eta=1.5), ["eta", "1.5"]),
        (dict(sampler="ddpm", eta=0.5), ["eta", "ddim"]),
        (dict(x_T=torch.zeros(3, 2)), ["x_T", "(3, 2)"]),
        (dict(generator=[1, 2, 3]), ["seeds", "(3,)"]),
    ]
    for kw, words in cases:
        with pytest.raises(ValueError) as info:
            sample(oracle, schedule, (4, 2), **kw)
        assert all(w in str(info.value) for w in words), (kw, str(info.value))
    for shape in [(4,), (0, 2), (4.0, 2)]:
        with pytest.raises(ValueError, match="shape"):
            sample(oracle, schedule, shape)
    with pytest.raises(ValueError, match="schedule"):
        timestep_grid(1000, 10, "logsnr")
    with pytest.raises(ValueError, match="output shape"):
        sample(lambda x, t: x[:, :1], schedule, (4, 2), steps=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddpm", dict(variance="fixed_large")), ("ddim", dict(eta=0.5)),
                                        ("dpm++2m", {})])
def test_cuda_runs_without_per_step_sync_and_matches_cpu(setup, sampler, kw):
    import warnings

    schedule, gmm, _, _ = setup
    cuda_schedule = schedule.to("cuda")
    oracle = gmm.eps_oracle(cuda_schedule)

    def syncs(steps):
        # Count synchronising CUDA calls: the set-up may have a fixed few, the loop none.
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                x = sample(oracle, schedule, (512, 2), sampler=sampler, steps=steps, generator=4, device="cuda", **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return x, sum("synchroniz" in str(w.message) for w in caught)

    (_, few), (x, many) = syncs(4), syncs(40)
    assert many == few, f"{many - few} extra synchronisations over 36 more steps"
    cpu = sample(gmm.eps_oracle(schedule), schedule, (512, 2), sampler=sampler, steps=40, generator=4, **kw)
    torch.testing.assert_close(x.cpu(), cpu, rtol=0, atol=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)
    assert sample(oracle, schedule, (8, 2), sampler=sampler, steps=5, generator=gen, device="cuda", **kw).is_cuda


def test_zero_terminal_snr_with_v_prediction_runs():
    # Lin et al. 2023: abar_{T-1} = 0, lambda = -inf there; only v (or x0) prediction can start from it.
    schedule = NoiseSchedule.from_name("sqrt_linear", 1000, rescale_to_zero_terminal_snr=True)
    assert timestep_grid(1000, 10, "logsnr", schedule=schedule)[0] == 999
    for sampler, steps in [("ddpm", 20), ("ddim", 10), ("dpm++2m", 10)]:
        x = sample(lambda x, t: torch.tanh(x), schedule, (16, 2), sampler=sampler, steps=steps, prediction="v",
                   generator=0)
        assert torch.isfinite(x).all(), sampler


@pytest.mark.parametrize("steps", [1, 2, 3, 100])
def test_every_sampler_spacing_and_variance_runs(steps):
    schedule = NoiseSchedule.from_name("cosine", 100)
    for sampler in SAMPLERS:
        for spacing in ("uniform", "leading", "trailing", "quad", "logsnr"):
            for variance in ("fixed_small", "fixed_large"):
                x = sample(lambda x, t: 0.5 * x, schedule, (3, 2), sampler=sampler, steps=steps, spacing=spacing,
                           variance=variance, generator=0)
                assert torch.isfinite(x).all(), (sampler, spacing, variance)
