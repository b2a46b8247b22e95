"""Fast by default: ``ddpm sample``, ``ddpm eval`` and ``ddpm train`` pick the device's autocast
mode (``--amp auto``), ``ddpm.load`` returns a run prepared the same way (``fast=False`` opts
out), sampling shows one progress bar on a terminal, and the samples do not get worse.

Which mode "auto" picks depends on the CPU, so the tests set the answer of the capability check
(``accel.cpu_has_native_bf16``) and check what actually ran: a global forward hook records the
autocast state inside every module call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ddpm
from ddpm.core import device as accel

from ddpm.nets import fast as fastpaths
from ddpm.sampling.batches import SamplerSettings, sample_batches
from ddpm.io.run import load
from ddpm.cli.main import build_parser, main
from ddpm.sampling.samplers import SAMPLERS, sample
from test_evaluate import make_run
from test_samplers import N, _passes, setup  # noqa: F401  (setup: the mixture, its reference and bar)


@pytest.fixture
def native_bf16(monkeypatch):
    """``native_bf16(flag)``: what this CPU's bf16 check answers for the rest of the test."""
    return lambda flag: monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: flag)


@pytest.fixture
def autocast_seen():
    """The (enabled, dtype) autocast state inside every nn.Module call made during the test."""
    seen = []

    def hook(module, args, output):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    handle = nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny", "tiny")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "toy", "toy2d")


# -- the command line -------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["sample", "RUN", "--out", "x.png"], ["eval", "fid", "RUN", "--ref", "REF"],
                                  ["eval", "toy", "RUN"], ["eval", "nll", "RUN"], ["analytic", "RUN"]])
def test_sampling_commands_default_to_auto_amp_and_a_terminal_progress_bar(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    assert (args.amp, args.progress) == ("auto", None)  # None: a bar when stderr is a terminal
    for flags, amp, progress in [(["--amp", "fp16", "--no-progress"], "fp16", False),
                                 (["--amp", "off", "--progress"], "off", True)]:
        args = parser.parse_args(argv + flags)
        assert (args.amp, args.progress) == (amp, progress)


def _mode_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ddpm: sampling on")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("native,flags,line,state", [
    (True, [], "ddpm: sampling on cpu in bf16 autocast (auto; --amp off for float32)", (True, torch.bfloat16)),
    (False, [], "ddpm: sampling on cpu in float32 (auto; no native half precision on this device)", (False,)),
    (True, ["--amp", "off"], "ddpm: sampling on cpu in float32 (--amp off)", (False,)),
    (False, ["--amp", "bf16"], "ddpm: sampling on cpu in bf16 autocast (--amp bf16)", (True, torch.bfloat16)),
])
def test_sample_runs_in_the_chosen_mode_and_says_so(tiny_run, tmp_path, capsys, native_bf16, autocast_seen,
                                                    native, flags, line, state):
    native_bf16(native)
    argv = ["sample", str(tiny_run), "--num", "3", "--batch-size", "2", "--steps", "2", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "x.npz"), *flags]) == 0
    assert _mode_line(capsys) == line
    assert autocast_seen and {s[:len(state)] for s in autocast_seen} == {state}


