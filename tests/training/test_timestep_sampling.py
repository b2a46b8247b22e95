"""Loss-aware importance sampling of t (Nichol & Dhariwal 2021, section 3.3): uniform until every t
has 10 losses, then p_t proportional to sqrt(E[L_t^2]) with a 0.001 uniform share; the weighted
estimate is unbiased and its state survives a save and load."""

from __future__ import annotations

import io

import pytest
import torch

from ddpm.training.timestep_sampling import LossAwareTimestepSampler


def fill(ts: LossAwareTimestepSampler, loss_of_t, rounds: int) -> None:
    T = ts.num_timesteps
    for _ in range(rounds):
        t = torch.arange(T)
        ts.update(t, loss_of_t(t))


def test_uniform_until_every_timestep_has_its_history():
    ts = LossAwareTimestepSampler(5)
    t, w = ts.sample(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(1000)) and torch.bincount(t, minlength=5).min() > 150
    loss = lambda t: (t + 1.0) ** 2  # noqa: E731
    fill(ts, loss, 9)
    ts.update(torch.tensor([0, 1, 2, 3]), loss(torch.tensor([0, 1, 2, 3])))  # t = 4 has 9 of 10
    assert not ts.warmed_up
    torch.testing.assert_close(ts.probabilities(), torch.full((5,), 0.2, dtype=torch.float64))
    ts.update(torch.tensor([4]), torch.tensor([25.0]))
    assert ts.warmed_up
    # sqrt(E[L_t^2]) = (t + 1)^2, normalised, mixed with 0.001 of uniform.
    want = (torch.arange(5, dtype=torch.float64) + 1) ** 2
    want = want / want.sum() * 0.999 + 0.001 / 5
    torch.testing.assert_close(ts.probabilities(), want, rtol=1e-12, atol=0)
    t, w = ts.sample(20000, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(t, minlength=5).double() / 20000
    assert (freq - want).abs().max() < 0.01
    torch.testing.assert_close(w.double(), 1 / (5 * want[t]), rtol=1e-6, atol=0)


def test_history_keeps_the_last_ten_losses():
    ts = LossAwareTimestepSampler(2)
    for k in range(13):
        ts.update(torch.tensor([0]), torch.tensor([float(k)]))
    assert ts.counts.tolist() == [10, 0]
    assert ts.losses[0].tolist() == [float(k) for k in range(3, 13)]
    # The second moment, not the mean: sqrt(mean(L^2)).
    ts.update(torch.ones(10, dtype=torch.long), torch.ones(10))
    want = torch.stack([(torch.arange(3, 13, dtype=torch.float64) ** 2).mean().sqrt(), torch.tensor(1.0).double()])
    torch.testing.assert_close(ts.probabilities(), want / want.sum() * 0.999 + 0.0005, rtol=1e-12, atol=0)


def test_weighted_estimate_is_unbiased_and_less_noisy():
    """E_{t~p}[L_t / (T p_t)] = mean_t L_t, on a toy whose terms span three orders of magnitude."""
    T = 50
    mean_loss = 10.0 ** (-3 * torch.arange(T, dtype=torch.float64) / T)  # L_t from 1 down to 1e-3

    def noisy(t, g):
        return mean_loss[t] * (1 + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64))

    g = torch.Generator().manual_seed(0)
    ts = LossAwareTimestepSampler(T)
    for _ in range(10):
        t = torch.arange(T)
        ts.update(t, noisy(t, g))
    truth = mean_loss.mean().item()
    estimates = {"importance": [], "uniform": []}
    for _ in range(400):
        t, w = ts.sample(64, generator=g)
        estimates["importance"].append((w.double() * noisy(t, g)).mean().item())
        u = torch.randint(0, T, (64,), generator=g)
        estimates["uniform"].append(noisy(u, g).mean().item())
    imp = torch.tensor(estimates["importance"])
    uni = torch.tensor(estimates["uniform"])
    assert abs(imp.mean().item() - truth) < 4 * imp.std().item() / 20  # 400 batches: stderr = std / 20
    assert abs(uni.mean().item() - truth) < 4 * uni.std().item() / 20
    assert imp.std() < 0.5 * uni.std()


def test_state_dict_round_trip_resumes_exactly():
    ts = LossAwareTimestepSampler(20)
    fill(ts, lambda t: torch.rand(t.shape, generator=torch.Generator().manual_seed(int(t.sum()))) + t, 12)
    buffer = io.BytesIO()
    torch.save(ts.state_dict(), buffer)
    buffer.seek(0)
    resumed = LossAwareTimestepSampler(20)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    a = ts.sample(32, generator=torch.Generator().manual_seed(7))
    b = resumed.sample(32, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ts.update(a[0], a[1])
    resumed.update(b[0], b[1])
    assert torch.equal(ts.losses, resumed.losses) and torch.equal(ts.counts, resumed.counts)
    with pytest.raises(ValueError, match="shape"):
        LossAwareTimestepSampler(10).load_state_dict(ts.state_dict())


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_timesteps"):
        LossAwareTimestepSampler(0)
    ts = LossAwareTimestepSampler(4)
    with pytest.raises(ValueError, match="0..3"):
        ts.update(torch.tensor([4]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same length"):
        ts.update(torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="finite"):
        ts.update(torch.tensor([1]), torch.tensor([float("nan")]))
