"""Gradient-matching objectives: how far a candidate gradient is from the observed one.

Every objective maps a batch of candidates ``(R, N)`` (one row per restart) and
one target ``(N,)`` to ``(R,)`` distances, so restarts are scored in one call.
Attacks flatten a gradient (or each message of a compressor-aware view) into one
row per key and sum the objective over keys, which for the cosine distance is
the global cosine of Inverting Gradients' implementation (its dot products and
norms are accumulated over the whole parameter list).

Select one by name in an attack spec: ``ig:loss=l2``, ``dlg:loss=cosine``.
"""

from __future__ import annotations

import torch

from gia_bench.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective", entry_point_group="gia_bench.objectives", base=lambda: Objective)
register = OBJECTIVES.register


class Objective:
    """Distance between candidate rows ``(R, N)`` and a target ``(N,)`` -> ``(R,)``."""

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register("l2")
class SquaredL2(Objective):
    """DLG's distance (Zhu et al. 2019, eq. 4): sum of squared differences ||g' - g||^2."""

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (candidate - target).pow(2).sum(dim=-1)


@register("l1")
class L1(Objective):
    """Sum of absolute differences ||g' - g||_1 (robust to a few large quantisation errors)."""

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (candidate - target).abs().sum(dim=-1)


@register("cosine")
class Cosine(Objective):
    """Inverting Gradients' distance (Geiping et al. 2020, eq. 4): 1 - <g', g> / (||g'|| ||g||)."""

    def __init__(self, eps: float = 1e-12):
        self.eps = eps

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dot = candidate @ target
        norms = candidate.pow(2).sum(dim=-1).add(self.eps).sqrt() * target.pow(2).sum().add(self.eps).sqrt()
        return 1.0 - dot / norms


class _Masked(Objective):
    """Compare only the coordinates the target observed (non-zero), e.g. a Top-k decode's support."""

    base: Objective

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = target != 0
        return self.base(candidate[..., mask], target[mask])


@register("masked-cosine")
class MaskedCosine(_Masked):
    """Cosine distance over the target's non-zero coordinates only (a naive attacker's guess at a sparse mask)."""

    def __init__(self) -> None:
        self.base = Cosine()


@register("masked-l2")
class MaskedL2(_Masked):
    """Squared L2 distance over the target's non-zero coordinates only."""

    def __init__(self) -> None:
        self.base = SquaredL2()


def total_distance(objective: Objective, candidates: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Sum of ``objective`` over keys: ``candidates[k]`` is ``(R, N_k)``, ``targets[k]`` is ``(N_k,)``."""
    total = objective(candidates[0], targets[0])
    for cand, target in zip(candidates[1:], targets[1:]):
        total = total + objective(cand, target)
    return total
