"""The pieces of rank-r gradient compression that PowerSGD and LQ-SGD share.

* :class:`LowRankSettings` (and :class:`LQSGDSettings`): the compressors' parameters,
  validated once (Vogels et al. 2019, PyTorch's ``PowerSGDState`` names);
* :func:`make_plan`: which gradients are sent as factors, and where each factor lives in
  the flat P and Q messages (PyTorch's ``_should_compress`` and ``p_memory`` layout);
* :class:`GroupResidual`: the error-feedback residual, stored once per shape group;
* :func:`orthogonalize`: PyTorch's ``_orthogonalize``, with rank-deficient columns made zero.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from gia_bench.defenses.base import unflatten
from gia_bench.errors import SpecError

# -- the settings ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LowRankSettings:
    """PowerSGD's parameters, checked once here (``name`` only labels the error messages).

    Args:
        rank: matrix_approximation_rank r of the factors (capped at min(n, m) per tensor).
        warm_start: reuse last step's Q (True) or draw a fresh one every step.
        error_feedback: add last step's compression residual to the gradient.
        min_compression_rate: compress a matrix only if it shrinks by more than this factor.
        start_iter: steps of plain fp32 all-reduce before compression starts.
        epsilon: added to column norms in Gram-Schmidt (PyTorch's orthogonalization_epsilon).
        seed: seeds the Q draws (numpy RandomState, as PyTorch's random_seed); same on all workers.
    """

    rank: int = 2
    warm_start: bool = True
    error_feedback: bool = True
    min_compression_rate: float = 2.0
    start_iter: int = 0
    epsilon: float = 0.0
    seed: int = 0
    name: str = dataclasses.field(default="powersgd", compare=False)

    def __post_init__(self) -> None:
        # a spec's values arrive typed by the registry; plain Python callers may pass 2.0 or 1
        for f, kind in (("rank", int), ("warm_start", bool), ("error_feedback", bool),
                        ("min_compression_rate", float), ("start_iter", int), ("epsilon", float), ("seed", int)):
            object.__setattr__(self, f, kind(getattr(self, f)))
        if self.rank < 1:
            raise SpecError(f"{self.name} rank must be >= 1, got {self.rank}")
        if self.min_compression_rate <= 0:
            raise SpecError(f"{self.name} min_compression_rate must be > 0, got {self.min_compression_rate}")
        if self.start_iter < 0:
            raise SpecError(f"{self.name} start_iter must be >= 0, got {self.start_iter}")
        if self.epsilon < 0:
            raise SpecError(f"{self.name} epsilon must be >= 0, got {self.epsilon}")


@dataclasses.dataclass(frozen=True)
class LQSGDSettings(LowRankSettings):
    """LQ-SGD's parameters: PowerSGD's and the log quantizer's (arXiv 2506.17974).

    Args:
        bits: bits per code, sign included (2..16).
        alpha: curvature of the log codec; larger spends more levels near zero.
        rounding: nearest, or stochastic (unbiased in the log domain u).
        quantize_rest: log-quantize the tensors PowerSGD sends uncompressed (1-D, small).
        collective: allgather, alltoall, or auto (allgather iff bits x workers < 64).
    """

    bits: int = 8
    alpha: float = 10.0
    rounding: Literal["nearest", "stochastic"] = "nearest"
    quantize_rest: bool = True
    collective: Literal["auto", "allgather", "alltoall"] = "auto"
    name: str = dataclasses.field(default="lqsgd", compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "quantize_rest", bool(self.quantize_rest))
        if not 2 <= self.bits <= 16:
            raise SpecError(f"{self.name} bits must be in 2..16 (one sign bit + magnitude), got {self.bits}")
        if not self.alpha > 0:
            raise SpecError(f"{self.name} alpha must be > 0, got {self.alpha}")
        if self.rounding not in ("nearest", "stochastic"):
            raise SpecError(f"{self.name} rounding must be nearest or stochastic, got {self.rounding!r}")
        if self.collective not in ("auto", "allgather", "alltoall"):
            raise SpecError(f"{self.name} collective must be auto, allgather or alltoall, got {self.collective!r}")


def setting_property(field: str) -> property:
    """A read-only compressor attribute that is its ``settings``' field of that name: the spec's
    parameters stay attributes (``canonical_spec`` reads them) with one validated source."""
    return property(lambda self: getattr(self.settings, field), doc=f"settings.{field}")


# -- which tensors are compressed, and where their factors live in the flat messages ------------------


@dataclasses.dataclass(frozen=True)
class ShapeGroup:
    """Compressed tensors that share one matrix shape ``n x m``: batched through ``bmm`` together."""

    n: int
    m: int
    r: int  # min(n, m, rank)
    indices: tuple[int, ...]  # positions of the tensors in the gradient list
    p_offset: int  # where the group's (count, n, r) block starts in the flat P message
    q_offset: int  # where the group's (count, m, r) block starts in the flat Q message

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def p_numel(self) -> int:
        return self.count * self.n * self.r

    @property
    def q_numel(self) -> int:
        return self.count * self.m * self.r


@dataclasses.dataclass(frozen=True)
class Plan:
    """The layout of PowerSGD's messages for a list of gradient shapes.

    ``P`` (and ``Q``) is the concatenation of every compressed tensor's P (Q), grouped by
    matrix shape in order of first appearance and in gradient order within a group, as
    PyTorch's hook lays out its ``p_memory`` / ``q_memory``. ``rest`` concatenates the
    uncompressed tensors in gradient order.
    """

    shapes: tuple[torch.Size, ...]
    groups: tuple[ShapeGroup, ...]
    rest: tuple[int, ...]
    p_numel: int
    q_numel: int
    rest_numel: int

    @property
    def compressed(self) -> tuple[int, ...]:
        """Positions of the compressed tensors in message order."""
        return tuple(i for g in self.groups for i in g.indices)

    def p_sizes(self) -> list[int]:
        """Values of each compressed tensor's P, in message order (one quantization segment each)."""
        return [g.n * g.r for g in self.groups for _ in g.indices]

    def q_sizes(self) -> list[int]:
        return [g.m * g.r for g in self.groups for _ in g.indices]

    def rest_sizes(self) -> list[int]:
        return [self.shapes[i].numel() for i in self.rest]


def should_compress(n: int, m: int, rank: int, min_compression_rate: float) -> bool:
    """PyTorch's ``_should_compress``: the n x m matrix is sent as factors iff that saves enough.

    ``(n + m) * r * min_compression_rate < n * m`` with ``r = min(n, m, rank)``.
    """
    r = min(n, m, rank)
    return (n + m) * r * min_compression_rate < n * m


@functools.lru_cache(maxsize=64)
def make_plan(shapes: tuple[torch.Size, ...], rank: int, min_compression_rate: float) -> Plan:
    """Split ``shapes`` into compressed matrices (grouped by shape) and the uncompressed rest.

    A tensor is viewed as ``shape[0] x rest``; 1-D (and 0-D) tensors are never compressed.
    """
    by_shape: dict[tuple[int, int], list[int]] = {}
    rest: list[int] = []
    for i, shape in enumerate(shapes):
        if len(shape) > 1:
            n = int(shape[0])
            m = int(shape.numel()) // n if n else 0
            if n and m and should_compress(n, m, rank, min_compression_rate):
                by_shape.setdefault((n, m), []).append(i)
                continue
        rest.append(i)
    groups = []
    p_off = q_off = 0
    for (n, m), idx in by_shape.items():
        group = ShapeGroup(n, m, min(n, m, rank), tuple(idx), p_off, q_off)
        groups.append(group)
        p_off += group.p_numel
        q_off += group.q_numel
    rest_numel = sum(int(shapes[i].numel()) for i in rest)
    return Plan(tuple(shapes), tuple(groups), tuple(rest), p_off, q_off, rest_numel)


@dataclasses.dataclass(frozen=True)
class GroupResidual:
    """One shape group's error-feedback residual, stored once: ``(count, n, m)`` for a
    compressed group, flat for the uncompressed rest. Per-parameter tensors exist only as
    views made on demand (:meth:`views`) for ``state_dict`` and ``private_state``."""

    keys: tuple[Hashable, ...]
    shapes: tuple[torch.Size, ...]
    values: torch.Tensor

    def views(self) -> list[torch.Tensor]:
        """Each parameter's residual in its own shape: views of :attr:`values`, in key order."""
        return unflatten(self.values.reshape(-1), self.shapes)


# -- orthogonalization ------------------------------------------------------------------------------


def orthogonalize(matrices: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Orthonormal columns for a batch of ``(b, n, r)`` matrices, ``r <= n`` (a new tensor).

    As PyTorch's ``_orthogonalize``: modified Gram-Schmidt for ``r <= 2`` and for half
    precision, Householder QR (``torch.linalg.qr``) otherwise. ``epsilon`` is added to
    each column norm in Gram-Schmidt (PyTorch's ``orthogonalization_epsilon``).

    One deliberate difference in Gram-Schmidt: a column whose norm after the projections
    is at most ``sqrt(machine epsilon)`` times its norm before them (a rank-deficient P,
    e.g. the rank-1 gradient of a linear layer at batch size 1, or an all-zero gradient)
    becomes zero. PyTorch normalizes what is left, rounding noise that is far from
    orthogonal to the earlier columns, and its rank-2 output is then wrong by 100% (or
    NaN for a zero column); the two agree bit for bit on every other input. Written
    without in-place updates so that autograd can differentiate it (the aware attack).
    """
    if matrices.dim() != 3 or matrices.shape[2] > matrices.shape[1]:
        raise ValueError(f"orthogonalize expects (b, n, r) with r <= n, got {tuple(matrices.shape)}")
    rank = matrices.shape[2]
    if rank > 2 and matrices.dtype not in (torch.float16, torch.bfloat16):
        return torch.linalg.qr(matrices).Q
    tol = torch.finfo(matrices.dtype).eps ** 0.5
    original_norms = torch.linalg.vector_norm(matrices, dim=1, keepdim=True)
    columns = []
    work = matrices
    for i in range(rank):
        col = work[:, :, :1]
        norm = torch.linalg.vector_norm(col, dim=1, keepdim=True)
        keep = norm > tol * original_norms[:, :, i : i + 1]
        if epsilon == 0:
            col = torch.where(keep, col / torch.where(keep, norm, torch.ones_like(norm)), torch.zeros_like(col))
        else:
            col = torch.where(keep, col / (norm + epsilon), torch.zeros_like(col))
        columns.append(col)
        if i + 1 < rank:
            # project the normalized column out of the remaining ones (same arithmetic as PyTorch)
            rest = work[:, :, 1:]
            work = rest - torch.sum(col * rest, dim=1, keepdim=True) * col
    return columns[0] if rank == 1 else torch.cat(columns, dim=2)


def orthogonalize_blocks(blocks: Sequence[torch.Tensor], epsilon: float = 0.0) -> list[torch.Tensor]:
    """:func:`orthogonalize` of several ``(count, n_i, r)`` blocks in one batched call per rank r.

    Blocks are zero-padded to the longest ``n``: zero rows change neither the column
    norms nor the projections (nor Householder QR), so each block's result is its own
    orthogonalization, up to float rounding; one call instead of one per shape group
    keeps the kernel count (and GPU launch overhead) flat in the number of groups.
    """
    out: list[torch.Tensor | None] = [None] * len(blocks)
    by_rank: dict[int, list[int]] = {}
    for i, b in enumerate(blocks):
        by_rank.setdefault(int(b.shape[2]), []).append(i)
    for idx in by_rank.values():
        if len(idx) == 1:
            out[idx[0]] = orthogonalize(blocks[idx[0]], epsilon)
            continue
        n_max = max(int(blocks[i].shape[1]) for i in idx)
        padded = torch.cat([F.pad(blocks[i], (0, 0, 0, n_max - blocks[i].shape[1])) for i in idx])
        ortho = orthogonalize(padded, epsilon)
        start = 0
        for i in idx:
            count, n = blocks[i].shape[:2]
            out[i] = ortho[start : start + count, :n]
            start += count
    return out  # type: ignore[return-value]
