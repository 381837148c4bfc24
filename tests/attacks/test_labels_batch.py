"""iLRG and LLG+ batch label strategies: exact multisets on untrained models, FedAvg updates, rounding."""

from __future__ import annotations

import pytest
import torch
from conftest import dataset

from gia_bench.attacks import create as create_attack
from gia_bench.attacks.labels import (
    LABELS,
    counts_to_labels,
    infer_labels,
    round_counts,
)
from gia_bench.attacks.matching import attack_model
from gia_bench.capture import batch_indices, capture_batch
from gia_bench.defenses import create as create_defense
from gia_bench.fedavg import LocalTraining
from gia_bench.models import ModelSpec, build_model
from gia_bench.receiver import decode_record


def _batch_record(model: str, batch: int, index: int, local: LocalTraining | None = None, seed: int = 1):
    """The ``index``-th seeded batch of ``batch`` digits on an untrained ``model`` (seeded with ``index``)."""
    data = dataset("digits")
    indices = batch_indices(len(data), batch, index + 1, seed=seed)[index]
    inputs, labels = data.batch(indices)
    spec = ModelSpec(model, data.spec.shape, data.spec.num_classes, "train")
    net = build_model(spec, seed=index)
    record, truth = capture_batch(
        net, spec, data.spec, inputs, labels, create_defense("none"), f"b{index}", local=local
    )
    return record, truth


def _infer(record, strategy):
    return infer_labels(record, attack_model(record, "cpu"), strategy, torch.Generator().manual_seed(0))[1]


@pytest.mark.parametrize("model, index", [("mlp:hidden=300", 0), ("convnet:width=8", 0)])
def test_ilrg_recovers_the_exact_multiset_of_a_batch_of_16(model, index):
    record, truth = _batch_record(model, 16, index)
    assert len(set(truth.labels.tolist())) < 16  # repeated labels: counts, not just the classes present
    labels = _infer(record, "ilrg")
    assert sorted(labels.tolist()) == sorted(truth.labels.tolist())


def test_ilrg_min_signal_is_what_fixes_the_vanishing_bias_gradient():
    # the convnet batch above: the authors' original (min_signal=0) gets the counts wrong
    record, truth = _batch_record("convnet:width=8", 16, 0)
    ctx_model = attack_model(record, "cpu")
    from gia_bench.attacks.labels import LabelContext, find_head

    meta = record.meta
    ctx = LabelContext(
        [g.float() for g in decode_record(record)], find_head(ctx_model, meta.param_names, 10), 16, 10, ctx_model,
        meta.dataset.shape, torch.Generator().manual_seed(0),
    )
    original = LABELS.create("ilrg", min_signal=0.0).infer(ctx)
    assert sorted(original.tolist()) != sorted(truth.labels.tolist())
    assert sorted(LABELS.create("ilrg").infer(ctx).tolist()) == sorted(truth.labels.tolist())


def test_llg_counts_a_batch_of_16_on_a_batchnorm_model():
    record, truth = _batch_record("convnet:width=8", 16, 1)
    labels = _infer(record, "llg")
    assert sorted(labels.tolist()) == sorted(truth.labels.tolist())


def test_labels_from_a_fedavg_update():
    # two full-batch local steps with a small lr: the update is about twice the gradient, and
    # infer_labels divides by K; with larger lr * K the model drifts and the counts degrade
    # (benchmarks/labels.py --fedavg measures it)
    record, truth = _batch_record("mlp:hidden=300", 16, 0, local=LocalTraining(2, 0.01))
    assert record.meta.local_steps == 2
    for strategy in ("ilrg", "bias-corrected"):
        assert sorted(_infer(record, strategy).tolist()) == sorted(truth.labels.tolist()), strategy


