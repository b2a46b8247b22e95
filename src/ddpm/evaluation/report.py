"""The run report: ``RUN/report.html``, one self-contained page to look at a run.

``write_report(run_dir)`` reads what a run leaves behind and writes a page that needs nothing but
a browser (no network, no scripts): the training loss (raw and smoothed), learning rate and
gradient norm against the step from ``log.jsonl``; the preview grids ``samples/*.png`` in step
order, embedded as base64 data URIs; the metrics of ``eval/periodic.jsonl`` over the steps, when
there are any; and the resolved ``config.json``. Plots are inline SVG drawn here (no matplotlib).
``ddpm train`` and ``ddpm distill`` write the report at the end of a run (a distillation's previews
are one grid per round); ``ddpm report RUN`` writes it on demand.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..io.checkpoint import atomic_write_text

__all__ = ["write_report", "build_report", "read_jsonl", "smooth", "svg_plot", "Series"]

COLORS = ("#1f5fbf", "#d9730d", "#2e8b57", "#b8336a", "#6a4c93", "#8c6d1f")
MAX_PREVIEWS = 24  # evenly chosen over the run (first and last always kept), to bound the page size


# -- reading a run directory --------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file sorted by ``step``, one per step (the last written wins:
    a resumed run logs again the steps after its last checkpoint). A torn last line is skipped."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _numeric_leaves(record: dict, prefix: str = "") -> dict[str, float]:
    """{"nll.bpd": 3.2, "toy.energy_distance": 0.01, ...}: every number of a nested record."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_numeric_leaves(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


def _previews(run_dir: Path, final_step: int | None) -> list[tuple[str, Path]]:
    """(caption, path) of ``samples/step-NNNNNNN.png`` in step order (a distillation's
    ``samples/round-R-Nsteps.png`` in round order), then ``samples/final.png``. Symbolic links are
    left out: the page embeds each file's bytes, and a planted link would copy any file into it."""
    folder = run_dir / "samples"
    if folder.is_symlink():
        return []
    steps = sorted((int(m.group(1)), p) for p in folder.glob("step-*.png") if (m := re.fullmatch(r"step-(\d+)\.png", p.name)))
    items = [(f"step {s}", p) for s, p in steps]
    rounds = sorted((int(m.group(1)), int(m.group(2)), p) for p in folder.glob("round-*.png")
                    if (m := re.fullmatch(r"round-(\d+)-(\d+)steps\.png", p.name)))
    items += [(f"round {r}: {n} step{'s' * (n != 1)}", p) for r, n, p in rounds]
    items = [(caption, p) for caption, p in items if not p.is_symlink()]
    if len(items) > MAX_PREVIEWS - 1:
        keep = sorted({round(i * (len(items) - 1) / (MAX_PREVIEWS - 2)) for i in range(MAX_PREVIEWS - 1)})
        items = [items[i] for i in keep]
    if (folder / "final.png").is_file() and not (folder / "final.png").is_symlink():
        items.append(("final" + ("" if final_step is None else f" (step {final_step})"), folder / "final.png"))
    return items


# -- plots as inline SVG --------------------------------------------------------------------------

@dataclass
class Series:
    """One line of a plot: ``x``, ``y`` (non-finite values break the line), its style."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    color: str = COLORS[0]
    width: float = 1.8
    opacity: float = 1.0
    markers: bool = False


def smooth(values: Sequence[float], window: int, *, geometric: bool = False) -> list[float]:
    """Centred moving average over ``window`` values (fewer at the ends), so the curve does not lag
    behind the data as a running average does where the loss falls fast. ``geometric`` averages
    logarithms (positive values: the noise of a loss is multiplicative). Non-finite values stay
    NaN and are left out of their neighbours' averages."""
    f = math.log if geometric else float
    ok = [math.isfinite(v) and (v > 0 or not geometric) for v in values]
    sums, counts = [0.0], [0]  # prefix sums: each average costs O(1)
    for v, good in zip(values, ok):
        sums.append(sums[-1] + (f(v) if good else 0.0))
        counts.append(counts[-1] + good)
    half, out = max(window, 1) // 2, []
    for i, good in enumerate(ok):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        mean = (sums[hi] - sums[lo]) / (counts[hi] - counts[lo]) if good else float("nan")
        out.append(math.exp(mean) if geometric and good else mean)
    return out


