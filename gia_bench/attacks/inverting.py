"""Inverting Gradients (Geiping et al. 2020)."""

from __future__ import annotations

from gia_bench.attacks.base import Budget, register
from gia_bench.attacks.matching import GradientMatching, MatchingConfig

_PAPER = {
    "iterations": 4800, "lr": 0.1, "loss": "cosine", "optimizer": "adam", "tv": 1e-4, "prior": "tv",
    "signed": True, "boxed": True, "decay": True, "init": "randn", "restarts": 1,
}  # fmt: skip
_BREACHING = {
    "iterations": 24000, "lr": 0.1, "loss": "cosine", "optimizer": "adam", "tv": 0.2, "prior": "tv",
    "signed": True, "boxed": True, "decay": True, "init": "randn", "restarts": 1,
}  # fmt: skip


@register("ig")
class InvertingGradients(GradientMatching):
    """Inverting Gradients: cosine gradient distance + total variation, signed Adam, boxed pixels, restarts.

    Geiping et al. 2020, eq. 4: argmin_x 1 - <grad(x, y), grad> / (||grad(x, y)|| ||grad||) + tv TV(x),
    x constrained to the valid pixel range; Adam on the sign of the input gradient, learning
    rate divided by 10 at 3/8, 5/8 and 7/8 of the iterations; of ``restarts`` random starts the
    one with the lowest gradient distance is kept. Labels are inferred (``labels=auto``).

    Presets name their budget:

    * ``preset=paper``: the reference code (github.com/JonasGeiping/invertinggradients):
      ``max_iterations=4800``, Adam lr 0.1 with ``lr_decay`` at 3/8, 5/8, 7/8, ``signed``,
      ``boxed``, cosine (``cost_fn=sim``), TV 1e-4 (its ``--tv`` default), ``init=randn``,
      ``restarts=1`` (its ``DEFAULT_CONFIG``; its README's CIFAR-10 command uses
      ``--restarts 32``: ``ig:preset=paper,restarts=32``).
    * ``preset=breaching``: breaching's ``attack=invertinggradients``: 24,000 iterations,
      Adam 0.1 on hard-signed gradients, step-lr decay at the same fractions, boxed,
      cosine, TV scale 0.2 (mean |dx| + mean |dy|, as our ``tv`` prior), 1 trial.

    The default (1,000 iterations, 1 restart) is a fast screening budget, far below both:
    a report says so beside every result (:meth:`budget_warning`).
    """

    defaults = MatchingConfig(
        iterations=1000, lr=0.1, loss="cosine", optimizer="adam", tv=1e-4, signed=True, boxed=True, decay=True
    )
    presets = {"paper": _PAPER, "breaching": _BREACHING}
    published = Budget(4800, 1, None, "paper", source="Geiping et al. 2020, reference code DEFAULT_CONFIG")
