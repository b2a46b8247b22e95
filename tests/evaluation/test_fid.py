"""FID plumbing with torch-fidelity's real Inception network and random weights (offline).

The test writes a state dict with the real key names and shapes but random values, loads it
through the same ``feature_extractor_weights_path`` route as the published file, and checks the
statistics, the cache and the CLI around it. The Frechet distance is checked against closed forms.
"""

from __future__ import annotations

import json
import sys
from unittest import mock

import numpy as np
import pytest
import torch

from ddpm.evaluation import fid
from ddpm.errors import UserError

tf_inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")


def _random_inception_state() -> dict:
    """The real key set and shapes (extractor built without loading), He-initialised values so
    activations neither vanish nor explode through the 90-odd layers."""
    cls = tf_inception.FeatureExtractorInceptionV3
    # Build the real network without loading anything: the constructor's torch.load and strict
    # load_state_dict are stubbed out for this one call.
    with mock.patch.object(torch, "load", return_value={}), mock.patch.object(cls, "load_state_dict"):
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
        state[key] = value.clone()
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(_random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def net(weights_file):
    return fid.build_inception(fid.resolve_inception_weights(weights_file), "cpu")


def _images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, 32, 32, 3)) + shift, 0, 255).astype(np.uint8)


# -- Frechet distance against closed forms -------------------------------------------------------

def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    s1, s2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariance_closed_form():
    # S2 = c^2 S1 commutes with S1: tr (S1 S2)^(1/2) = c tr S1, so d^2 = (1 - c)^2 tr S1 + |dmu|^2.
    rng = np.random.default_rng(2)
    A = rng.normal(size=(6, 6))
    s1 = A @ A.T + 0.1 * np.eye(6)
    c, mu1, mu2 = 1.7, rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * np.trace(s1)
    assert fid.frechet_distance(mu1, s1, mu2, c * c * s1) == pytest.approx(expected, rel=1e-9)
    # and a generic pair against scipy's sqrtm
    linalg = pytest.importorskip("scipy.linalg")
    B = rng.normal(size=(6, 6))
    s2 = B @ B.T
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7)
    with pytest.raises(ValueError):
        fid.frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])


def test_frechet_distance_from_features_equals_covariance_form():
    # The nuclear-norm route (no d x d matrices) against mu/sigma + eigh, rank-deficient and full rank.
    g = torch.Generator().manual_seed(5)
    for n1, n2 in ((12, 9), (80, 120)):
        f1 = torch.randn(n1, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
        f2 = torch.randn(n2, 40, generator=g, dtype=torch.float64) + 0.3
        mu1, s1 = f1.mean(0).numpy(), np.cov(f1.numpy(), rowvar=False)
        mu2, s2 = f2.mean(0).numpy(), np.cov(f2.numpy(), rowvar=False)
        ref = fid.frechet_distance(mu1, s1, mu2, s2)
        assert fid.frechet_distance_from_features(f1, f2) == pytest.approx(ref, rel=1e-8)
        assert abs(fid.frechet_distance_from_features(f1, f1)) < 1e-10 * np.trace(s1)


# -- weights handling -----------------------------------------------------------------------------

def test_weights_resolution_and_strict_key_check(weights_file, tmp_path, monkeypatch):
    w = fid.resolve_inception_weights(weights_file)
    assert not w.verified and w.sha256 == fid.sha256_file(weights_file) and len(w.sha256) == 64
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(weights_file))
    assert fid.resolve_inception_weights().sha256 == w.sha256
    # a file named like the published one must carry the published digest
    fake = tmp_path / fid.INCEPTION_FILENAMES[0]
    fake.write_bytes(weights_file.read_bytes())
    with pytest.raises(UserError, match="damaged"):
        fid.resolve_inception_weights(fake)
    # wrong key set: refused with a one-line UserError, not a RuntimeError
    state = torch.load(weights_file, weights_only=True)
    state.pop("fc.bias")
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(UserError, match="does not hold the FID Inception-v3 weights"):
        fid.build_inception(fid.resolve_inception_weights(bad))
    with pytest.raises(UserError, match="not found"):
        fid.resolve_inception_weights(tmp_path / "missing.pth")


