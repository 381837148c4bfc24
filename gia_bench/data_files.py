"""Data sets read from files under ``--data-root``: torchvision's CIFAR-10/100, MNIST, Fashion-MNIST
and any ImageFolder, normalised with their published statistics (ImageNet's for a folder).

Registered in :data:`gia_bench.data.DATASETS` when :mod:`gia_bench.data` loads; use
:func:`gia_bench.data.load_dataset`. Every problem with the files (none there, a failed
download, a folder without class sub-folders) is a :class:`~gia_bench.errors.DataError`
naming the path and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar

import torchvision
from torch.utils.data import Dataset

from gia_bench.data import (
    DATASETS,
    FILES_SIZE,
    SPLITS,
    DataSource,
    DatasetSpec,
    ImageDataset,
    PILImageDataset,
    check_channels_size,
    seeded_split,
)
from gia_bench.errors import DataError


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_root(name: str, root: Path | None, expected: str) -> Path:
    if root is None:
        raise DataError(
            f"dataset {name!r} reads its files from --data-root (expected at <data-root>/{expected}); none given"
        )
    return Path(root).expanduser()


class TorchvisionSource(DataSource):
    """A torchvision data set read from ``--data-root``; normalised with its published mean/std.

    Note that torchvision reads the CIFAR archives with ``pickle``: point ``--data-root``
    only at files from the official source.
    """

    channels: int
    size: int
    folder: ClassVar[str]  # where torchvision expects the files, relative to the root
    num_classes: ClassVar[int]
    mean: ClassVar[tuple[float, ...]]  # of the native channels
    std: ClassVar[tuple[float, ...]]

    def _open(self, root: Path, train: bool, download: bool) -> Dataset:
        raise NotImplementedError

    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean, std = self.mean, self.std
        if len(mean) == self.channels:
            return mean, std
        if self.channels == 3:  # gray repeated
            return mean * 3, std * 3
        # luma of RGB: mean is linear; the std of a weighted sum is approximated by the weighted std
        w = (0.299, 0.587, 0.114)
        return (sum(a * b for a, b in zip(w, mean)),), (sum(a * b for a, b in zip(w, std)),)

    def load(self, split: str = "train", root: Path | None = None, download: bool = False) -> ImageDataset:
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        name = self.registry_name
        root = _require_root(name, root, self.folder)
        try:
            base = self._open(root, split == "train", download)
        except RuntimeError as exc:
            if download:
                raise DataError(
                    f"dataset {name!r}: download into {root} failed ({_one_line(exc)}); without network,"
                    f" copy the files to {root / self.folder}"
                ) from exc
            raise DataError(
                f"dataset {name!r}: no data found at {root / self.folder} (from --data-root {root});"
                " put the files there, or pass --download where the network allows it"
            ) from exc
        except OSError as exc:  # URLError is an OSError: no network
            raise DataError(
                f"dataset {name!r}: download into {root} failed ({exc}); without network,"
                f" copy the files to {root / self.folder}"
            ) from exc
        mean, std = self._stats()
        spec = DatasetSpec(self.spec_string, (self.channels, self.size, self.size), self.num_classes, mean, std)
        return PILImageDataset(base, spec, split)


@DATASETS.register("cifar10")
class CIFAR10(TorchvisionSource):
    """torchvision CIFAR-10 (32x32 colour, 10 classes) from <data-root>/cifar-10-batches-py.

    Args:
        channels: 3 (colour) or 1 (luma).
        size: side in pixels (32 is native).
    """

    folder = "cifar-10-batches-py"
    num_classes = 10
    # the CIFAR-10 training set's per-channel mean/std (as Inverting Gradients uses)
    mean = (0.4914672374725342, 0.4822617471218109, 0.4467701315879822)
    std = (0.24703224003314972, 0.24348513782024384, 0.26158785820007324)

    def __init__(self, channels: int = 3, size: Annotated[int, FILES_SIZE] = 32) -> None:
        check_channels_size(channels, size, FILES_SIZE)
        self.channels, self.size = channels, size

    def _open(self, root: Path, train: bool, download: bool) -> Dataset:
        return torchvision.datasets.CIFAR10(str(root), train=train, download=download)


@DATASETS.register("cifar100")
class CIFAR100(TorchvisionSource):
    """torchvision CIFAR-100 (32x32 colour, 100 fine classes) from <data-root>/cifar-100-python.

    Args:
        channels: 3 (colour) or 1 (luma).
        size: side in pixels (32 is native).
    """

    folder = "cifar-100-python"
    num_classes = 100
    mean = (0.5071598291397095, 0.4866936206817627, 0.44120192527770996)
    std = (0.2673342823982239, 0.2564384639263153, 0.2761504650115967)

    def __init__(self, channels: int = 3, size: Annotated[int, FILES_SIZE] = 32) -> None:
        check_channels_size(channels, size, FILES_SIZE)
        self.channels, self.size = channels, size

    def _open(self, root: Path, train: bool, download: bool) -> Dataset:
        return torchvision.datasets.CIFAR100(str(root), train=train, download=download)


@DATASETS.register("mnist")
class MNIST(TorchvisionSource):
    """torchvision MNIST (28x28 gray digits, 10 classes) from <data-root>/MNIST/raw, resized.

    Args:
        channels: 3 (gray repeated, fits every model's default) or 1.
        size: side in pixels after bilinear resizing of the 28x28 originals.
    """

    folder = "MNIST/raw"
    num_classes = 10
    mean = (0.1307,)
    std = (0.3081,)

    def __init__(self, channels: int = 3, size: Annotated[int, FILES_SIZE] = 32) -> None:
        check_channels_size(channels, size, FILES_SIZE)
        self.channels, self.size = channels, size

    def _open(self, root: Path, train: bool, download: bool) -> Dataset:
        return torchvision.datasets.MNIST(str(root), train=train, download=download)


@DATASETS.register("fashionmnist")
class FashionMNIST(TorchvisionSource):
    """torchvision Fashion-MNIST (28x28 gray, 10 classes) from <data-root>/FashionMNIST/raw, resized.

    Args:
        channels: 3 (gray repeated) or 1.
        size: side in pixels after bilinear resizing of the 28x28 originals.
    """

    folder = "FashionMNIST/raw"
    num_classes = 10
    mean = (0.2860,)
    std = (0.3530,)

    def __init__(self, channels: int = 3, size: Annotated[int, FILES_SIZE] = 32) -> None:
        check_channels_size(channels, size, FILES_SIZE)
        self.channels, self.size = channels, size

    def _open(self, root: Path, train: bool, download: bool) -> Dataset:
        return torchvision.datasets.FashionMNIST(str(root), train=train, download=download)


#: ImageNet's per-channel mean/std: the usual constants for an arbitrary photo collection.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@DATASETS.register("imagefolder")
class ImageFolder(TorchvisionSource):
    """Any folder of images in one sub-folder per class (torchvision ImageFolder) from --data-root.

    If the root holds ``train/`` and ``test/`` (or ``val/``) folders they are the
    splits; otherwise the root itself is split 80/20 with a fixed seed. Images are
    converted to ``channels``, resized (shorter side) and centre-cropped to ``size``,
    and normalised with ImageNet's mean/std.

    Args:
        channels: 3 (RGB) or 1 (luma).
        size: side in pixels after resizing and centre-cropping.
    """

    folder = "<class>/<image files>"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, channels: int = 3, size: Annotated[int, FILES_SIZE] = 32) -> None:
        check_channels_size(channels, size, FILES_SIZE)
        self.channels, self.size = channels, size

    @staticmethod
    def _folder(path: Path) -> torchvision.datasets.ImageFolder:
        if not path.is_dir():
            raise DataError(f"dataset 'imagefolder': {path} is not a folder (from --data-root)")
        try:
            return torchvision.datasets.ImageFolder(str(path))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(
                f"dataset 'imagefolder': {path} must hold one sub-folder of images per class ({exc})"
            ) from exc

    def load(self, split: str = "train", root: Path | None = None, download: bool = False) -> ImageDataset:
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        root = _require_root("imagefolder", root, self.folder)
        if download:
            raise DataError("dataset 'imagefolder': --download is not possible, the images come from --data-root")
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        indices = None
        if (root / "train").is_dir() and test_dir is not None:
            train = self._folder(root / "train")
            base = train if split == "train" else self._folder(test_dir)
            if base.classes != train.classes:
                raise DataError(
                    f"dataset 'imagefolder': classes of {test_dir} differ from those of {root / 'train'}"
                )
        else:
            train = base = self._folder(root)
            indices = seeded_split(len(base), split).tolist()
        mean, std = self._stats()
        spec = DatasetSpec(self.spec_string, (self.channels, self.size, self.size), len(train.classes), mean, std)
        samples = base.samples
        return PILImageDataset(base, spec, split, indices, describe=lambda i: str(samples[i][0]))
