"""Scaled signSGD with error feedback (Karimireddy et al. 2019, "Error Feedback Fixes SignSGD", Alg. 1)."""

from __future__ import annotations

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
from gia_bench.defenses.codecs import pack_bits, packed_nbytes, unpack_bits
from gia_bench.errors import CompressorError


def _signed_scales(
    negative: torch.Tensor, scales: torch.Tensor, numels: Sequence[int], out: torch.Tensor
) -> torch.Tensor:
    """``out`` = ``-scale_t`` where negative, ``+scale_t`` elsewhere, tensor by tensor through views.

    One ``where`` per tensor on 0-d scales: no per-entry scale buffer, no concatenation.
    """
    scales = scales.to(torch.float32)
    minus = -scales
    start = 0
    for i, n in enumerate(numels):
        torch.where(negative[start : start + n], minus[i], scales[i], out=out[start : start + n])
        start += n
    return out


def _dequantize(signs: torch.Tensor, scales: torch.Tensor, numels: Sequence[int]) -> torch.Tensor:
    """``scale_t * (+-1)`` for every entry of every tensor t, flat fp32."""
    if scales.numel() != len(numels):
        raise CompressorError(f"signsgd: {scales.numel()} scales for {len(numels)} tensors")
    negative = unpack_bits(signs, 1, sum(numels), torch.bool).to(scales.device)
    out = torch.empty(negative.numel(), dtype=torch.float32, device=scales.device)
    return _signed_scales(negative, scales, numels, out)


def _sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign (zeros as +1, as sent) forward, identity backward (straight-through)."""
    s = torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))
    return x + (s - x).detach()


@register("signsgd")
class SignSGD(ResidualState, Compressor):
    """Scaled sign compression with error feedback (EF-SignSGD): 1 bit per entry + one fp32 scale per tensor.

    Karimireddy et al. 2019, Algorithm 1, per tensor of d entries:
    ``p = g + e``; ``delta = (||p||_1 / d) * sign(p)``; ``e = p - delta``. Zeros are sent
    with the + sign (one bit has no zero); the residual absorbs the difference.
    Messages, all tensors concatenated: ``"signs"`` (1 bit per entry, packed, set for
    negative entries) and ``"scales"`` (fp32, one per tensor). Workers ``all_gather`` them,
    decode each in rank order and average.

    Compressor-aware view (:meth:`simulate`): ``(||x||_1/d) * sign(x)`` of the candidate
    plus the residual when it is known (oracle view), exact in the scale and
    straight-through in the sign.

    Args:
        error_feedback: keep the residual ``e`` and add it to the next step's gradient.
    """

    supports_simulate = True

    def __init__(self, *, error_feedback: bool = True) -> None:
        self.error_feedback = bool(error_feedback)
        self._residual: dict[Hashable, torch.Tensor] = {}

    @staticmethod
    def expected_nbytes(shapes: Sequence[torch.Size]) -> int:
        """Bytes of one worker's messages: packed signs + one fp32 scale per tensor."""
        return packed_nbytes(sum(int(torch.Size(s).numel()) for s in shapes), 1) + 4 * len(shapes)

    # -- worker ------------------------------------------------------------------------------
    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        keys = resolve_keys(grads, keys)
        if not grads:
            return []
        device = grads[0].device
        shapes = [g.shape for g in grads]
        numels = [g.numel() for g in grads]
        ps, scales = [], []
        for g, key in zip(grads, keys):
            p = g.detach().reshape(-1).to(torch.float32)
            if self.error_feedback and key in self._residual:
                e = self._residual[key]
                if e.shape != p.shape:
                    raise CompressorError(f"signsgd: residual of {key!r} has {e.numel()} entries, gradient {p.numel()}")
                p = p + e.to(p.device)
            ps.append(p)
            scales.append(p.abs().mean() if p.numel() else p.new_zeros(()))
        p_flat = torch.cat(ps)
        negative = p_flat < 0
        scale_buf = torch.stack(scales)
        # exactly what the receiver decodes from the messages, without unpacking them again
        own = _signed_scales(negative, scale_buf, numels, torch.empty_like(p_flat))
        if self.error_feedback:
            # the residual is p minus what was sent
            for key, e in zip(keys, torch.split(p_flat - own, numels)):
                self._residual[key] = e
        all_signs = comm.all_gather(pack_bits(negative, 1), "signs")
        all_scales = comm.all_gather(scale_buf, "scales")
        if comm.world_size == 1:
            flat = own
        else:
            flat = torch.zeros(sum(numels), dtype=torch.float32, device=device)
            for r, (s_, c_) in enumerate(zip(all_signs, all_scales)):
                flat += own if r == comm.rank else _dequantize(s_.to(device), c_.to(device), numels)
            flat.div_(comm.world_size)
        return [t.to(g.dtype) for t, g in zip(unflatten(flat, shapes), grads)]

    # -- receiver ------------------------------------------------------------------------------
    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        check_messages(messages, ["signs", "scales"], "signsgd")
        numels = [int(torch.Size(s).numel()) for s in shapes]
        scales = messages["scales"]
        try:
            flat = _dequantize(messages["signs"].to(scales.device), scales, numels)
        except ValueError as exc:
            raise CompressorError(f"signsgd: messages do not match the shapes ({exc})") from exc
        return unflatten(flat, shapes)

    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        return {"values": flatten(self.decode(messages, shapes))}

    def simulate(self, grads, messages, public=None, private=None) -> dict[str, torch.Tensor]:
        """``(||p||_1/d) sign(p)`` per tensor of ``p = g + e`` (``e`` from ``private``, else zero)."""
        parts = []
        for g in with_residual(grads, private, "signsgd"):
            x = g.reshape(-1).to(torch.float32)
            if x.numel():
                parts.append(x.abs().mean() * _sign_ste(x))
        return {"values": torch.cat(parts) if parts else torch.zeros(0)}
