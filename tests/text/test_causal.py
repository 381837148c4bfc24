"""The causal-LM task: the loss is the next-token cross-entropy over non-padding tokens; DAGER still reads it."""

import pytest
import torch

from gia_bench.attacks import create as create_attack
from gia_bench.capture import capture_batch, compute_gradient
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.errors import SpecError
from gia_bench.models import ModelSpec, build_model
from gia_bench.text.causal import IGNORE, targets_for
from gia_bench.text.data import split_rows
from gia_bench.text.metrics import score_text

LM = "transformer:d=64,layers=2,vocab=30522,arch=llama,task=lm"


@pytest.fixture(scope="module")
def batch():
    data = load_dataset("pii", split="test")
    return data, *data.batch([0, 1, 2])


def _reference_loss(model, x):
    """The next-token loss written out: every non-padding token after the first, predicted from its prefix."""
    ids, mask, _ = split_rows(x)
    logits = model.net(input_ids=ids, attention_mask=mask).logits
    terms = [torch.nn.functional.cross_entropy(logits[b, t - 1 : t], ids[b, t : t + 1])
             for b in range(ids.shape[0]) for t in range(1, int(mask[b].sum()))]
    return torch.stack(terms).mean()


def test_the_loss_is_the_next_token_cross_entropy_and_labels_play_no_part(batch):
    data, x, y = batch
    model = build_model(ModelSpec(LM, data.spec.shape, 4, "eval"), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.nn.functional.cross_entropy(model(x), targets_for(model, x, y))
    ref = _reference_loss(model, x)
    torch.testing.assert_close(got, ref)
    for a, b in zip(compute_gradient(model, x, y), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    other = compute_gradient(model, x, (y + 1) % 4)
    assert all(torch.equal(a, b) for a, b in zip(other, compute_gradient(model, x, y)))
    # a classifier names no targets: its labels are scored
    classifier = build_model(ModelSpec(LM.replace(",task=lm", ""), data.spec.shape, 4, "eval"), seed=0)
    assert targets_for(classifier, x, y) is y


def test_padding_is_not_a_target(batch):
    """Only pairs of non-padding tokens count: changing the ids under the padding changes nothing."""
    data, x, y = batch
    model = build_model(ModelSpec(LM, data.spec.shape, 4, "eval"), seed=0)
    _, mask, _ = split_rows(x)
    assert (mask == 0).any()
    other = x.clone()
    other[:, 0, 0][mask == 0] = 7.0
    loss = torch.nn.functional.cross_entropy(model(x), targets_for(model, x, y))
    torch.testing.assert_close(torch.nn.functional.cross_entropy(model(other), targets_for(model, other, y)), loss)
    assert (targets_for(model, x, y) == IGNORE).sum() == (mask[:, 1:] == 0).sum()


def test_lm_task_needs_a_decoder():
    with pytest.raises(SpecError, match="arch=llama"):
        build_model(ModelSpec("transformer:task=lm", (1, 3, 16), 4, "eval"), seed=0)


def test_dager_recovers_sentences_from_the_lm_task_gradient(batch):
    """DAGER reads the first two layers only: the causal-LM head changes nothing for it."""
    data, x, y = batch
    spec = ModelSpec(LM, data.spec.shape, 4, "eval")
    model = build_model(spec, seed=0)
    torch.manual_seed(0)
    record, truth = capture_batch(model, spec, data.spec, x[:1], y[:1], create_defense("none"), "lm")
    assert "task=lm" in record.meta.model.spec
    rec = create_attack("dager").run(record, "naive", torch.Generator())
    values = score_text(rec.inputs, truth.inputs).values
    assert values["rouge1"][0] >= 0.9, (values, rec.extra)


def test_training_the_lm_task_lowers_its_loss_and_reports_next_token_accuracy(tmp_path):
    """One worker, two epochs of SGD on the next-token loss: the loss falls from ln(V) and the test accuracy is
    next-token top-1 (a class accuracy would read argmax over 30,522 logits against labels 0..3: ~0)."""
    import json
    import math

    from gia_bench.train import TrainConfig, launch

    out = tmp_path / "run"
    launch(TrainConfig(out=out, dataset="pii:size=40", model="transformer:d=32,layers=1,vocab=30522,arch=llama,task=lm",
                       defense="none", nproc_per_node=1, epochs=2, batch_size=8, lr=0.5, timeout_s=120), fork=True)
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [e["train_loss"] for e in metrics["epochs"]]
    assert losses[0] < math.log(30522) and losses[-1] < losses[0]
    assert all(0.05 < e["test_accuracy"] < 1.0 for e in metrics["epochs"])  # frequent tokens (".", "-") learnt
