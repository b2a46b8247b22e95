"""Autoguidance (Karras et al. 2024): the guide a run keeps at ``train.guide_at``, its checkpoints,
resume and loading, and sampling guided by it (guide + w (model - guide))."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ddpm
from ddpm.errors import UserError
from ddpm.sampling.guidance import autoguided_model
from ddpm.presets import get_preset
from ddpm.sampling.samplers import per_sample_seeds, sample
from ddpm.core.schedules import NoiseSchedule
from ddpm.training.loop import train


def tensors(run_dir, step, name):
    return load_file(str(run_dir / f"ckpt-{step:07d}" / f"{name}.safetensors"))


def test_the_combination_is_guide_plus_w_times_the_difference_and_keeps_learned_variances():
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    good = lambda x, t: torch.cat([x + 1.0, torch.full_like(x, 0.25)], 1)  # noqa: E731  (eps, v channels)
    bad = lambda x, t: torch.cat([x - 1.0, torch.full_like(x, 0.75)], 1)  # noqa: E731
    out = autoguided_model(good, bad, 2.5)(x, t)
    torch.testing.assert_close(out[:, :2], (x - 1.0) + 2.5 * 2.0, rtol=0, atol=1e-6)
    assert torch.equal(out[:, 2:], torch.full_like(x, 0.25))  # the variance of the model, not of the guide
    assert autoguided_model(good, bad, 1.0) is good
    plain = autoguided_model(lambda x, t: 2 * x, lambda x, t: x, 3.0)(x, t)
    torch.testing.assert_close(plain, x + 3.0 * x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_sampling_with_a_guide_is_sampling_the_combined_network(sampler):
    schedule = NoiseSchedule.from_name("cosine", 50)
    good, bad = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Conv2d(1, 1, 3, padding=1)
    combined = lambda x, t: bad(x) + 1.7 * (good(x) - bad(x))  # noqa: E731
    ours = sample(lambda x, t: good(x), schedule, (4, 1, 6, 6), sampler=sampler, steps=10, generator=3,
                  guide=lambda x, t: bad(x), autoguidance=1.7)
    oracle = sample(combined, schedule, (4, 1, 6, 6), sampler=sampler, steps=10, generator=3)
    torch.testing.assert_close(ours, oracle, rtol=0, atol=1e-6)
    unguided = sample(lambda x, t: good(x), schedule, (4, 1, 6, 6), sampler=sampler, steps=10, generator=3)
    assert not torch.allclose(ours, unguided, atol=1e-3)  # the guide did change the samples
    with pytest.raises(ValueError, match="autoguidance=2.0 needs guide="):
        sample(lambda x, t: good(x), schedule, (4, 1, 6, 6), sampler=sampler, steps=10, autoguidance=2.0)


def test_config_refuses_a_guide_point_outside_the_run():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="guide_at must lie in"):
            get_preset("tiny").override(**{"train.guide_at": bad})


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    """A 6-step tiny run keeping its guide at half of its decay phase, a checkpoint every step."""
    config = get_preset("tiny").override(**{"train.steps": 6, "train.ckpt_every": 1, "train.keep_last": 10,
                                            "train.guide_at": 0.5, "sample.autoguidance": 2.0})
    return config, train(config, out=tmp_path_factory.mktemp("guided") / "run")


def test_the_guide_is_the_ema_at_guide_at_and_every_later_checkpoint_holds_it(guided_run):
    _, run_dir = guided_run
    # tiny: 2 warm-up steps of 6, so progress (step - 2) / 4 reaches 0.5 at step 4
    for step in (1, 2, 3):
        assert not (run_dir / f"ckpt-{step:07d}" / "guide.safetensors").exists()
    ema4 = tensors(run_dir, 4, "ema")
    for step in (4, 5, 6):
        guide = tensors(run_dir, step, "guide")
        assert guide.keys() == ema4.keys() and all(torch.equal(guide[k], ema4[k]) for k in guide)
    assert any(not torch.equal(ema4[k], v) for k, v in tensors(run_dir, 6, "ema").items())  # the EMA moved on
    manifest = json.loads((run_dir / "ckpt-0000006" / "manifest.json").read_text())
    assert "guide.safetensors" in manifest["files"]


def test_a_resumed_run_carries_its_guide_on(guided_run, tmp_path):
    config, run_dir = guided_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "ckpt-0000006")
    train(config, out=copy, resume=True)
    for name in ("guide", "ema"):
        a, b = tensors(run_dir, 6, name), tensors(copy, 6, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_load_and_ddpm_sample_use_the_guide_at_the_runs_scale(guided_run, tmp_path):
    _, run_dir = guided_run
    run = ddpm.load(run_dir, fast=False)
    assert run.guide is not None and run.guide_step == 4
    assert run.guide_kwargs()["autoguidance"] == 2.0 and run.guide_kwargs(1.0) == {}
    assert ddpm.load(run_dir, ema=False).guide is None  # the guide goes with the EMA weights
    kw = dict(sampler="ddim", steps=5, generator=per_sample_seeds(0, 4), **run.sample_kwargs)
    guided = sample(run.model, run.schedule, (4, *run.shape), **kw, **run.guide_kwargs())
    plain = sample(run.model, run.schedule, (4, *run.shape), **kw)

    def cli(*extra):
        out = tmp_path / f"s{len(extra)}.npz"
        proc = subprocess.run([sys.executable, "-m", "ddpm", "sample", str(run_dir), "--num", "4", "--amp", "off",
                               "--seed", "0", "--out", str(out), *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, np.load(out)["images"].astype(int)

    def uint8(x):
        return ddpm.to_uint8(x.float()).astype(int)

    said, images = cli()
    assert "autoguidance 2 by step 4" in said
    assert np.abs(images - uint8(guided)).max() <= 1  # the CLI draws what ddpm.sample does
    said, images = cli("--autoguidance", "1")
    assert "autoguidance" not in said and np.abs(images - uint8(plain)).max() <= 1


def test_autoguidance_needs_a_run_with_a_guide(guided_run, tmp_path):
    _, run_dir = guided_run
    plain = train(get_preset("tiny"), out=tmp_path / "plain")
    for path, extra in ((plain, []), (run_dir, ["--no-ema"])):
        proc = subprocess.run([sys.executable, "-m", "ddpm", "sample", str(path), "--num", "2", "--autoguidance", "2",
                               "--out", str(tmp_path / "x.png"), *extra], capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "--autoguidance 2 needs the run's guide network" in proc.stderr


def test_a_damaged_guide_is_refused_not_used(guided_run, tmp_path):
    _, run_dir = guided_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "ckpt-0000006", copy / "ckpt-0000006")
    path = copy / "ckpt-0000006" / "guide.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is damaged .*guide.safetensors"):
        ddpm.load(copy / "ckpt-0000006")


def test_export_to_diffusers_says_the_guide_stays_behind(guided_run, tmp_path, capsys):
    from ddpm.cli.main import main

    _, run_dir = guided_run
    assert main(["export", str(run_dir), "--format", "diffusers", str(tmp_path / "pipe")]) == 0
    assert "the run's autoguidance guide is not exported" in capsys.readouterr().out
    assert main(["export", str(run_dir), "--format", "diffusers", str(tmp_path / "online"), "--no-ema"]) == 0
    assert "guide" not in capsys.readouterr().out  # the online weights never had one
    # What went out is the final EMA network, not the guide (which differs from it): same function.
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    exported, run = ddpm.load(tmp_path / "pipe", fast=False), ddpm.load(run_dir, fast=False)
    with torch.no_grad():
        ours, theirs, guide = run.model(x, t), exported.model(x, t), run.guide(x, t)
    assert torch.allclose(theirs, ours, atol=1e-6)
    assert not torch.allclose(theirs, guide, atol=1e-6)
