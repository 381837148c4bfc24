"""Checkpoint files: every rank's hook state and RNG gathered into one ``checkpoint.pt`` by rank 0.

Tensors and plain containers only, written atomically and read back with
``torch.load(weights_only=True, mmap=True)``, so a resumed run continues bit-identically,
a checkpoint never runs code, and reading one maps the file instead of allocating what
its header declares.

On ``--resume``, :func:`check_resume` validates the file field by field against the run
(its format, epoch, step, world size, defense; the model's names, shapes and dtypes; the
optimizer's groups and buffers; every rank's compressor state and RNG; finite values)
in the launching process, before any worker starts: each problem is one line naming the
file and the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gia_bench.errors import CheckpointError, GiaBenchError
from gia_bench.io import atomic_write
from gia_bench.train.config import CHECKPOINT_FILE, TrainConfig, _nnodes

FORMAT = "gia-bench-train-checkpoint"
VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (the only one this trainer writes)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint of this trainer: a regular file, ``torch.save``'s zip archive, a dict.

    Never unpickles arbitrary objects (``weights_only=True``); the tensors are memory-mapped,
    so a header that declares huge tensors cannot make the reader allocate them.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"{path}: not a gia-bench training checkpoint (not a torch.save archive)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a gia-bench training checkpoint ({first})") from exc
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: holds a {type(ck).__name__}, not a gia-bench training checkpoint (a dict)")
    return ck


# -- validation before the workers start -----------------------------------------------------------


def _int(ck: Mapping[str, Any], key: str, path: Path, where: str = "") -> int:
    """``ck[key]``, a non-negative int (not a bool), or a one-line :class:`CheckpointError`."""
    if key not in ck:
        raise CheckpointError(f"{path}: {where}{key!r} is missing")
    value = ck[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{path}: {where}{key!r} is {value!r}, not an integer")
    if value < 0:
        raise CheckpointError(f"{path}: {where}{key!r} is {value}, must be >= 0")
    return value


def _tensors(value: Any, prefix: str = ""):
    """``(name, tensor)`` for every tensor in nested dicts / lists."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}[{i}]")


def _check_finite(value: Any, path: Path, where: str) -> None:
    for name, t in _tensors(value):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: {where} tensor {name!r} has non-finite values (NaN or inf)")


def _check_like(got: Any, want: torch.Tensor, path: Path, where: str) -> None:
    if not isinstance(got, torch.Tensor):
        raise CheckpointError(f"{path}: {where} is {type(got).__name__}, not a tensor")
    if tuple(got.shape) != tuple(want.shape):
        raise CheckpointError(f"{path}: {where} has shape {tuple(got.shape)}, the model needs {tuple(want.shape)}")
    if got.dtype != want.dtype:
        raise CheckpointError(f"{path}: {where} has dtype {got.dtype}, the model needs {want.dtype}")


def expected_world_size(config: TrainConfig) -> int | None:
    """The run's world size when it is fixed (``--nnodes N``), else None (elastic)."""
    lo, hi = _nnodes(config.nnodes)
    return config.nproc_per_node * lo if lo == hi else None


def reference_model(config: TrainConfig) -> torch.nn.Module:
    """The run's model on the meta device: names, shapes and dtypes, no memory."""
    from gia_bench.data import load_dataset
    from gia_bench.models import build_recorded
    from gia_bench.specs import ModelSpec

    spec = load_dataset(config.dataset, root=config.data_root, download=False, split="train").spec
    with torch.device("meta"):
        model, _ = build_recorded(ModelSpec.for_data(config.model, spec, "train", config.fewbit_backward), device=None)
        return model


def size_bound(model: torch.nn.Module, world_size: int) -> int:
    """Bytes a checkpoint of ``model`` trained by ``world_size`` workers can hold, with room to spare.

    Model and optimizer buffer, and per rank a residual and a copy per worker (LAQ keeps
    every peer's stale gradient), plus 64 MiB for RNG states, Q factors and metadata.
    """
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return model_bytes * (3 + world_size * (2 + world_size)) + (64 << 20)


