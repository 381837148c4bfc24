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
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gia_bench.data import DatasetSpec
from gia_bench.errors import GiaBenchError, RecordError
from gia_bench.models import ModelSpec, build_model

SCHEMA_VERSION = 1
RECORD_SUFFIX = ".safetensors"
TRUTH_SUFFIX = ".truth.safetensors"
_META_KEY = "gia_bench"
_MAX_HEADER = 100 * 1024 * 1024


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


def find_records(paths: list[Path] | Path) -> list[Path]:
    """Record files among ``paths`` (files, or folders searched recursively); truth files excluded."""
    if isinstance(paths, Path):
        paths = [paths]
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(
                f for f in p.rglob(f"*{RECORD_SUFFIX}") if not f.name.endswith(TRUTH_SUFFIX)
            )
        elif p.exists():
            if p.name.endswith(TRUTH_SUFFIX):
                raise RecordError(f"{p}: is a truth file, not a gradient record")
            found.append(p)
        else:
            raise RecordError(f"{p}: no such file or folder")
    return found


# -- low-level safetensors I/O ------------------------------------------------------------------


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; records are meant to be shared and read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and check the safetensors header ourselves before the library opens the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise RecordError(f"{path}: truncated file ({size} bytes), not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n + 8 > size:
                raise RecordError(
                    f"{path}: not a safetensors file (bad header length {n} for {size} bytes;"
                    " a pickle or torch.save file is refused, never unpickled)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RecordError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise RecordError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise RecordError(f"{path}: tensor {name!r} has a malformed header entry")
        if offsets[1] > data_len:
            raise RecordError(f"{path}: truncated file (tensor {name!r} ends past the end of the file)")
    return header


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header = _read_header(path)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise RecordError(f"{path}: corrupt safetensors file ({exc})") from exc
    return tensors, metadata


def _parse_meta(path: Path, metadata: Mapping[str, str], kind: str) -> dict[str, Any]:
    if _META_KEY not in metadata:
        raise RecordError(f"{path}: not a gia-bench {kind} (no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: {kind} metadata is not valid JSON ({exc})") from exc
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


# -- the record ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GradientRecord:
    """One worker's messages for one step, the model state, and the public compressor state."""

    meta: RecordMeta
    messages: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    public: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    path: Path | None = None
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

    def compressor(self):
        """A fresh compressor with the record's parameters (for decode / simulate)."""
        from gia_bench.defenses import create

        return create(self.meta.defense)

    def decode(self) -> list[torch.Tensor]:
        """The gradient the receiver reconstructs from the messages (the naive attacker's target)."""
        return self.compressor().decode(self.messages, self.param_shapes, self.public)

    def build_model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model at the recorded step, in the recorded mode (train/eval)."""
        model = build_model(self.meta.model, seed=None, device="cpu")
        model.load_state_dict(self.weights, strict=True)
        return model.to(device)

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
        """Read a record strictly; every problem raises :class:`RecordError` naming the file."""
        path = Path(path)
        if path.name.endswith(TRUTH_SUFFIX):
            raise RecordError(f"{path}: is a truth file, not a gradient record")
        tensors, metadata = _load_tensors(path)
        raw = _parse_meta(path, metadata, "record")
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
        record = cls(meta, groups["msg"], groups["weight"], groups["public"], path)
        if validate:
            record.validate()
        return record

    def validate(self) -> None:
        """Check the record against its own metadata and model spec."""
        where = self.path or self.meta.record_id
        _check_finite(where, {**self.messages, **self.weights, **self.public})
        described = [m["tag"] for m in self.meta.messages]
        missing = [t for t in described if t not in self.messages]
        if missing:
            raise RecordError(f"{where}: message tensors {missing} are missing")
        extra = [t for t in self.messages if t not in described]
        if extra:
            raise RecordError(f"{where}: message tensors {extra} are not described in the metadata")
        for info in self.meta.messages:
            t = self.messages[info["tag"]]
            if list(t.shape) != list(info["shape"]) or str(t.dtype).removeprefix("torch.") != info["dtype"]:
                raise RecordError(
                    f"{where}: message {info['tag']!r} is {str(t.dtype)} {list(t.shape)},"
                    f" metadata says {info['dtype']} {info['shape']}"
                )
        try:
            with torch.device("meta"):
                model = build_model(self.meta.model, seed=None, device=None)
        except GiaBenchError as exc:
            raise RecordError(f"{where}: model spec {self.meta.model.spec!r} is invalid ({exc})") from exc
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for name, shape in expected.items():
            if name not in self.weights:
                raise RecordError(f"{where}: weight {name!r} of model {self.meta.model.spec!r} is missing")
            if tuple(self.weights[name].shape) != shape:
                raise RecordError(
                    f"{where}: weight {name!r} has shape {tuple(self.weights[name].shape)},"
                    f" model {self.meta.model.spec!r} needs {shape}"
                )
        unknown = [k for k in self.weights if k not in expected]
        if unknown:
            raise RecordError(f"{where}: weights {unknown[:5]} do not belong to model {self.meta.model.spec!r}")
        self._validate_local(where)
        names = [n for n, _ in model.named_parameters()]
        if list(self.meta.param_names) != names:
            raise RecordError(f"{where}: param_names do not match model {self.meta.model.spec!r}'s parameters")
        try:
            decoded = self.decode()
        except (GiaBenchError, RuntimeError, ValueError) as exc:
            raise RecordError(f"{where}: messages do not decode with defense {self.meta.defense!r} ({exc})") from exc
        for name, g, shape in zip(names, decoded, self.param_shapes):
            if tuple(g.shape) != tuple(shape):
                raise RecordError(f"{where}: decoded gradient of {name!r} has shape {tuple(g.shape)}, expected {tuple(shape)}")


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
        tensors, metadata = _load_tensors(path)
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
