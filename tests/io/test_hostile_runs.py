"""Hostile files and odd output directories (issue 23, items 3, a, b, c).

- A pickle payload in a file read with ``torch.load(weights_only=True)`` is refused in one line that
  names the file and what it holds, and never passes on torch's advice to turn the check off.
- A damaged ``guide.safetensors`` in the newest checkpoint: ``ddpm sample RUN`` and a resume fall
  back to the newest checkpoint that verifies, as for damaged weights.
- ``ddpm train --out DIR`` where DIR holds something other than a ddpm run is refused before a
  byte is written there.
- An --out that cannot be written is one line, exit 2.
Each test failed before its fix, except the read-only ones, which guard the behaviour that held.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from ddpm.cli.main import main
from ddpm.errors import UserError
from ddpm.io.state import load_tensors
from ddpm.training.loop import train
from test_faults import flip_bytes, rewrite_manifest

TINY = ["--preset", "tiny", "--no-progress"]


def one_line(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1] if err.strip() else ""


class Payload:
    """What a forger pickles: unpickling it would call a function (print here, harmlessly)."""

    def __reduce__(self):
        return (print, ("this should never run",))


# -- 3. pickle payloads -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run4(tmp_path_factory, tiny):
    return train(tiny(), out=tmp_path_factory.mktemp("hostile") / "r")


def test_a_pickle_payload_in_state_pt_is_refused_without_unsafe_advice(run4, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    ckpt = run / "ckpt-0000004"
    torch.save({"step": 4, "optimizer": Payload()}, ckpt / "state.pt")
    rewrite_manifest(ckpt)  # a forger makes the checksums match
    line = one_line(capsys, ["train", "--resume", "--out", str(run), "--steps", "6", "--no-progress"])
    assert f"{ckpt / 'state.pt'}" in line and "print" in line and "never holds" in line, line
    assert "weights_only" not in line and "False" not in line and "trust" not in line, line
    capsys.readouterr()


class System:
    """A payload calling os.system: torch blocks the whole module, with another message."""

    def __reduce__(self):
        return (os.system, ("echo this should never run",))


@pytest.mark.parametrize("content", ["payload", "system", "object", "garbage", "cut"])
def test_every_refusal_of_load_tensors_names_the_file_and_never_the_way_around(tmp_path, content):
    path = tmp_path / "weights.bin"
    if content in ("payload", "system"):
        torch.save({"w": torch.zeros(2), "x": Payload() if content == "payload" else System()}, path)
    elif content == "object":
        torch.save({"w": torch.zeros(2), "x": torch.nn.Linear(1, 1)}, path)  # a module: code, by reference
    elif content == "garbage":
        path.write_bytes(b"\x80\x02garbage" * 10)
    else:
        torch.save({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError) as info:
        load_tensors(path, "weights file")
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    said = message.replace(str(path), "PATH")  # (pytest's folder is named after the test)
    assert "weights_only" not in said and "False" not in said and "trust" not in said, message
    if content in ("payload", "system", "object"):
        named = {"payload": "print", "system": "system", "object": "torch.nn.modules.linear.Linear"}[content]
        assert "pickled reference to " in said and named in said and "never holds" in said, message


def test_a_pickled_diffusers_bin_with_a_payload_is_refused(tmp_path):
    from ddpm.io.diffusers import _read_unet_weights

    unet = tmp_path / "unet"
    unet.mkdir()
    torch.save({"conv_in.weight": torch.zeros(1), "x": Payload()}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match=r"refusing weights file \S+diffusion_pytorch_model.bin: it holds a pickled "
                                        r"reference to \S*print") as info:
        _read_unet_weights(unet)
    assert "weights_only" not in str(info.value)


# -- a. a damaged guide -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guided(tmp_path_factory, tiny):
    """A 6-step tiny run that keeps its autoguidance guide at step 4 (past 0.3 of its decay phase,
    steps 2..6): checkpoints 4 and 6 hold it, checkpoint 2 does not."""
    config = tiny(**{"train.steps": 6, "train.keep_last": 3, "train.guide_at": 0.3, "sample.autoguidance": 2.0})
    run = train(config, out=tmp_path_factory.mktemp("guided") / "r")
    assert [(run / f"ckpt-000000{s}" / "guide.safetensors").is_file() for s in (2, 4, 6)] == [False, True, True]
    return run


def test_a_damaged_guide_falls_back_to_the_newest_intact_checkpoint(guided, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(guided, run)
    flip_bytes(run / "ckpt-0000006" / "guide.safetensors")
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err
    assert "ckpt-0000006 is damaged (guide.safetensors: SHA-256 mismatch); using" in err and "ckpt-0000004" in err
    # a named checkpoint is refused, as for damaged weights
    line = one_line(capsys, ["sample", str(run / "ckpt-0000006"), "--num", "2", "--out", str(tmp_path / "y.png")])
    assert "ckpt-0000006 is damaged (guide.safetensors: SHA-256 mismatch)" in line
    # so is a resume: it goes on from step 4, with the guide kept there
    assert main(["train", "--resume", "--out", str(run), "--steps", "7", "--no-progress"]) == 0
    assert "ckpt-0000006 is damaged" in capsys.readouterr().err
    assert (run / "ckpt-0000007" / "guide.safetensors").is_file()


def test_a_deleted_guide_listed_in_the_manifest_falls_back_too(guided, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(guided, run)
    (run / "ckpt-0000006" / "guide.safetensors").unlink()
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 0
    assert "guide.safetensors: size differs" in capsys.readouterr().err


# -- b. an --out that is not a run ----------------------------------------------------------------------

def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_out_holding_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "thesis"
    (out / "chapters").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "chapters" / "one.tex").write_text("\\chapter{One}\n")
    before = snapshot(out)
    for extra in ([], ["--resume"]):
        line = one_line(capsys, ["train", *TINY, "--steps", "2", "--out", str(out), *extra])
        assert str(out) in line and ("not a ddpm run and not empty (it holds chapters and 1 more)" in line
                                     or "holds no run" in line), line
        assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["chapters", "notes.txt"]


@pytest.mark.parametrize("extra", [[], ["--resume"]])
def test_an_out_holding_another_programs_config_json_is_refused(tmp_path, capsys, extra):
    out = tmp_path / "pipeline"
    out.mkdir()
    (out / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 32}\n')
    before = snapshot(out)
    line = one_line(capsys, ["train", *TINY, "--steps", "2", "--out", str(out), *extra])
    assert f"{out} is not a ddpm run: its config.json is not a run config" in line, line
    # --resume without --preset reads RUN/config.json itself: it names the file
    line = one_line(capsys, ["train", "--resume", "--no-progress", "--out", str(out)])
    assert f"{out / 'config.json'}: config needs a 'model' table" in line, line
    assert snapshot(out) == before and [p.name for p in out.iterdir()] == ["config.json"]


def test_what_a_run_that_failed_to_start_leaves_is_trained_over(tmp_path, capsys, tiny):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("12345\n")  # left by a run killed before it wrote its config
    (out / ".tmp-1-0a0a0a0a-config.json").write_text("{")
    assert train(tiny(**{"train.steps": 2}), out=out) == out
    started = tmp_path / "started"  # a run killed after its config.json, before a checkpoint
    started.mkdir()
    (started / "config.json").write_text((out / "config.json").read_text())
    assert train(tiny(**{"train.steps": 2}), out=started) == started


# -- c. an --out that cannot be written ---------------------------------------------------------------------

@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through chmod")
def test_a_read_only_out_is_one_line(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        line = one_line(capsys, ["train", *TINY, "--steps", "2", "--out", str(parent / "run")])
        assert str(parent / "run") in line and "Permission denied" in line, line
        line = one_line(capsys, ["train", *TINY, "--steps", "2", "--out", str(parent)])
        assert str(parent) in line and "Permission denied" in line, line
    finally:
        parent.chmod(0o755)


def test_an_unwritable_out_is_one_line_even_as_root(tmp_path, capsys, monkeypatch):
    """What chmod 555 does for other users, simulated: mkdir and open for writing fail with EACCES."""
    parent = tmp_path / "ro"
    (parent / "empty").mkdir(parents=True)
    real_mkdir, real_open = os.mkdir, os.open

    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def mkdir(path, *args, **kwargs):
        return denied(path) if str(path).startswith(str(parent)) else real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if str(path).startswith(str(parent)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            denied(path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    line = one_line(capsys, ["train", *TINY, "--steps", "2", "--out", str(parent / "new" / "run")])
    assert line.startswith(f"ddpm: error: training: {parent / 'new'}") and line.endswith("Permission denied"), line
    line = one_line(capsys, ["train", *TINY, "--steps", "2", "--out", str(parent / "empty")])
    assert f"{parent / 'empty' / '.lock'}: Permission denied" in line, line
    monkeypatch.undo()
    assert [p.name for p in parent.iterdir()] == ["empty"] and not list((parent / "empty").iterdir())
