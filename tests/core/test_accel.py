"""Mixed-precision selection (``--amp auto``), fp16 autocast and the fp16 loss scaler.

The selection logic is tested with the capability checks mocked, so every branch runs on any
machine; fp16 autocast and ``torch.amp.GradScaler`` run for real on the CPU.
"""

import pytest
import torch
from torch import nn

from ddpm.core import device as accel

from ddpm.training import optim


@pytest.fixture
def cpu_caps(monkeypatch):
    """Set what torch's cpuinfo reports (a dict), or make it unavailable (None)."""

    def set_caps(caps):
        if caps is None:
            monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
        else:
            monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps))

    return set_caps


@pytest.mark.parametrize("caps,expected", [
    ({"avx512_bf16": True, "amx_bf16": False}, "bf16"),   # e.g. AMD Zen 4, Intel Cooper Lake
    ({"avx512_bf16": False, "amx_bf16": True}, "bf16"),   # Intel Sapphire Rapids and later
    ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, "off"),  # AVX-512 without BF16
    ({}, "off"),                                           # e.g. an ARM build's cpuinfo
])
def test_auto_on_cpu_picks_bf16_only_with_native_bf16(cpu_caps, caps, expected):
    cpu_caps(caps)
    assert accel.resolve_amp("auto", "cpu") == expected
    assert accel.resolve_amp("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("flags,expected", [
    ("fpu sse2 avx2 avx512f avx512_bf16", True), ("fpu sse2 amx_tile amx_bf16", True),
    ("fpu sse2 avx2 avx512f avx512bw", False),
])
def test_cpu_flags_fall_back_to_proc_cpuinfo(cpu_caps, monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: Whatever\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    real = accel._proc_cpuinfo_flags
    monkeypatch.setattr(accel, "_proc_cpuinfo_flags", lambda: real(str(cpuinfo)))
    cpu_caps(None)
    assert accel.cpu_has_native_bf16() is expected

    def broken():
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "get_capabilities", broken, raising=False)
    assert accel.cpu_has_native_bf16() is expected
    assert real(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_picks_bf16_with_tensor_cores_else_fp16(monkeypatch, native, expected):
    seen = []
    monkeypatch.setattr(accel, "cuda_has_native_bf16", lambda device: seen.append(device) or native)
    assert accel.resolve_amp("auto", "cuda:1") == expected
    assert seen == ["cuda:1"]  # asked about the device in use, not device 0


def test_auto_elsewhere_is_float32_and_explicit_modes_are_kept(cpu_caps, monkeypatch):
    assert accel.resolve_amp("auto", "meta") == "off"
    cpu_caps({"avx512_bf16": False})
    monkeypatch.setattr(accel, "cuda_has_native_bf16", lambda device: pytest.fail("explicit mode probed the device"))
    for mode in accel.AMP_MODES:
        assert accel.resolve_amp(mode, "cpu") == mode
        assert accel.resolve_amp(mode, "cuda") == mode
    with pytest.raises(ValueError, match="choose one of auto, off, bf16, fp16"):
        accel.resolve_amp("fp8", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_detection_matches_compute_capability():
    major, _ = torch.cuda.get_device_capability(0)
    assert accel.cuda_has_native_bf16("cuda:0") == (major >= 8 or torch.version.hip is not None)


def test_fp16_autocast_runs_convolutions_in_half_and_agrees_with_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        with accel.autocast("cpu", "fp16"):
            half = net(x)
    assert half.dtype == torch.float16
    # fp16 has an 11-bit significand: about 1e-3 relative per operation.
    assert (half.float() - ref).abs().max() < 1e-2 * ref.abs().max()


def _train_step(net, scaler, x, y, opt):
    opt.zero_grad(set_to_none=True)
    with accel.autocast("cpu", "fp16" if scaler.is_enabled() else "off"):
        loss = (net(x).float() - y).pow(2).mean()
    scaler.scale(loss).backward()
    return loss


def test_grad_scaler_on_cpu_scales_unscales_and_skips_overflowing_steps():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    nets = [nn.Linear(4, 2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    scaler = optim.make_grad_scaler("fp16", "cpu")
    plain = optim.make_grad_scaler("off", "cpu")
    assert scaler.is_enabled() and not plain.is_enabled()
    assert not optim.make_grad_scaler("bf16", "cpu").is_enabled()

    # A normal step: the scaled loss backpropagates scale * grad, and step() unscales before
    # updating, so the update is the plain one (up to fp16 forward rounding).
    _train_step(nets[0], scaler, x, y, opts[0])
    grad_scaled = nets[0].weight.grad.clone()
    _train_step(nets[1], plain, x, y, opts[1])
    grad = nets[1].weight.grad.clone()
    assert (grad_scaled / scaler.get_scale() - grad).abs().max() < 1e-2 * grad.abs().max()
    scale = scaler.get_scale()
    scaler.step(opts[0])
    scaler.update()
    opts[1].step()
    assert scaler.get_scale() == scale  # no overflow: the scale grows only after growth_interval steps
    assert (nets[0].weight - nets[1].weight).abs().max() < 1e-3 * nets[1].weight.abs().max()

    # An overflowing step (inf in a gradient) is skipped and the scale halved.
    before = nets[0].weight.detach().clone()
    _train_step(nets[0], scaler, x, y, opts[0])
    nets[0].weight.grad[0, 0] = float("inf")
    scaler.step(opts[0])
    scaler.update()
    assert torch.equal(nets[0].weight.detach(), before)
    assert scaler.get_scale() == scale / 2

    # Its state round-trips, as a checkpoint needs for an exact resume.
    restored = optim.make_grad_scaler("fp16", "cpu")
    restored.load_state_dict(scaler.state_dict())
    assert restored.get_scale() == scaler.get_scale()
