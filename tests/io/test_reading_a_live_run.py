"""Reading a run that is still training: ``ddpm.load`` while ``ddpm train`` writes and rotates
checkpoints in the same directory never fails and never reads a half-written checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from ddpm.io import run as run_module
from ddpm.io.checkpoint import list_checkpoints
from ddpm.io.run import load
from ddpm.training.loop import train


def test_a_checkpoint_rotated_away_while_loading_falls_back_to_the_next_newest(tmp_path, tiny, monkeypatch):
    run = train(tiny(**{"train.steps": 4, "train.ckpt_every": 2}), out=tmp_path / "r")
    real, calls = run_module._load_weights, []

    def rotated_first(weights_path, *args):
        calls.append(weights_path.parent.name)
        if len(calls) == 1:  # the trainer's rotation removes the newest checkpoint after it verified
            shutil.rmtree(weights_path.parent)
        return real(weights_path, *args)

    monkeypatch.setattr(run_module, "_load_weights", rotated_first)
    loaded = load(run)
    assert calls == ["ckpt-0000004", "ckpt-0000002"] and loaded.step == 2


def test_a_named_checkpoint_that_vanishes_is_an_error_not_a_fallback(tmp_path, tiny, monkeypatch):
    run = train(tiny(**{"train.steps": 4, "train.ckpt_every": 2}), out=tmp_path / "r")
    real = run_module._load_weights

    def rotated(weights_path, *args):
        shutil.rmtree(weights_path.parent)
        return real(weights_path, *args)

    monkeypatch.setattr(run_module, "_load_weights", rotated)
    with pytest.raises(Exception, match="not found|No such file"):
        load(run / "ckpt-0000004")  # the user asked for this one: no silent substitute


def test_loading_in_a_loop_while_training_rotates_checkpoints(tmp_path):
    out = tmp_path / "live"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "ddpm", "train", "--preset", "tiny", "--no-progress", "--steps", "100000",
         "--ckpt-every", "1", "--set", "train.keep_last=2", "--set", "train.sample_every=0", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out):
            assert trainer.poll() is None, trainer.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        steps = [load(out).step for _ in range(60)]  # each a verified, complete checkpoint
        assert trainer.poll() is None, trainer.stderr.read()
    finally:
        trainer.terminate()
        trainer.wait(timeout=120)
    assert all(s is not None for s in steps) and steps == sorted(steps) and steps[-1] > steps[0]
