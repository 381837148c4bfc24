"""Text metrics: identities, pairing, and each metric's response to a known change."""

import math

import torch

from gia_bench.metrics import METRICS
from gia_bench.text.data import join_rows
from gia_bench.text.metrics import KEYS, score_text, token_f1


def _batch(sentences, fields=None, length=8):
    ids = torch.zeros(len(sentences), length, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    field = torch.zeros_like(ids)
    for i, s in enumerate(sentences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        if fields:
            field[i, : len(fields[i])] = torch.tensor(fields[i])
    return join_rows(ids, mask, field)


def test_text_metrics_are_registered_with_their_keys():
    assert all(METRICS[k].modality == "text" and METRICS[k].direction == "higher" for k in KEYS)
    assert METRICS["ssim"].modality == "image"


def test_identical_batches_score_one_in_any_order():
    orig = _batch([[101, 5, 6, 7, 102], [101, 8, 9, 102]], fields=[[0, 1, 1, 0, 0], [0, 2, 0, 0]])
    scores = score_text(orig.flip(0), orig)
    assert scores.paired == (1, 0)
    for key in KEYS:
        assert scores.values[key] == [1.0, 1.0]


def test_one_wrong_token_lowers_rouge_exact_and_pii():
    orig = _batch([[101, 5, 6, 7, 102]], fields=[[0, 1, 1, 0, 0]])
    rec = _batch([[101, 5, 9, 7, 102]])
    v = score_text(rec, orig).values
    assert math.isclose(v["rouge1"][0], 0.8) and math.isclose(v["rouge2"][0], 0.5)
    assert v["exact"] == [0.0] and v["pii"] == [0.0]  # the field (5, 6) is not recovered
    assert math.isclose(v["token_f1"][0], 0.8)  # {101,5,7,102} of 5 each side


def test_token_f1_ignores_padding_order_and_sentence_split():
    orig = _batch([[1, 2, 3], [4, 5]])
    bag = _batch([[5, 4, 3, 2, 1], []])
    assert token_f1(bag, orig) == 1.0
    assert score_text(_batch([[3, 2, 1], [4, 5]]), orig).values["rouge1"][0] == 1.0  # ROUGE-1 ignores order
    assert score_text(_batch([[3, 2, 1], [4, 5]]), orig).values["exact"][0] == 0.0


def test_pii_is_none_without_fields_and_counts_fields_found_anywhere():
    orig = _batch([[1, 2, 3, 4, 5, 6]], fields=[[0, 1, 1, 0, 3, 0]])
    rec = _batch([[7, 2, 3, 8, 8]])  # field (2, 3) found shifted, field (5,) missing
    assert score_text(rec, orig).values["pii"] == [0.5]
    assert score_text(rec, _batch([[1, 2]])).values["pii"] == [None]
