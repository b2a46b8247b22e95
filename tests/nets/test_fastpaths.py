"""Fast paths (ddpm.core.device) compute the same function as the plain float32 eager path: bf16
autocast within bf16 rounding, channels_last and CUDA-graph replay to float32 rounding, the fused
EMA and optimizer equal to their textbook formulas, and samples from one seed unchanged in
distribution-free terms (the same images up to bf16 tolerance)."""

import copy

import pytest
import torch
from torch import nn

from ddpm.core import device as accel

from ddpm.nets import fast as fastpaths

from ddpm.training import optim
from ddpm.sampling.samplers import sample
from ddpm.core.schedules import NoiseSchedule
from ddpm.nets.unet import UNet, UNetConfig


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _random_unet(seed: int = 0) -> UNet:
    # Every kind of layer (attention at 8x8 and in the middle included) at a size where a forward
    # pass takes milliseconds. The reference init zeroes the last layer of every branch (the
    # network starts as zero), which would make every comparison trivially pass: draw all weights.
    torch.manual_seed(seed)
    model = UNet(UNetConfig(in_channels=3, image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(8,), dropout=0.0, norm_groups=8)).eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.uniform_(m.bias, -0.1, 0.1)
    return model


def _inputs(batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def test_bf16_autocast_agrees_with_float32_within_bf16_tolerance():
    model, (x, t) = _random_unet(), _inputs()
    with torch.no_grad():
        ref = model(x, t)
        with accel.autocast("cpu", "bf16"):
            out = model(x, t)
    assert ref.abs().mean() > 0.1  # a non-trivial output
    assert out.dtype == torch.float32  # the U-Net returns the input's dtype
    err = _rel(out, ref)
    assert 0 < err < 3e-2  # measured 1.4e-2; bf16 has an 8-bit significand: ~4e-3 per op, more through the net
    with accel.autocast("cpu", "off"):  # "off" is plain float32
        assert torch.equal(model(x, t).detach(), ref)


def test_autocast_rejects_unknown_mode_listing_allowed():
    with pytest.raises(ValueError, match="off, bf16, fp16"):
        accel.autocast("cpu", "fp8")


def test_channels_last_gives_the_same_output():
    model, (x, t) = _random_unet(), _inputs()
    with torch.no_grad():
        ref = model(x, t)
        fastpaths.prepare_model(model, channels_last=True)
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_prepare_model_compile_is_in_place_and_keeps_state_dict_keys():
    model = _random_unet()
    keys = list(model.state_dict())
    assert fastpaths.prepare_model(model, compile=True) is model  # compilation itself is lazy
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefix in checkpoints


@pytest.mark.slow
def test_compiled_model_agrees_with_eager():
    model, (x, t) = _random_unet(), _inputs()
    with torch.no_grad():
        ref = model(x, t)
        fastpaths.prepare_model(model, compile=True)
        out = model(x, t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_ema_update_equals_reference_formula():
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(7, generator=g))]
    ema = [torch.randn(p.shape, generator=g) for p in params]
    expected = [0.99 * e + 0.01 * p.detach() for e, p in zip(ema, params)]
    optim.ema_update(ema, params, 0.99)
    for e, x in zip(ema, expected):
        torch.testing.assert_close(e, x, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        optim.ema_update(ema[:1], params, 0.99)


def test_make_optimizer_matches_plain_adam():
    # Fixed gradients (a backward pass need not be bit-reproducible across threads).
    def run(make):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s)) for s in ((16, 3, 3, 3), (192,), (7,))]
        opt = make(params)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:  # magnitudes from ~1 down to near eps: the denominators matter
                p.grad = torch.randn(p.shape, generator=g) * torch.rand(p.shape, generator=g) ** 4
            opt.step()
        return opt, params

    opt, fast = run(lambda ps: optim.make_optimizer(ps, 1e-3))
    assert opt.defaults["fused"] or opt.defaults["foreach"]  # one of the multi-tensor paths
    _, ref = run(lambda ps: torch.optim.Adam(ps, 1e-3, foreach=False))
    for pa, pb in zip(fast, ref):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert isinstance(optim.make_optimizer(fast, 1e-3, weight_decay=0.01), torch.optim.AdamW)


def test_graphed_model_on_cpu_is_the_eager_model():
    model, (x, t) = _random_unet(), _inputs()
    graphed = fastpaths.GraphedModel(model)
    with torch.no_grad():
        assert torch.equal(graphed(x, t), model(x, t))
    assert graphed.config is model.config  # attributes pass through to the wrapped model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_model_on_cuda_replays_the_eager_function():
    model, (x, t) = _random_unet(), _inputs()
    model = model.cuda()
    graphed = fastpaths.GraphedModel(model)
    with torch.no_grad():
        for seed in (1, 2, 3):  # fresh inputs each call: the graph reads its static buffers
            x, t = _inputs(seed=seed)
            x, t = x.cuda(), t.cuda()
            torch.testing.assert_close(graphed(x, t), model(x, t), rtol=1e-5, atol=1e-5)


def test_same_seed_gives_the_same_samples_in_the_fast_mode():
    # The CPU's best mode (docs/benchmarks.md): bf16 autocast, channels_last, behind the graph wrapper.
    model = _random_unet()
    fast_model = fastpaths.prepare_model(copy.deepcopy(model), channels_last=True)
    schedule = NoiseSchedule.from_name("sqrt_linear", 1000)
    shape = (4, 3, 16, 16)
    with torch.no_grad():
        ref = sample(model, schedule, shape, sampler="ddim", steps=10, generator=0)
        with accel.autocast("cpu", "bf16"):
            fast = sample(fastpaths.GraphedModel(fast_model), schedule, shape, sampler="ddim", steps=10, generator=0)
    assert ref.std() > 0.1
    assert 0 < _rel(fast, ref) < 5e-2  # measured about 2e-2: ten steps of a random network compound bf16 rounding


_FAULTS_SCRIPT = """
import resource, sys, torch
from ddpm.core import device as accel
from ddpm.nets.unet import UNet, UNetConfig
torch.set_num_threads(1)
if sys.argv[1] == "keep" and not accel.keep_freed_memory():
    print("unsupported"); sys.exit()
model = UNet(UNetConfig(in_channels=1, out_channels=1, image_size=28, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                        attn_resolutions=(), norm_groups=8, mid_attn=True))
x, t = torch.randn(32, 1, 28, 28), torch.randint(0, 1000, (32,))
for i in range(8):
    if i == 3:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x, t).square().mean().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5)
"""


def test_keep_freed_memory_stops_per_step_page_faults():
    # A training step frees and re-allocates its activations; by default glibc unmaps them and
    # every step faults them in again (thousands of page faults per step). Fresh processes, since
    # the setting is process-wide.
    import subprocess
    import sys

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             check=True).stdout.strip()
        return None if out == "unsupported" else float(out)

    kept = faults("keep")
    if kept is None:
        pytest.skip("not glibc: mallopt unavailable")
    default = faults("default")
    assert default > 1000, f"expected the default allocator to fault per step, got {default}"
    assert kept < default / 10, (kept, default)
