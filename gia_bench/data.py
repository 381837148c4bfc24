"""Data sets: the embedded offline ones (digits, faces, photos) and torchvision's.

Every data set carries a :class:`DatasetSpec` (shape, classes, normalisation) that
travels into gradient records, so that an attacker and the metrics know how pixels
map to model inputs without ever seeing the data.

One call loads any of them::

    ds = load_dataset("digits:channels=3", split="train")     # offline, ships with scikit-learn
    ds = load_dataset("cifar10", root="~/data", split="test")  # torchvision, from --data-root
    x, y = ds[0]                  # model input (normalised, C x H x W) and int label
    ds.spec                       # DatasetSpec: name (canonical spec), shape, classes, mean/std

Embedded (offline) data sets, images in [0, 1] before normalisation:

* ``digits``: scikit-learn's 1,797 digits, 8x8 values 0..16 -> /16 -> bilinear upsampling.
* ``faces``: scikit-image's ``lfw_subset``, 100 faces (label 1) then 100 non-faces (0), 25x25.
* ``photos``: ``grid x grid`` patches of each of 10 scikit-image sample photos; label = photo.

They are split once into train / test (80 / 20) by a permutation seeded with
:data:`SPLIT_SEED`, and normalised with the per-channel mean/std of their training
split. torchvision's CIFAR-10/100, MNIST and Fashion-MNIST use their published
training-set statistics, an ImageFolder ImageNet's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms

from gia_bench.errors import DataError
from gia_bench.registry import Range, Registry, canonical_spec
from gia_bench.specs import DatasetSpec  # what travels into records (defined with ModelSpec)


def channel_stats(images01: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of an (N, C, H, W) tensor in [0, 1]."""
    mean = images01.mean(dim=(0, 2, 3))
    std = images01.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# -- data sets -----------------------------------------------------------------------------------
#
# A registered data set is a small parameter object (``digits:channels=1``) whose
# ``load(split, root, download)`` returns an :class:`ImageDataset`: a torch Dataset of
# (model input, label) pairs that carries its :class:`DatasetSpec`. Where the files
# live (``--data-root``) and whether to download them are arguments of ``load``,
# not of the spec: the spec names *what* the data is, and travels into records.

DATASETS: Registry[DataSource] = Registry("dataset", entry_point_group="gia_bench.datasets", base=lambda: DataSource)

SPLITS = ("train", "test")
#: Embedded data sets are split once, with this seed, into train / test.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


