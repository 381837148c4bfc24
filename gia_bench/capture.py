"""Capture: batch -> gradient -> compressor -> GradientRecord (+ truth file).

The record holds exactly what went on the wire (the messages a
:class:`~gia_bench.comm.LocalCommunicator` logged), the model state the server
has *before* the step, and the compressor's public state; the truth (inputs and
labels) is returned apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.data import DatasetSpec
from gia_bench.defenses.base import Compressor
from gia_bench.errors import CompressorError
from gia_bench.models import ModelSpec
from gia_bench.records import GradientRecord, RecordMeta, Truth

LOSSES = {"cross_entropy": F.cross_entropy}


def compute_gradient(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss: str = "cross_entropy"
) -> list[torch.Tensor]:
    """Gradient of the mean batch loss w.r.t. every parameter, in ``model.parameters()`` order."""
    params = [p for p in model.parameters()]
    value = LOSSES[loss](model(inputs), labels)
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
    grads: Sequence[torch.Tensor] | None = None,
    extra: dict | None = None,
) -> tuple[GradientRecord, Truth]:
    """One worker's step on (``inputs``, ``labels``) as a record and its truth.

    ``grads`` may be given when the caller already computed them (the trainer);
    otherwise they are computed here with the cross-entropy loss.
    """
    # The server knows the model as it was before this step's forward (BN statistics included).
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    names = tuple(n for n, _ in model.named_parameters())
    if grads is None:
        grads = compute_gradient(model, inputs, labels)
    comm = LocalCommunicator(record=True)
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
    )
    public = {k: v.detach().cpu().clone() for k, v in compressor.public_state().items()}
    record = GradientRecord(meta, messages_by_tag(comm.messages), weights, public)
    truth = Truth(inputs.detach().cpu().clone(), labels.detach().cpu().clone().to(torch.int64), record_id)
    return record, truth
