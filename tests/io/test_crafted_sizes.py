"""Sizes and types that come from a file are checked before they size an allocation or a loop.

A crafted ``ema.safetensors`` (its metadata carries the run's config), a ``config.json`` edited by
hand or a config file with a wrong type: each is one line naming the field, exit 2, never a
traceback, never an endless run. The crafted files are written here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from ddpm.cli.main import main
from ddpm.config import INT_LIMITS, TrainConfig
from ddpm.training.loop import train
from test_faults import rewrite_manifest


@pytest.fixture(scope="module")
def run2(tmp_path_factory, tiny):
    """A finished tiny run of 2 steps (copy it before editing it)."""
    return train(tiny(**{"train.steps": 2}), out=tmp_path_factory.mktemp("sizes") / "r")


def with_stored_config(run2, tmp_path, edit) -> str:
    """A copy of ``run2`` whose weights' metadata carries the config as ``edit`` left it."""
    run = tmp_path / "crafted"
    shutil.copytree(run2, run)
    for ckpt in run.glob("ckpt-*"):
        for name in ("ema.safetensors", "model.safetensors"):
            path = ckpt / name
            with open(path, "rb") as f:  # the header: 8 bytes of length, then JSON with __metadata__
                meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
            config = json.loads(meta["ddpm_config"])
            edit(config)
            meta["ddpm_config"] = json.dumps(config)
            save_file(load_file(str(path)), str(path), metadata=meta)
        rewrite_manifest(ckpt)
    return str(run)


def run_limited(argv: list[str]) -> subprocess.CompletedProcess:
    """``ddpm ARGV`` under a 6 GB address-space limit, so that a regression fails instead of filling
    the machine."""
    script = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({6 << 30}, {6 << 30})); "
              f"from ddpm.cli.main import main; sys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["model"].update(image_size=100_000), "GB on cpu"),
    (lambda c: c["diffusion"].update(timesteps=10**9), "timesteps 1000000000 is past the limit of 100000"),
    (lambda c: c["model"].update(image_size=[28, 10**7]), "GB on cpu"),
])
def test_crafted_sizes_in_the_weights_metadata_are_one_line_before_allocating(run2, tmp_path, edit, needle):
    run = with_stored_config(run2, tmp_path, edit)
    proc = run_limited(["sample", run, "--num", "4", "--out", str(tmp_path / "x.png")])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_sample_count_past_the_memory_is_one_line(run2, tmp_path, capsys):
    assert main(["sample", str(run2), "--num", "10000000", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "10000000 samples of shape (1, 28, 28)" in err and "lower --num or --batch-size" in err, err


@pytest.mark.parametrize("section, key, value, needle", [
    ("train", "steps", "1000", "train: steps must be an integer, got str '1000'"),
    ("optim", "lr", "fast", "optim: lr must be a number, got str 'fast'"),
    ("train", "progress", "yes", "train: progress must be true or false, got str 'yes'"),
    ("diffusion", "clip_denoised", 1, "diffusion: clip_denoised must be true or false, got int 1"),
    ("data", "source", 7, "data: source must be a string, got int 7"),
    ("sample", "steps", [4], "sample: steps must be an integer or null, got tuple (4,)"),
    ("eval", "metrics", "nll", "eval: metrics must be a list, got str 'nll'"),
    ("train", "steps", 1e300, "train: steps 1e+300 is past the limit of 100000000"),
    ("train", "seed", 2**40, "train: seed 1099511627776 is past the limit of 4294967295"),
    ("train", "log_every", 2**70, "train: log_every 1.18e+21 is past the limit of 9223372036854775807"),
])
def test_a_wrong_type_or_an_endless_count_in_config_json_is_one_line_on_resume(run2, tmp_path, capsys, section, key,
                                                                               value, needle):
    run = tmp_path / "edited"
    shutil.copytree(run2, run)
    config = json.loads((run / "config.json").read_text())
    config[section][key] = value
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 2  # reads RUN/config.json
    err = capsys.readouterr().err
    assert needle in err and "not supported between" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-0000002"]  # nothing trained, nothing written


def test_the_limits_hold_every_real_preset():
    from ddpm.presets import PRESETS, get_preset

    for name in PRESETS:
        config = get_preset(name)
        assert config.train.steps <= INT_LIMITS["steps"] and config.diffusion.timesteps <= INT_LIMITS["timesteps"]
        assert TrainConfig.from_dict(config.to_dict()) == config  # the checks accept what every preset holds


def test_the_python_api_gets_the_same_checks(tiny):
    with pytest.raises(ValueError, match="steps must be an integer, got float 8.0"):
        tiny().train.__class__(steps=8.0)
