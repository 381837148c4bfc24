"""Capture: batch -> gradient -> compressor -> GradientRecord (+ truth file).

The record holds exactly what went on the wire (the messages a
:class:`~gia_bench.comm.LocalCommunicator` logged), the model state the server
has *before* the step, and the compressor's public state; the truth (inputs and
labels) is returned apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.defenses.base import Compressor
from gia_bench.errors import CheckpointError, CompressorError, DataError, RecordError, SpecError
from gia_bench.events import SILENT, Events
from gia_bench.fedavg import LocalTraining, local_update
from gia_bench.io import slug
from gia_bench.models import MODELS, build_recorded
from gia_bench.receiver import load_record
from gia_bench.records import RECORD_SUFFIX, GradientRecord, RecordMeta, Truth, truth_path, write_pair
from gia_bench.registry import parse_spec
from gia_bench.specs import DatasetSpec, ModelSpec

LOSSES = {"cross_entropy": F.cross_entropy}


def compute_gradient(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss: str = "cross_entropy"
) -> list[torch.Tensor]:
    """Gradient of the mean batch loss w.r.t. every parameter, in ``model.parameters()`` order.

    The loss is scored against the model's own targets where it names them (a causal LM: the next
    tokens, :func:`gia_bench.text.causal.targets_for`), else against ``labels``.
    """
    from gia_bench.text.causal import targets_for

    params = [p for p in model.parameters()]
    value = LOSSES[loss](model(inputs), targets_for(model, inputs, labels))
    return [g.detach() for g in torch.autograd.grad(value, params)]


def capture_batch(
    model: nn.Module,
    model_spec: ModelSpec,
    dataset_spec: DatasetSpec,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    compressor: Compressor,
    record_id: str,
    step: int = 0,
    seed: int = 0,
    extra: dict | None = None,
    local: LocalTraining | None = None,
) -> tuple[GradientRecord, Truth]:
    """One worker's step on (``inputs``, ``labels``) as a record and its truth.

    The gradient is computed here with the cross-entropy loss. With ``local`` (FedAvg,
    :mod:`gia_bench.fedavg`) the compressor gets the client's update u = (w_0 - w_K) / lr
    after ``local.steps`` local SGD steps instead, and the record's metadata says so;
    K = 1 on the whole batch is the FedSGD record, byte for byte.
    """
    batch_size = int(inputs.shape[0])
    local = local or LocalTraining()
    local.check(batch_size)
    # The server knows the model as it was before this step's forward (BN statistics included).
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    names = tuple(n for n, _ in model.named_parameters())
    if local.is_fedsgd(batch_size):
        grads = compute_gradient(model, inputs, labels)
    else:
        grads = local_update(model, inputs, labels, local.steps, local.lr, local.local_batch(batch_size))
    comm = LocalCommunicator(record=True)
    # what this worker adds privately to the gradient (error feedback): truth file only
    private = compressor.private_state(list(names), [g.shape for g in grads])
    # keys are parameter names, as the DDP hook passes them, so per-layer settings can match names
    out = compressor.step(list(grads), comm, keys=list(names))
    if len(out) != len(grads) or any(o.shape != g.shape for o, g in zip(out, grads)):
        raise CompressorError(f"{compressor.spec}: step returned shapes that differ from the gradients'")
    meta = RecordMeta(
        record_id=record_id,
        defense=compressor.spec,
        model=model_spec,
        dataset=dataset_spec,
        batch_size=int(inputs.shape[0]),
        param_names=names,
        messages=tuple(m.info() for m in comm.messages),
        bytes_sent=comm.bytes_sent,
        step=step,
        seed=seed,
        extra=dict(extra or {}),
        **local.meta_fields(batch_size),
    )
    public = {k: v.detach().cpu().clone() for k, v in compressor.public_state().items()}
    record = GradientRecord(meta, messages_by_tag(comm.messages), weights, public)
    truth = Truth(
        inputs.detach().cpu().clone(),
        labels.detach().cpu().clone().to(torch.int64),
        record_id,
        {k: v.detach().cpu().clone() for k, v in private.items()},
    )
    return record, truth


# -- checkpoints -----------------------------------------------------------------------------------

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """A model state dict from ``path``: safetensors (a plain state dict, or a record's
    ``weight/*``) or a ``torch.save``'d state dict read with ``weights_only=True``.

    A dict holding the state dict under ``state_dict`` / ``model_state_dict`` / ``model``
    is unwrapped, and DDP's ``module.`` prefix removed. Nothing is ever unpickled beyond
    what ``weights_only`` allows; every problem raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file (--checkpoint)")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise CheckpointError(f"{path}: not a regular file (--checkpoint)")
    with path.open("rb") as fh:
        head = fh.read(8)
    # torch.save writes a zip archive (PK\x03\x04) or, in its legacy format, a pickle (\x80 + protocol)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        try:
            # an archive is memory-mapped: what its header declares is never allocated beyond the file
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK\x03\x04"))
        except Exception as exc:  # weights_only refuses arbitrary objects with UnpicklingError, others vary
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path}: not a state dict that torch.load(weights_only=True) accepts ({first})"
            ) from exc
    else:
        try:
            obj = load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: neither a safetensors file nor a torch.save file ({exc})") from exc
    if isinstance(obj, dict):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:3]} are not named tensors; expected a model state dict")
    state: dict[str, torch.Tensor] = dict(obj)
    if any(k.startswith("weight/") for k in state):  # a gradient record: its model weights
        state = {k[len("weight/") :]: v for k, v in state.items() if k.startswith("weight/")}
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module.") :]: v for k, v in state.items()}
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name!r} has non-finite values (NaN or inf)")
    return state


def load_checkpoint(model: nn.Module, path: Path | str, spec: str = "") -> str:
    """Load the state dict at ``path`` into ``model`` (strictly); returns the file's SHA-256."""
    path = Path(path)
    state = read_checkpoint(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    what = f"model {spec!r}" if spec else "the model"
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit {what}: missing {missing[:3]}{'...' if len(missing) > 3 else ''},"
            f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, t in expected.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, {what} needs {tuple(t.shape)}"
            )
        # load_state_dict would cast silently: integer codes are not weights (fp16 / bf16 weights are)
        got = state[name].dtype
        if t.is_floating_point() != got.is_floating_point or got in (torch.bool, torch.complex64, torch.complex128):
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {got}, {what} needs {t.dtype}")
    model.load_state_dict(state, strict=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- capture: many batches to records on disk ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """What ``gia-bench capture`` does: ``num`` records of one step of one worker each.

    Attributes:
        dataset: data set spec (``digits``, ``cifar10:channels=1``, ...); batches come from its train split.
        model: model spec (``lenet``, ``convnet:width=32``, ...); input shape and classes from the data.
        defense: compressor spec (``none``, ``lqsgd:rank=1``, ...); a fresh one per record.
        batch_size: images per batch (distinct images within a batch).
        num: number of records (batches).
        seed: seeds the batch choice and the model's initial weights.
        out: folder the records and truth files are written to.
        checkpoint: trained weights to load instead of the seeded initialisation.
        data_root: where torchvision data sets live.
        download: let torchvision download into ``data_root``.
        model_mode: "train" or "eval": BatchNorm behaviour during the gradient.
        device: torch device the gradient is computed on.
        fewbit_backward: bits of Few-Bit Backward activations (0: exact backward); the record says so.
        local_steps: FedAvg local SGD steps K before the client sends (1: the FedSGD gradient).
        local_lr: the client's local learning rate (only used when K > 1).
        local_batch: examples per local step, taken cyclically from the batch (None: the whole batch).
    """

    dataset: str = "digits"
    model: str = "lenet"
    defense: str = "none"
    batch_size: int = 1
    num: int = 8
    seed: int = 0
    out: Path = Path("records")
    checkpoint: Path | None = None
    data_root: Path | None = None
    download: bool = False
    model_mode: str = "train"
    device: str = "cpu"
    fewbit_backward: int = 0
    local_steps: int = 1
    local_lr: float = 0.1
    local_batch: int | None = None

    def __post_init__(self) -> None:
        for key in ("out", "checkpoint", "data_root"):  # a str from a Python caller is a path too
            value = getattr(self, key)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, key, Path(value))

    @property
    def local(self) -> LocalTraining:
        return LocalTraining(self.local_steps, self.local_lr, self.local_batch)


def record_prefix(dataset: str, model: str) -> str:
    """The start of every record id of a capture (or a federated run) of ``model`` on ``dataset``.

    Registry names made safe for file names (``pkg.mod:Class`` -> ``pkg.mod_Class``).
    """
    names = (parse_spec(dataset).name, parse_spec(model).name)
    return "".join(slug(n, keep="A-Za-z0-9_.-", fill="_", strip="._", default="x") + "-" for n in names)


def record_id(dataset: str, model: str, index: int) -> str:
    """The stable, file-system-safe id of the ``index``-th record of a capture."""
    return f"{record_prefix(dataset, model)}{index:04d}"


def batch_indices(n: int, batch_size: int, num: int, seed: int) -> list[list[int]]:
    """``num`` batches of distinct indices in ``range(n)``, drawn from a generator seeded with ``seed``.

    Successive random permutations are concatenated, so no image repeats before all
    have been used; a batch never holds the same image twice.
    """
    if batch_size > n:
        raise DataError(f"--batch-size {batch_size} is larger than the {n} training images of the data set")
    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    pool: list[int] = []
    while len(batches) < num:
        if len(pool) < batch_size:
            # top up with a fresh permutation, avoiding images already in the partial batch
            fresh = [i for i in torch.randperm(n, generator=gen).tolist() if i not in pool]
            pool += fresh
        batches.append(pool[:batch_size])
        pool = pool[batch_size:]
    return batches


def _check_config(cfg: CaptureConfig) -> torch.device:
    if cfg.batch_size < 1:
        raise SpecError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.num < 1:
        raise SpecError(f"--num must be >= 1, got {cfg.num}")
    cfg.local.check(cfg.batch_size)
    if cfg.model_mode not in ("train", "eval"):
        raise SpecError(f"--model-mode must be 'train' or 'eval', got {cfg.model_mode!r}")
    if not 0 <= cfg.fewbit_backward <= 8:
        raise SpecError(f"--fewbit-backward must be 0 (exact) or 1..8 bits, got {cfg.fewbit_backward}")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        raise SpecError(f"--device {cfg.device!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"--device {cfg.device}: CUDA is not available on this machine")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise SpecError(f"--out {cfg.out}: is a file, expected a folder for the records")
    return device


@contextlib.contextmanager
def exact_cuda() -> Iterator[None]:
    """Full fp32 and deterministic kernels on CUDA for the duration (restored afterwards).

    PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default: on an H100 a
    ResNet-18 gradient then differs from the fp32 one by ~10% (relative L2), and cuDNN's
    autotuned algorithms differ from run to run. A record must hold the gradient the model
    defines, and the same seed must give the same files, so capture turns both off.
    """
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ) = saved


_LOCAL_FIELDS = ("local_steps", "local_lr", "local_batch")


def _existing_is_ours(path: Path, expected: RecordMeta, weights: dict[str, torch.Tensor]) -> bool:
    """True if ``path`` holds a valid record (and truth) of this very capture; False if absent or broken.

    A valid record from a *different* capture raises: mixing two captures in one
    folder would silently give attacks the wrong records.
    """
    if not path.exists():
        return False
    try:
        record = load_record(path)
        Truth.load(truth_path(path))
    except RecordError:
        return False  # broken or half-written: capture it again
    got, want = record.meta, expected
    fields = ("defense", "model", "dataset", "batch_size", "seed", "loss", "step", "extra", *_LOCAL_FIELDS)
    diff = [f for f in fields if getattr(got, f) != getattr(want, f)]
    if not diff and (record.weights.keys() != weights.keys() or not all(
        torch.equal(record.weights[k], weights[k]) for k in weights
    )):
        diff.append("weights")
    if diff:
        raise RecordError(
            f"{path}: exists from a different capture ({', '.join(diff)} differ, e.g. {diff[0]}"
            f" {getattr(got, diff[0], '...')!s:.60} vs {getattr(want, diff[0], '...')!s:.60});"
            " use another --out or delete it"
        )
    return True


def capture(cfg: CaptureConfig, events: Events = SILENT) -> list[Path]:
    """``gia-bench capture``: capture ``cfg.num`` records into ``cfg.out``; returns their paths (in order).

    Each record is one step of one worker: the seeded (or ``checkpoint``) model,
    a batch from the train split, a fresh compressor. Records already in ``out``
    from the same configuration are kept (resumable); files are written atomically,
    the truth before its record, so an interrupted run leaves only complete pairs.
    Same configuration and seed -> byte-identical files.

    ``events``: ``on_start(num, "record", "capture DATASET / MODEL / DEFENSE")``, then per
    record ``on_result(record id, path)`` (or ``on_skip`` when it is already there) and
    ``on_step(records done)``.
    """
    device = _check_config(cfg)
    create_defense(cfg.defense)  # a bad defense spec fails before any data is loaded
    MODELS.kwargs_for(cfg.model)
    data = load_dataset(cfg.dataset, root=cfg.data_root, download=cfg.download, split="train")
    spec = data.spec
    model, model_spec = build_recorded(
        ModelSpec.for_data(cfg.model, spec, cfg.model_mode, cfg.fewbit_backward), seed=cfg.seed, device="cpu"
    )
    extra: dict[str, Any] = {}
    if cfg.checkpoint is not None:
        extra["checkpoint_sha256"] = load_checkpoint(model, cfg.checkpoint, model_spec.spec)
    model.to(device)
    # every record starts from the same model: BatchNorm's running statistics would otherwise drift
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial_cpu = {k: v.cpu() for k, v in initial.items()}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = batch_indices(len(data), cfg.batch_size, cfg.num, cfg.seed)
    paths = []
    events.on_start(cfg.num, "record", f"capture {cfg.dataset} / {cfg.model} / {cfg.defense}")
    for i, indices in enumerate(batches):
        rid = record_id(cfg.dataset, cfg.model, i)
        path = out / f"{rid}{RECORD_SUFFIX}"
        paths.append(path)
        compressor = create_defense(cfg.defense)
        expected = RecordMeta(
            record_id=rid,
            defense=compressor.spec,
            model=model_spec,
            dataset=spec,
            batch_size=cfg.batch_size,
            param_names=(),
            messages=(),
            bytes_sent=0,
            seed=cfg.seed,
            extra=extra,
            **cfg.local.meta_fields(cfg.batch_size),
        )
        if _existing_is_ours(path, expected, initial_cpu):
            events.on_skip(rid, "already there")
            events.on_step(i + 1, rid)
            continue
        model.load_state_dict(initial)
        inputs, labels = data.batch(indices)
        with exact_cuda():
            record, truth = capture_batch(
                model, model_spec, spec, inputs.to(device), labels.to(device), compressor, rid,
                step=0, seed=cfg.seed, extra=extra, local=cfg.local,
            )
        write_pair(path, record, truth)
        events.on_result(rid, str(path))
        events.on_step(i + 1, rid)
    return paths


@dataclasses.dataclass(frozen=True)
class RecordSummary:
    """One line of the capture summary."""

    record_id: str
    path: Path
    batch_size: int
    bytes_sent: int
    fp32_bytes: int  # what plain SGD would send: 4 bytes per parameter

    @property
    def ratio(self) -> float:
        """Compression ratio against fp32 gradients (> 1: fewer bytes)."""
        return self.fp32_bytes / self.bytes_sent if self.bytes_sent else float("inf")


def summarize(paths: Sequence[Path]) -> list[RecordSummary]:
    """Bytes and compression ratio of each record (read from the files)."""
    rows = []
    for path in paths:
        record = GradientRecord.load(path, validate=False)
        fp32 = 4 * sum(record.weights[n].numel() for n in record.meta.param_names)
        rows.append(RecordSummary(record.record_id, Path(path), record.meta.batch_size, record.meta.bytes_sent, fp32))
    return rows
