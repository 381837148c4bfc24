"""Data sets: documented shapes, ranges, labels, splits; torchvision loaders on tiny fake data on disk."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gia_bench.data import (
    DATASETS,
    PHOTOS,
    DatasetSpec,
    channel_stats,
    load_dataset,
    seeded_split,
)
from gia_bench.errors import DataError, SpecError


def _pixels(ds) -> torch.Tensor:
    return torch.stack([ds.pixels(i) for i in range(len(ds))])


@pytest.mark.parametrize(
    "spec, total, classes, shape",
    [
        ("digits", 1797, 10, (3, 32, 32)),
        ("digits:channels=1", 1797, 10, (1, 32, 32)),
        ("faces", 200, 2, (3, 32, 32)),
        ("photos", 16 * len(PHOTOS), len(PHOTOS), (3, 32, 32)),
        ("photos:channels=1,size=16,grid=2", 4 * len(PHOTOS), len(PHOTOS), (1, 16, 16)),
    ],
)
def test_embedded_shapes_ranges_and_normalisation(spec, total, classes, shape):
    train, test = load_dataset(spec), load_dataset(spec, split="test")
    assert len(train) + len(test) == total
    assert len(test) == round(0.2 * total)
    assert train.spec == test.spec  # one normalisation for both splits
    assert train.spec.shape == shape and train.spec.num_classes == classes
    x, y = train[0]
    assert x.shape == shape and x.dtype == torch.float32 and isinstance(y, int)
    for ds in (train, test):
        pix = _pixels(ds)
        assert pix.min() >= 0.0 and pix.max() <= 1.0
        assert pix.max() - pix.min() > 0.5  # real images, not a flat or rescaled tensor
        assert set(ds.labels.tolist()) <= set(range(classes))
    # mean/std come from the training split: its model inputs are standardised per channel
    mean, std = channel_stats(_pixels(train))
    assert train.spec.mean == pytest.approx(mean) and train.spec.std == pytest.approx(std)
    inputs, _ = train.batch(range(len(train)))
    assert inputs.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (inputs.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    assert torch.allclose(train.spec.denormalize(inputs), _pixels(train), atol=1e-6)


def test_digits_is_sklearn_upsampled_and_split_is_seeded_and_disjoint():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train = load_dataset("digits:channels=1")
    idx = seeded_split(1797, "train")
    test_idx = seeded_split(1797, "test")
    assert set(idx.tolist()).isdisjoint(test_idx.tolist()) and len(idx) + len(test_idx) == 1797
    ref = torch.from_numpy(raw.images[idx.numpy()]).float().unsqueeze(1) / 16
    ref = F.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    assert torch.allclose(train.images01, ref, atol=1e-6)
    assert torch.equal(train.labels, torch.from_numpy(raw.target[idx.numpy()]))
    # channels=3 repeats the gray channel; the loader's `channels` overrides the spec's
    rgb = load_dataset("digits:channels=1", channels=3)
    assert rgb.spec.shape == (3, 32, 32) and rgb.spec.name == "digits:channels=3,size=32"
    assert torch.equal(rgb.images01, train.images01.expand(-1, 3, -1, -1))
    # the split is a fixed property of the data set: loading again gives the same tensors
    assert torch.equal(load_dataset("digits:channels=1").images01, train.images01)


def test_faces_labels_follow_lfw_subset_order():
    import skimage.data

    faces = skimage.data.lfw_subset()
    ds = load_dataset("faces:channels=1,size=25")  # native size: no resampling
    idx = seeded_split(200, "train")
    assert torch.allclose(ds.images01[:, 0], torch.from_numpy(faces[idx.numpy()]).float())
    assert torch.equal(ds.labels, (idx < 100).long())  # the first 100 are faces (label 1)


def test_photos_patches_tile_the_photo():
    import skimage.data

    ds = load_dataset("photos:grid=2,size=32")
    all_ = torch.cat([ds.images01, load_dataset("photos:grid=2,size=32", split="test").images01])
    # patch labels: one class per photo, grid*grid patches each
    labels = torch.cat([ds.labels, load_dataset("photos:grid=2,size=32", split="test").labels])
    assert torch.bincount(labels, minlength=len(PHOTOS)).tolist() == [4] * len(PHOTOS)
    # the camera photo (gray, 512x512) resized to 64x64 and cut in 4: each patch is in the data set
    cam = torch.from_numpy(skimage.data.camera()).float().div(255)[None, None]
    cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    for r in range(2):
        for c in range(2):
            patch = cam[0, :, 32 * r : 32 * r + 32, 32 * c : 32 * c + 32].expand(3, -1, -1)
            assert (all_ - patch).abs().amax(dim=(1, 2, 3)).min() < 1e-6


def test_bad_dataset_specs():
    with pytest.raises(SpecError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(SpecError, match="channels must be 1 or 3"):
        load_dataset("digits:channels=2")
    with pytest.raises(SpecError, match="unknown parameter 'root'"):
        load_dataset("cifar10:root=/tmp")  # the root is a loader argument, not part of the spec
    with pytest.raises(DataError, match="split"):
        load_dataset("faces", split="val")


def test_every_registered_dataset_documents_its_params():
    from gia_bench.registry import describe_params

    for name, cls in DATASETS.items():
        params = {p.name: p for p in describe_params(cls)}
        key = "tokenizer" if getattr(cls, "modality", "image") == "text" else "channels"  # gia_bench.text.data
        assert key in params and params[key].help, name


# -- torchvision loaders on fake files --------------------------------------------------------


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                     ("mnist", "MNIST/raw"), ("fashionmnist", "FashionMNIST/raw")]
)
def test_missing_torchvision_data_names_the_expected_path(tmp_path, name, folder):
    with pytest.raises(DataError, match="--data-root"):
        load_dataset(name)
    with pytest.raises(DataError) as exc:
        load_dataset(name, root=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / folder) in msg and "--download" in msg


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The big-endian IDX format of the MNIST files (magic: 0, 0, type 0x08 = ubyte, ndim)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, cls_folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_like_from_fake_idx_files(tmp_path, name, cls_folder):
    raw = tmp_path / cls_folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    train = load_dataset(name, root=tmp_path)
    test = load_dataset(f"{name}:channels=1", root=tmp_path, split="test")
    assert len(train) == 6 and len(test) == 3
    x, y = train[4]
    assert x.shape == (3, 32, 32) and y == 4 and train.spec.num_classes == 10
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray repeated
    assert test.spec.shape == (1, 32, 32) and len(test.spec.mean) == 1
    p = test.pixels(0)
    assert 0.0 <= float(p.min()) and float(p.max()) <= 1.0
    inputs, labels = train.batch([0, 5])
    assert inputs.shape == (2, 3, 32, 32) and labels.tolist() == [0, 5]


def test_cifar10_from_fake_batches(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # the real archives are checked against their MD5; our tiny fakes cannot match it
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).exists())
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n in names:
        data = rng.integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / n, "wb") as fh:
            pickle.dump({"data": data, "labels": [1, 7]}, fh)  # torchvision's own format (a pickle)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    train = load_dataset("cifar10", root=tmp_path)
    assert len(train) == 10 and train.spec.shape == (3, 32, 32) and train.spec.num_classes == 10
    x, y = train[1]
    assert y == 7 and x.shape == (3, 32, 32)
    # native size: pixels are the stored bytes / 255, exactly
    with open(folder / "data_batch_1", "rb") as fh:
        first = pickle.load(fh)["data"][1].reshape(3, 32, 32)
    assert torch.allclose(train.pixels(1), torch.from_numpy(first).float() / 255, atol=1e-6)
    assert torch.allclose(train.spec.denormalize(x), train.pixels(1), atol=1e-6)
    gray = load_dataset("cifar10:channels=1,size=16", root=tmp_path, split="test")
    assert len(gray) == 2 and gray[0][0].shape == (1, 16, 16)


def _png(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "1":
        img = Image.fromarray(rng.integers(0, 2, (h, w), dtype=np.uint8) * 255).convert("1")
    elif mode in ("L", "P"):
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert(mode)
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_imagefolder_train_test_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", (40, 30), "RGB", i)
    train = load_dataset("imagefolder", root=tmp_path)
    test = load_dataset("imagefolder:channels=1,size=24", root=tmp_path, split="test")
    assert len(train) == 6 and len(test) == 4 and train.spec.num_classes == 2
    assert train[0][0].shape == (3, 32, 32) and test[0][0].shape == (1, 24, 24)
    assert [train.label(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("imagefolder")
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset("imagefolder", root=tmp_path / "missing")
    with pytest.raises(DataError, match="one sub-folder of images per class"):
        load_dataset("imagefolder", root=tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = load_dataset("imagefolder", root=tmp_path, split="train")
    with pytest.raises(DataError, match="broken.png"):
        ds[0]


_MODES = st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "I;16"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    images=st.lists(
        st.tuples(st.integers(1, 70), st.integers(1, 70), _MODES, st.integers(0, 1)), min_size=5, max_size=10
    ),
    channels=st.sampled_from([1, 3]),
    size=st.sampled_from([8, 32]),
)
def test_imagefolder_fuzz_any_size_and_mode(tmp_path_factory, images, channels, size):
    root = tmp_path_factory.mktemp("folder")
    for i, (w, h, mode, cls) in enumerate(images):
        _png(root / f"class{cls}" / f"{i:03d}.png", (w, h), mode, i)
    classes = len({c for *_, c in images})
    n = len(images)
    train = load_dataset(f"imagefolder:channels={channels},size={size}", root=root)
    test = load_dataset(f"imagefolder:channels={channels},size={size}", root=root, split="test")
    assert len(train) + len(test) == n and len(test) == round(0.2 * n)
    assert train.spec.num_classes == classes
    for ds in (train, test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (channels, size, size) and 0 <= y < classes
            p = ds.pixels(i)
            assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0 and bool(torch.isfinite(x).all())


def test_dataset_spec_json_round_trip():
    spec = load_dataset("faces").spec
    assert DatasetSpec.from_json(spec.to_json()) == spec
