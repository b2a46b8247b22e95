"""Progressive distillation (ddpm.training.distill): the grid rule, the oracle test, runs and their resume.

The oracle: the teacher is the exact eps of the Gaussian mixture of tests/gmm.py, distilled into a
small MLP from a 64-step grid down to 4 steps. The 4-step student must be inside the truth-vs-truth
bar of the energy distance, while 4 DDIM steps of the exact teacher are far outside it (the
negative control: what the distillation buys).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import ddpm
from ddpm.errors import UserError
from ddpm.training.distill import check_steps, distill, distill_grid, round_steps, sample_kwargs
from gmm import GaussianMixture, energy_distance

N = 2000


def test_grids_nest_and_end_at_x0():
    for T, n in ((1000, 4), (1000, 64), (1000, 500), (1024, 8), (77, 2)):
        coarse, fine = distill_grid(T, n), distill_grid(T, 2 * n) if 2 * n <= T else None
        assert int(coarse[0]) == T - 1 and bool((coarse[:-1] > coarse[1:]).all())
        if fine is not None:
            assert torch.equal(fine[::2], coarse)  # one student step = two teacher steps
    assert torch.equal(distill_grid(1000, 4), torch.tensor([999, 749, 499, 249]))


def test_steps_rule():
    check_steps(1000, 64, 4)
    assert round_steps(64, 4) == [32, 16, 8, 4]
    for teacher_steps, steps, match in ((64, 3, "halved"), (64, 64, "not fewer"), (64, 128, "not fewer"),
                                        (2000, 4, "does not fit"), (48, 5, "choose one of 24, 12, 6, 3")):
        with pytest.raises(UserError, match=match):
            check_steps(1000, teacher_steps, steps)


def test_the_match_round_targets_one_teacher_step_and_a_halving_two():
    # A student that is the exact teacher in v-prediction: its one DDIM step is the teacher's one
    # step (the match round's loss vanishes) but not the teacher's two steps of a halving.
    from ddpm.core.diffusion import predict_x0_from_eps, v_from_x0_eps
    from ddpm.training.distill import distill_loss

    schedule = ddpm.NoiseSchedule.from_name("sqrt_linear", 1000)
    gmm = GaussianMixture(k=8, radius=1.0, std=0.1)
    teacher = gmm.eps_oracle(schedule)

    def student_v(x_t, t):
        eps = teacher(x_t, t)
        return v_from_x0_eps(schedule, predict_x0_from_eps(schedule, x_t, t, eps), eps, t)

    x = gmm.sample(512, torch.Generator().manual_seed(0))
    losses = {k: float(distill_loss(student_v, teacher, schedule, x, 8, generator=torch.Generator().manual_seed(1),
                                    teacher_substeps=k)) for k in (1, 2)}
    assert losses[1] < 1e-8 < 1e-3 < losses[2], losses


def test_oracle_student_in_four_steps_matches_the_mixture():
    torch.manual_seed(0)
    schedule = ddpm.NoiseSchedule.from_name("sqrt_linear", 1000)
    gmm = GaussianMixture(k=8, radius=1.0, std=0.1)
    gen = torch.Generator().manual_seed(123)
    bar = 2 * max(energy_distance(gmm.sample(N, gen), gmm.sample(N, gen)) for _ in range(6))
    fresh = gmm.sample(N, torch.Generator().manual_seed(9))
    teacher = gmm.eps_oracle(schedule)
    student = ddpm.MLPDenoiser(ddpm.MLPConfig(dim=2, hidden=64, depth=3))
    data = lambda k: gmm.sample(256, torch.Generator().manual_seed(10_000 + k))  # noqa: E731
    distill(teacher, schedule, student, data, steps=4, teacher_steps=64, iters=[1500, 200, 200, 200], lr=2e-3)
    x = ddpm.sample(student, schedule, (N, 2), generator=1, **sample_kwargs(4))
    plain = ddpm.sample(teacher, schedule, (N, 2), sampler="ddim", steps=4, spacing="trailing", generator=1)
    assert energy_distance(x, fresh) < bar
    assert energy_distance(plain, fresh) > 10 * bar  # negative control: 4 plain DDIM steps of the exact teacher


# -- runs: ddpm.training.distill_run -------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    config = ddpm.get_preset("toy2d").override(**{
        "train.steps": 20, "train.progress": False, "train.sample_every": 0, "train.ckpt_every": 0,
        "train.batch_size": 64, "model.hidden": 32, "model.depth": 1, "sample.num": 16, "sample.steps": 5})
    return ddpm.train(config, out=tmp_path_factory.mktemp("distill") / "teacher")


def _distil(teacher, out, **kw):
    from ddpm.training.distill_run import distill_run

    kw = {"match_round": True, **kw}  # the match round too, so that resume is tested across it
    return distill_run(teacher, steps=2, teacher_steps=8, iters_per_round=6, batch_size=32, out=out, progress=False,
                       log_every=2, **kw)


def _weights(run_dir):
    return ddpm.load(run_dir).model.state_dict()


def test_distilled_run_samples_its_grid_only(teacher_run, tmp_path):
    out = _distil(teacher_run, tmp_path / "student")
    run = ddpm.load(out)
    d = run.config.distill
    assert (d.steps, d.teacher_steps, d.spacing, d.parametrisation) == (2, 8, "trailing", "v")
    assert d.teacher == str(teacher_run.resolve()) and d.teacher_checkpoint.endswith("ema.safetensors")
    assert run.sample_kwargs == {"prediction": "v", "variance": "fixed_small", "clip_denoised": False,
                                 "spacing": "trailing"}
    # the match round on the teacher's 8-step grid, then 8 -> 4 -> 2
    assert d.match_round and sorted(p.name for p in (out / "samples").iterdir()) == [
        "final.png", "round-1-8steps.png", "round-2-4steps.png", "round-3-2steps.png"]
    from ddpm.sampling.batches import sampler_settings

    assert sampler_settings(run) == sampler_settings(run, "ddim", 2, 0.0)
    with pytest.raises(UserError, match="distilled for 2 deterministic DDIM steps"):
        sampler_settings(run, "ddim", 4)
    # a distilled teacher: fewer steps only, on its own grid
    from ddpm.training.distill_run import distill_run

    for kw, match in ((dict(steps=2), "distilled for 2 steps: it can be distilled to fewer"),
                      (dict(steps=1, teacher_steps=8), "its grid is that one, not --teacher-steps 8")):
        with pytest.raises(UserError, match=match):
            distill_run(out, out=tmp_path / "again", progress=False, **kw)
    assert not (tmp_path / "again").exists()
    once_more = distill_run(out, steps=1, out=tmp_path / "one", iters_per_round=2, progress=False)
    again = ddpm.load(once_more).config.distill
    assert again.teacher_steps == 2 and not again.match_round  # its guidance is baked in already


@pytest.mark.parametrize("stop_at", [5, 9])  # inside round 1 (teacher: the run), inside round 2 (the round-1 student)
def test_resumed_distillation_is_bit_identical(teacher_run, tmp_path, stop_at):
    from ddpm.training.distill_run import distill_run

    straight = _distil(teacher_run, tmp_path / "straight")
    _distil(teacher_run, tmp_path / "resumed", stop_at=stop_at)
    assert (tmp_path / "resumed" / f"ckpt-{stop_at:07d}").is_dir()
    with pytest.raises(UserError, match=r"is not finished .* finish it with `ddpm distill .* --resume` \(and the"):
        distill_run(tmp_path / "resumed", steps=1, out=tmp_path / "on-from-a-stopped-one", progress=False)
    _distil(teacher_run, tmp_path / "resumed", resume=True)
    a, b = _weights(straight), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_bad_requests_write_nothing(teacher_run, tmp_path):
    out = tmp_path / "never"
    for kw, match in ((dict(steps=3, teacher_steps=8), "halved"), (dict(steps=2, teacher_steps=2000), "does not fit")):
        from ddpm.training.distill_run import distill_run

        with pytest.raises(UserError, match=match):
            distill_run(teacher_run, out=out, progress=False, **kw)
    with pytest.raises(UserError, match="not a run directory"):
        _distil(tmp_path, out)
    # A run stopped early (no final.png, its newest checkpoint before train.steps), a learned-variance run.
    import shutil

    for edit, match in ((lambda c: c["train"].update(steps=40), "is not finished .*step 20 of 40"),
                        (lambda c: (c["diffusion"].update(variance="learned_range"), c["model"].update(learn_sigma=True)),
                         "learns its variances"),
                        (lambda c: c["diffusion"].update(variance="learned_range"), "is not a valid run config")):
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(teacher_run, copy)
        (copy / "samples" / "final.png").unlink()
        config = json.loads((copy / "config.json").read_text())
        edit(config)
        (copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(UserError, match=match) as info:
            _distil(copy, out)
        assert "\n" not in str(info.value)
    assert not out.exists()


def test_the_teachers_guidance_is_the_runs_unless_chosen_and_is_recorded(teacher_run, tmp_path):
    from ddpm.training.distill_run import _teacher_model, distill_run

    config = json.loads((teacher_run / "config.json").read_text())
    guided = ddpm.train(ddpm.TrainConfig.from_dict(config).override(**{"train.guide_at": 0.5, "optim.warmup": 0}),
                         out=tmp_path / "guided")  # (the guide is kept in the decay phase: no warm-up)
    kw = dict(steps=2, teacher_steps=4, iters_per_round=1, batch_size=8, progress=False)
    plain = ddpm.load(distill_run(guided, out=tmp_path / "default", **kw)).config.distill
    assert (plain.teacher_guidance, plain.teacher_autoguidance, plain.teacher_guidance_interval) == (1.0, 1.0, None)
    out = distill_run(guided, out=tmp_path / "chosen", autoguidance=2.0, guidance_interval=(60, 99), **kw)
    d = ddpm.load(out).config.distill
    assert (d.teacher_guidance, d.teacher_autoguidance, d.teacher_guidance_interval) == (1.0, 2.0, (60, 99))
    # the teacher it distilled: guide + 2 (model - guide) inside [60, 99], the model alone below
    run = ddpm.load(guided, fast=False)
    teacher, x = _teacher_model(run, d), torch.randn(5, 2)
    with torch.no_grad():
        for t, w in ((80, 2.0), (30, 1.0)):
            tt = torch.full((5,), t)
            model, guide = run.model(x, tt), run.guide(x, tt)
            torch.testing.assert_close(teacher(x, tt), guide + w * (model - guide))
    # refused, nothing written: a scale the teacher cannot take, a bad interval, a distilled teacher
    for path, choice, match in ((teacher_run, dict(autoguidance=2.0), "needs the run's guide network"),
                                (guided, dict(guidance=2.0), "needs a class-conditional teacher"),
                                (guided, dict(guidance_interval=(10, 1000)), "goes past the last timestep T - 1 = 999"),
                                (guided, dict(guidance_interval=(600, 500)), "t_lo <= t_hi"),
                                (out, dict(guidance_interval="all", teacher_steps=None), "guidance baked in")):
        with pytest.raises(UserError, match=match) as info:
            distill_run(path, out=tmp_path / "never", **{**kw, "steps": 1, **choice})
        assert "\n" not in str(info.value)
    assert not (tmp_path / "never").exists()


def test_cli_distill_then_sample(teacher_run, tmp_path, capsys):
    import argparse

    from ddpm.cli import distill as distill_command
    from ddpm.cli.main import main

    parser = argparse.ArgumentParser()
    distill_command.add_parser(parser.add_subparsers(), argparse.RawDescriptionHelpFormatter)
    out = tmp_path / "s"
    args = parser.parse_args(["distill", str(teacher_run), "--steps", "2", "--teacher-steps", "8", "--out", str(out),
                              "--iters-per-round", "3", "--no-progress", "--match-round"])
    assert args.func(args) == 0
    # report.html as for a trained run: one preview per round, in round order, and where it came from
    page = (out / "report.html").read_text()
    assert page.index("round 1: 8 steps") < page.index("round 2: 4 steps") < page.index("round 3: 2 steps") \
        < page.index("final (step 9)")
    assert f"distilled from <b>{teacher_run.resolve()}</b> (8 to <b>2</b> DDIM steps)" in page
    assert main(["sample", str(out), "--num", "8", "--out", str(tmp_path / "x.png")]) == 0
    said = capsys.readouterr().out
    assert "ddim, 2 steps" in said and re.search(r"to \S*x\.png in \d+\.\d s$", said.strip())  # with its time
    assert main(["sample", str(out), "--num", "8", "--steps", "4", "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "distilled for 2 deterministic DDIM steps" in err and "\n" not in err
    assert not (tmp_path / "y.png").exists()
    assert main(["distill", str(teacher_run), "--steps", "2", "--guidance", "2", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--guidance 2 needs a class-conditional teacher" in err and "\n" not in err
    assert not (tmp_path / "z").exists()
