"""Counts per class from the bias gradient and the model's mean softmax on dummies (Geng et al. 2021)."""

from __future__ import annotations

import torch

from gia_bench.attacks.labels.base import LabelContext, LabelStrategy, register


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