def test_round_counts_is_largest_remainder():
    assert round_counts(torch.tensor([1.6, 0.7, 1.7, -0.4]), 4).tolist() == [1, 1, 2, 0]
    assert round_counts(torch.tensor([2.3, 2.1, 2.2]), 4).tolist() == [2, 1, 1]  # too many: smallest remainders lose
    counts = round_counts(torch.tensor([3.4, -1.0, 0.2, 9.9]), 13)
    assert int(counts.sum()) == 13 and bool((counts >= 0).all())
    assert counts_to_labels(torch.tensor([0, 2, 1])).tolist() == [1, 1, 2]


def test_every_attack_takes_the_new_strategies():
    for spec in ("dlg:labels=ilrg", "ig:labels=llg", "analytic:labels=ilrg", "ig:labels=mean-embedding"):
        assert create_attack(spec).labels in ("ilrg", "llg", "mean-embedding")


@pytest.mark.parametrize("index", [2, 6])
def test_mean_embedding_counts_a_batch_of_32_where_dummy_and_ilrg_estimates_fail(index):
    # untrained BatchNorm ConvNet, 10 classes, batch 32: the summed posteriors S from N(0, 1)
    # dummies (bias-corrected) and iLRG's per-class embeddings both miscount these batches;
    # the mean embedding regressed from the gradient itself gets the whole multiset
    record, truth = _batch_record("convnet:width=16", 32, index)
    model = attack_model(record, "cpu")
    true = sorted(truth.labels.tolist())
    for old in ("bias-corrected", "ilrg"):
        assert sorted(infer_labels(record, model, old, torch.Generator().manual_seed(0))[1].tolist()) != true, old
    assert sorted(infer_labels(record, model, "mean-embedding", torch.Generator().manual_seed(0))[1].tolist()) == true


def test_mean_embedding_regresses_the_batch_mean_embedding_from_the_gradient():
    # B dW_c = B db_c mu - k_c D_c + ...: the regression's mean embedding is nearer the batch's
    # true one than the dummies' mean, and its counts are nearer the truth than the dummies'
    from gia_bench.attacks.labels import (
        LabelContext,
        MeanEmbedding,
        find_head,
        head_inputs,
    )

    record, truth = _batch_record("convnet:width=16", 32, 2)
    model = attack_model(record, "cpu")
    meta = record.meta
    head = find_head(model, meta.param_names, 10)
    ctx = LabelContext(
        [g.float() for g in decode_record(record)], head, 32, 10, model, meta.dataset.shape, torch.Generator().manual_seed(0)
    )
    h_true, _ = head_inputs(ctx, truth.inputs)
    h_dummy, p_dummy = head_inputs(ctx, torch.randn((32, *meta.dataset.shape), generator=torch.Generator().manual_seed(1)))
    dw, db = ctx.weight_grad.double(), ctx.bias_grad.double()
    mu_true = h_true.double().mean(0)
    mu_gradient = (db @ dw) / (db @ db)  # step 1's first pass
    assert (mu_gradient - mu_true).norm() < 0.5 * (h_dummy.double().mean(0) - mu_true).norm()
    true = torch.bincount(truth.labels, minlength=10).double()
    counts = MeanEmbedding().counts(ctx)
    dummy_counts = 32 * (p_dummy.double().mean(0) - db)
    assert (counts - true).abs().max() < 0.5 < (dummy_counts - true).abs().max()


def test_mean_embedding_refuses_a_head_without_bias_and_bad_parameters():
    from torch import nn

    from gia_bench.attacks.base import AttackError
    from gia_bench.attacks.labels import Head, LabelContext, MeanEmbedding

    head = Head(nn.Linear(4, 3, bias=False), 0, None)
    ctx = LabelContext([torch.zeros(3, 4)], head, 2, 3, nn.Linear(4, 3, bias=False), (1, 2, 2), torch.Generator())
    with pytest.raises(AttackError, match="bias"):
        MeanEmbedding().infer(ctx)
    for bad in ({"repeats": 0}, {"iterations": 0}, {"floor": 0.0}, {"spectrum": -1.0}, {"spectrum": 9.0}):
        with pytest.raises(AttackError, match="mean-embedding"):
            MeanEmbedding(**bad)


