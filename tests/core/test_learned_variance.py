"""Learned variances (Nichol & Dhariwal 2021): the (B, 2C, ...) contract, eq. 15, the KL terms and
L_hybrid against hand computations, the ancestral sampler on full and respaced grids against the
fixed variances it interpolates and against diffusers' DDPMScheduler(variance_type="learned_range"),
and UNet.from_diffusers on a learned-range network."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.core.diffusion import (
    p_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    respaced_schedule,
    split_output,
    training_loss,
    vlb_term,
)
from ddpm.core.nll import nll_bpd
from ddpm.sampling.samplers import gaussian_noise, per_sample_seeds, sample, timestep_grid
from ddpm.core.schedules import NoiseSchedule

SHAPE = (3, 2, 4, 4)


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_name("sqrt_linear", 1000)


def eps_part(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed random linear map of x plus sin(t): deterministic and timestep-sensitive."""
    gen = torch.Generator().manual_seed(1234)
    n = x[0].numel()
    weight = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    bias = torch.randn(n, generator=gen, dtype=torch.float64)
    out = x.double().flatten(1) @ weight + torch.sin(t.double() / 37.0)[:, None] * bias
    return out.reshape(x.shape).to(x.dtype)


def learned(v=None):
    """A model returning (B, 2C, ...): eps_part, then v (a constant, or tanh of a map of x and t)."""

    def model(x, t):
        values = torch.tanh(x.flip(1) + torch.cos(t.to(x.dtype) / 91.0).view(-1, *[1] * (x.dim() - 1))) if v is None \
            else torch.full_like(x, v)
        return torch.cat([eps_part(x, t), values], dim=1)

    return model


def test_split_output_contract():
    x = torch.zeros(SHAPE)
    out = torch.arange(2 * x.numel(), dtype=torch.float32).reshape(3, 4, 4, 4)
    pred, v = split_output(out, x.shape, "learned_range")
    assert torch.equal(pred, out[:, :2]) and torch.equal(v, out[:, 2:])
    assert split_output(x, x.shape)[1] is None
    with pytest.raises(ValueError, match="learned_range"):  # a 2C output with a fixed variance: say why
        split_output(out, x.shape, "fixed_small")
    with pytest.raises(ValueError, match="twice the channels"):
        split_output(x, x.shape, "learned_range")


def test_eq15_interpolates_log_variances(sched):
    T = sched.num_timesteps
    t = torch.tensor([0, 1, 500, T - 1])
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    eps = torch.randn_like(x)
    lo = sched.posterior_log_variance_clipped[t][:, None, None]
    hi = torch.log(sched.betas[t])[:, None, None]
    for v, want in ((-1.0, lo), (1.0, hi), (0.0, (lo + hi) / 2)):
        out = torch.cat([eps, torch.full_like(x, v)], 1)
        mean, var, log_var, _ = p_mean_variance(sched, out, x, t, variance="learned_range", clip_denoised=False)
        torch.testing.assert_close(log_var, want.expand_as(x), rtol=1e-12, atol=0)
        torch.testing.assert_close(var, log_var.exp())
        # The mean comes from the first C channels alone, as with a fixed variance.
        torch.testing.assert_close(mean, p_mean_variance(sched, eps, x, t, clip_denoised=False)[0])
    # Per element: v varies over the channels and positions.
    v = torch.rand_like(x) * 2 - 1
    _, _, log_var, _ = p_mean_variance(sched, torch.cat([eps, v], 1), x, t, variance="learned_range")
    torch.testing.assert_close(log_var, (v + 1) / 2 * hi + (1 - v) / 2 * lo)