@pytest.mark.parametrize("native,recorded", [(True, "bf16"), (False, "off")])
def test_eval_toy_reports_the_mode_it_sampled_in(toy_run, tmp_path, capsys, native_bf16, native, recorded):
    native_bf16(native)
    out = tmp_path / "toy.json"
    assert main(["eval", "toy", str(toy_run), "--num", "20", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["amp"] == recorded  # what ran, not "auto"
    assert "ddpm: sampling on cpu in" in capsys.readouterr().out


@pytest.mark.parametrize("native,recorded,line", [
    (True, "bf16", "ddpm: evaluating on cpu in bf16 autocast (auto; --amp off for float32)"),
    (False, "off", "ddpm: evaluating on cpu in float32 (auto; no native half precision on this device)"),
])
def test_eval_nll_runs_in_the_chosen_mode_says_so_and_records_it(toy_run, tmp_path, capsys, native_bf16,
                                                                 autocast_seen, native, recorded, line):
    native_bf16(native)
    out = tmp_path / "nll.json"
    argv = ["eval", "nll", str(toy_run), "--num", "16", "--timesteps", "3", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["amp"] == recorded
    assert line in capsys.readouterr().out.splitlines()
    assert autocast_seen and {s[0] for s in autocast_seen} == {native}


def test_analytic_runs_in_the_chosen_mode_and_says_so(toy_run, tmp_path, capsys, native_bf16, autocast_seen):
    import shutil

    run = shutil.copytree(toy_run, tmp_path / "run")  # RUN/analytic.json would change the shared run
    native_bf16(True)
    assert main(["analytic", str(run), "--num", "8", "--device", "cpu", "--no-progress"]) == 0
    assert "ddpm: estimating on cpu in bf16 autocast (auto; --amp off for float32)" in capsys.readouterr().out
    assert autocast_seen and {s[:2] for s in autocast_seen} == {(True, torch.bfloat16)}
    assert (run / "analytic.json").is_file()


def test_train_resolves_auto_like_sampling_and_says_so(tmp_path, capsys, native_bf16, autocast_seen):
    native_bf16(True)  # auto -> bf16 on this "CPU"; before, auto meant float32 on every CPU
    argv = ["train", "--preset", "tiny", "--no-progress", "--steps", "1", "--ckpt-every", "1", "--set",
            "sample.num=1", "--set", "sample.steps=1"]
    assert main([*argv, "--amp", "auto", "--out", str(tmp_path / "auto")]) == 0
    assert "ddpm: training tiny on cpu in bf16 autocast (auto; --amp off for float32)" in capsys.readouterr().out
    assert (True, torch.bfloat16) in autocast_seen and (False, torch.bfloat16) not in autocast_seen
    autocast_seen.clear()
    assert main([*argv, "--out", str(tmp_path / "preset")]) == 0  # the tiny preset sets amp="off": kept
    assert ("ddpm: training tiny on cpu in float32 (train.amp=off; --amp auto to choose per device)"
            in capsys.readouterr().out)
    assert autocast_seen and not any(enabled for enabled, _ in autocast_seen)


# -- ddpm.load --------------------------------------------------------------------------------

def test_load_is_fast_by_default_and_fast_false_turns_it_off(tiny_run, native_bf16, monkeypatch):
    native_bf16(True)
    run = load(tiny_run)
    assert run.amp == "bf16"
    # run.sample_kwargs still goes straight to ddpm.sample (no new keys), and run.autocast() uses run.amp
    assert set(run.sample_kwargs) == {"prediction", "variance", "clip_denoised"}
    with run.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        x = sample(run.model, run.schedule, (2, *run.shape), sampler="ddim", steps=2, generator=0, **run.sample_kwargs)
    assert x.dtype == torch.float32 and x.shape == (2, *run.shape)
    assert load(tiny_run, fast=False).amp == "off"
    assert load(tiny_run, fast=False, amp="bf16").amp == "bf16"
    assert load(tiny_run, amp="off").amp == "off"
    native_bf16(False)
    assert load(tiny_run).amp == "off"  # auto on a CPU without native bf16

    def is_nhwc(r):  # (a weight with 1 input channel or a 1x1 kernel is both layouts at once)
        convs = [p for p in r.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2:].numel() > 1]
        return all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)

    assert not is_nhwc(load(tiny_run))  # ch 8: narrower than where channels_last pays (nets.fast)
    monkeypatch.setattr(fastpaths, "CHANNELS_LAST_MIN_WIDTH", 8)
    wide = load(tiny_run)
    assert is_nhwc(wide) and not is_nhwc(load(tiny_run, fast=False))
    with torch.no_grad():
        x, t = torch.randn(2, *wide.shape), torch.tensor([5, 500])
        torch.testing.assert_close(wide.model(x, t), load(tiny_run, fast=False).model(x, t), rtol=1e-4, atol=1e-5)


def test_channels_last_is_preferred_from_width_64():
    assert fastpaths.prefers_channels_last(nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 8, 3)))
    assert not fastpaths.prefers_channels_last(nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 128, 3)))
    assert not fastpaths.prefers_channels_last(nn.Linear(2, 128))  # no convolution: no layout to choose
    from ddpm.nets.unet import UNet

    with torch.device("meta"):
        assert fastpaths.prefers_channels_last(UNet.from_preset("cifar10"))
        assert not fastpaths.prefers_channels_last(UNet.from_preset("mnist"))


# -- batched sampling: the run's mode and the progress bar ------------------------------------

