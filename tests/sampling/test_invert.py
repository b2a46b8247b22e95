"""DDIM inversion and interpolation, on the exact eps of the Gaussian mixture of tests/gmm.py."""

from __future__ import annotations

import pytest
import torch

from ddpm.core.diffusion import predict_x0_from_eps, q_sample
from ddpm.sampling.interpolation import interpolate, slerp
from ddpm.sampling.inversion import invert
from ddpm.sampling.samplers import gaussian_noise, per_sample_seeds, sample
from ddpm.core.schedules import NoiseSchedule
from gmm import GaussianMixture
from test_conditional import ConditionalOracle


@pytest.fixture(scope="module")
def setup():
    schedule = NoiseSchedule.from_name("sqrt_linear", 1000)
    gmm = GaussianMixture(k=8, radius=1.0, std=0.1)
    x0 = gmm.sample(500, torch.Generator().manual_seed(0)).double()
    return schedule, gmm, x0


def _round_trip(setup, steps, refine=0):
    schedule, gmm, x0 = setup
    oracle = gmm.eps_oracle(schedule)
    x_T = invert(oracle, schedule, x0, steps=steps, clip_denoised=False, refine=refine)
    back = sample(oracle, schedule, x0.shape, sampler="ddim", steps=steps, eta=0.0, x_T=x_T, clip_denoised=False)
    return x_T, float((back - x0).square().sum(1).mean().sqrt())


def test_reconstruction_error_falls_with_steps(setup):
    # Measured RMS error of the round trip: 10 steps 0.104, 50 steps 0.043, 200 steps 0.011.
    errors = [_round_trip(setup, s)[1] for s in (10, 50, 200)]
    assert errors[0] > 1.8 * errors[1] > 1.8 * 1.8 * errors[2] and errors[2] < 0.02, errors
    # The data's own scale is ~1: the latents are not the data, they look like noise.
    x_T, _ = _round_trip(setup, 200)
    assert abs(float(x_T.std()) - 1) < 0.05 and abs(float(x_T.mean())) < 0.1


def test_refine_makes_the_round_trip_more_exact(setup):
    # Fixed-point refinement: measured RMS error 0.011 -> 0.0003 with 3 iterations at 200 steps.
    _, plain = _round_trip(setup, 200)
    _, refined = _round_trip(setup, 200, refine=3)
    assert refined < plain / 10, (plain, refined)


def test_grid_spacing_and_prediction_types(setup):
    # The grid is the one sample() uses for the same spacing; an x0-predicting model inverts alike.
    schedule, gmm, x0 = setup
    eps_model = gmm.eps_oracle(schedule)

    def x0_model(x, t):
        return predict_x0_from_eps(schedule, x, t, eps_model(x, t))

    kw = dict(steps=20, spacing="quad", clip_denoised=False)
    x_T, traj = invert(eps_model, schedule, x0[:50], return_trajectory=True, **kw)
    _, sampled = sample(eps_model, schedule, (50, 2), sampler="ddim", x_T=x_T, return_trajectory=True, **kw)
    assert torch.equal(traj["timesteps"], sampled["timesteps"].flip(0))
    assert traj["x_t"].shape == (21, 50, 2) and torch.equal(traj["x_t"][0], x0[:50])
    torch.testing.assert_close(invert(x0_model, schedule, x0[:50], prediction="x0", **kw), x_T, rtol=0, atol=1e-8)


def test_inversion_of_a_conditional_model(setup):
    schedule, gmm, x0 = setup
    oracle = ConditionalOracle(gmm, schedule)
    labels = torch.cdist(x0[:100], gmm.means).argmin(1)
    x_T = invert(oracle, schedule, x0[:100], steps=200, labels=labels, guidance=2.0, clip_denoised=False)
    back = sample(oracle, schedule, (100, 2), sampler="ddim", steps=200, x_T=x_T, labels=labels, guidance=2.0,
                  clip_denoised=False)
    assert float((back - x0[:100]).norm(dim=1).median()) < 0.02


def test_slerp():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    out = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(out[[0, 2]], torch.stack([a, b]))
    # Halfway along the arc: 45 degrees, with the norm of (sin(pi/4) (a + b)) / sin(pi/2).
    torch.testing.assert_close(out[1], torch.tensor([0.5, 1.0]) * 2**0.5)
    torch.testing.assert_close(slerp(a, 3 * a, torch.tensor([0.5])), 2 * a[None])  # parallel: linear


