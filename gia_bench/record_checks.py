"""What a valid gradient record holds, declared field by field (the rules :mod:`gia_bench.records` applies).

Every metadata key (``extra``'s too) and every public tensor a record may carry is declared
here, with its check. A record with an undeclared metadata key is refused; a new field (e.g.
a FedAvg setting, or a training run's public state) is added by declaring it: a ``MetaField``
in ``META_FIELDS`` or ``EXTRA_FIELDS`` (name, check of its JSON value, required or not) or a
``TensorRule`` in ``PUBLIC_TENSORS`` (allowed dtypes, size bound). Nothing else needs to change.

The checks read JSON values only (never tensors' contents, never a registry), so they run
before anything is built or allocated; each returns what is wrong, and the caller raises one
:class:`~gia_bench.errors.RecordError` naming the file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gia_bench.errors import RecordError

SCHEMA_VERSION = 1

#: Largest record or truth file read (bytes). The whole file is read once into memory,
#: hashed (the result identity) and parsed from those bytes, so this bounds the memory
#: a load takes (about twice the file). ResNet-18 records are ~90 MB.
MAX_FILE_BYTES = 2 * 1024**3
MAX_TENSORS = 100_000
#: Bounds (documented limits; a record outside them is refused before anything is allocated).
MAX_ID_CHARS = 200
MAX_SPEC_CHARS = 2000
MAX_BATCH = 4096
MAX_CHANNELS = 64
MAX_SIDE = 4096
#: Largest batch of model inputs (B x C x H x W elements) an attack may be asked to allocate:
#: 2^26 fp32 values = 256 MiB per copy (an attack keeps a few: inputs, gradient, optimiser state).
MAX_INPUT_ELEMENTS = 2**26
MAX_CLASSES = 100_000
MAX_LOCAL_STEPS = 100_000
MESSAGE_OPS = ("all_reduce", "all_gather", "all_to_all", "broadcast")

Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class MetaField:
    """One key of the record metadata: how its JSON value is checked, and whether it must be there."""

    name: str
    check: Check  # returns what is wrong with the value, or None
    required: bool = True


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """What a public-state tensor may be: its dtypes and at most how many elements per model parameter."""

    dtypes: tuple[torch.dtype, ...]
    per_parameter: float = 2.0  # numel <= per_parameter * (number of model parameters) + 2**16


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        if not _is_int(v):
            return f"must be an integer, got {short_value(v)}"
        return None if lo <= v <= hi else f"must be in [{lo}, {hi}], got {v}"

    return check


def _number(lo: float, hi: float, positive: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"must be a finite number, got {short_value(v)}"
        if positive and v <= 0:
            return f"must be > 0, got {v}"
        return None if lo <= v <= hi else f"must be in [{lo}, {hi}], got {v}"

    return check


def _text(limit: int, nonempty: bool = True) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string, got {short_value(v)}"
        if nonempty and not v.strip():
            return "must not be empty"
        if len(v) > limit:
            return f"is {len(v)} characters long (at most {limit})"
        return None if v.isprintable() else "has control characters"

    return check


def short_value(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _shape3(v: Any) -> str | None:
    if not (isinstance(v, list) and len(v) == 3 and all(_is_int(d) for d in v)):
        return f"must be [C, H, W] integers, got {short_value(v)}"
    c, h, w = v
    if not (1 <= c <= MAX_CHANNELS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        return f"{v} is outside [1..{MAX_CHANNELS}, 1..{MAX_SIDE}, 1..{MAX_SIDE}]"
    return None


def _keys(v: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> str | None:
    if not isinstance(v, dict):
        return f"must be an object, got {short_value(v)}"
    missing = [k for k in required if k not in v]
    unknown = [k for k in v if k not in required + optional]
    if missing:
        return f"lacks {missing}"
    return f"has unknown keys {[short_value(k) for k in unknown[:3]]}" if unknown else None


def _fields(v: Any, checks: tuple[tuple[str, Check], ...]) -> str | None:
    """The first problem of the object ``v``'s fields (already known to be present), prefixed by the key."""
    for key, check in checks:
        problem = check(v[key])
        if problem:
            return f"{key} {problem}"
    return None


def _model(v: Any) -> str | None:
    problem = _keys(v, ("spec", "in_shape", "num_classes"), ("mode", "fewbit_backward")) or _fields(
        v, (("spec", _text(MAX_SPEC_CHARS)), ("in_shape", _shape3), ("num_classes", _int(1, MAX_CLASSES)))
    )
    if not problem and "fewbit_backward" in v:
        problem = _fields(v, (("fewbit_backward", _int(0, 8)),))  # gia_bench.fewbit: bits of the backward
    if not problem and v.get("mode", "train") not in ("train", "eval"):
        problem = f"mode must be 'train' or 'eval', got {short_value(v['mode'])}"
    return problem