def _nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _linear_axis(lo: float, hi: float, count: int = 5) -> tuple[float, float, list[float]]:
    if hi - lo < 1e-12 * max(abs(lo), abs(hi), 1e-300):
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, count)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    ticks = [lo + i * step for i in range(int(round((hi - lo) / step)) + 1)]
    return lo, hi, ticks


def _log_axis(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Range and ticks in log10 units: decades, with 2 and 5 in between when few decades show."""
    a, b = math.log10(lo), math.log10(hi)
    if b - a < 1e-9:
        a, b = a - 0.5, b + 0.5
    pad = 0.04 * (b - a)
    a, b = a - pad, b + pad
    mantissas = (1, 2, 5) if b - a < 2.5 else (1,)
    ticks = [math.log10(m) + d for d in range(math.floor(a), math.ceil(b) + 1) for m in mantissas]
    return a, b, [t for t in ticks if a <= t <= b]


def _fmt(v: float) -> str:
    if abs(v) >= 1e6 and float(v).is_integer():
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3 and float(v).is_integer():
        return f"{v / 1e3:g}k"
    return f"{v:.3g}"


def svg_plot(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str = "", log_y: bool | None = None,
             width: int = 520, height: int = 300) -> str:
    """An inline ``<svg>`` line plot. ``log_y=None`` picks a log axis for positive values spanning
    more than a factor of 20. Each series is one ``<path class="series" data-name=... data-points=N>``
    (N its finite points), with circle markers when asked."""
    L, R, T, B = 62, 14, 44, 42
    pts_all = [(x, y) for s in series for x, y in zip(s.x, s.y) if math.isfinite(x) and math.isfinite(y)]
    if log_y is None:
        ys = [y for _, y in pts_all]
        log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 20
    pts_all = [(x, y) for x, y in pts_all if y > 0 or not log_y]
    esc = html.escape
    head = (f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{esc(title)}"><title>{esc(title)}</title>'
            f'<text class="title" x="{L}" y="18">{esc(title)}</text>')
    if not pts_all:
        return head + f'<text class="empty" x="{width / 2}" y="{height / 2}">no values</text></svg>'
    x0, x1, xticks = _linear_axis(min(p[0] for p in pts_all), max(p[0] for p in pts_all))
    fy = math.log10 if log_y else float
    ys = [y for _, y in pts_all]
    y0, y1, yticks = _log_axis(min(ys), max(ys)) if log_y else _linear_axis(min(ys), max(ys))

    def px(x):
        return L + (x - x0) / (x1 - x0) * (width - L - R)

    def py(y):  # y already on the axis scale (log10 for a log axis)
        return T + (1 - (y - y0) / (y1 - y0)) * (height - T - B)

    parts = [head, f'<rect class="frame" x="{L}" y="{T}" width="{width - L - R}" height="{height - T - B}"/>']
    for t in xticks:
        parts.append(f'<line class="grid" x1="{px(t):.1f}" y1="{T}" x2="{px(t):.1f}" y2="{height - B}"/>'
                     f'<text class="tick" x="{px(t):.1f}" y="{height - B + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for t in yticks:
        label = _fmt(10 ** t) if log_y else _fmt(t)
        parts.append(f'<line class="grid" x1="{L}" y1="{py(t):.1f}" x2="{width - R}" y2="{py(t):.1f}"/>'
                     f'<text class="tick" x="{L - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{label}</text>')
    parts.append(f'<text class="label" x="{(L + width - R) / 2}" y="{height - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text class="label" transform="translate(14 {(T + height - B) / 2}) rotate(-90)" '
                     f'text-anchor="middle">{esc(ylabel)}{" (log scale)" if log_y else ""}</text>')
    legend_x = L
    for s in series:
        commands, points, pen_up = [], [], True
        for x, y in zip(s.x, s.y):
            if not (math.isfinite(x) and math.isfinite(y)) or (log_y and y <= 0):
                pen_up = True  # a gap in the line
                continue
            commands.append(f"{'M' if pen_up else 'L'}{px(x):.1f},{py(fy(y)):.1f}")
            points.append((px(x), py(fy(y))))
            pen_up = False
        parts.append(f'<path class="series" data-name="{esc(s.name)}" data-points="{len(points)}" d="{" ".join(commands)}" '
                     f'stroke="{s.color}" stroke-width="{s.width}" stroke-opacity="{s.opacity}" fill="none"/>')
        if s.markers:
            parts += [f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.5" fill="{s.color}"/>' for cx, cy in points]
        # Legend: one row under the title, entries side by side (about 6.2 px per character).
        parts.append(f'<line x1="{legend_x}" y1="30" x2="{legend_x + 18}" y2="30" stroke="{s.color}" '
                     f'stroke-width="{max(s.width, 2)}" stroke-opacity="{max(s.opacity, 0.5)}"/>'
                     f'<text class="legend" x="{legend_x + 23}" y="34">{esc(s.name)}</text>')
        legend_x += 40 + 6.2 * len(s.name)
    return "".join(parts) + "</svg>"


# -- the page -------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232b; background: #f6f7f9;
       margin: 0 auto; max-width: 1120px; padding: 20px 28px 40px; }
h1 { font-size: 22px; margin: 6px 0 4px; } h2 { font-size: 17px; margin: 28px 0 10px; }
.meta { color: #4b5563; margin: 0 0 6px; } .meta b { color: #1d232b; }
.plots, .gallery { display: flex; flex-wrap: wrap; gap: 14px; }
svg.plot { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; }
svg .title { font-size: 13px; font-weight: 600; fill: #1d232b; }
svg .tick, svg .legend { font-size: 11px; fill: #4b5563; } svg .label { font-size: 12px; fill: #1d232b; }
svg .grid { stroke: #eceef1; } svg .frame { fill: none; stroke: #c9ced6; } svg .empty { fill: #8a929c; }
figure { margin: 0; background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 8px; }
figure img { display: block; image-rendering: pixelated; }
figcaption { font-size: 12px; color: #4b5563; text-align: center; margin-top: 4px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
td, th { border: 1px solid #dde1e6; padding: 3px 8px; text-align: right; } th { background: #eef0f3; }
pre { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 12px; font-size: 12px;
      overflow-x: auto; }
.note { color: #6b7280; }
"""


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (bytes 16..23, big-endian)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return 256, 256
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _figure(caption: str, path: Path) -> str:
    data = path.read_bytes()
    # Small grids (28-pixel digits) are enlarged by a whole factor that fits both sides in 520 x 400,
    # so pixels stay sharp squares and a strip keeps its aspect; larger ones are shrunk to 520 wide.
    w, h = _png_size(data)
    w, h = max(w, 1), max(h, 1)
    scale = max(1, min(520 // w, 400 // h)) if w <= 520 else 520 / w
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" width="{round(w * scale)}" height="{round(h * scale)}" '
            f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _training_section(log: list[dict]) -> str:
    if not log:
        return '<p class="note">No training log (log.jsonl) yet.</p>'
    steps = [float(r["step"]) for r in log]

    def column(key):
        return [float(r[key]) if isinstance(r.get(key), (int, float)) else float("nan") for r in log]

    loss = column("loss")
    window = 2 * min(max(len(log) // 40, 1), 50) + 1  # 3 records for a short run, at most 101
    geometric = all(v > 0 for v in loss if math.isfinite(v))
    plots = [svg_plot([Series("raw", steps, loss, COLORS[0], width=1.2, opacity=0.35),
                       Series(f"smoothed (centred {'geometric ' if geometric else ''}mean of {window} records)",
                              steps, smooth(loss, window, geometric=geometric), COLORS[0], width=2.2)],
                      title="Training loss", xlabel="step", ylabel="loss"),
             svg_plot([Series("lr", steps, column("lr"), COLORS[1])], title="Learning rate", xlabel="step",
                      ylabel="lr", log_y=False)]
    if any(math.isfinite(v) for v in column("grad_norm")):
        plots.append(svg_plot([Series("grad norm", steps, column("grad_norm"), COLORS[2], width=1.4)],
                              title="Gradient norm (before clipping)", xlabel="step", ylabel="norm"))
    return f'<div class="plots">{"".join(plots)}</div>'


def _eval_section(records: list[dict]) -> str:
    skip = {"step", "steps", "num"}
    rows = [(int(r["step"]), {k: v for k, v in _numeric_leaves(r).items() if k not in skip}) for r in records]
    names = sorted({k for _, values in rows for k in values})
    if not names:
        return '<p class="note">No periodic evaluation in this run (eval.every = 0).</p>'
    plots = []
    for i, name in enumerate(names):
        xs = [float(s) for s, values in rows if name in values]
        ys = [values[name] for _, values in rows if name in values]
        plots.append(svg_plot([Series(name, xs, ys, COLORS[i % len(COLORS)], markers=len(xs) <= 40)],
                              title=name, xlabel="step", ylabel=name.rsplit(".", 1)[-1], width=380, height=250))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{s}</td>" + "".join(f"<td>{values[n]:.5g}</td>" if n in values else "<td></td>"
                                                  for n in names) + "</tr>" for s, values in rows)
    return f'<div class="plots">{"".join(plots)}</div><p></p><table><tr><th>step</th>{head}</tr>{body}</table>'


def _summary(run_dir: Path, config: dict | None, log: list[dict]) -> str:
    items = [f"<b>{html.escape(str(run_dir))}</b>"]
    if config:
        planned = config.get("train", {}).get("steps")
        done = log[-1]["step"] if log else 0
        items.append(f"step <b>{done}</b>" + (f" of {planned}" if planned else ""))
        items.append(f"data <b>{html.escape(str(config.get('data', {}).get('source')))}</b>")
        distilled = config.get("distill")
        if isinstance(distilled, dict):
            items.append(f"distilled from <b>{html.escape(str(distilled.get('teacher')))}</b> "
                         f"({distilled.get('teacher_steps')} to <b>{distilled.get('steps')}</b> DDIM steps)")
        model = config.get("model", {})
        if "image_size" in model:
            items.append(f"U-Net {html.escape(json.dumps(model['image_size']))} px, {model.get('in_channels')} "
                         f"channel(s), ch {model.get('ch')}")
    if log:
        # elapsed_s counts on across resumes, but restarted at 0 in the sessions of older runs: add
        # up what each session reached.
        elapsed = [float(r.get("elapsed_s", 0.0)) for r in log]
        total = sum(a for a, b in zip(elapsed, elapsed[1:] + [-1.0]) if b < a)
        items.append(f"training time <b>{total / 60:.1f} min</b>")
        items.append(f"last loss <b>{log[-1]['loss']:.4g}</b>")
    return '<p class="meta">' + " · ".join(items) + "</p>"


def _compact_lists(text: str) -> str:
    """``json.dumps(indent=2)`` puts every list item on a line of its own; keep lists of scalars on one."""
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)


def build_report(run_dir: str | os.PathLike) -> str:
    """The HTML text of the report of ``run_dir`` (see the module docstring)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist" if not run_dir.exists() else f"{run_dir} is not a directory")
    config_path, log_path = run_dir / "config.json", run_dir / "log.jsonl"
    if not config_path.is_file() and not log_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json, no log.jsonl)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON: {exc}") from None
    log = read_jsonl(log_path)
    evals = read_jsonl(run_dir / "eval" / "periodic.jsonl")
    name = (config or {}).get("name") or run_dir.name
    previews = _previews(run_dir, log[-1]["step"] if log else None)
    gallery = ('<div class="gallery">' + "".join(_figure(c, p) for c, p in previews) + "</div>" if previews
               else '<p class="note">No preview grids (samples/*.png) yet.</p>')
    config_text = _compact_lists(json.dumps(config, indent=2)) if config is not None else "(no config.json)"
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>ddpm run report: {html.escape(name)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>ddpm run report: {html.escape(name)}</h1>{_summary(run_dir, config, log)}\n"
            f'<section id="training"><h2>Training</h2>{_training_section(log)}</section>\n'
            f'<section id="samples"><h2>Preview samples over training</h2>{gallery}</section>\n'
            f'<section id="eval"><h2>Evaluation during training</h2>{_eval_section(evals)}</section>\n'
            f'<section id="config"><h2>Configuration (config.json)</h2><pre>{html.escape(config_text)}</pre></section>\n'
            "</body></html>\n")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN/report.html``) atomically; return its path."""

    text = build_report(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)  # a browser open on the old page never reads half a file
    return out
