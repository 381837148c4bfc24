"""The receiver's side of a record: its compressor, the gradient it decodes, the model it was taken on.

A :class:`~gia_bench.records.GradientRecord` is a file format and knows no registry; what a
server (and so an attacker) builds from it lives here, beside its users (the attacks,
:mod:`gia_bench.evaluate`, ``capture`` and the federated server):

* :func:`record_compressor`: a fresh compressor of the record's defense spec (decode / simulate);
* :func:`decode_record`: the gradient the receiver reconstructs (the naive attacker's target);
* :func:`record_model`: the model at the recorded step, in the recorded mode;
* :func:`check_record` / :func:`load_record`: the record is what its defense and model
  produce (the specs resolve to registered or trusted classes, the weights are the
  model's, the messages are what the defense sends and decode to the parameters' shapes),
  on top of the file's own consistency (:meth:`GradientRecord.check_format`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gia_bench.comm import LocalCommunicator
from gia_bench.defenses import DEFENSES, create
from gia_bench.defenses.base import Compressor
from gia_bench.errors import GiaBenchError, RecordError
from gia_bench.models import MODELS, build_model
from gia_bench.records import FLOAT_DTYPES, INT_DTYPES, GradientRecord, short_value
from gia_bench.registry import parse_spec

#: Errors a (possibly third-party) compressor may raise on messages it cannot take: a record problem.
_PLUGIN_ERRORS = (GiaBenchError, RuntimeError, ValueError, TypeError, IndexError, KeyError, NotImplementedError)


def record_compressor(record: GradientRecord) -> Compressor:
    """A fresh compressor with the record's parameters (for decode / simulate)."""
    return create(record.meta.defense)


def decode_record(record: GradientRecord) -> list[torch.Tensor]:
    """The gradient the receiver reconstructs from the messages (the naive attacker's target)."""
    return record_compressor(record).decode(record.messages, record.param_shapes, record.public)


def record_model(record: GradientRecord, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model at the recorded step, in the recorded mode (train/eval)."""
    model = build_model(record.meta.model, seed=None, device="cpu")
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
    name by name, in shape and dtype; the messages have the tags and dtypes the defense
    sends (for a record of a fresh compressor, ``step`` 0) and pass its index checks
    (:data:`MESSAGE_CHECKS`); they decode to the parameters' shapes.
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
            model = build_model(meta.model, seed=None, device=None)
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
    if meta.step == 0 and meta.extra.get("world_size", 1) == 1:
        _check_message_layout(record, where)
    check = MESSAGE_CHECKS.get(parse_spec(meta.defense).name)
    problem = check(record, compressor) if check is not None else None
    if problem:
        raise RecordError(f"{where}: {problem}")
    try:
        decoded = compressor.decode(record.messages, record.param_shapes, record.public)
    except _PLUGIN_ERRORS as exc:
        raise RecordError(f"{where}: messages do not decode with defense {meta.defense!r} ({exc})") from None
    for name, g, shape in zip(names, decoded, record.param_shapes):
        if tuple(g.shape) != tuple(shape):
            raise RecordError(f"{where}: decoded gradient of {name!r} has shape {tuple(g.shape)}, expected {tuple(shape)}")


def _check_message_layout(record: GradientRecord, where: Path | str) -> None:
    """The tags and dtypes a fresh compressor of this spec sends for these parameters, against the record's.

    Shapes may depend on the data (entropy-coded lengths), tags and dtypes do not; a
    record whose defense spec does not match its messages (e.g. ``lqsgd:rank=100000``
    over plain-gradient messages) is refused here.
    """
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) for s in record.param_shapes]
    comm = LocalCommunicator(record=True)
    try:
        fresh = record_compressor(record)  # a second instance: the layout run must not touch the decoder's state
        fresh.step(grads, comm, keys=list(record.meta.param_names))
    except _PLUGIN_ERRORS as exc:
        raise RecordError(f"{where}: defense {record.meta.defense!r} cannot run on this model ({exc})") from None
    want = {m.tag: str(m.dtype).removeprefix("torch.") for m in comm.messages}
    have = {m["tag"]: m["dtype"] for m in record.meta.messages}
    if want != have:
        raise RecordError(
            f"{where}: messages {short_value(sorted(have.items()))} are not what defense {record.meta.defense!r}"
            f" sends ({short_value(sorted(want.items()))})"
        )


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


#: Per-defense checks of message contents beyond dtype and shape (index ranges ...): registry name -> check.
MESSAGE_CHECKS: dict[str, Callable[[GradientRecord, Any], "str | None"]] = {"topk": _check_topk}
