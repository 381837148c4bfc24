"""Records from a training run: rank 0's messages at a chosen optimizer step, as a server saw them.

DESIGN.md, "Records from a training run": mid-training an error-feedback compressor
sends ``C(g_t + e_{t-1})`` and PowerSGD / LQ-SGD start from the previous round's
aggregated Q. A record of step t therefore holds

* the model as it stood before step t's forward (weights and BatchNorm buffers);
* the messages rank 0 put on the wire in step t, exactly as its
  :class:`~gia_bench.comm.TorchCommunicator` logged them (its own P, Q, codes,
  values...; for an all-gather, its own tensor);
* the public state every receiver knows (:meth:`Compressor.public_state` after the
  step: the Q it started from, and with several workers the summed P a decode needs),

and its truth file holds rank 0's batch and its *private* state
(:meth:`Compressor.private_state` before the step: the error-feedback residual), which
only the evaluation side reads, for the oracle view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gia_bench.comm import Message, messages_by_tag
from gia_bench.records import RECORD_SUFFIX, GradientRecord, RecordMeta, Truth, write_pair
from gia_bench.specs import DatasetSpec, ModelSpec


def record_name(step: int, rank: int = 0) -> str:
    """The record id (and file stem) of rank ``rank``'s capture at optimizer step ``step``:
    ``step0000050`` for rank 0 (the one a study attacks), ``step0000050-rank1`` for others."""
    return f"step{step:07d}" + (f"-rank{rank}" if rank else "")


def record_path(records_dir: Path, step: int, rank: int = 0) -> Path:
    return Path(records_dir) / f"{record_name(step, rank)}{RECORD_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class RecordedRun:
    """What every record of one training run shares: where they go, the model, data, defense and seed."""

    records_dir: Path
    model: ModelSpec
    dataset: DatasetSpec
    param_names: tuple[str, ...]  # gradient order: model.named_parameters()
    defense: str  # the compressor's canonical spec
    seed: int


@dataclasses.dataclass(frozen=True)
class StepCapture:
    """What one rank saves of one optimizer step (see the module docstring for why each part).

    ``weights`` and ``private`` are taken before the step's forward, ``messages`` (logged with
    ``record=True``, so they carry their tensors) and ``public`` after its backward.
    """

    step: int
    epoch: int  # 1-based, as metrics.json counts them
    rank: int
    world_size: int
    lr: float
    weights: Mapping[str, torch.Tensor]
    private: Mapping[str, torch.Tensor]
    inputs: torch.Tensor
    labels: torch.Tensor
    messages: Sequence[Message] = ()
    public: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def extra(self) -> dict[str, Any]:
        """The record's ``extra``: a training run's fields (:data:`gia_bench.record_checks.EXTRA_FIELDS`)."""
        wire = [m.info() for m in self.messages]
        return {
            "source": "train",
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "lr": self.lr,
            "view": f"rank {self.rank}'s messages as sent through torch.distributed in this step",
            "wire_messages": wire,
            "wire_bytes": sum(int(m["nbytes"]) for m in wire),
        }


def save_step_record(run: RecordedRun, capture: StepCapture, extra: Mapping[str, Any] | None = None) -> GradientRecord:
    """Write the record of one step and its truth file (:func:`gia_bench.records.write_pair`); returns the record.

    ``extra``: the record's ``extra`` (default :meth:`StepCapture.extra`).
    """
    messages = capture.messages
    meta = RecordMeta(
        record_id=record_name(capture.step, capture.rank),
        defense=run.defense,
        model=run.model,
        dataset=run.dataset,
        batch_size=int(capture.inputs.shape[0]),
        param_names=tuple(run.param_names),
        messages=tuple(m.info() for m in messages),
        bytes_sent=sum(m.nbytes for m in messages),
        step=capture.step,
        seed=run.seed,
        extra=dict(capture.extra() if extra is None else extra),
    )
    record = GradientRecord(
        meta,
        {k: v.detach().cpu().clone() for k, v in messages_by_tag(messages).items()},
        {k: v.detach().cpu().clone() for k, v in capture.weights.items()},
        {k: v.detach().cpu().clone() for k, v in capture.public.items()},
    )
    truth = Truth(
        capture.inputs.detach().cpu().clone(),
        capture.labels.detach().cpu().to(torch.int64).clone(),
        meta.record_id,
        {k: v.detach().cpu().clone() for k, v in capture.private.items()},
    )
    write_pair(record_path(run.records_dir, capture.step, capture.rank), record, truth)
    return record
