"""Data sets: the embedded offline ones (digits, faces, photos) and torchvision's.

Every data set carries a :class:`DatasetSpec` (shape, classes, normalisation) that
travels into gradient records, so that an attacker and the metrics know how pixels
map to model inputs without ever seeing the data.
"""

from __future__ import annotations

import dataclasses
import torch


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a record needs to know about the data: input shape, classes, mean/std."""

    name: str
    shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DatasetSpec:
        return cls(
            name=str(data["name"]),
            shape=tuple(int(v) for v in data["shape"]),  # type: ignore[arg-type]
            num_classes=int(data["num_classes"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1) if like.dim() == 4 else (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).reshape(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).reshape(shape)
        return mean, std

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> model inputs."""
        mean, std = self._stats(images01)
        return (images01 - mean) / std

    def denormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model inputs -> pixels (not clamped; clamp to [0, 1] for metrics)."""
        mean, std = self._stats(inputs)
        return inputs * std + mean


def channel_stats(images01: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of an (N, C, H, W) tensor in [0, 1]."""
    mean = images01.mean(dim=(0, 2, 3))
    std = images01.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)