def test_slerp_interpolation_ends_are_the_reconstructions(setup):
    schedule, gmm, _ = setup
    oracle = gmm.eps_oracle(schedule)
    x_a, x_b = gmm.means[0].double(), gmm.means[3].double()
    frames = interpolate(oracle, schedule, x_a, x_b, frames=5, steps=100, clip_denoised=False)
    assert frames.shape == (5, 2) and frames.dtype == torch.float64
    recon = sample(oracle, schedule, (2, 2), sampler="ddim", steps=100, clip_denoised=False,
                   x_T=invert(oracle, schedule, torch.stack([x_a, x_b]), steps=100, clip_denoised=False))
    torch.testing.assert_close(frames[[0, -1]], recon, rtol=0, atol=1e-10)
    assert (frames[[0, -1]] - torch.stack([x_a, x_b])).norm(dim=1).max() < 0.03
    # The frames in between walk along the ring the data live on (radius 1), where the pixel-space
    # cross-fade cuts through the inside (radius 0.38 halfway between these two components).
    assert ((frames.norm(dim=1) - 1).abs() < 0.15).all(), frames


def test_noised_interpolation(setup):
    schedule, gmm, _ = setup
    x_a, x_b = torch.tensor([[1.0, -1.0], [0.5, 0.0]]), torch.tensor([[-1.0, 1.0], [0.0, 0.5]])
    lam = torch.linspace(0, 1, 4).view(4, 1, 1)
    # With a model that predicts eps = 0, one reverse step from t = 0 gives x_t / sqrt(abar_0): the
    # linear mix plus the shared noise scaled by sqrt(1 - abar_0) / sqrt(abar_0) = 0.01.
    frames = interpolate(lambda x, t: torch.zeros_like(x), schedule, x_a, x_b, frames=4, method="noised", t=0,
                         clip_denoised=False, generator=5)
    eps = gaussian_noise(per_sample_seeds(5, 1), 0, (1, 2, 2))
    ab = schedule.alphas_cumprod[0]
    mix = (1 - lam) * x_a + lam * x_b
    torch.testing.assert_close(frames, mix + ((1 - ab) / ab).sqrt().float() * eps, rtol=0, atol=1e-6)
    # At t, with the same noise: the result is the reverse process run from q(x_t | the mix).
    oracle = gmm.eps_oracle(schedule)
    a, b = gmm.means[0].float(), gmm.means[2].float()
    out = interpolate(oracle, schedule, a, b, frames=3, method="noised", t=50, clip_denoised=False, generator=7)
    head = NoiseSchedule(schedule.betas[:51])
    mid = q_sample(schedule, (0.5 * (a + b))[None], torch.tensor([50]), gaussian_noise(per_sample_seeds(7, 1), 0, (1, 2)))
    ref = sample(oracle, head, (1, 2), x_T=mid, generator=per_sample_seeds(7, 1), clip_denoised=False)
    torch.testing.assert_close(out[1:2], ref, rtol=0, atol=1e-5)
    assert (torch.cdist(out[[0, 2]].double(), torch.stack([gmm.means[0], gmm.means[2]])).diagonal() < 0.3).all()


def test_interpolate_bad_inputs(setup):
    schedule, gmm, _ = setup
    oracle = gmm.eps_oracle(schedule)
    a = torch.zeros(2)
    cases = [
        (dict(x_b=torch.zeros(3)), "same shape"),
        (dict(method="linear"), "unknown method 'linear'; choose one of slerp, noised"),
        (dict(frames=1), "frames must be an integer >= 2"),
        (dict(method="noised", t=1000), "t must be an integer timestep in 0..999"),
        (dict(x_b=torch.zeros(2, dtype=torch.long)), "x_b must be one image as a float tensor"),
    ]
    for kw, words in cases:
        kw = dict(x_a=a, x_b=torch.ones(2)) | kw
        with pytest.raises(ValueError) as info:
            interpolate(oracle, schedule, steps=3, **kw)
        assert words in str(info.value), (kw, str(info.value))
    with pytest.raises(ValueError, match="refine must be a non-negative integer"):
        invert(oracle, schedule, torch.zeros(2, 2), refine=-1)
