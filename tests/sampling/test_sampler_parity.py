"""Parity with diffusers' DDPMScheduler and DDIMScheduler (a test-only peer).

Both sides get the same model (a fixed random linear map plus sin(t), deterministic) and the same
noise: ours comes from ``ddpm.sampling.samplers.gaussian_noise`` (draw 0 is x_T, draw j+1 the noise of step
j), and diffusers is handed the same tensors (``variance_noise=`` for DDIM; for DDPM, which draws
its own, its module-level ``randn_tensor`` is patched). Each side runs on its own states, so errors
would compound; the whole x_t trajectories must agree to 1e-5 of the sample scale (an off-by-one
timestep shows as about 1e-2).

Precision: diffusers keeps alphas_cumprod in float32, and near t=0 its 1 - abar_t (1e-4 at t=0)
loses about 3 of float32's 7 digits; its own run then drifts by up to 6e-5 of the sample scale
from a float64 reference, while ours (float32 states, float64 schedule) stays within 1e-6 of it.
So the 1e-5 comparison runs diffusers' step() on float64 states with alphas_cumprod recomputed as
cumprod(1 - betas) in float64 from diffusers' own betas; its stock float32 run is checked too,
to 2e-4, and its float32 alphas_cumprod against ours to 1e-6 relative.

Conventions:
- diffusers' beta_schedule="linear" is the paper's linear schedule, our "sqrt_linear" (the seed's
  "linear" is diffusers' "scaled_linear").
- Full-length DDPM visits T-1..0 on both sides. Respaced DDPM (50 steps) uses diffusers' default
  "leading" spacing, our spacing="leading"; both recompute betas from abar at the kept timesteps.
- DDIM: diffusers' default "leading" spacing with steps_offset=0 and set_alpha_to_one=True is ours
  with spacing="leading" and abar_prev = 1 after the last step. diffusers takes the previous
  timestep as t - T // S, which is the next grid point only when S divides T: hence 50 steps.
- Clipping: diffusers' DDIM keeps the unclipped eps unless use_clipped_model_output=True; ours
  recomputes eps from the clipped x0 (improved-diffusion's choice), so that flag is set.
- fixed_large: no noise is added on the last step on either side, so the value of the variance at
  t=0 (beta_0 in diffusers, beta~_1 in the paper's code) never enters a sample.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from ddpm.sampling.samplers import gaussian_noise, per_sample_seeds, sample, timestep_grid  # noqa: E402
from ddpm.core.schedules import NoiseSchedule  # noqa: E402

SHAPE = (3, 2, 4, 4)
T = 1000


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed random linear map of x plus sin(t): deterministic, timestep-sensitive, float32."""
    gen = torch.Generator().manual_seed(1234)
    n = x[0].numel()
    weight = torch.randn(n, n, generator=gen) / n**0.5
    bias = torch.randn(n, generator=gen)
    out = x.float().flatten(1) @ weight + torch.sin(t.float() / 37.0)[:, None] * bias
    return out.reshape(x.shape)


def _ours(sampler: str, seeds: torch.Tensor, **kw):
    schedule = NoiseSchedule.from_name("sqrt_linear", T)
    x_T = gaussian_noise(seeds, 0, SHAPE)
    _, traj = sample(fake_model, schedule, SHAPE, sampler=sampler, x_T=x_T, generator=seeds,
                     return_trajectory=True, **kw)
    return x_T, traj


def _assert_close_trajectories(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    theirs = theirs.double()
    err = ((ours.double() - theirs).abs().max() / theirs.abs().max()).item()
    assert err < tol, f"trajectories differ by {err:.2e} of the sample scale"


def _float64(scheduler, final: str):
    """diffusers' step() in float64: alphas_cumprod from its own betas, and the final alpha."""
    scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.double(), 0)
    setattr(scheduler, final, torch.tensor(1.0, dtype=torch.float64))
    return torch.float64


PRECISIONS = {"float64": 1e-5, "stock": 2e-4}


