"""Codecs shared by the quantizing compressors: bit packing, log and uniform quantizers.

Packed format (:func:`pack_bits`): code ``i`` of ``b`` bits occupies stream bits
``[i*b, (i+1)*b)``, least significant bit first; stream bit ``8k + m`` is bit ``m``
of byte ``k``. A message of ``n`` codes is ``ceil(n*b/8)`` bytes, nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def _group_plan(bits: int) -> list[list[tuple[int, int]]]:
    """For a group of 8 codes of ``bits`` bits (``bits`` bytes): byte k = OR of ``(code i, shift)``.

    ``shift`` > 0 moves the code left (towards higher stream bits), < 0 right.
    """
    plan: list[list[tuple[int, int]]] = [[] for _ in range(bits)]
    for i in range(8):
        lo, hi = i * bits, (i + 1) * bits
        for k in range(lo // 8, (hi - 1) // 8 + 1):
            plan[k].append((i, lo - 8 * k))
    return plan


def _pack_groups(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bytes of the stream, 8 codes (= ``bits`` bytes) at a time, one column operation per piece.

    uint8 arithmetic (shifts truncate to the byte) for ``bits < 8``, int32 for wider codes:
    no int64 words and no bit expansion.
    """
    n = codes.numel()
    dtype = torch.uint8 if bits < 8 else torch.int32
    c = codes.to(dtype)
    if n % 8:
        c = torch.cat([c, c.new_zeros(8 - n % 8)])
    cols = c.reshape(-1, 8)
    out = torch.empty(cols.shape[0], bits, dtype=torch.uint8, device=c.device)
    for k, pieces in enumerate(_group_plan(bits)):
        acc = None
        for i, shift in pieces:
            col = cols[:, i]
            part = col << shift if shift >= 0 else col >> -shift
            acc = part if acc is None else acc | part
        out[:, k] = acc if bits < 8 else acc & 0xFF
    return out.reshape(-1)[: packed_nbytes(n, bits)]


