"""QSGD: stochastic quantization to s levels per bucket (Alistarh et al. 2017, "QSGD", section 3.1)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from gia_bench.comm import Communicator
from gia_bench.defenses.base import (
    Compressor,
    GeneratorState,
    check_messages,
    flatten,
    register,
    unflatten,
)
from gia_bench.defenses.codecs import pack_bits, packed_nbytes, unpack_bits
from gia_bench.errors import CompressorError, SpecError


def _bucket_index(numels: Sequence[int], bucket: int, device: torch.device) -> torch.Tensor:
    """Bucket of every entry of the concatenated tensors: buckets never straddle two tensors."""
    parts, start = [], 0
    for n in numels:
        parts.append(start + torch.arange(n, device=device) // bucket)
        start += -(-n // bucket)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def _bucket_norms(v: torch.Tensor, numels: Sequence[int], bucket: int) -> torch.Tensor:
    """L2 norm of every bucket of the flat ``v`` (zero-padded rows; deterministic on every device)."""
    parts, start = [], 0
    for n in numels:
        x = v[start : start + n]
        start += n
        if n % bucket:
            x = torch.nn.functional.pad(x, (0, bucket - n % bucket))
        parts.append(torch.linalg.vector_norm(x.reshape(-1, bucket), dim=1))
    return torch.cat(parts) if parts else v.new_zeros(0)


@register("qsgd")
class QSGD(GeneratorState, Compressor):
    """QSGD: per bucket an fp32 L2 norm, then per entry a sign bit and an unbiased stochastic level.

    Alistarh et al. 2017, section 3.1: for a bucket ``v`` of ``d`` entries,
    ``Q_s(v_i) = ||v||_2 * sign(v_i) * xi_i(v, s)`` where ``xi_i = l/s`` or ``(l+1)/s`` with
    ``l = floor(s|v_i|/||v||_2)``, rounding up with probability ``s|v_i|/||v||_2 - l``; so
    ``E[Q_s(v)] = v`` and ``E||Q_s(v) - v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2`` (Lemma 3.1).
    Buckets are consecutive entries of one tensor (the last one may be shorter).

    Messages, all tensors concatenated: ``"norms"`` (fp32, one per bucket), ``"signs"``
    (1 bit per entry, packed) and ``"levels"`` (``ceil(log2(s+1))`` bits per entry, packed).
    Codes are not linear, so workers ``all_gather`` them; every worker decodes each rank's
    codes in rank order, sums and divides by the world size. The rounding dither comes
    from a generator seeded with ``seed + rank`` (workers draw independently) and is not
    public: the receiver never learns it.

    Compressor-aware view (:meth:`simulate`): the norms are sent exactly, so the attacker
    matches the candidate's bucket norms to them; the dequantized values are an unbiased
    estimate of the gradient, so the candidate is matched to them through the identity
    (the expected value of the quantizer; rounding the candidate would only add noise).

    Args:
        levels: quantization levels s >= 1 (level codes 0..s).
        bucket: entries per bucket d >= 1 (one norm each).
        seed: seed of the rounding generator (each worker adds its rank).
    """

    supports_simulate = True

    def __init__(self, *, levels: int = 16, bucket: int = 512, seed: int = 0) -> None:
        if levels < 1:
            raise SpecError(f"qsgd levels must be >= 1, got {levels}")
        if levels > 2**31 - 1:
            raise SpecError(f"qsgd levels must fit in 31 bits, got {levels}")
        if bucket < 1:
            raise SpecError(f"qsgd bucket must be >= 1, got {bucket}")
        self.levels = int(levels)
        self.bucket = int(bucket)
        self.seed = int(seed)
        self._gen: torch.Generator | None = None
        self._index_cache: dict[tuple, torch.Tensor] = {}

    @property
    def level_bits(self) -> int:
        """Bits of one level code: ``ceil(log2(s + 1))``."""
        return self.levels.bit_length()

    def num_buckets(self, shapes: Sequence[torch.Size]) -> int:
        return sum(-(-int(torch.Size(s).numel()) // self.bucket) for s in shapes)

    def expected_nbytes(self, shapes: Sequence[torch.Size]) -> int:
        """Bytes of one worker's messages for ``shapes``: norms + packed signs + packed levels."""
        n = sum(int(torch.Size(s).numel()) for s in shapes)
        return 4 * self.num_buckets(shapes) + packed_nbytes(n, 1) + packed_nbytes(n, self.level_bits)

    def _buckets(self, shapes: Sequence[torch.Size], device: torch.device) -> torch.Tensor:
        key = (tuple(tuple(s) for s in shapes), str(device))
        if key not in self._index_cache:
            if len(self._index_cache) > 16:
                self._index_cache.clear()
            numels = [int(torch.Size(s).numel()) for s in shapes]
            self._index_cache[key] = _bucket_index(numels, self.bucket, device)
        return self._index_cache[key]

    # -- worker ------------------------------------------------------------------------------
    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        if not grads:
            return []
        shapes = [g.shape for g in grads]
        device = grads[0].device
        v = flatten([g.detach() for g in grads]).to(torch.float32)
        bidx = self._buckets(shapes, device)
        norms = _bucket_norms(v, [int(torch.Size(s).numel()) for s in shapes], self.bucket)
        per_entry = norms[bidx]
        safe = torch.where(per_entry > 0, per_entry, torch.ones_like(per_entry))
        r = v.abs() / safe * self.levels
        gen = self._generator(device, comm.rank)
        u = torch.rand(v.numel(), generator=gen, device=gen.device, dtype=torch.float32).to(device)
        # floor(r + u) with u ~ U[0, 1) rounds up with probability r - floor(r): E = r (unbiased)
        level = torch.floor(r + u).clamp_(0, self.levels)
        negative = v < 0
        all_norms = comm.all_gather(norms, "norms")
        all_signs = comm.all_gather(pack_bits(negative, 1), "signs")
        all_levels = comm.all_gather(pack_bits(level.to(torch.int64), self.level_bits), "levels")
        # this worker's part, computed as the receiver decodes it (same ops), without unpacking
        own = self._values(per_entry, negative, level)
        if comm.world_size == 1:
            flat = own
        else:
            nb = norms.numel()
            flat = torch.zeros_like(v)
            for rank, (n_, s_, l_) in enumerate(zip(all_norms, all_signs, all_levels)):
                flat += own if rank == comm.rank else self._dequantize(n_, s_, l_, bidx, nb)
            flat.div_(comm.world_size)
        return [t.to(g.dtype) for t, g in zip(unflatten(flat, shapes), grads)]

    def _values(self, norm_per_entry: torch.Tensor, negative: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """``||bucket|| * sign * l / s``, flat fp32."""
        mag = norm_per_entry * (level.to(torch.float32) / self.levels)
        return torch.where(negative, -mag, mag)

    def _dequantize(
        self, norms: torch.Tensor, signs: torch.Tensor, levels: torch.Tensor, bidx: torch.Tensor, nb: int
    ) -> torch.Tensor:
        """The flat fp32 values one worker's messages stand for."""
        device, n = bidx.device, bidx.numel()
        if norms.numel() != nb:
            raise CompressorError(f"qsgd: {norms.numel()} norms, the shapes have {nb} buckets")
        negative = unpack_bits(signs.to(device), 1, n).bool()
        level = unpack_bits(levels.to(device), self.level_bits, n)
        return self._values(norms.to(device, torch.float32)[bidx], negative, level)

    # -- receiver ------------------------------------------------------------------------------
    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        check_messages(messages, ["norms", "signs", "levels"], "qsgd")
        device = messages["norms"].device
        bidx = self._buckets(shapes, device)
        try:
            flat = self._dequantize(
                messages["norms"], messages["signs"], messages["levels"], bidx, self.num_buckets(shapes)
            )
        except ValueError as exc:
            raise CompressorError(f"qsgd: messages do not match the shapes ({exc})") from exc
        return unflatten(flat, shapes)

    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        check_messages(messages, ["norms"], "qsgd")
        return {"norms": messages["norms"].to(torch.float32), "values": flatten(self.decode(messages, shapes))}

    def simulate(self, grads, messages, public=None) -> dict[str, torch.Tensor]:
        """Exact bucket norms and the quantizer's expectation (the candidate itself): differentiable."""
        shapes = [g.shape for g in grads]
        v = flatten(list(grads)).to(torch.float32)
        norms = _bucket_norms(v, [int(torch.Size(s).numel()) for s in shapes], self.bucket)
        return {"norms": norms, "values": v}