def _photos_record(model: str, batch: int, index: int, seed: int = 1):
    """As :func:`_batch_record`, on photos (one class per photograph: classes far apart in embedding space)."""
    data = dataset("photos")
    indices = batch_indices(len(data), batch, index + 1, seed=seed)[index]
    inputs, labels = data.batch(indices)
    spec = ModelSpec(model, data.spec.shape, data.spec.num_classes, "train")
    net = build_model(spec, seed=index)
    return capture_batch(net, spec, data.spec, inputs, labels, create_defense("none"), f"b{index}")


def test_posterior_rounding_is_the_weighted_nearest_integer_vector():
    import itertools

    from gia_bench.attacks.labels import posterior_rounding

    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.rand(4, generator=gen, dtype=torch.float64) * 3 - 0.5
        s = torch.rand(4, generator=gen, dtype=torch.float64) * 3 + 0.1
        got = posterior_rounding(x, s, 5)
        assert int(got.sum()) == 5 and bool((got >= 0).all())

        def cost(k, x=x, s=s):
            return float((((torch.tensor(k, dtype=torch.float64) - x) / s) ** 2).sum())

        best = min((k for k in itertools.product(range(6), repeat=4) if sum(k) == 5), key=cost)
        assert cost(got.tolist()) == pytest.approx(cost(best))
        # with lower bounds: the optimum over k >= minimum
        low = (torch.rand(4, generator=gen) < 0.5).double()
        got = posterior_rounding(x, s, 5, minimum=low)
        assert int(got.sum()) == 5 and bool((got >= low).all())
        best = min((k for k in itertools.product(range(6), repeat=4)
                    if sum(k) == 5 and all(a >= b for a, b in zip(k, low.tolist()))), key=cost)
        assert cost(got.tolist()) == pytest.approx(cost(best))
    # equal S: largest remainders; a class with a small S (its count is the surest) is rounded
    # to its nearest integer, the error goes to the classes with large S
    x = torch.tensor([1.32, 1.28, 0.4])
    assert posterior_rounding(x, torch.ones(3), 3).tolist() == round_counts(x, 3).tolist() == [1, 1, 1]
    assert posterior_rounding(x, torch.tensor([4.0, 4.0, 0.5]), 3).tolist() == [2, 1, 0]
    assert posterior_rounding(x, torch.tensor([4.0, 4.0, 0.5]), 3, minimum=torch.tensor([0, 0, 1])).tolist() == [1, 1, 1]
    # more classes with a minimum than images: the first ones by index keep theirs
    assert posterior_rounding(x, torch.ones(3), 2, minimum=torch.ones(3)).tolist() == [1, 1, 0]


