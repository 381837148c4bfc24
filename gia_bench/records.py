"""GradientRecord: one worker's messages for one step, as a curious server sees them.

One safetensors file per record:

* tensors ``msg/<tag>``: the messages, exactly as :class:`~gia_bench.comm.LocalCommunicator`
  recorded them; ``weight/<name>``: the model's state (parameters and buffers) at
  that step; ``public/<key>``: the compressor's public state the receiver knows
  (e.g. the Q PowerSGD started from);
* metadata key ``gia_bench``: JSON with the schema version and :class:`RecordMeta`.

The ground truth (the batch's model inputs and labels) goes to a separate
``<stem>.truth.safetensors`` beside it (:class:`Truth`). :meth:`GradientRecord.load`
never opens it; attacks get what the server sees and nothing else.

Loading is strict and never unpickles: the file must be a well-formed safetensors
file with our schema; every error names the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from gia_bench.data import DatasetSpec
from gia_bench.errors import RecordError
from gia_bench.io import atomic_write_bytes
from gia_bench.registry import parse_spec

SCHEMA_VERSION = 1
RECORD_SUFFIX = ".safetensors"
TRUTH_SUFFIX = ".truth.safetensors"
_META_KEY = "gia_bench"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model as a record describes it (:func:`gia_bench.models.build_model` builds it)."""

    spec: str  # registry spec, e.g. "lenet" or "convnet:width=32"
    in_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    mode: str = "train"  # "train" or "eval": BatchNorm behaviour during the gradient
    #: bits of Few-Bit Backward activations (gia_bench.fewbit); 0: exact backward
    fewbit_backward: int = 0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.fewbit_backward:
            del data["fewbit_backward"]  # records without few-bit backward keep their original form
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        mode = str(data.get("mode", "train"))
        if mode not in ("train", "eval"):
            raise ValueError(f"model mode must be 'train' or 'eval', got {mode!r}")
        fewbit = int(data.get("fewbit_backward", 0))
        if not 0 <= fewbit <= 8:
            raise ValueError(f"model fewbit_backward must be 0 (exact) or 1..8 bits, got {fewbit}")
        return cls(
            spec=str(data["spec"]),
            in_shape=tuple(int(v) for v in data["in_shape"]),  # type: ignore[arg-type]
            num_classes=int(data["num_classes"]),
            mode=mode,
            fewbit_backward=fewbit,
        )

    @property
    def name(self) -> str:
        return parse_spec(self.spec).name


@dataclasses.dataclass(frozen=True)
class RecordMeta:
    """The public metadata of a record (JSON in the safetensors header)."""

    record_id: str
    defense: str  # canonical spec of the compressor
    model: ModelSpec
    dataset: DatasetSpec
    batch_size: int
    param_names: tuple[str, ...]  # gradient order: model.named_parameters()
    messages: tuple[dict[str, Any], ...]  # Message.info() of each message, in send order
    bytes_sent: int
    loss: str = "cross_entropy"
    step: int = 0
    seed: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    # FedAvg (gia_bench.fedavg): the messages carry u = (w_0 - w_K) / local_lr after K local
    # SGD steps on local_batch examples; all three absent (K = 1, None, None) = a FedSGD gradient.
    local_steps: int = 1
    local_lr: float | None = None
    local_batch: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_json()
        data["dataset"] = self.dataset.to_json()
        data["param_names"] = list(self.param_names)
        data["messages"] = list(self.messages)
        if self.is_fedsgd:
            # FedSGD records keep the exact bytes they had before FedAvg records existed
            for key in _LOCAL_KEYS:
                del data[key]
        return data

    @property
    def is_fedsgd(self) -> bool:
        """True for a plain gradient record (no FedAvg local-training metadata)."""
        return self.local_steps == 1 and self.local_lr is None and self.local_batch is None

    def local_training(self):
        """The client's local training as a :class:`gia_bench.fedavg.LocalTraining` (K = 1 for FedSGD)."""
        from gia_bench.fedavg import LocalTraining

        if self.is_fedsgd:
            return LocalTraining(1, 1.0, self.batch_size)
        return LocalTraining(self.local_steps, float(self.local_lr), self.local_batch)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordMeta:
        return cls(
            record_id=str(data["record_id"]),
            defense=str(data["defense"]),
            model=ModelSpec.from_json(data["model"]),
            dataset=DatasetSpec.from_json(data["dataset"]),
            batch_size=int(data["batch_size"]),
            param_names=tuple(str(n) for n in data["param_names"]),
            messages=tuple(dict(m) for m in data["messages"]),
            bytes_sent=int(data["bytes_sent"]),
            loss=str(data.get("loss", "cross_entropy")),
            step=int(data.get("step", 0)),
            seed=int(data.get("seed", 0)),
            extra=dict(data.get("extra", {})),
            schema=int(data["schema"]),
            **_local_fields(data),
        )