def _dataset(v: Any) -> str | None:
    problem = _keys(v, ("name", "shape", "num_classes", "mean", "std")) or _fields(
        v, (("name", _text(MAX_SPEC_CHARS)), ("shape", _shape3), ("num_classes", _int(1, MAX_CLASSES)))
    )
    if problem:
        return problem
    channels = v["shape"][0]
    for key in ("mean", "std"):
        values = v[key]
        if not (isinstance(values, list) and len(values) == channels):
            return f"{key} must list one number per channel ({channels}), got {short_value(values)}"
        for x in values:
            bad = _number(-1e6, 1e6, positive=key == "std")(x)
            if bad:
                return f"{key} {bad}"
    return None


def _messages(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return f"must be a non-empty list, got {short_value(v)}"
    if len(v) > MAX_TENSORS:
        return f"has {len(v)} entries (at most {MAX_TENSORS})"
    tags = set()
    for i, m in enumerate(v):
        problem = _keys(m, ("tag", "dtype", "shape"), ("op", "nbytes", "payload_nbytes"))
        if not problem:
            problem = _text(512)(m["tag"]) or _text(16)(m["dtype"])
            problem = problem and f"tag/dtype {problem}"
        if not problem and not (isinstance(m["shape"], list) and len(m["shape"]) <= 8
                                and all(_is_int(d) and d >= 0 for d in m["shape"])):
            problem = f"shape must be a list of sizes, got {short_value(m['shape'])}"
        if not problem and m.get("op", "all_reduce") not in MESSAGE_OPS:
            problem = f"op {short_value(m.get('op'))} is not one of {', '.join(MESSAGE_OPS)}"
        for key in ("nbytes", "payload_nbytes"):
            if not problem and key in m:
                problem = _fields(m, ((key, _int(0, MAX_FILE_BYTES * 64)),))
        if not problem and m["tag"] in tags:
            problem = f"tag {m['tag']!r} appears twice"
        if problem:
            return f"entry {i} {problem}"
        tags.add(m["tag"])
    return None


def _list_of_names(v: Any) -> str | None:
    if not isinstance(v, list) or len(v) > MAX_TENSORS:
        return f"must be a list of at most {MAX_TENSORS} names"
    check = _text(512)
    return next((f"entry {short_value(n)} {p}" for n in v if (p := check(n))), None)


def _sha256(v: Any) -> str | None:
    ok = isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
    return None if ok else f"must be 64 lowercase hex digits, got {short_value(v)}"


#: Largest world size and optimizer step a record may claim (documented bounds; a training run of
#: this toolkit has a few workers and far fewer steps).
MAX_WORLD_SIZE = 4096
MAX_STEP = 10**9
#: Who wrote a record: ``capture`` (no ``source`` key), a training run, or a Flower client.
RECORD_SOURCES = ("capture", "train", "federated")

#: The keys ``extra`` may hold, each typed and bounded like the top-level fields. ``world_size`` and
#: ``rank`` decide what layout the record's messages must have (gia_bench.layout), so they are never
#: taken on trust: writers are capture (``checkpoint_sha256``), the trainer (gia_bench.train.loop) and
#: the federated server (gia_bench.federated). A new key is declared here.
EXTRA_FIELDS: tuple[MetaField, ...] = (
    MetaField("source", lambda v: None if v in RECORD_SOURCES else f"must be one of {RECORD_SOURCES}, got"
              f" {short_value(v)}", False),  # fmt: skip
    MetaField("checkpoint_sha256", _sha256, False),
    MetaField("world_size", _int(1, MAX_WORLD_SIZE), False),
    MetaField("rank", _int(0, MAX_WORLD_SIZE - 1), False),
    MetaField("epoch", _int(0, MAX_STEP), False),
    MetaField("lr", _number(0.0, 1e9), False),
    MetaField("view", _text(MAX_SPEC_CHARS), False),
    MetaField("wire_messages", _messages, False),
    MetaField("wire_bytes", _int(0, MAX_FILE_BYTES * 64), False),
    MetaField("round", _int(1, MAX_STEP + 1), False),
    MetaField("client", _int(0, 2**31 - 1), False),
)


def _extra(v: Any) -> str | None:
    """``extra``: an object of declared keys (:data:`EXTRA_FIELDS`), each of its type and range."""
    if not isinstance(v, dict):
        return f"must be an object, got {short_value(v)}"
    declared = {f.name for f in EXTRA_FIELDS}
    unknown = [k for k in v if k not in declared]
    if unknown:
        return (f"has undeclared keys {[short_value(k) for k in unknown[:3]]}"
                " (a new key is declared in gia_bench.record_checks.EXTRA_FIELDS)")  # fmt: skip
    for field in EXTRA_FIELDS:
        problem = field.check(v[field.name]) if field.name in v else None
        if problem:
            return f"{field.name} {problem}"
    return None


def _check_extra(path: Path | str, data: dict[str, Any]) -> None:
    """What the ``extra`` fields say must agree with each other and with the record (one line each)."""
    extra = data.get("extra", {})
    source = extra.get("source", "capture")
    world, rank = extra.get("world_size", 1), extra.get("rank", 0)
    where = f"{path}: record metadata 'extra"
    if rank >= world:
        raise RecordError(f"{where}.rank' {rank} is not below world_size {world}")
    if source != "train":
        # only a training run talks to other workers; capture and a Flower client send to one server
        stray = [k for k in ("world_size", "rank", "epoch", "lr", "wire_messages", "wire_bytes") if k in extra]
        if stray:
            raise RecordError(f"{where}.{stray[0]}' belongs to a training run, the record's source is {source!r}")
    if source != "federated" and ("round" in extra or "client" in extra):
        raise RecordError(f"{where}.round/client' belong to a federated record, the record's source is {source!r}")
    if "round" in extra and data.get("step", 0) != extra["round"] - 1:
        raise RecordError(f"{where}.round' {extra['round']} is not step {data.get('step', 0)} + 1")
    if "wire_messages" in extra and extra["wire_messages"] != data["messages"]:
        raise RecordError(f"{where}.wire_messages' differs from the record's messages")
    if "wire_bytes" in extra and extra["wire_bytes"] != data["bytes_sent"]:
        raise RecordError(f"{where}.wire_bytes' {extra['wire_bytes']} is not bytes_sent {data['bytes_sent']}")


META_FIELDS: tuple[MetaField, ...] = (
    MetaField("kind", lambda v: None if v == "record" else "must be 'record'"),
    MetaField("schema", _int(SCHEMA_VERSION, SCHEMA_VERSION)),
    MetaField("record_id", _text(MAX_ID_CHARS)),
    MetaField("defense", _text(MAX_SPEC_CHARS)),
    MetaField("model", _model),
    MetaField("dataset", _dataset),
    MetaField("batch_size", _int(1, MAX_BATCH)),
    MetaField("param_names", _list_of_names),
    MetaField("messages", _messages),
    MetaField("bytes_sent", _int(0, MAX_FILE_BYTES * 64)),
    MetaField("loss", lambda v: None if v == "cross_entropy" else f"must be 'cross_entropy', got {short_value(v)}", False),
    MetaField("step", _int(0, MAX_STEP), False),
    MetaField("seed", _int(-(2**63), 2**64 - 1), False),
    MetaField("extra", _extra, False),
    # FedAvg (gia_bench.fedavg): absent on FedSGD records; typed by _local_fields, bounded by _validate_local.
    MetaField("local_steps", lambda v: None, False),
    MetaField("local_lr", lambda v: None, False),
    MetaField("local_batch", lambda v: None, False),
)

#: Tensor dtypes a record may hold (weights, public state, index messages).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
#: Public compressor state a record may carry (``public/<key>``); an undeclared key gets DEFAULT_PUBLIC.
PUBLIC_TENSORS: dict[str, TensorRule] = {
    "Q_init": TensorRule(FLOAT_DTYPES),  # PowerSGD / LQ-SGD: the Q every compressed tensor started from
    "P_sum": TensorRule(FLOAT_DTYPES),  # PowerSGD / LQ-SGD: the summed P a multi-worker receiver orthogonalizes
    "last": TensorRule(FLOAT_DTYPES, 1.0),  # LAQ: the receiver's stale copy of the gradient
    "bits": TensorRule((torch.int32,), 1.0),  # mixed precision: bits per parameter tensor
}
DEFAULT_PUBLIC = TensorRule(FLOAT_DTYPES + INT_DTYPES)


def check_meta_json(path: Path | str, data: dict[str, Any]) -> None:
    """Check the raw metadata against :data:`META_FIELDS` (types and bounds, before anything is built)."""
    declared = {f.name for f in META_FIELDS}
    unknown = [k for k in data if k not in declared]
    if unknown:
        raise RecordError(
            f"{path}: record metadata has undeclared keys {[short_value(k) for k in unknown[:3]]}"
            " (a new field is declared in gia_bench.record_checks.META_FIELDS)"
        )
    for field in META_FIELDS:
        if field.name not in data:
            if field.required:
                raise RecordError(f"{path}: record metadata lacks '{field.name}'")
            continue
        problem = field.check(data[field.name])
        if problem:
            raise RecordError(f"{path}: record metadata '{field.name}' {problem}")
    _check_extra(path, data)
    model, dataset = data["model"], data["dataset"]
    if model["in_shape"] != dataset["shape"] or model["num_classes"] != dataset["num_classes"]:
        raise RecordError(
            f"{path}: model input {model['in_shape']} / {model['num_classes']} classes does not match the data set's"
            f" {dataset['shape']} / {dataset['num_classes']}"
        )
    c, h, w = model["in_shape"]
    if data["batch_size"] * c * h * w > MAX_INPUT_ELEMENTS:
        raise RecordError(
            f"{path}: batch of {data['batch_size']} x {model['in_shape']} is {data['batch_size'] * c * h * w:,}"
            f" input values, more than the {MAX_INPUT_ELEMENTS:,} an attack may allocate"
        )
    declared_bytes = sum(m.get("nbytes", 0) for m in data["messages"])
    if any("nbytes" in m for m in data["messages"]) and declared_bytes != data["bytes_sent"]:
        raise RecordError(
            f"{path}: bytes_sent {data['bytes_sent']} is not the sum of the messages' bytes ({declared_bytes})"
        )
