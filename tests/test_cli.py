"""The ``ddpm`` command line: smoke run of train -> sample -> schedules, help texts, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ddpm.cli import main

TINY = ["--preset", "tiny", "--no-progress"]




def run_cli(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ddpm", *argv], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained through the real entry point (a subprocess)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("train", *TINY, "--steps", "2", "--out", str(out), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "run finished" in proc.stdout
    return out


def test_train_sample_png_npz_and_schedules(run_dir, tmp_path, capsys):
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 3
    assert main(["sample", str(run_dir), "--num", "5", "--batch-size", "2", "--steps", "3", "--out", str(tmp_path / "g.png"),
                 "--trajectory", str(tmp_path / "traj.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0 and (tmp_path / "traj.png").stat().st_size > 0
    assert main(["sample", str(run_dir / "ckpt-0000002"), "--num", "5", "--batch-size", "2", "--steps", "3",
                 "--out", str(tmp_path / "s.npz")]) == 0
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 28, 28, 1)
    # sample i depends on (seed, i) only, not on the batch size
    assert main(["sample", str(run_dir), "--num", "5", "--batch-size", "5", "--steps", "3", "--out", str(tmp_path / "t.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "t.npz")["images"], images)
    capsys.readouterr()
    assert main(["schedules", "--table", "--T", "100", "--every", "50"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in ("linear", "cosine", "sqrt_linear", "sqrt"))


def test_every_command_has_help_with_examples(capsys):
    for argv in (["--help"], ["train", "--help"], ["sample", "--help"], ["schedules", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "examples" in capsys.readouterr().out


def expect_user_error(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error:"), err
    assert "Traceback" not in err and needle in lines[0], err


def test_bad_training_inputs_exit_2_with_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")]
    expect_user_error(capsys, ["train", *TINY, *out, "--data", f"folder:{tmp_path / 'missing'}"], "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    expect_user_error(capsys, ["train", *TINY, *out, "--data", f"folder:{tmp_path / 'empty'}"], "empty")
    expect_user_error(capsys, ["train", *TINY, *out, "--lr", "-0.1"], "lr must be > 0")
    expect_user_error(capsys, ["train", *TINY, *out, "--batch-size", "0"], "batch_size must be >= 1")
    expect_user_error(capsys, ["train", *TINY, *out, "--steps", "0"], "steps must be >= 1")
    expect_user_error(capsys, ["train", *TINY, *out, "--schedule", "quadratic"], "sqrt_linear")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1.0\n")
    expect_user_error(capsys, ["train", *TINY, *out, "--config", str(bad)], "optim.learning_rate")
    expect_user_error(capsys, ["train", *TINY, *out, "--config", str(tmp_path / "nope.toml")], "not found")
    expect_user_error(capsys, ["train", *TINY, *out, "--set", "model.nope=1"], "model.nope")
    assert not (tmp_path / "r").exists()


def test_config_file_and_resume_through_the_cli(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "tiny", "train": {"steps": 2, "progress": False}, "optim": {"lr": 5e-4}}))
    out = str(tmp_path / "r")
    assert main(["train", "--config", str(cfg), "--out", out]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["optim"]["lr"] == 5e-4
    # resuming reads the run's own config; flags still override
    assert main(["train", "--out", out, "--resume", "--steps", "3"]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["optim"]["lr"], saved["train"]["steps"]) == (5e-4, 3)
    expect_user_error(capsys, ["train", "--out", out, "--resume", "--steps", "4", "--set", "model.ch=16"], "another architecture")
    expect_user_error(capsys, ["train", "--config", str(cfg), "--out", out], "--resume")


def test_bad_checkpoints_exit_2_with_one_line(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    target = copy / "ckpt-0000002" / "ema.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    png = str(tmp_path / "x.png")
    expect_user_error(capsys, ["sample", str(copy), "--out", png], "ema.safetensors")
    expect_user_error(capsys, ["sample", str(tmp_path / "nothing"), "--out", png], "nothing")
    expect_user_error(capsys, ["sample", str(run_dir), "--out", str(tmp_path / "x.jpg")], ".png or .npz")
    # a checkpoint whose tensors do not fit the architecture its config describes
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    other = copy / "ckpt-0000002" / "model.safetensors"
    with safe_open(str(other), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(other))
    tensors.popitem()
    save_file(tensors, str(other), metadata=meta)
    expect_user_error(capsys, ["sample", str(copy / "ckpt-0000002"), "--no-ema", "--out", png], "another architecture")
    assert not (tmp_path / "x.png").exists()


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    proc = run_cli("sample", str(tmp_path / "missing-run"), "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("ddpm: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path, capsys, monkeypatch):
    import importlib
    import signal

    train_module = importlib.import_module("ddpm.training")
    real_lr_at = train_module._lr_at

    def press_ctrl_c(config, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(config, step)

    monkeypatch.setattr(train_module, "_lr_at", press_ctrl_c)
    out = tmp_path / "r"
    assert main(["train", *TINY, "--steps", "100", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2" in err and "--resume" in err and "Traceback" not in err
    assert (out / "ckpt-0000002" / "state.pt").is_file()


def test_bare_ddpm_prints_help_instead_of_training(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: ddpm" in out and "train" in out and "sample" in out
    assert not (tmp_path / "runs").exists()
