"""Records of embedded images for the attack tests (built in memory with capture_batch)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from gia_bench.capture import capture_batch
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import GradientRecord, Truth


@functools.lru_cache(maxsize=4)
def dataset(spec: str):
    return load_dataset(spec, split="train")


def make_record(
    model: str = "lenet",
    data: str = "photos",
    indices: tuple[int, ...] = (5,),
    defense: str = "none",
    mode: str = "train",
    seed: int = 0,
    pixel_space: bool = False,
) -> tuple[GradientRecord, Truth]:
    """One worker's step on ``indices`` of an embedded data set, as a record and its truth.

    ``pixel_space``: feed pixels in [0, 1] unnormalised (mean 0, std 1), as DLG's experiments do.
    """
    ds = dataset(data)
    data_spec = ds.spec
    if pixel_space:
        c = data_spec.shape[0]
        data_spec = dataclasses.replace(data_spec, mean=(0.0,) * c, std=(1.0,) * c)
    inputs = torch.stack([data_spec.normalize(ds.pixels(i)) for i in indices])
    labels = torch.tensor([ds.label(i) for i in indices], dtype=torch.int64)
    spec = ModelSpec(model, data_spec.shape, data_spec.num_classes, mode)
    net = build_model(spec, seed=seed)
    name = model.replace(":", "-").replace("=", "")
    return capture_batch(net, spec, data_spec, inputs, labels, create_defense(defense), f"{data}-{name}-{defense}")


@pytest.fixture
def record_factory():
    return make_record


def pick(data: str, labels: tuple[int, ...], skip: int = 0) -> tuple[int, ...]:
    """Indices of training images with the given ``labels`` (in order; repeated labels get different images)."""
    ds = dataset(data)
    used: set[int] = set()
    out = []
    for label in labels:
        candidates = [i for i in range(len(ds)) if ds.label(i) == label and i not in used]
        i = candidates[skip % len(candidates)]
        used.add(i)
        out.append(i)
    return tuple(out)
