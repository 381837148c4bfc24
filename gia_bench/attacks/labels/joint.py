"""No inference: the attack optimises soft labels with the images (DLG)."""

from __future__ import annotations

from gia_bench.attacks.labels.base import LabelContext, LabelStrategy, register


@register("joint")
class Joint(LabelStrategy):
    """DLG (Zhu et al. 2019): soft labels optimised together with the images (argmax reported)."""

    joint = True

    def infer(self, ctx: LabelContext) -> None:
        return None
