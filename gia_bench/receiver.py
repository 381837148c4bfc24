"""The receiver's side of a record: its compressor, the gradient it decodes, the model it was taken on.

A :class:`~gia_bench.records.GradientRecord` is a file format and knows no registry; what a
server (and so an attacker) builds from it lives here, beside its users (the attacks,
:mod:`gia_bench.evaluate`, ``capture`` and the federated server):

* :func:`record_compressor`: a fresh compressor of the record's defense spec (decode / simulate);
* :func:`decode_record`: the gradient the receiver reconstructs (the naive attacker's target);
* :func:`record_model`: the model at the recorded step, in the recorded mode;
* :func:`check_record` / :func:`load_record`: the record is what its defense and model
  produce (the specs resolve to registered or trusted classes, the weights are the
  model's, the messages are what the defense sends at the record's step with its workers
  (:mod:`gia_bench.layout`) and decode to the parameters' shapes),
  on top of the file's own consistency (:meth:`GradientRecord.check_format`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gia_bench.defenses import DEFENSES, create
from gia_bench.defenses.base import Compressor
from gia_bench.defenses.codecs import packed_nbytes
from gia_bench.errors import GiaBenchError, RecordError
from gia_bench.layout import PLUGIN_ERRORS as _PLUGIN_ERRORS
from gia_bench.layout import check_layout
from gia_bench.models import MODELS, build_recorded
from gia_bench.record_checks import FLOAT_DTYPES, INT_DTYPES
from gia_bench.records import GradientRecord
from gia_bench.registry import parse_spec

def record_compressor(record: GradientRecord) -> Compressor:
    """A fresh compressor with the record's parameters (for decode / simulate)."""
    return create(record.meta.defense)


def decode_record(record: GradientRecord) -> list[torch.Tensor]:
    """The gradient the receiver reconstructs from the messages (the naive attacker's target)."""
    return record_compressor(record).decode(record.messages, record.param_shapes, record.public)


