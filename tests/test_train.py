"""The training loop: exact resume, accumulation, time budget, Ctrl-C, data order, schedules."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from ddpm.checkpoint import list_checkpoints, load
from ddpm.presets import get_preset
from ddpm.training import IndexStream, TrainingInterrupted, _ema_decay_at, _lr_at, train

train_module = importlib.import_module("ddpm.training")


def tiny(**overrides):
    return get_preset("tiny").override(**overrides)


def weights(run_dir, step, name="model"):
    return load_file(str(run_dir / f"ckpt-{step:07d}" / f"{name}.safetensors"))


def assert_same_tensors(a: dict, b: dict, exact=True, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def optimizer_tensors(run_dir, step):
    state = torch.load(run_dir / f"ckpt-{step:07d}" / "state.pt", weights_only=True)
    return {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # Dropout on, so the restored RNG state matters too.
    config = tiny(**{"model.dropout": 0.1, "train.steps": 6, "train.ckpt_every": 3})
    straight = train(config, out=tmp_path / "straight")
    train(config.override(**{"train.steps": 3}), out=tmp_path / "split")
    split = train(config, out=tmp_path / "split", resume=True)
    for name in ("model", "ema"):
        assert_same_tensors(weights(straight, 6, name), weights(split, 6, name))
    assert_same_tensors(optimizer_tensors(straight, 6), optimizer_tensors(split, 6))
    # and training did move the weights between the two checkpoints
    w3, w6 = weights(straight, 3), weights(straight, 6)
    assert any(not torch.equal(w3[k], w6[k]) for k in w3)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full = train(tiny(**{"train.steps": 2, "train.ckpt_every": 0}), out=tmp_path / "full")
    accum = train(tiny(**{"train.steps": 2, "train.ckpt_every": 0, "train.grad_accum": 2}), out=tmp_path / "accum")
    assert_same_tensors(weights(full, 2), weights(accum, 2), exact=False, atol=1e-6)


def test_time_budget_stops_with_checkpoint_and_final_grid(tmp_path):
    run_dir = train(tiny(**{"train.steps": 1000, "train.max_minutes": 1e-9}), out=tmp_path / "r")
    assert [s for s, _ in list_checkpoints(run_dir)] == [1]
    assert (run_dir / "samples" / "final.png").is_file()


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    real_lr_at = train_module._lr_at

    def press_ctrl_c_at_step_2(config, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(config, step)

    monkeypatch.setattr(train_module, "_lr_at", press_ctrl_c_at_step_2)
    config = tiny(**{"train.steps": 50, "train.ckpt_every": 0})
    with pytest.raises(TrainingInterrupted) as info:
        train(config, out=tmp_path / "r")
    assert info.value.step == 3  # the step in flight completes, then the loop saves and stops
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.undo()
    train(config.override(**{"train.steps": 5}), out=tmp_path / "r", resume=True)
    assert load(tmp_path / "r").step == 5


def test_hflip_fast_paths_and_toy_data_train(tmp_path):
    run_dir = train(tiny(**{"train.steps": 2, "data.hflip": True}), out=tmp_path / "flip")
    assert load(run_dir).step == 2
    # channels_last weights are saved contiguous and load back into a plain model; bf16 autocast
    fast = train(tiny(**{"train.steps": 2, "train.channels_last": True, "train.amp": "bf16"}), out=tmp_path / "fast")
    run = load(fast)
    assert run.step == 2 and all(torch.isfinite(v).all() for v in run.model.state_dict().values())
    pytest.importorskip("ddpm.mlp")
    toy = get_preset("toy2d").override(**{"train.steps": 3, "train.batch_size": 32, "train.progress": False,
                                           "train.ckpt_every": 0, "sample.num": 50, "sample.steps": 3})
    run_dir = train(toy, out=tmp_path / "toy")
    run = load(run_dir)
    assert run.shape == (2,) and (run_dir / "samples" / "final.png").is_file()


def test_index_stream_is_a_sequence_of_epoch_permutations():
    stream = IndexStream(n=10, micro_batch=4, seed=3)
    order = torch.cat([stream.batch(j) for j in range(5)])  # 20 positions = 2 epochs
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:].tolist()) == list(range(10))
    assert not torch.equal(order[:10], order[10:])
    # the state is only j: a fresh stream reproduces any batch (resume needs no iterator state)
    assert torch.equal(IndexStream(10, 4, 3).batch(3), stream.batch(3))
    assert not torch.equal(IndexStream(10, 4, 4).batch(0), stream.batch(0))


def test_lr_warmup_cosine_and_ema_warmup():
    c = get_preset("mnist").override(**{"train.steps": 1100, "optim.warmup": 100, "optim.lr": 1e-3,
                                      "optim.decay": "cosine", "optim.min_lr_ratio": 0.1})
    assert _lr_at(c, 0) == pytest.approx(1e-5) and _lr_at(c, 99) == pytest.approx(1e-3)
    assert _lr_at(c, 100) == pytest.approx(1e-3)
    assert _lr_at(c, 600) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert _lr_at(c, 1100) == pytest.approx(1e-4)
    assert _ema_decay_at(c, 0) == pytest.approx(1 / 10) and _ema_decay_at(c, 10**6) == 0.999
    c = c.override(**{"train.ema_warmup": 0})
    assert _ema_decay_at(c, 0) == 0.999


def test_periodic_eval_runs_every_n_steps_when_asked_and_is_off_by_default(tmp_path):
    import json

    base = {"train.steps": 4, "train.batch_size": 32, "train.progress": False, "train.ckpt_every": 0,
            "train.sample_every": 0, "sample.num": 16, "sample.steps": 2}
    off = train(get_preset("toy2d").override(**base), out=tmp_path / "off")
    assert not (off / "eval").exists()

    on = get_preset("toy2d").override(**base, **{"eval.every": 2, "eval.num": 64, "eval.steps": 3,
                                                  "eval.nll_timesteps": 2})
    run_dir = train(on, out=tmp_path / "on")
    records = [json.loads(line) for line in (run_dir / "eval" / "periodic.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert r["toy"]["num_samples"] == 64 and math.isfinite(r["nll"]["bpd"])
    with pytest.raises(ValueError, match="periodic metric"):
        get_preset("toy2d").override(**{"eval.metrics": ["psnr"]})


def test_tensorboard_scalars_match_the_jsonl_log(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny(**{"train.steps": 6, "train.log_every": 2, "train.sample_every": 0}), out=tmp_path / "r")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm"):
        logged = events.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [r["step"] for r in records] == [2, 4, 6]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in records], rel=1e-6)
