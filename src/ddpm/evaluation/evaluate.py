"""Evaluation: FID/IS/KID against a reference set, toy-data metrics, JSON reports, periodic eval.

The measuring instruments live in ``fid.py`` (Inception network, statistics, Frechet distance)
and ``nll.py`` (the variational bound in bits/dim); this module connects them to runs, sample
files, image folders and reference sets, and writes a JSON report that names everything a
number depends on (weights digest, reference set, sample count, sampler and steps).

Reference sets for FID::

    cifar10-train   the 50,000 CIFAR-10 training images (folder from --ref-data or $DDPM_CIFAR10_DIR)
    cifar10-test    the 10,000 test images
    FILE.npz        precomputed statistics (arrays mu, sigma) or images (array images, uint8 NHWC)
    DIR             a folder of images

Statistics of cifar10-*/DIR references are cached as .npz (``fid.cache_dir()``), keyed by the
reference, the image count and the weights' SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..config import EvalConfig
from ..core.device import model_device, pick_device
from ..core.nll import nll_bpd
from ..data.sources import open_source, toy_log_density, toy_sample
from ..errors import UserError
from ..io.files import atomic_write_text, open_append, own_dir
from ..io.run import LoadedRun
from ..sampling.batches import SamplerSettings, sample_batches
from . import fid as _fid
from .viz import to_uint8

CIFAR10_ENV = "DDPM_CIFAR10_DIR"
CIFAR10_REFS = {"cifar10-train": "train", "cifar10-test": "test"}




def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        # JSON has no inf/nan; write them as strings rather than producing invalid JSON.
        return float(value) if math.isfinite(value) else str(float(value))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_eval_report(path: str | os.PathLike, report: dict) -> Path:
    """Write ``report`` as indented JSON (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(_jsonable(report), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Runs: what a path holds, where reports go, what data it was trained on
# ---------------------------------------------------------------------------------------------

def is_run(path: str | os.PathLike) -> bool:
    """A run directory (config.json / ckpt-*), a ckpt-* folder or a weights file: what ``ddpm.load`` accepts."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".safetensors"
    return p.is_dir() and ((p / "config.json").is_file() or any(p.glob("ckpt-*")) or any(p.glob("*.safetensors")))


def run_dir_of(run) -> Path:
    """The run directory of a ``LoadedRun`` (its weights live in RUN/ckpt-NNNNNNN/), for reports."""
    weights = Path(run.path)
    return weights.parent.parent if weights.parent.name.startswith("ckpt-") else weights.parent


def run_data_spec(run) -> str | None:
    """The data source spec a run was trained on, read from its config (None when unknown)."""
    cfg = run.config
    data = getattr(cfg, "data", None) if not isinstance(cfg, dict) else cfg.get("data")
    if isinstance(data, str):
        return data
    for key in ("source", "spec", "name", "data"):
        value = data.get(key) if isinstance(data, dict) else getattr(data, key, None)
        if isinstance(value, str):
            return value
    return None


# ---------------------------------------------------------------------------------------------
# FID / IS / KID
# ---------------------------------------------------------------------------------------------

def _dir_key(directory: Path, files: list[Path]) -> str:
    # A folder's identity: its path plus every file's name, size and mtime.
    h = hashlib.sha256(str(directory.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"dir-{directory.name}-{h.hexdigest()[:12]}"


def check_reference(reference: str, ref_data: str | None = None) -> None:
    """Refuse an unusable FID reference before any sampling starts (UserError)."""
    if reference in CIFAR10_REFS:
        if not (ref_data or os.environ.get(CIFAR10_ENV)):
            raise UserError(f"--ref {reference} needs the CIFAR-10 folder: pass --ref-data DIR or set {CIFAR10_ENV}")
    elif not ((reference.endswith(".npz") and Path(reference).is_file()) or Path(reference).is_dir()):
        raise UserError(f"unknown FID reference {reference!r}; use cifar10-train, cifar10-test, "
                        "a stats/images .npz, or an image folder")


def reference_statistics(reference: str, net, weights: _fid.InceptionWeights, *, ref_data: str | None = None,
                         ref_num: int | None = None, batch_size: int = 200, cache: str | os.PathLike | None = None,
                         use_cache: bool = True, progress: bool = False) -> tuple[dict, dict]:
    """(stats {mu, sigma[, features]}, info {name, count, source, cache}) for a reference set."""
    check_reference(reference, ref_data)
    ref_path = Path(reference)
    if reference in CIFAR10_REFS:
        folder = ref_data or os.environ.get(CIFAR10_ENV)

        source, key = open_source(f"cifar10:{folder}", split=CIFAR10_REFS[reference], download=False), reference
    elif ref_path.suffix == ".npz" and ref_path.is_file():
        with np.load(ref_path, allow_pickle=False) as z:
            has_stats = "mu" in z.files
        if has_stats:
            stats = _fid.load_stats(ref_path)
            meta = stats.pop("meta")
            if meta.get("weights_sha256") and meta["weights_sha256"] != weights.sha256:
                raise UserError(f"{ref_path} was computed with Inception weights {meta['weights_sha256'][:16]}..., "
                                f"not {weights.sha256[:16]}...; recompute it")
            count = int(meta["count"]) if meta.get("count", "").isdigit() else None
            return stats, {"name": meta.get("reference", str(ref_path)), "count": count,
                           "source": "stats file", "file": str(ref_path.resolve())}
        source = _fid.load_npz_images(ref_path)
        key = f"npz-{ref_path.stem}-{_fid.sha256_file(ref_path)[:12]}"
    elif ref_path.is_dir():
        source = _fid.list_images(ref_path)
        key = _dir_key(ref_path, source)
    else:
        raise UserError(f"FID reference {reference!r} is neither a folder nor an .npz file")
    count = len(source) if ref_num is None else min(ref_num, len(source))
    cached = _fid.stats_cache_path(_fid.cache_dir(cache), key, count, weights.sha256)
    info = {"name": key, "count": count, "cache": str(cached)}
    if use_cache and cached.is_file():
        stats = _fid.load_stats(cached)
        stats.pop("meta")
        return stats, {**info, "source": "cache"}
    acc = _fid.extract_stats(net, _fid.iter_batches(source, batch_size, count), progress=progress)
    mu, sigma = acc.mu_sigma()
    if use_cache:
        _fid.save_stats(cached, mu, sigma, features=acc.features(), reference=key, count=count,
                        weights_sha256=weights.sha256)
    return {"mu": mu, "sigma": sigma, "features": acc.features()}, {**info, "source": "computed"}


def compute_fid(images: np.ndarray, reference: str, *, weights: str | os.PathLike | None = None,
                ref_data: str | None = None, ref_num: int | None = None, batch_size: int = 200,
                device: str | torch.device | None = None, cache: str | os.PathLike | None = None,
                use_cache: bool = True, isc: bool = True, kid: bool = True, progress: bool = False) -> dict:
    """FID (and IS, KID) of uint8 images (N, H, W, C) against ``reference``; returns the report dict.

    KID needs reference features: they come with references computed here or cached by this
    package (up to 5,000 kept), not with a bare mu/sigma file, where KID is skipped.
    """
    w = _fid.resolve_inception_weights(weights)
    net = _fid.build_inception(w, device or pick_device())
    t0 = time.time()
    acc = _fid.extract_stats(net, _fid.iter_batches(images, batch_size), progress=progress)
    mu, sigma = acc.mu_sigma()
    ref_stats, ref_info = reference_statistics(reference, net, w, ref_data=ref_data, ref_num=ref_num,
                                               batch_size=batch_size, cache=cache, use_cache=use_cache,
                                               progress=progress)
    ref_features = ref_stats.get("features")
    if acc.n <= acc.keep and ref_features is not None and len(ref_features) == ref_info["count"]:
        # Every feature of both sets is at hand: the exact O(n1 n2 d) form, no 2048^3 eigh.
        value = _fid.frechet_distance_from_features(acc.features(), ref_features)
    else:
        value = _fid.frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"])
    report = {
        "metric": "fid",
        "fid": value,
        "num_samples": int(acc.n),
        "image_shape": list(images.shape[1:]),
        "reference": ref_info,
        "weights": w.describe(),
        "feature_layer": "pool3 (2048)",
    }
    if not w.verified:
        report["warning"] = "Inception weights are not the published file: this FID is not comparable with published numbers"
    if isc:
        report.update(_fid.inception_score(torch.cat(acc.logits)))
    if kid and "features" in ref_stats and len(ref_stats["features"]) >= 2:
        report.update(_fid.kernel_inception_distance(acc.features(), ref_stats["features"]))
    report["seconds"] = round(time.time() - t0, 2)
    return report


# ---------------------------------------------------------------------------------------------
# Two-sample statistics and toy-data metrics
# ---------------------------------------------------------------------------------------------

def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), x (n, d), y (m, d).

    Within-sample terms exclude the diagonal (U-statistics), so it is ~0 for equal distributions.
    """
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    n, m = len(x), len(y)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] | None = None) -> float:
    """Unbiased MMD^2 with a sum of Gaussian kernels; default bandwidths are the pooled median
    pairwise distance times (0.5, 1, 2)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    n, m = len(x), len(y)
    d_xx, d_yy, d_xy = torch.cdist(x, x) ** 2, torch.cdist(y, y) ** 2, torch.cdist(x, y) ** 2
    if bandwidths is None:
        med = float(d_xy.sqrt().median())
        bandwidths = tuple(med * f for f in (0.5, 1.0, 2.0))

    def k(d2):
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx = (k(d_xx).sum() - n * len(bandwidths)) / (n * (n - 1))
    kyy = (k(d_yy).sum() - m * len(bandwidths)) / (m * (m - 1))
    return float(kxx + kyy - 2 * k(d_xy).mean())


def _log_likelihood(name: str, x: torch.Tensor) -> dict | None:

    try:
        logp = toy_log_density(name, x)
    except UserError:  # no closed-form density for this set
        return None
    finite = torch.isfinite(logp)
    return {"mean": float(logp[finite].mean()) if finite.any() else float("-inf"),
            "fraction_zero_density": float(1 - finite.double().mean())}


def toy_metrics(samples: torch.Tensor, name: str, *, seed: int = 0) -> dict:
    """Energy distance and MMD of ``samples`` (n, 2) against fresh draws of toy set ``name``, the
    same statistics for a second fresh draw (the truth-vs-truth baseline), and the average
    log-likelihood of the samples (and of the truth) under the exact density where it exists."""

    samples = torch.as_tensor(samples, dtype=torch.float32).cpu()
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"toy samples must be (n, 2), got {tuple(samples.shape)}")
    n = len(samples)
    g = torch.Generator().manual_seed(seed)
    truth, truth2 = toy_sample(name, n, g), toy_sample(name, n, g)
    finite = torch.isfinite(samples).all(1)
    report = {
        "metric": "toy", "dataset": name, "num_samples": n,
        "fraction_nonfinite": float(1 - finite.double().mean()),
        "energy_distance": energy_distance(samples[finite], truth),
        "mmd_rbf": mmd_rbf(samples[finite], truth),
        "baseline_truth_vs_truth": {"energy_distance": energy_distance(truth2, truth), "mmd_rbf": mmd_rbf(truth2, truth)},
    }
    ll = _log_likelihood(name, samples[finite])
    if ll is not None:
        report["log_likelihood"] = ll
        report["baseline_truth_vs_truth"]["log_likelihood"] = _log_likelihood(name, truth2)
    return report


# ---------------------------------------------------------------------------------------------
# Evaluation during training (off by default)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def periodic_eval(run: LoadedRun, *, step: int, run_dir: str | os.PathLike, data=None, device=None) -> dict | None:
    """Run the metrics of ``run.config.eval`` when ``step`` is a multiple of its ``every`` and append
    one JSON line to RUN_DIR/eval/periodic.jsonl. ``run`` holds the network being trained (its EMA)
    as a ``LoadedRun``; ``data`` is the training Dataset (its ``.kind``/``.name`` pick toy metrics).
    Returns the record, or None when nothing ran. The model is put back in its previous mode."""
    config, model, schedule, sample_kwargs = run.config.eval, run.model, run.schedule, run.sample_kwargs
    if not config.every or step % config.every:
        return None

    was_training = model.training
    model.eval()
    if device is None:
        device = model_device(model, pick_device())
    record = {"step": int(step), "sampler": config.sampler, "steps": config.steps, "num": config.num}
    kind = getattr(data, "kind", None)  # a Dataset of ddpm.data.sources, or None
    try:
        need_samples = ("toy" in config.metrics and kind == "toy") or ("fid" in config.metrics and kind == "image")
        settings = SamplerSettings(config.sampler, config.steps)
        samples = sample_batches(run, config.num, settings, seed=config.seed, device=device) if need_samples else None
        if "toy" in config.metrics and kind == "toy":
            name = str(getattr(data, "name", "")).removeprefix("toy:")
            record["toy"] = toy_metrics(samples, name, seed=config.seed)
        if "nll" in config.metrics and data is not None:
            kw = {k: sample_kwargs[k] for k in ("prediction", "variance") if k in sample_kwargs}
            out = nll_bpd(model, schedule, data, num_timesteps=config.nll_timesteps, num=config.num,
                          generator=torch.Generator(device).manual_seed(config.seed),
                          decoder="discretized" if kind == "image" else "continuous", device=device, **kw)
            record["nll"] = {k: out[k] for k in ("bpd", "stderr", "prior_bpd", "decoder_bpd", "estimate")}
        if "fid" in config.metrics and kind == "image" and config.fid_ref:
            record["fid"] = compute_fid(to_uint8(samples), config.fid_ref, weights=config.inception_weights,
                                        ref_data=config.ref_data, device=device, kid=False)
    finally:
        if was_training:
            model.train()
    # RUN/eval and the file itself: a symbolic link at either is refused, never appended through
    with open_append(own_dir(Path(run_dir) / "eval") / "periodic.jsonl") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")
    return record

