"""Objectives: how far a candidate observation is from the observed one.

An objective maps a batch of candidate rows ``(R, N)`` (one per restart) and one
target ``(N,)`` to ``(R,)`` distances, so restarts are scored in one call. The
attack flattens the whole observation of a view into ONE row (the decoded gradient
for ``naive``; every message of a compressor-aware view, concatenated in key order),
so a distance is always one distance over the whole observation: for the cosine it
is the global cosine of Inverting Gradients' implementation (dot products and norms
accumulated over every parameter / message), never a per-message sum that would
weight a 10-value message like a 10^6-value one.

The target is constant during an attack: :meth:`Objective.bind` returns a function
of the candidate alone with everything that depends only on the target computed
once (the target's norm for the cosine, the support for the masked distances).

Register a new distance with ``@register("name")`` on an :class:`Objective`
subclass implementing ``__call__`` (and ``bind`` if it can cache target
statistics); select it in an attack spec: ``ig:loss=l2``, ``dlg:loss=cosine``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gia_bench.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective", entry_point_group="gia_bench.objectives", base=lambda: Objective)
register = OBJECTIVES.register

#: a distance bound to its constant target: candidate rows ``(R, N)`` -> ``(R,)``
BoundObjective = Callable[[torch.Tensor], torch.Tensor]


class Objective:
    """Distance between candidate rows ``(R, N)`` and a target ``(N,)`` -> ``(R,)``."""

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, target: torch.Tensor) -> BoundObjective:
        """The distance to the fixed ``target`` as a function of the candidate alone."""
        return lambda candidate: self(candidate, target)


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
    """Inverting Gradients' distance (Geiping et al. 2020, eq. 4): 1 - <g', g> / (||g'|| ||g||).

    Norms are ``torch.linalg.vector_norm`` (one fused reduction; its backward is one
    scaled copy) and the target's norm is computed once in :meth:`bind`: on ResNet-18's
    11.2M-entry gradient, ``pow(2).sum().sqrt()`` on both sides every iteration cost
    ~90 ms of a ~400 ms iteration (issue 17).
    """

    def __init__(self, eps: float = 1e-12):
        self.eps = eps

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bind(target)(candidate)

    def bind(self, target: torch.Tensor) -> BoundObjective:
        target_norm = torch.linalg.vector_norm(target).clamp_min(self.eps)

        def distance(candidate: torch.Tensor) -> torch.Tensor:
            norms = torch.linalg.vector_norm(candidate, dim=-1).clamp_min(self.eps) * target_norm
            return 1.0 - (candidate @ target) / norms

        return distance


class _Masked(Objective):
    """Compare only the coordinates the target observed (non-zero), e.g. a Top-k decode's support."""

    base: Objective

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bind(target)(candidate)

    def bind(self, target: torch.Tensor) -> BoundObjective:
        support = (target != 0).nonzero().squeeze(1)
        inner = self.base.bind(target[support])
        return lambda candidate: inner(candidate.index_select(-1, support))


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
    """``objective`` over the whole observation: ``candidates[k]`` ``(R, N_k)`` and ``targets[k]`` ``(N_k,)``
    concatenated over keys first (for ``l2`` and ``l1`` the same as the sum over keys; for the cosine
    the global cosine, not a per-key sum)."""
    if len(candidates) == 1:
        return objective(candidates[0], targets[0])
    return objective(torch.cat(candidates, dim=1), torch.cat(targets))
