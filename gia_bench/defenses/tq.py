"""Threshold quantization, the compressor of QCMD / QRDA adagrad (Xu, Wangni, Zhang, Ye, Wu, Zhao).

"Quantized Adaptive Subgradient Algorithms and Their Applications" (IEEE TPAMI 2022):
workers send threshold-quantized gradients; entries below a threshold become zero and
are not sent, the rest are quantized, and the threshold keeps the quantization error
small (the kept entries span only ``[tau s, s]``). The optimizer side (an AdaGrad
matrix built from the quantized gradients driving an L1-regularised composite
mirror-descent or dual-averaging update) is :mod:`gia_bench.optim`.
"""

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
from gia_bench.defenses.codecs import pack_bits, packed_nbytes, segment_ids, unpack_bits
from gia_bench.errors import CompressorError, SpecError


@register("tq")
class ThresholdQuantization(GeneratorState, Compressor):
    """Threshold quantization: per tensor an fp32 scale, the positions kept, and a b-bit code per kept entry.

    For a tensor ``g`` with ``s = max|g|``: entries with ``|g_i| < threshold * s`` are
    dropped (zero on the receiver); a kept entry sends a sign bit and a magnitude code
    ``m = round(L (|g_i| - tau s) / ((1 - tau) s))``, ``L = 2^(bits-1) - 1``, decoded as
    ``sign * (tau s + m (1 - tau) s / L)``: the error of a kept entry is at most
    ``(1 - tau) s / (2L)`` (nearest) and stochastic rounding is unbiased for kept entries.

    Messages, all tensors concatenated: ``"scales"`` (fp32, one per tensor), the kept
    positions as ``"mask"`` (1 bit per entry, packed) or ``"indices"`` (int32 flat
    positions), whichever is fewer bytes for this step (the receiver tells them apart by
    tag), and ``"codes"`` (``bits`` bits per kept entry, packed). Codes are not linear,
    so workers ``all_gather`` them and decode each rank's in rank order.

    Compressor-aware view (:meth:`simulate`): the positions are public once seen (as
    Top-k's mask); the attacker matches the candidate's per-tensor scales and its values
    at the kept positions (the quantizer's expectation).

    Args:
        threshold: fraction ``tau`` of each tensor's largest magnitude below which entries are dropped, in [0, 1).
        bits: bits per kept entry, sign included (>= 2).
        rounding: ``nearest`` or ``stochastic`` (unbiased for kept entries).
        seed: seed of the rounding generator (each worker adds its rank).
    """

    supports_simulate = True

    def __init__(self, *, threshold: float = 0.1, bits: int = 4, rounding: str = "stochastic", seed: int = 0) -> None:
        if not 0.0 <= threshold < 1.0:
            raise SpecError(f"tq threshold must be in [0, 1), got {threshold}")
        if not 2 <= bits <= 16:
            raise SpecError(f"tq bits must be in 2..16 (a sign bit and a magnitude), got {bits}")
        if rounding not in ("nearest", "stochastic"):
            raise SpecError(f"tq rounding must be nearest or stochastic, got {rounding!r}")
        self.threshold = float(threshold)
        self.bits = int(bits)
        self.rounding = rounding
        self.seed = int(seed)
        self._gen: torch.Generator | None = None

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    # -- the quantizer ---------------------------------------------------------------------------
    def _scales(self, v: torch.Tensor, seg: torch.Tensor, num: int) -> torch.Tensor:
        return torch.zeros(num, dtype=torch.float32, device=v.device).scatter_reduce_(0, seg, v.abs(), "amax")

    def _kept(self, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Entries at or above the threshold (never an entry of an all-zero tensor)."""
        return (v.abs() >= self.threshold * s) & (s > 0)

    def _values(self, s: torch.Tensor, negative: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        tau = self.threshold
        mag = s * (tau + (1.0 - tau) * m.to(torch.float32) / self.levels)
        return torch.where(negative, -mag, mag)

    @staticmethod
    def position_format(n: int, counts: Sequence[int]) -> str:
        """``indices`` (int32 each) when they are fewer bytes than a bitmap for every worker, else ``mask``."""
        return "indices" if all(4 * k < packed_nbytes(n, 1) for k in counts) else "mask"

    def expected_nbytes(self, shapes: Sequence[torch.Size], kept: int) -> int:
        """Bytes of one worker's messages with ``kept`` entries kept: scales + count + positions + codes."""
        n = sum(int(torch.Size(s).numel()) for s in shapes)
        return 4 * len(shapes) + 4 + min(packed_nbytes(n, 1), 4 * kept) + packed_nbytes(kept, self.bits)

    # -- worker ------------------------------------------------------------------------------
    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        if not grads:
            return []
        shapes = [g.shape for g in grads]
        device = grads[0].device
        v = flatten([g.detach() for g in grads]).to(torch.float32)
        seg = segment_ids([int(torch.Size(s).numel()) for s in shapes], device)
        scales = self._scales(v, seg, len(shapes))
        s = scales[seg]
        kept = self._kept(v, s)
        vk, sk = v[kept], s[kept]
        r = (vk.abs() - self.threshold * sk) / ((1.0 - self.threshold) * sk) * self.levels
        if self.rounding == "stochastic":
            gen = self._generator(device, comm.rank)
            u = torch.rand(r.shape, generator=gen, device=gen.device, dtype=torch.float32).to(device)
            m = torch.floor(r + u)
        else:
            m = torch.round(r)
        m = m.clamp_(0, self.levels).to(torch.int64)
        negative = vk < 0
        codes = (negative.to(torch.int64) << (self.bits - 1)) | m
        # kept counts differ between workers: each worker's count travels first (4 bytes), and
        # every worker then picks the same position format from all the counts
        counts = comm.all_gather(torch.tensor([vk.numel()], dtype=torch.int32, device=device), "count")
        sizes = [int(c.reshape(-1)[0]) for c in counts]
        tag = self.position_format(v.numel(), sizes)
        positions = torch.nonzero(kept).reshape(-1).to(torch.int32) if tag == "indices" else pack_bits(kept, 1)
        all_scales = comm.all_gather(scales, "scales")
        all_positions = self._gather_varlen(comm, positions, tag, sizes, v.numel())
        all_codes = self._gather_varlen(comm, pack_bits(codes, self.bits), "codes", sizes, v.numel())
        flat = torch.zeros_like(v)
        for rank in range(comm.world_size):
            if rank == comm.rank:
                own = torch.zeros_like(v)
                own[kept] = self._values(sk, negative, m)
                flat += own
            else:
                flat += self._dequantize(
                    all_scales[rank], tag, all_positions[rank], all_codes[rank], sizes[rank], seg, len(shapes)
                )
        flat.div_(comm.world_size)
        return [t.to(g.dtype) for t, g in zip(unflatten(flat, shapes), grads)]

    def _gather_varlen(
        self, comm: Communicator, payload: torch.Tensor, tag: str, sizes: Sequence[int], n: int
    ) -> list[torch.Tensor]:
        """All-gather of messages whose length depends on each worker's kept count.

        With one worker the message goes as it is (what a record holds). With several,
        all workers must send equal shapes: each pads to the largest and the receiver
        cuts every rank's message back to the length its count implies. The padding is
        logged as sent, because it is.
        """
        if comm.world_size == 1:
            return comm.all_gather(payload, tag)
        if tag == "codes":
            lengths = [packed_nbytes(k, self.bits) for k in sizes]
        elif tag == "indices":
            lengths = [k for k in sizes]
        else:
            lengths = [packed_nbytes(n, 1)] * len(sizes)
        longest = max(lengths)
        padded = torch.nn.functional.pad(payload, (0, longest - payload.numel()))
        return [t[:length] for t, length in zip(comm.all_gather(padded, tag), lengths)]

    def _dequantize(
        self,
        scales: torch.Tensor,
        tag: str,
        positions: torch.Tensor,
        codes: torch.Tensor,
        k: int,
        seg: torch.Tensor,
        num_tensors: int,
    ) -> torch.Tensor:
        n = seg.numel()
        device = seg.device
        if scales.numel() != num_tensors:
            raise CompressorError(f"tq: {scales.numel()} scales, the shapes have {num_tensors} tensors")
        if tag == "mask":
            if positions.numel() != packed_nbytes(n, 1):
                raise CompressorError(f"tq: mask of {positions.numel()} bytes, the shapes need {packed_nbytes(n, 1)}")
            idx = torch.nonzero(unpack_bits(positions.to(device), 1, n)).reshape(-1)
        else:
            idx = positions.to(device, torch.int64)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n or idx.unique().numel() != idx.numel()):
                raise CompressorError(f"tq: indices out of range [0, {n}) or repeated")
        if idx.numel() != k or codes.numel() != packed_nbytes(k, self.bits):
            raise CompressorError(f"tq: {idx.numel()} positions and {codes.numel()} code bytes do not agree")
        c = unpack_bits(codes.to(device), self.bits, k)
        negative = ((c >> (self.bits - 1)) & 1).bool()
        m = c & ((1 << (self.bits - 1)) - 1)
        if k and int(m.max()) > self.levels:
            raise CompressorError(f"tq: a magnitude code exceeds {self.levels}")
        flat = torch.zeros(n, dtype=torch.float32, device=device)
        flat[idx] = self._values(scales.to(device, torch.float32)[seg[idx]], negative, m)
        return flat

    # -- receiver ------------------------------------------------------------------------------
    def _split(self, messages: Mapping[str, torch.Tensor], shapes: Sequence[torch.Size]):
        """(position tag, segment ids, kept count, positions, codes) of one worker's messages.

        With several workers, ``indices`` and ``codes`` travel padded to the longest
        worker's (all-gather needs equal shapes): the worker's ``count`` says how much of
        them is its own, so a record of what a worker actually sent decodes exactly.
        """
        check_messages(messages, ["scales", "codes"], "tq")
        tags = [t for t in ("mask", "indices") if t in messages]
        if len(tags) != 1:
            raise CompressorError("tq: messages need exactly one of 'mask' or 'indices'")
        tag = tags[0]
        seg = segment_ids([int(torch.Size(s).numel()) for s in shapes], messages["scales"].device)
        n = seg.numel()
        positions, codes = messages[tag], messages["codes"]
        if tag == "mask":
            k = int(unpack_bits(positions, 1, n).sum()) if positions.numel() == packed_nbytes(n, 1) else -1
        else:
            k = positions.numel()
        if "count" in messages:
            count = messages["count"].reshape(-1)
            if count.numel() != 1 or not 0 <= int(count[0]) <= n:
                raise CompressorError(f"tq: 'count' must be one integer in [0, {n}]")
            sent = int(count[0])
            if tag == "indices":
                if positions.numel() < sent:
                    raise CompressorError(f"tq: {positions.numel()} indices, 'count' says {sent}")
                positions, k = positions[:sent], sent
            elif k != sent:
                raise CompressorError(f"tq: the mask keeps {k} entries, 'count' says {sent}")
            codes = codes[: packed_nbytes(k, self.bits)]
        return tag, seg, k, positions, codes

    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        tag, seg, k, positions, codes = self._split(messages, shapes)
        flat = self._dequantize(messages["scales"], tag, positions, codes, k, seg, len(shapes))
        return unflatten(flat, shapes)

    def _kept_index(self, messages: Mapping[str, torch.Tensor], shapes: Sequence[torch.Size]) -> torch.Tensor:
        tag, seg, _, positions, _ = self._split(messages, shapes)
        if tag == "mask":
            return torch.nonzero(unpack_bits(positions, 1, seg.numel())).reshape(-1)
        return positions.to(torch.int64)

    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        idx = self._kept_index(messages, shapes)
        flat = flatten(self.decode(messages, shapes))
        return {"scales": messages["scales"].to(torch.float32), "values": flat[idx.to(flat.device)]}

    def simulate(self, grads, messages, public=None) -> dict[str, torch.Tensor]:
        """The candidate's per-tensor max magnitudes and its values at the observed positions: differentiable."""
        shapes = [g.shape for g in grads]
        v = flatten(list(grads)).to(torch.float32)
        scales = [g.abs().max().to(torch.float32) if g.numel() else v.new_zeros(()) for g in grads]
        idx = self._kept_index(messages, shapes).to(v.device)
        return {"scales": torch.stack(scales) if scales else v.new_zeros(0), "values": v[idx]}
