"""A DDP communication hook built from any :class:`~gia_bench.defenses.base.Compressor`.

Usage, in the manner of PyTorch's ``powerSGD_hook``::

    ddp = DistributedDataParallel(model)
    state, hook = make_hook("lqsgd:rank=2", ddp)
    ddp.register_comm_hook(state, hook)

or by hand: ``state = CompressorHookState(compressor, TorchCommunicator(group), names)``
and ``ddp.register_comm_hook(state, compressor_hook)``.

What the hook does with one bucket, in order:

1. ``grads = bucket.gradients()``: this worker's raw (not yet averaged) gradients,
   one view per parameter; ``keys`` are the parameter *names* of
   ``bucket.parameters()``.
2. ``out = compressor.step(grads, comm, keys)``: the compressor talks to the other
   workers through a :class:`~gia_bench.comm.TorchCommunicator` and returns the
   *mean* over workers, which is what DDP's own all-reduce hook produces.
3. ``out`` is written back into ``bucket.buffer()`` and an already-completed future
   is returned; DDP copies the buffer into ``param.grad``.

Why the hook is synchronous. PyTorch's ``powerSGD_hook`` issues its P and Q
all-reduces from future callbacks; with several buckets those callbacks run
interleaved in different orders on different ranks, and gloo then pairs the P of
bucket 0 on one rank with the Q of bucket 1 on another (it aborted in 5 of 7 runs
with two buckets). Here every collective is blocking and issued in program order
inside the hook call, and DDP calls the hooks of a step in bucket-index order on
every rank, so every rank issues the same collectives in the same order, every
time. The cost: a bucket's communication is not overlapped with the backward of the
layers still to come, nor with the next bucket's compression. On one CPU core per
worker (gloo) there is little to overlap; on GPUs with nccl the collectives are
still stream-ordered rather than host-blocking.

Why keys are names. DDP rebuilds its buckets after the first iteration (in the
order gradients became ready), so a bucket's index and content change. Error
feedback, warm-start Q and any other per-parameter state are keyed by the
parameter's name, so they do not depend on the bucket layout, and a checkpoint
taken with one layout restores into another.
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook checks the hook's
# annotations against dist.GradBucket / torch.futures.Future at run time and rejects strings.
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gia_bench.comm import Message, TorchCommunicator
from gia_bench.errors import CompressorError

__all__ = ["CompressorHookState", "compressor_hook", "make_hook", "clone_state"]


def clone_state(value: Any) -> Any:
    """A deep copy of a state dict made of tensors and plain containers (tensors cloned)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone_state(v) for v in value]
    if isinstance(value, tuple):
        return tuple(clone_state(v) for v in value)
    return value


@dataclasses.dataclass
class CompressorHookState:
    """What :func:`compressor_hook` needs: the compressor, the communicator, parameter names.

    Attributes:
        compressor: any registered compressor; its per-parameter state is keyed by name.
        comm: the communicator its collectives go through.
        names: ``id(parameter) -> name``; the parameters must outlive the hook.
        step: completed optimizer steps (incremented when the last bucket of a step is reduced).
        bytes_sent: wire bytes this worker sent through the hook so far (``Message.nbytes``).
        payload_bytes: the tensors' own bytes so far (``Message.payload_nbytes``).
        keep_messages: keep the communicator's log (e.g. ``comm.record = True`` for a
            capture); otherwise it is cleared after each bucket so memory stays flat.
        capture_grads: when a dict, the hook stores a copy of each raw local gradient
            in it by name before compressing (what this worker computed, not the mean).
    """

    compressor: Any  # Compressor (typed loosely to avoid a circular import at package load)
    comm: TorchCommunicator
    names: dict[int, str]
    step: int = 0
    bytes_sent: int = 0
    payload_bytes: int = 0
    keep_messages: bool = False
    capture_grads: dict[str, torch.Tensor] | None = None

    def keys_for(self, params: Iterable[torch.Tensor]) -> list[str]:
        keys = []
        for p in params:
            name = self.names.get(id(p))
            if name is None:
                raise CompressorError(
                    "DDP hook: a bucket holds a parameter the hook state does not know;"
                    " build the state from the same model that DDP wraps"
                )
            keys.append(name)
        return keys

    def account(self, messages: list[Message]) -> None:
        self.bytes_sent += sum(m.nbytes for m in messages)
        self.payload_bytes += sum(m.payload_nbytes for m in messages)

    # -- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The compressor's state (error feedback, warm-start Q, RNG, ...), the step and byte counters.

        Tensors and plain containers only, so ``torch.load(..., weights_only=True)`` reads it.
        Each worker has its own state (its error feedback is its own): save one per rank.
        """
        return {
            "step": self.step,
            "bytes_sent": self.bytes_sent,
            "payload_bytes": self.payload_bytes,
            "spec": self.compressor.spec,
            "compressor": clone_state(self.compressor.state_dict()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("spec") != self.compressor.spec:
            raise CompressorError(
                f"DDP hook state was saved with defense {state.get('spec')!r}, this run uses {self.compressor.spec!r}"
            )
        self.step = int(state["step"])
        self.bytes_sent = int(state["bytes_sent"])
        self.payload_bytes = int(state["payload_bytes"])
        self.compressor.load_state_dict(clone_state(state["compressor"]))


def compressor_hook(state: CompressorHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Reduce one DDP bucket through ``state.compressor``; returns a completed future (see module doc)."""
    buffer = bucket.buffer()
    grads = bucket.gradients()
    keys = state.keys_for(bucket.parameters())
    if state.capture_grads is not None:
        for key, g in zip(keys, grads):
            state.capture_grads[key] = g.detach().clone()
    out = state.compressor.step(list(grads), state.comm, keys)
    if len(out) != len(grads) or any(o.shape != g.shape for o, g in zip(out, grads)):
        raise CompressorError(f"{state.compressor.spec}: step returned shapes that differ from the gradients'")
    # cat first: ``out`` may alias the bucket's own views
    flat = torch.cat([o.reshape(-1).to(buffer.dtype) for o in out]) if out else buffer
    buffer.copy_(flat)
    state.account(state.comm.messages)
    if not state.keep_messages:
        state.comm.reset()
    if bucket.is_last():
        state.step += 1
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future(
        devices=[buffer.device] if buffer.device.type == "cuda" else None
    )
    fut.set_result(buffer)
    return fut


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_hook(
    spec_or_compressor: Any,
    model: nn.Module,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[CompressorHookState, Any]:
    """``(state, hook)`` for ``ddp.register_comm_hook(state, hook)``.

    ``spec_or_compressor`` is a spec string (``"lqsgd:rank=2"``) or a compressor
    instance; ``model`` is the DDP-wrapped model or the module it wraps (names are
    the inner module's, e.g. ``"net.conv1.weight"``, as records and captures use).
    """
    from gia_bench.defenses.base import Compressor, create

    compressor = create(spec_or_compressor) if isinstance(spec_or_compressor, str) else spec_or_compressor
    if not isinstance(compressor, Compressor):
        raise CompressorError(f"make_hook needs a spec string or a Compressor, got {type(compressor).__name__}")
    names = {id(p): name for name, p in _unwrap(model).named_parameters()}
    state = CompressorHookState(compressor, TorchCommunicator(process_group), names)
    return state, compressor_hook
