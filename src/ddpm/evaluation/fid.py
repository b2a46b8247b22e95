"""FID, Inception Score and KID with the standard Inception-v3 FID network.

FID numbers are only comparable when the *same* network weights, the same reference set and the
same sample count are used, so every result here carries that provenance. The network is
torch-fidelity's ``FeatureExtractorInceptionV3`` (a PyTorch port of the TensorFlow graph
``inception-2015-12-05`` that the original FID code used, TF-style bilinear resize to 299 included);
its weights are the published file ``pt_inception-2015-12-05-6726825d.pth`` (the same bytes are
released by torch-fidelity and pytorch-fid; the ``6726825d`` in the name is the start of its SHA-256).

Notation::

    features   (N, 2048) pool3 activations; FID and KID use them
    logits     (N, 1008) unbiased logits; the Inception Score uses them
    mu, sigma  mean (2048,) and covariance (2048, 2048) of the features, float64

torch-fidelity (and torchvision, which it imports) is an optional dependency: it is imported only
when a network is built, with a clear message when it is missing.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import threads
from ..data.images import IMAGE_SUFFIXES, read_image
from ..errors import UserError
from ..io.files import atomic_write, sha256_file
from ..io.state import load_tensors
from .viz import to_uint8

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
# Published digest of the file above (95,628,359 bytes); pytorch-fid's pt_inception-...-6726825d.pth
# is the same file. The 8-hex prefix in the name is torch.hub's sha256-prefix convention.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"
CACHE_ENV = "DDPM_CACHE_DIR"
FEATURE_LAYERS = ("2048", "logits_unbiased")
MISSING_FIDELITY = "FID needs torch-fidelity: pip install 'ddpm[fid]'"


def _import_extractor():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:  # torch-fidelity or torchvision missing
        raise UserError(MISSING_FIDELITY) from exc
    return FeatureExtractorInceptionV3


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InceptionWeights:
    """A weights file with its digest; ``verified`` is True only for the published file."""

    path: str
    sha256: str
    verified: bool

    def describe(self) -> dict:
        return {"file": self.path, "sha256": self.sha256, "published": self.verified}


def resolve_inception_weights(path: str | os.PathLike | None = None, *, download: bool = True) -> InceptionWeights:
    """Find the Inception weights: ``path``, else ``$DDPM_INCEPTION_WEIGHTS``, else torch.hub's cache,
    else download them (when online) from torch-fidelity's release.

    A file named like the published one must have the published SHA-256 (a truncated or corrupted
    download is refused). Any other file is accepted after a strict key/shape check when the network
    is built, and reported with ``published=False``: its FID is not comparable with the literature.
    """
    path = path or os.environ.get(WEIGHTS_ENV) or None
    if path is None:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        found = [hub / n for n in INCEPTION_FILENAMES if (hub / n).is_file()]
        if found:
            path = found[0]
        elif not download:
            raise UserError(f"no FID Inception weights found; pass --inception-weights PATH or set {WEIGHTS_ENV}")
        else:
            path = hub / INCEPTION_FILENAMES[1]
            hub.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(INCEPTION_URL, str(path), hash_prefix=INCEPTION_SHA256[:8], progress=True)
            except Exception as exc:  # offline, proxy, HTTP error: all the same to the user
                raise UserError(
                    f"could not download the FID Inception weights from {INCEPTION_URL} ({exc.__class__.__name__}); "
                    f"download them elsewhere and pass --inception-weights PATH or set {WEIGHTS_ENV}"
                ) from exc
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weights file not found: {path}")
    digest = sha256_file(path)
    verified = digest == INCEPTION_SHA256
    if not verified and path.name in INCEPTION_FILENAMES:
        raise UserError(
            f"{path} has SHA-256 {digest}, not the published {INCEPTION_SHA256}; "
            "the file is damaged: delete it and download again"
        )
    return InceptionWeights(str(path.resolve()), digest, verified)


def build_inception(weights: InceptionWeights, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 loaded from ``weights`` (eval mode, no grad).

    The file is first read with ``torch.load(weights_only=True)`` so that nothing but tensors is
    unpickled, then torch-fidelity loads it through its ``feature_extractor_weights_path`` route with a
    strict ``load_state_dict`` (every key present, every shape equal, nothing extra).
    """
    extractor_cls = _import_extractor()
    state = load_tensors(weights.path, "Inception weights file")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{weights.path} is not a state dict of tensors")
    try:
        net = extractor_cls("inception-v3-compat", list(FEATURE_LAYERS), feature_extractor_weights_path=weights.path)
    except RuntimeError as exc:  # load_state_dict(strict=True): missing/unexpected keys, wrong shapes
        first = str(exc).strip().splitlines()
        raise UserError(f"{weights.path} does not hold the FID Inception-v3 weights: {' '.join(first[:3])[:300]}") from exc
    return net.to(device)


