"""``tokens``: the batch's token bag from the rows of the word-embedding gradient that are used.

The gradient of the word-embedding table E (V x d) is ``sum_{b,t} e_{x_bt} g_bt^T``: row v is
non-zero only when token v occurs in the batch (Melis et al. 2019, "Exploiting Unintended
Feature Leakage"; the first step of DAGER, Petrov et al. 2024, and of LAMP). So the bag of
tokens (without counts and without order) is the set of rows that carry gradient. What the
receiver decodes keeps that support through every compressor but noise:

* ``none``, ``qsgd``, ``topk``: unused rows decode to exact zeros (QSGD rounds 0 to 0, Top-k
  sends no entry there; a used row vanishes only if all its d entries are dropped);
* ``powersgd`` / ``lqsgd``: the decoded matrix is P Q^T with P = M Q: a zero row of M gives a
  zero row of P (LQ-SGD's log-quantizer codes 0 as 0), so the decoded row support is P's;
* ``signsgd``: every entry is sent as +-scale, zeros as +scale: unused rows decode to the
  constant row (+scale, ..., +scale) and used rows have both signs.

LQ-SGD's log code rounds a row's P entry to magnitude 0 when it is below about 1e-3 of the
tensor's largest: the decoded row is then zero and the token is lost to the decoded gradient.
But the code keeps the sign bit: a used row whose P entry was negative arrives as "minus,
magnitude 0" (a signed zero), which no unused row can send (its P entry is exactly 0, coded
plus). The aware bag reads those rows from the message too (:func:`signed_zero_rows`), after
the rows the decoded gradient shows; a positive entry rounded to 0 is lost to any reader.

Views, each with a relative threshold (a row is used when its statistic exceeds
``threshold`` times the largest row's):

* ``naive``: the statistic is the row's L2 norm (the attack as published). Under signSGD every
  row has the same norm, so it returns every token (precision ~0);
* ``aware``: the statistic is the row's spread, max - min: zero for an unused row under every
  compressor above (the constant row of signSGD included) and > 0 for a used row unless all its
  entries are equal. On the other compressors it selects the same rows as the norm.

The reconstruction holds the bag in the text layout: tokens in decreasing row norm (aware: the
spread breaks ties, so where both views select the same rows they give the same bag), filling
the B sentences in turn (a bag larger than B x T is cut to its B x T strongest rows); the
labels come from the classifier bias gradient (negative for the true class, iDLG).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

from gia_bench.attacks.base import Attack, AttackError, Reconstruction, register
from gia_bench.models import build_model
from gia_bench.receiver import decode_record
from gia_bench.records import GradientRecord
from gia_bench.registry import Range
from gia_bench.text.data import is_text, join_rows

THRESHOLD = Range(0.0, 1.0)


def embedding_name(record: GradientRecord) -> str:
    """The parameter name of the record model's word-embedding table (model built on meta: no weights read)."""
    from gia_bench.text.models import TextClassifier

    with torch.device("meta"):
        model = build_model(record.meta.model, seed=None, device=None)
    if not isinstance(model, TextClassifier):
        raise AttackError(f"attack 'tokens' needs a text model, the record's is {record.meta.model.spec!r}")
    table = model.embedding.weight
    return next(n for n, p in model.named_parameters() if p is table)


def row_statistic(gradient: torch.Tensor, view: str) -> torch.Tensor:
    """Per row of the decoded embedding gradient: L2 norm (naive) or max - min (aware)."""
    g = gradient.to(torch.float64)
    if view == "naive":
        return g.norm(dim=1)
    return g.max(dim=1).values - g.min(dim=1).values


