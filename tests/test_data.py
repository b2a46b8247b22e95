"""Data sources: bundled MNIST (checksums), CIFAR-10 pickles, folders, npz, toy sets, errors.

Every file format is built here in tmp_path; nothing is downloaded (the CIFAR-10 download path
runs against a local file:// archive).
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import data, readers
from ddpm.data import TOY_SETS, open_source, toy_log_density, toy_sample
from ddpm.errors import UserError

MNIST_DIR = readers._bundled_mnist_dir()


# -- MNIST ----------------------------------------------------------------------------------------

def test_mnist_train_loads_in_range_with_labels():
    source = open_source("mnist")
    assert len(source) == 60000 and source.shape == (1, 28, 28) and source.kind == "image"
    batch = source.get_batch(torch.arange(0, 60000, 97))
    assert batch.dtype == torch.float32 and batch.shape[1:] == (1, 28, 28)
    assert batch.min() == -1.0 and batch.max() == 1.0
    assert torch.equal(source[5], source.get_batch([5])[0])
    # The canonical first training labels of MNIST.
    assert source.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(source.labels).tolist()[:2] == [5923, 6742]


def test_mnist_test_split_padding_and_channels():
    plain = open_source("mnist:test")
    assert len(plain) == 10000 and plain.name == "mnist:test"
    padded = open_source("mnist", split="test", image_size=32, channels=3)
    assert padded.shape == (3, 32, 32)
    x, y = plain[7], padded[7]
    # 32 = 2 + 28 + 2 of background (-1) around the unchanged digit, grey repeated over RGB.
    assert torch.equal(y[:, 2:30, 2:30], x.expand(3, -1, -1))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (y[:, border] == -1).all()
    resized = open_source("mnist:test", image_size=14)
    assert resized.shape == (1, 14, 14) and -1 <= resized[0].min() and resized[0].max() <= 1


def _copy_mnist_test(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    for name in ("SHA256SUMS", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(MNIST_DIR / name, root / name)
    return root


def test_mnist_copy_verifies_and_matches_bundled(tmp_path):
    root = _copy_mnist_test(tmp_path)
    images, labels = data.load_mnist("test", root=root)
    bundled_images, bundled_labels = data.load_mnist("test")
    assert torch.equal(images, bundled_images) and torch.equal(labels, bundled_labels)


def test_mnist_corrupted_copy_is_refused(tmp_path):
    root = _copy_mnist_test(tmp_path)
    path = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: a valid gzip, a wrong SHA-256
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz fails its SHA-256 check"):
        data.load_mnist("test", root=root)


def test_mnist_truncated_or_missing_files(tmp_path):
    root = _copy_mnist_test(tmp_path)
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is damaged"):
        data.load_mnist("test", root=root)
    path.unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is missing"):
        data.load_mnist("test", root=root)
    with pytest.raises(UserError, match="split 'valid' unknown"):
        data.load_mnist("valid")


# -- CIFAR-10 -------------------------------------------------------------------------------------

def _write_cifar(folder, counts=(("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 5))):
    """A small cifar-10-batches-py folder in the official format; returns {name: (data, labels)}."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in counts:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        written[name] = (batch[b"data"], batch[b"labels"])
    return written


def test_cifar10_pickles_round_trip(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    for spec in (f"cifar10:{tmp_path}", f"cifar10:{tmp_path / 'cifar-10-batches-py'}"):
        with pytest.warns(UserWarning, match="2 training batches"):
            source = open_source(spec, download=False)
        assert len(source) == 10 and source.shape == (3, 32, 32)
        expected = np.concatenate([written["data_batch_1"][0], written["data_batch_2"][0]])
        # Row layout: 1024 red, 1024 green, 1024 blue values, each 32 x 32 row-major.
        pixel = expected[7].reshape(3, 32, 32)[:, 5, 9]
        assert torch.allclose(source[7][:, 5, 9], torch.tensor(pixel / 127.5 - 1, dtype=torch.float32))
        assert source.labels.tolist() == written["data_batch_1"][1] + written["data_batch_2"][1]
    test = open_source(f"cifar10:{tmp_path}", split="test", image_size=16, channels=1)
    assert len(test) == 5 and test.shape == (1, 16, 16)


def test_cifar10_offline_message_and_refused_pickle(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"CIFAR-10 not found in .*empty \(downloads disabled\).*"
                                        r"cifar-10-python.tar.gz"):
        open_source(f"cifar10:{empty}", download=False)

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(UserError, match="the download failed \\(network is unreachable\\)"):
        open_source(f"cifar10:{empty}", download=True)
    assert list(empty.iterdir()) == []  # no partial archive left behind

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(empty),))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(UserError, match="refusing to load shutil.rmtree"), pytest.warns(UserWarning):
        open_source(f"cifar10:{bad}", download=False)
    assert empty.exists()


