"""Label strategies: the batch's labels from the last layer's gradient, or optimised jointly.

Labels are always inferred from what the server observes, never read from the
truth. Select one with ``labels=`` in an attack spec; ``auto`` (the default) is
``idlg`` for one image and ``bias-corrected`` for a batch.

* ``idlg`` (Zhao et al. 2020, sec. 3.1): for B = 1, softmax cross-entropy and
  non-negative features h into the last linear layer, dL/dW_c = (p_c - y_c) h, so
  only the true class's row is non-positive: label = argmin_c sum_j dL/dW_cj.
* ``yin`` (Yin et al. 2021, GradInversion sec. 3.2): the B classes whose weight
  rows have the most negative minimum; assumes B distinct labels.
* ``bias-corrected`` (Geng et al. 2021, "Towards general deep leakage", eq. 8;
  breaching's ``bias-corrected``): with mean-reduced CE, dL/db_c = mean_n p_nc - n_c / B,
  so n_c = B (p̂_c - dL/db_c), with p̂ the model's mean softmax on dummy inputs.
  Without a bias, dL/db_c is estimated as sum_j dL/dW_cj / Ō with Ō the mean
  feature sum on the same dummy inputs. Every class with a negative entry gets at
  least one image; the rest go by largest remaining count. Labels may repeat.
* ``joint`` (Zhu et al. 2019): no inference; the attack optimises soft labels.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from gia_bench.attacks.base import AttackError
from gia_bench.registry import Registry

LABELS: Registry[LabelStrategy] = Registry("label strategy", entry_point_group="gia_bench.label_strategies")
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


@register("idlg")
class IDLG(LabelStrategy):
    """iDLG (Zhao et al. 2020): argmin of the last layer's weight-gradient row sums; one image only."""

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        if ctx.batch_size != 1:
            raise AttackError(f"labels=idlg needs batch size 1, the record has {ctx.batch_size}; use bias-corrected")
        return ctx.weight_grad.sum(dim=-1).argmin().reshape(1).to(torch.int64).cpu()


@register("yin")
class Yin(LabelStrategy):
    """GradInversion (Yin et al. 2021): the B rows with the most negative minimum; distinct labels."""

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        if ctx.batch_size > ctx.num_classes:
            raise AttackError(f"labels=yin assumes distinct labels: batch {ctx.batch_size} > {ctx.num_classes} classes")
        order = ctx.weight_grad.min(dim=-1).values.argsort()
        return order[: ctx.batch_size].sort().values.to(torch.int64).cpu()


@register("bias-corrected")
class BiasCorrected(LabelStrategy):
    """Counts per class from the bias gradient, corrected by the model's mean softmax (Geng et al. 2021).

    Args:
        dummies: number of N(0, 1) dummy inputs used to estimate the mean softmax (and feature sum).
    """

    def __init__(self, dummies: int = 32):
        self.dummies = dummies

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        device = ctx.weight_grad.device
        features: list[torch.Tensor] = []
        hook = ctx.head.module.register_forward_hook(lambda m, args, out: features.append(args[0].detach()))
        try:
            x = torch.randn((self.dummies, *ctx.in_shape), generator=ctx.generator, device=device)
            with torch.no_grad():
                p_hat = torch.softmax(ctx.model(x), dim=-1).mean(dim=0)
        finally:
            hook.remove()
        bias = ctx.bias_grad
        if bias is None:
            mean_feature_sum = features[0].flatten(1).sum(dim=1).mean().clamp_min(1e-12)
            bias = ctx.weight_grad.sum(dim=-1) / mean_feature_sum
        counts = ctx.batch_size * (p_hat - bias)
        # dL/db_c < 0 only if some image has label c (p < 1): each such class gets one image first.
        assigned = torch.zeros(ctx.num_classes, device=device)
        labels: list[int] = []
        for c in torch.argsort(bias).tolist():
            if bias[c] < 0 and len(labels) < ctx.batch_size:
                labels.append(c)
                assigned[c] += 1
        while len(labels) < ctx.batch_size:
            c = int((counts - assigned).argmax())
            labels.append(c)
            assigned[c] += 1
        return torch.tensor(sorted(labels), dtype=torch.int64)


@register("joint")
class Joint(LabelStrategy):
    """DLG (Zhu et al. 2019): soft labels optimised together with the images (argmax reported)."""

    joint = True

    def infer(self, ctx: LabelContext) -> None:
        return None


def resolve(name: str, batch_size: int) -> tuple[str, LabelStrategy]:
    """The label strategy for ``labels=name``; ``auto`` is idlg for B = 1, bias-corrected otherwise."""
    if name == "auto":
        name = "idlg" if batch_size == 1 else "bias-corrected"
    return name, LABELS.create(name)


def infer_labels(
    record, model: nn.Module, strategy: str, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[str, torch.Tensor | None]:
    """Labels of ``record`` (a GradientRecord) from its decoded gradient: (strategy used, labels or None for joint).

    ``model`` must be stateless (see :func:`gia_bench.attacks.matching.attack_model`).
    """
    meta = record.meta
    name, part = resolve(strategy, meta.batch_size)
    grads = [g.to(device, torch.float32) for g in record.decode()]
    head = find_head(model, meta.param_names, meta.dataset.num_classes)
    ctx = LabelContext(grads, head, meta.batch_size, meta.dataset.num_classes, model, meta.dataset.shape, generator)
    labels = part.infer(ctx)
    return name, None if labels is None else labels.to(torch.int64).cpu()
