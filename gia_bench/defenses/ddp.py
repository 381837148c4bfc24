"""A DDP communication hook built from any :class:`~gia_bench.defenses.base.Compressor`.

Usage, in the manner of PyTorch's ``powerSGD_hook``::

    ddp = DistributedDataParallel(model)
    state, hook = make_hook("lqsgd:rank=2", ddp)
    ddp.register_comm_hook(state, hook)

or by hand: ``state = CompressorHookState(compressor, TorchCommunicator(group), names)``
and ``ddp.register_comm_hook(state, compressor_hook)``.

What the hook does in one step, in order:

1. For every bucket but the last, DDP calls the hook in bucket-index order; it keeps
   the bucket and returns a future that is not yet complete.
2. At the last bucket it has the whole step: ``grads`` are this worker's raw (not
   yet averaged) gradients of every bucket, put in the model's parameter order, and
   ``keys`` their parameter *names*.
3. ``out = compressor.step(grads, comm, keys)``, once per step: the compressor talks
   to the other workers through a :class:`~gia_bench.comm.TorchCommunicator` and
   returns the *mean* over workers, which is what DDP's own all-reduce hook produces.
4. ``out`` is written back into the buckets' gradient views and every bucket's future
   is completed; DDP copies the buffers into ``param.grad``.

Why one ``step`` per optimizer step, in model order, whatever the buckets. The
compressor then sees exactly what it sees in ``gia-bench capture`` or a
single-process simulation: its random draws (QSGD's dithering, a PowerSGD Q draw)
and its per-step logic do not depend on how DDP cut the model into buckets, and DDP
cuts it differently in the first iteration than afterwards (it rebuilds the buckets
in the order gradients became ready). A run resumed from a checkpoint (whose first
iteration uses the initial layout again) therefore continues bit-identically. Fewer,
larger collectives per step are a bonus.

Why the hook is synchronous. PyTorch's ``powerSGD_hook`` issues its P and Q
all-reduces from future callbacks; with several buckets those callbacks run
interleaved in different orders on different ranks, and gloo then pairs the P of
bucket 0 on one rank with the Q of bucket 1 on another (it aborted in 5 of 7 runs
with two buckets). Here every collective is blocking and issued in program order
inside the last bucket's hook call, so every rank issues the same collectives in the
same order, every time. The cost: no communication overlaps the backward pass (it
all happens after the last gradient is ready). On one CPU core per worker (gloo)
there is little to overlap; with nccl the collectives are stream-ordered rather than
host-blocking, so the host still runs ahead.

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
from gia_bench.defenses.base import Compressor
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
        order: ``name -> position`` in the model's parameter order (the order ``step`` sees).
        bucket_order: pass the gradients in DDP's bucket order instead (bucket 0 first,
            each bucket's own order), as PyTorch's hooks see them with one bucket; the
            compressor's random draws then follow DDP's layout, which changes after the
            first iteration, so a resumed run is no longer bit-identical for randomized
            compressors. For comparisons with PyTorch's ``powerSGD_hook``.
    """

    compressor: Compressor
    comm: TorchCommunicator
    names: dict[int, str]
    step: int = 0
    bytes_sent: int = 0
    payload_bytes: int = 0
    keep_messages: bool = False
    capture_grads: dict[str, torch.Tensor] | None = None
    order: dict[str, int] = dataclasses.field(default_factory=dict)
    bucket_order: bool = False
    _pending: list = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.order:
            self.order = {name: i for i, name in enumerate(self.names.values())}

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


def _future(buffer: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    return torch.futures.Future(devices=[buffer.device] if buffer.device.type == "cuda" else None)


def compressor_hook(state: CompressorHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: reduce the whole step through ``state.compressor`` at the last bucket (see module doc)."""
    fut = _future(bucket.buffer())
    state._pending.append((bucket.buffer(), bucket.gradients(), state.keys_for(bucket.parameters()), fut))
    if not bucket.is_last():
        return fut
    pending, state._pending = state._pending, []
    # the whole step in model order: independent of the bucket layout
    items = [(key, grad) for _, grads, keys, _ in pending for key, grad in zip(keys, grads)]
    if not state.bucket_order:
        items.sort(key=lambda kv: state.order[kv[0]])
    keys = [k for k, _ in items]
    grads = [g for _, g in items]
    if state.capture_grads is not None:
        for key, g in items:
            state.capture_grads[key] = g.detach().clone()
    try:
        out = state.compressor.step(list(grads), state.comm, keys)
        if len(out) != len(grads) or any(o.shape != g.shape for o, g in zip(out, grads)):
            raise CompressorError(f"{state.compressor.spec}: step returned shapes that differ from the gradients'")
        # clone first: an output may alias another parameter's view in the same buffer
        out = [o.detach().to(g.dtype).clone() for o, g in zip(out, grads)]
        for g, o in zip(grads, out):
            g.copy_(o)
    except BaseException as exc:
        for _, _, _, f in pending:
            f.set_exception(exc)
        raise
    state.account(state.comm.messages)
    if not state.keep_messages:
        state.comm.reset()
    state.step += 1
    for buffer, _, _, f in pending:
        f.set_result(buffer)
    return fut


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_hook(
    spec_or_compressor: Any,
    model: nn.Module,
    process_group: dist.ProcessGroup | None = None,
    bucket_order: bool = False,
) -> "tuple[CompressorHookState, Any]":
    """``(state, hook)`` for ``ddp.register_comm_hook(state, hook)``.

    ``spec_or_compressor`` is a spec string (``"lqsgd:rank=2"``) or a compressor
    instance; ``model`` is the DDP-wrapped model or the module it wraps (names are
    the inner module's, e.g. ``"net.conv1.weight"``, as records and captures use).
    ``bucket_order``: see :class:`CompressorHookState` (default: model order).
    """
    from gia_bench.defenses.base import Compressor, create

    compressor = create(spec_or_compressor) if isinstance(spec_or_compressor, str) else spec_or_compressor
    if not isinstance(compressor, Compressor):
        raise CompressorError(f"make_hook needs a spec string or a Compressor, got {type(compressor).__name__}")
    names = {id(p): name for name, p in _unwrap(model).named_parameters()}
    state = CompressorHookState(compressor, TorchCommunicator(process_group), names, bucket_order=bucket_order)
    return state, compressor_hook
