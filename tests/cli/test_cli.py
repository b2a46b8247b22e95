"""The ``ddpm`` command line: smoke run of train -> sample -> schedules, the one parser (eval's
subcommands share sample's options), help texts, bad input, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ddpm.cli.main import build_parser, main

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
    # no --sampler/--steps: the run's preview settings (the tiny preset previews with ddim, 5 steps)
    assert main(["sample", str(run_dir), "--num", "2", "--out", str(tmp_path / "p.png")]) == 0
    assert "(ddim, 5 steps," in capsys.readouterr().out
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
    for argv in (["--help"], ["train", "--help"], ["sample", "--help"], ["schedules", "--help"], ["eval", "--help"],
                 ["eval", "fid", "--help"], ["eval", "nll", "--help"], ["eval", "toy", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "examples" in out and out.startswith(f"usage: ddpm {' '.join(argv[:-1])}".rstrip()), argv
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert all(f"ddpm eval {name} " in out for name in ("fid", "nll", "toy"))  # every command's examples
    # `ddpm eval` alone lists its commands, like a bare `ddpm`
    assert main(["eval"]) == 2
    assert "{fid,nll,toy}" in capsys.readouterr().out


SHARED = {"sampler": ("--sampler", "dpm++2m"), "steps": ("--steps", "7"), "eta": ("--eta", "0.5"),
          "seed": ("--seed", "3"), "batch_size": ("--batch-size", "9"), "device": ("--device", "cpu"),
          "amp": ("--amp", "bf16"), "no_ema": ("--no-ema",), "progress": ("--progress",)}
SAMPLING_COMMANDS = {"sample": ["sample", "RUN", "--out", "x.png"], "eval fid": ["eval", "fid", "RUN", "--ref", "REF"],
                     "eval toy": ["eval", "toy", "RUN"]}


def _option_help(argv_help: list[str], flag: str, capsys) -> str:
    """The help block of ``flag`` in ``ddpm ... --help``: its line and continuation lines."""
    with pytest.raises(SystemExit):
        main(argv_help)
    block = re.search(rf"^  {re.escape(flag)}\b.*?(?=^  -|^$|\Z)", capsys.readouterr().out, re.M | re.S)
    assert block, flag
    return " ".join(block.group(0).split())


def test_sample_and_eval_share_sampling_options(capsys):
    parser = build_parser()
    keys = list(SHARED)
    defaults = [{k: vars(parser.parse_args(argv))[k] for k in keys} for argv in SAMPLING_COMMANDS.values()]
    assert defaults[0] == defaults[1] == defaults[2]
    assert defaults[0] == {"sampler": None, "steps": None, "eta": None, "seed": 0, "batch_size": 256, "device": "auto",
                           "amp": "auto", "no_ema": False, "progress": None}
    given = [flag for option in SHARED.values() for flag in option]
    parsed = [{k: vars(parser.parse_args(argv + given))[k] for k in keys} for argv in SAMPLING_COMMANDS.values()]
    assert parsed[0] == parsed[1] == parsed[2]
    assert parsed[0] == {"sampler": "dpm++2m", "steps": 7, "eta": 0.5, "seed": 3, "batch_size": 9, "device": "cpu",
                         "amp": "bf16", "no_ema": True, "progress": True}
    for option in SHARED.values():  # word for word the same help
        texts = {_option_help([*command.split(), "--help"], option[0], capsys) for command in SAMPLING_COMMANDS}
        assert len(texts) == 1, texts
    # The older spellings still parse: --sample-batch-size (eval fid: the sampler's batch alone,
    # --batch-size then sets Inception's; eval toy: another name for --batch-size).
    fid = parser.parse_args(["eval", "fid", "RUN", "--ref", "REF", "--sample-batch-size", "64", "--batch-size", "500"])
    assert (fid.sample_batch_size, fid.batch_size, fid.inception_batch_size) == (64, 500, None)
    assert parser.parse_args(["eval", "toy", "RUN", "--sample-batch-size", "64"]).batch_size == 64


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
    # Without its checksum manifest the edited file is judged on its own (an edited file whose
    # manifest remains is refused as damaged before the architecture check).
    (copy / "ckpt-0000002" / "manifest.json").unlink()
    with safe_open(str(other), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(other))
    tensors.popitem()
    save_file(tensors, str(other), metadata=meta)
    expect_user_error(capsys, ["sample", str(copy / "ckpt-0000002"), "--no-ema", "--out", png], "another architecture")
    assert not (tmp_path / "x.png").exists()


def test_bad_eval_and_sampling_inputs_exit_2_with_one_line(run_dir, tmp_path, capsys):
    expect_user_error(capsys, ["eval", "fid", str(run_dir)], "the following arguments are required: --ref")
    expect_user_error(capsys, ["eval", "bogus", str(run_dir)], "invalid choice: 'bogus'")
    expect_user_error(capsys, ["eval", "toy", str(run_dir), "--num", "0"], "expected a positive integer, got '0'")
    expect_user_error(capsys, ["eval", "toy", str(run_dir), "--sampler", "euler"], "invalid choice: 'euler'")
    expect_user_error(capsys, ["eval", "nll", str(tmp_path / "missing")], "missing")
    expect_user_error(capsys, ["eval", "toy", str(run_dir), "--device", "cpu"], "needs a toy run")
    png = str(tmp_path / "x.png")
    expect_user_error(capsys, ["sample", str(run_dir), "--out", png, "--batch-size", "0"], "positive integer")
    expect_user_error(capsys, ["sample", str(run_dir), "--out", png, "--device", "gpu"], "unknown --device 'gpu'")
    expect_user_error(capsys, ["sample", str(run_dir), "--out", png, "--sampler", "ddpm", "--eta", "0.5"], "ddim")
    if not torch.cuda.is_available():
        expect_user_error(capsys, ["eval", "toy", str(run_dir), "--device", "cuda"], "CUDA is not available")
    assert not (tmp_path / "x.png").exists()


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    proc = run_cli("sample", str(tmp_path / "missing-run"), "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("ddpm: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path):
    """A real SIGINT to a real training process once it has logged a step: it saves a checkpoint of
    the last completed step (--ckpt-every 0: no other checkpoint exists) and exits 130."""
    out = tmp_path / "r"
    argv = ["train", *TINY, "--steps", "100000", "--ckpt-every", "0", "--log-every", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "ddpm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        log, deadline = out / "log.jsonl", time.monotonic() + 120
        while not (log.is_file() and log.read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no log line in 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    step = int(re.search(r"interrupted at step (\d+)", err).group(1))
    assert 1 <= step < 100000
    assert [p.name for p in out.glob("ckpt-*")] == [f"ckpt-{step:07d}"]
    assert (out / f"ckpt-{step:07d}" / "state.pt").is_file()


def test_bare_ddpm_prints_help_instead_of_training(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: ddpm" in out and "train" in out and "sample" in out
    assert not (tmp_path / "runs").exists()


def test_set_null_clears_a_setting_of_the_preset_or_config_file(tmp_path):
    # mnist's 14-minute budget (which would drive its decay by the clock) removed from the command line
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "tiny", "train": {"max_minutes": 5.0}}))
    out = tmp_path / "r"
    assert main(["train", "--config", str(cfg), "--no-progress", "--steps", "1", "--set", "train.max_minutes=null",
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["max_minutes"] is None


def test_train_says_when_its_time_budget_ended_the_run(tmp_path, capsys):
    assert main(["train", *TINY, "--steps", "100000", "--max-minutes", "0.01", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "100000 steps or 0.01 minutes, whichever ends first (the learning rate decays over both)" in out
    assert re.search(r"the 0.01-minute budget \(train.max_minutes\) ended the run at step \d+ of at most 100000, "
                     r"with its learning-rate decay finished", out)
