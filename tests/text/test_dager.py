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


# -- decoders (a small random Llama with smollm2's structure: RMSNorm, RoPE, grouped k/v) ----------

from gia_bench.text.dager_decoder import gap_rank  # noqa: E402


def test_gap_rank_finds_the_singular_value_gap_and_the_noise_level():
    s = torch.tensor([5.0, 3.0, 1.0, 2e-6, 1e-6], dtype=torch.float64)
    rank, noise = gap_rank(s)
    assert rank == 3 and noise == pytest.approx(2e-6 / 5.0)
    assert gap_rank(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))[0] == 3  # no gap: full rank


@pytest.fixture(scope="module")
def llama():
    data = load_dataset("pii", split="test")
    spec = ModelSpec("transformer:d=96,layers=3,arch=llama", data.spec.shape, 4, "eval")
    return data, spec, build_model(spec, seed=0)


def _dager_llama(llama, index, defense="none", view="naive"):
    data, spec, model = llama
    x, y = data.batch(index)
    torch.manual_seed(0)
    record, truth = capture_batch(model, spec, data.spec, x, y, create_defense(defense), "d")
    rec = create_attack("dager").run(record, view, torch.Generator())
    return score_text(rec.inputs, truth.inputs).values, rec


def test_decoder_second_layer_input_matches_the_model(llama):
    from gia_bench.text.dager_decoder import second_inputs

    data, _, model = llama
    ids = data.batch([0])[0][:, 0, 0, :10].round().long()
    with torch.no_grad():
        hidden = model.net.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        expected = model.net.model.layers[1].input_layernorm(hidden)
        got = torch.stack([second_inputs(model.net.model, ids[:, : p + 1])[0] for p in range(10)])
    torch.testing.assert_close(got, expected[0], rtol=1e-4, atol=1e-5)


def test_decoder_b1_and_b2_are_exact(llama):
    # (not [1, 2]: sentence 1's run "7 7 7" is near-collinear in this random-init model's first layer,
    # a documented miss of the tolerance; SmolLM2's pretrained layers separate it, see the benchmark)
    for index in ([0], [3, 4]):
        values, rec = _dager_llama(llama, index)
        assert values["exact"] == [1.0] * len(index) and min(values["rouge1"]) == 1.0, rec.extra
