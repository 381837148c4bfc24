"""Optimisers for the dummy inputs, selectable by name (``optimizer=adam``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from gia_bench.registry import Registry

OPTIMIZERS: Registry[OptimizerPart] = Registry("optimizer", entry_point_group="gia_bench.optimizers", base=lambda: OptimizerPart)
register = OPTIMIZERS.register


class OptimizerPart:
    """Builds a ``torch.optim.Optimizer`` over the dummy tensors."""

    #: the update of one coordinate depends only on that coordinate's history, so restarts
    #: stacked in one tensor are optimised exactly as if they ran apart (Adam, SGD; not L-BFGS).
    elementwise: ClassVar[bool] = True
    #: ``step`` takes a closure that re-evaluates the loss (L-BFGS)
    needs_closure: ClassVar[bool] = False

    def build(
        self, params: Sequence[torch.Tensor], lr: float, max_iter: int, history_size: int, line_search: bool
    ) -> torch.optim.Optimizer:
        raise NotImplementedError


@register("adam")
class Adam(OptimizerPart):
    """Adam (Kingma & Ba 2015), as Inverting Gradients uses it."""

    def build(self, params, lr, max_iter, history_size, line_search):
        return torch.optim.Adam(params, lr=lr)


@register("sgd")
class SGD(OptimizerPart):
    """Plain gradient descent with momentum 0.9."""

    def build(self, params, lr, max_iter, history_size, line_search):
        return torch.optim.SGD(params, lr=lr, momentum=0.9)


@register("lbfgs")
class LBFGS(OptimizerPart):
    """L-BFGS as DLG uses it (torch defaults: up to ``max_iter`` iterations per step; strong-Wolfe line search optional)."""

    elementwise = False
    needs_closure = True

    def build(self, params, lr, max_iter, history_size, line_search):
        return torch.optim.LBFGS(
            params, lr=lr, max_iter=max_iter, history_size=history_size,
            line_search_fn="strong_wolfe" if line_search else None,
        )
