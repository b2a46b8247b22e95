"""The run report (RUN/report.html): parsed back with html.parser, never just grepped.

What a reader needs must be in the file itself: the plot paths with one point per log record, the
preview grids as data URIs (byte for byte), the config, and nothing fetched from elsewhere.
"""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser

import pytest
import torch

from ddpm.cli.main import main
from ddpm.presets import get_preset
from ddpm.evaluation.report import MAX_PREVIEWS, read_jsonl, smooth, write_report
from ddpm.evaluation.viz import save_grid


class _Page(HTMLParser):
    """Collects the plot paths, images, <pre> text, tick labels and every attribute of the page."""

    def __init__(self, text: str):
        super().__init__()
        self.paths, self.images, self.tags, self.attrs, self.pre, self.texts = [], [], [], [], [], []
        self._in_pre = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attrs += list(attrs.items())
        if tag == "path" and attrs.get("class") == "series":
            self.paths.append(attrs)
        elif tag == "img":
            self.images.append(attrs)
        self._in_pre = tag == "pre"

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        (self.pre if self._in_pre else self.texts).append(data)

    def path(self, name: str) -> list[tuple[float, float]]:
        """The (x, y) points of the one series called ``name``; the path's own count must agree."""
        [attrs] = [p for p in self.paths if p["data-name"] == name]
        points = [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", attrs["d"])]
        assert int(attrs["data-points"]) == len(points)
        return points


def _fake_run(tmp_path, losses, n_previews=2, evals=True):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    config = get_preset("tiny")
    (run / "config.json").write_text(config.to_json() + "\n")
    lines = [json.dumps({"step": 5 * (i + 1), "loss": loss, "lr": 1e-3 * min(1, (i + 1) / 3), "grad_norm": 1.0 + i})
             for i, loss in enumerate(losses)]
    # A run that crashed after logging step 10 and resumed from step 5 logs step 10 again: the later
    # record wins. A crash also tears the last line.
    lines.insert(1, json.dumps({"step": 10, "loss": 99.0, "lr": 1.0, "grad_norm": 1.0}))
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 9')
    grids = {}
    for i in range(n_previews):
        grids[f"step-{10 * (i + 1):07d}.png"] = save_grid(torch.full((4, 1, 6, 6), i / 10), run / "samples" / f"step-{10 * (i + 1):07d}.png")
    grids["final.png"] = save_grid(torch.zeros(4, 1, 6, 6), run / "samples" / "final.png")
    if evals:
        (run / "eval").mkdir()
        (run / "eval" / "periodic.jsonl").write_text("".join(
            json.dumps({"step": s, "sampler": "ddim", "steps": 50, "num": 16, "nll": {"bpd": b, "estimate": "x"}}) + "\n"
            for s, b in ((20, 7.5), (40, 5.0))))
    return run, config, grids


def test_report_holds_plots_images_config_and_nothing_external(tmp_path):
    losses = [1.0 / (i + 1) ** 2 for i in range(12)]
    losses[6] = float("nan")  # a skipped (non-finite) step leaves a gap, not a point
    run, config, grids = _fake_run(tmp_path, losses)
    path = write_report(run)
    assert path == run / "report.html"
    page = _Page(path.read_text(encoding="utf-8"))

    raw, smoothed, lr = page.path("raw"), page.path(next(p["data-name"] for p in page.paths
                                                          if p["data-name"].startswith("smoothed"))), page.path("lr")
    assert len(raw) == len(smoothed) == 11 and len(lr) == 12
    assert "M" in [c for c in re.findall(r"[ML]", page.paths[0]["d"])][1:]  # the NaN splits the line
    xs = [x for x, _ in lr]
    assert xs == sorted(xs) and len(set(xs)) == 12
    finite = [v for v in losses if math.isfinite(v)]
    # Loss falls from 1 to 1/144: a log axis, and the highest loss is drawn highest (smallest y).
    assert min(raw, key=lambda p: p[1]) == raw[finite.index(max(finite))]
    assert any("(log scale)" in t for t in page.texts)
    assert lr[0][1] > lr[-1][1] and lr[2][1] == lr[-1][1]  # warm-up, then constant
    assert len(page.path("nll.bpd")) == 2 and "nll.estimate" not in [p["data-name"] for p in page.paths]

    assert [img["alt"] for img in page.images] == ["step 10", "step 20", "final (step 60)"]
    for img, name in zip(page.images, ("step-0000010.png", "step-0000020.png", "final.png")):
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        assert base64.b64decode(img["src"][len(prefix):]) == grids[name].read_bytes()
    assert json.loads("".join(page.pre)) == json.loads(config.to_json())

    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    for key, value in page.attrs:
        assert not re.match(r"\s*(https?:|//|file:)", value or ""), (key, value)


def test_previews_are_thinned_and_logs_deduplicated(tmp_path):
    run, _, _ = _fake_run(tmp_path, [0.5] * 4, n_previews=40, evals=False)
    page = _Page(write_report(run, tmp_path / "elsewhere" / "r.html").read_text())
    captions = [img["alt"] for img in page.images]
    assert len(captions) == MAX_PREVIEWS and captions[0] == "step 10" and captions[-2] == "step 400"
    assert captions[-1] == "final (step 20)"
    assert any("No periodic evaluation" in t for t in page.texts)
    records = read_jsonl(run / "log.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20] and records[1]["loss"] == 0.5


def test_smooth_is_a_centred_mean():
    assert smooth([1.0, 2.0, 3.0, 4.0, 5.0], 3) == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])
    out = smooth([0.0, float("nan"), 1.0, 2.0], 3)
    assert out[0] == 0.0 and math.isnan(out[1]) and out[2] == pytest.approx(1.5) and out[3] == pytest.approx(1.5)
    # A straight line in log space (exponential decay) is left as it is by the geometric mean.
    decay = [0.5**i for i in range(9)]
    assert smooth(decay, 5, geometric=True)[2:-2] == pytest.approx(decay[2:-2])


