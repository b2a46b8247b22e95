"""Inpainting (RePaint) against the exact conditional of a Gaussian mixture.

The data are the 8-component mixture of tests/gmm.py (std 0.1 on the unit circle) with its exact
eps. Keeping x1 and generating x2, the exact answer is p(x2 | x1) = sum_k w_k N(mu_k2, s^2) with
w_k proportional to N(x1; mu_k1, s^2): a 1-D mixture. At x1 = 0.3, between the components at
x1 = 0 (x2 = +-1, 98% of the weight) and at x1 = 0.71 (x2 = +-0.71), plain replacement (R = 1)
only sees noisy copies of x1 early on and puts much of its mass on the wrong components; RePaint's
resampling must bring it to within the truth-vs-truth bar (twice the largest energy distance
between independent exact draws).
"""

from __future__ import annotations

import pytest
import torch

from ddpm.sampling.inpainting import inpaint, repaint_path
from ddpm.sampling.samplers import per_sample_seeds
from ddpm.core.schedules import NoiseSchedule
from ddpm.nets.unet import UNet, UNetConfig
from gmm import GaussianMixture, energy_distance
from test_conditional import ConditionalOracle

N = 2000
X1 = 0.3


@pytest.fixture(scope="module")
def setup():
    schedule = NoiseSchedule.from_name("sqrt_linear", 1000)
    gmm = GaussianMixture(k=8, radius=1.0, std=0.1)
    return schedule, gmm


def exact_conditional(gmm, x1, n, seed):
    """n draws (n, 1) of p(x2 | x1)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.softmax(-((x1 - gmm.means[:, 0]) ** 2) / (2 * gmm.std**2), 0)
    comp = torch.multinomial(weights, n, replacement=True, generator=gen)
    return (gmm.means[comp, 1] + gmm.std * torch.randn(n, generator=gen, dtype=torch.float64))[:, None]


def test_repaint_is_closer_to_the_exact_conditional_than_replacement(setup):
    schedule, gmm = setup
    bar = 2 * max(energy_distance(exact_conditional(gmm, X1, N, s), exact_conditional(gmm, X1, N, s + 50))
                  for s in range(6))
    known = torch.zeros(N, 2)
    known[:, 0] = X1
    keep = torch.tensor([1.0, 0.0])  # broadcasts over the batch
    truth = exact_conditional(gmm, X1, N, 7)
    dist = {}
    for R in (1, 10):
        x = inpaint(gmm.eps_oracle(schedule), schedule, known, keep, resample=R, jump=1, steps=100, clip_denoised=False,
                    generator=1)
        assert torch.equal(x[:, 0], known[:, 0])  # kept exactly
        dist[R] = energy_distance(x[:, 1:], truth)
    # Measured: replacement 0.037, RePaint (R = 10) 0.0020, bar 0.0033.
    assert dist[10] < bar < dist[1] / 5, (dist, bar)


def test_repaint_path():
    assert repaint_path(4) == [3, 2, 1, 0, -1]
    # RePaint's get_schedule_jump(t_T=4, jump_length=1, jump_n_sample=2), written out.
    assert repaint_path(4, resample=2, jump=1) == [3, 2, 3, 2, 1, 2, 1, 0, 1, 0, -1]
    assert repaint_path(6, resample=2, jump=2) == [5, 4, 3, 2, 4, 3, 2, 1, 0, 2, 1, 0, -1]
    path = repaint_path(100, resample=10, jump=5)
    assert sum(b < a for a, b in zip(path, path[1:])) == 100 + 9 * 5 * len(range(0, 95, 5))
    assert all(b == a - 1 or b == a + 5 for a, b in zip(path, path[1:]))


def test_model_calls_seeds_and_kept_pixels(setup):
    schedule, _ = setup
    calls = []

    def model(x, t):  # any shape; depends on x and t
        calls.append(int(t[0]))
        return torch.tanh(0.5 * x + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1))

    known = torch.randn(5, 1, 3, 2, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    keep = torch.zeros(1, 1, 3, 2)
    keep[..., 0, :] = 1
    x = inpaint(model, schedule, known, keep, resample=3, jump=2, steps=8, generator=123)
    assert len(calls) == sum(b < a for a, b in zip(repaint_path(8, 3, 2), repaint_path(8, 3, 2)[1:]))
    assert max(calls) == 999 and min(calls) == 0
    assert torch.equal(x[..., 0, :], known[..., 0, :]) and not torch.equal(x[..., 1:, :], known[..., 1:, :])
    assert x.abs().max() <= 1  # clip_denoised by default
    # Sample i depends only on its seed.
    for i in range(5):
        alone = inpaint(model, schedule, known[i:i + 1], keep, resample=3, jump=2, steps=8,
                        generator=per_sample_seeds(123, 1, offset=i))
        torch.testing.assert_close(alone, x[i:i + 1], rtol=0, atol=1e-6)


def test_conditional_inpainting(setup):
    # Class 0 is the component at (1, 0): keeping x1 = 1 and asking for class 0 gives x2 ~ N(0, s^2),
    # and guidance runs as in sample().
    schedule, gmm = setup
    known = torch.tensor([[1.0, 0.0]]).expand(500, 2)
    for w in (1.0, 2.0):
        x = inpaint(ConditionalOracle(gmm, schedule), schedule, known, torch.tensor([True, False]), steps=50,
                    labels=0, guidance=w, clip_denoised=False, generator=2)
        assert torch.equal(x[:, 0], known[:, 0])
        assert abs(float(x[:, 1].mean())) < 0.03 and float(x[:, 1].std()) < 0.15


def test_bad_inputs(setup):
    schedule, gmm = setup
    oracle = gmm.eps_oracle(schedule)
    known = torch.zeros(4, 2)
    cases = [
        (dict(keep=torch.ones(3)), "keep mask of shape (3,) does not broadcast to the image's (4, 2)"),
        (dict(keep=torch.ones(4, 2, 1)), "does not broadcast"),
        (dict(keep=torch.full((2,), 0.5)), "only 0 (generate) and 1 (keep)"),
        (dict(resample=0), "resample must be a positive integer"),
        (dict(jump=1.5), "jump must be a positive integer"),
        (dict(variance="analytic"), "unknown variance 'analytic'"),
        (dict(labels=3), "class labels need a class-conditional model"),
        (dict(known=torch.zeros(4, 2, dtype=torch.long)), "known must be a float tensor"),
    ]
    for kw, words in cases:
        kw = dict(known=known, keep=torch.tensor([1, 0])) | kw
        with pytest.raises(ValueError) as info:
            inpaint(oracle, schedule, steps=3, **kw)
        assert words in str(info.value) and "\n" not in str(info.value), (kw, str(info.value))
    unet = UNet(UNetConfig(1, 1, 8, 8, (1, 2), 1, (), 0.0, norm_groups=4))
    with pytest.raises(ValueError, match=r"UNet expects x of shape \(B, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        inpaint(unet, schedule, torch.zeros(2, 3, 8, 8), torch.ones(1, 1, 8, 8), steps=2)