def test_missing_torch_fidelity_gives_install_hint(weights_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(UserError, match=r"pip install 'ddpm\[fid\]'"):
        fid.build_inception(fid.resolve_inception_weights(weights_file))


# -- statistics, cache, metrics ---------------------------------------------------------------------

def test_stats_of_a_set_against_itself_and_another(net):
    a, b = _images(3, 0), _images(3, 1, shift=60)
    sa = fid.extract_stats(net, fid.iter_batches(a, 2))
    sb = fid.extract_stats(net, fid.iter_batches(b, 3))
    assert sa.n == 3 and len(sa.features()) == 3 and torch.cat(sa.logits).shape == (3, 1008)
    mu, sigma = sa.mu_sigma()
    feats = sa.features().double().numpy()
    assert np.isfinite(feats).all() and feats.std() > 1e-3
    # streaming float64 sums equal numpy's mean/cov of the kept features
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-6 * np.abs(sigma).max())
    scale = np.trace(sigma)
    assert abs(fid.frechet_distance_from_features(sa.features(), sa.features())) < 1e-10 * scale
    d_ab = fid.frechet_distance_from_features(sa.features(), sb.features())
    assert d_ab > 1e-3 * scale
    # grayscale input is repeated to RGB
    gray = a[..., :1]
    assert fid.images_to_nchw(gray).shape == (3, 3, 32, 32)
    with pytest.raises(UserError):
        fid.images_to_nchw(a.astype(np.float32))


def test_cached_stats_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma, feats = rng.normal(size=5), np.cov(rng.normal(size=(20, 5)), rowvar=False), torch.randn(20, 5)
    path = fid.stats_cache_path(tmp_path, "cifar10-train", 50000, "ab" * 32)
    assert "cifar10-train" in path.name and "n50000" in path.name and "abababab" in path.name
    fid.save_stats(path, mu, sigma, features=feats, reference="cifar10-train", count=50000, weights_sha256="ab" * 32)
    back = fid.load_stats(path)
    np.testing.assert_array_equal(back["mu"], mu)
    np.testing.assert_array_equal(back["sigma"], sigma)
    assert torch.equal(back["features"], feats)
    assert back["meta"] == {"reference": "cifar10-train", "count": "50000", "weights_sha256": "ab" * 32}
    # a pytorch-fid style file (mu, sigma only) is read too; a file without them is refused
    np.savez(tmp_path / "plain.npz", mu=mu, sigma=sigma)
    assert fid.frechet_distance(**{k + s: v for s, d in (("1", back), ("2", fid.load_stats(tmp_path / "plain.npz")))
                                   for k, v in d.items() if k in ("mu", "sigma")}) == pytest.approx(0, abs=1e-9)
    np.savez(tmp_path / "other.npz", x=mu)
    with pytest.raises(UserError, match="mu"):
        fid.load_stats(tmp_path / "other.npz")


