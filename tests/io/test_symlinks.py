"""A symbolic link planted in a directory ddpm writes (issue 23, item 0): no file is written or
truncated through it. Files opened in place (the lock, log.jsonl, eval/periodic.jsonl) and the
folders a run writes into (samples/, tb/, eval/) are refused with one line naming the link; files
written atomically (previews, report.html, checkpoints, eval reports) replace the link itself.
In every test the link's target, outside the directory, is left as it was.

Against the code before this fix, the tests of the lock, log.jsonl, periodic.jsonl, a preview, the
linked folders and the linked checkpoint folder failed (their victims were written, or a folder's
files landed outside the run), and report.html embedded the bytes of a file that a link among the
previews pointed at; report.html itself, eval reports and export directories held already (atomic
writes, a non-empty export folder refused) and are guarded against a regression.
"""

from __future__ import annotations

import base64
import shutil

import pytest

from ddpm.cli.main import main
from ddpm.errors import UserError
from ddpm.presets import get_preset
from ddpm.training.distill_run import distill_run
from ddpm.training.loop import train

PRECIOUS = "precious data, not ddpm's\n"


@pytest.fixture(scope="module")
def run4(tmp_path_factory, tiny):
    """A finished tiny run of 4 steps (checkpoints at 2 and 4); copy it before planting links."""
    return train(tiny(), out=tmp_path_factory.mktemp("links") / "r")


@pytest.fixture
def run(run4, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run4, copy)
    return copy


@pytest.fixture
def victim(tmp_path):
    """A file of the user's outside the run, which a planted link points at."""
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text(PRECIOUS)
    return path


def plant(link, target) -> None:
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(target)


def resume(run, *extra) -> list[str]:
    return ["train", "--resume", "--out", str(run), "--steps", "6", "--no-progress", *extra]


def refused(capsys, argv, link) -> None:
    """``ddpm ARGV`` exits 2 with one line that names ``link`` as a symbolic link."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ddpm: error: ") and f"{link} is a symbolic link" in last, err


@pytest.mark.parametrize("dangling", [False, True])
def test_a_link_at_the_lock_is_refused(run, victim, capsys, dangling):
    target = victim.parent / "new-file" if dangling else victim
    plant(run / ".lock", target)
    refused(capsys, resume(run), run / ".lock")
    assert victim.read_text() == PRECIOUS
    assert not (victim.parent / "new-file").exists()  # a dangling link made no file outside the run
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000004"]


def test_a_link_at_log_jsonl_is_refused_neither_read_nor_appended(run, victim, capsys):
    plant(run / "log.jsonl", victim)
    refused(capsys, resume(run), run / "log.jsonl")
    assert victim.read_text() == PRECIOUS and (run / "log.jsonl").is_symlink()


def test_a_link_at_a_preview_is_replaced_by_the_image(run, victim, capsys):
    plant(run / "samples" / "final.png", victim)
    assert main(resume(run)) == 0
    assert victim.read_text() == PRECIOUS
    final = run / "samples" / "final.png"
    assert not final.is_symlink() and final.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("folder, extra", [
    ("samples", []),
    ("tb", []),
    ("eval", ["--set", "eval.every=6", "--set", "eval.num=2", "--set", "eval.nll_timesteps=2",
              "--set", 'eval.metrics=["nll"]']),
])
def test_a_linked_folder_of_the_run_is_refused(run, victim, capsys, folder, extra):
    if folder == "tb":
        pytest.importorskip("torch.utils.tensorboard")
    elsewhere = victim.parent / "elsewhere"
    elsewhere.mkdir()
    plant(run / folder, elsewhere)
    refused(capsys, resume(run, *extra), run / folder)
    assert list(elsewhere.iterdir()) == [] and victim.read_text() == PRECIOUS


def test_a_link_at_periodic_jsonl_is_refused(run, victim, capsys):
    (run / "eval").mkdir()
    plant(run / "eval" / "periodic.jsonl", victim)
    argv = resume(run, "--set", "eval.every=6", "--set", "eval.num=2", "--set", "eval.nll_timesteps=2",
                  "--set", 'eval.metrics=["nll"]')
    refused(capsys, argv, run / "eval" / "periodic.jsonl")
    assert victim.read_text() == PRECIOUS


def test_links_at_checkpoint_folders_are_removed_never_followed(run, victim, capsys):
    outside = victim.parent / "folder"
    outside.mkdir()
    (outside / "keep.txt").write_text(PRECIOUS)
    plant(run / "ckpt-0000006", outside)  # where the next checkpoint is published
    plant(run / "ckpt-0000002" / "state.pt", victim)  # inside a checkpoint that rotation deletes
    assert main(resume(run)) == 0
    assert victim.read_text() == PRECIOUS and [p.name for p in outside.iterdir()] == ["keep.txt"]
    assert (run / "ckpt-0000006").is_dir() and not (run / "ckpt-0000006").is_symlink()
    assert (run / "ckpt-0000006" / "manifest.json").is_file()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]  # no .del- link left


def test_a_link_at_report_html_is_replaced_and_a_linked_preview_is_not_embedded(run, victim, capsys):
    plant(run / "report.html", victim)
    secret = victim.parent / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + b"the user's private bytes" * 4)
    plant(run / "samples" / "step-0000003.png", secret)  # the page embeds its previews' bytes
    assert main(["report", str(run)]) == 0
    assert victim.read_text() == PRECIOUS
    page = (run / "report.html").read_text()
    assert not (run / "report.html").is_symlink() and "<html" in page.lower()
    assert base64.b64encode(secret.read_bytes()).decode()[:40] not in page and "step 3" not in page


def test_eval_reports_replace_a_link_and_refuse_a_linked_eval_folder(run, victim, capsys):
    argv = ["eval", "nll", str(run), "--num", "2", "--timesteps", "2", "--batch-size", "2"]
    assert main(argv) == 0
    report = next((run / "eval").glob("nll-*.json"))
    plant(report, victim)
    assert main(argv) == 0
    assert victim.read_text() == PRECIOUS and not report.is_symlink() and report.read_text().startswith("{")
    elsewhere = victim.parent / "elsewhere"
    elsewhere.mkdir()
    plant(run / "eval", elsewhere)
    refused(capsys, argv, run / "eval")
    assert list(elsewhere.iterdir()) == []


def test_an_export_directory_holding_a_link_is_refused(run, victim, capsys):
    out = victim.parent.parent / "export"
    out.mkdir()
    plant(out / "model_index.json", victim)
    assert main(["export", str(run), str(out)]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert victim.read_text() == PRECIOUS


def test_a_link_at_a_distillations_log_is_refused(tmp_path, victim):
    config = get_preset("toy2d").override(**{
        "train.steps": 4, "train.progress": False, "train.sample_every": 0, "train.ckpt_every": 0,
        "train.batch_size": 16, "model.hidden": 16, "model.depth": 1, "sample.num": 8, "sample.steps": 5})
    teacher = train(config, out=tmp_path / "teacher")
    kw = dict(steps=2, teacher_steps=4, iters_per_round=2, batch_size=8, progress=False)
    out = distill_run(teacher, out=tmp_path / "student", stop_at=1, **kw)
    plant(out / "log.jsonl", victim)
    with pytest.raises(UserError, match=f"{out / 'log.jsonl'} is a symbolic link"):
        distill_run(teacher, out=out, resume=True, **kw)
    assert victim.read_text() == PRECIOUS
