"""The contract every sampler keeps, run over ``ddpm.sampling.samplers.SAMPLERS`` so that a new sampler is
tested the day it is added (in the manner of diffusers' common scheduler tests).

What each sampler must do, whatever its algorithm: return the requested shape in the working
dtype; take exactly ``steps`` model calls at distinct descending timesteps, which the trajectory
reports; give sample i the same value alone or in a batch (per-sample seeds); start from ``x_T``
when given (the same x_T gives the same output unless the sampler adds noise on the way); depend
on nothing but its generator; read x0 and v predictions as well as eps; and refuse an option it
would otherwise ignore. Each sampler also runs with the options that make it add noise at every
step (``CASES``), since that is where the seed handling matters most.

A new sampler that adds noise after x_T with its default options must be listed in STOCHASTIC;
otherwise it is held to the deterministic samplers' contract.
"""

from __future__ import annotations

import pytest
import torch

from ddpm.sampling.samplers import SAMPLERS, default_steps, gaussian_noise, per_sample_seeds, sample
from ddpm.core.schedules import NoiseSchedule

T = 50
# Every sampler with its defaults, plus the variants that draw fresh noise at every step.
CASES = {name: (name, {}) for name in SAMPLERS} | {
    "ddim-eta0.7": ("ddim", {"eta": 0.7}),
    "ddpm-fixed_large": ("ddpm", {"variance": "fixed_large"}),
}
STOCHASTIC = {"ddpm", "ddim-eta0.7", "ddpm-fixed_large"}  # Algorithm 2 and DDIM with eta > 0
case = pytest.mark.parametrize("case", list(CASES))


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_name("cosine", T)


class EpsModel:
    """A deterministic stand-in for a network, eps = tanh(x/2 + t/T), that records its calls.

    Its output depends on x and on t, so a sampler that feeds the wrong timestep or state changes
    the result; it works for any shape and keeps the dtype it is given.
    """

    def __init__(self):
        self.calls: list[tuple[tuple, torch.dtype, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape), x.dtype, t.clone()))
        return torch.tanh(0.5 * x + (t.to(x.dtype) / T).view(-1, *[1] * (x.dim() - 1)))


def draw(schedule, case_name, shape=(4, 2), model=None, **kw):
    sampler, options = CASES[case_name]
    return sample(model or EpsModel(), schedule, shape, sampler=sampler, **{**options, **kw})


@case
@pytest.mark.parametrize("shape", [(3, 2), (2, 1, 4, 4)])
def test_shape_and_dtype(schedule, case, shape):
    model = EpsModel()
    x = draw(schedule, case, shape, model, steps=3, generator=0)
    assert x.shape == shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert {(s, d) for s, d, _ in model.calls} == {(shape, torch.float32)}  # the model sees x_t as it is
    # float64 noise makes float64 the working dtype.
    x_T = gaussian_noise(per_sample_seeds(0, shape[0]), 0, shape, torch.float64)
    assert draw(schedule, case, shape, steps=3, x_T=x_T, generator=0).dtype == torch.float64
    # A model computing in bf16 (autocast) has its output cast back to the working dtype.
    bf16 = draw(schedule, case, shape, lambda x, t: EpsModel()(x.bfloat16(), t), steps=3, generator=0)
    assert bf16.dtype == torch.float32
    assert (bf16 - x).abs().max() < 0.1


@case
@pytest.mark.parametrize("steps", [1, 4, None])
def test_steps_respected(schedule, case, steps):
    model = EpsModel()
    draw(schedule, case, (3, 2), model, steps=steps, generator=0)
    assert len(model.calls) == (steps or default_steps(CASES[case][0], T))
    ts = []
    for _, _, t in model.calls:
        assert t.dtype == torch.long and t.shape == (3,) and bool((t == t[0]).all())
        ts.append(int(t[0]))
    assert all(0 <= a < T for a in ts) and all(a > b for a, b in zip(ts, ts[1:])), ts


def test_default_steps():
    assert [default_steps(s, 1000) for s in ("ddpm", "ddim", "dpm++2m")] == [1000, 50, 20]
    assert [default_steps(s, 10) for s in ("ddpm", "ddim", "dpm++2m")] == [10, 10, 10]
    with pytest.raises(ValueError, match="euler.*ddpm, ddim, dpm\\+\\+2m"):
        default_steps("euler", 1000)
    with pytest.raises(ValueError, match="T must be a positive integer"):
        default_steps("ddim", 0)


