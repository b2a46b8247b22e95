"""Learned and analytic variances in runs (issue 10): config, training (L_hybrid, L_vlb with
loss-aware timesteps, exact resume, DDP), ``ddpm analytic``, ``--variance`` on sample and eval nll,
the ``mnist-learned`` recipe, and one-line errors for combinations that cannot work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ddpm
from ddpm.core.analytic import AnalyticVariance
from ddpm.io.checkpoint import _restore_timestep_sampler
from ddpm.io.run import load
from ddpm.cli.main import main
from ddpm.config import TrainConfig, build_model
from ddpm.errors import UserError
from ddpm.nets.mlp import MLPConfig, MLPDenoiser
from ddpm.presets import get_preset
from ddpm.training.timestep_sampling import LossAwareTimestepSampler
from ddpm.training.loop import train
from ddpm.nets.unet import UNetConfig

LEARNED = {"model.learn_sigma": True, "diffusion.variance": "learned_range"}


def weights(run_dir, step, name="model"):
    return load_file(str(run_dir / f"ckpt-{step:07d}" / f"{name}.safetensors"))


def state(run_dir, step):
    return torch.load(run_dir / f"ckpt-{step:07d}" / "state.pt", weights_only=True)


def cli(capsys, *argv):
    """(exit code, stdout, the stderr lines that are not progress notes) of one ``ddpm`` call."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if not line.startswith("ddpm: sampling on")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A fixed-variance and a learned-variance tiny run, trained once through the CLI (4 steps)."""
    root = tmp_path_factory.mktemp("runs")
    for name, flags in (("fixed", []), ("learned", ["--learn-sigma"])):
        code = main(["train", "--preset", "tiny", "--out", str(root / name), "--no-progress", "--device", "cpu", *flags])
        assert code == 0
    return root / "fixed", root / "learned"


# -- config --------------------------------------------------------------------------------------

def test_learn_sigma_doubles_the_output_and_old_configs_load_unchanged():
    c = UNetConfig(in_channels=3, image_size=8, ch=8, ch_mult=(1,), attn_resolutions=(), norm_groups=4)
    assert (c.out_channels, c.learn_sigma) == (3, False)
    learned = UNetConfig(in_channels=3, image_size=8, ch=8, ch_mult=(1,), attn_resolutions=(), norm_groups=4,
                         learn_sigma=True)
    assert learned.out_channels == 6
    # a preset's out_channels = C is the prediction's, doubled; a 2C network (diffusers) learns its variance
    assert UNetConfig(3, 3, 8, 8, (1,), 1, (), norm_groups=4, learn_sigma=True).out_channels == 6
    assert UNetConfig(3, 6, 8, 8, (1,), 1, (), norm_groups=4).learn_sigma is True
    with pytest.raises(ValueError, match="learn_sigma needs out_channels = 2 \\* in_channels = 6"):
        UNetConfig(3, 5, 8, 8, (1,), 1, (), norm_groups=4, learn_sigma=True)
    # A config written before these fields existed loads as before.
    old = get_preset("tiny").to_dict()
    del old["model"]["learn_sigma"], old["diffusion"]["objective"], old["diffusion"]["vlb_weight"]
    config = TrainConfig.from_dict(old)
    assert config == get_preset("tiny") and config.diffusion.objective == "simple"
    assert config.diffusion.vlb_weight == 0.001
    # out_channels follows learn_sigma when only that is overridden, both ways.
    on = get_preset("tiny").override(**LEARNED)
    assert (on.model.out_channels, on.model.learn_sigma) == (2, True)
    off = on.override(**{"model.learn_sigma": False, "diffusion.variance": "fixed_small"})
    assert off == get_preset("tiny")
    assert TrainConfig.from_dict(json.loads(on.to_json())) == on


def test_mlp_with_learn_sigma_outputs_prediction_and_variance_values():
    # (B, 2 dim): the prediction first, then the variance values v. With the plain network's
    # weights in the shared layers and the first half of fc_out, the first half is its prediction.
    torch.manual_seed(0)
    plain = MLPDenoiser(MLPConfig(dim=2, hidden=16, depth=1))
    learned = MLPDenoiser(MLPConfig(dim=2, hidden=16, depth=1, learn_sigma=True))
    state = {k: v.clone() for k, v in learned.state_dict().items()}
    for k, v in plain.state_dict().items():
        if k.startswith("fc_out."):
            state[k][:2] = v
        else:
            state[k] = v
    learned.load_state_dict(state)
    x, t = torch.randn(5, 2), torch.tensor([0, 3, 10, 500, 999])
    with torch.no_grad():
        out, pred = learned(x, t), plain(x, t)
    assert out.shape == (5, 4) and pred.shape == (5, 2)
    assert torch.allclose(out[:, :2], pred, atol=1e-6)
    assert not torch.allclose(out[:, 2:], pred, atol=1e-3)  # the variance half is its own


