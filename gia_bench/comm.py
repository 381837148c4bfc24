"""Communicators: what a compressor talks through, and the log of what it sent.

A :class:`~gia_bench.defenses.base.Compressor` never calls ``torch.distributed``
itself; it calls ``comm.all_reduce`` / ``comm.all_gather`` / ``comm.all_to_all``.
Every call is logged as a :class:`Message` so that bytes are counted from what is
sent, never from a formula, and so that :class:`LocalCommunicator` can hand the
exact messages to a :class:`~gia_bench.records.GradientRecord`.

Byte accounting (``Message.nbytes``: bytes this worker puts on the wire):

* :class:`LocalCommunicator` (one worker talking to a server): the payload, i.e. the
  tensor's bytes. This is what a capture records and what an attacker sees.
* :class:`TorchCommunicator` over ``torch.distributed`` with N workers, counted
  per worker as the bandwidth-optimal ring algorithms send them:

  - ``all_reduce`` of B bytes: ``2 (N-1)/N * B`` (reduce-scatter + all-gather);
  - ``all_gather`` of B bytes per worker: ``(N-1) * B`` (each worker forwards the
    N-1 buffers of the others; equal to what it receives);
  - ``all_to_all`` of B bytes (split in N chunks): ``(N-1)/N * B``.

  With N = 1 nothing leaves the worker, so ``nbytes`` is 0; ``payload_nbytes``
  always holds the tensor's own size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from gia_bench.errors import CompressorError, ConfigError


@dataclasses.dataclass
class Message:
    """One collective call of one worker."""

    tag: str
    op: str  # "all_reduce" | "all_gather" | "all_to_all"
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    payload_nbytes: int
    tensor: torch.Tensor | None = None

    def info(self) -> dict:
        """JSON-able description (no tensor)."""
        return {
            "tag": self.tag,
            "op": self.op,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "payload_nbytes": self.payload_nbytes,
        }


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Communicator:
    """The collectives a compressor may use. Subclasses implement ``_all_reduce`` etc."""

    world_size: int = 1
    rank: int = 0

    def __init__(self, record: bool = False) -> None:
        self.record = record
        self.messages: list[Message] = []

    # -- accounting ---------------------------------------------------------------
    def wire_bytes(self, op: str, payload: int) -> int:
        """Bytes one worker sends for ``op`` on a payload of ``payload`` bytes."""
        raise NotImplementedError

    def _log(self, tag: str, op: str, tensor: torch.Tensor) -> None:
        payload = tensor_nbytes(tensor)
        self.messages.append(
            Message(
                tag=tag,
                op=op,
                dtype=tensor.dtype,
                shape=tuple(tensor.shape),
                nbytes=self.wire_bytes(op, payload),
                payload_nbytes=payload,
                tensor=tensor.detach().to("cpu", copy=True) if self.record else None,
            )
        )

    @property
    def bytes_sent(self) -> int:
        return sum(m.nbytes for m in self.messages)

    def reset(self) -> list[Message]:
        """Forget the log; returns what it held."""
        messages, self.messages = self.messages, []
        return messages

    # -- collectives --------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, tag: str) -> torch.Tensor:
        """Sum ``tensor`` over workers, in place; returns it."""
        self._log(tag, "all_reduce", tensor)
        return self._all_reduce(tensor)

    def all_gather(self, tensor: torch.Tensor, tag: str) -> list[torch.Tensor]:
        """Every worker's ``tensor`` (same shape on all), in rank order."""
        self._log(tag, "all_gather", tensor)
        return self._all_gather(tensor)

    def all_to_all(self, chunks: Sequence[torch.Tensor], tag: str) -> list[torch.Tensor]:
        """Send ``chunks[j]`` to rank j; returns the chunk each rank sent to this one.

        Chunks must have the same shape on every rank for a given j.
        """
        if len(chunks) != self.world_size:
            raise CompressorError(f"all_to_all needs {self.world_size} chunks, got {len(chunks)}")
        self._log(tag, "all_to_all", torch.cat([c.reshape(-1) for c in chunks]))
        return self._all_to_all(list(chunks))

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def _all_to_all(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError


class LocalCommunicator(Communicator):
    """One worker; records every message it would send (what ``capture`` saves)."""

    def __init__(self, record: bool = True) -> None:
        super().__init__(record=record)

    def wire_bytes(self, op: str, payload: int) -> int:
        return payload

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def _all_to_all(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        return chunks


class TorchCommunicator(Communicator):
    """``torch.distributed`` (gloo on CPU, nccl on GPU); blocking collectives.

    Collectives are issued synchronously and in program order, so every rank issues
    the same sequence: the property PyTorch's asynchronous PowerSGD hook loses with
    several buckets on gloo.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, record: bool = False) -> None:
        super().__init__(record=record)
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("TorchCommunicator needs an initialised torch.distributed process group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def wire_bytes(self, op: str, payload: int) -> int:
        return ring_wire_bytes(op, payload, self.world_size)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.group)
        return out

    def _all_to_all(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        chunks = [c.contiguous() for c in chunks]
        out = [torch.empty_like(c) for c in chunks]
        if dist.get_backend(self.group) == "gloo":
            # gloo has no all_to_all; scatter from each rank in turn is the same exchange
            for src in range(self.world_size):
                global_src = src if self.group is None else dist.get_global_rank(self.group, src)
                dist.scatter(out[src], chunks if src == self.rank else None, src=global_src, group=self.group)
        else:
            dist.all_to_all(out, chunks, group=self.group)
        return out


def ring_wire_bytes(op: str, payload: int, n: int) -> int:
    """Bytes one of ``n`` workers sends for ``op`` on ``payload`` bytes with the ring algorithms (module doc)."""
    if op == "all_reduce":
        return math.ceil(2 * (n - 1) * payload / n)
    if op == "all_gather":
        return (n - 1) * payload
    if op == "all_to_all":
        return math.ceil((n - 1) * payload / n)
    raise CompressorError(f"unknown collective {op!r}")


def messages_by_tag(messages: Sequence[Message]) -> dict[str, torch.Tensor]:
    """``{tag: tensor}`` for recorded messages; tags must be unique."""
    out: dict[str, torch.Tensor] = {}
    for m in messages:
        if m.tensor is None:
            raise CompressorError(f"message {m.tag!r} was not recorded (record=False)")
        if m.tag in out:
            raise CompressorError(f"message tag {m.tag!r} appears twice")
        out[m.tag] = m.tensor
    return out
