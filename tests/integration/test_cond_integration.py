"""Class-conditional runs end to end (issue 9): training with label dropout on labelled data (bundled
MNIST, a folder with one sub-folder per class), exact resume, unconditional runs unchanged, loading,
and the command line: sample --class/--guidance, inpaint, interpolate, eval fid's labels, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddpm.io.run import load
from ddpm.cli.main import main
from ddpm.data.sources import open_source
from ddpm.core.diffusion import q_sample
from ddpm.data.loader import IndexStream
from ddpm.training.loop import train
from ddpm.nets.unet import UNet
from ddpm.evaluation.viz import to_uint8


def weights(run_dir, step, name="model"):
    return load_file(str(run_dir / f"ckpt-{step:07d}" / f"{name}.safetensors"))


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def expect_user_error(capsys, argv, match: str) -> None:
    code, _, err = cli(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("ddpm: error:")]
    assert code == 2 and len(errors) == 1 and match in errors[0], err
    assert "Traceback" not in err


def save_png(array: np.ndarray, path) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A tiny class-conditional run on the bundled MNIST, trained through the CLI with --classes auto."""
    out = tmp_path_factory.mktemp("cond") / "run"
    assert main(["train", "--preset", "tiny", "--classes", "auto", "--guidance", "2", "--steps", "2",
                 "--no-progress", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--no-progress", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Two MNIST test digits as 28x28 grey PNGs, a mask (white = generate: the right half) and bad inputs."""
    d = tmp_path_factory.mktemp("images")
    x = to_uint8(open_source("mnist", split="test").get_batch([0, 1]))[..., 0]
    mask = np.zeros((28, 28), np.uint8)
    mask[:, 14:] = 255
    return {"a": save_png(x[0], d / "a.png"), "b": save_png(x[1], d / "b.png"), "mask": save_png(mask, d / "mask.png"),
            "mask30": save_png(np.zeros((28, 30), np.uint8), d / "mask30.png"),
            "rgb": save_png(np.zeros((28, 28, 3), np.uint8), d / "rgb.png"),
            "big": save_png(np.zeros((32, 32), np.uint8), d / "big.png")}


# -- training ---------------------------------------------------------------------------------

def test_conditional_run_records_its_classes_and_loads_them(cond_run):
    config = json.loads((cond_run / "config.json").read_text())
    assert config["model"]["num_classes"] == 10 and config["sample"]["guidance"] == 2.0
    assert config["data"]["class_names"] == [str(k) for k in range(10)] and config["train"]["cond_drop_prob"] == 0.1
    run = load(cond_run)
    assert run.num_classes == 10 == run.model.num_classes and run.class_names == tuple("0123456789")
    assert "label_emb.weight" in weights(cond_run, 2)
    # the final preview shows every class although tiny previews 4 samples: one each, laid out as one
    # row of the 10 classes (it was a column of the first 4)
    assert Image.open(cond_run / "samples" / "final.png").size == (2 + 10 * 30, 2 + 30)


def test_labels_are_dropped_by_the_step_generator_after_the_unconditional_draws(tmp_path, tiny):
    """The network sees x_t from the t and eps of the unconditional stream (labels are drawn after
    them, so an unconditional run's draws are what they were) and the data's labels, each replaced
    by the null label where the step's generator says so."""
    config = tiny(**{"model.num_classes": 10, "train.cond_drop_prob": 0.5, "train.steps": 3, "train.ckpt_every": 0})
    seen = {True: [], False: []}

    def hook(module, args):
        if isinstance(module, UNet) and torch.is_grad_enabled():
            seen[len(args) == 3].append([a.detach().clone() for a in args])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        train(config, out=tmp_path / "cond")
        train(tiny(**{"train.steps": 3, "train.ckpt_every": 0}), out=tmp_path / "plain")
    finally:
        handle.remove()
    cond, plain = seen[True], seen[False]
    assert len(cond) == len(plain) == 3  # the unconditional network is called with (x_t, t) alone
    data = open_source("mnist")
    stream = IndexStream(len(data), 8, config.train.seed)
    schedule = config.diffusion.make_schedule()
    drops = []
    for step, ((x_t, t, labels), (x_t_plain, t_plain)) in enumerate(zip(cond, plain)):
        g = torch.Generator().manual_seed(config.train.seed * 1_000_003 + step)
        t_all = torch.randint(0, 100, (8,), generator=g)
        eps = torch.randn((8, 1, 28, 28), generator=g)
        torch.rand(8, generator=g)  # the flips
        drop = torch.rand(8, generator=g) < 0.5
        idx = stream.batch(step)
        assert torch.equal(t, t_all) and torch.equal(t_plain, t_all)
        torch.testing.assert_close(x_t, q_sample(schedule, data.get_batch(idx), t_all, eps), rtol=0, atol=1e-6)
        assert torch.equal(x_t, x_t_plain)
        assert torch.equal(labels, torch.where(drop, 10, data.get_batch_labels(idx)))
        drops.append(drop)
    drops = torch.stack(drops)
    assert 0 < int(drops.sum()) < drops.numel()


def test_conditional_resume_is_bit_identical(tmp_path, tiny):
    config = tiny(**{"model.num_classes": 10, "model.dropout": 0.1, "train.steps": 4, "train.ckpt_every": 2})
    straight = train(config, out=tmp_path / "straight")
    train(config.override(**{"train.steps": 2}), out=tmp_path / "split")
    split = train(config, out=tmp_path / "split", resume=True)
    for name in ("model", "ema"):
        a, b = weights(straight, 4, name), weights(split, 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unconditional_runs_are_unchanged(plain_run):
    config = json.loads((plain_run / "config.json").read_text())
    assert config["model"]["num_classes"] is None and config["data"]["class_names"] is None
    assert not any(k.startswith("label_emb") for k in weights(plain_run, 2))
    run = load(plain_run)
    assert run.num_classes is None and run.class_names is None


def test_folder_with_class_subfolders_trains_and_samples_by_name(tmp_path, capsys):
    x = to_uint8(open_source("mnist", split="test").get_batch(list(range(6))))[..., 0]
    for i, image in enumerate(x):
        (tmp_path / "data" / ("cat", "dog")[i % 2]).mkdir(parents=True, exist_ok=True)
        save_png(image, tmp_path / "data" / ("cat", "dog")[i % 2] / f"{i}.png")
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--preset", "tiny", "--data", f"folder:{tmp_path / 'data'}", "--classes", "auto",
                       "--steps", "2", "--batch-size", "4", "--no-progress", "--out", out)
    assert code == 0, err
    run = load(out)
    assert run.num_classes == 2 and run.class_names == ("cat", "dog")
    code, stdout, err = cli(capsys, "sample", out, "--class", "dog", "--num", "2", "--out", tmp_path / "dogs.npz")
    assert code == 0 and "class 1" in stdout, err
    assert np.load(tmp_path / "dogs.npz")["labels"].tolist() == [1, 1]
    # more classes than the data has, and --classes auto on unlabelled images: one line each
    expect_user_error(capsys, ["train", "--preset", "tiny", "--data", f"folder:{tmp_path / 'data'}", "--classes", "3",
                               "--steps", "1", "--out", tmp_path / "r3"], "has 2 classes but model.num_classes is 3")
    flat = tmp_path / "flat"
    flat.mkdir()
    save_png(x[0], flat / "0.png")
    expect_user_error(capsys, ["train", "--preset", "tiny", "--data", f"folder:{flat}", "--classes", "auto",
                               "--steps", "1", "--out", tmp_path / "r4"], "has no labels")


# -- sampling on the command line -------------------------------------------------------------

def test_sample_class_and_all(cond_run, tmp_path, capsys):
    code, stdout, _ = cli(capsys, "sample", cond_run, "--class", "3", "--num", "4", "--out", tmp_path / "threes.png")
    assert code == 0 and "class 3, guidance 2" in stdout  # the run's sample.guidance by default
    code, stdout, _ = cli(capsys, "sample", cond_run, "--class", "all", "--per-class", "2", "--guidance", "3",
                          "--out", tmp_path / "all.png")
    assert code == 0 and "wrote 20 samples" in stdout and "class all x2, guidance 3" in stdout
    assert Image.open(tmp_path / "all.png").size == (2 + 2 * 30, 2 + 10 * 30)  # one row per class
    # --class all without --per-class: --num / K per class
    code, stdout, _ = cli(capsys, "sample", cond_run, "--class", "all", "--num", "25", "--out", tmp_path / "all.npz")
    assert code == 0 and np.load(tmp_path / "all.npz")["labels"].tolist() == [k for k in range(10) for _ in range(2)]


def test_sample_depends_only_on_its_seed_and_label(cond_run, tmp_path, capsys):
    def draw(name, *argv):
        assert cli(capsys, "sample", cond_run, "--seed", "5", "--steps", "3", *argv, "--out", tmp_path / name)[0] == 0
        return np.load(tmp_path / name)

    grid = draw("grid.npz", "--class", "all", "--per-class", "2", "--batch-size", "3")
    threes = draw("threes.npz", "--class", "3", "--num", "8", "--batch-size", "8")
    # sample 6 and 7 of both: seeds (5, 6), (5, 7) and label 3, in batches of 3 and of 8
    assert np.array_equal(grid["images"][6:8], threes["images"][6:8])
    assert not np.array_equal(threes["images"][4:6], threes["images"][6:8])  # other seeds, other images
    uniform = draw("u.npz", "--num", "6", "--batch-size", "2")
    again = draw("u6.npz", "--num", "6", "--batch-size", "6")
    assert np.array_equal(uniform["images"], again["images"]) and np.array_equal(uniform["labels"], again["labels"])
    assert len(set(uniform["labels"].tolist())) > 1  # labels drawn per sample


def test_guidance_interval_from_the_command_line_and_as_the_run_default(cond_run, tmp_path, capsys):
    import shutil

    def draw(run, name, *argv):
        code, _, err = cli(capsys, "sample", run, "--seed", "5", "--steps", "4", "--sampler", "ddim", "--num", "6",
                           *argv, "--out", tmp_path / name)
        assert code == 0, err
        return np.load(tmp_path / name)["images"]

    full = draw(cond_run, "full.npz")  # guidance 2 (the run's) at every step of T = 100
    assert np.array_equal(full, draw(cond_run, "all.npz", "--guidance-interval", "0,99"))
    assert np.array_equal(draw(cond_run, "w1.npz", "--guidance", "1"),
                          draw(cond_run, "empty.npz", "--guidance-interval", "1,2"))  # no 4-step grid point in [1, 2]
    high = draw(cond_run, "high.npz", "--guidance-interval", "50,99")
    assert not np.array_equal(high, full)
    # saved as the run's default (sample.guidance_interval), which --guidance-interval all overrides
    run = tmp_path / "with-default"
    shutil.copytree(cond_run, run)
    assert cli(capsys, "train", "--resume", "--out", run, "--steps", "3", "--no-progress",
               "--set", "sample.guidance_interval=[50,99]")[0] == 0
    assert load(run).config.sample.guidance_interval == (50, 99)
    by_default, everywhere = draw(run, "d.npz"), draw(run, "a.npz", "--guidance-interval", "all")
    assert not np.array_equal(by_default, everywhere)
    assert np.array_equal(by_default, draw(run, "d2.npz", "--guidance-interval", "50,99"))
    for bad, needle in (("5,1", "0 <= LO <= HI"), ("a,b", "expected LO,HI"), ("0,100", "past the last timestep T - 1 = 99")):
        code, _, err = cli(capsys, "sample", cond_run, "--guidance-interval", bad, "--out", tmp_path / "x.png")
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_eval_fid_draws_uniform_labels_or_the_class(cond_run, plain_run, tmp_path, capsys, monkeypatch):
    from ddpm.evaluation import evaluate, fid

    drawn = []
    monkeypatch.setattr(evaluate, "check_reference", lambda ref, ref_data: None)
    monkeypatch.setattr(fid, "resolve_inception_weights", lambda weights: None)

    def fake_fid(images, ref, **kwargs):
        drawn.append(images)
        return {"fid": 1.0, "num_samples": len(images), "reference": {"name": ref, "count": 1}}

    monkeypatch.setattr(evaluate, "compute_fid", fake_fid)
    common = ["--ref", "REF", "--num", "6", "--steps", "3", "--no-save-samples", "--no-is", "--no-kid", "--seed", "2"]
    assert cli(capsys, "eval", "fid", cond_run, *common, "--out", tmp_path / "u.json")[0] == 0
    assert cli(capsys, "eval", "fid", cond_run, *common, "--class", "4", "--guidance", "0",
               "--out", tmp_path / "c.json")[0] == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert (report["class"], report["guidance"]) == ("4", 0.0)
    assert json.loads((tmp_path / "u.json").read_text())["class"] == "uniform"
    for name, argv in (("u.npz", []), ("c.npz", ["--class", "4", "--guidance", "0"])):
        assert cli(capsys, "sample", cond_run, "--num", "6", "--steps", "3", "--seed", "2", *argv,
                   "--out", tmp_path / name)[0] == 0
    assert np.array_equal(drawn[0], np.load(tmp_path / "u.npz")["images"])
    assert np.array_equal(drawn[1], np.load(tmp_path / "c.npz")["images"])
    expect_user_error(capsys, ["eval", "fid", plain_run, *common, "--class", "1"], "--class needs a class-conditional run")


# -- inpainting and interpolation on the command line -----------------------------------------

def test_inpaint_keeps_the_known_pixels_exactly(cond_run, digits, tmp_path, capsys):
    out = tmp_path / "filled.png"
    code, stdout, err = cli(capsys, "inpaint", cond_run, "--image", digits["a"], "--mask", digits["mask"], "--out", out,
                            "--steps", "10", "--resample", "2", "--jump", "2", "--class", "7")
    assert code == 0 and "392 of 784 pixels kept" in stdout, err
    given, filled = np.asarray(Image.open(digits["a"])), np.asarray(Image.open(out))
    assert filled.shape == given.shape == (28, 28)
    assert np.array_equal(filled[:, :14], given[:, :14])  # black in the mask: kept
    assert not np.array_equal(filled[:, 14:], given[:, 14:])  # white: generated
    # several completions side by side, each keeping the known pixels
    code, _, _ = cli(capsys, "inpaint", cond_run, "--image", digits["a"], "--mask", digits["mask"], "--num", "3",
                     "--steps", "4", "--resample", "1", "--out", tmp_path / "three.png")
    row = np.asarray(Image.open(tmp_path / "three.png"))
    assert code == 0 and row.shape == (32, 2 + 3 * 30)
    tiles = [row[2:30, 2 + 30 * i:30 + 30 * i] for i in range(3)]
    assert all(np.array_equal(tile[:, :14], given[:, :14]) for tile in tiles)
    assert not np.array_equal(tiles[0], tiles[1])


def test_interpolate_writes_a_strip_of_frames(cond_run, digits, tmp_path, capsys):
    code, _, err = cli(capsys, "interpolate", cond_run, digits["a"], digits["b"], "--frames", "5", "--steps", "4",
                       "--out", tmp_path / "slerp.png")
    assert code == 0, err
    assert Image.open(tmp_path / "slerp.png").size == (2 + 5 * 30, 32)
    code, _, err = cli(capsys, "interpolate", cond_run, digits["a"], digits["b"], "--frames", "3", "--method", "noised",
                       "--t", "20", "--class", "2", "--out", tmp_path / "noised.png")
    assert code == 0 and Image.open(tmp_path / "noised.png").size == (2 + 3 * 30, 32), err


def test_bad_input_exits_2_with_one_line(cond_run, plain_run, digits, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    inpaint = ["inpaint", cond_run, "--out", out, "--steps", "2", "--resample", "1"]
    cases = [
        (["sample", cond_run, "--class", "10", "--out", out], "--class 10 out of range: this run has classes 0..9"),
        (["sample", cond_run, "--class", "-1", "--out", out], "--class -1 out of range"),
        (["sample", cond_run, "--class", "seven", "--out", out], "neither a class name"),
        (["sample", cond_run, "--per-class", "2", "--out", out], "--per-class goes with --class all"),
        (["sample", cond_run, "--class", "1", "--guidance", "inf", "--out", out], "guidance must be a finite number"),
        (["sample", plain_run, "--class", "3", "--out", out], "--class needs a class-conditional run"),
        (["sample", plain_run, "--guidance", "3", "--out", out], "--guidance needs a class-conditional run"),
        ([*inpaint, "--image", digits["a"], "--mask", digits["mask30"]], "mask size differs from image"),
        ([*inpaint, "--image", digits["rgb"], "--mask", digits["mask"]], "has 3 channels (RGB) but the run makes 1-channel"),
        ([*inpaint, "--image", digits["big"], "--mask", digits["mask"]], "is 32x32 (WxH) but the run makes 28x28"),
        ([*inpaint, "--image", digits["a"], "--mask", digits["mask"], "--class", "12"], "--class 12 out of range"),
        ([*inpaint, "--image", digits["a"], "--mask", digits["mask"], "--guidance", "2"], "--guidance needs --class"),
        ([*inpaint, "--image", str(tmp_path / "none.png"), "--mask", digits["mask"]], "cannot read image"),
        (["inpaint", plain_run, "--image", digits["a"], "--mask", digits["mask"], "--class", "1", "--out", out],
         "--class needs a class-conditional run"),
        (["interpolate", cond_run, digits["a"], digits["rgb"], "--out", out], "has 3 channels"),
        (["interpolate", plain_run, digits["a"], digits["b"], "--guidance", "2", "--out", out],
         "--guidance needs a class-conditional run"),
        (["interpolate", cond_run, digits["a"], digits["b"], "--frames", "1", "--out", out], "at least 2 frames"),
        (["train", "--preset", "tiny", "--guidance", "3", "--steps", "1", "--out", str(tmp_path / "g")],
         "sample.guidance 3.0 needs a class-conditional model"),
        (["train", "--preset", "tiny", "--classes", "0", "--out", str(tmp_path / "c0")], "expected a positive integer"),
        (["train", "--preset", "toy2d", "--classes", "auto", "--data", "toy:two_moons", "--out", str(tmp_path / "t")],
         "has no labels"),
        (["train", "--preset", "tiny", "--classes", "10", "--cond-drop-prob", "1.5", "--out", str(tmp_path / "p")],
         "cond_drop_prob must lie in [0, 1]"),
    ]
    for argv, match in cases:
        code, _, err = cli(capsys, *argv)
        errors = [line for line in err.splitlines() if line.startswith("ddpm: error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (argv, err)
        assert match is None or match in errors[0], (argv, errors[0])


def test_a_conditional_run_distils_with_its_guidance_and_samples_by_class(cond_run, tmp_path, capsys):
    out = tmp_path / "student"
    code, _, err = cli(capsys, "distill", cond_run, "--steps", "1", "--teacher-steps", "2", "--iters-per-round", "2",
                       "--guidance", "3", "--guidance-interval", "50,99", "--no-progress", "--out", out)
    assert code == 0, err
    d = json.loads((out / "config.json").read_text())["distill"]
    assert (d["teacher_guidance"], d["teacher_guidance_interval"]) == (3.0, [50, 99])
    code, stdout, err = cli(capsys, "sample", out, "--class", "7", "--num", "2", "--out", tmp_path / "sevens.png")
    assert code == 0 and "ddim, 1 step" in stdout, err
    assert "the teacher's guidance 3 for t in [50, 99] distilled in" in stdout  # what its one call carries


def test_inpaint_and_interpolate_follow_the_machines_load(cond_run, digits, tmp_path, capsys, monkeypatch):
    from ddpm.core import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # (a count the user fixed is never followed)
    seen = []
    monkeypatch.setattr(threads, "tick", lambda: seen.append(threads.current()))
    before = torch.get_num_threads()
    code, _, err = cli(capsys, "inpaint", cond_run, "--image", digits["a"], "--mask", digits["mask"], "--steps", "4",
                       "--resample", "1", "--out", tmp_path / "filled.png")
    assert code == 0, err
    assert len(seen) >= 4 and all(f is not None for f in seen)  # a follower, asked at every network call
    seen.clear()
    code, _, err = cli(capsys, "interpolate", cond_run, digits["a"], digits["b"], "--frames", "3", "--steps", "4",
                       "--out", tmp_path / "slerp.png")
    assert code == 0 and len(seen) >= 4 and all(f is not None for f in seen), err
    assert threads.current() is None and torch.get_num_threads() == before
