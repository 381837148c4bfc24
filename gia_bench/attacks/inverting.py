"""Inverting Gradients (Geiping et al. 2020)."""

from __future__ import annotations

from gia_bench.attacks.base import register
from gia_bench.attacks.matching import GradientMatching


@register("ig")
class InvertingGradients(GradientMatching):
    """Inverting Gradients: cosine gradient distance + total variation, signed Adam, boxed pixels, restarts.

    Geiping et al. 2020, eq. 4: argmin_x 1 - <grad(x, y), grad> / (||grad(x, y)|| ||grad||) + tv TV(x),
    x constrained to the valid pixel range; Adam on the sign of the input gradient, learning
    rate divided by 10 at 3/8, 5/8 and 7/8 of the iterations; of ``restarts`` random starts the
    one with the lowest gradient distance is kept. Labels are inferred (``labels=auto``).

    Args:
        iterations: Adam steps.
        lr: Adam learning rate.
        loss: gradient distance (objectives registry: cosine, l2, l1, masked-cosine, masked-l2).
        optimizer: adam, sgd or lbfgs.
        labels: auto (idlg for B = 1, bias-corrected otherwise), idlg, bias-corrected, yin or joint.
        prior: image prior (tv, l2, none) weighted by tv.
        tv: weight of the image prior (total variation by default).
        restarts: independent random starts, optimised as one batch; the lowest gradient distance wins.
        signed: step on the sign of the input gradient.
        boxed: clamp pixels to the valid range after every step.
        decay: divide the learning rate by 10 at 3/8, 5/8 and 7/8 of the iterations.
        init: initial dummy: randn (N(0,1) in model-input space) or rand (uniform in the valid range).
        max_iter: L-BFGS evaluations per step (only with optimizer=lbfgs).
        history_size: L-BFGS history (only with optimizer=lbfgs).
        line_search: L-BFGS with a strong-Wolfe line search (only with optimizer=lbfgs).
    """

    def __init__(
        self,
        iterations: int = 1000,
        lr: float = 0.1,
        loss: str = "cosine",
        optimizer: str = "adam",
        labels: str = "auto",
        prior: str = "tv",
        tv: float = 1e-4,
        restarts: int = 1,
        signed: bool = True,
        boxed: bool = True,
        decay: bool = True,
        init: str = "randn",
        max_iter: int = 20,
        history_size: int = 100,
        line_search: bool = False,
    ):
        super().__init__(
            iterations, lr, loss, optimizer, labels, prior, tv, restarts, signed, boxed, decay, init, max_iter, history_size,
            line_search,
        )