_LOCAL_KEYS = ("local_steps", "local_lr", "local_batch")


def _local_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The FedAvg fields of record metadata, strictly typed; ranges are checked by :meth:`GradientRecord.validate`.

    A JSON number is not silently converted: ``local_steps: 2.5`` or ``"2"`` is a bad field.
    """
    present = [k for k in _LOCAL_KEYS if k in data]
    if not present:
        return {}
    if len(present) != len(_LOCAL_KEYS):
        missing = [k for k in _LOCAL_KEYS if k not in data]
        raise ValueError(f"FedAvg metadata {present} present without {missing}")
    steps, lr, batch = (data[k] for k in _LOCAL_KEYS)
    for key, value in (("local_steps", steps), ("local_batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key} must be an integer, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        raise TypeError(f"local_lr must be a number, got {lr!r}")
    return {"local_steps": steps, "local_lr": float(lr), "local_batch": batch}


def truth_path(record_path: Path) -> Path:
    """Where the truth file of ``record_path`` lives."""
    name = record_path.name
    stem = name[: -len(RECORD_SUFFIX)] if name.endswith(RECORD_SUFFIX) else record_path.stem
    return record_path.with_name(stem + TRUTH_SUFFIX)


def find_record_files(paths: list[Path] | Path) -> list[tuple[Path, bool]]:
    """Candidate record files among ``paths``, each with whether it was named directly.

    Folders are searched recursively for ``*.safetensors`` (truth files excluded); a
    file found in a folder may still turn out not to be a record (callers skip it
    with a warning), a file named directly must be one.
    """
    if isinstance(paths, Path):
        paths = [paths]
    found: list[tuple[Path, bool]] = []
    for p in paths:
        if p.is_dir():
            found += sorted(
                (f, False) for f in p.rglob(f"*{RECORD_SUFFIX}") if not f.name.endswith(TRUTH_SUFFIX)
            )
        elif p.exists():
            if p.name.endswith(TRUTH_SUFFIX):
                raise RecordError(f"{p}: is a truth file, not a gradient record")
            found.append((p, True))
        else:
            raise RecordError(f"{p}: no such file or folder")
    return found


def find_records(paths: list[Path] | Path) -> list[Path]:
    """Record files among ``paths`` (files, or folders searched recursively); truth files excluded."""
    return [p for p, _ in find_record_files(paths)]


# -- low-level safetensors I/O ------------------------------------------------------------------

#: Largest record or truth file read (bytes). The whole file is read once into memory,
#: hashed (the result identity) and parsed from those bytes, so this bounds the memory
#: a load takes (about twice the file). ResNet-18 records are ~90 MB.
MAX_FILE_BYTES = 2 * 1024**3
#: Largest safetensors header (JSON) accepted, and its deepest nesting of arrays/objects.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_TENSORS = 100_000
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    data = safetensors_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)  # mkstemp creates 0600; records are meant to be shared and read by others


def _regular_file_check(path: Path, st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise RecordError(f"{path}: is {kind}, not a gradient record file")
    if st.st_size > limit:
        raise RecordError(f"{path}: {st.st_size:,} bytes is larger than the {limit:,} bytes a record may have")


def read_file_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, refusing anything else without blocking.

    ``os.stat`` is checked before opening: a FIFO, a device or a folder named
    ``*.safetensors`` is refused at once instead of blocking or streaming forever,
    and a file larger than ``limit`` before it is read. The opened file is checked
    again (``fstat``), so what is read is the regular file that was checked.
    """
    path = Path(path)
    try:
        _regular_file_check(path, os.stat(path), limit)
        with path.open("rb", buffering=0) as fh:
            st = os.fstat(fh.fileno())
            _regular_file_check(path, st, limit)
            data = fh.read(st.st_size)
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return data


def json_depth(raw: bytes) -> int:
    """Deepest nesting of JSON arrays/objects in ``raw`` (brackets inside strings do not count)."""
    import numpy as np

    bare = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = np.isin(bare, (ord("["), ord("{"))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}")))
    return int(steps.cumsum().max(initial=0))


