"""``dager --view aware``: sparse recovery of the tokens from PowerSGD / LQ-SGD factors (small random models)."""

import json

import pytest
import torch

from gia_bench.attacks import create as create_attack
from gia_bench.capture import capture_batch
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.models import ModelSpec, build_model
from gia_bench.receiver import record_model
from gia_bench.text.dager_aware import (
    factor_columns,
    observation,
    relative_residual,
    somp,
)
from gia_bench.text.dager_decoder import first_inputs
from gia_bench.text.metrics import score_text, sequences


def test_somp_recovers_the_atoms_mixed_into_the_columns():
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(200, 64, generator=gen, dtype=torch.float64)
    used = [17, 3, 150, 99, 42]
    y = atoms[used].T @ torch.randn(5, 3, generator=gen, dtype=torch.float64)  # 3 columns, 5 atoms mixed
    found = somp(y, atoms, max_atoms=20, tol=1e-8)
    assert sorted(found.chosen) == sorted(used) and found.residuals[-1] < 1e-8
    assert all(a > b for a, b in zip(found.residuals, found.residuals[1:]))  # each choice explains more
    # a looser tolerance (a noise level: atoms explaining less than it are not taken) stops earlier on
    # the same greedy path
    loose = somp(y, atoms, max_atoms=20, tol=0.4)
    assert 0 < len(loose.chosen) < 5 and loose.chosen == found.chosen[: len(loose.chosen)]
    assert somp(y, atoms, max_atoms=2, tol=1e-8).chosen == found.chosen[:2]


def test_relative_residual_is_zero_inside_the_span_and_one_orthogonal():
    atoms = torch.eye(4, dtype=torch.float64)[:2]
    assert relative_residual(torch.tensor([[1.0], [2.0], [0.0], [0.0]], dtype=torch.float64), atoms) < 1e-12
    assert relative_residual(torch.tensor([[0.0], [0.0], [1.0], [0.0]], dtype=torch.float64), atoms) == 1.0


@pytest.fixture(scope="module")
def llama():
    data = load_dataset("pii", split="test")
    spec = ModelSpec("transformer:d=96,layers=3,arch=llama", data.spec.shape, 4, "eval")
    return data, spec, build_model(spec, seed=0)


def _record(setup, index, defense):
    data, spec, model = setup
    x, y = data.batch(index)
    torch.manual_seed(0)
    return capture_batch(model, spec, data.spec, x, y, create_defense(defense), "a")


def _attack(record, truth, view):
    rec = create_attack("dager").run(record, view, torch.Generator())
    values = score_text(rec.inputs, truth.inputs).values
    return sum(values["token_f1"]) / len(values["token_f1"]), rec


def test_powersgd_q_lies_in_the_span_of_the_first_layer_inputs(llama):
    # the premise: Q = M^T P_hat mixes the layer's inputs, so the batch's tokens explain all of it, others not
    record, truth = _record(llama, [0], "powersgd:rank=1")
    model = record_model(record).eval()
    index = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    attn = model.net.model.layers[0].self_attn
    y1 = observation(factor_columns(record, model), [index[id(p.weight)] for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    used = torch.tensor(sorted({t for s in sequences(truth.inputs) for t in s}))
    with torch.no_grad():
        assert relative_residual(y1, first_inputs(model.net.model, used)) < 1e-5
        others = torch.arange(1000, 1000 + used.numel())
        assert relative_residual(y1, first_inputs(model.net.model, others)) > 0.5


def test_aware_recovers_tokens_where_naive_finds_none(llama):
    record, truth = _record(llama, [0], "powersgd:rank=1")
    naive, _ = _attack(record, truth, "naive")
    aware, rec = _attack(record, truth, "aware")
    assert naive == 0.0 and aware == 1.0, rec.extra
    assert rec.extra["kept"] == "aware" and rec.observed == "messages"
    assert rec.extra["residual_aware"] < 1e-5 < rec.extra["residual_naive"]


@pytest.mark.parametrize("defense, index, floor", [("powersgd:rank=1", [3, 4], 0.95), ("lqsgd:rank=1", [0], 0.95),
                                                   ("lqsgd:rank=1", [3, 4], 0.95)])
def test_aware_token_f1_through_rank_one_factors(llama, defense, index, floor):
    record, truth = _record(llama, index, defense)
    aware, rec = _attack(record, truth, "aware")
    assert aware >= floor, rec.extra


@pytest.mark.parametrize("defense", ["none", "topk:ratio=0.01"])
def test_aware_is_the_naive_result_without_factors(llama, defense):
    record, truth = _record(llama, [3, 4], defense)
    _, a = _attack(record, truth, "naive")
    _, b = _attack(record, truth, "aware")
    assert torch.equal(a.inputs, b.inputs) and b.view == "aware" and b.extra["kept"] == "naive (no factors sent)"


def test_encoder_atoms_carry_their_positions():
    data = load_dataset("pii", split="test")
    spec = ModelSpec("transformer:d=96,layers=3", data.spec.shape, 4, "eval")
    record, truth = _record((data, spec, build_model(spec, seed=0)), [0], "powersgd:rank=1")
    naive, _ = _attack(record, truth, "naive")
    aware, rec = _attack(record, truth, "aware")
    values = score_text(rec.inputs, truth.inputs).values
    assert naive < 0.2 and aware == 1.0 and values["rouge1"][0] >= 0.9, rec.extra


def test_cli_attack_aware_on_a_powersgd_text_record(tmp_path):
    from typer.testing import CliRunner

    from gia_bench.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["capture", "--dataset", "pii", "--model", "transformer:d=96,layers=3,arch=llama",
                              "--defense", "powersgd:rank=1", "--batch-size", "1", "--num", "1", "--model-mode", "eval",
                              "--out", str(tmp_path / "rec")])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["attack", str(tmp_path / "rec"), "--attack", "dager", "--view", "aware",
                              "--out", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    result = json.loads(next((tmp_path / "runs").rglob("result.json")).read_text())
    assert min(im["token_f1"] for im in result["scores"]["images"]) >= 0.9  # naive: 0 on such records


@pytest.mark.parametrize("defense", ["powersgd:rank=1", "lqsgd:rank=1"])
def test_somp_finds_the_tokens_in_the_whole_vocabulary(llama, defense):
    # no bag (e.g. an embedding table that is not sent): 30522 candidates, 96 dimensions, 13 tokens, rank-1 Q;
    # under LQ-SGD the stop at the codec's noise level keeps out every token the sentence does not hold
    from gia_bench.text.dager_aware import decoder_tokens, noise_level

    record, truth = _record(llama, [0], defense)
    model = record_model(record).eval()
    index = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    tokens, info = decoder_tokens(model, factor_columns(record, model), lambda p: index[id(p)],
                                  torch.arange(model.embedding.num_embeddings), 32, noise_level(record))
    assert set(tokens.tolist()) == {t for s in sequences(truth.inputs) for t in s}, info