def test_kl_term_with_learned_variance_is_the_gaussian_kl(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 10, 200, 600, 999])
    x_t = q_sample(sched, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    out = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    got = vlb_term(sched, out, x0, x_t, t, variance="learned_range")
    # By hand: mu~ and beta~ from eqs. 6-7, mu from x0_pred, sigma^2 from eq. 15, then the KL of two
    # isotropic Gaussians, 1/2 (log s2/b + b/s2 + (mu~ - mu)^2/s2 - 1), summed over dimensions.
    ab, ab_prev, beta = sched.alphas_cumprod[t], sched.alphas_cumprod_prev[t], sched.betas[t]
    def bt(a):
        return a.view(-1, 1, 1, 1)

    def mean_of(z):
        return bt(ab_prev.sqrt() * beta / (1 - ab)) * z + bt((1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)) * x_t

    x0_pred = (x_t - bt((1 - ab).sqrt()) * out[:, :2]) / bt(ab.sqrt())
    b = bt(beta * (1 - ab_prev) / (1 - ab))
    frac = (out[:, 2:] + 1) / 2
    s2 = torch.exp(frac * bt(beta.log()) + (1 - frac) * b.log())
    kl = 0.5 * (torch.log(s2 / b) + b / s2 + (mean_of(x0) - mean_of(x0_pred)) ** 2 / s2 - 1)
    torch.testing.assert_close(got, kl.flatten(1).sum(1), rtol=1e-10, atol=1e-12)
    # Against torch.distributions too, independently of normal_kl.
    p = torch.distributions.Normal(mean_of(x0), b.expand_as(x0).sqrt())
    q = torch.distributions.Normal(mean_of(x0_pred), s2.sqrt())
    torch.testing.assert_close(got, torch.distributions.kl_divergence(p, q).flatten(1).sum(1), rtol=1e-8, atol=1e-10)


class Split(torch.nn.Module):
    """Separate parameters for the prediction and the variance channels."""

    def __init__(self):
        super().__init__()
        self.mean_net = torch.nn.Linear(2, 2).double()
        self.var_net = torch.nn.Linear(2, 2).double()

    def forward(self, x, t):
        return torch.cat([self.mean_net(x), torch.tanh(self.var_net(x))], 1)


@pytest.mark.parametrize("T", [1000, 4000])
def test_hybrid_loss_is_simple_plus_lambda_times_T_vlb_in_bits(T):
    sched = NoiseSchedule.from_name("cosine", T)
    torch.manual_seed(0)
    model = Split()
    x0 = (torch.randint(0, 256, (64, 2)).double() / 127.5 - 1)
    t = torch.randint(0, T, (64,))
    t[:4] = 0  # include the decoder term
    noise = torch.randn_like(x0)
    kw = dict(t=t, noise=noise, reduction="none")
    hybrid = training_loss(model, sched, x0, variance="learned_range", **kw)
    x_t = q_sample(sched, x0, t, noise)
    out = model(x_t, t)
    simple = ((out[:, :2] - noise) ** 2).mean(1)
    vlb_bits = vlb_term(sched, out, x0, x_t, t, variance="learned_range") / (2 * math.log(2))
    # improved-diffusion: mse + vb * T/1000, vb = L_t in bits/dim, i.e. lambda = 0.001 on T * L_t.
    torch.testing.assert_close(hybrid, simple + 0.001 * T * vlb_bits, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(training_loss(model, sched, x0, variance="learned_range", vlb_weight=0.0, **kw), simple)
    vlb = training_loss(model, sched, x0, variance="learned_range", objective="vlb", **kw)
    torch.testing.assert_close(vlb, T * vlb_bits, rtol=1e-9, atol=1e-12)


def test_hybrid_vlb_term_trains_only_the_variance():
    sched = NoiseSchedule.from_name("cosine", 100)
    torch.manual_seed(1)
    model = Split()
    x0 = torch.rand(32, 2, dtype=torch.float64) * 2 - 1
    kw = dict(t=torch.randint(1, 100, (32,)), noise=torch.randn(32, 2, dtype=torch.float64))

    def grads(**options):
        model.zero_grad()
        training_loss(model, sched, x0, variance="learned_range", **kw, **options).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    hybrid, simple, vlb = grads(), grads(vlb_weight=0.0), grads(objective="vlb")
    # Section 3.1: the stop-gradient leaves the mean to L_simple; the variance learns from L_vlb only.
    for h, s in zip(hybrid[:2], simple[:2]):
        torch.testing.assert_close(h, s, rtol=1e-12, atol=0)
    assert all(g.abs().sum() == 0 for g in simple[2:]) and all(g.abs().sum() > 0 for g in hybrid[2:])
    # Pure L_vlb trains both.
    assert all(g.abs().sum() > 0 for g in vlb)


def test_training_loss_options_refused(sched):
    x0 = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="objective"):
        training_loss(lambda x, t: x, sched, x0, objective="kl")
    with pytest.raises(ValueError, match="analytic"):
        training_loss(lambda x, t: x, sched, x0, variance="analytic", objective="vlb")
    with pytest.raises(ValueError, match="weighting"):
        training_loss(lambda x, t: torch.cat([x, x], 1), sched, x0, variance="learned_range", objective="vlb",
                      weighting="min_snr")
    with pytest.raises(ValueError, match="vlb_weight"):
        training_loss(lambda x, t: x, sched, x0, vlb_weight=-1.0)
    with pytest.raises(ValueError, match="twice the channels"):
        training_loss(lambda x, t: x, sched, x0, variance="learned_range")
    # The fixed variances and analytic train with L_simple on a C-channel output.
    for variance in ("fixed_small", "fixed_large", "analytic"):
        assert training_loss(lambda x, t: torch.zeros_like(x), sched, torch.ones(2, 2), variance=variance) > 0


@pytest.mark.parametrize("steps", [1000, 50, 7])
def test_ancestral_learned_range_spans_the_fixed_variances(sched, steps):
    seeds = per_sample_seeds(0, SHAPE[0])
    kw = dict(steps=steps, spacing="leading", generator=seeds)
    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        got = sample(learned(v), sched, SHAPE, variance="learned_range", **kw)
        want = sample(eps_part, sched, SHAPE, variance=fixed, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A varying v lies between the two and differs from both.
    mid = sample(learned(), sched, SHAPE, variance="learned_range", **kw)
    assert not torch.allclose(mid, sample(eps_part, sched, SHAPE, **kw), atol=1e-3)


def test_ddim_and_dpm_use_the_prediction_channels(sched):
    for sampler in ("ddim", "dpm++2m"):
        kw = dict(sampler=sampler, steps=10, generator=1)
        want = sample(eps_part, sched, SHAPE, **kw)
        torch.testing.assert_close(sample(learned(), sched, SHAPE, variance="learned_range", **kw), want)
        torch.testing.assert_close(sample(learned(), sched, SHAPE, **kw), want)


def test_ancestral_refuses_mismatched_outputs(sched):
    with pytest.raises(ValueError, match="variance='learned_range'"):
        sample(learned(), sched, SHAPE, steps=3)
    with pytest.raises(ValueError, match="twice the channels"):
        sample(eps_part, sched, SHAPE, steps=3, variance="learned_range")


def test_nll_with_learned_range(sched):
    x0 = torch.randint(0, 256, (4, 2, 4, 4)).float() / 127.5 - 1
    kw = dict(num_timesteps=20, generator=torch.Generator().manual_seed(0))
    small = nll_bpd(eps_part, sched, x0, variance="fixed_small", **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    same = nll_bpd(learned(-1.0), sched, x0, variance="learned_range", **kw)
    assert same["bpd"] == pytest.approx(small["bpd"], rel=1e-5)
    kw["generator"] = torch.Generator().manual_seed(0)
    other = nll_bpd(learned(), sched, x0, variance="learned_range", **kw)
    assert math.isfinite(other["bpd"]) and other["bpd"] != pytest.approx(small["bpd"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# diffusers as a peer: DDPMScheduler(variance_type="learned_range") and UNet2DModel(out_channels=2C)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1000, 50])
def test_learned_range_matches_diffusers(monkeypatch, steps):
    """diffusers' step() on float64 states (see test_sampler_parity for why) with the same 2C outputs
    and noise: its min_log is log beta~ of the respaced chain, max_log log(1 - abar_t/abar_prev)."""
    diffusers_ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")
    sched = NoiseSchedule.from_name("sqrt_linear", 1000)
    seeds = per_sample_seeds(3, SHAPE[0])
    model = learned()
    x_T = gaussian_noise(seeds, 0, SHAPE, torch.float64)
    _, traj = sample(model, sched, SHAPE, steps=steps, spacing="leading", variance="learned_range", x_T=x_T,
                     generator=seeds, return_trajectory=True)
    scheduler = diffusers_ddpm.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                             variance_type="learned_range", clip_sample=True)
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps, traj["timesteps"])
    scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.double(), 0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    draw = {"k": 0}
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda shape, **_: gaussian_noise(seeds, draw["k"], shape,
                                                                                          torch.float64))
    x, states = x_T, [x_T]
    for j, t in enumerate(scheduler.timesteps):
        draw["k"] = j + 1
        x = scheduler.step(model(x, t.expand(SHAPE[0])), t, x).prev_sample
        states.append(x)
    theirs = torch.stack(states)
    # diffusers' betas are float32 (5e-8 apart from ours); a wrong variance would be ~1e-2 off.
    err = ((traj["x_t"] - theirs).abs().max() / theirs.abs().max()).item()
    assert err < 1e-6, err


def test_from_diffusers_learned_range_model_and_its_sampling(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from ddpm.nets.unet import UNet

    torch.manual_seed(0)
    peer = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=8,
        act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional",
    ).eval()
    ours = UNet.from_diffusers(peer).eval()
    assert ours.config.in_channels == 3 and ours.config.out_channels == 6
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 900])
    with torch.no_grad():
        expected = peer(x, t).sample
        assert (ours(x, t) - expected).abs().max() < 1e-4 * expected.abs().max()

    # Sampling: ours (converted network) against diffusers' scheduler driving the peer, 5 steps.
    sched = NoiseSchedule.from_name("sqrt_linear", 1000)
    seeds = per_sample_seeds(4, 2)
    x_T = gaussian_noise(seeds, 0, (2, 3, 16, 16))
    _, traj = sample(ours, sched, (2, 3, 16, 16), steps=5, spacing="leading", variance="learned_range", x_T=x_T,
                     generator=seeds, return_trajectory=True)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        variance_type="learned_range")
    scheduler.set_timesteps(5)
    from diffusers.schedulers import scheduling_ddpm

    draw = {"k": 0}
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **_: gaussian_noise(seeds, draw["k"], shape))
    xs = [x_T]
    with torch.no_grad():
        for j, tj in enumerate(scheduler.timesteps):
            draw["k"] = j + 1
            xs.append(scheduler.step(peer(xs[-1], tj).sample, tj, xs[-1]).prev_sample)
    theirs = torch.stack(xs)
    assert ((traj["x_t"] - theirs).abs().max() / theirs.abs().max()) < 1e-4


def test_respaced_schedule_keeps_the_marginals(sched):
    grid = timestep_grid(1000, 25, "uniform").flip(0)
    chain = respaced_schedule(sched, grid)
    torch.testing.assert_close(chain.alphas_cumprod, sched.alphas_cumprod[grid], rtol=1e-12, atol=0)
    assert respaced_schedule(sched, torch.arange(1000)) is sched
    with pytest.raises(ValueError, match="strictly increasing"):
        respaced_schedule(sched, torch.tensor([5, 3]))