def images_to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) with C in {1, 3} -> uint8 (B, 3, H, W); grayscale is repeated to RGB."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"images must be uint8 of shape (N, H, W, C) with C in (1, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

@dataclass
class FeatureStats:
    """Streaming accumulator of pool3 statistics (float64 sums), plus what IS and KID need.

    ``keep`` caps the features retained for KID (all logits are retained for the IS splits).
    """

    keep: int = 5000
    n: int = 0
    total: np.ndarray | None = None
    outer: np.ndarray | None = None
    kept: list = field(default_factory=list)
    logits: list = field(default_factory=list)

    def update(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        f = features.detach().to(torch.float64)
        s, o = f.sum(0).cpu().numpy(), (f.T @ f).cpu().numpy()
        self.total = s if self.total is None else self.total + s
        self.outer = o if self.outer is None else self.outer + o
        have = sum(len(k) for k in self.kept)
        if have < self.keep:
            self.kept.append(features[: self.keep - have].detach().float().cpu())
        if logits is not None:
            self.logits.append(logits.detach().float().cpu())
        self.n += f.shape[0]

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """Sample mean and unbiased covariance (as numpy.cov with rowvar=False)."""
        if self.n < 2:
            raise UserError(f"FID needs at least 2 images, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2

    def features(self) -> torch.Tensor:
        return torch.cat(self.kept) if self.kept else torch.empty(0, 2048)


@torch.no_grad()
def extract_stats(net: torch.nn.Module, batches: Iterable[np.ndarray], *, keep: int = 5000,
                  progress: bool = False) -> FeatureStats:
    """Run ``net`` over uint8 (B, H, W, C) batches and accumulate FeatureStats."""
    device = next(net.parameters()).device
    stats = FeatureStats(keep=keep)
    it = batches
    if progress:

        it = tqdm(batches, desc="inception", unit="batch")
    with threads.follow_load(device=device):  # threads follow the others' load
        for images in it:
            features, logits = net(images_to_nchw(images).to(device))
            stats.update(features, logits)
            threads.tick()
    return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))  (Heusel et al. 2017, eq. 6; Dowson & Landau 1982).

    tr (S1 S2)^(1/2) is computed in the stable symmetric form: with R = S1^(1/2) (eigh, negative
    round-off eigenvalues clipped), S1 S2 is similar to R S2 R, which is symmetric PSD, so the trace
    is the sum of square roots of its eigenvalues. No complex sqrtm, no scipy.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"incompatible statistics: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    lam, U = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (U * np.sqrt(np.clip(lam, 0, None))) @ U.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """``frechet_distance`` of the sample means and covariances of two feature sets, without
    forming or decomposing any (d, d) matrix.

    With centred A (n1, d) and B (n2, d), S1 S2 = A^T A B^T B / ((n1 - 1)(n2 - 1)) has the nonzero
    eigenvalues of C C^T for C = A B^T, so tr (S1 S2)^(1/2) = ||A B^T||_* / sqrt((n1 - 1)(n2 - 1))
    (nuclear norm) and tr S1 = ||A||_F^2 / (n1 - 1). Cost O(n1 n2 d): the fast route whenever
    n1, n2 are small next to d = 2048 (periodic evaluation, tests); exact, not an approximation.
    """
    f1, f2 = torch.as_tensor(features1, dtype=torch.float64), torch.as_tensor(features2, dtype=torch.float64)
    n1, n2 = len(f1), len(f2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(n1, n2) < 2:
        raise ValueError(f"need two (n, d) feature sets with n >= 2 and equal d, got {tuple(f1.shape)}, {tuple(f2.shape)}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    A, B = f1 - mu1, f2 - mu2
    tr_covmean = torch.linalg.svdvals(A @ B.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + A.pow(2).sum() / (n1 - 1) + B.pow(2).sum() / (n2 - 1) - 2 * tr_covmean)


def inception_score(logits: torch.Tensor, splits: int = 10) -> dict:
    """Inception Score (Salimans et al. 2016) over ``splits`` splits, via torch-fidelity."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits, splits=min(splits, len(logits)))
    return {"is_mean": out["inception_score_mean"], "is_std": out["inception_score_std"], "is_splits": splits}


def kernel_inception_distance(features1: torch.Tensor, features2: torch.Tensor, *, subsets: int = 100,
                              subset_size: int = 1000) -> dict:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, via torch-fidelity."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(features1), len(features2))
    out = kid_features_to_metric(features1, features2, kid_subsets=subsets, kid_subset_size=size, verbose=False)
    return {"kid_mean": out["kernel_inception_distance_mean"], "kid_std": out["kernel_inception_distance_std"],
            "kid_subset_size": size}


# ---------------------------------------------------------------------------------------------
# Cached reference statistics
# ---------------------------------------------------------------------------------------------

def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$DDPM_CACHE_DIR/fid``, else ``~/.cache/ddpm/fid``."""
    if path is not None:
        return Path(path)
    root = os.environ.get(CACHE_ENV)
    return Path(root) / "fid" if root else Path.home() / ".cache" / "ddpm" / "fid"


def stats_cache_path(directory: str | os.PathLike, reference_key: str, count: int, weights_sha256: str) -> Path:
    """Cache file named by the reference, the image count and the weights digest."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in reference_key)[:80]
    return Path(directory) / f"{slug}-n{count}-inception-{weights_sha256[:16]}.npz"


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, *, features: torch.Tensor | None = None,
               **meta) -> Path:
    """Write mu, sigma (float64), optional KID features and string metadata to an .npz atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None and len(features):
        arrays["features"] = features.numpy().astype(np.float32)
    arrays.update({f"meta_{k}": np.asarray(str(v)) for k, v in meta.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write(path, buffer.getvalue())


def load_stats(path: str | os.PathLike) -> dict:
    """Read a stats .npz written by ``save_stats`` or by pytorch-fid/torch-fidelity (keys mu, sigma)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise UserError(f"{path} has no 'mu' and 'sigma' arrays; keys: {', '.join(z.files)}")
            out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
            if "features" in z:
                out["features"] = torch.from_numpy(z["features"])
            out["meta"] = {k[5:]: str(z[k]) for k in z.files if k.startswith("meta_")}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read FID statistics {path}: {exc}") from exc
    if out["mu"].ndim != 1 or out["sigma"].shape != out["mu"].shape * 2:
        raise UserError(f"{path}: mu {out['mu'].shape} and sigma {out['sigma'].shape} do not match")
    return out


