"""Class-conditional sampling and classifier-free guidance against an exact oracle, and the
conditional networks (U-Net, MLP).

The oracle: the classes are the components of the Gaussian mixture of tests/gmm.py. Given class c,
x0 ~ N(mu_c, s^2 I), so the exact conditional eps is the single component's; the null label's is
the whole mixture's. Sampling class c with guidance 1 must then reproduce component c and guidance
0 the mixture (energy distances within twice the largest seen between independent true draws, as
in test_samplers.py).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from ddpm.core.diffusion import predict_x0_from_eps, v_from_x0_eps
from ddpm.sampling.guidance import guided_model
from ddpm.nets.mlp import MLPConfig, MLPDenoiser
from ddpm.sampling.samplers import SAMPLERS, per_sample_seeds, sample
from ddpm.core.schedules import NoiseSchedule
from ddpm.nets.unet import UNet, UNetConfig
from gmm import GaussianMixture, energy_distance

N = 2000
K = 8


class ConditionalOracle:
    """model(x_t, t, labels) -> the exact eps of class labels[i] (a component), or of the mixture
    for the null label K. Records the batch size and labels of every call."""

    num_classes = K

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule, prediction: str = "eps"):
        self.gmm, self.schedule, self.prediction = gmm, schedule, prediction
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, x_t, t, labels):
        self.calls.append((x_t.shape[0], labels.clone()))
        ab = self.schedule.alphas_cumprod[t][:, None]
        a, var = ab.sqrt(), ab * self.gmm.std**2 + (1 - ab)
        mu, x = self.gmm.means, x_t.double()
        logits = (a * (x @ mu.T) - 0.5 * ab * (mu**2).sum(1)[None]) / var
        # A class allows its own component only; the null label allows all of them.
        allowed = (labels[:, None] == torch.arange(K)[None]) | (labels[:, None] == K)
        resp = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=1)
        eps = ((1 - ab).sqrt() * (x - a * (resp @ mu)) / var).to(x_t.dtype)
        if self.prediction == "eps":
            return eps
        x0 = predict_x0_from_eps(self.schedule, x_t, t, eps)
        return x0 if self.prediction == "x0" else v_from_x0_eps(self.schedule, x0, eps, t)


@pytest.fixture(scope="module")
def setup():
    schedule = NoiseSchedule.from_name("sqrt_linear", 1000)
    gmm = GaussianMixture(k=K, radius=1.0, std=0.1)
    gen = torch.Generator().manual_seed(1)
    truth = [energy_distance(gmm.sample(N, gen), gmm.sample(N, gen)) for _ in range(6)]
    truth_c = [energy_distance(_component(gmm, 0, N, s), _component(gmm, 0, N, s + 100)) for s in range(6)]
    return schedule, gmm, {"mixture": 2 * max(truth), "class": 2 * max(truth_c)}


def _component(gmm, c, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (gmm.means[c] + gmm.std * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def _draw(setup, labels, guidance, **kw):
    schedule, gmm, _ = setup
    kw = dict(sampler="ddim", steps=50, spacing="quad", clip_denoised=False, generator=3) | kw
    return sample(ConditionalOracle(gmm, schedule), schedule, (N, 2), labels=labels, guidance=guidance, **kw)


@pytest.mark.parametrize("c", [0, 3])
def test_guidance_one_reproduces_the_class(setup, c):
    _, gmm, bar = setup
    x = _draw(setup, c, 1.0)
    d = energy_distance(x, _component(gmm, c, N, 7))
    assert d < bar["class"], (d, bar)
    # The neighbouring class is far off: the bar tells classes apart.
    assert energy_distance(x, _component(gmm, (c + 1) % K, N, 7)) > 100 * bar["class"]
    # Guidance 3 sharpens the class (about 0.05 instead of 0.1 for the spread here) and so
    # leaves the bar: guidance trades diversity for fidelity.
    y = _draw(setup, c, 3.0)
    assert energy_distance(y, _component(gmm, c, N, 7)) > 10 * bar["class"]
    assert (y.double() - gmm.means[c]).std(0).max() < 0.7 * (x.double() - gmm.means[c]).std(0).min()


def test_guidance_zero_is_the_mixture(setup):
    _, gmm, bar = setup
    x = _draw(setup, torch.arange(N) % K, 0.0)
    assert energy_distance(x, gmm.sample(N, torch.Generator().manual_seed(9))) < bar["mixture"]
    # ... and guidance 1 with the same labels is the mixture too, each point in its own class.
    y = _draw(setup, torch.arange(N) % K, 1.0)
    assert (torch.cdist(y.double(), gmm.means).argmin(1) == torch.arange(N) % K).float().mean() > 0.99


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guided_output_is_the_combination_in_one_batch(setup, sampler, prediction):
    """sample(labels, guidance=w) equals sampling the hand-made eps_null + w (eps_c - eps_null)
    (eps-space guidance), whatever the model predicts, with one network call of 2B per step."""
    schedule, gmm, _ = setup
    B, w, steps = 6, 2.5, 5
    labels = torch.tensor([0, 1, 2, 5, 7, 3])
    oracle = ConditionalOracle(gmm, schedule, prediction)
    kw = dict(sampler=sampler, steps=steps, clip_denoised=False, generator=11)
    x = sample(oracle, schedule, (B, 2), labels=labels, guidance=w, prediction=prediction, **kw)
    assert [n for n, _ in oracle.calls] == [2 * B] * steps
    assert all(torch.equal(lab, torch.cat([labels, torch.full((B,), K)])) for _, lab in oracle.calls)

    eps_oracle = ConditionalOracle(gmm, schedule)
    null = torch.full((B,), K)

    def by_hand(x_t, t):
        e_null = eps_oracle(x_t, t, null)
        return e_null + w * (eps_oracle(x_t, t, labels) - e_null)

    torch.testing.assert_close(x, sample(by_hand, schedule, (B, 2), **kw), rtol=0, atol=1e-5)


def test_guidance_shortcuts_call_one_half(setup):
    schedule, gmm, _ = setup
    for w, label in [(1.0, 4), (0.0, K)]:
        oracle = ConditionalOracle(gmm, schedule)
        sample(oracle, schedule, (3, 2), sampler="ddim", steps=2, labels=4, guidance=w, generator=0)
        assert [n for n, _ in oracle.calls] == [3, 3]
        assert all(torch.equal(lab, torch.full((3,), label)) for _, lab in oracle.calls)


def test_learned_variance_channels_come_from_the_conditional_half():
    def model(x, t, labels):  # (B, 2C): prediction = label, variance channels = 10 * label
        lab = labels.to(x.dtype).view(-1, 1, 1, 1).expand_as(x)
        return torch.cat([lab, 10 * lab], dim=1)

    model.num_classes = 4
    out = guided_model(model, torch.tensor([1, 2]), 3.0, 2, "cpu")(torch.zeros(2, 3, 2, 2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 6, 2, 2)
    torch.testing.assert_close(out[:, :3], (4 + 3 * (torch.tensor([1.0, 2.0]) - 4)).view(2, 1, 1, 1).expand(2, 3, 2, 2))
    torch.testing.assert_close(out[:, 3:], torch.tensor([10.0, 20.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2))


def test_guided_learned_variance_through_the_ancestral_sampler(setup):
    schedule, gmm, _ = setup
    oracle = ConditionalOracle(gmm, schedule)
    labels, w = torch.tensor([0, 3, 8]), 2.0

    def model(x, t, lab):  # learned variance: v = +0.5 for class 3, -0.5 otherwise
        v = torch.where(lab == 3, 0.5, -0.5).to(x.dtype)[:, None].expand_as(x)
        return torch.cat([oracle(x, t, lab), v], dim=1)

    model.num_classes = K

    def by_hand(x, t):
        e_null = oracle(x, t, torch.full((3,), K))
        return torch.cat([e_null + w * (oracle(x, t, labels) - e_null), model(x, t, labels)[:, 2:]], dim=1)

    kw = dict(steps=10, variance="learned_range", clip_denoised=False, generator=4)
    torch.testing.assert_close(sample(model, schedule, (3, 2), labels=labels, guidance=w, **kw),
                               sample(by_hand, schedule, (3, 2), **kw), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler,guidance", [("ddpm", 2.0), ("ddim", 3.0), ("dpm++2m", 1.0)])
def test_sample_depends_only_on_its_seed_and_label(setup, sampler, guidance):
    schedule, gmm, _ = setup
    labels = torch.tensor([2, 0, 5, 5, 8])  # 8: the null label
    kw = dict(sampler=sampler, steps=6, clip_denoised=False, guidance=guidance)
    whole = sample(ConditionalOracle(gmm, schedule), schedule, (5, 2), labels=labels, generator=123, **kw)
    for i in range(5):
        alone = sample(ConditionalOracle(gmm, schedule), schedule, (1, 2), labels=labels[i:i + 1],
                       generator=per_sample_seeds(123, 1, offset=i), **kw)
        torch.testing.assert_close(alone, whole[i:i + 1], rtol=0, atol=1e-6)
    relabelled = sample(ConditionalOracle(gmm, schedule), schedule, (5, 2), labels=labels.flip(0), generator=123, **kw)
    assert torch.equal(relabelled[2], whole[2]) and not torch.allclose(relabelled[0], whole[0])


def test_bad_labels_and_guidance_raise_one_line_errors(setup):
    schedule, gmm, _ = setup
    cond = ConditionalOracle(gmm, schedule)
    uncond = gmm.eps_oracle(schedule)
    cases = [
        (cond, dict(labels=-1), "label -1 out of range; labels must lie in 0..7 (or 8, the null label)"),
        (cond, dict(labels=torch.tensor([0, 9, 1])), "label 9 out of range"),
        (cond, dict(labels=torch.tensor([0.0, 1.0, 1.0])), "integer class labels"),
        (cond, dict(labels=torch.tensor([0, 1])), "shape (B,) = (3,)"),
        (cond, dict(guidance=2.0), "guidance=2.0 needs class labels"),
        (cond, dict(labels=1, guidance=float("nan")), "guidance must be a finite number"),
        (uncond, dict(labels=1), "class labels need a class-conditional model"),
        (uncond, dict(guidance=3.0), "guidance=3.0 need a class-conditional model"),
    ]
    for model, kw, words in cases:
        with pytest.raises(ValueError) as info:
            sample(model, schedule, (3, 2), steps=2, **kw)
        assert words in str(info.value) and "\n" not in str(info.value), (kw, str(info.value))
    # The null label itself is allowed.
    sample(cond, schedule, (3, 2), steps=2, labels=K)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

def _fill(model):
    """Deterministic weights that do not depend on torch's random generator (init is zero at the output)."""
    with torch.no_grad():
        for k, (_, p) in enumerate(sorted(model.state_dict().items())):
            p.copy_((0.2 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.37 + k)).reshape(p.shape))
    return model.eval()