class _Recorder(nn.Module):
    """eps = 0.1 x through a linear layer; remembers whether autocast was on at each call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)
        nn.init.eye_(self.lin.weight)
        self.calls = []

    def forward(self, x, t):
        self.calls.append(torch.is_autocast_enabled("cpu"))
        return 0.1 * self.lin(x)


def _fake_run(**attrs):
    from ddpm.core.schedules import NoiseSchedule
    from ddpm.io.run import LoadedRun

    return LoadedRun(model=_Recorder(), schedule=NoiseSchedule.from_name("linear", 20), shape=(2,),
                     config=ddpm.get_preset("toy2d"), sample_kwargs={"clip_denoised": False}, path=Path("run"),
                     step=None, **attrs)


def test_sample_batches_uses_the_runs_mode_unless_told(native_bf16):
    settings = SamplerSettings("ddim", 3)
    for attrs, amp, expected in [({"amp": "bf16"}, None, True), ({"amp": "bf16"}, "off", False),
                                 ({}, None, False), ({}, "bf16", True), ({}, "auto", False)]:
        native_bf16(False)
        run = _fake_run(**attrs)
        sample_batches(run, 3, settings, batch_size=2, amp=amp)
        assert run.model.calls == [expected] * 6, (attrs, amp)


def test_progress_bar_covers_every_step_of_every_batch(capsys):
    settings = SamplerSettings("ddim", 3)
    x = sample_batches(_fake_run(), 5, settings, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "sampling 5 (ddim, 3 steps)" in err and "9/9" in err and "images/s" in err  # 3 batches x 3 steps
    # The default shows it only on a terminal: captured (non-terminal) stderr stays clean.
    assert torch.equal(sample_batches(_fake_run(), 5, settings, batch_size=2), x)
    sample_batches(_fake_run(), 5, settings, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""


# -- the samples do not get worse: the Gaussian-mixture oracle under bf16 autocast -----------

class _AutocastOracle(nn.Module):
    """The mixture's exact eps (tests/gmm.py) computed in float32 with its two matmuls as
    ``nn.Linear`` layers, so that bf16 autocast rounds them as it rounds a network's layers."""

    def __init__(self, gmm, schedule):
        super().__init__()
        mu = gmm.means.float()  # (K, 2)
        self.project = nn.Linear(2, len(mu), bias=False)  # x -> x . mu_k
        self.mix = nn.Linear(len(mu), 2, bias=False)  # resp -> resp @ mu
        with torch.no_grad():
            self.project.weight.copy_(mu)
            self.mix.weight.copy_(mu.T)
        self.register_buffer("half_norms", 0.5 * (mu**2).sum(1))
        self.register_buffer("abar", schedule.alphas_cumprod.float())
        self.var0 = gmm.std**2
        self.dtypes = set()

    def forward(self, x_t, t):
        ab = self.abar[t][:, None]
        a, var = ab.sqrt(), ab * self.var0 + (1 - ab)
        proj = self.project(x_t)
        self.dtypes.add(proj.dtype)
        resp = torch.softmax((a * proj - ab * self.half_norms) / var, dim=1)
        score = -(x_t - a * self.mix(resp)) / var
        return -(1 - ab).sqrt() * score


@pytest.mark.parametrize("kw", [dict(sampler="ddpm"), dict(sampler="ddim", steps=50, spacing="quad"),
                                dict(sampler="dpm++2m", steps=20)], ids=lambda kw: kw["sampler"])
def test_bf16_autocast_keeps_the_mixture_within_the_fp32_bar(setup, kw):  # noqa: F811
    schedule, gmm, _, _ = setup
    oracle = _AutocastOracle(gmm, schedule)
    draws = {}
    for amp in ("off", "bf16"):
        with accel.autocast("cpu", amp):
            draws[amp] = sample(oracle, schedule, (N, 2), generator=3, clip_denoised=False, **kw)
    assert oracle.dtypes == {torch.float32, torch.bfloat16}  # the layers did run in bf16
    assert draws["bf16"].dtype == torch.float32
    for amp, x in draws.items():
        ok, dist, threshold = _passes(setup, x)
        assert ok, f"{amp}: energy distances {dist} above the bar {threshold}"
    # the same noise: bf16 moves the points by a small fraction of a component's std (0.1)
    assert (draws["bf16"] - draws["off"]).norm(dim=1).median() < 5e-3  # measured 1e-4 to 6e-4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_updates_stay_float32_under_autocast(sampler):
    """A network under autocast hands back bf16; the samplers cast it back and do their own update
    in float32, which autocast (matmuls and convolutions only) leaves alone: the same bf16 output
    gives bit-identical samples inside and outside autocast."""
    seen = []

    def bf16_model(x, t):
        seen.append(x.dtype)
        return (0.1 * x).to(torch.bfloat16)

    from ddpm.core.schedules import NoiseSchedule

    schedule = NoiseSchedule.from_name("linear", 50)
    kw = dict(sampler=sampler, steps=5, generator=1, clip_denoised=False)
    plain = sample(bf16_model, schedule, (4, 2, 3, 3), **kw)
    with accel.autocast("cpu", "bf16"):
        cast = sample(bf16_model, schedule, (4, 2, 3, 3), **kw)
    assert plain.dtype == cast.dtype == torch.float32 and set(seen) == {torch.float32}
    assert torch.equal(plain, cast)
    assert not np.allclose(plain.numpy(), plain.to(torch.bfloat16).float().numpy(), rtol=0, atol=0)