# ---------------------------------------------------------------------------------------------
# Image sources: uint8 (N, H, W, C) arrays, .npz files, image folders, datasets in [-1, 1]
# ---------------------------------------------------------------------------------------------

def list_images(directory: str | os.PathLike) -> list[Path]:
    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {directory}")
    return files


def load_npz_images(path: str | os.PathLike) -> np.ndarray:
    """The ``images`` array of a samples .npz: uint8 (N, H, W, C)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise UserError(f"{path} has no 'images' array; keys: {', '.join(z.files)}")
            images = z["images"]
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{path}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return images


def iter_batches(source, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 (B, H, W, C) batches from an array, a list of image files, or a Dataset whose
    items are float (C, H, W) in [-1, 1] (as ``ddpm.data.sources.open_source`` returns)."""
    n = len(source) if limit is None else min(limit, len(source))
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if isinstance(source, np.ndarray):
            yield source[start:stop]
        elif isinstance(source, list):

            frames = []
            for p in source[start:stop]:
                with read_image(p) as im:  # a damaged, foreign or oversized file: one line naming it
                    frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            if len({f.shape for f in frames}) != 1:
                raise UserError(f"images in one folder must share one size; found {sorted({f.shape for f in frames})}")
            yield np.stack(frames)
        else:

            yield to_uint8(torch.stack([source[i] for i in range(start, stop)]))