def _keys(model):
    return hashlib.sha256(";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()).encode()).hexdigest()[:16]


UNET = dict(in_channels=2, out_channels=2, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            dropout=0.0, norm_groups=4)
MLP = dict(dim=2, hidden=16, depth=2, time_embed_dim=8)


def test_unconditional_networks_are_unchanged():
    """Golden values recorded with the networks before class conditioning existed: same state-dict
    keys and shapes (old checkpoints load), same outputs."""
    unet = _fill(UNet(UNetConfig(**UNET)))
    x = torch.sin(torch.arange(3 * 2 * 8 * 8, dtype=torch.float64) * 0.11).reshape(3, 2, 8, 8).float()
    out = unet(x, torch.tensor([0, 17, 999])).double()
    assert _keys(unet) == "907044b27fe93213" and unet.num_classes is None
    assert out.sum().item() == pytest.approx(63.78174642473459, rel=1e-5)
    assert out.abs().sum().item() == pytest.approx(65.9711284711957, rel=1e-5)
    mlp = _fill(MLPDenoiser(MLPConfig(**MLP)))
    out = mlp(torch.sin(torch.arange(6, dtype=torch.float64)).reshape(3, 2).float(), torch.tensor([0, 17, 999]))
    assert _keys(mlp) == "3eb4c1ea50ebb24c" and mlp.num_classes is None
    torch.testing.assert_close(out, torch.tensor([[-0.07972681522369385, -0.061991047114133835],
                                                  [-0.09452970325946808, -0.07726988196372986],
                                                  [-0.026505976915359497, -0.02674594521522522]]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_conditional_networks(kind):
    if kind == "unet":
        net = _fill(UNet(UNetConfig(**UNET, num_classes=3)))
        plain = _fill(UNet(UNetConfig(**UNET)))
        x = torch.randn(4, 2, 8, 8)
    else:
        net = _fill(MLPDenoiser(MLPConfig(**MLP, num_classes=3)))
        plain = _fill(MLPDenoiser(MLPConfig(**MLP)))
        x = torch.randn(4, 2)
    t = torch.tensor([5, 5, 5, 5])
    assert net.num_classes == 3
    # One extra parameter tensor: the label embedding of 3 classes + the null label.
    extra = set(net.state_dict()) - set(plain.state_dict())
    assert extra == {"label_emb.weight"} and net.state_dict()["label_emb.weight"].shape[0] == 4
    out = net(x, t, torch.tensor([0, 1, 2, 3]))
    assert out.shape == x.shape
    assert all(not torch.allclose(out[i], out[j]) for i in range(4) for j in range(i))  # the label matters
    same = net(x[:1].expand(4, *x.shape[1:]), t, torch.tensor([1, 1, 1, 1]))
    torch.testing.assert_close(same, same[:1].expand_as(same))
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((4,), 3)))  # None is the null label
    torch.testing.assert_close(net(x, t, 2), net(x, t, torch.full((4,), 2)))
    with pytest.raises(ValueError, match="label 4 out of range"):
        net(x, t, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="unconditional .* takes no class labels"):
        plain(x, t, torch.tensor([0, 1, 2, 0]))
    # A conditional network trains: the loss reaches the label embedding.
    net.train()
    net(x, t, torch.tensor([0, 1, 2, 3])).square().mean().backward()
    assert net.label_emb.weight.grad[:4].abs().sum(1).gt(0).all()


def test_num_classes_config_validation():
    for bad in [0, -2, 2.5, True, "10"]:
        with pytest.raises(ValueError, match="num_classes must be None"):
            UNetConfig(**UNET, num_classes=bad)
        with pytest.raises(ValueError, match="num_classes must be None"):
            MLPConfig(**MLP, num_classes=bad)


def test_conditional_mlp_samples_with_guidance():
    # A real network through the sampler: guided, one batch of 2B per step, finite, per-sample seeds.
    net = MLPDenoiser(MLPConfig(**MLP, num_classes=2)).eval()
    schedule = NoiseSchedule.from_name("cosine", 50)
    x = sample(net, schedule, (4, 2), sampler="dpm++2m", steps=5, labels=torch.tensor([0, 1, 0, 2]), guidance=4.0,
               generator=1)
    y = sample(net, schedule, (1, 2), sampler="dpm++2m", steps=5, labels=torch.tensor([1]), guidance=4.0,
               generator=per_sample_seeds(1, 1, offset=1))
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x[1:2], y, rtol=0, atol=1e-5)
    assert np.isfinite(float(x.sum()))


def test_public_names_are_the_functions():
    # A submodule named like its function would shadow it once imported (ddpm.train was renamed
    # ddpm.training.loop for that reason): the modules are guidance, inpainting, inversion, interpolation.
    import ddpm
    from ddpm.sampling.inpainting import inpaint
    from ddpm.sampling.interpolation import interpolate
    from ddpm.sampling.inversion import invert

    assert (ddpm.inpaint, ddpm.invert, ddpm.interpolate, ddpm.guided_model) == (inpaint, invert, interpolate,
                                                                                guided_model)
