"""What every label strategy shares: the registry, the head, the context, the counting helpers."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from gia_bench.attacks.base import AttackError
from gia_bench.registry import Registry

LABELS: Registry[LabelStrategy] = Registry(
    "label strategy", entry_point_group="gia_bench.label_strategies", base=lambda: LabelStrategy
)
register = LABELS.register


@dataclasses.dataclass(frozen=True)
class Head:
    """The last linear layer (the classifier) and where its gradients sit in the record's parameter order."""

    module: nn.Linear
    weight_index: int
    bias_index: int | None


def find_head(model: nn.Module, param_names: tuple[str, ...] | list[str], num_classes: int) -> Head:
    """The last ``nn.Linear`` with ``num_classes`` outputs, and the indices of its weight and bias gradients."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = (name, module)
    if found is None:
        raise AttackError(f"model {type(model).__name__} has no final linear layer with {num_classes} outputs")
    name, module = found
    prefix = f"{name}." if name else ""
    names = list(param_names)
    bias_index = names.index(prefix + "bias") if module.bias is not None else None
    return Head(module, names.index(prefix + "weight"), bias_index)


@dataclasses.dataclass(frozen=True)
class LabelContext:
    """What a label strategy may use: the observed gradient and the model, nothing of the truth."""

    grads: list[torch.Tensor]  # observed (decoded) gradient, parameter order
    head: Head
    batch_size: int
    num_classes: int
    model: nn.Module  # stateless: forward passes do not change its buffers
    in_shape: tuple[int, int, int]
    generator: torch.Generator

    @property
    def weight_grad(self) -> torch.Tensor:
        return self.grads[self.head.weight_index]

    @property
    def bias_grad(self) -> torch.Tensor | None:
        return None if self.head.bias_index is None else self.grads[self.head.bias_index]


class LabelStrategy:
    """Infer the (B,) labels of a record, or return None when the attack should optimise them."""

    joint: ClassVar[bool] = False

    def infer(self, ctx: LabelContext) -> torch.Tensor | None:
        raise NotImplementedError



def head_inputs(ctx: LabelContext, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features entering the head, softmax outputs) of the model on inputs ``x``, without gradients."""
    features: list[torch.Tensor] = []
    hook = ctx.head.module.register_forward_hook(lambda m, args, out: features.append(args[0].detach()))
    try:
        with torch.no_grad():
            probs = torch.softmax(ctx.model(x), dim=-1)
    finally:
        hook.remove()
    return features[0].flatten(1), probs


def round_counts(counts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Non-negative integer counts summing to ``batch_size`` nearest to real-valued ``counts``.

    Largest-remainder rounding of the clipped counts (the authors of iLRG round, then move
    the surplus or deficit by the rounding residuals; this is the same idea, optimal in L1).
    """
    c = counts.detach().double().clamp_min(0).cpu()
    base = c.floor()
    missing = batch_size - int(base.sum())
    if missing > 0:
        base[torch.argsort(c - base, descending=True)[:missing]] += 1
    while missing < 0:  # clipped counts summing to more than B: take from the largest remainders' opposites
        i = int(torch.argmin(torch.where(base > 0, c - base, torch.full_like(c, np.inf))))
        base[i] -= 1
        missing += 1
    return base.to(torch.int64)


def counts_to_labels(counts: torch.Tensor) -> torch.Tensor:
    """Sorted labels from per-class counts."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.cpu().to(torch.int64))