def test_compute_fid_with_folder_reference_cache_and_cli(net, weights_file, tmp_path, monkeypatch):
    from PIL import Image

    from ddpm.evaluation import evaluate
    from ddpm.cli.main import main

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for i, im in enumerate(_images(2, 4, shift=30)):
        Image.fromarray(im).save(ref_dir / f"{i:03d}.png")
    samples = _images(3, 5)
    np.savez(tmp_path / "samples.npz", images=samples)
    # reuse the module's network rather than building it again for every call
    monkeypatch.setattr(fid, "build_inception", lambda w, device="cpu": net)
    cache = tmp_path / "cache"
    first = evaluate.compute_fid(samples, str(ref_dir), weights=weights_file, cache=cache, device="cpu")
    assert first["reference"]["source"] == "computed" and first["reference"]["count"] == 2
    assert first["weights"]["sha256"] == fid.sha256_file(weights_file) and first["weights"]["published"] is False
    assert "warning" in first and first["num_samples"] == 3 and first["fid"] > 0
    assert {"is_mean", "kid_mean"} <= set(first)
    assert len(list(cache.glob("*.npz"))) == 1

    # The CLI on a run: samples drawn with the run's model (1-channel MNIST preset, repeated to RGB),
    # kept as RUN/eval/samples-*.npz, reference statistics read back from the cache.
    from test_evaluate import make_run

    run = make_run(tmp_path / "run", "tiny")
    rc = main(["eval", "fid", str(run), "--ref", str(ref_dir), "--num", "3", "--sampler", "ddim", "--steps", "2",
               "--batch-size", "2", "--inception-weights", str(weights_file), "--cache-dir", str(cache), "--device", "cpu"])
    reports = list((run / "eval").glob("fid-*.json"))
    assert rc == 0 and len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["reference"]["source"] == "cache" and report["num_samples"] == 3 and report["fid"] > 0
    assert report["sampler"] == "ddim" and report["steps"] == 2 and report["step"] == 2
    assert report["weights"]["file"] == str(weights_file.resolve())
    assert fid.load_npz_images(report["samples_file"]).shape == (3, 28, 28, 1)
    # the images `ddpm sample` draws with the same options (one batch here, two above)
    assert main(["sample", str(run), "--num", "3", "--sampler", "ddim", "--steps", "2", "--out", str(tmp_path / "s.npz"),
                 "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(report["samples_file"])["images"], np.load(tmp_path / "s.npz")["images"])

    # the cached statistics, used as a stats .npz reference, give the same FID
    stats_file = next(cache.glob("*.npz"))
    w = fid.resolve_inception_weights(weights_file)
    stats, info = evaluate.reference_statistics(str(stats_file), net, w)
    assert info["source"] == "stats file" and info["count"] == 2 and len(stats["features"]) == 2
    np.testing.assert_allclose(stats["mu"], stats["features"].double().mean(0).numpy(), rtol=1e-5, atol=1e-8)
    other = fid.InceptionWeights(w.path, "0" * 64, False)
    with pytest.raises(UserError, match="recompute"):
        evaluate.reference_statistics(str(stats_file), net, other)
    with pytest.raises(UserError, match="unknown FID reference"):
        evaluate.compute_fid(samples, "imagenet", weights=weights_file, device="cpu")
    with pytest.raises(UserError, match="ref-data"):
        monkeypatch.delenv(evaluate.CIFAR10_ENV, raising=False)
        evaluate.compute_fid(samples, "cifar10-train", weights=weights_file, device="cpu")


def test_cifar10_reference_feeds_the_exact_uint8_images(net, weights_file, tmp_path):
    """--ref cifar10-train reads the pickles through ddpm.data.sources and hands Inception the original
    8-bit pixels (the [-1, 1] round trip is exact); a two-batch folder written in the official format."""
    from test_data import _write_cifar

    from ddpm.evaluation import evaluate
    from ddpm.data.sources import open_source

    counts = (("data_batch_1", 1), ("data_batch_2", 1), ("test_batch", 1))
    written = _write_cifar(tmp_path / "cifar-10-batches-py", counts)
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in (1, 2)])  # (N, 3072): R, G, B planes
    original = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    with pytest.warns(UserWarning, match="training batches"):  # 2 of the 5 batches
        dataset = open_source(f"cifar10:{tmp_path}")
    fed = np.concatenate(list(fid.iter_batches(dataset, 1)))
    np.testing.assert_array_equal(fed, original)
    w = fid.resolve_inception_weights(weights_file)
    with pytest.warns(UserWarning, match="training batches"):
        stats, info = evaluate.reference_statistics("cifar10-train", net, w, ref_data=str(tmp_path),
                                                    cache=tmp_path / "c")
    assert info == {"name": "cifar10-train", "count": 2, "source": "computed", "cache": info["cache"]}
    assert "cifar10-train-n2-inception-" in info["cache"] and stats["mu"].shape == (2048,)
