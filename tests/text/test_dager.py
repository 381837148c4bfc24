"""``dager`` on the MiniLM encoder: exact sentences from the first layer's span at B = 1, eval mode."""

import pytest
import torch

from gia_bench.attacks import create as create_attack
from gia_bench.capture import capture_batch
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.models import ModelSpec, build_model
from gia_bench.text.dager import row_space, span_distance
from gia_bench.text.metrics import score_text


def test_span_distance_is_zero_inside_and_one_orthogonal():
    g = torch.zeros(5, 4)
    g[0, 0], g[1, 1] = 2.0, 1e-3  # row space e0, e1 (the small direction counts above rtol)
    basis = row_space(g, 1e-6)
    assert basis.shape == (4, 2)
    d = span_distance(torch.tensor([[3.0, -1.0, 0, 0], [0, 0, 1.0, 0]]), basis)
    torch.testing.assert_close(d, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert row_space(g, 1e-2).shape == (4, 1)  # below rtol x the largest: outside the numerical rank


@pytest.fixture(scope="module")
def minilm():
    data = load_dataset("pii", split="test")
    return data, {m: build_model(ModelSpec("minilm", data.spec.shape, 4, m), seed=0) for m in ("eval", "train")}


def _dager(data, model, mode, index):
    spec = ModelSpec("minilm", data.spec.shape, 4, mode)
    x, y = data.batch([index] if isinstance(index, int) else index)
    torch.manual_seed(0)
    record, truth = capture_batch(model, spec, data.spec, x, y, create_defense("none"), "d")
    rec = create_attack("dager").run(record, "naive", torch.Generator())
    return score_text(rec.inputs, truth.inputs).values, rec


def test_minilm_eval_b1_is_exact(minilm):
    data, models = minilm
    for index in (0, 1):
        values, rec = _dager(data, models["eval"], "eval", index)
        assert values["exact"] == [1.0] and values["pii"] == [1.0], rec.extra


def test_minilm_eval_b2_splits_the_tokens_into_their_sentences(minilm):
    data, models = minilm
    values, rec = _dager(data, models["eval"], "eval", [2, 3])
    assert values["token_f1"] == [1.0, 1.0] and min(values["rouge1"]) >= 0.95, (values, rec.extra)


def test_train_mode_dropout_breaks_the_exact_check(minilm):
    data, models = minilm
    values, rec = _dager(data, models["train"], "train", 0)
    assert values["exact"] == [0.0] and values["rouge1"][0] < 0.5, rec.extra
