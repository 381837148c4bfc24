import pytest
import torch

from gia_bench.attacks.base import AttackError
from gia_bench.attacks.labels import infer_labels
from gia_bench.attacks.matching import attack_model

from conftest import make_record, pick

# four images of four different photos (one class per photo)
DISTINCT = pick("photos", (0, 2, 7, 9))


@pytest.mark.parametrize("model", ["lenet", "mlp:hidden=64", "convnet:width=8"])
@pytest.mark.parametrize("strategy", ["auto", "bias-corrected", "yin"])
def test_batch_labels_recovered_with_distinct_labels(model, strategy):
    record, truth = make_record(model, "photos", DISTINCT, mode="eval")
    name, labels = infer_labels(record, attack_model(record, "cpu"), strategy, torch.Generator().manual_seed(0))
    assert name == ("mean-embedding-eb" if strategy == "auto" else strategy)
    assert sorted(labels.tolist()) == sorted(truth.labels.tolist())


def test_bias_corrected_counts_repeated_labels():
    # two images each of two classes: the counts come from the bias gradient
    record, truth = make_record("mlp:hidden=64", "photos", pick("photos", (1, 1, 4, 4)))
    _, labels = infer_labels(record, attack_model(record, "cpu"), "bias-corrected", torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == sorted(truth.labels.tolist())


def test_idlg_refuses_batches():
    record, _ = make_record("lenet", "photos", DISTINCT[:2])
    with pytest.raises(AttackError, match="batch size 1"):
        infer_labels(record, attack_model(record, "cpu"), "idlg", torch.Generator())