def loads_bounded(path: Path, raw: bytes | str, what: str) -> Any:
    """``json.loads`` that refuses over-deep nesting first (a recursion error is not a message)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise RecordError(f"{path}: {what} nests {depth} levels deep (at most {MAX_JSON_DEPTH})")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RecordError(f"{path}: {what} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def _read_header(path: Path, data: bytes) -> dict[str, Any]:
    """Parse and check the safetensors header ourselves before the library sees the bytes."""
    size = len(data)
    head = data[:64]
    text = bool(head) and all(32 <= c < 127 or c in b"\t\r\n" for c in head)
    if text and not head.startswith(b"{"):
        raise RecordError(f"{path}: not a gradient record (a {size}-byte text file, not a safetensors file)")
    if size < 8:
        raise RecordError(f"{path}: truncated file ({size} bytes), not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or n + 8 > size or n < 2:
        raise RecordError(
            f"{path}: not a safetensors file (bad header length {n} for {size} bytes;"
            " a pickle, torch.save or text file is refused, never unpickled)"
        )
    raw = data[8 : 8 + n]
    if raw[:1] != b"{":
        raise RecordError(f"{path}: not a safetensors file (header is not a JSON object)")
    header = loads_bounded(path, raw, "safetensors header")
    if not isinstance(header, dict):
        raise RecordError(f"{path}: not a safetensors file (header is not a JSON object)")
    if len(header) > MAX_TENSORS:
        raise RecordError(f"{path}: {len(header)} tensors (at most {MAX_TENSORS})")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RecordError(f"{path}: safetensors metadata is not a string -> string map")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if len(name) > 512:
            raise RecordError(f"{path}: a tensor name is {len(name)} characters long (at most 512)")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise RecordError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPE_BYTES:
            raise RecordError(f"{path}: tensor {name!r} has unknown dtype {str(dtype)[:20]!r}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and d >= 0 for d in shape)):
            raise RecordError(f"{path}: tensor {name!r} has a malformed shape {str(shape)[:60]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise RecordError(f"{path}: tensor {name!r} has malformed data offsets")
        start, end = offsets
        if not 0 <= start <= end:
            raise RecordError(f"{path}: tensor {name!r} has bad data offsets {offsets}")
        if end > data_len:
            raise RecordError(f"{path}: truncated file (tensor {name!r} ends past the end of the file)")
        if math.prod(shape) * _DTYPE_BYTES[dtype] != end - start:
            raise RecordError(
                f"{path}: tensor {name!r} is {dtype} {shape} ({math.prod(shape) * _DTYPE_BYTES[dtype]} bytes)"
                f" but has {end - start} bytes of data"
            )
        spans.append((start, end))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise RecordError(f"{path}: tensor data overlaps or has gaps (at byte {start}, expected {position})")
        position = end
    if position != data_len:
        raise RecordError(f"{path}: {data_len - position} bytes after the last tensor (corrupt or truncated file)")
    return header


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Tensors, metadata and the sha256 of the bytes they were parsed from (read once)."""
    data = read_file_bytes(path)
    header = _read_header(path, data)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, RuntimeError, ValueError, TypeError) as exc:
        raise RecordError(f"{path}: corrupt safetensors file ({str(exc)[:200]})") from None
    return tensors, metadata, hashlib.sha256(data).hexdigest()


def _parse_meta(path: Path, metadata: Mapping[str, str], kind: str) -> dict[str, Any]:
    if _META_KEY not in metadata:
        raise RecordError(f"{path}: not a gia-bench {kind} (no '{_META_KEY}' metadata)")
    meta = loads_bounded(path, metadata[_META_KEY], f"{kind} metadata")
    if not isinstance(meta, dict):
        raise RecordError(f"{path}: {kind} metadata is not a JSON object")
    schema = meta.get("schema")
    if schema != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema version {schema!r} is not supported (this gia-bench reads {SCHEMA_VERSION})")
    if meta.get("kind") != kind:
        raise RecordError(f"{path}: is a {meta.get('kind')!r} file, expected a {kind}")
    return meta


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RecordError(f"{path}: tensor {name!r} has non-finite values (NaN or inf)")