def validate_checkpoint(
    ck: Any, path: Path, config: TrainConfig, model: torch.nn.Module, world_size: int | None = None
) -> None:
    """Raise :class:`CheckpointError` (one line: the file and the field) unless ``ck`` resumes this run.

    Checked in order: the header (format, version, epoch, step, world size, defense, history),
    the model, the optimizer, and every rank's hook state and RNG.
    """
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: holds a {type(ck).__name__}, not a gia-bench training checkpoint (a dict)")
    saved_world, spec = _check_header(ck, path, config, world_size)
    _check_model(ck, path, config, model)
    _check_optimizer(ck, path, model)
    ranks = ck.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != saved_world:
        raise CheckpointError(f"{path}: 'ranks' must hold one entry per worker ({saved_world})")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for r, entry in enumerate(ranks):
        _check_rank(entry, r, path, spec, shapes)


def _check_header(ck: dict, path: Path, config: TrainConfig, world_size: int | None) -> tuple[int, str]:
    """Format, version, epoch, step, world size, defense and history; returns the saved world size and defense."""
    from gia_bench.defenses import create

    if ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gia-bench training checkpoint ('format' is {ck.get('format')!r})")
    if ck.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ck.get('version')!r}, this gia-bench reads {VERSION}")
    epoch = _int(ck, "epoch", path)
    if not 1 <= epoch <= config.epochs:
        raise CheckpointError(
            f"{path}: 'epoch' is {epoch}; a checkpoint is written after epoch 1 to --epochs {config.epochs}"
        )
    step = _int(ck, "step", path)
    if step < epoch:
        raise CheckpointError(f"{path}: 'step' is {step}, fewer than the {epoch} epochs done")
    saved_world = _int(ck, "world_size", path)
    if saved_world < 1:
        raise CheckpointError(f"{path}: 'world_size' is {saved_world}, must be >= 1")
    if world_size is not None and saved_world != world_size:
        raise CheckpointError(
            f"{path}: saved with {saved_world} workers, this run has {world_size} (error feedback is per worker)"
        )
    spec = create(config.defense_spec()).spec
    if ck.get("defense") != spec:
        raise CheckpointError(f"--resume: {path} was trained with {ck.get('defense')!r}, not {spec!r}")
    history = ck.get("epochs")
    if not isinstance(history, list) or len(history) != epoch or not all(isinstance(e, dict) for e in history):
        raise CheckpointError(f"{path}: 'epochs' must list one dict per epoch done ({epoch})")
    return saved_world, spec


def _check_model(ck: dict, path: Path, config: TrainConfig, model: torch.nn.Module) -> None:
    """The model: every name, shape and dtype, finite."""
    weights = ck.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: 'model' is {type(weights).__name__}, not a state dict")
    want = model.state_dict()
    missing = [k for k in want if k not in weights]
    unexpected = [k for k in weights if k not in want]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: 'model' does not fit {config.model!r}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, t in want.items():
        _check_like(weights[name], t, path, f"model weight {name!r}")
    _check_finite(weights, path, "model")


def _check_optimizer(ck: dict, path: Path, model: torch.nn.Module) -> None:
    """The optimizer: one group over every parameter, buffers shaped like them, finite."""
    params = [p for _, p in model.named_parameters()]
    opt = ck.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise CheckpointError(f"{path}: 'optimizer' is not an optimizer state dict (state, param_groups)")
    ids = [i for g in opt["param_groups"] if isinstance(g, dict) for i in (g.get("params") or [])]
    if len(opt["param_groups"]) != 1 or ids != list(range(len(params))):
        raise CheckpointError(f"{path}: 'optimizer' groups do not cover the model's {len(params)} parameters")
    for key, entry in opt["state"].items():
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(params) or not isinstance(entry, dict):
            raise CheckpointError(f"{path}: 'optimizer' state has an entry {key!r} for no parameter")
        for field, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                _check_like(value, params[key], path, f"optimizer {field} of parameter {key}")
    _check_finite(opt, path, "optimizer")


