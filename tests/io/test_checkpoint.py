"""Configs (validation, files, overrides) and checkpoints (atomic save, keep-last-K, load, damage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ddpm.io import checkpoint
from ddpm.io.checkpoint import latest_checkpoint, list_checkpoints
from ddpm.io.run import load
from ddpm.errors import UserError
from ddpm.config import TrainConfig, read_config_file
from ddpm.presets import get_preset, resolve_config
from ddpm.training.loop import train


@pytest.fixture(scope="module")
def run4(tmp_path_factory, tiny):
    """A tiny run of 4 steps with checkpoints at 2 and 4."""
    return train(tiny(), out=tmp_path_factory.mktemp("run") / "r")


# -- configs ----------------------------------------------------------------------------------

def test_config_round_trips_through_json():
    for name in ("mnist", "cifar10", "tiny"):
        config = get_preset(name)
        again = TrainConfig.from_dict(json.loads(config.to_json()))
        assert again == config


def test_cifar10_preset_is_the_paper_recipe():
    c = get_preset("cifar10")
    assert (c.optim.lr, c.optim.warmup, c.optim.grad_clip) == (2e-4, 5000, 1.0)
    assert (c.train.batch_size, c.train.ema_decay, c.train.steps) == (128, 0.9999, 800_000)
    assert (c.model.dropout, c.data.hflip) == (0.1, True)
    assert (c.diffusion.timesteps, c.diffusion.schedule) == (1000, "sqrt_linear")
    assert (c.model.ch, c.model.ch_mult, c.model.attn_resolutions) == (128, (1, 2, 2, 2), (16,))


@pytest.mark.parametrize("key, value, needle", [
    ("optim.lr", -1e-3, "lr must be > 0"),
    ("train.batch_size", 0, "batch_size must be >= 1"),
    ("train.steps", 0, "steps must be >= 1"),
    ("diffusion.schedule", "quadratic", "linear, cosine, sqrt_linear, sqrt"),
    ("diffusion.prediction", "score", "eps, x0, v"),
    ("sample.sampler", "euler", "ddpm, ddim, dpm++2m"),
    ("train.amp", "fp8", "auto, off, bf16"),
])
def test_invalid_values_are_refused_with_allowed_values(key, value, needle, tiny):
    with pytest.raises((ValueError, UserError), match=needle.replace("+", r"\+")):
        tiny(**{key: value})


def test_unknown_keys_are_refused_by_name(tmp_path, tiny):
    with pytest.raises(UserError, match="optim.learning_rate"):
        tiny(**{"optim.learning_rate": 1.0})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(UserError, match="train.stepz"):
        resolve_config("tiny", bad)


def test_config_files_toml_yaml_json_and_flag_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[optim]\nlr = 3e-4\n[train]\nsteps = 7\nseed = 5\n[model]\nch = 16\n')
    c = resolve_config(None, toml, **{"train.seed": 9})
    assert (c.name, c.optim.lr, c.train.steps, c.train.seed, c.model.ch) == ("tiny", 3e-4, 7, 9, 16)
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"diffusion": {"schedule": "cosine"}, "train": {"batch_size": 4}}))
    c = resolve_config("tiny", js)
    assert (c.diffusion.schedule, c.train.batch_size) == ("cosine", 4)
    pytest.importorskip("yaml")
    yml = tmp_path / "c.yaml"
    yml.write_text("optim:\n  warmup: 11\n")
    assert resolve_config("tiny", yml).optim.warmup == 11
    with pytest.raises(UserError, match="cannot parse"):
        (tmp_path / "broken.toml").write_text("[optim\n")
        read_config_file(tmp_path / "broken.toml")


# -- checkpoints ------------------------------------------------------------------------------

def test_run_dir_layout_and_state_is_weights_only_readable(run4):
    assert [s for s, _ in list_checkpoints(run4)] == [2, 4]
    assert json.loads((run4 / "config.json").read_text())["name"] == "tiny"
    state = torch.load(latest_checkpoint(run4) / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["data_position"] == 4
    assert "state" in state["optimizer"] and torch.is_tensor(state["rng"]["ranks"][0]["cpu"])
    lines = [json.loads(x) for x in (run4 / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4] and all(x["loss"] > 0 for x in lines)


def test_load_accepts_run_dir_ckpt_dir_and_file(run4):
    from safetensors.torch import load_file

    ema = load_file(str(run4 / "ckpt-0000004" / "ema.safetensors"))
    raw = load_file(str(run4 / "ckpt-0000004" / "model.safetensors"))
    for path in (run4, run4 / "ckpt-0000004", run4 / "ckpt-0000004" / "ema.safetensors"):
        run = load(path)
        assert run.step == 4 and run.config.name == "tiny"
        assert all(torch.equal(v, ema[k]) for k, v in run.model.state_dict().items())
    online = load(run4, ema=False)
    assert all(torch.equal(v, raw[k]) for k, v in online.model.state_dict().items())
    assert not all(torch.equal(v, ema[k]) for k, v in online.model.state_dict().items())
    assert run.shape == (1, 28, 28)
    assert run.sample_kwargs == {"prediction": "eps", "variance": "fixed_small", "clip_denoised": True}
    assert run.schedule.num_timesteps == 100


def test_load_checks_shapes_without_importing_dynamo(run4):
    # load checks the file's shapes against the config's network built on the meta device; an
    # arange there once imported torch._dynamo, 1.1 s of a 1.3 s load of the tiny preset.
    code = ("import sys, ddpm; run = ddpm.load(sys.argv[1]); assert run.step == 4; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    done = subprocess.run([sys.executable, "-c", code, str(run4)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_crash_during_save_leaves_latest_checkpoint_intact(tmp_path, monkeypatch, tiny):
    run_dir = tmp_path / "r"
    train(tiny(**{"train.steps": 2}), out=run_dir)
    before = (run_dir / "ckpt-0000002" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated power cut")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        train(tiny(), out=run_dir, resume=True)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    assert (run_dir / "ckpt-0000002" / "model.safetensors").read_bytes() == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp")]
    assert load(run_dir).step == 2
    # and the run continues from there
    train(tiny(), out=run_dir, resume=True)
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4]


def test_keep_last_k(tmp_path, tiny):
    run_dir = train(tiny(**{"train.steps": 5, "train.ckpt_every": 1, "train.keep_last": 2}), out=tmp_path / "r")
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 5]


def test_incomplete_checkpoint_folder_is_ignored(run4, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run4, copy)
    (copy / "ckpt-0000009").mkdir()
    (copy / "ckpt-0000009" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(copy).name == "ckpt-0000004"


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_checkpoint_is_a_user_error_naming_the_file(run4, tmp_path, damage, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run4, copy)
    target = copy / "ckpt-0000004" / "ema.safetensors"
    data = target.read_bytes()
    target.write_bytes(b"\x00not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(UserError, match="ema.safetensors"):  # named explicitly: refused
        load(copy / "ckpt-0000004")
    assert load(copy).step == 2  # the run: its newest intact checkpoint, said on stderr
    assert "ckpt-0000004 is damaged (ema.safetensors" in capsys.readouterr().err
    (copy / "ckpt-0000004" / "manifest.json").unlink()  # as written before manifests: still caught by the parser
    with pytest.raises(UserError, match="ema.safetensors"):
        load(copy / "ckpt-0000004")
    (copy / "ckpt-0000004" / "state.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="state.pt"):
        checkpoint.read_state(copy / "ckpt-0000004")


def test_other_architecture_is_a_user_error(run4, tmp_path, tiny):
    with pytest.raises(UserError, match="another architecture"):
        train(tiny(**{"model.ch": 16, "train.steps": 6}), out=run4, resume=True)
    assert [s for s, _ in list_checkpoints(run4)] == [2, 4]


def test_existing_run_without_resume_is_refused(run4, tiny):
    with pytest.raises(UserError, match="--resume"):
        train(tiny(), out=run4)


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such run"):
        load(tmp_path / "nope")
    with pytest.raises(UserError, match="no complete checkpoint"):
        load(tmp_path)
    assert os.listdir(tmp_path) == []
