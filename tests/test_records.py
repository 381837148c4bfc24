import pytest
import torch

from gia_bench.capture import capture_batch, compute_gradient
from gia_bench.data import DatasetSpec
from gia_bench.defenses import create
from gia_bench.errors import RecordError
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import GradientRecord, Truth, truth_path


def _capture(defense="none"):
    ds = DatasetSpec("toy", (3, 32, 32), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ms = ModelSpec("lenet", ds.shape, ds.num_classes)
    model = build_model(ms, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = torch.tensor([3, 7])
    return model, x, y, capture_batch(model, ms, ds, x, y, create(defense), "toy-0")


def test_record_round_trip(tmp_path):
    model, x, y, (record, truth) = _capture()
    path = record.save(tmp_path / "toy-0.safetensors")
    truth.save(truth_path(path))
    back = GradientRecord.load(path)
    assert back.meta == record.meta
    for group in ("messages", "weights", "public"):
        a, b = getattr(record, group), getattr(back, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t = Truth.load(truth_path(path))
    assert torch.equal(t.inputs, x) and torch.equal(t.labels, y)


def test_none_record_decodes_to_true_gradient(tmp_path):
    model, x, y, (record, _) = _capture()
    back = GradientRecord.load(record.save(tmp_path / "r.safetensors"))
    true = compute_gradient(model, x, y)
    for a, b in zip(back.decode(), true):
        assert torch.equal(a, b)


def test_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    torch.save({"x": Evil()}, path)
    with pytest.raises(RecordError, match="evil.safetensors"):
        GradientRecord.load(path)
    assert not marker.exists()