def _check_rank(entry: Any, r: int, path: Path, spec: str, shapes: Mapping[str, torch.Size]) -> None:
    """Rank ``r``'s hook state (the compressor's own check of its state) and RNG."""
    from gia_bench.defenses import create
    from gia_bench.defenses.ddp import clone_state

    where = f"rank {r}'s "
    if not isinstance(entry, dict) or not isinstance(entry.get("hook"), dict) or not isinstance(entry.get("rng"), dict):
        raise CheckpointError(f"{path}: 'ranks'[{r}] must be a dict with 'hook' and 'rng'")
    hook, rng = entry["hook"], entry["rng"]
    for key in ("step", "bytes_sent", "payload_bytes"):
        _int(hook, key, path, where + "hook ")
    if hook.get("spec") != spec:
        raise CheckpointError(f"{path}: {where}hook state is for {hook.get('spec')!r}, this run uses {spec!r}")
    state = hook.get("compressor")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {where}compressor state is {type(state).__name__}, not a dict")
    _check_finite(state, path, where + "compressor state")
    residuals = state.get("residuals")
    if isinstance(residuals, dict):
        for key, value in residuals.items():
            if key in shapes and isinstance(value, torch.Tensor) and value.numel() != math.prod(shapes[key]):
                raise CheckpointError(
                    f"{path}: {where}residual of {key!r} has {value.numel()} values, the parameter {math.prod(shapes[key])}"
                )
    try:
        create(spec).load_state_dict(clone_state(state))
    except GiaBenchError as exc:
        raise CheckpointError(f"{path}: {where}compressor state does not load ({exc})") from None
    except Exception as exc:  # a compressor's loader may fail in any way on a foreign state
        raise CheckpointError(f"{path}: {where}compressor state does not load ({type(exc).__name__}: {exc})") from None
    cpu = rng.get("cpu")
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"{path}: {where}'rng'['cpu'] is not a CPU generator state")
    cuda = rng.get("cuda")
    if cuda is not None and (not isinstance(cuda, torch.Tensor) or cuda.dtype != torch.uint8):
        raise CheckpointError(f"{path}: {where}'rng'['cuda'] is not a CUDA generator state")


def check_resume(config: TrainConfig) -> dict[str, Any] | None:
    """Validate ``out/checkpoint.pt`` for ``--resume`` before any worker starts; the checkpoint, or None.

    The file size is bounded by the model's size before anything is read.
    """
    path = config.out / CHECKPOINT_FILE
    if not config.resume or not (path.exists() or path.is_symlink()):
        return None
    world = expected_world_size(config)
    model = reference_model(config)
    if path.is_file():
        bound = size_bound(model, world or config.nproc_per_node * _nnodes(config.nnodes)[1])
        size = path.stat().st_size
        if size > bound:
            raise CheckpointError(
                f"{path}: {size:,} bytes, more than a checkpoint of {config.model!r} can hold ({bound:,})"
            )
    ck = load_checkpoint(path)
    validate_checkpoint(ck, path, config, model, world)
    return ck


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.getrng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """Floating tensors to ``device``; others (generator states, counters) stay on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """What one worker contributes to the checkpoint written after an epoch (rank 0 writes the file).

    ``hook`` is the DDP comm hook's state (:func:`gia_bench.defenses.ddp.make_hook`): this
    rank's compressor (its error feedback is its own) and byte counters.
    """

    out: Path  # the run folder: the file is out / CHECKPOINT_FILE
    rank: int
    world_size: int
    device: torch.device
    epoch: int  # epochs done
    step: int  # optimizer steps done
    history: list[dict[str, Any]]  # metrics.json's row of every epoch done
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    hook: Any


def save_checkpoint(ck: CheckpointState) -> None:
    """Gather every rank's hook state and RNG to rank 0, which writes the checkpoint atomically."""
    mine = {"hook": to_cpu(ck.hook.state_dict()), "rng": rng_state(ck.device)}
    gathered: list[Any] | None = [None] * ck.world_size if ck.rank == 0 else None
    # every rank's error feedback is its own, so rank 0 collects them all into one file
    dist.gather_object(mine, gathered, dst=0)
    if ck.rank != 0:
        return
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": ck.epoch,
        "step": ck.step,
        "world_size": ck.world_size,
        "defense": ck.hook.compressor.spec,
        "model": to_cpu(ck.model.state_dict()),
        "optimizer": to_cpu(ck.optimizer.state_dict()),
        "ranks": gathered,
        "epochs": ck.history,
    }
    atomic_write(ck.out / CHECKPOINT_FILE, lambda tmp: torch.save(payload, tmp))


def checkpoint_note(out: Path) -> str:
    path = out / CHECKPOINT_FILE
    if not path.exists():
        return "no checkpoint was written yet"
    try:
        epoch = load_checkpoint(path).get("epoch")
    except GiaBenchError:
        return f"{path} could not be read"
    return f"last checkpoint {path} (epoch {epoch}) is intact"
