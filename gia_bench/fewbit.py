"""Few-Bit Backward: pointwise nonlinearities that keep a b-bit code per element for the backward pass.

Novikov, Bershatsky, Gusak, Shonenkov, Dimitrov, Oseledets, "Few-Bit Backward:
Quantized Gradients of Activation Functions for Memory Footprint Reduction"
(ICML 2023). A pointwise activation ``y = f(x)`` normally saves its input ``x``
(32 bits an element) so that the backward pass can compute ``f'(x) * grad_y``.
Few-bit backward saves only the index ``k`` of the interval ``[t_{k-1}, t_k)`` that
holds ``x`` (``b`` bits an element, 2**b intervals) and uses the piecewise-constant
derivative ``f'(x) ~= v_k``. The forward pass is exact; only the gradient changes,
and so does what a worker sends and what it leaks.

The boundaries ``t`` and values ``v`` are optimal for the weighted squared error
of the derivative, ``E[(f'(x) - q(x))^2]`` with ``x ~ N(0, 1)`` (pre-activations
after normalisation, as in the paper's setting), found exactly on a fine grid by
dynamic programming (:func:`optimal_piecewise_constant`): the optimal value of an
interval is the weighted mean of ``f'`` over it, and the DP picks the cut points
that minimise the total within-interval weighted variance. The result is computed
once per (function, bits) and cached.

The saved code is one ``uint8`` an element (``b <= 8``); :func:`saved_bytes_per_element`
states what is stored. ReLU at 1 bit is exact (its derivative is a step at 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
from torch import nn

from gia_bench.errors import SpecError

#: The activations that have few-bit versions, by name, with their exact derivative.
FUNCTIONS = ("sigmoid", "tanh", "gelu", "silu", "relu")
MAX_BITS = 8
_GRID_POINTS = 1024
_GRID_RANGE = 8.0


def _derivative(name: str, x: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-x))
        return s * (1.0 - s)
    if name == "tanh":
        return 1.0 - np.tanh(x) ** 2
    if name == "gelu":  # exact (erf) GELU: Phi(x) + x phi(x)
        from scipy.special import ndtr

        return ndtr(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    if name == "relu":
        return (x > 0).astype(np.float64)
    raise SpecError(f"few-bit backward: no activation {name!r} (one of {', '.join(FUNCTIONS)})")


def optimal_piecewise_constant(
    values: np.ndarray, weights: np.ndarray, pieces: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Optimal segmentation of a sampled function into ``pieces`` constant pieces (weighted L2).

    ``values[i]`` is the function at grid point ``i`` and ``weights[i] >= 0`` its weight.
    Minimises ``sum_k sum_{i in piece k} w_i (values_i - v_k)^2`` over contiguous
    pieces; each piece's optimal ``v_k`` is its weighted mean, so the cost of a piece
    is its weighted variance, computed in O(1) from prefix sums. Dynamic programming
    over (pieces used, last grid point): ``D[k, i] = min_j D[k-1, j] + cost(j, i)``,
    O(pieces * n^2), vectorised over ``(j, i)``. Returns (``starts`` index of each piece's
    first grid point, piece values, the total cost).
    """
    n = len(values)
    pieces = max(1, min(pieces, n))
    w = np.asarray(weights, dtype=np.float64)
    f = np.asarray(values, dtype=np.float64)
    W = np.concatenate([[0.0], np.cumsum(w)])
    S = np.concatenate([[0.0], np.cumsum(w * f)])
    Q = np.concatenate([[0.0], np.cumsum(w * f * f)])

    # cost[j, i]: points j .. i-1 as one piece (its weighted variance); inf unless j < i
    ww = W[None, :] - W[:, None]
    ss = S[None, :] - S[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (Q[None, :] - Q[:, None]) - np.where(ww > 0, ss * ss / ww, 0.0)
    cost = np.maximum(cost, 0.0)
    cost[np.tril_indices(n + 1)] = np.inf
    D = np.full((pieces + 1, n + 1), np.inf)
    arg = np.zeros((pieces + 1, n + 1), dtype=np.int64)
    D[0, 0] = 0.0
    for k in range(1, pieces + 1):
        total = D[k - 1][:, None] + cost  # total[j, i]
        arg[k] = np.argmin(total, axis=0)
        D[k] = total[arg[k], np.arange(n + 1)]
    starts = np.zeros(pieces, dtype=np.int64)
    i = n
    for k in range(pieces, 0, -1):
        starts[k - 1] = arg[k, i]
        i = starts[k - 1]
    ends = np.append(starts[1:], n)
    piece_values = np.array(
        [(S[e] - S[s]) / (W[e] - W[s]) if W[e] > W[s] else float(np.mean(f[s:e])) for s, e in zip(starts, ends)]
    )
    return starts, piece_values, float(D[pieces, n])


@dataclasses.dataclass(frozen=True)
class FewBitTable:
    """The piecewise-constant derivative of one activation at one bit width."""

    function: str
    bits: int
    boundaries: torch.Tensor  # (2**bits - 1,) interior cut points, increasing
    values: torch.Tensor  # (2**bits,) the derivative on each interval
    error: float  # E[(f'(x) - q(x))^2], x ~ N(0, 1), on the grid


def _grid() -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(-_GRID_RANGE, _GRID_RANGE, _GRID_POINTS)
    w = np.exp(-0.5 * x * x)
    return x, w / w.sum()


@functools.cache
def table(function: str, bits: int) -> FewBitTable:
    """The optimal b-bit piecewise-constant derivative of ``function`` (computed once, cached)."""
    if function not in FUNCTIONS:
        raise SpecError(f"few-bit backward: no activation {function!r} (one of {', '.join(FUNCTIONS)})")
    if not 1 <= bits <= MAX_BITS:
        raise SpecError(f"--fewbit-backward must be in 1..{MAX_BITS} bits, got {bits}")
    x, w = _grid()
    d = _derivative(function, x)
    if function == "relu":
        # the derivative is a step at 0: one cut there is exact, at any bit width
        starts, vals, err = np.array([0, int(np.searchsorted(x, 0.0, side="right"))]), np.array([0.0, 1.0]), 0.0
    else:
        starts, vals, err = optimal_piecewise_constant(d, w, 2**bits)
    # cut points halfway between the grid points either side of each piece start
    cuts = (x[starts[1:] - 1] + x[starts[1:]]) / 2.0
    pieces = 2**bits
    if len(vals) < pieces:  # fewer distinct pieces than codes (ReLU): repeat the last piece
        cuts = np.concatenate([cuts, np.full(pieces - len(vals), np.inf)])
        vals = np.concatenate([vals, np.full(pieces - len(vals), vals[-1])])
    # On the CPU whatever device context the first caller is under: the table is cached, and a
    # record check builds its model under ``torch.device("meta")``; tensors made there would
    # have no data, and every later model (the attacker's) would copy them from the cache.
    cpu = torch.device("cpu")
    return FewBitTable(
        function,
        bits,
        torch.tensor(cuts, dtype=torch.float32, device=cpu),
        torch.tensor(vals, dtype=torch.float32, device=cpu),
        err,
    )


def saved_bytes_per_element(bits: int | None) -> int:
    """Bytes the backward pass keeps per activation element: the input (fp32), or a uint8 code."""
    return 4 if not bits else 1


class _FewBitFunction(torch.autograd.Function):
    """``y = f(x)`` exactly; saves ``code(x)`` (uint8); backward ``grad_x = v[code] * grad_y``.

    The backward is made of differentiable ops of ``grad_y`` (the codes are
    constants), so a gradient-matching attacker can differentiate through it
    (``create_graph=True``): the few-bit worker's gradient as a function of its input.
    """

    @staticmethod
    def forward(ctx, x, forward_fn, boundaries, values):  # noqa: ANN001
        codes = torch.bucketize(x.detach(), boundaries.to(x.device), right=True).to(torch.uint8)
        ctx.save_for_backward(codes, values.to(x.device, x.dtype))
        return forward_fn(x)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001
        codes, values = ctx.saved_tensors
        return grad_y * values[codes.long()], None, None, None


_FORWARD = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "relu": torch.relu,
}