def _unpack_groups(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_groups`: codes (uint8 for ``bits < 8``, else int32)."""
    dtype = torch.uint8 if bits < 8 else torch.int32
    p = packed.to(dtype)
    if p.numel() % bits:
        p = torch.cat([p, p.new_zeros(bits - p.numel() % bits)])
    rows = p.reshape(-1, bits)
    mask = (1 << bits) - 1
    out = torch.empty(rows.shape[0], 8, dtype=dtype, device=p.device)
    for i in range(8):
        lo = i * bits
        acc = None
        for k in range(lo // 8, (lo + bits - 1) // 8 + 1):
            shift = lo - 8 * k  # where the code starts relative to byte k
            part = rows[:, k] >> shift if shift >= 0 else rows[:, k] << -shift
            acc = part if acc is None else acc | part
        out[:, i] = acc & mask
    return out.reshape(-1)[:n]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into a flat uint8 tensor."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    codes = codes.reshape(-1)
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 1 and codes.device.type == "cpu":  # numpy's table-driven packbits, same layout (LSB first)
        return torch.from_numpy(np.packbits(codes.to(torch.bool).numpy(), bitorder="little"))
    if bits % 8 == 0:  # 16, 24, 32 bits: little-endian bytes of each code
        nb = bits // 8
        c = codes.to(torch.int64).reshape(-1, 1) >> (8 * torch.arange(nb, device=codes.device))
        return (c & 0xFF).to(torch.uint8).reshape(-1)
    return _pack_groups(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes, as ``dtype`` (int64 unless asked)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return packed.to(dtype)
    if bits == 1 and packed.device.type == "cpu":
        bits_np = np.unpackbits(packed.numpy(), count=n, bitorder="little")
        return torch.from_numpy(bits_np).to(dtype)
    if bits % 8 == 0:
        nb = bits // 8
        p = packed.to(torch.int64)
        return (p.reshape(-1, nb) << (8 * torch.arange(nb, device=p.device))).sum(dim=1).to(dtype)
    return _unpack_groups(packed, bits, n).to(dtype)


def round_codes(v: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Round ``v`` to integers: nearest, or stochastically (``E[round(v)] = v``)."""
    if stochastic:
        noise = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        return torch.floor(v + noise)
    return torch.round(v)


# -- log quantizer (LQ-SGD, DESIGN.md) -----------------------------------------------------


def log_levels(bits: int) -> int:
    """Magnitude levels of a ``bits``-bit log code: one bit is the sign."""
    if bits < 2:
        raise ValueError(f"the log codec needs at least 2 bits (sign + magnitude), got {bits}")
    return 2 ** (bits - 1) - 1


def segment_ids(sizes: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """For a flat buffer of consecutive segments of ``sizes``: the segment index of every value."""
    return torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(list(sizes), dtype=torch.int64, device=device)
    )


def log_quantize_segments(
    x: torch.Tensor,
    segments: torch.Tensor,
    num_segments: int,
    bits: int,
    alpha: float,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-quantize (arXiv 2506.17974) every segment of a flat ``x`` at once, one scale per segment.

    ``segments[i]`` is the segment of value ``i``; each segment gets its own scale
    ``s = max|x|`` over the segment (fp32, 0 for an empty or all-zero segment), then
    ``u = log(1 + alpha|x|/s) / log(1 + alpha)`` in [0, 1] and
    ``code = sign << (bits-1) | round(u L)``, ``L = 2^(bits-1) - 1``.
    ``noise`` (uniform in [0, 1), same shape as ``x``) selects stochastic rounding
    ``floor(u L + noise)``, unbiased in ``u``; None rounds to nearest.
    Returns (codes int64 in [0, 2**bits), scales fp32 of shape ``(num_segments,)``).
    """
    levels = log_levels(bits)
    xf = x.detach().to(torch.float32).reshape(-1)
    a = xf.abs()
    scales = torch.zeros(num_segments, dtype=torch.float32, device=xf.device).scatter_reduce_(0, segments, a, "amax")
    s = scales[segments]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    v = torch.log1p(alpha * a / safe) / math.log1p(alpha) * levels
    m = (torch.round(v) if noise is None else torch.floor(v + noise)).clamp_(0, levels).to(torch.int64)
    sign = (xf < 0).to(torch.int64) << (bits - 1)
    return sign | m, scales


def log_dequantize_segments(codes: torch.Tensor, value_scales: torch.Tensor, bits: int, alpha: float) -> torch.Tensor:
    """Inverse of :func:`log_quantize_segments`: ``sign * s * ((1+alpha)^(m/L) - 1) / alpha``.

    ``value_scales`` is each value's scale (``scales[segments]``), or one scale for all.
    """
    levels = log_levels(bits)
    m = (codes & levels).to(torch.float32)
    sign = 1.0 - 2.0 * ((codes >> (bits - 1)) & 1).to(torch.float32)
    mag = torch.expm1(m / levels * math.log1p(alpha)) / alpha
    return sign * mag * value_scales.to(torch.float32)


def log_quantize(
    x: torch.Tensor,
    bits: int,
    alpha: float,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log codec with one scale for all of ``x``: returns (codes int64, scale fp32 of shape ``(1,)``).

    :func:`log_quantize_segments` with a single segment; stochastic rounding draws
    its noise from ``generator``.
    """
    xf = x.detach().reshape(-1)
    segments = torch.zeros(xf.numel(), dtype=torch.int64, device=xf.device)
    noise = torch.rand(xf.shape, generator=generator, device=xf.device) if stochastic else None
    return log_quantize_segments(xf, segments, 1, bits, alpha, noise)


def log_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, alpha: float) -> torch.Tensor:
    """Inverse map of :func:`log_quantize`."""
    return log_dequantize_segments(codes, scale.reshape(()), bits, alpha)


def log_roundtrip_ste(x: torch.Tensor, bits: int, alpha: float) -> torch.Tensor:
    """Nearest-rounded log quantize + dequantize with a straight-through gradient."""
    codes, scale = log_quantize(x, bits, alpha)
    q = log_dequantize(codes, scale, bits, alpha).reshape(x.shape).to(x.dtype)
    return x + (q - x).detach()


def log_max_relative_error(bits: int, alpha: float) -> float:
    """Worst-case |x - Q(x)| / s of nearest rounding, from the codec's math.

    With ``u`` rounded by at most ``1/(2L)``, ``|x|/s = ((1+alpha)^u - 1)/alpha`` moves by
    at most its derivative at ``u = 1`` times that: ``(1+alpha) log(1+alpha) / (2 L alpha)``.
    """
    levels = log_levels(bits)
    return (1 + alpha) * math.log1p(alpha) / (2 * levels * alpha)


# -- uniform quantizer -------------------------------------------------------------------------


def uniform_quantize(
    x: torch.Tensor,
    bits: int,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric uniform quantizer: codes in [0, 2**bits) over [-s, s], s = max|x|; returns (codes, scale)."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    top = 2**bits - 1
    xf = x.detach().to(torch.float32).reshape(-1)
    scale = xf.abs().max() if xf.numel() else torch.zeros((), device=x.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = (xf / safe + 1) / 2 * top
    codes = round_codes(v, stochastic, generator).clamp_(0, top).to(torch.int64)
    return codes, scale.to(torch.float32).reshape(1)


def uniform_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    top = 2**bits - 1
    return (codes.to(torch.float32) / top * 2 - 1) * scale.to(torch.float32).reshape(())


def empirical_entropy_bits(codes: torch.Tensor) -> float:
    """Empirical entropy of the code symbols, bits per symbol: the floor of an entropy coder."""
    if codes.numel() == 0:
        return 0.0
    _, counts = torch.unique(codes.reshape(-1), return_counts=True)
    p = counts.to(torch.float64) / codes.numel()
    return float(-(p * torch.log2(p)).sum())
