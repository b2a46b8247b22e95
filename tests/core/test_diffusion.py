"""Forward process, posterior, parametrisations, objective and VLB terms (Ho et al. 2020, sections 2-3),
each checked against an independent formula, a Monte-Carlo estimate or a peer implementation."""

import math

import numpy as np
import pytest
import torch

from ddpm.core.diffusion import (
    PREDICTIONS,
    WEIGHTINGS,
    discretized_gaussian_log_likelihood,
    extract,
    normal_kl,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    training_loss,
    v_from_x0_eps,
    x0_eps_from_output,
    x0_eps_from_v,
)
from ddpm.core.schedules import NoiseSchedule

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sched():
    # Large betas so that every step visibly changes the marginals (an off-by-one shows).
    return NoiseSchedule.from_name("sqrt_linear", 12, linear_start=0.02, linear_end=0.3)


def test_extract_gathers_and_broadcasts(sched):
    t = torch.tensor([0, 5, 11])
    out = extract(sched.alphas_cumprod, t, (3, 2, 4, 4), F64)
    assert out.shape == (3, 1, 1, 1) and out.dtype == F64
    assert torch.equal(out.flatten(), sched.alphas_cumprod[t])


def test_q_sample_closed_form(sched):
    g = _gen(1)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 4, 7, 10, 11])
    ab = np.cumprod(1 - sched.betas.numpy())[t.numpy()].reshape(-1, 1, 1, 1)
    want = np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * eps.numpy()
    got = q_sample(sched, x0, t, eps)
    assert got.dtype == F64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-13, atol=1e-14)
    mean, var, logvar = q_mean_variance(sched, x0, t)
    np.testing.assert_allclose(mean.numpy(), np.sqrt(ab) * x0.numpy(), rtol=1e-13)
    np.testing.assert_allclose(var.numpy(), 1 - ab, rtol=1e-13)
    np.testing.assert_allclose(logvar.numpy(), np.log(1 - ab), rtol=1e-13)
    # float32 in, float32 out
    assert q_sample(sched, x0.float(), t, eps.float()).dtype == torch.float32


def test_iterated_one_step_noising_matches_closed_form_in_distribution(sched):
    # Eq. 2 applied T times, x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, versus eq. 4.
    g = _gen(2)
    N = 20000
    x0_values = torch.tensor([-1.0, 0.3, 2.0], dtype=F64)
    x = x0_values.expand(N, 3).clone()
    T = sched.num_timesteps
    for t in range(T):
        beta = sched.betas[t].item()
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(N, 3, generator=g, dtype=F64)
        mean, var, _ = q_mean_variance(sched, x0_values.expand(1, 3), torch.tensor([t]))
        se_mean = (var / N).sqrt()
        se_var = var * math.sqrt(2.0 / (N - 1))
        assert ((x.mean(0) - mean[0]).abs() < 5 * se_mean[0]).all(), t
        assert ((x.var(0) - var[0]).abs() < 5 * se_var[0]).all(), t
    # And a sample drawn by q_sample at the last step has the same moments.
    xq = q_sample(sched, x0_values.expand(N, 3), torch.full((N,), T - 1), torch.randn(N, 3, generator=g, dtype=F64))
    assert ((x.mean(0) - xq.mean(0)).abs() < 5 * (2 * xq.var(0) / N).sqrt()).all()


def _numeric_posterior(x0, x_t, ab_prev, alpha):
    """Bayes' rule on a grid: q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), scalar case."""
    m_prior, v_prior = math.sqrt(ab_prev) * x0, 1 - ab_prev
    sd = math.sqrt(v_prior)
    grid = np.linspace(m_prior - 12 * sd, m_prior + 12 * sd, 200001)
    log_w = -0.5 * (grid - m_prior) ** 2 / v_prior - 0.5 * (x_t - math.sqrt(alpha) * grid) ** 2 / (1 - alpha)
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    mean = (w * grid).sum()
    return mean, (w * (grid - mean) ** 2).sum()


