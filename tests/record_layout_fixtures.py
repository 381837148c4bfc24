"""Genuine records of every defense family for the layout tests: captures at step 0, captures after
warm steps (error feedback, warm-start Q, LAQ's stale copy), and a training run's multi-worker records.

The multi-worker records are written by the trainer's own writer (:func:`save_step_record`, with the
``extra`` fields the training loop sets) from workers run in lockstep threads whose communicator counts
bytes as ``torch.distributed``'s ring collectives do (:func:`ring_wire_bytes`): every worker sends its
own gradient, so gathered lengths (threshold quantization's kept entries, RC-FED's stream) differ
between workers and are padded as in a real run.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import torch

from gia_bench.capture import capture_batch, compute_gradient
from gia_bench.comm import Communicator, LocalCommunicator, messages_by_tag, ring_wire_bytes
from gia_bench.data import DatasetSpec
from gia_bench.defenses import create
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import GradientRecord
from gia_bench.train.records import RecordedRun, StepCapture, record_path, save_step_record

DS = DatasetSpec("toy", (1, 8, 8), 10, (0.5,), (0.25,))
MS = ModelSpec("mlp:hidden=8", DS.shape, DS.num_classes)

#: Every built-in family with a few settings (``python -m gia_bench list defenses``).
SPECS = (
    "none", "fp16", "noise:sigma=0.1", "topk:ratio=0.1", "topk:ratio=0.3", "qsgd:levels=16", "qsgd:levels=4",
    "signsgd", "powersgd:rank=1", "powersgd:rank=2", "powersgd:rank=1,start_iter=1", "lqsgd:rank=1,bits=8",
    "lqsgd:rank=1,bits=4", "lqsgd:rank=2,bits=8", "laq:bits=8", "laq:bits=4", "rcfed:bits=4,rate=2.0",
    "rcfed:bits=2,rate=1.0", "mixedprec:bits_per_layer=*@8", "mixedprec:bits_per_layer=0-1@4/*@8",
    "tq:bits=4", "tq:bits=8", "tq:threshold=0.9,bits=4", "lqsgd:rank=1,bits=8,collective=alltoall",
)  # fmt: skip


def batch(index: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + index)
    return torch.rand(size, *DS.shape, generator=gen), torch.randint(0, DS.num_classes, (size,), generator=gen)


def model() -> torch.nn.Module:
    return build_model(MS, seed=0)


def capture(defense: str, warm_steps: int = 0) -> GradientRecord:
    """A capture of batch 0 by a compressor that first took ``warm_steps`` steps on other batches."""
    net = model()
    names = [n for n, _ in net.named_parameters()]
    compressor = create(defense)
    for s in range(warm_steps):
        compressor.step(compute_gradient(net, *batch(10 + s)), LocalCommunicator(), keys=names)
    x, y = batch(0)
    record, _ = capture_batch(net, MS, DS, x, y, compressor, f"c{warm_steps}", step=warm_steps)
    return record


def reference_messages(defense: str, warm_steps: int) -> dict[str, torch.Tensor]:
    """What ``defense`` sends for :func:`capture`'s gradient after the same warm steps (the relabel oracle)."""
    net = model()
    names = [n for n, _ in net.named_parameters()]
    compressor = create(defense)
    for s in range(warm_steps):
        compressor.step(compute_gradient(net, *batch(10 + s)), LocalCommunicator(), keys=names)
    comm = LocalCommunicator(record=True)
    compressor.step(compute_gradient(net, *batch(0)), comm, keys=names)
    return messages_by_tag(comm.messages)


class RingLockstep(Communicator):
    """One of ``n`` workers in lockstep threads; bytes as TorchCommunicator counts them (ring collectives)."""

    def __init__(self, rank: int, shared: dict) -> None:
        super().__init__(record=True)
        self.rank, self.world_size, self.shared = rank, shared["n"], shared

    def wire_bytes(self, op: str, payload: int) -> int:
        return ring_wire_bytes(op, payload, self.world_size)

    def _exchange(self, value):
        self.shared["slots"][self.rank] = value
        self.shared["barrier"].wait()
        out = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return out

    def _all_gather(self, tensor):
        return [t.clone() for t in self._exchange(tensor.clone())]

    def _all_reduce(self, tensor):
        return tensor.copy_(sum(self._all_gather(tensor)))

    def _all_to_all(self, chunks):
        return [c[self.rank].clone() for c in self._exchange([c.clone() for c in chunks])]


def train_records(defense: str, out: Path, world_size: int = 2, steps: int = 3) -> dict[tuple[int, int], Path]:
    """Records of every rank at every step of a ``world_size``-worker run: {(step, rank): path}.

    Worker 0 sees the same batch at every step (LAQ has rounds to skip), the others a new one each
    step (they send, and rank 0's skipped round goes as zeros beside theirs); the weights do not move
    (the layout does not care), the compressors keep their state across steps.
    """
    net = model()
    names = [n for n, _ in net.named_parameters()]
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    comps = [create(defense) for _ in range(world_size)]
    paths = {}
    for step in range(steps):
        data = [batch(20 + r + (0 if r == 0 else 10 * step)) for r in range(world_size)]
        grads = [compute_gradient(net, *data[r]) for r in range(world_size)]
        shared = {"n": world_size, "slots": [None] * world_size, "barrier": threading.Barrier(world_size)}
        done: list = [None] * world_size

        def work(rank: int) -> None:
            comm = RingLockstep(rank, shared)
            private = comps[rank].private_state(names, [g.shape for g in grads[rank]])
            comps[rank].step([g.clone() for g in grads[rank]], comm, keys=names)
            done[rank] = (comm.messages, private)

        threads = [threading.Thread(target=work, args=(r,)) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for rank in range(world_size):
            messages, private = done[rank]
            wire = [m.info() for m in messages]
            extra = {"source": "train", "epoch": 1, "rank": rank, "world_size": world_size, "lr": 0.1,
                     "view": f"rank {rank}'s messages", "wire_messages": wire,
                     "wire_bytes": sum(int(m["nbytes"]) for m in wire)}  # fmt: skip
            run = RecordedRun(out, MS, DS, tuple(names), comps[rank].spec, seed=0)
            capture = StepCapture(step, 1, rank, world_size, 0.1, weights, private, *data[rank], messages,
                                  comps[rank].public_state())  # fmt: skip
            save_step_record(run, capture, extra)
            paths[step, rank] = record_path(out, step, rank)
    return paths


def relabel(record: GradientRecord, path: Path, **meta_changes) -> Path:
    """``record`` saved at ``path`` with its metadata changed (an attacker writes whatever JSON it likes)."""
    extra = meta_changes.pop("extra", None)
    meta = dataclasses.replace(record.meta, **meta_changes)
    if extra is not None:
        meta = dataclasses.replace(meta, extra=extra)
    return dataclasses.replace(record, meta=meta).save(path)
