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

Every writer (capture, the trainer, the federated server) writes a pair through
:func:`write_pair`: the truth first, then the record, each atomically.

Loading is strict and never unpickles: the file must be a well-formed safetensors
file with our schema; every error names the file and what is wrong. What each metadata
field and public tensor may hold is declared in :mod:`gia_bench.record_checks`.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from gia_bench.errors import RecordError
from gia_bench.io import atomic_write_bytes
from gia_bench.record_checks import (
    DEFAULT_PUBLIC,
    MAX_FILE_BYTES,  # also read by gia_bench.identity from here
    MAX_TENSORS,
    PUBLIC_TENSORS,
    SCHEMA_VERSION,
    _is_int,
    check_meta_json,
)
from gia_bench.specs import DatasetSpec, ModelSpec

RECORD_SUFFIX = ".safetensors"
TRUTH_SUFFIX = ".truth.safetensors"
_META_KEY = "gia_bench"


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

#: Largest safetensors header (JSON) accepted, and its deepest nesting of arrays/objects.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 32
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


def write_pair(path: Path | str, record: GradientRecord, truth: Truth | None) -> Path:
    """Write ``truth`` beside ``path`` (:func:`truth_path`), then ``record`` at ``path``; returns ``path``.

    The one writer of record files (capture, the trainer, the federated server). Each file
    is written atomically (temporary file, then rename), the truth first: a record on
    disk always has its complete truth beside it, so an interrupted writer leaves whole
    pairs and at most an orphan truth file, which :func:`find_records` never lists.
    ``truth`` is None only where the writer does not know the batch (a federated server
    in a real deployment); then the record is written alone.

    The pair must agree: one record id, the record's batch size, and a private residual
    (the oracle view's input) of one value per model parameter, floating point.
    """
    path = Path(path)
    if truth is not None:
        _check_pair(path, record, truth)
        truth.save(truth_path(path))
    record.save(path)
    return path


def _check_pair(path: Path, record: GradientRecord, truth: Truth) -> None:
    meta = record.meta
    if truth.record_id != meta.record_id:
        raise RecordError(f"{path}: truth of record {truth.record_id!r} given for record {meta.record_id!r}")
    if int(truth.inputs.shape[0]) != meta.batch_size or int(truth.labels.shape[0]) != meta.batch_size:
        raise RecordError(
            f"{path}: truth holds {int(truth.inputs.shape[0])} examples, the record's batch is {meta.batch_size}"
        )
    residual = truth.private.get("residual")
    n_params = sum(int(record.weights[n].numel()) for n in meta.param_names if n in record.weights)
    if residual is not None and (residual.numel() != n_params or not residual.is_floating_point()):
        raise RecordError(
            f"{path}: private residual of {residual.numel()} {residual.dtype} values, the record's"
            f" model {meta.model.spec!r} has {n_params} parameters"
        )
