"""What a record says about its model and its data: :class:`ModelSpec` and :class:`DatasetSpec`.

Both are plain frozen values with a JSON form; they travel into every gradient record's
metadata. Neither knows a registry nor builds anything: :func:`gia_bench.models.build_recorded`
builds the model a :class:`ModelSpec` names, :func:`gia_bench.data.load_dataset` loads the
data a :class:`DatasetSpec` came from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model as a record describes it (:func:`gia_bench.models.build_model` builds it)."""

    spec: str  # registry spec, e.g. "lenet" or "convnet:width=32"
    in_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    mode: str = "train"  # "train" or "eval": BatchNorm behaviour during the gradient
    #: bits of Few-Bit Backward activations (gia_bench.fewbit); 0: exact backward
    fewbit_backward: int = 0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.fewbit_backward:
            del data["fewbit_backward"]  # records without few-bit backward keep their original form
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        mode = str(data.get("mode", "train"))
        if mode not in ("train", "eval"):
            raise ValueError(f"model mode must be 'train' or 'eval', got {mode!r}")
        fewbit = int(data.get("fewbit_backward", 0))
        if not 0 <= fewbit <= 8:
            raise ValueError(f"model fewbit_backward must be 0 (exact) or 1..8 bits, got {fewbit}")
        return cls(
            spec=str(data["spec"]),
            in_shape=tuple(int(v) for v in data["in_shape"]),  # type: ignore[arg-type]
            num_classes=int(data["num_classes"]),
            mode=mode,
            fewbit_backward=fewbit,
        )

    @classmethod
    def for_data(cls, spec: str, dataset: DatasetSpec, mode: str = "train", fewbit_backward: int = 0) -> ModelSpec:
        """The model ``spec`` on ``dataset``'s inputs and classes."""
        return cls(spec, tuple(dataset.shape), dataset.num_classes, mode, fewbit_backward)  # type: ignore[arg-type]


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
