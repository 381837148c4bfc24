"""``tag``: TAG's continuous embedding optimisation on a small random BERT (short budgets)."""

import pytest
import torch

from gia_bench.attacks import create as create_attack
from gia_bench.attacks.base import AttackError
from gia_bench.capture import capture_batch
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import GradientRecord
from gia_bench.text.metrics import sequences
from gia_bench.text.tag import Distance, covering, distance


def test_distance_is_l2_plus_alpha_l1_relative_to_the_target():
    target = [torch.tensor([1.0, -2.0]), torch.tensor([2.0])]
    cand = [torch.tensor([1.0, -1.0]), torch.tensor([0.0])]
    # |c - t|^2 = 1 + 4 = 5, |t|^2 = 9; |c - t|_1 = 3, |t|_1 = 5
    assert float(distance(cand, target, 0.5)) == pytest.approx(5 / 9 + 0.5 * 3 / 5)
    assert float(distance(target, target, 0.5)) == 0.0


def test_the_loops_distance_sums_constant_pieces_once_and_keeps_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    target = [torch.randn(50, generator=gen) for _ in range(3)]
    fixed = torch.randn(50, generator=gen)  # a piece the dummy does not reach (the word table's)
    measure = Distance(target, 0.3)
    for step in range(3):
        x = torch.randn(50, generator=gen, requires_grad=True)
        cand = [x * 2, fixed, x.sin()]
        got = measure(cand)
        want = distance(cand, target, 0.3)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
        (g_got,) = torch.autograd.grad(got, x, retain_graph=True)
        (g_want,) = torch.autograd.grad(want, x)
        torch.testing.assert_close(g_got.to(torch.float64), g_want.to(torch.float64))
    assert measure.live == [0, 2]
    assert float(measure([t.clone() for t in target])) == 0.0  # no piece requires grad: summed whole


def test_covering_is_the_best_mapping_that_uses_every_token():
    import itertools

    gen = torch.Generator().manual_seed(3)
    for positions, tokens in ((4, 3), (5, 2), (5, 5), (6, 3)):
        for _ in range(5):
            sim = torch.rand(positions, tokens, generator=gen, dtype=torch.float64)
            got = covering(sim)
            assert set(got.tolist()) == set(range(tokens))
            best = max(sum(float(sim[p, t]) for p, t in enumerate(m))
                       for m in itertools.product(range(tokens), repeat=positions) if len(set(m)) == tokens)
            assert sum(float(sim[p, t]) for p, t in enumerate(got.tolist())) == pytest.approx(best, abs=1e-12)


@pytest.fixture(scope="module")
def bert():
    data = load_dataset("pii", split="test")
    spec = ModelSpec("transformer:d=32,layers=1", data.spec.shape, 4, "eval")
    return data, spec, build_model(spec, seed=0)


def _run(setup, defense, view, spec="tag:iterations=15,restarts=2", seed=0):
    data, model_spec, model = setup
    x, y = data.batch([0])
    record, truth = capture_batch(model, model_spec, data.spec, x, y, create_defense(defense), "t")
    return create_attack(spec).run(record, view, torch.Generator().manual_seed(seed)), truth


def test_tag_optimises_the_distance_and_maps_to_bag_tokens(bert):
    rec, truth = _run(bert, "none", "naive")
    true = sequences(truth.inputs)[0]
    got = sequences(rec.inputs)[0]
    assert len(got) == len(true) and rec.extra["length_from"] == "position-embedding gradient support"
    assert set(got) == set(true) and rec.extra["vocabulary"] == "token bag of the embedding gradient"
    assert rec.extra["mapping"] == "nearest, every bag token at least once"
    assert rec.budget.iterations == 15 and rec.budget.restarts == 2 and len(rec.extra["distance_per_restart"]) == 2
    assert rec.final_loss == min(rec.extra["distance_per_restart"])
    assert all(b < a for a, b in zip(rec.extra["distance_at_start"], rec.extra["distance_per_restart"]))
    again, _ = _run(bert, "none", "naive")  # same seed, same result
    assert torch.equal(again.inputs, rec.inputs) and again.final_loss == rec.final_loss
    tag, _ = _run(bert, "none", "naive", "tag:iterations=15,restarts=2,cover=false")  # TAG's own mapping
    assert tag.final_loss == rec.final_loss and set(sequences(tag.inputs)[0]) <= set(true)
    assert tag.extra["mapping"] == "nearest token"


def test_tag_aware_matches_the_messages(bert):
    rec, _ = _run(bert, "powersgd:rank=1", "aware", "tag:iterations=10,restarts=1")
    assert rec.observed == "messages" and rec.view == "aware" and "assumed zero" in rec.extra["residual"]
    assert rec.extra["distance_per_restart"][0] < rec.extra["distance_at_start"][0]


def test_tag_refuses_an_image_record(tmp_path):
    from gia_bench.capture import CaptureConfig, capture

    path = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 0, tmp_path))[0]
    with pytest.raises(AttackError, match="text record"):
        create_attack("tag").run(GradientRecord.load(path), "naive", torch.Generator())


def test_tag_runs_on_a_llama_decoder_and_takes_the_length_from_the_bag():
    data = load_dataset("pii", split="test")
    spec = ModelSpec("transformer:d=32,layers=1,arch=llama", data.spec.shape, 4, "eval")
    rec, truth = _run((data, spec, build_model(spec, seed=0)), "none", "naive", "tag:iterations=5,restarts=1")
    got, true = sequences(rec.inputs)[0], sequences(truth.inputs)[0]
    assert rec.extra["length_from"] == "token bag size / B" and len(got) == rec.extra["length"]
    assert set(got) == set(true)  # every bag token placed (the bag of distinct tokens is no longer than the sentence)


def test_tag_refuses_a_fedavg_update_in_one_line(tmp_path):
    from gia_bench.attacks.base import NotApplicable
    from gia_bench.capture import CaptureConfig, capture

    path = capture(CaptureConfig("pii", "transformer:d=32,layers=1", "none", 2, 1, 0, tmp_path, local_steps=2,
                                 local_batch=1))[0]
    record = GradientRecord.load(path)
    assert record.meta.local_steps == 2
    with pytest.raises(NotApplicable, match="FedAvg update of 2 local steps"):
        create_attack("tag:iterations=2,restarts=1").run(record, "naive", torch.Generator())
    # the token bag still reads it
    assert create_attack("tokens").run(record, "aware", torch.Generator()).extra["bag_size"] > 0
