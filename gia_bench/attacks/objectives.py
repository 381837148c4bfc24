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

:meth:`Objective.bind_segments` is the same distance over an observation kept in
pieces (one per parameter for the naive view, one per message for an aware one):
the built-in distances accumulate their sums, dot products and squared norms piece
by piece, so the attack never concatenates the candidate's 11.2M-entry ResNet-18
gradient into one row, nor keeps that copy and its gradient alive for the double
backward (issue 17: peak memory 1.56x a hand loop with the concatenation). The
value is the same distance as :meth:`bind` on the concatenation (a test checks).

Register a new distance with ``@register("name")`` on an :class:`Objective`
subclass implementing ``__call__`` (and ``bind`` if it can cache target
statistics); select it in an attack spec: ``ig:loss=l2``, ``dlg:loss=cosine``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gia_bench.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective", entry_point_group="gia_bench.objectives", base=lambda: Objective)
register = OBJECTIVES.register

#: a distance bound to its constant target: candidate rows ``(R, N)`` -> ``(R,)``
BoundObjective = Callable[[torch.Tensor], torch.Tensor]
#: the same over an observation in pieces: ``[(R, N_k)]`` -> ``(R,)``
BoundSegments = Callable[[Sequence[torch.Tensor]], torch.Tensor]


class Objective:
    """Distance between candidate rows ``(R, N)`` and a target ``(N,)`` -> ``(R,)``."""

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, target: torch.Tensor) -> BoundObjective:
        """The distance to the fixed ``target`` as a function of the candidate alone."""
        return lambda candidate: self(candidate, target)

    def bind_segments(self, targets: Sequence[torch.Tensor]) -> BoundSegments:
        """The distance to the fixed observation ``targets`` (pieces ``(N_k,)``) as a function of the
        candidate's pieces ``[(R, N_k)]``: the distance over the concatenation. This default
        concatenates (any third-party objective stays correct); the built-in ones do not."""
        if len(targets) == 1:
            bound = self.bind(targets[0])
            return lambda parts: bound(parts[0])
        bound = self.bind(torch.cat(list(targets)))
        return lambda parts: bound(torch.cat(list(parts), dim=-1))


class _Additive(Objective):
    """A distance that is a sum over coordinates: over pieces, the sum of the pieces' distances."""

    def bind_segments(self, targets: Sequence[torch.Tensor]) -> BoundSegments:
        bound = [self.bind(t) for t in targets]
        return lambda parts: _sum(b(c) for b, c in zip(bound, parts, strict=True))


def _sum(values) -> torch.Tensor:
    it = iter(values)
    total = next(it)
    for v in it:
        total = total + v
    return total


@register("l2")
class SquaredL2(_Additive):
    """DLG's distance (Zhu et al. 2019, eq. 4): sum of squared differences ||g' - g||^2."""

    def __call__(self, candidate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (candidate - target).pow(2).sum(dim=-1)


@register("l1")
class L1(_Additive):
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

    def bind_segments(self, targets: Sequence[torch.Tensor]) -> BoundSegments:
        # the global cosine: dot products and squared norms summed over the pieces
        target_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in targets]))
        target_norm = target_norm.clamp_min(self.eps)

        def distance(parts: Sequence[torch.Tensor]) -> torch.Tensor:
            dot = _sum(c @ t for c, t in zip(parts, targets, strict=True))
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c, dim=-1) for c in parts]), dim=0)
            return 1.0 - dot / (norm.clamp_min(self.eps) * target_norm)

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

    def bind_segments(self, targets: Sequence[torch.Tensor]) -> BoundSegments:
        supports = [(t != 0).nonzero().squeeze(1) for t in targets]
        inner = self.base.bind_segments([t[s] for t, s in zip(targets, supports)])
        return lambda parts: inner([c.index_select(-1, s) for c, s in zip(parts, supports, strict=True)])


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