def test_mean_embedding_eb_shrinks_by_the_regression_noise():
    from gia_bench.attacks.labels import MeanEmbeddingEB

    eb = MeanEmbeddingEB()
    db = torch.tensor([0.2, -0.3, 0.1], dtype=torch.float64)
    mu, dummy = torch.tensor([1.0, 2.0, 0.5, 0.0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    a = db / (db * db).sum()  # the regression's class weights, equal w_c
    # rows exactly proportional to the bias gradient: no class deviations, the regression is kept
    assert torch.allclose(eb._combine(db[:, None] * mu, db, a, mu, dummy), mu)
    # rows that are all deviation around a mean equal to the dummies': the dummies' mean is kept
    dw = torch.randn((3, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    regressed = a @ dw
    assert torch.allclose(eb._combine(dw, db, a, regressed, regressed), regressed)
    out = eb._combine(dw, db, a, regressed, dummy)  # in between, on the segment
    lam = float(out @ regressed / (regressed @ regressed))
    assert 0 <= lam <= 1 and torch.allclose(out, lam * regressed)


def test_mean_embedding_eb_counts_a_batch_of_16_exactly():
    record, truth = _batch_record("convnet:width=8", 16, 0)
    assert len(set(truth.labels.tolist())) < 16
    assert sorted(_infer(record, "mean-embedding-eb").tolist()) == sorted(truth.labels.tolist())


def test_mean_embedding_eb_counts_a_photos_batch_of_32_where_the_others_miss():
    # photos: the classes' mean embeddings differ; the regression alone, and the shrinkage towards
    # white-spectrum dummies, err here; dummies of the spectrum chosen from the gradient do not
    record, truth = _photos_record("convnet:width=16", 32, 6)
    model = attack_model(record, "cpu")
    true = sorted(truth.labels.tolist())
    for old in ("bias-corrected", "ilrg", "mean-embedding", "mean-embedding-eb:spectrum=0"):
        assert sorted(infer_labels(record, model, old, torch.Generator().manual_seed(0))[1].tolist()) != true, old
    got = infer_labels(record, model, "mean-embedding-eb", torch.Generator().manual_seed(0))[1]
    assert sorted(got.tolist()) == true
    assert create_attack("ig:labels=mean-embedding-eb").labels == "mean-embedding-eb"


def _radial_slope(x: torch.Tensor) -> float:
    """Log-log slope of the radially averaged power spectrum of images ``x`` (n, c, h, w)."""
    power = (torch.fft.fft2(x).abs() ** 2).mean(dim=(0, 1))
    h, w = power.shape
    f = (torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w) ** 2).sqrt()
    keep = (f > 1.5 / h) & (f < 0.35)
    return float(torch.linalg.lstsq(
        torch.stack([f[keep].log(), torch.ones(int(keep.sum()))], dim=1), power[keep].log()[:, None]
    ).solution[0, 0])


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
def test_coloured_noise_has_the_asked_spectrum_and_standard_channels(exponent):
    from gia_bench.attacks.labels import coloured_noise

    x = coloured_noise(64, (3, 32, 32), exponent, torch.Generator().manual_seed(0))
    assert x.shape == (64, 3, 32, 32)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5)
    assert _radial_slope(x) == pytest.approx(-2 * exponent, abs=0.25)  # power falls as 1/f^(2 e)
    # one luminance field plus 0.3 of a field per channel: correlation 1 / 1.09 between channels
    c = torch.corrcoef(x.transpose(0, 1).flatten(1))
    assert float(c[0, 1]) == pytest.approx(1 / 1.09, abs=0.02)


@pytest.mark.parametrize("exponent", [0.0, 2.5])
def test_spectrum_auto_finds_the_spectrum_of_the_batch(exponent):
    # a batch of coloured noise of a known spectrum: the exponent chosen from its gradient alone
    from gia_bench.attacks.labels import (
        SPECTRA,
        LabelContext,
        MeanEmbeddingEB,
        coloured_noise,
        find_head,
    )

    data = dataset("digits")
    inputs = coloured_noise(32, data.spec.shape, exponent, torch.Generator().manual_seed(5))
    labels = torch.randint(10, (32,), generator=torch.Generator().manual_seed(5))
    spec = ModelSpec("convnet:width=8", data.spec.shape, 10, "train")
    record, _ = capture_batch(build_model(spec, seed=0), spec, data.spec, inputs, labels, create_defense("none"), "n")
    model = attack_model(record, "cpu")
    head = find_head(model, record.meta.param_names, 10)
    ctx = LabelContext([g.float() for g in decode_record(record)], head, 32, 10, model, data.spec.shape,
                       torch.Generator().manual_seed(0))
    dw, db = ctx.weight_grad.double().flatten(1), ctx.bias_grad.double()
    chosen, embeddings = MeanEmbeddingEB().dummy_embeddings(ctx, dw, db)
    assert chosen in SPECTRA and abs(chosen - exponent) <= 0.5
    assert len(embeddings) == 4 and embeddings[0].shape == (32, dw.shape[1])
    fixed, _ = MeanEmbeddingEB(spectrum=1.5).dummy_embeddings(ctx, dw, db)
    assert fixed == 1.5
