"""What of the gradient a receiver gets exactly, read from a compressor's public structure.

A compressor that loses information in general can still send parts of the gradient
exactly, and an attacker that knows the compressor knows which parts. Decided from the
record alone (defense spec, messages, public state, model), never from the truth file:

* ``none``: everything; ``fp16``: everything to fp16 rounding (relative 2^-11).
* ``powersgd``: the tensors it sends uncompressed (1-D tensors, matrices too small to be
  worth compressing: the message ``"rest"``), and every compressed matrix whose rank
  cannot exceed the factors' rank r. ``M_hat = orth(M Q) orth(M Q)^T M`` is the projection
  of ``M`` on the column space of ``M Q``, which is all of ``M``'s column space when
  rank(M) <= r (Q is a random draw: rank(M Q) = rank(M) with probability 1). Rank bounds
  from the model's structure: a fully connected layer's weight gradient
  ``1/B sum_b delta_b h_b^T`` has rank <= B (the rows in play); any n x m matrix has
  rank <= min(n, m). The warm-up steps (``start_iter``) send everything in fp32.
* ``lqsgd``: the same tensors, up to its log quantization of the factors (and of the
  rest, unless ``quantize_rest=false``): "nearly" exact, with the codec's relative error.
* ``topk``: the kept entries, exactly (fp32 values at known positions): a mask per tensor.

What breaks exactness, and is known to the receiver too: error feedback after the first
step (the worker sent ``C(g + e)`` with a private residual ``e``), several workers (the
basis is the summed P, not this worker's), FedAvg updates (a sum of local gradients
taken at different weights). Such tensors do not qualify.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from gia_bench.defenses.base import Compressor
from gia_bench.receiver import record_compressor
from gia_bench.records import GradientRecord
from gia_bench.registry import parse_spec

#: fp16's relative rounding error (half an ulp of a 10-bit mantissa)
FP16_ERROR = 2.0**-11


@dataclasses.dataclass(frozen=True)
class ExactTensor:
    """One parameter whose gradient the receiver has exactly (or nearly), and why."""

    name: str
    index: int  # position in the record's parameter order
    mask: torch.Tensor | None  # bool, the parameter's shape: the entries known; None: all of them
    error: float  # nominal relative error of the known entries (0: exact up to float rounding)
    reason: str

    def to_json(self) -> dict[str, object]:
        known = None if self.mask is None else int(self.mask.sum())
        return {"name": self.name, "known_entries": known, "nominal_error": self.error, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Exactness:
    """Every parameter that qualifies (by name), and a one-line reason per parameter that does not."""

    tensors: dict[str, ExactTensor]
    excluded: dict[str, str]
    defense: str

    def get(self, name: str) -> ExactTensor | None:
        return self.tensors.get(name)


def rows_in_play(record: GradientRecord) -> int:
    """An upper bound on the rank of a fully connected layer's weight gradient: the examples behind it."""
    meta = record.meta
    return meta.batch_size * meta.local_steps


def linear_weights(model: nn.Module) -> set[str]:
    """Parameter names of every fully connected layer's weight (their gradients have rank <= rows in play)."""
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def codec_error(bits: int, alpha: float, samples: int = 4096) -> float:
    """Relative L2 error of LQ-SGD's log codec (one scale) on a fixed N(0, 1) sample: public, data-free."""
    from gia_bench.defenses.codecs import log_dequantize_segments, log_quantize_segments

    z = torch.randn(samples, generator=torch.Generator().manual_seed(0))
    seg = torch.zeros(samples, dtype=torch.int64)
    codes, scales = log_quantize_segments(z, seg, 1, bits, alpha)
    back = log_dequantize_segments(codes, scales[seg], bits, alpha)
    return float((back - z).norm() / z.norm())


