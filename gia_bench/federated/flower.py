"""Flower's side of gia-bench: the optional import, the keys of a client's reply, tensors <-> Flower records.

Flower is optional (``pip install 'gia-bench[flower]'``); without it this module still
imports and every entry point raises :class:`FlowerMissingError`.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from gia_bench.errors import GiaBenchError

try:  # Flower is an optional extra: the module imports without it, its entry points say what to install
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg, Strategy

    HAVE_FLOWER = True
except ImportError:  # pragma: no cover - exercised by the missing-extra test through a subprocess
    HAVE_FLOWER = False
    Strategy = object  # type: ignore[assignment,misc]
    # the names the other modules import; every entry point calls require_flower() before using one
    ArrayRecord = ConfigRecord = Context = Message = MessageType = None  # type: ignore[assignment,misc]
    MetricRecord = RecordDict = FedAvg = None  # type: ignore[assignment,misc]

FLOWER_INSTALL = "pip install 'gia-bench[flower]'"

#: Keys of what the mod puts in a client's reply (the Flower ``RecordDict``).
MESSAGES_KEY = "gia-bench.messages"  # ArrayRecord: the defense's messages, tag -> tensor, in send order
PUBLIC_KEY = "gia-bench.public"  # ArrayRecord: the compressor's public state before the step
BUFFERS_KEY = "gia-bench.buffers"  # ArrayRecord: non-parameter state (BatchNorm statistics), fp32
INFO_KEY = "gia-bench"  # ConfigRecord: defense spec, local training, client id, message descriptions
#: A client's train handler may put its exact update u here (an ArrayRecord, parameter name -> tensor);
#: otherwise the mod computes u = (w_0 - w_K) / local_lr from the weights (equal up to rounding).
UPDATE_KEY = "gia-bench.update"
#: ArrayRecord: the compressor's *private* state before the step (its error-feedback residual),
#: put in the reply only by ``DefenseMod(send_private=True)``: a simulation's channel to the truth
#: file (the ``oracle`` view's input), never to a record or to the inner strategy.
PRIVATE_KEY = "gia-bench.private"
#: Where the mod keeps the compressor's state in the client's ``Context.state`` (never sent).
STATE_KEY = "gia-bench.defense-state"
#: Train-config keys the mod reads when it is not given the local training explicitly.
CONFIG_LR, CONFIG_STEPS, CONFIG_BATCH = "local-lr", "local-steps", "local-batch"


class FlowerMissingError(GiaBenchError):
    """Flower (the ``flower`` extra) is not installed."""


def require_flower() -> None:
    """Raise :class:`FlowerMissingError` (one line, exit 2 on the CLI) unless Flower imports."""
    if not HAVE_FLOWER:
        raise FlowerMissingError(f"Flower is not installed: {FLOWER_INSTALL}")


# -- Flower records <-> tensors --------------------------------------------------------------------


def to_array_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of CPU copies of ``tensors`` (order kept)."""
    if not tensors:
        return ArrayRecord()
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord, in its order (writable copies)."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def _save_state(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _load_state(data: bytes) -> dict[str, Any]:
    # weights_only: tensors, dicts, lists and plain values only; nothing is unpickled beyond that
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

