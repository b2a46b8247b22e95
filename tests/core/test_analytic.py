"""Analytic-DPM (Bao et al. 2022) on the Gaussian oracle, where everything is known in closed form.

For data x0 ~ N(mu, s^2 I), the exact noise predictor is eps*(x_t) = sqrt(1-abar)(x_t - sqrt(abar) mu)
/ (abar s^2 + 1 - abar), so Gamma_t = E||eps*||^2/d = (1 - abar_t)/(abar_t s^2 + 1 - abar_t) and
Var[x0 | x_t] = s^2 (1 - abar_t)/(abar_t s^2 + 1 - abar_t). The optimal reverse variance is then
beta~_t + c_t^2 Var[x0 | x_t], and with it ancestral sampling is exact for Gaussian data at any
number of steps (the true reverse conditionals are Gaussian with exactly that variance).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.core.analytic import AnalyticVariance, analytic_variance, reverse_variances
from ddpm.core.diffusion import respaced_schedule
from ddpm.core.nll import nll_bpd
from ddpm.sampling.samplers import sample, timestep_grid
from ddpm.core.schedules import NoiseSchedule
from gmm import GaussianMixture

S_DATA, T, N = 0.3, 100, 4000


@pytest.fixture(scope="module")
def setup():
    gauss = GaussianMixture(k=1, radius=0.5, std=S_DATA)  # N((0.5, 0), 0.3^2 I)
    schedule = NoiseSchedule.from_name("cosine", T)
    data = gauss.sample(N, torch.Generator().manual_seed(0))
    oracle = gauss.eps_oracle(schedule)
    estimate = analytic_variance(oracle, schedule, data, num=N, batch_size=1000, data_range=None,
                                 generator=torch.Generator().manual_seed(1))
    return schedule, oracle, data, estimate


def exact_gamma(schedule):
    ab = schedule.alphas_cumprod
    return (1 - ab) / (ab * S_DATA**2 + 1 - ab)


def closed_form_variances(schedule):
    ab = schedule.alphas_cumprod
    var_x0 = S_DATA**2 * (1 - ab) / (ab * S_DATA**2 + 1 - ab)  # Var[x0 | x_t] of Gaussian data
    out = schedule.posterior_variance + schedule.posterior_mean_coef1**2 * var_x0
    out[0] = schedule.posterior_variance[1]  # the decoder step keeps fixed_small's clipped beta~
    return out


def test_gamma_estimate_matches_closed_form(setup):
    schedule, _, _, estimate = setup
    gamma = exact_gamma(schedule)
    # ||eps*||^2/d = Gamma chi^2_2 / 2 per example: standard error Gamma / sqrt(N).
    z = (estimate.gamma - gamma) / (gamma / math.sqrt(N))
    assert z.abs().max() < 5, z.abs().max()
    assert estimate.num_examples == N and estimate.data_range is None
    assert estimate.data_variance == pytest.approx(S_DATA**2, rel=0.05)


def test_variances_match_closed_form(setup):
    schedule, _, _, estimate = setup
    want = closed_form_variances(schedule)
    torch.testing.assert_close(AnalyticVariance(exact_gamma(schedule), None).variances(schedule), want,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(estimate.variances(schedule), want, rtol=1e-2, atol=0)
    # Between the DDPM paper's two choices, which it beats (next test): beta~ <= sigma*^2 <= beta / alpha.
    assert (want[1:] >= schedule.posterior_variance[1:]).all()
    assert (want[1:] <= (schedule.betas / schedule.alphas)[1:]).all()


def test_respaced_variances_equal_theorem_1_and_bao_et_al_code():
    schedule = NoiseSchedule.from_name("sqrt_linear", 1000)
    g = torch.Generator().manual_seed(3)
    gamma = torch.rand(1000, generator=g, dtype=torch.float64) * 1.1  # some above 1: clipped
    grid = timestep_grid(1000, 20, "quad").flip(0)
    got = AnalyticVariance(gamma).variances(schedule, grid).numpy()
    # Theorem 1 as printed, lambda^2 = beta~ of the respaced chain, V clipped to [0, 1] (data in [-1, 1]).
    chain = respaced_schedule(schedule, grid)
    ab, ab_prev, alpha = (chain.alphas_cumprod.numpy(), chain.alphas_cumprod_prev.numpy(), chain.alphas.numpy())
    lam2 = chain.posterior_variance.numpy()
    g_grid = gamma[grid].numpy()
    with np.errstate(invalid="ignore"):
        coef2 = (np.sqrt((1 - ab) / alpha) - np.sqrt(1 - ab_prev - lam2)) ** 2
    score_term = np.clip(1 - g_grid, 0, ab / (1 - ab))  # V = (1 - ab)/ab (1 - Gamma) <= 1
    theorem = lam2 + coef2 * score_term
    np.testing.assert_allclose(got[1:], theorem[1:], rtol=1e-9)
    # Bao et al.'s sampler code, written on the original timesteps s < r of each step.
    abar = schedule.alphas_cumprod.numpy()
    for i in range(1, len(grid)):
        s, r = int(grid[i - 1]), int(grid[i])
        skip_beta = 1 - abar[r] / abar[s]
        small = skip_beta * (1 - abar[s]) / (1 - abar[r])
        cov = np.clip((1 - abar[r]) / abar[r] * (1 - g_grid[i]), 0.0, 1.0)
        assert got[i] == pytest.approx(small + abar[s] * skip_beta**2 / (1 - abar[r]) ** 2 * cov, rel=1e-9)
    assert got[0] == pytest.approx(chain.posterior_variance[1].item(), rel=1e-12)


def test_clipping_bounds():
    schedule = NoiseSchedule.from_name("cosine", 50)
    small, c2 = schedule.posterior_variance, schedule.posterior_mean_coef1**2
    ab = schedule.alphas_cumprod
    zero, over = torch.zeros(50, dtype=torch.float64), torch.full((50,), 1.5, dtype=torch.float64)
    # Gamma = 0: V = (1-ab)/ab, clipped at ((b - a)/2)^2 and at the data variance.
    torch.testing.assert_close(reverse_variances(schedule, zero)[1:], (small + c2 * ((1 - ab) / ab).clamp(max=1))[1:])
    torch.testing.assert_close(reverse_variances(schedule, zero, (0.0, 1.0))[1:],
                               (small + c2 * ((1 - ab) / ab).clamp(max=0.25))[1:])
    torch.testing.assert_close(reverse_variances(schedule, zero, None, 0.1)[1:],
                               (small + c2 * ((1 - ab) / ab).clamp(max=0.1))[1:])
    # Gamma > 1 (Monte Carlo noise): the posterior variance.
    torch.testing.assert_close(reverse_variances(schedule, over)[1:], small[1:])
    # At abar = 0 (zero terminal SNR) only a bound on the data keeps the variance finite.
    zsnr = NoiseSchedule.from_name("cosine", 50, rescale_to_zero_terminal_snr=True)
    assert torch.isfinite(reverse_variances(zsnr, torch.ones(50, dtype=torch.float64))).all()
    with pytest.raises(ValueError, match="infinite"):
        reverse_variances(zsnr, torch.ones(50, dtype=torch.float64) * 0.5, None)


def test_analytic_bound_is_no_worse_than_the_fixed_variances(setup):
    schedule, oracle, data, _ = setup
    est = AnalyticVariance(exact_gamma(schedule), None)
    out = {}
    for variance in ("fixed_small", "fixed_large", "analytic"):
        # The same generator seed: every variance sees the same x_t, so differences are not noise.
        out[variance] = nll_bpd(oracle, schedule, data[:2000], variance=variance, analytic=est, decoder="continuous",
                                batch_size=500, generator=torch.Generator().manual_seed(5))
    for fixed in ("fixed_small", "fixed_large"):
        assert out["analytic"]["bpd"] < out[fixed]["bpd"] - 0.01, (fixed, out[fixed]["bpd"], out["analytic"]["bpd"])
        # Term by term it is the minimiser of the expected KL (up to the sample's own mean of ||mu~ - mu||^2).
        assert (out["analytic"]["terms_bpd"] <= out[fixed]["terms_bpd"] + 1e-6).all()


@pytest.mark.parametrize("steps", [5, 10])
def test_ancestral_sampling_with_analytic_variances_is_exact_on_gaussian_data(setup, steps):
    schedule, oracle, _, estimate = setup
    var = {}
    exact = AnalyticVariance(exact_gamma(schedule), None)
    for variance, analytic in (("fixed_small", None), ("fixed_large", None), ("analytic", exact),
                               ("estimated", estimate)):
        x = sample(oracle, schedule, (20000, 2), steps=steps, variance=variance.replace("estimated", "analytic"),
                   analytic=analytic, clip_denoised=False, generator=3)
        var[variance] = x.double().var(0).mean().item()
        torch.testing.assert_close(x.double().mean(0), torch.tensor([0.5, 0.0], dtype=torch.float64), atol=0.02,
                                   rtol=0)
    # The sample variance of 2 x 20000 draws has a standard error of 0.7% of s^2.
    assert var["analytic"] == pytest.approx(S_DATA**2, rel=0.03), var
    # With Gamma estimated from 4000 examples (1.6% error, amplified by (1 - abar)/abar on a coarse grid).
    assert var["estimated"] == pytest.approx(S_DATA**2, rel=0.08), var
    assert var["fixed_small"] < 0.6 * S_DATA**2 and var["fixed_large"] > 1.4 * S_DATA**2, var


def test_save_load_and_errors(tmp_path, setup):
    schedule, oracle, data, _ = setup
    est = analytic_variance(oracle, schedule, data, num=64, timesteps=torch.tensor([0, 50, 99]),
                            generator=torch.Generator().manual_seed(2))
    assert torch.isnan(est.gamma).sum() == T - 3 and est.data_range == (-1.0, 1.0)
    path = tmp_path / "analytic.json"
    est.save(path)
    back = AnalyticVariance.load(path)
    assert torch.equal(back.gamma.isnan(), est.gamma.isnan())
    torch.testing.assert_close(back.gamma[~back.gamma.isnan()], est.gamma[~est.gamma.isnan()], rtol=0, atol=0)
    assert (back.data_range, back.data_variance, back.num_examples) == (est.data_range, est.data_variance, 64)
    # A grid on the estimated timesteps works; one that needs others says which.
    assert back.variances(schedule, torch.tensor([0, 50, 99])).shape == (3,)
    with pytest.raises(ValueError, match=r"not estimated at timesteps \[66\]"):
        sample(oracle, schedule, (4, 2), steps=3, spacing="trailing", variance="analytic", analytic=back)
    with pytest.raises(ValueError, match="T=100"):
        back.variances(NoiseSchedule.from_name("cosine", 50))
    with pytest.raises(ValueError, match="analytic="):
        sample(oracle, schedule, (4, 2), steps=3, variance="analytic")
    with pytest.raises(ValueError, match="analytic="):
        nll_bpd(oracle, schedule, data[:4], variance="analytic", decoder="continuous", num_timesteps=2)
    # DDIM sets its own noise and ignores the variance (and its table).
    sample(oracle, schedule, (4, 2), sampler="ddim", steps=3, variance="analytic")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not an analytic variance file"):
        AnalyticVariance.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="negative"):
        AnalyticVariance(-torch.ones(3))


# -- autocast and progress of the two long estimates -------------------------------------------

def behind_a_matmul(oracle):
    """The oracle behind an identity matmul, as a network's first layer: under bf16 autocast x_t
    reaches it rounded to bf16 and its output is bf16. Records the dtype the matmul gave."""
    eye, seen = torch.eye(2), set()

    def net(x_t, t):
        h = x_t @ eye
        seen.add(h.dtype)
        return oracle(h, t)

    net.seen = seen
    return net


def test_bf16_bound_and_gamma_stay_within_a_standard_error_of_float32(setup):
    schedule, oracle, data, _ = setup
    est = AnalyticVariance(exact_gamma(schedule), None)
    bound, gamma = {}, {}
    for amp in ("off", "bf16"):
        net = behind_a_matmul(oracle)
        # The same generator seeds: both see the same x_t, so the difference is the rounding alone.
        bound[amp] = nll_bpd(net, schedule, data[:2000], variance="analytic", analytic=est, decoder="continuous",
                             batch_size=500, generator=torch.Generator().manual_seed(5), amp=amp)
        gamma[amp] = analytic_variance(net, schedule, data, num=1000, batch_size=500, data_range=None,
                                       generator=torch.Generator().manual_seed(1), amp=amp).gamma
        assert net.seen == {torch.float32 if amp == "off" else torch.bfloat16}  # autocast reached the network
    assert bound["bf16"]["bpd"] != bound["off"]["bpd"]  # it changed something ...
    assert abs(bound["bf16"]["bpd"] - bound["off"]["bpd"]) < bound["off"]["stderr"]  # ... within the noise
    assert torch.isfinite(torch.as_tensor(bound["bf16"]["terms_bpd"])).all()
    # ||eps||^2/d = Gamma chi^2_2 / 2 per example: standard error Gamma / sqrt(num).
    assert not torch.equal(gamma["bf16"], gamma["off"])
    assert ((gamma["bf16"] - gamma["off"]).abs() < gamma["off"] / math.sqrt(1000)).all()


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar the two estimates open: (its keyword arguments, the count it reached)."""
    from ddpm.core import analytic, nll

    opened = []

    class Recording(nll.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append((kwargs, self))

    monkeypatch.setattr(nll, "tqdm", Recording)
    monkeypatch.setattr(analytic, "tqdm", Recording)
    return opened


@pytest.mark.parametrize("K, per_item", [(None, T), (7, 8)])
def test_the_nll_bar_counts_items_times_timesteps(setup, bars, K, per_item):
    schedule, oracle, data, _ = setup
    nll_bpd(oracle, schedule, data[:30], num_timesteps=K, batch_size=8, decoder="continuous", progress=True)
    (kwargs, bar), = bars
    assert kwargs["total"] == 30 * per_item and bar.n == bar.total  # the decoder and K KL terms per item
    assert not kwargs["disable"]


def test_the_analytic_bar_counts_examples_times_timesteps(setup, bars):
    schedule, oracle, data, _ = setup
    analytic_variance(oracle, schedule, data[:30], num=20, batch_size=8, timesteps=torch.tensor([3, 9, 9, 40]),
                      progress=True)
    (kwargs, bar), = bars
    assert kwargs["total"] == 20 * 3 and bar.n == bar.total  # one batch is no longer one step of 1


@pytest.mark.parametrize("progress, disable", [(None, None), (False, True)])
def test_the_bars_follow_sampling_s_rule(setup, bars, progress, disable):
    # None: tqdm's own "only when the stream is a terminal", as ddpm sample decides
    schedule, oracle, data, _ = setup
    nll_bpd(oracle, schedule, data[:4], num_timesteps=2, decoder="continuous", progress=progress)
    analytic_variance(oracle, schedule, data[:4], num=4, timesteps=torch.tensor([5]), progress=progress)
    assert [kwargs["disable"] for kwargs, _ in bars] == [disable, disable]
