"""Bytes one worker sends in one step of each built-in compressor, written out independently of their code.

Each formula is derived from the wire format a compressor's docstring and DESIGN.md
("Bits are counted from what is sent") describe, for its *default* spec, one worker, a
fresh instance: codes of b bits are packed and rounded up to whole bytes per message,
fp32 scales / norms / values are 4 bytes, int32 indices and counts 4, a uint8 flag 1,
an int64 length 8. None of them calls a compressor's own byte arithmetic
(``expected_nbytes``, ``packed_nbytes``, ``Plan``...). Where what is sent depends on the
data (Threshold quantization keeps the entries above its threshold; RC-FED's entropy
coder spends the codes' empirical entropy), the formula computes that from the gradient
itself by the documented rule.

A formula returns an ``int`` (exact) or a ``range`` of the byte counts it admits
(only RC-FED's range-coded stream, whose exact length is the coder's own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from gia_bench.defenses.rcfed import design_quantizer

Bytes = int | range


def _numels(grads: Sequence[torch.Tensor]) -> list[int]:
    return [math.prod(g.shape) for g in grads]


def _packed(values: int, bits: int) -> int:
    """b-bit codes packed, rounded up to whole bytes."""
    return -(-values * bits // 8)


def _topk(grads: Sequence[torch.Tensor]) -> int:
    # ratio 0.01: k = max(1, ceil(n / 100)) per tensor, fp32 values + as many int32 indices
    return sum(8 * max(1, -(-n // 100)) for n in _numels(grads))


def _qsgd(grads: Sequence[torch.Tensor]) -> int:
    # one fp32 norm per 512-entry bucket of each tensor, 1 sign bit and 5 level bits (s = 16) per entry
    numels = _numels(grads)
    return 4 * sum(-(-n // 512) for n in numels) + _packed(sum(numels), 1) + _packed(sum(numels), 5)


def _signsgd(grads: Sequence[torch.Tensor]) -> int:
    # 1 sign bit per entry, one fp32 scale per tensor
    return _packed(sum(_numels(grads)), 1) + 4 * len(grads)


def _powersgd_split(grads: Sequence[torch.Tensor], rank: int = 2, rate: float = 2.0):
    """PowerSGD's step 1 (Vogels et al. 2019; PyTorch's ``_should_compress``): a tensor of two or more
    dimensions is the matrix ``n = shape[0]`` x ``m = rest``; it is sent as factors P (n x r) and
    Q (m x r), r = min(n, m, rank), iff ``(n + m) r rate < n m``; everything else goes uncompressed.
    Returns (sizes of P per compressed tensor, sizes of Q, sizes of the uncompressed tensors)."""
    p, q, rest = [], [], []
    for g in grads:
        n = g.shape[0] if g.dim() > 1 else 0
        m = math.prod(g.shape) // n if n else 0
        r = min(n, m, rank)
        if n and m and (n + m) * r * rate < n * m:
            p.append(n * r)
            q.append(m * r)
        else:
            rest.append(math.prod(g.shape))
    return p, q, rest


def _powersgd(grads: Sequence[torch.Tensor]) -> int:
    # rank 2, start_iter 0: messages "rest", "P", "Q", all fp32
    p, q, rest = _powersgd_split(grads)
    return 4 * (sum(p) + sum(q) + sum(rest))


def _lqsgd(grads: Sequence[torch.Tensor]) -> int:
    # PowerSGD's three buffers, each log-quantized at 8 bits (packed) with one fp32 scale per tensor in
    # it; at one worker (8 bits x 1 < 64) codes and scales are all-gathered once
    return sum(_packed(sum(sizes), 8) + 4 * len(sizes) for sizes in _powersgd_split(grads) if sizes)


def _tq(grads: Sequence[torch.Tensor]) -> int:
    # threshold 0.1, 4 bits: fp32 scale per tensor, the int32 count of kept entries, the kept positions as a
    # 1-bit mask or int32 indices (whichever is fewer bytes), and a 4-bit code per kept entry
    flat = [g.detach().reshape(-1).to("cpu", torch.float32) for g in grads]
    kept = sum(int((x.abs() >= 0.1 * x.abs().max()).sum()) for x in flat if x.abs().max() > 0)
    n = sum(_numels(grads))
    return 4 * len(grads) + 4 + min(_packed(n, 1), 4 * kept) + _packed(kept, 4)


def _rcfed(grads: Sequence[torch.Tensor]) -> range:
    # bits 4, rate 2: fp32 mean and std per tensor (8 T), int32 counts of the K = 16 symbols (64), the
    # int64 stream length (8), and the range-coded level indices under their own empirical model: the
    # empirical entropy n H, at most two 32-bit words more (termination, fixed-point probabilities),
    # in whole 32-bit words
    design = design_quantizer(4, 2.0)  # the quantizer the spec names (public), not a byte count
    thresholds = np.asarray(design.thresholds, dtype=np.float32)
    counts = np.zeros(len(thresholds) + 1)
    for g in grads:
        x = g.detach().reshape(-1).to("cpu", torch.float32)
        z = ((x - x.mean()) / x.std(unbiased=False)).numpy()
        # a value goes to the cell between consecutive thresholds, t_{j-1} < z <= t_j
        counts += np.bincount(np.searchsorted(thresholds, z, side="left"), minlength=len(counts))
    p = counts[counts > 0] / counts.sum()
    entropy_bits = float(counts.sum() * -(p * np.log2(p)).sum())
    side = 8 * len(grads) + 4 * 16 + 8
    low = 4 * math.ceil(entropy_bits / 32)
    high = 4 * math.ceil((entropy_bits + 64) / 32)
    return range(side + low, side + high + 1, 4)


def _laq(grads: Sequence[torch.Tensor]) -> int:
    # 8 bits; a fresh worker always sends: the uint8 flag, the innovation codes packed over all
    # tensors, the fp32 radius
    return 1 + _packed(sum(_numels(grads)), 8) + 4


def _mixedprec(grads: Sequence[torch.Tensor]) -> int:
    # "0-1@4/*@8": tensors 0 and 1 at 4 bits, the others at 8; each tensor's codes start on a byte
    # boundary; one fp32 scale per quantized tensor
    bits = [4 if i <= 1 else 8 for i in range(len(grads))]
    return sum(_packed(n, b) for n, b in zip(_numels(grads), bits)) + 4 * len(grads)


#: name -> bytes of one worker's step on ``grads`` (default spec, fresh instance).
EXPECTED_BYTES: dict[str, Callable[[Sequence[torch.Tensor]], Bytes]] = {
    "none": lambda grads: 4 * sum(_numels(grads)),
    "fp16": lambda grads: 2 * sum(_numels(grads)),
    "noise": lambda grads: 4 * sum(_numels(grads)),
    "topk": _topk,
    "qsgd": _qsgd,
    "signsgd": _signsgd,
    "powersgd": _powersgd,
    "lqsgd": _lqsgd,
    "tq": _tq,
    "rcfed": _rcfed,
    "laq": _laq,
    "mixedprec": _mixedprec,
}


def wire_bytes_error(name: str, sent: int, grads: Sequence[torch.Tensor]) -> str:
    """"" when ``sent`` bytes is what ``name``'s wire format sends for ``grads``, else what differs."""
    want = EXPECTED_BYTES[name](grads)
    ok = sent in want if isinstance(want, range) else sent == want
    if ok:
        return ""
    return f"{name}: sent {sent} bytes, its wire format sends {want}"
