"""The report's text rules: the token-bag floor, when a sentence beats it, the verdict, the reconstruction file."""

import types
from pathlib import Path

import pytest

from gia_bench.reports import stats
from gia_bench.reports.text_scores import (
    SentenceRow,
    TextSetting,
    floor_order,
    floor_scores,
    read_reconstruction_text,
)
from gia_bench.results import Budget

pytest.importorskip("rouge_score")

SENTENCE = list(range(101, 121))  # 20 distinct token ids


def test_the_floor_is_the_sentences_own_bag_in_a_seeded_random_order():
    order = floor_order(SENTENCE, "rec-0", 0)
    assert sorted(order) == SENTENCE and order != SENTENCE
    assert floor_order(SENTENCE, "rec-0", 0) == order  # every attack on that record faces the same floor
    assert floor_order(SENTENCE, "rec-0", 1) != order and floor_order(SENTENCE, "rec-1", 0) != order
    scores = floor_scores(SENTENCE, "rec-0", 0)
    assert scores["rouge1"] == 1.0  # the same bag
    assert scores["rouge2"] < 0.3 and scores["rougeL"] < 0.6  # the order is gone


def _row(r2: float, rl: float, floor: dict | None) -> SentenceRow:
    return SentenceRow("pii", "minilm", "none", "dager", "naive", 0, "capture", "r", 0, 0, 20,
                       {"rouge1": 1.0, "rouge2": r2, "rougeL": rl}, floor, 1, 1, 1, 0.0, "x")  # fmt: skip


def test_a_sentence_beats_the_floor_only_when_rouge2_and_rougeL_both_exceed_it():
    floor = {"rouge1": 1.0, "rouge2": 0.1, "rougeL": 0.3}
    assert _row(0.5, 0.6, floor).beats is True
    assert _row(0.5, 0.3, floor).beats is False  # ROUGE-L only ties
    assert _row(0.1, 0.9, floor).beats is False  # ROUGE-2 only ties
    assert _row(1.0, 1.0, None).beats is None  # no original stored: no floor, no claim


def _setting(rows) -> TextSetting:
    return TextSetting("pii", "minilm", "none", "dager", "naive", 0, "capture", Budget(0, 1), (), tuple(rows), {})


def test_the_verdict_is_the_image_sign_test_on_sentences():
    floor = {"rouge1": 1.0, "rouge2": 0.1, "rougeL": 0.3}
    six = _setting([_row(1.0, 1.0, floor)] * 6)
    assert six.verdict().verdict == stats.LEAKS and six.verdict().beats == 6  # p = 1/64 < 0.05
    # picked out of 4 attacker settings: level 0.0125 needs 7 sentences, 6 of 6 cannot reach it
    assert six.verdict(comparisons=4).verdict == stats.TOO_FEW
    bag = _setting([_row(0.05, 0.2, floor)] * 8)  # a token bag in some order: nothing beyond the floor
    assert bag.verdict().verdict == stats.FLOOR and bag.verdict().beats == 0
    assert six.mean("rouge2") == 1.0 and six.floor_mean("rougeL") == 0.3


def test_reconstruction_text_is_split_into_pairs_and_left_as_text(tmp_path: Path):
    (tmp_path / "reconstruction.txt").write_text(
        "#0 reconstruction: [[CLS]] [a] <script>\n#0 original:       [CLS] a <script>\n"
        "#1 reconstruction: [b]\n#1 original:       b c\n"
    )
    res = types.SimpleNamespace(path=tmp_path / "result.json", folder=tmp_path)
    assert read_reconstruction_text(res) == [("[[CLS]] [a] <script>", "[CLS] a <script>"), ("[b]", "b c")]
    assert read_reconstruction_text(res, limit=1) == [("[[CLS]] [a] <script>", "[CLS] a <script>")]
    assert read_reconstruction_text(types.SimpleNamespace(path=tmp_path / "gone" / "result.json",
                                                          folder=tmp_path / "gone")) == []  # fmt: skip