class ImageDataset(Dataset):
    """(model input, label) pairs: images in [0, 1] normalised by ``spec``; labels are ints.

    ``pixels(i)`` gives the image in [0, 1] (before normalisation); ``batch(indices)``
    stacks model inputs and labels as a worker's batch.
    """

    spec: DatasetSpec
    split: str

    def __len__(self) -> int:
        raise NotImplementedError

    def pixels(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.spec.normalize(self.pixels(index)), self.label(index)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model inputs (B, C, H, W) and labels (B,) of ``indices``."""
        inputs = torch.stack([self.pixels(int(i)) for i in indices])
        labels = torch.tensor([self.label(int(i)) for i in indices], dtype=torch.int64)
        return self.spec.normalize(inputs), labels


class TensorImageDataset(ImageDataset):
    """An in-memory data set: ``images01`` (N, C, H, W) float32 in [0, 1] and ``labels`` (N,)."""

    def __init__(self, images01: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, split: str) -> None:
        self.images01 = images01
        self.labels = labels.to(torch.int64)
        self.spec = spec
        self.split = split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def pixels(self, index: int) -> torch.Tensor:
        return self.images01[index]

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        return self.spec.normalize(self.images01[idx]), self.labels[idx]


def _convert_mode(image, mode: str):
    """PIL image -> ``mode`` ("L" or "RGB"); a module-level function so DataLoader workers can pickle it."""
    return image.convert(mode)


class PILImageDataset(ImageDataset):
    """A torchvision data set of PIL images, converted to ``spec``'s channels and size on access.

    ``indices`` selects a subset (the seeded split of a single ImageFolder).
    """

    def __init__(
        self,
        base: Dataset,
        spec: DatasetSpec,
        split: str,
        indices: Sequence[int] | None = None,
        describe: Callable[[int], str] | None = None,
    ) -> None:
        self.base = base
        self.spec = spec
        self.split = split
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]
        self._describe = describe
        channels, size = spec.shape[0], spec.shape[1]
        self._transform = transforms.Compose(
            [
                transforms.Lambda(functools.partial(_convert_mode, mode="L" if channels == 1 else "RGB")),
                # shorter side to `size`, then the centre: keeps the aspect ratio (as torchvision's presets)
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
            ]
        )
        self._cache: tuple[int, torch.Tensor, int] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, index: int) -> tuple[torch.Tensor, int]:
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1], self._cache[2]
        try:
            image, label = self.base[self.indices[index]]
            pixels = self._transform(image)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL reports broken files with these
            what = self._describe(self.indices[index]) if self._describe else f"item {index}"
            raise DataError(f"dataset {self.spec.name}: cannot read {what} ({exc})") from exc
        self._cache = (index, pixels, int(label))
        return pixels, int(label)

    def pixels(self, index: int) -> torch.Tensor:
        return self._item(index)[0]

    def label(self, index: int) -> int:
        return self._item(index)[1]


class DataSource:
    """Base of the registered data sets: spec parameters in ``__init__``, files in :meth:`load`."""

    registry_name: ClassVar[str]

    def load(self, split: str = "train", root: Path | None = None, download: bool = False) -> ImageDataset:
        raise NotImplementedError

    @property
    def spec_string(self) -> str:
        return canonical_spec(self)


# Ranges of the data sets' parameters (declared in their hints; the registry refuses a spec
# outside them in one line). The embedded data sets hold every image in memory as fp32:
# digits at size 128 is 1,797 x 3 x 128^2 x 4 bytes = 353 MiB (and load() holds ~3 copies);
# faces 200 images, 157 MiB at 256; photos a (grid x size)^2 square per photo, at most
# PHOTOS_MAX_SIDE. torchvision's data sets load one image at a time: their bound is the
# model's (the activations of a capture or an attack grow with size^2).
DIGITS_SIZE = Range(8, 128)
FACES_SIZE = Range(8, 256)
PHOTOS_SIZE = Range(8, 256)
PHOTOS_GRID = Range(1, 16)
#: Largest side (grid x size, pixels) of a photo before it is cut into patches.
PHOTOS_MAX_SIDE = 1024
FILES_SIZE = Range(8, 512)


def check_channels_size(channels: int, size: int, bounds: Range = FILES_SIZE) -> None:
    """The same checks for a data set built directly in Python (the registry checks spec values first)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size not in bounds:
        raise ValueError(f"size must be in {bounds}, got {size}")


def to_channels(images01: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> ``channels`` (1: ITU-R 601 luma as PIL's "L"; 3: gray repeated)."""
    c = images01.shape[1]
    if c == channels:
        return images01
    if c == 1 and channels == 3:
        return images01.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=images01.dtype).reshape(1, 3, 1, 1)
        return (images01 * luma).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


def resize(images01: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to ``size`` x ``size``; antialiased, stays in [0, 1]."""
    if images01.shape[-2:] == (size, size):
        return images01
    # bilinear weights are non-negative and sum to one, so the range is kept; clamp fixes rounding
    out = F.interpolate(images01, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)


def seeded_split(n: int, split: str, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> torch.Tensor:
    """Indices of ``split`` in a seeded random train/test split of ``n`` items (sorted)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    chosen = perm[n_test:] if split == "train" else perm[:n_test]
    return chosen.sort().values


class EmbeddedSource(DataSource):
    """A data set that ships inside an installed package: all images in memory, seeded split.

    Normalisation: per-channel mean/std of the training split (``channel_stats``), so the
    model inputs of the training split have zero mean and unit variance per channel.
    """

    channels: int
    size: int

    def images(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """All images (N, C, H, W) in [0, 1] at the requested channels and size, labels, classes."""
        raise NotImplementedError

    def load(self, split: str = "train", root: Path | None = None, download: bool = False) -> ImageDataset:
        images, labels, num_classes = self.images()
        train = seeded_split(len(labels), "train")
        mean, std = channel_stats(images[train])
        spec = DatasetSpec(self.spec_string, (self.channels, self.size, self.size), num_classes, mean, std)
        idx = seeded_split(len(labels), split)
        return TensorImageDataset(images[idx].contiguous(), labels[idx], spec, split)


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 16.0
    return images, torch.from_numpy(digits.target).to(torch.int64)


@DATASETS.register("digits")
class Digits(EmbeddedSource):
    """scikit-learn's 1,797 handwritten digits (8x8, values 0-16), 10 classes, upsampled (offline).

    Args:
        channels: 1 (gray) or 3 (gray repeated, so every model's 3-channel default applies).
        size: side in pixels after bilinear upsampling of the 8x8 originals.
    """

    def __init__(self, channels: int = 3, size: Annotated[int, DIGITS_SIZE] = 32) -> None:
        check_channels_size(channels, size, DIGITS_SIZE)
        self.channels, self.size = channels, size

    def images(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        raw, labels = _digits_raw()
        return to_channels(resize(raw, self.size), self.channels), labels, 10


@functools.lru_cache(maxsize=1)
def _faces_raw() -> torch.Tensor:
    import skimage.data

    return torch.from_numpy(skimage.data.lfw_subset()).to(torch.float32).unsqueeze(1)


@DATASETS.register("faces")
class Faces(EmbeddedSource):
    """scikit-image's ``lfw_subset``: 100 faces (label 1) and 100 non-faces (label 0), 25x25 gray (offline).

    Args:
        channels: 1 (gray) or 3 (gray repeated).
        size: side in pixels after bilinear resizing of the 25x25 originals.
    """

    def __init__(self, channels: int = 3, size: Annotated[int, FACES_SIZE] = 32) -> None:
        check_channels_size(channels, size, FACES_SIZE)
        self.channels, self.size = channels, size

    def images(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        raw = _faces_raw()
        # lfw_subset holds the 100 faces first, then the 100 non-faces
        labels = torch.cat([torch.ones(100, dtype=torch.int64), torch.zeros(raw.shape[0] - 100, dtype=torch.int64)])
        return to_channels(resize(raw.clamp(0.0, 1.0), self.size), self.channels), labels, 2


#: scikit-image sample photographs that load offline (no pooch download); label = position here.
PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "coins",
    "moon",
)


@functools.lru_cache(maxsize=4)
def _photo_square(name: str, side: int) -> torch.Tensor:
    """The central square of photo ``name``, resized to ``side`` pixels, RGB (3, side, side) in [0, 1]."""
    import skimage.data

    array = getattr(skimage.data, name)()
    image = torch.from_numpy(array).to(torch.float32) / 255.0
    image = image.unsqueeze(0) if image.dim() == 2 else image.permute(2, 0, 1)[:3]
    h, w = image.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[:, top : top + s, left : left + s].unsqueeze(0)
    return to_channels(resize(square, side), 3)[0]


@DATASETS.register("photos")
class Photos(EmbeddedSource):
    """Patches of scikit-image's sample photographs (astronaut, camera, chelsea, coffee, rocket, ...), one class per photo.

    The central square of each of the 10 photos in ``PHOTOS`` is resized to
    ``grid * size`` pixels and cut into ``grid x grid`` patches of ``size`` x ``size``.

    Args:
        channels: 3 (colour; gray photos repeated) or 1 (luma).
        size: side of a patch in pixels.
        grid: patches per side of each photo (grid * grid patches per photo).
    """

    def __init__(
        self, channels: int = 3, size: Annotated[int, PHOTOS_SIZE] = 32, grid: Annotated[int, PHOTOS_GRID] = 4
    ) -> None:
        check_channels_size(channels, size, PHOTOS_SIZE)
        if grid not in PHOTOS_GRID:
            raise ValueError(f"grid must be in {PHOTOS_GRID}, got {grid}")
        if grid * size > PHOTOS_MAX_SIDE:
            raise ValueError(f"grid x size is {grid * size} pixels per photo side, more than {PHOTOS_MAX_SIDE}")
        self.channels, self.size, self.grid = channels, size, grid

    def images(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        patches, labels = [], []
        for label, name in enumerate(PHOTOS):
            square = _photo_square(name, self.grid * self.size)
            # (3, g*s, g*s) -> (g*g, 3, s, s), row-major over the grid
            tiles = square.unfold(1, self.size, self.size).unfold(2, self.size, self.size)
            patches.append(tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, self.size, self.size))
            labels.append(torch.full((self.grid * self.grid,), label, dtype=torch.int64))
        images = to_channels(torch.cat(patches), self.channels).contiguous()
        return images, torch.cat(labels), len(PHOTOS)


def load_dataset(
    spec: str,
    root: Path | str | None = None,
    download: bool = False,
    split: str = "train",
    channels: int | None = None,
) -> ImageDataset:
    """The ``split`` of the data set named by ``spec`` (``"digits"``, ``"cifar10:channels=1"``, ...).

    ``root`` is where torchvision data sets live (``--data-root``); ``download`` lets
    torchvision fetch them there. ``channels`` overrides the spec's ``channels``.
    Every problem raises :class:`SpecError` or :class:`DataError` naming what is wrong.
    """
    overrides: dict[str, int] = {} if channels is None else {"channels": channels}
    source = DATASETS.create(spec, **overrides)
    if not isinstance(source, DataSource):
        raise DataError(f"dataset {spec!r}: {type(source).__name__} is not a gia_bench.data.DataSource")
    return source.load(split=split, root=None if root is None else Path(root), download=download)


# The file-based sources build on the classes above; importing them registers them.
from gia_bench import data_files  # noqa: E402,F401  (cifar10, cifar100, mnist, fashionmnist, imagefolder)

# Text data sets (gia_bench.text.data) register themselves here; they import nothing optional until loaded.
import gia_bench.text.data  # noqa: E402,F401
