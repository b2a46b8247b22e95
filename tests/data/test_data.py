"""Data sources: bundled MNIST (checksums), CIFAR-10 pickles, folders, npz, toy sets, errors.

Every file format is built here in tmp_path; nothing is downloaded (the CIFAR-10 download path
runs against a local file:// archive).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import sources as data, readers
from ddpm.data.sources import TOY_SETS, open_source, require_labels, toy_log_density, toy_sample
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
    with pytest.raises(UserError, match="cannot read image .*b.png: not an image file"):
        open_source(f"folder:{root}")  # every file is checked when the source opens (issue 23)


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
    ({"images": np.zeros((2, 3, 5, 5), np.uint8)}, "expected \\(N, H, W\\)"),  # NCHW
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
    with pytest.raises(UserError, match="channels must be 1, 3 or 4"):
        open_source("mnist", channels=2)
    with pytest.raises(UserError, match="image_size must be a positive integer"):
        open_source("mnist", image_size=0)



# -- labels ---------------------------------------------------------------------------------------

def test_bundled_sets_carry_labels_and_class_names(tmp_path):
    mnist = open_source("mnist:test")
    assert mnist.class_names == [str(d) for d in range(10)] and require_labels(mnist) == 10
    assert torch.equal(mnist.get_batch_labels([7, 0, 3]), mnist.labels[[7, 0, 3]])
    _write_cifar(tmp_path / "c", (("test_batch", 3),))
    cifar = open_source(f"cifar10:{tmp_path / 'c'}", split="test", download=False)
    assert cifar.class_names[:3] == ["airplane", "automobile", "bird"] and cifar.class_names[-1] == "truck"
    assert require_labels(cifar) == 10
    toy = open_source("toy:two_moons")
    assert toy.labels is None and toy.class_names is None
    with pytest.raises(UserError, match=r"^data source toy:two_moons has no labels; a class-conditional run needs"):
        toy.get_batch_labels([0])


def test_folder_classes_are_top_level_sub_folders(tmp_path):
    root = tmp_path / "pets"
    for rel, value in (("dog/c.png", 200), ("cat/a.png", 100), ("cat/deep/b.png", 50)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (6, 4), value).save(root / rel)
    (root / "emu").mkdir()  # no images: not a class
    source = open_source(f"folder:{root}")
    assert source.class_names == ["cat", "dog"] and source.labels.tolist() == [0, 0, 1]
    assert source.get_batch_labels(torch.tensor([2, 1])).tolist() == [1, 0] and require_labels(source) == 2
    assert torch.allclose(source[2], torch.full((1, 4, 4), 200 / 127.5 - 1))
    Image.new("L", (6, 4), 0).save(root / "loose.png")  # an image outside every class folder
    unlabelled = open_source(f"folder:{root}")
    assert unlabelled.labels is None and unlabelled.class_names is None and len(unlabelled) == 4
    with pytest.raises(UserError, match=f"data source folder:{root} has no labels"):
        require_labels(unlabelled)


def test_npz_labels_and_class_names(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    np.savez(tmp_path / "named.npz", images=images, labels=np.array([2, 0, 1]), class_names=np.array(["a", "b", "c"]))
    named = open_source(f"npz:{tmp_path / 'named.npz'}")
    assert named.labels.tolist() == [2, 0, 1] and named.labels.dtype == torch.long
    assert named.class_names == ["a", "b", "c"] and require_labels(named) == 3
    np.savez(tmp_path / "bare.npz", x=images, labels=np.array([1, 1, 0], np.uint8))  # images not named 'images'
    bare = open_source(f"npz:{tmp_path / 'bare.npz'}")
    assert bare.class_names is None and require_labels(bare) == 2 and bare.shape == (1, 4, 4)
    assert open_source(f"npz:{tmp_path / 'bare.npz'}", image_size=2).get_batch_labels([2]).tolist() == [0]


@pytest.mark.parametrize("extra, message", [
    ({"labels": np.array([0.0, 1.0, 1.0])}, "labels must be integers, got dtype float64"),
    ({"labels": np.array([0, 1])}, r"labels have shape \(2,\), expected \(3,\)"),
    ({"labels": np.array([0, -1, 1])}, "labels must be >= 0, found -1"),
    ({"class_names": np.array(["a"])}, "class_names must be a 1-D array of strings beside a 'labels' array"),
    ({"labels": np.array([0, 2, 1]), "class_names": np.array(["a", "b"])}, "label 2 has no class name"),
])
def test_npz_bad_labels(tmp_path, extra, message):
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 4, 4), np.uint8), **extra)
    with pytest.raises(UserError, match=message):
        open_source(f"npz:{tmp_path / 'bad.npz'}")


# -- channels and non-square sizes ----------------------------------------------------------------

def test_four_channels_kept_added_and_dropped(tmp_path):
    rgba = np.random.default_rng(2).integers(0, 256, (2, 5, 7, 4), dtype=np.uint8)
    np.savez(tmp_path / "rgba.npz", images=rgba)
    spec = f"npz:{tmp_path / 'rgba.npz'}"
    kept = open_source(spec)
    assert kept.shape == (4, 5, 7) and torch.equal(kept.images, torch.from_numpy(rgba.transpose(0, 3, 1, 2)))
    assert torch.equal(open_source(spec, channels=3).images, kept.images[:, :3])  # alpha dropped
    luma = (rgba[..., :3] * np.array([0.299, 0.587, 0.114])).sum(-1)
    assert np.abs(open_source(spec, channels=1).images[:, 0].numpy() - luma).max() <= 0.5 + 1e-6
    np.savez(tmp_path / "rgb.npz", images=rgba[..., :3])
    opaque = open_source(f"npz:{tmp_path / 'rgb.npz'}", channels=4)
    assert torch.equal(opaque.images[:, :3], kept.images[:, :3]) and (opaque.images[:, 3] == 255).all()
    assert (open_source("mnist:test", channels=4)[0][3] == 1).all()  # float [-1, 1]: opaque is 1
    unit = np.random.default_rng(3).random((2, 3, 3, 3)).astype(np.float32)
    np.savez(tmp_path / "unit.npz", images=unit)
    assert (open_source(f"npz:{tmp_path / 'unit.npz'}", channels=4).images[:, 3] == 1).all()

    Image.fromarray(rgba[0]).save(tmp_path / "a.png")  # an RGBA PNG in a folder
    folder = open_source(f"folder:{tmp_path}", channels=4)
    assert folder.shape == (4, 5, 5)
    assert torch.equal(folder[0], kept[0][:, :, 1:6])  # centre crop of the 7 columns
    assert open_source(f"folder:{tmp_path}").shape == (3, 5, 5)  # default: RGB, as before


def test_non_square_sizes_crop_and_pad(tmp_path):
    ramp = np.broadcast_to((np.arange(20) * 10).astype(np.uint8)[None, None, :, None], (2, 10, 20, 3)).copy()
    np.savez(tmp_path / "wide.npz", images=ramp)
    spec = f"npz:{tmp_path / 'wide.npz'}"
    crop = open_source(spec, image_size=(10, 12))  # height fits: only the centre 12 columns are kept
    assert crop.shape == (3, 10, 12) and torch.equal(crop.images[0, 0, 0], torch.arange(4, 16, dtype=torch.uint8) * 10)
    assert open_source(spec, image_size=[5, 6]).shape == (3, 5, 6)  # halved to 5 x 10, then cropped
    assert open_source(spec, image_size=4).shape == (3, 4, 4)
    Image.fromarray(ramp[0]).save(tmp_path / "w.png")
    Image.fromarray(ramp[0, :, :12]).save(tmp_path / "v.png")  # mixed sizes in one folder
    folder = open_source(f"folder:{tmp_path}", image_size=(10, 12))
    assert folder.shape == (3, 10, 12) and torch.equal(folder[1], crop[0])  # sorted: v.png, w.png
    assert torch.equal(folder[0][0, 0], torch.arange(0, 12, dtype=torch.float32) * 10 / 127.5 - 1)
    plain, padded = open_source("mnist:test"), open_source("mnist:test", image_size=(28, 32))
    assert padded.shape == (1, 28, 32) and torch.equal(padded[3][:, :, 2:30], plain[3])
    for bad in ((0, 3), (3,), (2, 3, 4), 2.5):
        with pytest.raises(UserError, match="image_size must be a positive integer or a pair"):
            open_source(spec, image_size=bad)


def test_unet_takes_height_and_width_and_int_configs_stay_as_they_were():
    from dataclasses import replace

    from ddpm.config import item_shape
    from ddpm.config import TrainConfig
    from ddpm.nets.unet import UNet, UNetConfig

    square = UNetConfig(in_channels=3, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.0, norm_groups=4)
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 50])
    nets = []
    for config in (square, replace(square, image_size=(8, 8))):
        torch.manual_seed(0)
        nets.append(UNet(config).eval())
        for p in nets[-1].parameters():  # zero-initialised layers would hide a difference
            p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    with torch.no_grad():
        assert torch.equal(nets[0](x, t), nets[1](x, t))
    assert json.loads(TrainConfig(model=square).to_json())["model"]["image_size"] == 8  # an int stays an int
    wide = replace(square, image_size=[8, 16])
    saved = json.loads(TrainConfig(model=wide).to_json())
    assert saved["model"]["image_size"] == [8, 16] and TrainConfig.from_dict(saved).model == wide
    assert wide.hw == (8, 16) and wide.resolutions == (8, 4) and item_shape(TrainConfig(model=wide)) == (3, 8, 16)
    net = UNet(wide)
    assert len(net.down[1].attn) == 1  # attention at the level whose shorter side is 4: (4, 8)
    assert net(torch.randn(2, 3, 8, 16), t).shape == (2, 3, 8, 16)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 3, 8, 16\)"):
        net(x, t)
    with pytest.raises(ValueError, match=r"image_size=\(8, 10\) must be divisible by 2\*\*\(len\(ch_mult\)-1\)=4"):
        replace(square, image_size=(8, 10), ch_mult=(1, 2, 2))


def test_train_and_sample_non_square_rgba_and_rgb_end_to_end(tmp_path, capsys):
    from ddpm import load
    from ddpm.cli.main import main

    rng = np.random.default_rng(4)
    icons = tmp_path / "icons"
    for k, cls in enumerate(("b", "a")):
        (icons / cls).mkdir(parents=True)
        for i in range(3):  # mixed sizes, resized and cropped to 8 x 16
            Image.fromarray(rng.integers(0, 256, (10 + 4 * i, 20 + 2 * i, 4), dtype=np.uint8)).save(icons / cls / f"{i}.png")
    run = tmp_path / "rgba"
    argv = ["train", "--preset", "tiny", "--no-progress", "--steps", "3", "--out", str(run)]
    assert main([*argv, "--data", f"folder:{icons}", "--image-size", "8x16", "--channels", "4"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["image_size"] == config["data"]["image_size"] == [8, 16]
    assert config["model"]["in_channels"] == config["model"]["out_channels"] == config["data"]["channels"] == 4
    with Image.open(run / "samples" / "final.png") as preview:
        assert preview.mode == "RGBA"
    assert main(["sample", str(run), "--num", "3", "--steps", "2", "--out", str(tmp_path / "rgba.npz")]) == 0
    assert np.load(tmp_path / "rgba.npz")["images"].shape == (3, 8, 16, 4)

    np.savez(tmp_path / "tall.npz", images=rng.integers(0, 256, (6, 16, 12, 3), dtype=np.uint8))
    run = tmp_path / "rgb"
    argv[-1] = str(run)
    assert main([*argv, "--data", f"npz:{tmp_path / 'tall.npz'}", "--image-size", "12x8", "--channels", "3"]) == 0
    assert load(run).shape == (3, 12, 8)
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "rgb.npz")]) == 0
    assert np.load(tmp_path / "rgb.npz")["images"].shape == (2, 12, 8, 3)
    capsys.readouterr()
    assert main([*argv, "--image-size", "12x"]) == 2
    assert "expected S or HxW (positive integers), got '12x'" in capsys.readouterr().err
