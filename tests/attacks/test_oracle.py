"""The oracle view: with the worker's private residual the compressor simulation is exact.

Mid-training, an error-feedback compressor sends ``C(g_t + e_{t-1})``. On such a record the
oracle objective at the true images and labels is ~0; the aware view (residual unknown,
assumed zero) is not.
"""

from __future__ import annotations

import pytest
import torch

from gia_bench.attacks.views import build_view
from gia_bench.capture import capture_batch, compute_gradient
from gia_bench.comm import LocalCommunicator
from gia_bench.data import load_dataset
from gia_bench.defenses import create
from gia_bench.models import ModelSpec, build_model
from gia_bench.receiver import load_record, record_model

EF_COMPRESSORS = ["topk:ratio=0.1", "signsgd", "powersgd:rank=1", "lqsgd:rank=1,bits=8"]


def _mid_training_record(defense: str, warm_steps: int = 3):
    data = load_dataset("digits", split="train")
    spec = ModelSpec("convnet:width=4", data.spec.shape, data.spec.num_classes, "eval")
    model = build_model(spec, seed=0)
    names = [n for n, _ in model.named_parameters()]
    compressor = create(defense)
    # earlier steps on other batches leave a residual (and a warm-start Q) in the compressor
    for s in range(warm_steps):
        x, y = data.batch(list(range(8 * s, 8 * s + 8)))
        compressor.step(compute_gradient(model, x, y), LocalCommunicator(), keys=names)
    x, y = data.batch([100, 101])
    return capture_batch(model, spec, data.spec, x, y, compressor, f"mid-{defense}", step=warm_steps)


def _relative_distance(view, record, truth) -> float:
    model = record_model(record)
    grads = compute_gradient(model, truth.inputs, truth.labels)
    cand = view.transform([g.unsqueeze(0) for g in grads])
    num = sum(float((c[0] - t).pow(2).sum()) for c, t in zip(cand, view.targets))
    den = sum(float(t.pow(2).sum()) for t in view.targets)
    return num / den


@pytest.mark.parametrize("defense", EF_COMPRESSORS)
def test_oracle_objective_is_zero_at_the_truth_and_aware_is_not(defense):
    record, truth = _mid_training_record(defense)
    assert "residual" in truth.private and float(truth.private["residual"].abs().sum()) > 0
    assert not record.private  # the record itself never holds it
    oracle = build_view(record.with_private(truth), "oracle")
    aware = build_view(record, "aware")
    assert oracle.private_state_used == ("residual",) and aware.private_state_used == ()
    assert "upper bound" in oracle.residual and "assumed zero" in aware.residual
    exact, assumed = _relative_distance(oracle, record, truth), _relative_distance(aware, record, truth)
    # float rounding only (~1e-15) against a residual that is a few 1e-3 of the message (PowerSGD's
    # rank-1 part absorbs most of it, so its squared relative error is ~1e-5, Top-k's ~1e-2)
    assert exact < 1e-10
    assert assumed > 1e-6 and assumed > 1e4 * exact


def test_fresh_compressor_has_no_private_state():
    record, truth = _mid_training_record("topk:ratio=0.1", warm_steps=0)
    assert truth.private == {}
    aware = build_view(record, "aware")
    assert _relative_distance(aware, record, truth) < 1e-10


def test_truth_file_keeps_private_state(tmp_path):
    from gia_bench.records import Truth, truth_path

    record, truth = _mid_training_record("signsgd")
    path = record.save(tmp_path / "r.safetensors")
    truth.save(truth_path(path))
    loaded = Truth.load(truth_path(path))
    assert torch.equal(loaded.private["residual"], truth.private["residual"])
    assert not any(k.startswith("private") for k in load_record(path).public)