@pytest.mark.parametrize("t", [1, 2, 6, 11])
def test_posterior_matches_bayes_rule_numerically(sched, t):
    x0 = torch.tensor([[0.7], [-1.3]], dtype=F64)
    x_t = torch.tensor([[-0.4], [2.1]], dtype=F64)
    tt = torch.full((2,), t)
    mean, var, logvar = q_posterior_mean_variance(sched, x0, x_t, tt)
    ab_prev = sched.alphas_cumprod[t - 1].item()
    alpha = 1 - sched.betas[t].item()
    for i in range(2):
        m_num, v_num = _numeric_posterior(x0[i, 0].item(), x_t[i, 0].item(), ab_prev, alpha)
        assert mean[i, 0].item() == pytest.approx(m_num, rel=1e-6, abs=1e-8)
        assert var[i, 0].item() == pytest.approx(v_num, rel=1e-6)
        assert logvar[i, 0].item() == pytest.approx(math.log(v_num), abs=1e-6)


def test_posterior_at_first_step_is_x0(sched):
    # Index 0 (paper's t=1): abar_prev = 1, so x_{t-1} = x0 exactly; the log-variance is clipped.
    x0, x_t = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    mean, var, logvar = q_posterior_mean_variance(sched, x0, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert (var == 0).all() and torch.isfinite(logvar).all()
    assert logvar[0, 0].item() == pytest.approx(math.log(sched.posterior_variance[1].item()), rel=1e-12)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_parametrisation_conversions_invert_each_other(zero_snr):
    s = NoiseSchedule.from_name("cosine", 100, rescale_to_zero_terminal_snr=zero_snr)
    g = _gen(3)
    B = 64
    t = torch.randint(0, 99 if zero_snr else 100, (B,), generator=g)  # 1/sqrt(abar_T) is infinite at zero SNR
    t[:2] = torch.tensor([0, t.max()])
    x0 = torch.randn(B, 2, 3, generator=g, dtype=F64)
    eps = torch.randn(B, 2, 3, generator=g, dtype=F64)
    x_t = q_sample(s, x0, t, eps)
    v = v_from_x0_eps(s, x0, eps, t)
    kw = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(predict_x0_from_eps(s, x_t, t, eps), x0, **kw)
    torch.testing.assert_close(predict_eps_from_x0(s, x_t, t, x0), eps, **kw)
    x0_v, eps_v = x0_eps_from_v(s, x_t, t, v)
    torch.testing.assert_close(x0_v, x0, **kw)
    torch.testing.assert_close(eps_v, eps, **kw)
    # v written independently (Salimans & Ho 2022): v = alpha_t eps - sigma_t x0, alpha^2 + sigma^2 = 1.
    a = s.alphas_cumprod[t].sqrt().reshape(-1, 1, 1)
    torch.testing.assert_close(v, a * eps - (1 - a**2).sqrt() * x0, **kw)
    for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
        x0_o, eps_o = x0_eps_from_output(s, x_t, t, out, pred)
        torch.testing.assert_close(x0_o, x0, **kw)
        torch.testing.assert_close(eps_o, eps, **kw)
    if zero_snr:
        # At abar_T = 0: x_T = eps, v = -x0; the x0 and v parametrisations still recover both.
        T1 = torch.full((B,), 99)
        xT = q_sample(s, x0, T1, eps)
        torch.testing.assert_close(xT, eps, **kw)
        torch.testing.assert_close(predict_eps_from_x0(s, xT, T1, x0), eps, **kw)
        x0_v, eps_v = x0_eps_from_v(s, xT, T1, v_from_x0_eps(s, x0, eps, T1))
        torch.testing.assert_close(x0_v, x0, **kw)
        torch.testing.assert_close(eps_v, eps, **kw)


# ---------------------------------------------------------------------------------------------
# training_loss (Algorithm 1, eq. 14)
# ---------------------------------------------------------------------------------------------

class NoiseOracle:
    """Returns the target of each parametrisation exactly, by closure over the noise used."""

    def __init__(self, schedule, x0, noise, prediction):
        self.s, self.x0, self.noise, self.prediction = schedule, x0, noise, prediction
        self.seen_t = None

    def __call__(self, x_t, t):
        self.seen_t = t
        if self.prediction == "eps":
            return self.noise
        if self.prediction == "x0":
            return self.x0
        return v_from_x0_eps(self.s, self.x0, self.noise, t)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_oracle_model_has_zero_loss_and_zeros_model_the_target_energy(sched, prediction):
    g = _gen(4)
    B, D = 64, 500
    x0 = torch.randn(B, D, generator=g, dtype=F64) * 0.5 + 0.2
    noise = torch.randn(B, D, generator=g, dtype=F64)
    t = torch.randint(0, sched.num_timesteps, (B,), generator=g)
    oracle = NoiseOracle(sched, x0, noise, prediction)
    loss = training_loss(oracle, sched, x0, t=t, noise=noise, prediction=prediction)
    assert torch.equal(oracle.seen_t, t) and loss.item() < 1e-20
    zeros = training_loss(lambda x, tt: torch.zeros_like(x), sched, x0, t=t, noise=noise, prediction=prediction,
                          reduction="none")
    assert zeros.shape == (B,)
    ab = sched.alphas_cumprod.numpy()[t.numpy()][:, None]
    target = {"eps": noise.numpy(), "x0": x0.numpy(),
              "v": np.sqrt(ab) * noise.numpy() - np.sqrt(1 - ab) * x0.numpy()}[prediction]
    np.testing.assert_allclose(zeros.numpy(), (target**2).mean(1), rtol=1e-12)
    if prediction == "eps":  # E ||eps||^2 / D = 1
        assert abs(zeros.mean().item() - 1.0) < 5 * math.sqrt(2 / (B * D))


def test_bayes_optimal_eps_for_point_mass_and_gaussian_data(sched):
    # Data x0 ~ N(mu, s^2) per coordinate: x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab) and the optimal
    # eps(x_t, t) = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab), with expected loss
    # ab s^2 / (ab s^2 + 1 - ab). s = 0 is a point mass, whose optimal loss is exactly 0.
    g = _gen(5)
    B, D, mu = 24, 4000, 0.3
    t = torch.arange(B) % sched.num_timesteps
    for s2 in (0.0, 0.5):
        def oracle(x_t, tt):
            ab = extract(sched.alphas_cumprod, tt, x_t.shape, F64)
            return (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * s2 + 1 - ab)

        x0 = mu + math.sqrt(s2) * torch.randn(B, D, generator=g, dtype=F64)
        per = training_loss(oracle, sched, x0, t=t, reduction="none", generator=g)
        ab = sched.alphas_cumprod[t]
        want = ab * s2 / (ab * s2 + 1 - ab)
        if s2 == 0.0:
            assert per.max().item() < 1e-20
        else:
            # each per-example loss is a mean of D scaled chi-square(1) terms: sd = want sqrt(2/D)
            assert ((per - want).abs() < 5 * want * math.sqrt(2 / D)).all()


def test_default_t_and_noise_come_from_generator(sched):
    x0 = torch.randn(32, 2, dtype=F64)
    model = lambda x, t: x * 0.5 + t[:, None] * 0.01  # noqa: E731
    a = training_loss(model, sched, x0, generator=_gen(7), reduction="none")
    b = training_loss(model, sched, x0, generator=_gen(7), reduction="none")
    c = training_loss(model, sched, x0, generator=_gen(8), reduction="none")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert training_loss(model, sched, x0, generator=_gen(7)).item() == pytest.approx(a.mean().item(), rel=1e-12)
    # t is uniform over 0..T-1: the oracle sees both ends.
    seen = []
    training_loss(lambda x, t: seen.append(t) or torch.zeros_like(x), sched, torch.zeros(4000, 1), generator=_gen(9))
    assert seen[0].min().item() == 0 and seen[0].max().item() == sched.num_timesteps - 1
    assert seen[0].dtype == torch.long


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_equal_formula(prediction, gamma):
    s = NoiseSchedule.from_name("linear", 1000)
    g = _gen(10)
    B = 40
    x0 = torch.randn(B, 8, generator=g, dtype=F64)
    noise = torch.randn(B, 8, generator=g, dtype=F64)
    t = torch.linspace(0, 999, B).long()
    model = lambda x, tt: 0.3 * x  # noqa: E731
    kw = dict(t=t, noise=noise, prediction=prediction, reduction="none")
    plain = training_loss(model, s, x0, **kw)
    weighted = training_loss(model, s, x0, weighting="min_snr", min_snr_gamma=gamma, **kw)
    ab = s.alphas_cumprod.numpy()[t.numpy()]
    snr = ab / (1 - ab)
    w = {"eps": np.minimum(snr, gamma) / snr, "x0": np.minimum(snr, gamma),
         "v": np.minimum(snr, gamma) / (snr + 1)}[prediction]
    np.testing.assert_allclose((weighted / plain).numpy(), w, rtol=1e-12)


def test_min_snr_is_the_same_x0_space_loss_for_every_target():
    # Hang et al. 2023: with the min-SNR weights all three targets give min(SNR, gamma) ||x0 - x0^||^2.
    s = NoiseSchedule.from_name("cosine", 200)
    g = _gen(11)
    B, gamma = 32, 5.0
    x0 = torch.randn(B, 6, generator=g, dtype=F64)
    noise = torch.randn(B, 6, generator=g, dtype=F64)
    t = torch.randint(0, 200, (B,), generator=g)
    x0_hat = lambda x_t: torch.tanh(x_t)  # noqa: E731  an arbitrary guess of x0 from x_t
    models = {
        "x0": lambda x_t, tt: x0_hat(x_t),
        "eps": lambda x_t, tt: predict_eps_from_x0(s, x_t, tt, x0_hat(x_t)),
        "v": lambda x_t, tt: v_from_x0_eps(s, x0_hat(x_t), predict_eps_from_x0(s, x_t, tt, x0_hat(x_t)), tt),
    }
    losses = {p: training_loss(m, s, x0, t=t, noise=noise, prediction=p, weighting="min_snr", min_snr_gamma=gamma,
                               reduction="none") for p, m in models.items()}
    x_t = q_sample(s, x0, t, noise)
    want = s.snr()[t].clamp(max=gamma) * ((x0 - x0_hat(x_t)) ** 2).mean(1)
    for p in PREDICTIONS:
        torch.testing.assert_close(losses[p], want, rtol=1e-9, atol=1e-12)


def test_min_snr_finite_at_zero_terminal_snr():
    s = NoiseSchedule.from_name("linear", 50, rescale_to_zero_terminal_snr=True)
    x0 = torch.randn(3, 4, dtype=F64)
    t = torch.tensor([0, 25, 49])
    for p in PREDICTIONS:
        per = training_loss(lambda x, tt: torch.zeros_like(x), s, x0, t=t, prediction=p, weighting="min_snr",
                            reduction="none")
        assert torch.isfinite(per).all(), p


def test_bad_names_and_shapes_refused(sched):
    x0 = torch.zeros(4, 3)
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError) as e:
        training_loss(model, sched, x0, prediction="score")
    assert "score" in str(e.value) and all(p in str(e.value) for p in PREDICTIONS)
    with pytest.raises(ValueError) as e:
        training_loss(model, sched, x0, weighting="snr+1")
    assert all(w in str(e.value) for w in WEIGHTINGS)
    with pytest.raises(ValueError, match="reduction"):
        training_loss(model, sched, x0, reduction="sum")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        training_loss(model, sched, x0, weighting="min_snr", min_snr_gamma=0.0)
    for bad_t in (torch.zeros(4, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros((), dtype=torch.long)):
        with pytest.raises(ValueError, match="shape"):
            training_loss(model, sched, x0, t=bad_t)
        with pytest.raises(ValueError, match="shape"):
            q_sample(sched, x0, bad_t)
    with pytest.raises(ValueError, match="integer"):
        q_sample(sched, x0, torch.full((4,), 0.5))
    for bad in (-1, sched.num_timesteps):
        with pytest.raises(ValueError, match=f"timestep {bad} out of range"):
            training_loss(model, sched, x0, t=torch.full((4,), bad))
    with pytest.raises(ValueError, match="noise shape"):
        q_sample(sched, x0, torch.zeros(4, dtype=torch.long), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="output shape"):
        training_loss(lambda x, t: x[:, :2], sched, x0)
    with pytest.raises(ValueError, match="x0 must have shape"):
        training_loss(model, sched, torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# p_theta and the VLB terms (section 3.2-3.3)
# ---------------------------------------------------------------------------------------------

def test_p_mean_variance_eq11_and_fixed_variances(sched):
    g = _gen(12)
    B = 12
    t = torch.arange(B)
    x_t = torch.randn(B, 5, generator=g, dtype=F64) * 2
    eps = torch.randn(B, 5, generator=g, dtype=F64)
    mean, var, logvar, x0 = p_mean_variance(sched, eps, x_t, t, clip_denoised=False)
    # Eq. 11: mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t).
    b = sched.betas[t][:, None]
    ab = sched.alphas_cumprod[t][:, None]
    torch.testing.assert_close(mean, (x_t - b / (1 - ab).sqrt() * eps) / (1 - b).sqrt(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x0, (x_t - (1 - ab).sqrt() * eps) / ab.sqrt(), rtol=1e-10, atol=1e-12)
    # fixed_small: sigma^2 = beta~_t (eq. 7); fixed_large: sigma^2 = beta_t (beta~_1 at index 0 for the log).
    torch.testing.assert_close(var, sched.posterior_variance[t][:, None])
    torch.testing.assert_close(logvar, sched.posterior_log_variance_clipped[t][:, None])
    _, var_l, logvar_l, _ = p_mean_variance(sched, eps, x_t, t, variance="fixed_large", clip_denoised=False)
    large = sched.betas.clone()
    large[0] = sched.posterior_variance[1]
    torch.testing.assert_close(var_l, large[t][:, None])
    torch.testing.assert_close(logvar_l, large[t].log()[:, None])
    # Clipping: the predicted x0 lies in [-1, 1] and the mean is the posterior mean at it.
    mean_c, _, _, x0_c = p_mean_variance(sched, eps, x_t, t, clip_denoised=True)
    assert x0_c.abs().max() <= 1 and (x0_c != x0).any()
    torch.testing.assert_close(mean_c, q_posterior_mean_variance(sched, x0_c, x_t, t)[0])
    with pytest.raises(ValueError, match="fixed_small, fixed_large"):
        p_mean_variance(sched, eps, x_t, t, variance="learned")
    with pytest.raises(ValueError, match="eps, x0, v"):
        p_mean_variance(sched, eps, x_t, t, prediction="score")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_p_mean_variance_with_true_target_is_the_posterior(sched, prediction):
    g = _gen(13)
    B = 12
    t = torch.arange(B)
    x0 = torch.rand(B, 3, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(B, 3, generator=g, dtype=F64)
    x_t = q_sample(sched, x0, t, eps)
    out = {"eps": eps, "x0": x0, "v": v_from_x0_eps(sched, x0, eps, t)}[prediction]
    mean, _, _, x0_pred = p_mean_variance(sched, out, x_t, t, prediction=prediction)
    torch.testing.assert_close(x0_pred, x0, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(mean, q_posterior_mean_variance(sched, x0, x_t, t)[0], rtol=1e-9, atol=1e-10)


def test_normal_kl_matches_torch_distributions():
    g = _gen(14)
    m1, m2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    Normal = torch.distributions.Normal
    want = torch.distributions.kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-12, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


@pytest.mark.parametrize("mean, scale", [(0.0, 0.01), (0.3, 0.002), (-0.97, 0.05), (1.2, 0.3), (-0.5, 1e-4)])
def test_discretized_gaussian_probabilities_sum_to_one(mean, scale):
    levels = torch.arange(256, dtype=torch.float32) * (2 / 255) - 1  # 8-bit data scaled to [-1, 1]
    means = torch.full_like(levels, mean)
    log_scales = torch.full_like(levels, math.log(scale))
    logp = discretized_gaussian_log_likelihood(levels, means, log_scales)
    assert logp.shape == (256,) and (logp <= 1e-6).all()
    assert logp.double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    # Interior bins are [x - 1/255, x + 1/255]: compare with the exact normal CDF where the mass is.
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=F64), torch.tensor(scale, dtype=F64))
    lv = levels.double()
    exact = normal.cdf(lv + 1 / 255) - normal.cdf(lv - 1 / 255)
    exact[0] = normal.cdf(lv[0] + 1 / 255)
    exact[-1] = 1 - normal.cdf(lv[-1] - 1 / 255)
    assert (logp.double().exp() - exact).abs().max().item() < 2e-3  # the tanh approximation of the CDF


def test_discretized_gaussian_sharp_decoder_is_certain():
    x = torch.tensor([-1.0, -1 + 2 / 255, 0.0 + 1 / 255, 1.0])
    logp = discretized_gaussian_log_likelihood(x, x.clone(), torch.full_like(x, math.log(2e-4)))  # bin half-width = 20 sd
    assert logp.abs().max().item() < 1e-5