# -- what a valid record holds: declared field by field ------------------------------------------
#
# Every metadata key (``extra``'s too) and every public tensor a record may carry is declared
# here, with its check. A record with an undeclared metadata key is refused; a new field (e.g.
# a FedAvg setting, or a training run's public state) is added by declaring it: a ``MetaField``
# in ``META_FIELDS`` or ``EXTRA_FIELDS`` (name, check of its JSON value, required or not) or a
# ``TensorRule`` in ``PUBLIC_TENSORS`` (allowed dtypes, size bound). Nothing else needs to change.

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
                " (a new key is declared in gia_bench.records.EXTRA_FIELDS)")  # fmt: skip
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
            " (a new field is declared in gia_bench.records.META_FIELDS)"
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



def read_meta(path: Path | str) -> RecordMeta:
    """The public metadata of the record at ``path`` (header checks only; tensors not validated)."""
    path = Path(path)
    header = _read_header(path, read_file_bytes(path))
    raw = _parse_meta(path, header.get("__metadata__") or {}, "record")
    check_meta_json(path, raw)
    try:
        return RecordMeta.from_json(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"{path}: record metadata is missing or has a bad field ({exc})") from None


# -- the record ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GradientRecord:
    """One worker's messages for one step, the model state, and the public compressor state."""

    meta: RecordMeta
    messages: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    public: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None  # of the file it was loaded from: part of every result's identity
    #: The worker's private state (its error-feedback residual) from the truth file, attached by
    #: the *evaluation side* for the ``oracle`` view only (:meth:`with_private`). Never saved,
    #: never filled by :meth:`load`: a record holds what a receiver sees and nothing else.
    private: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)

    def with_private(self, truth: Truth) -> GradientRecord:
        """This record with ``truth.private`` attached: the oracle view's upper-bound input."""
        return dataclasses.replace(self, private=dict(truth.private))

    @property
    def record_id(self) -> str:
        return self.meta.record_id

    @property
    def param_shapes(self) -> list[torch.Size]:
        return [self.weights[n].shape for n in self.meta.param_names]

    def save(self, path: Path) -> Path:
        """Write atomically (temporary file, then rename)."""
        tensors = {f"msg/{k}": v for k, v in self.messages.items()}
        tensors.update({f"weight/{k}": v for k, v in self.weights.items()})
        tensors.update({f"public/{k}": v for k, v in self.public.items()})
        meta = {"kind": "record", **self.meta.to_json()}
        _atomic_save(tensors, {_META_KEY: json.dumps(meta)}, Path(path))
        return Path(path)

    @classmethod
    def load(cls, path: Path | str, validate: bool = True) -> GradientRecord:
        """Read a record strictly; every problem raises :class:`RecordError` naming the file.

        ``validate`` checks the file's own consistency (:meth:`check_format`); that it is what
        its defense and model produce is :func:`gia_bench.receiver.load_record`'s job, which
        attacks and every command use.
        """
        path = Path(path)
        if path.name.endswith(TRUTH_SUFFIX):
            raise RecordError(f"{path}: is a truth file, not a gradient record")
        tensors, metadata, sha256 = _load_tensors(path)
        raw = _parse_meta(path, metadata, "record")
        check_meta_json(path, raw)
        try:
            meta = RecordMeta.from_json(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"{path}: record metadata is missing or has a bad field ({exc})") from exc
        groups: dict[str, dict[str, torch.Tensor]] = {"msg": {}, "weight": {}, "public": {}}
        for key, t in tensors.items():
            prefix, sep, name = key.partition("/")
            if not sep or prefix not in groups:
                raise RecordError(f"{path}: unexpected tensor {key!r}")
            groups[prefix][name] = t
        record = cls(meta, groups["msg"], groups["weight"], groups["public"], path, sha256)
        if validate:
            record.check_format()
        return record

    def check_format(self) -> None:
        """The record's own consistency, without building its model or compressor (one :class:`RecordError`).

        Tensors are finite; each message is described (tag, dtype, shape, bytes) and its
        bytes are its packed size; FedAvg metadata is in range; public tensors are declared
        kinds of a bounded size. That the record is what its defense and model produce
        (weights, message layout, decode) is checked by :func:`gia_bench.receiver.check_record`.
        """
        where = self.path or self.meta.record_id
        meta = self.meta
        _check_finite(where, {**self.messages, **self.weights, **self.public})
        described = [m["tag"] for m in meta.messages]
        missing = [t for t in described if t not in self.messages]
        if missing:
            raise RecordError(f"{where}: message tensors {missing} are missing")
        extra = [t for t in self.messages if t not in described]
        if extra:
            raise RecordError(f"{where}: message tensors {extra} are not described in the metadata")
        for info in meta.messages:
            t = self.messages[info["tag"]]
            if list(t.shape) != list(info["shape"]) or str(t.dtype).removeprefix("torch.") != info["dtype"]:
                raise RecordError(
                    f"{where}: message {info['tag']!r} is {str(t.dtype)} {list(t.shape)},"
                    f" metadata says {info['dtype']} {info['shape']}"
                )
            size = t.numel() * t.element_size()
            if info.get("payload_nbytes", size) != size:
                raise RecordError(
                    f"{where}: message {info['tag']!r} declares {info['payload_nbytes']} bytes, its tensor has {size}"
                )
        self._validate_local(where)
        n_params = sum(int(self.weights[n].numel()) for n in meta.param_names if n in self.weights)
        for key, t in self.public.items():
            rule = PUBLIC_TENSORS.get(key, DEFAULT_PUBLIC)
            if t.dtype not in rule.dtypes:
                raise RecordError(f"{where}: public tensor {key!r} is {t.dtype}; accepted: {rule.dtypes}")
            if t.numel() > rule.per_parameter * n_params + 2**16:
                raise RecordError(f"{where}: public tensor {key!r} has {t.numel():,} values, too many for the model")

    def _validate_local(self, where: Path | str) -> None:
        """FedAvg metadata: 1 <= local_steps <= MAX_LOCAL_STEPS, 1 <= local_batch <= batch_size, local_lr finite > 0."""
        from gia_bench.fedavg import MAX_LOCAL_STEPS

        meta = self.meta
        if meta.is_fedsgd:
            return
        if meta.local_lr is None or meta.local_batch is None:
            raise RecordError(f"{where}: local_steps {meta.local_steps} without local_lr and local_batch")
        if not 1 <= meta.local_steps <= MAX_LOCAL_STEPS:
            raise RecordError(f"{where}: local_steps {meta.local_steps} is outside [1, {MAX_LOCAL_STEPS}]")
        if not 1 <= meta.local_batch <= meta.batch_size:
            raise RecordError(f"{where}: local_batch {meta.local_batch} is outside [1, batch_size {meta.batch_size}]")
        if not (math.isfinite(meta.local_lr) and meta.local_lr > 0):
            raise RecordError(f"{where}: local_lr {meta.local_lr!r} must be finite and > 0")


