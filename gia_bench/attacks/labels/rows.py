"""Labels from the signs of the last layer's weight-gradient rows: iDLG (one image) and Yin et al. (distinct labels)."""

from __future__ import annotations

import torch

from gia_bench.attacks.base import AttackError
from gia_bench.attacks.labels.base import LabelContext, LabelStrategy, register


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
