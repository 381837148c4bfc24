"""Deep Leakage from Gradients (Zhu et al. 2019) with iDLG labels (Zhao et al. 2020)."""

from __future__ import annotations

from gia_bench.attacks.base import register
from gia_bench.attacks.matching import GradientMatching


@register("dlg")
class DLG(GradientMatching):
    """DLG: L-BFGS on dummy images, squared-L2 gradient distance; iDLG label when B = 1.

    Zhu et al. 2019, Algorithm 1 / eq. 4: x' <- x' - lr * d||grad(x', y') - grad||^2 / dx'.
    With ``labels=auto`` the label is inferred (iDLG for one image, bias-corrected for a
    batch) and only the images are optimised; ``labels=joint`` is the original DLG
    that optimises soft labels too.

    Args:
        iterations: optimiser steps (L-BFGS steps of up to max_iter evaluations each).
        lr: learning rate (L-BFGS step scale).
        loss: gradient distance (objectives registry: l2, cosine, l1, masked-l2, masked-cosine).
        optimizer: lbfgs, adam or sgd.
        labels: auto, idlg, bias-corrected, yin or joint.
        prior: image prior (tv, l2, none) weighted by tv.
        tv: weight of the image prior (0: none, as in DLG).
        restarts: independent random starts; the one with the lowest gradient distance is kept.
        signed: step on the sign of the input gradient (Inverting Gradients' trick).
        boxed: clamp pixels to the valid range after every step.
        decay: divide the learning rate by 10 at 3/8, 5/8 and 7/8 of the iterations.
        init: initial dummy: randn (N(0,1) in model-input space) or rand (uniform in the valid range).
        max_iter: L-BFGS evaluations per step (torch's default 20, as DLG's code).
        history_size: L-BFGS history (torch's default 100).
        line_search: L-BFGS with a strong-Wolfe line search (robust to the divergent first steps plain DLG can take).
    """

    def __init__(
        self,
        iterations: int = 300,
        lr: float = 1.0,
        loss: str = "l2",
        optimizer: str = "lbfgs",
        labels: str = "auto",
        prior: str = "tv",
        tv: float = 0.0,
        restarts: int = 1,
        signed: bool = False,
        boxed: bool = False,
        decay: bool = False,
        init: str = "randn",
        max_iter: int = 20,
        history_size: int = 100,
        line_search: bool = False,
    ):
        super().__init__(
            iterations, lr, loss, optimizer, labels, prior, tv, restarts, signed, boxed, decay, init, max_iter, history_size,
            line_search,
        )