def test_mnist_learned_is_the_mnist_recipe_with_learned_variances():
    base, learned = get_preset("mnist").to_dict(), get_preset("mnist-learned").to_dict()
    assert learned["model"].pop("out_channels") == 2 and base["model"].pop("out_channels") == 1
    assert learned["model"].pop("learn_sigma") and not base["model"].pop("learn_sigma")
    assert learned["diffusion"].pop("variance") == "learned_range" and base["diffusion"].pop("variance") == "fixed_small"
    assert learned.pop("name") == "mnist-learned" and base.pop("name") == "mnist"
    # no autoguidance (measured on mnist alone)
    assert learned["train"].pop("guide_at") is None and base["train"].pop("guide_at") == 0.3
    assert learned["sample"].pop("autoguidance") == 1 and base["sample"].pop("autoguidance") == 3
    assert learned["sample"].pop("guidance_interval") is None and base["sample"].pop("guidance_interval") == (600, 999)
    assert learned == base  # same network otherwise, same loss weighting, steps, time budget and previews
    assert get_preset("mnist-learned").diffusion.objective == "simple"  # L_hybrid
    with torch.device("meta"):
        extra = sum(p.numel() for p in build_model(get_preset("mnist-learned").model).parameters()) - sum(
            p.numel() for p in build_model(get_preset("mnist").model).parameters())
    assert extra == 16 * 9 + 1  # one more output channel of the 3x3 conv_out from 16 channels


@pytest.mark.parametrize("flags, message", [
    (["--objective", "vlb", "--variance", "analytic"], "objective 'vlb' needs a variance to train with"),
    (["--set", "diffusion.variance=learned_range", "--set", "model.learn_sigma=false"],
     "'learned_range' needs a network that outputs variances"),
    (["--learn-sigma", "--variance", "fixed_large"], "only diffusion.variance 'learned_range' reads"),
    (["--preset", "mnist", "--objective", "vlb"], "objective 'vlb' needs weighting 'simple'"),
    (["--objective", "hybrid"], "objective 'hybrid' not allowed; choose one of simple, vlb"),
    (["--variance", "learned"], "variance 'learned' not allowed"),
    (["--set", "diffusion.vlb_weight=-1"], "vlb_weight must be >= 0"),
])
def test_impossible_training_combinations_are_one_line_errors(tmp_path, capsys, flags, message):
    argv = ["train", "--out", tmp_path / "r", "--no-progress", *flags]
    if "--preset" not in flags:
        argv[1:1] = ["--preset", "tiny"]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("ddpm: error:") and message in err[0], err
    assert not (tmp_path / "r").exists()  # refused before any work


