"""Checkpoint files: every rank's hook state and RNG gathered into one ``checkpoint.pt`` by rank 0.

Tensors and plain containers only, written atomically and read back with
``weights_only=True``, so a resumed run continues bit-identically and a checkpoint
never runs code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gia_bench.errors import ConfigError, GiaBenchError
from gia_bench.io import atomic_write
from gia_bench.train.config import CHECKPOINT_FILE

def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read our own checkpoint (never unpickles arbitrary objects: ``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no checkpoint") from None
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise ConfigError(f"{path}: not a gia-bench checkpoint ({exc})") from exc


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


def save_checkpoint(config, rank, world_size, device, model, optimizer, state, epoch, step, history) -> None:  # noqa: ANN001
    mine = {"hook": to_cpu(state.state_dict()), "rng": rng_state(device)}
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    # every rank's error feedback is its own, so rank 0 collects them all into one file
    dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return
    payload = {
        "format": "gia-bench-train-checkpoint",
        "version": 1,
        "epoch": epoch,
        "step": step,
        "world_size": world_size,
        "defense": state.compressor.spec,
        "model": to_cpu(model.state_dict()),
        "optimizer": to_cpu(optimizer.state_dict()),
        "ranks": gathered,
        "epochs": history,
    }
    atomic_write(config.out / CHECKPOINT_FILE, lambda tmp: torch.save(payload, tmp))


def checkpoint_note(out: Path) -> str:
    path = out / CHECKPOINT_FILE
    if not path.exists():
        return "no checkpoint was written yet"
    try:
        epoch = load_checkpoint(path)["epoch"]
    except GiaBenchError:
        return f"{path} could not be read"
    return f"last checkpoint {path} (epoch {epoch}) is intact"