def test_cli_report_and_the_report_of_a_real_run(tmp_path, capsys):
    run = tmp_path / "tiny"
    assert main(["train", "--preset", "tiny", "--steps", "6", "--log-every", "2", "--sample-every", "3",
                 "--out", str(run)]) == 0
    page = _Page((run / "report.html").read_text())  # written at the end of the run
    assert len(page.path("raw")) == len(read_jsonl(run / "log.jsonl")) == 3
    assert [img["alt"] for img in page.images] == ["step 3", "final (step 6)"]
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()
    assert f"ddpm: wrote {run / 'report.html'}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ddpm: error: run directory {tmp_path / 'missing'} does not exist",
                   f"ddpm: error: {tmp_path / 'empty'} is not a run directory (no config.json, no log.jsonl)"]


@pytest.mark.parametrize("count, nrow", [(10, 1), (10, 10), (64, 8), (4, 2)])
def test_previews_keep_their_pixel_aspect_at_a_whole_scale(tmp_path, count, nrow):
    # a 10-class strip of one sample a class (32 x 302) was drawn 288 pixels wide: a blurry column
    run, _, _ = _fake_run(tmp_path, [1.0, 0.5], n_previews=0, evals=False)
    grid = save_grid(torch.zeros(count, 1, 28, 28), run / "samples" / "final.png", nrow=nrow)
    from PIL import Image

    w, h = Image.open(grid).size
    img, = _Page(write_report(run).read_text(encoding="utf-8")).images
    shown_w, shown_h = int(img["width"]), int(img["height"])
    assert shown_w * h == shown_h * w  # the aspect of the pixels
    assert shown_w % w == 0 and shown_w >= w  # a whole factor: square, sharp pixels
    assert shown_w <= 520 and shown_h <= max(400, h)