def token_bag(gradient: torch.Tensor, view: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, their statistic), strongest first, of the rows above ``threshold`` x the largest."""
    stat = row_statistic(gradient, view)
    top = float(stat.max()) if stat.numel() else 0.0
    if not math.isfinite(top) or top <= 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    used = torch.nonzero(stat > threshold * top).flatten()
    order = torch.argsort(stat[used], descending=True, stable=True)
    if view == "aware":  # laid out by the naive statistic, the spread breaking ties (signSGD: all norms
        # equal): where both views select the same rows, the aware bag is the naive one, never weaker
        norm = row_statistic(gradient[used[order]], "naive")
        order = order[torch.argsort(norm, descending=True, stable=True)]
    return used[order], stat[used][order]


def signed_zero_rows(record: GradientRecord, index: int) -> torch.Tensor:
    """Rows of parameter ``index`` whose LQ-SGD P codes are all magnitude 0 with one sign bit set:
    used rows the decoded gradient shows as zero (empty for other compressors and warm-up steps)."""
    from gia_bench.receiver import record_compressor
    from gia_bench.registry import parse_spec

    if parse_spec(record.meta.defense).name != "lqsgd" or "grads" in record.messages:
        return torch.zeros(0, dtype=torch.int64)
    compressor = record_compressor(record)
    shapes = [torch.Size(s) for s in record.param_shapes]
    plan = compressor.plan(shapes)
    group = next((g for g in plan.groups if index in g.indices), None)
    if group is None:  # the tensor went in the rest, uncompressed by the factors
        return torch.zeros(0, dtype=torch.int64)
    P = compressor.message_values(record.messages, shapes, record.public)["P"]
    rows = P[group.p_offset : group.p_offset + group.p_numel].view(group.count, group.n, group.r)
    rows = rows[group.indices.index(index)]
    return torch.nonzero((rows == 0).all(dim=1) & torch.signbit(rows).any(dim=1)).flatten()


def record_bag(record: GradientRecord, gradient: torch.Tensor, index: int, view: str, threshold: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_bag` of the decoded ``gradient`` (parameter ``index`` of ``record``); the aware
    view appends the rows only the message shows (:func:`signed_zero_rows`), with statistic 0."""
    bag, stat = token_bag(gradient, view, threshold)
    if view != "aware":
        return bag, stat
    extra = signed_zero_rows(record, index)
    extra = extra[~torch.isin(extra, bag)]
    return torch.cat([bag, extra]), torch.cat([stat, torch.zeros(extra.numel(), dtype=stat.dtype)])


def bag_batch(bag: torch.Tensor, batch: int, length: int, pad: int = 0) -> torch.Tensor:
    """The bag laid out as a (B, 1, 3, T) text batch, filling sentence after sentence."""
    bag = bag[: batch * length]
    ids = torch.full((batch * length,), pad, dtype=torch.int64)
    mask = torch.zeros(batch * length, dtype=torch.int64)
    ids[: bag.numel()] = bag
    mask[: bag.numel()] = 1
    return join_rows(ids.reshape(batch, length), mask.reshape(batch, length))


def bias_labels(record: GradientRecord, decoded: list[torch.Tensor]) -> tuple[torch.Tensor, str]:
    """The B most negative entries of the classifier bias gradient (iDLG); zeros without such a bias."""
    batch = record.meta.batch_size
    names = list(record.meta.param_names)
    bias = [i for i, n in enumerate(names) if n.endswith("classifier.bias")]
    if not bias:
        return torch.zeros(batch, dtype=torch.int64), "none"
    order = torch.argsort(decoded[bias[0]].to(torch.float64))
    return order.repeat(math.ceil(batch / order.numel()))[:batch].to(torch.int64), "bias-sign"


@register("tokens")
class Tokens(Attack):
    """Token bag from the word-embedding gradient's row support (naive: row norm; aware: row spread).

    Args:
        threshold: a row is used when its statistic exceeds threshold x the largest row's.
    """

    views = ("naive", "aware")

    def __init__(self, threshold: Annotated[float, THRESHOLD] = 1e-6) -> None:
        self.threshold = float(threshold)

    def run(self, record, view, generator, progress=None, device="cpu") -> Reconstruction:
        self.check_view(view)
        spec = record.meta.dataset
        if not is_text(spec):
            raise AttackError(f"attack 'tokens' needs a text record, {record.meta.record_id} holds {spec.name!r}")
        name = embedding_name(record)
        decoded = decode_record(record)
        index = list(record.meta.param_names).index(name)
        bag, stat = record_bag(record, decoded[index], index, view, self.threshold)
        labels, strategy = bias_labels(record, decoded)
        return Reconstruction(
            inputs=bag_batch(bag, record.meta.batch_size, spec.shape[2]),
            labels=labels,
            iterations=0,
            final_loss=float("nan"),
            view=view,
            label_strategy=strategy,
            observed="decoded gradient",
            extra={"embedding": name, "bag_size": int(bag.numel()), "signed_zero_rows": int((stat == 0).sum()),
                   "statistic": "row L2 norm" if view == "naive" else "row max - min"},
        )