def test_cifar10_download_verifies_md5(tmp_path, monkeypatch):
    written = _write_cifar(tmp_path / "src" / "cifar-10-batches-py",
                           (("data_batch_1", 3), ("test_batch", 2)))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(readers, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(readers, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(UserError, match="has md5"):
        open_source(f"cifar10:{tmp_path / 'dl'}", download=True)
    assert not (tmp_path / "dl" / "cifar-10-batches-py").exists()
    monkeypatch.setattr(readers, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.warns(UserWarning):
        source = open_source(f"cifar10:{tmp_path / 'dl'}", download=True)
    assert len(source) == 3 and source.labels.tolist() == written["data_batch_1"][1]


# -- folders --------------------------------------------------------------------------------------

def test_folder_rgb_and_grey_non_square(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    # a.png: 40 wide x 20 high, red = 5 * column: the centre crop to 20 keeps columns 10..29.
    ramp = np.zeros((20, 40, 3), np.uint8)
    ramp[..., 0] = (np.arange(40) * 5)[None, :]
    ramp[..., 1] = 200
    Image.fromarray(ramp).save(root / "a.png")
    Image.new("L", (30, 50), 77).save(root / "sub" / "b.JPG", quality=95)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(root / "sub" / "c.jpeg")
    (root / "notes.txt").write_text("not an image")

    source = open_source(f"folder:{root}")  # size and channels from a.png: 20, RGB
    assert len(source) == 3 and source.shape == (3, 20, 20)
    first = source[0]
    assert torch.allclose(first[0, 3], torch.tensor((np.arange(10, 30) * 5) / 127.5 - 1, dtype=torch.float32),
                          atol=1e-6, rtol=0)
    assert (first[1] == 200 / 127.5 - 1).all()
    grey = source[1]  # a grey JPEG converted to RGB, resized 30 -> 20 on the shorter side
    assert grey.shape == (3, 20, 20) and torch.allclose(grey, torch.full_like(grey, 77 / 127.5 - 1), atol=0.02)
    small = open_source(f"folder:{root}", image_size=8, channels=1)
    assert small.shape == (1, 8, 8) and small.get_batch([0, 1, 2]).shape == (3, 1, 8, 8)
    assert torch.allclose(small[2], torch.full((1, 8, 8), (0.299 * 10 + 0.587 * 20 + 0.114 * 30) / 127.5 - 1),
                          atol=0.02)


def test_folder_grey_default_and_bad_files(tmp_path):
    root = tmp_path / "grey"
    root.mkdir()
    Image.new("L", (12, 10), 255).save(root / "a.png")
    source = open_source(f"folder:{root}")
    assert source.shape == (1, 10, 10) and (source[0] == 1).all()
    (root / "b.png").write_bytes(b"not a png")
    source = open_source(f"folder:{root}")
    with pytest.raises(UserError, match="cannot read image .*b.png"):
        source[1]


# -- npz ------------------------------------------------------------------------------------------

def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", images=images, other=np.zeros(3))
    source = open_source(f"npz:{tmp_path / 'u8.npz'}")
    assert source.shape == (3, 6, 5) and len(source) == 4
    assert torch.allclose(source[2], torch.tensor(images[2].transpose(2, 0, 1) / 127.5 - 1, dtype=torch.float32),
                          atol=1e-6, rtol=0)
    np.savez(tmp_path / "grey.npz", images[..., 0])  # the only array, (N, H, W)
    assert open_source(f"npz:{tmp_path / 'grey.npz'}", image_size=5).shape == (1, 5, 5)
    unit = rng.random((2, 4, 4, 1)).astype(np.float32)
    np.savez(tmp_path / "unit.npz", images=unit)
    assert torch.allclose(open_source(f"npz:{tmp_path / 'unit.npz'}")[1][0], torch.tensor(unit[1, ..., 0] * 2 - 1))
    signed = unit * 2 - 1
    signed[0, 0, 0, 0] = -1.0
    np.savez(tmp_path / "signed.npz", images=signed)
    assert torch.allclose(open_source(f"npz:{tmp_path / 'signed.npz'}")[0][0], torch.tensor(signed[0, ..., 0]))


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.full((2, 4, 4, 3), 1.5, np.float32)}, "must be finite and lie in"),
    ({"images": np.zeros((2, 3, 4, 4), np.uint8)}, "expected \\(N, H, W\\)"),
    ({"images": np.zeros((2, 4, 4), np.int32)}, "dtype int32"),
    ({"a": np.zeros((2, 4, 4), np.uint8), "b": np.zeros(2)}, "name the images array 'images'"),
])
def test_npz_invalid(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=message):
        open_source(f"npz:{tmp_path / 'bad.npz'}")


