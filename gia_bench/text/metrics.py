"""Text metrics on token ids: ROUGE-1/2/L, token F1, exact-sequence rate, PII fields recovered exactly.

Every function takes a reconstruction and the original as text batches (B, 1, 3, T) in the
layout of :mod:`gia_bench.text.data` and returns one value per original sentence. Only
non-padding tokens count (attention-mask row 1); special tokens ([CLS], [SEP]) are tokens
like any other. Reconstructed sentences are paired with the originals by the assignment that
maximises ROUGE-1 (Hungarian; an attack's sentence order is arbitrary).

* ``rouge1`` / ``rouge2`` / ``rougeL``: F-measures of ``rouge-score`` (Lin 2004) computed on
  the token-id sequences (one "word" per token id, no stemming): no detokenization in between.
* ``token_f1``: F1 of the *batch's* distinct token ids (recovered set vs. true set): what a
  token-bag attack can recover, independent of how it splits tokens into sentences; the same
  value for every sentence of a batch.
* ``exact``: 1 when the paired sentence's token sequence equals the original's, else 0.
* ``pii``: the fraction of the sentence's PII fields (field row of the truth) whose token-id
  sequence occurs contiguously in the paired reconstruction; None for a sentence with no field.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from gia_bench.text.data import split_rows


def sequences(batch: torch.Tensor) -> list[list[int]]:
    """The non-padding token ids of each sentence of a text batch."""
    ids, mask, _ = split_rows(batch)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def pii_fields(batch: torch.Tensor) -> list[list[list[int]]]:
    """Per sentence, the token-id sequence of each PII field (maximal runs of one field code)."""
    ids, mask, field = split_rows(batch)
    out = []
    for row, m, f in zip(ids.tolist(), mask.tolist(), field.tolist()):
        runs: list[list[int]] = []
        previous = 0
        for token, on, code in zip(row, m, f):
            code = code if on else 0
            if code and code == previous:
                runs[-1].append(token)
            elif code:
                runs.append([token])
            previous = code
        out.append(runs)
    return out


class _IdTokenizer:
    """rouge-score tokenizer for space-separated token ids."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@functools.cache
def _scorer():
    from gia_bench.text.deps import require

    rouge_scorer = require("rouge_score.rouge_scorer", "the ROUGE metrics")
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=_IdTokenizer())


def rouge(candidate: list[int], reference: list[int]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of two token-id sequences."""
    if not candidate or not reference:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    scores = _scorer().score(" ".join(map(str, reference)), " ".join(map(str, candidate)))
    return {k: float(v.fmeasure) for k, v in scores.items()}


def pair_sentences(rec: list[list[int]], orig: list[list[int]]) -> list[int]:
    """For each original i, the reconstruction paired with it (max total ROUGE-1; B_rec >= B_orig)."""
    gain = np.array([[rouge(r, o)["rouge1"] for r in rec] for o in orig])
    rows, cols = linear_sum_assignment(-gain)
    paired = [0] * len(orig)
    for i, j in zip(rows, cols):
        paired[int(i)] = int(j)
    return paired


def _sets_f1(predicted: set[int], true: set[int]) -> float:
    if not predicted or not true:
        return float(predicted == true)
    hits = len(predicted & true)
    return 0.0 if hits == 0 else 2 * hits / (len(predicted) + len(true))


def token_f1(rec: torch.Tensor, orig: torch.Tensor) -> float:
    """F1 of the batch's distinct non-padding token ids (recovered vs. true)."""
    return _sets_f1({t for s in sequences(rec) for t in s}, {t for s in sequences(orig) for t in s})


def _occurs(needle: list[int], haystack: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


@dataclasses.dataclass(frozen=True)
class TextScores:
    """``paired[i]``: the reconstruction paired with original ``i``; ``values[key][i]``: its scores."""

    paired: tuple[int, ...]
    values: dict[str, list[float | None]]


KEYS = ("rouge1", "rouge2", "rougeL", "token_f1", "exact", "pii")


def score_text(rec: torch.Tensor, orig: torch.Tensor) -> TextScores:
    """Every text metric (:data:`KEYS`), one value per original sentence, after pairing."""
    rec_s, orig_s = sequences(rec), sequences(orig)
    paired = pair_sentences(rec_s, orig_s)
    f1 = token_f1(rec, orig)
    out: dict[str, list[float | None]] = {k: [] for k in KEYS}
    for i, (o, fields) in enumerate(zip(orig_s, pii_fields(orig))):
        r = rec_s[paired[i]]
        for key, value in rouge(r, o).items():
            out[key].append(value)
        out["token_f1"].append(f1)
        out["exact"].append(float(r == o))
        out["pii"].append(sum(_occurs(f, r) for f in fields) / len(fields) if fields else None)
    return TextScores(tuple(paired), out)


def _one(key: str) -> Callable[[torch.Tensor, torch.Tensor], list[float | None]]:
    return lambda rec, orig: score_text(rec, orig).values[key]


def rouge_unavailable() -> str | None:
    import importlib.util

    from gia_bench.text.deps import INSTALL

    return None if importlib.util.find_spec("rouge_score") else f"ROUGE unavailable: no 'rouge_score' ({INSTALL})"


def text_metrics():
    """The text entries of :data:`gia_bench.metrics.METRICS`."""
    from gia_bench.metrics import Metric

    rouge_note = "on token ids (rouge-score F-measure), sentences paired by max ROUGE-1"
    return [
        Metric("rouge1", "ROUGE-1", _one("rouge1"), "higher", False, "text", f"ROUGE-1 F {rouge_note}",
               unavailable=rouge_unavailable),
        Metric("rouge2", "ROUGE-2", _one("rouge2"), "higher", False, "text", f"ROUGE-2 F {rouge_note}",
               unavailable=rouge_unavailable),
        Metric("rougeL", "ROUGE-L", _one("rougeL"), "higher", False, "text", f"ROUGE-L F {rouge_note}",
               unavailable=rouge_unavailable),
        Metric("token_f1", "token F1", _one("token_f1"), "higher", False, "text",
               "F1 of the batch's distinct non-padding token ids (recovered bag vs. true bag)"),
        Metric("exact", "exact", _one("exact"), "higher", False, "text",
               "1 when the paired sentence's tokens equal the original's (mean: exact-sequence rate)",
               unavailable=rouge_unavailable),
        Metric("pii", "PII", _one("pii"), "higher", False, "text",
               "fraction of the sentence's PII fields whose tokens occur contiguously in the reconstruction",
               unavailable=rouge_unavailable),
    ]
