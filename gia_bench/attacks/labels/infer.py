"""The one way in: resolve ``labels=`` to a strategy and run it on a record's observed gradient."""

from __future__ import annotations

import torch
from torch import nn

from gia_bench.attacks.labels.base import LABELS, LabelContext, LabelStrategy, find_head
from gia_bench.receiver import decode_record


def resolve(name: str, batch_size: int, num_classes: int = 10, bias: bool = True) -> tuple[str, LabelStrategy]:
    """The label strategy for ``labels=name``.

    ``auto`` is ``idlg`` for one image; for a batch ``mean-embedding-eb`` where the head has a
    bias and there are more than 2 classes (label-count accuracy 0.99-1.00 against
    ``bias-corrected``'s 0.90-1.00 on untrained ConvNets and ResNet-18, README), otherwise
    ``bias-corrected`` (no bias gradient to count from; with 2 classes the regression has one
    equation and ``bias-corrected`` counts better).
    """
    if name == "auto":
        if batch_size == 1:
            name = "idlg"
        else:
            name = "mean-embedding-eb" if bias and num_classes > 2 else "bias-corrected"
    return name, LABELS.create(name)


def infer_labels(
    record,
    model: nn.Module,
    strategy: str,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    grads: list[torch.Tensor] | None = None,
) -> tuple[str, torch.Tensor | None]:
    """Labels of ``record`` (a GradientRecord): (strategy used, labels or None for joint).

    ``grads``: the threat view's estimate of the worker's gradient (``ThreatView.gradient``);
    by default the decoded gradient. ``model`` must be stateless (see
    :func:`gia_bench.attacks.matching.attack_model`).
    """
    meta = record.meta
    head = find_head(model, meta.param_names, meta.dataset.num_classes)
    name, part = resolve(strategy, meta.batch_size, meta.dataset.num_classes, head.bias_index is not None)
    # a FedAvg update is the sum of K local gradients: the strategies expect one gradient
    source = decode_record(record) if grads is None or len(grads) == 0 else grads
    grads = [g.to(device, torch.float32) / meta.local_steps for g in source]
    ctx = LabelContext(grads, head, meta.batch_size, meta.dataset.num_classes, model, meta.dataset.shape, generator)
    labels = part.infer(ctx)
    return name, None if labels is None else labels.to(torch.int64).cpu()
