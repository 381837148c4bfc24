"""Image priors (regularisers) added to the gradient-matching objective.

Each maps candidates ``(R, B, C, H, W)`` to ``(R,)``; the attack multiplies by
its weight (``tv=`` in the spec) and adds it to the matching distance.
"""

from __future__ import annotations

import torch

from gia_bench.registry import Registry

PRIORS: Registry[Prior] = Registry("prior", entry_point_group="gia_bench.priors", base=lambda: Prior)
register = PRIORS.register


class Prior:
    """A penalty on candidate images ``(R, B, C, H, W)`` -> ``(R,)``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register("tv")
class TotalVariation(Prior):
    """Anisotropic total variation as in Inverting Gradients' code (Geiping et al. 2020, eq. 4's TV(x)):
    mean |x[.., i, j+1] - x[.., i, j]| + mean |x[.., i+1, j] - x[.., i, j]| (means per restart)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(dim=1)
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(dim=1)
        return dx + dy


@register("l2")
class L2Norm(Prior):
    """Mean squared input value (pulls pixels towards the data set mean)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).flatten(1).mean(dim=1)


@register("none")
class NoPrior(Prior):
    """No prior (DLG)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0])
