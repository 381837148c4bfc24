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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gia_bench.comm import Message, messages_by_tag
from gia_bench.records import RECORD_SUFFIX, GradientRecord, RecordMeta, Truth, truth_path


def record_name(step: int, rank: int = 0) -> str:
    """The record id (and file stem) of rank ``rank``'s capture at optimizer step ``step``:
    ``step0000050`` for rank 0 (the one a study attacks), ``step0000050-rank1`` for others."""
    return f"step{step:07d}" + (f"-rank{rank}" if rank else "")


def record_path(records_dir: Path, step: int, rank: int = 0) -> Path:
    return Path(records_dir) / f"{record_name(step, rank)}{RECORD_SUFFIX}"


def save_step_record(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    param_names: Sequence[str],
    model_spec: Any,
    dataset_spec: Any,
    defense: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    messages: Sequence[Message],
    public: Mapping[str, torch.Tensor],
    private: Mapping[str, torch.Tensor],
    step: int,
    seed: int,
    extra: Mapping[str, Any],
    rank: int = 0,
) -> GradientRecord:
    """Write the record of one step (and its truth file, first) atomically; returns the record.

    ``messages`` must have been logged with ``record=True`` (they carry their tensors).
    """
    meta = RecordMeta(
        record_id=record_name(step, rank),
        defense=defense,
        model=model_spec,
        dataset=dataset_spec,
        batch_size=int(inputs.shape[0]),
        param_names=tuple(param_names),
        messages=tuple(m.info() for m in messages),
        bytes_sent=sum(m.nbytes for m in messages),
        step=step,
        seed=seed,
        extra=dict(extra),
    )
    record = GradientRecord(
        meta,
        {k: v.detach().cpu().clone() for k, v in messages_by_tag(messages).items()},
        {k: v.detach().cpu().clone() for k, v in weights.items()},
        {k: v.detach().cpu().clone() for k, v in public.items()},
    )
    truth = Truth(
        inputs.detach().cpu().clone(),
        labels.detach().cpu().to(torch.int64).clone(),
        meta.record_id,
        {k: v.detach().cpu().clone() for k, v in private.items()},
    )
    # the truth first: a record on disk always has its truth beside it
    truth.save(truth_path(path))
    record.save(path)
    return record