# -- toy sets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TOY_SETS)
def test_toy_sets_fixed_and_standardized(name):
    source = open_source(f"toy:{name}")
    assert source.kind == "toy" and source.shape == (2,) and len(source) == 100_000
    assert torch.equal(source.get_batch([0, 1, 2]), open_source(f"toy:{name}").points[:3])
    points = source.points.double()
    assert points.mean(0).abs().max() < 0.02
    assert abs(points.var(0).mean() - 1) < 0.02
    g = torch.Generator().manual_seed(3)
    fresh = toy_sample(name, 1000, g)
    assert fresh.shape == (1000, 2) and fresh.dtype == torch.float32
    assert torch.equal(fresh, toy_sample(name, 1000, torch.Generator().manual_seed(3)))
    assert not torch.equal(fresh, source.points[:1000])


# The checkerboard's density jumps at cell edges: the midpoint rule errs by O(step) there.
@pytest.mark.parametrize("name, tol", [("gaussian_mixture", 1e-6), ("checkerboard", 5e-3)])
def test_toy_density_integrates_to_one_and_covers_samples(name, tol):
    step = 0.01
    axis = torch.arange(-3, 3, step, dtype=torch.float64) + step / 2
    grid = torch.cartesian_prod(axis, axis)
    mass = toy_log_density(name, grid).exp().sum() * step**2
    assert abs(mass - 1) < tol
    samples = toy_sample(name, 20000, torch.Generator().manual_seed(0))
    assert torch.isfinite(toy_log_density(name, samples)).all()


def test_toy_known_density_values():
    scale = np.sqrt(4 / 3)  # each axis of the raw board is uniform on [-2, 2]
    # Board cell (2, 2) is black ((i + j) even), cell (1, 2) white; density 1 / 6 after scaling.
    inside, outside = (0.5 / scale, 0.5 / scale), (-0.5 / scale, 0.5 / scale)
    values = toy_log_density("checkerboard", torch.tensor([inside, outside, (10.0, 0.0)]))
    assert values[0] == pytest.approx(np.log(1 / 6)) and torch.isinf(values[1:]).all()
    # At a component mean the other seven components are negligible: log(1/8 * 1/(2 pi s^2)).
    s = np.sqrt(2.01)
    mean = torch.tensor([[2.0 / s, 0.0]])
    std = 0.1 / s
    assert toy_log_density("gaussian_mixture", mean).item() == pytest.approx(
        np.log(1 / 8 / (2 * np.pi * std**2)), rel=1e-9)
    # Mass within radius 2 std of each mean: 1 - exp(-2) by the Rayleigh law, compare to samples.
    x = toy_sample("gaussian_mixture", 40000, torch.Generator().manual_seed(1)).double()
    radius = torch.linalg.norm(x, dim=1)
    near = ((radius - 2.0 / s).abs() < 4 * std).float().mean()
    assert near > 0.999
    with pytest.raises(UserError, match="no closed-form density"):
        toy_log_density("two_moons", mean)


# -- errors ---------------------------------------------------------------------------------------

def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="unknown data source 'imagenet:x'; use one of mnist, cifar10:DIR"):
        open_source("imagenet:x")
    with pytest.raises(UserError, match=f"image folder {tmp_path / 'nope'} does not exist"):
        open_source(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(UserError, match=f"npz file {tmp_path / 'x.npz'} does not exist"):
        open_source(f"npz:{tmp_path / 'x.npz'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no images found in .*empty \(looked for .png, .jpg, .jpeg\)"):
        open_source(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(UserError, match="unknown toy set 'spiral'; choose one of gaussian_mixture"):
        open_source("toy:spiral")
    with pytest.raises(UserError, match="channels must be 1 or 3"):
        open_source("mnist", channels=2)
    with pytest.raises(UserError, match="image_size must be a positive integer"):
        open_source("mnist", image_size=0)