def record_model(record: GradientRecord, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model at the recorded step, in the recorded mode (train/eval)."""
    model, _ = build_recorded(record.meta.model, seed=None, device="cpu")
    model.load_state_dict(record.weights, strict=True)
    return model.to(device)


def load_record(path: Path | str) -> GradientRecord:
    """Read a record and check it fully (:func:`check_record`); every problem is one :class:`RecordError`."""
    record = GradientRecord.load(path, validate=False)
    check_record(record)
    return record


def check_record(record: GradientRecord) -> None:
    """Check every field against the record's own tensors, model and defense (one :class:`RecordError`).

    In order, each before anything larger is built: the defense and model resolve to
    registered or trusted classes; the file is consistent in itself
    (:meth:`GradientRecord.check_format`: finite tensors, described messages of their
    packed size, FedAvg fields, bounded public tensors); the weights are the model's,
    name by name, in shape and dtype; the messages, public state and bytes are what the
    defense sends at the record's step with its world size (:func:`gia_bench.layout.check_layout`:
    tags, collectives, dtypes, every shape that does not depend on the data) and pass its
    content checks (:data:`MESSAGE_CHECKS`: index ranges, packed sizes of data-dependent
    lengths); they decode to the parameters' shapes.
    """
    where = record.path or record.meta.record_id
    meta = record.meta
    for registry, spec in ((DEFENSES, meta.defense), (MODELS, meta.model.spec)):
        try:
            registry.kwargs_for(parse_spec(spec))  # refuses untrusted module:Class without importing it
        except GiaBenchError as exc:
            raise RecordError(f"{where}: {exc}") from None
    record.check_format()
    try:
        with torch.device("meta"):
            model, _ = build_recorded(meta.model, seed=None, device=None)
    except GiaBenchError as exc:
        raise RecordError(f"{where}: model spec {meta.model.spec!r} is invalid ({exc})") from None
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    for name, (shape, dtype) in expected.items():
        if name not in record.weights:
            raise RecordError(f"{where}: weight {name!r} of model {meta.model.spec!r} is missing")
        got = record.weights[name]
        if tuple(got.shape) != shape:
            raise RecordError(
                f"{where}: weight {name!r} has shape {tuple(got.shape)}, model {meta.model.spec!r} needs {shape}"
            )
        # counters (BatchNorm's num_batches_tracked) may come back as floats from a federated run
        if got.dtype != dtype and (dtype.is_floating_point or got.dtype not in FLOAT_DTYPES + INT_DTYPES):
            raise RecordError(f"{where}: weight {name!r} is {got.dtype}, model {meta.model.spec!r} needs {dtype}")
    unknown = [k for k in record.weights if k not in expected]
    if unknown:
        raise RecordError(f"{where}: weights {unknown[:5]} do not belong to model {meta.model.spec!r}")
    names = [n for n, _ in model.named_parameters()]
    if list(meta.param_names) != names:
        raise RecordError(f"{where}: param_names do not match model {meta.model.spec!r}'s parameters")
    try:
        compressor = record_compressor(record)
    except _PLUGIN_ERRORS as exc:
        raise RecordError(f"{where}: defense {meta.defense!r} cannot be built ({exc})") from None
    check_layout(record, where)  # at every step, with every world size (gia_bench.layout)
    check = MESSAGE_CHECKS.get(parse_spec(meta.defense).name)
    try:
        problem = check(record, compressor) if check is not None else None
    except _PLUGIN_ERRORS as exc:
        problem = f"messages do not fit defense {meta.defense!r} ({exc})"
    if problem:
        raise RecordError(f"{where}: {problem}")
    try:
        decoded = compressor.decode(record.messages, record.param_shapes, record.public)
    except _PLUGIN_ERRORS as exc:
        raise RecordError(f"{where}: messages do not decode with defense {meta.defense!r} ({exc})") from None
    for name, g, shape in zip(names, decoded, record.param_shapes):
        if tuple(g.shape) != tuple(shape):
            raise RecordError(f"{where}: decoded gradient of {name!r} has shape {tuple(g.shape)}, expected {tuple(shape)}")


def _check_topk(record: GradientRecord, compressor: Any) -> str | None:
    """Top-k indices are per-tensor flat positions: each in [0, numel) of its tensor, distinct within it."""
    indices = record.messages.get("indices")
    if indices is None:
        return None
    if indices.dtype not in INT_DTYPES:
        return f"topk indices are {indices.dtype}, not integers"
    shapes = record.param_shapes
    ks = compressor.counts(shapes)
    if indices.numel() != sum(ks):
        return f"topk: {indices.numel()} indices, defense {record.meta.defense!r} on this model sends {sum(ks)}"
    start = 0
    for name, shape, k in zip(record.meta.param_names, shapes, ks):
        part = indices.reshape(-1)[start : start + k].to(torch.int64)
        start += k
        numel = int(torch.Size(shape).numel())
        if k and (int(part.min()) < 0 or int(part.max()) >= numel):
            return f"topk index out of range for {name!r} (values in [{int(part.min())}, {int(part.max())}], size {numel})"
        if part.unique().numel() != part.numel():
            return f"topk indices of {name!r} repeat"
    return None


def _world_size(record: GradientRecord) -> int:
    return int(record.meta.extra.get("world_size", 1))


def _padding_problem(packed: torch.Tensor, n: int, bits: int, what: str) -> str | None:
    """``packed`` holds ``n`` codes of ``bits`` bits and zeros after them (pack_bits' tail, all-gather padding)."""
    need = packed_nbytes(n, bits)
    tail = packed[need:]
    if need and (n * bits) % 8 and int(packed[need - 1]) >> ((n * bits) % 8):
        return f"{what}: bits past the last of {n} {bits}-bit codes are set (the codes are not {bits}-bit codes)"
    return f"{what}: bytes past the last of {n} {bits}-bit codes are not zero padding" if bool(tail.any()) else None


def _check_tq(record: GradientRecord, compressor: Any) -> str | None:
    """Threshold quantization: ``count`` kept entries, as many positions, ``ceil(count * bits / 8)`` code
    bytes; with several workers padded with zeros to the longest worker's (so at most ``ceil(n * bits / 8)``)."""
    msgs, bits = record.messages, compressor.bits
    n = sum(int(torch.Size(s).numel()) for s in record.param_shapes)
    k = int(msgs["count"].reshape(-1)[0])
    if not 0 <= k <= n:
        return f"tq: count {k} is outside [0, {n}]"
    one = _world_size(record) == 1
    codes = msgs["codes"].reshape(-1)
    need = packed_nbytes(k, bits)
    fits = codes.numel() == need if one else need <= codes.numel() <= packed_nbytes(n, bits)
    if not fits:
        return f"tq: {codes.numel()} code bytes for {k} kept entries of bits={bits} (ceil({k} x {bits} / 8) = {need})"
    problem = _padding_problem(codes, k, bits, "tq codes")
    if problem or "indices" not in msgs:
        return problem
    idx = msgs["indices"].reshape(-1)
    fits = idx.numel() == k if one else k <= idx.numel() <= n
    if not fits:
        return f"tq: {idx.numel()} indices for {k} kept entries"
    return "tq: indices past the kept entries' are not zero padding" if bool(idx[k:].any()) else None


def _check_rcfed(record: GradientRecord, compressor: Any) -> str | None:
    """RC-FED: ``length`` whole 32-bit words of stream (the rest zero padding, only with several workers),
    and symbols only of the levels the spec's design uses (a ``bits`` / ``rate`` claim)."""
    msgs = record.messages
    length, stream = int(msgs["length"].reshape(-1)[0]), msgs["stream"].reshape(-1)
    if not 0 <= length <= stream.numel() or length % 4 or (_world_size(record) == 1 and length != stream.numel()):
        return f"rcfed: length {length} does not fit a stream of {stream.numel()} bytes"
    if bool(stream[length:].any()):
        return "rcfed: bytes past the stream's length are not zero padding"
    counts = msgs["counts"].reshape(-1).to(torch.int64)
    unused = torch.ones(counts.numel(), dtype=torch.bool)
    unused[list(compressor.design.active)] = False
    if bool(counts[unused].any()):
        symbols = unused.nonzero().reshape(-1)[counts[unused] > 0].tolist()[:5]
        return f"rcfed: symbols {symbols} are not levels of {compressor.spec}"
    return None


def _check_laq(record: GradientRecord, compressor: Any) -> str | None:
    """LAQ: ``flag`` is 0 or 1; sent means codes; a skipped round is the flag alone, or with several
    workers (one of which sent) zeros in its place."""
    msgs = record.messages
    flag = msgs["flag"].reshape(-1)
    if int(flag[0]) not in (0, 1):
        return f"laq: flag {int(flag[0])} is neither 0 (skipped) nor 1 (sent)"
    if int(flag[0]) == 1:
        return None if "codes" in msgs else "laq: the flag says sent, there are no codes"
    if "codes" not in msgs:
        return None
    if _world_size(record) == 1:
        return "laq: a skipped round of one worker sends its flag alone, this one has codes"
    if bool(msgs["codes"].any()) or bool(msgs["radius"].any()):
        return "laq: a silent worker's codes and radius must be zeros"
    return None


def _check_mixedprec(record: GradientRecord, compressor: Any) -> str | None:
    """Mixed precision: the public bit widths (what decode reads) are the ones the spec assigns."""
    want = compressor.assign_bits(list(record.meta.param_names))
    have = record.public["bits"].reshape(-1).tolist()
    if have != want:
        return f"mixedprec: public bits {have[:8]} are not what {compressor.spec!r} assigns {want[:8]}"
    return None


#: Per-defense checks of message contents beyond the layout (index ranges, data-dependent packed sizes,
#: codes of the claimed width ...): registry name -> check. They run after gia_bench.layout.check_layout,
#: so every tag the family's layout has is there with its dtype.
MESSAGE_CHECKS: dict[str, Callable[[GradientRecord, Any], "str | None"]] = {
    "topk": _check_topk,
    "tq": _check_tq,
    "rcfed": _check_rcfed,
    "laq": _check_laq,
    "mixedprec": _check_mixedprec,
}