@dataclasses.dataclass(frozen=True)
class Truth:
    """The ground truth of a record: the model inputs (normalised) and labels. Never given to attacks.

    ``private``: the worker's private compressor state at that step (``"residual"``: the
    error feedback it added to the gradient, see ``Compressor.private_state``), stored as
    ``private/<key>``; only the evaluation side reads it, for the ``oracle`` view.
    """

    inputs: torch.Tensor  # (B, C, H, W), as fed to the model
    labels: torch.Tensor  # (B,), int64
    record_id: str = ""
    private: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def save(self, path: Path) -> Path:
        meta = {"kind": "truth", "schema": SCHEMA_VERSION, "record_id": self.record_id}
        tensors = {"inputs": self.inputs, "labels": self.labels}
        tensors.update({f"private/{k}": v for k, v in self.private.items()})
        _atomic_save(tensors, {_META_KEY: json.dumps(meta)}, Path(path))
        return Path(path)

    @classmethod
    def load(cls, path: Path | str) -> Truth:
        path = Path(path)
        tensors, metadata, _ = _load_tensors(path)
        meta = _parse_meta(path, metadata, "truth")
        private = {k.removeprefix("private/"): v for k, v in tensors.items() if k.startswith("private/")}
        if set(tensors) - {f"private/{k}" for k in private} != {"inputs", "labels"}:
            raise RecordError(
                f"{path}: truth file must hold 'inputs', 'labels' and optional 'private/*', has {sorted(tensors)}"
            )
        inputs, labels = tensors["inputs"], tensors["labels"]
        if inputs.dim() != 4 or labels.dim() != 1 or inputs.shape[0] != labels.shape[0]:
            raise RecordError(f"{path}: truth shapes {tuple(inputs.shape)} / {tuple(labels.shape)} do not match")
        _check_finite(path, tensors)
        return cls(inputs, labels.to(torch.int64), str(meta.get("record_id", "")), private)
