"""Restarts of a gradient-matching attack optimised as a group, robust to a diverging or stalling optimiser.

:class:`~gia_bench.attacks.matching.GradientMatching` runs one :class:`RestartGroup` per group
of restarts that one optimiser can step together (all of them for Adam and SGD, one for
L-BFGS). The group keeps each restart's best iterate by the objective it minimises
(:class:`BestIterate`) and goes back to it with a smaller step when the path turns non-finite
or an L-BFGS run stalls somewhere worse, or goes on from a new random start when it stalled at
its best (the module docstring of :mod:`~gia_bench.attacks.matching`, "Robustness").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from gia_bench.attacks.optimizers import OptimizerPart
from gia_bench.attacks.priors import Prior

if TYPE_CHECKING:
    from gia_bench.attacks.matching import MatchingConfig, _Problem, _ProgressTracker


@dataclasses.dataclass
class BestIterate:
    """The best iterate so far of each restart in a group, by the objective it minimises."""

    objective: torch.Tensor  # (G,), inf until a finite evaluation
    x: torch.Tensor
    y: torch.Tensor | None

    def keep(self, objective: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Take the restarts whose ``objective`` is lower (NaN compares False: a non-finite point is never kept)."""
        better = objective < self.objective
        self.objective = torch.where(better, objective, self.objective)
        self.x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x, self.x)
        if y is not None:
            self.y = torch.where(better.view(-1, 1, 1), y, self.y)


class RestartGroup:
    """Restarts optimised together (all of them for an element-wise optimiser, else one), keeping
    the best iterate of each; the optimiser is rebuilt from a best iterate or a fresh start when
    its path diverges or stalls."""

    def __init__(
        self,
        cfg: MatchingConfig,
        part: OptimizerPart,
        prior: Prior,
        prob: _Problem,
        x0: torch.Tensor,
        y0: torch.Tensor | None,
    ):
        self.cfg, self.part, self.prior, self.prob = cfg, part, prior, prob
        x = x0.detach().clone()
        if cfg.boxed:  # every evaluated iterate is a candidate, the first one included
            x = torch.maximum(torch.minimum(x, prob.hi), prob.lo)
        self.x = x.requires_grad_(True)
        self.y = None if y0 is None else y0.detach().clone().requires_grad_(True)
        self.tensors = [self.x] if self.y is None else [self.x, self.y]
        inf = torch.full((x.shape[0],), math.inf, device=x.device)
        self.best = BestIterate(inf, self.x.detach().clone(), None if self.y is None else self.y.detach().clone())
        self.scale = 1.0  # product of the backoffs so far
        self.backoffs = self.fresh_starts = 0
        self._rebuild()

    def _rebuild(self) -> None:
        """A fresh optimiser (L-BFGS's curvature pairs and Adam's moments belong to the old path)."""
        cfg = self.cfg
        self.opt = self.part.build(self.tensors, cfg.lr * self.scale, cfg.max_iter, cfg.history_size, cfg.line_search)
        self.last_start = math.nan

    def objective(self) -> torch.Tensor:
        """The minimised objective per restart: the matching loss plus the weighted prior."""
        objective = self.prob.distance(self.x, self.y)
        if self.cfg.tv > 0:
            objective = objective + self.cfg.tv * self.prior(self.x)
        return objective

    def closure(self) -> torch.Tensor:
        objective = self.objective()
        with torch.no_grad():
            self.best.keep(objective.detach(), self.x.detach(), None if self.y is None else self.y.detach())
        loss = objective.sum()
        gs = torch.autograd.grad(loss, self.tensors)
        for t, g in zip(self.tensors, gs):
            t.grad = g.sign() if self.cfg.signed else g
        return loss.detach()

    def back_off(self) -> None:
        """Resume every restart of the group from its best iterate with a smaller step."""
        with torch.no_grad():
            self.x.copy_(self.best.x)
            if self.y is not None:
                self.y.copy_(self.best.y)
        self.scale *= self.cfg.backoff
        self._rebuild()

    def fresh_start(self, fresh: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Go on from new random starts at the full step size; the best iterate stays a candidate."""
        with torch.no_grad():
            nx, ny = fresh(self.x.shape[0])
            self.x.copy_(nx)
            if self.y is not None and ny is not None:
                self.y.copy_(ny)
        self.scale = 1.0
        self._rebuild()

    def finite(self) -> bool:
        finite = torch.isfinite(self.x).flatten(1).all(dim=1)
        if self.y is not None:
            finite &= torch.isfinite(self.y).flatten(1).all(dim=1)
        return bool(finite.all())

    def run(
        self,
        iterations: int,
        milestones: list[int],
        tracker: _ProgressTracker,
        fresh: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]] | None,
    ) -> int:
        """Up to ``iterations`` steps, the step size / 10 at each of ``milestones``; the steps taken."""
        cfg = self.cfg
        it = 0
        while it < iterations:
            lr = cfg.lr * self.scale * 0.1 ** sum(it >= m for m in milestones)
            for pg in self.opt.param_groups:
                pg["lr"] = lr
            if self.part.needs_closure:
                start = float(self.opt.step(self.closure))
                # L-BFGS returns the loss it started from; the same start twice means the
                # step left x unchanged (converged: max |grad| <= tolerance), as will every later one.
                if start == self.last_start:
                    if fresh is None:
                        tracker.advance(iterations - it, self.best.objective)
                        break
                    # Stalled before the budget is spent: sigmoid networks have flat regions
                    # a long L-BFGS step can land in. Use the rest of the budget.
                    if start > float(self.best.objective.sum()):  # wandered off: back off to the best
                        self.back_off()
                        self.backoffs += 1
                    else:  # stalled at its best: a new random start
                        self.fresh_start(fresh)
                        self.fresh_starts += 1
                    it += 1
                    tracker.advance(1, self.best.objective)
                    continue
                self.last_start = start
            else:
                self.closure()
                self.opt.step()
            if cfg.boxed:
                with torch.no_grad():
                    self.x.copy_(torch.maximum(torch.minimum(self.x, self.prob.hi), self.prob.lo))
            it += 1
            tracker.advance(1, self.best.objective)
            if not self.finite():  # diverged: back to the best iterates with a smaller step
                self.back_off()
                self.backoffs += 1
        # the iterate after the last step has not been evaluated yet: it may be the best
        if all(bool(torch.isfinite(t).all()) for t in self.tensors):
            with torch.enable_grad():
                last = self.objective().detach()
            self.best.keep(last, self.x.detach(), None if self.y is None else self.y.detach())
        return it