def exact_tensors(record: GradientRecord, model: nn.Module) -> Exactness:
    """Which parameters' gradients reach the receiver exactly or nearly, from the record's public structure.

    ``model`` is the recorded model (for the layer types behind the rank bounds).
    """
    meta = record.meta
    names = list(meta.param_names)
    shapes = [torch.Size(s) for s in record.param_shapes]
    name = parse_spec(meta.defense).name
    compressor = record_compressor(record)
    tensors: dict[str, ExactTensor] = {}
    excluded: dict[str, str] = {}

    def everything(error: float, reason: str) -> Exactness:
        found = {n: ExactTensor(n, i, None, error, reason) for i, n in enumerate(names)}
        return Exactness(found, {}, meta.defense)

    def nothing(reason: str) -> Exactness:
        return Exactness({}, {n: reason for n in names}, meta.defense)

    if not meta.is_fedsgd:
        return nothing(
            f"a FedAvg update of {meta.local_steps} local steps is a sum of gradients at different weights"
        )
    world = int(meta.extra.get("world_size", 1))
    if name == "none":
        return everything(0.0, "sent uncompressed (fp32)")
    if name == "fp16":
        return everything(FP16_ERROR, "sent as fp16")
    if name in ("powersgd", "lqsgd"):
        return _low_rank(record, model, compressor, names, shapes, world)
    if name == "topk":
        if world > 1:
            return nothing("several workers' Top-k entries are summed")
        if getattr(compressor, "error_feedback", False) and meta.step > 0:
            return nothing("Top-k with error feedback after step 0 sends g + e (private residual)")
        ks = compressor.counts(shapes)  # type: ignore[attr-defined]
        indices = record.messages["indices"].reshape(-1).to(torch.int64)
        start = 0
        for i, (n, shape, k) in enumerate(zip(names, shapes, ks)):
            mask = torch.zeros(shape.numel(), dtype=torch.bool)
            mask[indices[start : start + k]] = True
            start += k
            tensors[n] = ExactTensor(n, i, mask.reshape(shape), 0.0, f"Top-k keeps {k} of {shape.numel()} entries")
        return Exactness(tensors, excluded, meta.defense)
    return nothing(f"defense {name!r} sends no tensor exactly (quantized, noisy or coded)")


def _low_rank(
    record: GradientRecord,
    model: nn.Module,
    compressor: Compressor,
    names: list[str],
    shapes: list[torch.Size],
    world: int,
) -> Exactness:
    """PowerSGD / LQ-SGD: the uncompressed rest, and the matrices whose rank the factors cover."""
    meta = record.meta
    quantized = parse_spec(meta.defense).name == "lqsgd"
    error = codec_error(compressor.bits, compressor.alpha) if quantized else 0.0  # type: ignore[attr-defined]
    codec = f", up to {compressor.bits}-bit log quantization" if quantized else ""  # type: ignore[attr-defined]
    if "grads" in record.messages:  # a warm-up step: plain fp32 all-reduce
        found = {n: ExactTensor(n, i, None, 0.0, "warm-up step: sent uncompressed") for i, n in enumerate(names)}
        return Exactness(found, {}, meta.defense)
    plan = compressor.plan(shapes)  # type: ignore[attr-defined]
    tensors: dict[str, ExactTensor] = {}
    excluded: dict[str, str] = {}
    rest_quantized = quantized and compressor.quantize_rest  # type: ignore[attr-defined]
    feedback = compressor.error_feedback and meta.step > 0  # type: ignore[attr-defined]
    for i in plan.rest:
        if feedback and rest_quantized:  # LQ-SGD feeds the rest's quantization error back
            excluded[names[i]] = "error feedback after step 0: the quantized rest carries a private residual"
            continue
        tensors[names[i]] = ExactTensor(
            names[i], i, None, error if rest_quantized else 0.0,
            "sent uncompressed" + (codec if rest_quantized else ""),
        )  # fmt: skip
    linear = linear_weights(model)
    rows = rows_in_play(record)
    for g in plan.groups:
        for i in g.indices:
            n = names[i]
            if world > 1:
                excluded[n] = f"{world} workers: the basis is the summed P, not this worker's"
                continue
            if feedback:
                excluded[n] = "error feedback after step 0: the factors carry a private residual"
                continue
            bound = min(g.n, g.m)
            why = f"rank <= min({g.n}, {g.m})"
            if n in linear and rows < bound:
                bound, why = rows, f"fully connected: rank <= {rows} rows in play"
            if g.r >= bound:
                tensors[n] = ExactTensor(n, i, None, error, f"rank {g.r} factors, {why}{codec}")
            else:
                excluded[n] = f"rank {g.r} factors, but {why.replace('rank <=', 'rank up to')}"
    return Exactness(tensors, excluded, meta.defense)


def relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """||estimate - truth|| / ||truth|| (inf for a zero truth with a nonzero estimate)."""
    den = float(truth.norm())
    num = float((estimate - truth).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
