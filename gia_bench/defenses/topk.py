"""Top-k sparsification with error feedback (Stich et al. 2018; Lin et al. 2018, "Deep Gradient Compression")."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import torch

from gia_bench.comm import Communicator
from gia_bench.defenses.base import (
    Compressor,
    ResidualState,
    check_messages,
    flatten,
    register,
    resolve_keys,
    unflatten,
    with_residual,
)
from gia_bench.errors import CompressorError, SpecError

_INT32_MAX = 2**31 - 1


def topk_count(numel: int, ratio: float) -> int:
    """Entries Top-k keeps of a tensor of ``numel`` values: ``max(1, ceil(ratio * numel))``, at most ``numel``.

    ``ratio * numel`` is rounded to 9 decimals before the ceiling so that float noise
    (``0.07 * 100 = 7.000000000000001``) does not add an entry.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(round(ratio * numel, 9))))


def _offsets(sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """Start of each tensor in the concatenation of ``sizes``."""
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int64, device=device)


def _global_indices(indices: torch.Tensor, numels: Sequence[int], ks: Sequence[int]) -> torch.Tensor:
    """Per-tensor flat ``indices`` (concatenated, ``ks[i]`` for tensor i) -> indices in the flat concatenation."""
    device = indices.device
    if not numels:
        return indices.to(torch.int64)
    shift = torch.repeat_interleave(_offsets(numels, device), torch.tensor(ks, dtype=torch.int64, device=device))
    return indices.to(torch.int64) + shift


@register("topk")
class TopK(ResidualState, Compressor):
    """Top-k sparsification: per tensor the k largest-magnitude entries, sent as fp32 values + int32 indices.

    Per tensor of d entries it keeps exactly ``k = max(1, ceil(ratio * d))`` entries of
    ``p = g + e`` (``e``: the error-feedback residual, Stich et al. 2018, Alg. 1) and keeps
    ``e = p - topk(p)`` for the next step. Two messages per step, all tensors concatenated:
    ``"values"`` (fp32, 4 bytes each) and ``"indices"`` (int32 flat positions within each
    tensor, 4 bytes each; int32 is what is sent, never a narrower type). Sparse vectors of
    different supports cannot be summed by an all-reduce without densifying, so workers
    ``all_gather`` them and scatter-add in rank order, then divide by the world size.

    Args:
        ratio: fraction of each tensor's entries kept, in (0, 1].
        error_feedback: add the residual of the previous steps before selecting (EF-SGD).
    """

    supports_simulate = True

    def __init__(self, *, ratio: float = 0.01, error_feedback: bool = True) -> None:
        if not 0.0 < ratio <= 1.0:
            raise SpecError(f"topk ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)
        self.error_feedback = bool(error_feedback)
        self._residual: dict[Hashable, torch.Tensor] = {}

    def counts(self, shapes: Sequence[torch.Size]) -> list[int]:
        """k for each tensor of ``shapes``."""
        return [topk_count(int(torch.Size(s).numel()), self.ratio) for s in shapes]

    # -- worker ------------------------------------------------------------------------------
    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        keys = resolve_keys(grads, keys)
        if not grads:
            return []
        values, indices = [], []
        for g, key in zip(grads, keys):
            if g.numel() > _INT32_MAX:
                raise CompressorError(f"topk: tensor {key!r} has {g.numel()} entries, more than int32 indices address")
            p = g.detach().reshape(-1).to(torch.float32)  # may share g's memory: never written to
            fresh = False
            if self.error_feedback and key in self._residual:
                e = self._residual[key]
                if e.shape != p.shape:
                    raise CompressorError(f"topk: residual of {key!r} has {e.numel()} entries, gradient {p.numel()}")
                p, fresh = p + e.to(p.device), True
            k = topk_count(p.numel(), self.ratio)
            idx = torch.topk(p.abs(), k, sorted=False).indices
            values.append(p[idx])
            indices.append(idx.to(torch.int32))
            if self.error_feedback:
                # residual = p - sparse(p[idx]); zeroing the kept entries is exact, no rounding
                e = p if fresh else p.clone()
                e[idx] = 0.0
                self._residual[key] = e
        shapes = [g.shape for g in grads]
        all_values = comm.all_gather(torch.cat(values), "values")
        all_indices = comm.all_gather(torch.cat(indices), "indices")
        flat = self._scatter(all_values, all_indices, shapes, grads[0].device)
        flat.div_(comm.world_size)
        return [t.to(g.dtype) for t, g in zip(unflatten(flat, shapes), grads)]

    def _scatter(
        self,
        all_values: Sequence[torch.Tensor],
        all_indices: Sequence[torch.Tensor],
        shapes: Sequence[torch.Size],
        device: torch.device,
    ) -> torch.Tensor:
        """Sum of the workers' sparse tensors, in rank order, as one flat fp32 buffer."""
        numels = [int(torch.Size(s).numel()) for s in shapes]
        ks = self.counts(shapes)
        flat = torch.zeros(sum(numels), dtype=torch.float32, device=device)
        for v, i in zip(all_values, all_indices):
            if v.numel() != sum(ks) or i.numel() != sum(ks):
                raise CompressorError(
                    f"topk: {v.numel()} values / {i.numel()} indices, shapes with ratio {self.ratio} need {sum(ks)}"
                )
            # indices within one worker's message are distinct, so each index_add_ is order-free
            flat.index_add_(0, _global_indices(i.to(device), numels, ks), v.to(device, torch.float32))
        return flat

    # -- receiver ------------------------------------------------------------------------------
    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        check_messages(messages, ["values", "indices"], "topk")
        values = messages["values"]
        flat = self._scatter([values], [messages["indices"]], shapes, values.device)
        return unflatten(flat, shapes)

    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        check_messages(messages, ["values"], "topk")
        return {"values": messages["values"].to(torch.float32)}

    def simulate(self, grads, messages, public=None, private=None) -> dict[str, torch.Tensor]:
        """``g + e`` at the observed indices (the mask is public once seen): differentiable.

        ``e`` is the worker's residual from ``private`` (oracle view); without it, zero.
        """
        check_messages(messages, ["indices"], "topk")
        grads = with_residual(grads, private, "topk")
        shapes = [g.shape for g in grads]
        numels = [int(torch.Size(s).numel()) for s in shapes]
        ks = self.counts(shapes)
        indices = messages["indices"]
        if indices.numel() != sum(ks):
            raise CompressorError(f"topk: {indices.numel()} observed indices, the candidate's shapes need {sum(ks)}")
        flat = flatten(grads).to(torch.float32)
        return {"values": flat[_global_indices(indices.to(flat.device), numels, ks)]}