@case
def test_trajectory_format(schedule, case, capsys):
    model = EpsModel()
    x_T = gaussian_noise(per_sample_seeds(1, 3), 0, (3, 1, 2, 2))
    x, traj = draw(schedule, case, (3, 1, 2, 2), model, steps=5, x_T=x_T, generator=1, return_trajectory=True,
                   progress=True)
    assert set(traj) == {"timesteps", "x_t", "x0"}
    assert traj["timesteps"].dtype == torch.long and traj["timesteps"].shape == (5,)
    # The timesteps reported are those the model was called with, in the order of the calls.
    assert traj["timesteps"].tolist() == [int(t[0]) for _, _, t in model.calls]
    assert traj["x_t"].shape == (6, 3, 1, 2, 2) and traj["x0"].shape == (5, 3, 1, 2, 2)
    assert torch.equal(traj["x_t"][0], x_T) and torch.equal(traj["x_t"][-1], x)
    # No sampler adds noise on its last step: the result is its last prediction of x0.
    torch.testing.assert_close(x, traj["x0"][-1], rtol=0, atol=1e-6)
    assert "5/5" in capsys.readouterr().err
    assert torch.equal(draw(schedule, case, (3, 1, 2, 2), steps=5, x_T=x_T, generator=1), x)


@case
def test_per_sample_seeds(schedule, case):
    def run(B, generator):
        return draw(schedule, case, (B, 1, 2, 2), steps=6, generator=generator)

    whole = run(5, 123)
    for i in range(5):  # each sample drawn alone is the same as in the batch
        torch.testing.assert_close(run(1, per_sample_seeds(123, 1, offset=i)), whole[i:i + 1], rtol=0, atol=1e-6)
    parts = torch.cat([run(2, per_sample_seeds(123, 2)), run(3, per_sample_seeds(123, 3, offset=2).tolist())])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6)
    # A torch.Generator gives the first samples of a larger batch from the same state.
    torch.testing.assert_close(run(2, torch.Generator().manual_seed(7)), run(5, torch.Generator().manual_seed(7))[:2],
                               rtol=0, atol=1e-6)
    assert not torch.allclose(whole[0], whole[1])


@case
def test_x_T_respected(schedule, case):
    seeds = per_sample_seeds(5, 4)
    x_T = gaussian_noise(seeds, 0, (4, 2))
    x = draw(schedule, case, steps=6, x_T=x_T, generator=seeds)
    # Given x_T is draw 0 of the seeds, so passing it changes nothing.
    assert torch.equal(x, draw(schedule, case, steps=6, generator=seeds))
    assert not torch.allclose(draw(schedule, case, steps=6, x_T=x_T.flip(0), generator=seeds), x)
    # The generator only matters after x_T for a sampler that adds noise on the way.
    other = draw(schedule, case, steps=6, x_T=x_T, generator=6)
    if case in STOCHASTIC:
        assert not torch.allclose(other, x)
    else:
        assert torch.equal(other, x), f"{case} depends on the generator beyond x_T: list it in STOCHASTIC"


@case
def test_depends_on_the_generator_alone(schedule, case):
    global_seeds = iter(range(10))

    def run(generator):
        torch.manual_seed(next(global_seeds))  # moving the global RNG must change nothing
        return draw(schedule, case, steps=6, generator=generator)

    a = run(torch.Generator().manual_seed(3))
    assert torch.equal(run(torch.Generator().manual_seed(3)), a)
    assert torch.equal(run(11), run(11))
    assert not torch.allclose(run(torch.Generator().manual_seed(4)), a)
    # generator=None draws its base seed from the global generator.
    torch.manual_seed(0)
    b = draw(schedule, case, steps=6)
    torch.manual_seed(0)
    assert torch.equal(draw(schedule, case, steps=6), b)


@case
def test_options_are_used_or_refused(schedule, case):
    sampler, _ = CASES[case]
    with pytest.raises(TypeError, match="etaa"):
        draw(schedule, case, steps=3, generator=0, etaa=0.5)
    # eta=0 (a command line's default) and a run's sample_kwargs are accepted by every sampler.
    draw(schedule, case, steps=3, generator=0, eta=0.0)
    draw(schedule, case, steps=3, generator=0, prediction="eps", variance="fixed_large", clip_denoised=False)
    # Any other eta changes the samples or is refused with an error naming it and the sampler.
    x = draw(schedule, case, steps=3, generator=0)
    try:
        y = draw(schedule, case, steps=3, generator=0, eta=0.3)
    except ValueError as e:
        assert "eta" in str(e) and repr(sampler) in str(e), str(e)
    else:
        assert not torch.allclose(x, y), f"{case} ignores eta"


@case
@pytest.mark.parametrize("kind", ["x0", "v"])
def test_x0_and_v_predictions(schedule, case, kind):
    # The same network written as an x0 or v predictor must give the same samples (float64, so
    # that only the conversions' rounding remains; unclipped, so that x0_pred is read as given).
    eps_model, ab = EpsModel(), schedule.alphas_cumprod

    def model(x, t):
        eps = eps_model(x, t)
        a, s = ab[t].sqrt()[:, None], (1 - ab[t]).sqrt()[:, None]
        x0 = (x - s * eps) / a
        return x0 if kind == "x0" else a * eps - s * x0

    x_T = gaussian_noise(per_sample_seeds(2, 8), 0, (8, 2), torch.float64)
    kw = dict(steps=7, x_T=x_T, generator=2, clip_denoised=False)
    expected = draw(schedule, case, (8, 2), **kw)
    torch.testing.assert_close(draw(schedule, case, (8, 2), model, prediction=kind, **kw), expected, rtol=0, atol=1e-9)