class FewBitActivation(nn.Module):
    """Drop-in replacement for ``nn.Sigmoid`` / ``Tanh`` / ``GELU`` / ``SiLU`` / ``ReLU`` with few-bit backward."""

    def __init__(self, function: str, bits: int) -> None:
        super().__init__()
        t = table(function, bits)
        self.function, self.bits = function, bits
        self.register_buffer("boundaries", t.boundaries.clone(), persistent=False)
        self.register_buffer("values", t.values.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FewBitFunction.apply(x, _FORWARD[self.function], self.boundaries, self.values)

    def extra_repr(self) -> str:
        return f"{self.function}, bits={self.bits}"


_REPLACE: dict[type[nn.Module], str] = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.ReLU: "relu",
}


def listing() -> list[tuple[str, str, str]]:
    """``gia-bench list backward``: (name, parameters with defaults and flags, description)."""
    return [(
        "fewbit",
        f"bits: int = 0 (--fewbit-backward on capture and train; study key fewbit_backward; 0 exact, 1..{MAX_BITS})",
        f"Few-Bit Backward (Novikov et al., ICML 2023): {', '.join(FUNCTIONS)} keep a b-bit code per element"
        " and back-propagate the optimal piecewise-constant derivative",
    )]


def replace_activations(model: nn.Module, bits: int) -> int:
    """Swap every supported activation module of ``model`` for its few-bit version, in place.

    Returns how many modules were replaced. Activations called as functions inside a
    ``forward`` (not modules) are not reached; every model gia-bench registers uses
    modules. A GELU with ``approximate="tanh"`` keeps the exact-erf table (the two
    derivatives differ by < 1e-3).
    """
    count = 0
    for name, child in list(model.named_children()):
        kind = _REPLACE.get(type(child))
        if kind is not None:
            setattr(model, name, FewBitActivation(kind, bits))
            count += 1
        else:
            count += replace_activations(child, bits)
    return count