def test_diffusers_linear_is_our_sqrt_linear():
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear").alphas_cumprod.double()
    ours = NoiseSchedule.from_name("sqrt_linear", T).alphas_cumprod
    assert ((theirs - ours).abs() / ours).max() < 1e-6


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("steps", [T, 50])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_matches_diffusers(monkeypatch, steps, variance, clip, precision):
    seeds = per_sample_seeds(0, SHAPE[0])
    x_T, traj = _ours("ddpm", seeds, steps=steps, spacing="leading", variance=variance, clip_denoised=clip)

    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type=variance,
                              clip_sample=clip, clip_sample_range=1.0)
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps, traj["timesteps"])
    dtype = _float64(scheduler, "one") if precision == "float64" else torch.float32
    draw = {"k": 0}
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor",
                        lambda shape, **_: gaussian_noise(seeds, draw["k"], shape, dtype))
    x = x_T.to(dtype)
    states = [x]
    for j, t in enumerate(scheduler.timesteps):
        draw["k"] = j + 1
        x = scheduler.step(fake_model(x, t.expand(SHAPE[0])).to(dtype), t, x).prev_sample
        states.append(x)
    _assert_close_trajectories(traj["x_t"], torch.stack(states), PRECISIONS[precision])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_matches_diffusers(eta, clip, precision):
    seeds = per_sample_seeds(1, SHAPE[0])
    x_T, traj = _ours("ddim", seeds, steps=50, spacing="leading", eta=eta, clip_denoised=clip)

    scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip,
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(50)
    assert torch.equal(scheduler.timesteps, traj["timesteps"])
    dtype = _float64(scheduler, "final_alpha_cumprod") if precision == "float64" else torch.float32
    x = x_T.to(dtype)
    states, x0s = [x], []
    for j, t in enumerate(scheduler.timesteps):
        out = scheduler.step(fake_model(x, t.expand(SHAPE[0])).to(dtype), t, x, eta=eta,
                             use_clipped_model_output=True, variance_noise=gaussian_noise(seeds, j + 1, SHAPE, dtype))
        x = out.prev_sample
        states.append(x)
        x0s.append(out.pred_original_sample)
    _assert_close_trajectories(traj["x_t"], torch.stack(states), PRECISIONS[precision])
    # x0_pred = (x_t - sigma eps) / alpha divides by alpha_T = 0.006: in float32 it carries about 1e-5
    # of the scale in rounding near t = T (ours against a float64 reference), whoever computes it.
    _assert_close_trajectories(traj["x0"], torch.stack(x0s), max(PRECISIONS[precision], 5e-5))


@pytest.mark.parametrize("spacing,theirs", [("uniform", "linspace"), ("leading", "leading"), ("trailing", "trailing")])
@pytest.mark.parametrize("steps", [1, 7, 10, 16, 50, 333, 1000])
def test_timestep_spacings_match_diffusers(spacing, theirs, steps):
    scheduler = DDPMScheduler(num_train_timesteps=T, timestep_spacing=theirs)
    scheduler.set_timesteps(steps)
    if spacing == "uniform" and steps == 1:
        pytest.skip("diffusers' linspace gives [0] for one step; ours starts from T-1")
    ours = timestep_grid(T, steps, spacing)
    if spacing == "uniform":
        # Round half up (ours) versus numpy's half to even: at most one off where i (T-1)/(S-1) ends in .5.
        assert (ours - scheduler.timesteps).abs().max() <= 1
    else:
        assert torch.equal(ours, scheduler.timesteps)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= notice inside diffusers
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_matches_diffusers(steps):
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, midpoint) on our
    log-SNR grid (custom timesteps) with final_sigmas_type="zero": first-order first and last
    steps, the last one landing on the data prediction; no clipping on either side."""
    from diffusers import DPMSolverMultistepScheduler

    seeds = per_sample_seeds(2, SHAPE[0])
    x_T, traj = _ours("dpm++2m", seeds, steps=steps, clip_denoised=False)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", solver_order=2,
                                            algorithm_type="dpmsolver++", solver_type="midpoint",
                                            lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=traj["timesteps"].tolist())
    assert torch.equal(scheduler.timesteps, traj["timesteps"])
    x, states = x_T, [x_T]
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t.expand(SHAPE[0])), t, x).prev_sample
        states.append(x)
    _assert_close_trajectories(traj["x_t"], torch.stack(states), 1e-5)