def test_learn_sigma_and_learned_range_flags_each_set_both(tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("ddpm.training.loop.train", lambda config, **kw: seen.append(config) or tmp_path)
    monkeypatch.setattr("ddpm.cli.train.write_run_report", lambda run_dir: None)
    for flags in (["--learn-sigma"], ["--variance", "learned_range"], ["--preset", "mnist-learned"]):
        assert cli(capsys, "train", *(flags if "--preset" in flags else ["--preset", "tiny", *flags]))[0] == 0
    assert all(c.model.learn_sigma and c.diffusion.variance == "learned_range" for c in seen)
    # and a fixed variance on the learned recipe turns the variance channels off again
    assert cli(capsys, "train", "--preset", "mnist-learned", "--variance", "fixed_small")[0] == 0
    assert (seen[-1].model.out_channels, seen[-1].model.learn_sigma) == (1, False)


# -- training --------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["simple", "vlb"])
def test_learned_variance_run_resumes_bit_identically(tmp_path, tiny, objective):
    if objective == "simple":  # L_hybrid; dropout on, so the restored RNG state matters too
        config = tiny(**LEARNED, **{"model.dropout": 0.1, "train.steps": 6, "train.ckpt_every": 3})
        cut = 3
    else:  # L_vlb: T = 4 and batch 16 fill the loss history (10 per t) before the cut, so the
        # resumed steps draw t from p_t, which only the saved history reproduces
        config = tiny(**LEARNED, **{"diffusion.objective": "vlb", "diffusion.timesteps": 4, "sample.steps": 4,
                                    "model.dropout": 0.1, "train.batch_size": 16, "train.steps": 10,
                                    "train.ckpt_every": 5})
        cut = 5
    end = config.train.steps
    straight = train(config, out=tmp_path / "straight")
    train(config.override(**{"train.steps": cut}), out=tmp_path / "split")
    split = train(config, out=tmp_path / "split", resume=True)
    for name in ("model", "ema"):
        a, b = weights(straight, end, name), weights(split, end, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    if objective == "vlb":
        history = state(straight, cut)["timestep_sampler"]
        assert bool((history["counts"] == 10).all())  # warmed up: t was importance-sampled after the cut
        sampler = LossAwareTimestepSampler(4)
        sampler.load_state_dict(history)
        p = sampler.probabilities()
        assert float(p.max() / p.min()) > 1.5  # not uniform: the early terms of L_vlb dominate
        for key in ("losses", "counts"):
            assert torch.equal(state(straight, end)["timestep_sampler"][key], state(split, end)["timestep_sampler"][key])
    else:
        assert "timestep_sampler" not in state(straight, end)


def test_hybrid_loss_trains_the_variance_channels_through_its_vlb_term_alone(tmp_path, tiny):
    # conv_out starts at zero; its variance half (output channel 1) gets a gradient only from
    # vlb_weight * L_vlb (L_simple sees the prediction half, and L_vlb the mean through a stop-gradient).
    runs = {w: train(tiny(**LEARNED, **{"diffusion.vlb_weight": w, "train.steps": 2, "train.ckpt_every": 0}),
                     out=tmp_path / str(w)) for w in (0.0, 0.001)}
    frozen, trained = (weights(runs[w], 2)["conv_out.weight"] for w in (0.0, 0.001))
    assert torch.count_nonzero(frozen[1]) == 0 and torch.count_nonzero(frozen[0]) > 0
    assert torch.count_nonzero(trained[1]) > 0


def test_a_run_with_analytic_variance_previews_with_fixed_small(tmp_path, tiny):
    # No Gamma_t exists before `ddpm analytic`: the previews are the fixed_small ones, pixel for pixel.
    from PIL import Image

    from ddpm.core.device import resolve_amp
    from ddpm.training.previews import save_preview

    config = tiny(**{"diffusion.variance": "analytic", "sample.sampler": "ddpm", "sample.steps": 5, "train.steps": 2})
    run_dir = train(config, out=tmp_path / "r")
    run = load(run_dir, fast=False)
    amp = resolve_amp(config.train.amp, "cpu")
    for variance in ("fixed_small", "fixed_large"):
        save_preview(run.model, run.schedule, config.override(**{"diffusion.variance": variance}),
                     tmp_path / f"{variance}.png", device=torch.device("cpu"), amp=amp)
    pixels = {name: np.asarray(Image.open(p)) for name, p in (("final", run_dir / "samples" / "final.png"),
              ("small", tmp_path / "fixed_small.png"), ("large", tmp_path / "fixed_large.png"))}
    assert np.array_equal(pixels["final"], pixels["small"])
    assert not np.array_equal(pixels["final"], pixels["large"])  # the check can tell the variances apart


def test_a_damaged_loss_history_is_refused_in_one_line(tmp_path):
    good = LossAwareTimestepSampler(4).state_dict()
    for bad in ({**good, "counts": torch.full((4,), 11)}, {**good, "losses": torch.full((4, 10), float("nan"))},
                {**good, "losses": torch.zeros(5, 10)}, "not a dict"):
        with pytest.raises(UserError, match="timestep sampler history is damaged"):
            _restore_timestep_sampler(LossAwareTimestepSampler(4), bad, tmp_path / "state.pt")


def test_two_gloo_ranks_keep_the_loss_history_of_one_process(tmp_path):
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from test_distributed import free_port

    flags = ["--learn-sigma", "--objective", "vlb", "--timesteps", "4", "--set", "sample.steps=4", "--steps", "6",
             "--batch-size", "16", "--grad-accum", "2", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ddpm", "train", "--preset", "tiny", "--no-progress",
           "--out", str(tmp_path / "ddp"), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", "--preset", "tiny", "--no-progress", "--out", str(tmp_path / "one"), *flags]) == 0
    a, b = (state(tmp_path / d, 6)["timestep_sampler"] for d in ("ddp", "one"))
    # the same examples recorded at the same places: rank and micro-step order is the global batch's
    assert torch.equal(a["counts"], b["counts"]) and bool((a["counts"] == 10).all())
    torch.testing.assert_close(a["losses"], b["losses"], rtol=1e-4, atol=1e-5)
    wa, wb = weights(tmp_path / "ddp", 6), weights(tmp_path / "one", 6)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-5, msg=k)


# -- sampling and evaluation ---------------------------------------------------------------------

def read_images(path):
    return np.load(path)["images"]


def test_learned_run_samples_with_its_learned_variance_by_default(runs, tmp_path, capsys):
    _, learned = runs
    assert load(learned).sample_kwargs["variance"] == "learned_range"
    common = ["--num", 4, "--sampler", "ddpm", "--steps", 10, "--amp", "off"]
    outs = {}
    for variance in (None, "learned_range", "fixed_small"):
        out = tmp_path / f"{variance}.npz"
        code, _, err = cli(capsys, "sample", learned, "--out", out, *common, *(["--variance", variance] if variance else []))
        assert code == 0, err
        outs[variance] = read_images(out)
    assert np.array_equal(outs[None], outs["learned_range"])
    # the learned mean with beta~ instead of its own variance: another chain from the same seeds
    assert not np.array_equal(outs["learned_range"], outs["fixed_small"])
    code, _, err = cli(capsys, "eval", "nll", learned, "--num", 4, "--timesteps", 3, "--batch-size", 4)
    assert code == 0, err


def test_analytic_command_writes_the_table_that_sample_and_nll_use(runs, tmp_path, capsys):
    fixed, _ = runs
    code, out, err = cli(capsys, "analytic", fixed, "--num", 16, "--batch-size", 8, "--device", "cpu")
    assert code == 0, err
    doc = json.loads((fixed / "analytic.json").read_text())
    assert doc["weights"] == "ckpt-0000004/ema.safetensors" and doc["num_examples"] == 16
    run = load(fixed)
    analytic = run.sample_kwargs["analytic"]
    assert isinstance(analytic, AnalyticVariance) and analytic.num_timesteps == 100
    # The library: finite samples, and not those of fixed_small from the same seeds.
    kw = {**run.sample_kwargs, "variance": "fixed_small"}
    x_fixed = ddpm.sample(run.model, run.schedule, (4, *run.shape), sampler="ddpm", steps=10, generator=0, **kw)
    kw["variance"] = "analytic"
    x_analytic = ddpm.sample(run.model, run.schedule, (4, *run.shape), sampler="ddpm", steps=10, generator=0, **kw)
    assert torch.isfinite(x_analytic).all() and not torch.equal(x_fixed, x_analytic)
    # The CLI, likewise.
    images = {}
    for variance in ("fixed_small", "analytic"):
        code, _, err = cli(capsys, "sample", fixed, "--variance", variance, "--sampler", "ddpm", "--steps", 10,
                           "--num", 4, "--amp", "off", "--out", tmp_path / f"{variance}.npz")
        assert code == 0, err
        images[variance] = read_images(tmp_path / f"{variance}.npz")
    assert not np.array_equal(images["fixed_small"], images["analytic"])
    code, out, err = cli(capsys, "eval", "nll", fixed, "--variance", "analytic", "--num", 4, "--timesteps", 3,
                         "--batch-size", 4)
    assert code == 0, err
    report = json.loads(next((fixed / "eval").glob("nll-*-analytic.json")).read_text())
    assert report["variance"] == "analytic" and np.isfinite(report["bpd"])
    # The table belongs to the weights it was estimated for: the older checkpoint has none.
    assert "analytic" not in load(fixed / "ckpt-0000002").sample_kwargs
    code, _, err = cli(capsys, "sample", fixed / "ckpt-0000002", "--variance", "analytic", "--sampler", "ddpm",
                       "--out", tmp_path / "x.png")
    assert code == 2 and len(err) == 1 and "was estimated for ckpt-0000004/ema.safetensors" in err[0]
    assert f"make it with: ddpm analytic {fixed}" in err[0]
    # ddim sets its own noise: no table needed there
    code, _, err = cli(capsys, "sample", fixed / "ckpt-0000002", "--variance", "analytic", "--sampler", "ddim",
                       "--steps", 3, "--num", 2, "--out", tmp_path / "y.png")
    assert code == 0, err


def test_variance_a_run_cannot_provide_is_a_one_line_error(runs, tmp_path, capsys):
    fixed, learned = runs
    for argv, message in (
        (["sample", fixed, "--variance", "learned_range", "--out", tmp_path / "x.png"],
         "variance 'learned_range' needs a network that outputs variances"),
        (["eval", "nll", fixed / "ckpt-0000002", "--variance", "learned_range"],
         "variance 'learned_range' needs a network that outputs variances"),
        (["eval", "nll", learned, "--variance", "analytic", "--num", 2], "make it with: ddpm analytic"),
        (["sample", fixed, "--variance", "sigma", "--out", tmp_path / "x.png"], "invalid choice: 'sigma'"),
    ):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and len(err) == 1 and err[0].startswith("ddpm: error:") and message in err[0], (argv, err)
