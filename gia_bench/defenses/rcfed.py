"""RC-FED: rate-constrained quantization with entropy-coded codes (Hamidi & Bereyhi, arXiv 2409.06319).

"Rate-Constrained Quantization for Communication-Efficient Federated Learning":
the gradient is normalized, quantized by a scalar quantizer whose levels minimise
the distortion subject to a target *entropy* of the codes (the rate an entropy
coder achieves), and the codes are entropy-coded. Here:

1. **Normalize** each tensor: ``z = (g - mu) / sigma`` (mean and standard deviation
   of the tensor, sent as fp32; RC-FED's normalization, after which the entries are
   treated as N(0, 1)).
2. **Design** (offline, the same on every worker and on the receiver, from ``bits``
   and ``rate`` alone): an entropy-constrained scalar quantizer with ``K = 2^bits``
   levels for N(0, 1), by Lloyd iterations on the Lagrangian
   ``E[(z - c_j)^2] + lambda * E[-log2 p_j]`` (Chou, Lookabaugh & Gray 1989):
   a value goes to the level minimising ``(z - c_j)^2 - lambda log2 p_j``, which
   makes the cells intervals with thresholds
   ``t_j = (c_j + c_{j+1})/2 + lambda (log2 p_j - log2 p_{j+1}) / (2 (c_{j+1} - c_j))``;
   levels move to their cell's centroid and ``p_j`` to its mass (exact Gaussian
   integrals, no sampling). ``lambda`` is found by bisection as the smallest value
   whose design entropy is at most ``rate`` bits per value (``lambda = 0``, the
   Lloyd-Max quantizer, when that already meets the rate). Cells that empty out are
   dropped, so a low rate uses fewer than ``K`` levels.
3. **Entropy-code** the level indices of all tensors as one stream with
   ``constriction``'s range coder (``stream.queue.RangeEncoder``) under a
   categorical model built from this step's index counts, which are sent
   (``"counts"``, int32, ``K`` values): the coded length then tracks the codes'
   empirical entropy even where real gradients are not Gaussian after normalizing.
   The decoder rebuilds the same model from the counts and inverts the stream exactly.

Messages: ``"stats"`` (fp32, ``[T, 2]`` mean and std per tensor), ``"counts"``
(int32, ``K``), ``"length"`` (int64, the stream's bytes) and ``"stream"`` (uint8,
the range coder's 32-bit words, little-endian). Streams differ in length between
workers, so ``"length"`` is all-gathered first and every worker pads its stream to
the longest; the padding is sent and counted. Bytes on the wire are therefore the
coded length plus ``8 T + 4 K + 8`` bytes of side information (plus padding with
several workers). ``last_coded_rate`` holds the measured bits per value of the last
stream, ``design`` the quantizer (levels, thresholds, design entropy and MSE).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import constriction
import numpy as np
import torch
from scipy.special import ndtr, ndtri

from gia_bench.comm import Communicator
from gia_bench.defenses.base import Compressor, check_messages, flatten, register
from gia_bench.errors import CompressorError, SpecError

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# -- quantizer design (entropy-constrained scalar quantizer for N(0, 1)) ----------------------------


@dataclasses.dataclass(frozen=True)
class ECSQDesign:
    """An entropy-constrained scalar quantizer for N(0, 1).

    ``active`` lists the level indices in use (ascending levels); ``thresholds`` are
    the ``len(active) - 1`` decision thresholds between consecutive active levels.
    """

    bits: int
    rate: float
    lam: float
    levels: tuple[float, ...]  # K reconstruction points (unused ones keep their last position)
    probabilities: tuple[float, ...]  # K design probabilities (0 for unused levels)
    active: tuple[int, ...]
    thresholds: tuple[float, ...]
    entropy: float  # bits per value under N(0, 1)
    distortion: float  # mean squared error under N(0, 1)


def _pdf(t: np.ndarray) -> np.ndarray:
    out = np.zeros_like(t)
    finite = np.isfinite(t)
    out[finite] = _INV_SQRT_2PI * np.exp(-0.5 * t[finite] ** 2)
    return out


def _thresholds(levels: np.ndarray, codelen: np.ndarray, lam: float) -> np.ndarray:
    """Decision thresholds between consecutive levels for the cost (z - c)^2 + lam * codelen."""
    lo, hi = levels[:-1], levels[1:]
    gap = np.maximum(hi - lo, 1e-300)
    return (lo + hi) / 2 + lam * (codelen[1:] - codelen[:-1]) / (2 * gap)


def _ecsq(
    bits: int, lam: float, start: int, iterations: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lloyd iterations of the Lagrangian quantizer at ``lam`` from ``start`` equal-mass levels.

    Returns (levels, probs, active, thresholds); level slots past ``start`` stay unused.
    """
    k = 2**bits
    levels = np.zeros(k)
    levels[:start] = ndtri((np.arange(start) + 0.5) / start)
    probs = np.zeros(k)
    probs[:start] = 1.0 / start
    active = np.arange(start)
    thr = np.zeros(0)
    for _ in range(iterations):
        # drop levels whose cell is empty (thresholds out of order) until the cells are intervals
        while True:
            codelen = -np.log2(probs[active])
            thr = _thresholds(levels[active], codelen, lam) if len(active) > 1 else np.zeros(0)
            edges = np.concatenate([[-np.inf], thr, [np.inf]])
            empty = edges[1:] <= edges[:-1]
            if not empty.any():
                break
            # remove the emptiest offender: the one with the least design probability
            drop = active[empty][np.argmin(probs[active[empty]])]
            probs[drop] = 0.0
            active = active[active != drop]
        cdf = ndtr(edges)
        mass = cdf[1:] - cdf[:-1]
        pdf = _pdf(edges)
        keep = mass > 1e-300
        centroids = np.where(keep, (pdf[:-1] - pdf[1:]) / np.where(keep, mass, 1.0), levels[active])
        new_probs = np.zeros(k)
        new_probs[active] = mass
        change = np.abs(centroids - levels[active]).max(initial=0.0) + np.abs(new_probs - probs).max()
        levels[active] = centroids
        probs = new_probs
        if not keep.all():
            probs[active[~keep]] = 0.0
            active = active[keep]
        if change < 1e-11:
            break
    codelen = -np.log2(probs[active])
    thr = _thresholds(levels[active], codelen, lam) if len(active) > 1 else np.zeros(0)
    return levels, probs, active, thr


def _entropy(probs: np.ndarray) -> float:
    p = probs[probs > 0]
    return float(-(p * np.log2(p)).sum())


def _distortion(levels: np.ndarray, active: np.ndarray, thr: np.ndarray) -> float:
    """E[(z - Q(z))^2] for z ~ N(0, 1), from closed-form truncated moments."""
    edges = np.concatenate([[-np.inf], thr, [np.inf]])
    cdf, pdf = ndtr(edges), _pdf(edges)
    safe = np.where(np.isfinite(edges), edges, 0.0)
    m0 = cdf[1:] - cdf[:-1]
    m1 = pdf[:-1] - pdf[1:]
    m2 = m0 + safe[:-1] * pdf[:-1] - safe[1:] * pdf[1:]
    c = levels[active]
    return float((m2 - 2 * c * m1 + c * c * m0).sum())


@functools.lru_cache(maxsize=64)
def design_quantizer(bits: int, rate: float) -> ECSQDesign:
    """The ``2^bits``-level ECSQ for N(0, 1) with the least distortion at entropy <= ``rate``.

    Deterministic (same inputs, same floats), so the receiver recomputes it from the spec.
    """
    k = 2**bits
    # Two starts, K levels and K-1 (odd: one level at 0, a dead zone), keep the lower Lagrangian:
    # the problem is not convex and a single start can stall in a poor local optimum.
    starts = sorted({k, max(k - 1, 1)})
    feasible: list[tuple[float, tuple]] = []  # (distortion, design) of every design meeting the rate

    def solve(lam: float) -> float:
        best_cost, best_h = math.inf, math.inf
        for start in starts:
            levels, probs, active, thr = _ecsq(bits, lam, start)
            h, d = _entropy(probs), _distortion(levels, active, thr)
            if h <= rate:
                feasible.append((d, (lam, levels, probs, active, thr)))
            if d + lam * h < best_cost:
                best_cost, best_h = d + lam * h, h
        return best_h

    if solve(0.0) > rate:
        lo, hi = 0.0, 0.05
        while solve(hi) > rate:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise SpecError(f"rcfed rate: {rate} bits per value cannot be reached with {bits} bits")
        for _ in range(30):  # bisection on lambda towards the rate
            mid = (lo + hi) / 2
            if solve(mid) <= rate:
                hi = mid
            else:
                lo = mid
    # the least-distortion design seen that meets the rate (ties: the first found)
    best = min(feasible, key=lambda item: item[0])[1]
    lam, levels, probs, active, thr = best
    return ECSQDesign(
        bits=bits,
        rate=rate,
        lam=float(lam),
        levels=tuple(float(v) for v in levels),
        probabilities=tuple(float(v) for v in probs),
        active=tuple(int(a) for a in active),
        thresholds=tuple(float(t) for t in thr),
        entropy=_entropy(probs),
        distortion=_distortion(levels, active, thr),
    )


# -- entropy coder ---------------------------------------------------------------------------------


def _model(counts: np.ndarray):
    # Integer counts as float64 are exact, so encoder and decoder build the identical fixed-point model.
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def entropy_encode(symbols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Range-code ``symbols`` (ints in ``[0, len(counts))``) under the counts' model; uint8 bytes."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    if symbols.size == 0:
        return np.zeros(0, dtype=np.uint8)
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(symbols, _model(counts))
    words = encoder.get_compressed()
    return np.ascontiguousarray(words.astype("<u4")).view(np.uint8)


def entropy_decode(stream: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`entropy_encode`: the ``n`` symbols (int64)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    stream = np.ascontiguousarray(stream, dtype=np.uint8)
    if stream.size % 4:
        raise CompressorError(f"rcfed: stream of {stream.size} bytes is not whole 32-bit words")
    words = stream.view("<u4").astype(np.uint32)
    decoder = constriction.stream.queue.RangeDecoder(words)
    return decoder.decode(_model(counts), n).astype(np.int64)


# -- the compressor ----------------------------------------------------------------------------------


@register("rcfed")
class RCFED(Compressor):
    """Rate-constrained quantization, entropy-coded with a range coder (Hamidi & Bereyhi, RC-FED).

    Args:
        bits: log2 of the number of quantizer levels (1..8); the code alphabet has 2^bits symbols.
        rate: target entropy in bits per value; the levels minimise the MSE on N(0, 1) subject to
            it (the coded stream tracks the codes' empirical entropy, reported as last_coded_rate).
    """

    supports_simulate = True

    def __init__(self, bits: int = 4, rate: float = 2.0) -> None:
        if not 1 <= bits <= 8:
            raise SpecError(f"rcfed bits: must be in 1..8, got {bits}")
        if not rate > 0:
            raise SpecError(f"rcfed rate: must be > 0 bits per value, got {rate}")
        self.bits = int(bits)
        self.rate = float(rate)
        self.design = design_quantizer(self.bits, self.rate)
        self._levels = torch.tensor(self.design.levels, dtype=torch.float32)
        self._thresholds = torch.tensor(self.design.thresholds, dtype=torch.float32)
        self._active = torch.tensor(self.design.active, dtype=torch.int64)
        #: measured bits per value of the last coded stream (without side information)
        self.last_coded_rate = float("nan")

    # -- codec ----------------------------------------------------------------------------------
    @staticmethod
    def _stats(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return torch.zeros(2)
        return torch.stack([x.mean(), x.std(unbiased=False)]).to(torch.float32)

    def _quantize(self, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """Level indices of ``x`` (flat fp32) under the design, after normalizing by ``stats``."""
        mu, sigma = stats[0], stats[1]
        z = (x - mu) / torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        cell = torch.bucketize(z, self._thresholds.to(x.device))
        return self._active.to(x.device)[cell]

    def _reconstruct(self, codes: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        return self._levels.to(codes.device)[codes] * stats[1] + stats[0]

    def _decode_worker(
        self, stats: torch.Tensor, counts: torch.Tensor, stream: torch.Tensor, shapes: Sequence[torch.Size]
    ) -> list[torch.Tensor]:
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        total = sum(sizes)
        counts_np = counts.detach().cpu().to(torch.int64).numpy()
        if len(counts_np) != 2**self.bits or int(counts_np.sum()) != total:
            raise CompressorError(
                f"rcfed: counts ({len(counts_np)} symbols, {int(counts_np.sum())} values) do not fit"
                f" {2**self.bits} symbols and {total} values"
            )
        codes = torch.from_numpy(entropy_decode(stream.detach().cpu().numpy(), counts_np, total))
        stats = stats.detach().cpu().to(torch.float32).reshape(-1, 2)
        if stats.shape[0] != len(shapes):
            raise CompressorError(f"rcfed: stats for {stats.shape[0]} tensors, expected {len(shapes)}")
        return [
            self._reconstruct(c, s).reshape(shape)
            for c, s, shape in zip(torch.split(codes, sizes), stats, shapes)
        ]

    # -- worker --------------------------------------------------------------------------------
    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        if not grads:  # nothing to send: every rank sees the same empty list
            return []
        shapes = [g.shape for g in grads]
        device = grads[0].device if grads else torch.device("cpu")
        flat = [g.detach().to(torch.float32).reshape(-1).cpu() for g in grads]
        stats = torch.stack([self._stats(x) for x in flat]) if flat else torch.zeros(0, 2)
        codes = torch.cat([self._quantize(x, s) for x, s in zip(flat, stats)]) if flat else torch.zeros(0, dtype=torch.int64)
        counts = torch.bincount(codes, minlength=2**self.bits).to(torch.int32)
        stream = torch.from_numpy(entropy_encode(codes.numpy(), counts.numpy()).copy())
        self.last_coded_rate = 8 * stream.numel() / max(codes.numel(), 1)

        n = comm.world_size
        all_stats = comm.all_gather(stats, "stats")
        all_counts = comm.all_gather(counts, "counts")
        lengths = comm.all_gather(torch.tensor([stream.numel()], dtype=torch.int64), "length")
        longest = max(int(t.item()) for t in lengths)
        padded = torch.cat([stream, torch.zeros(longest - stream.numel(), dtype=torch.uint8)])
        all_streams = comm.all_gather(padded, "stream")
        decoded = [
            self._decode_worker(s, c, st[: int(ln.item())], shapes)
            for s, c, st, ln in zip(all_stats, all_counts, all_streams, lengths)
        ]
        out = []
        for i, g in enumerate(grads):
            total = decoded[0][i].clone()
            for w in decoded[1:]:
                total += w[i]
            out.append(total.div_(n).to(g.dtype).to(device))
        return out

    # -- receiver ------------------------------------------------------------------------------
    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        check_messages(messages, ["stats", "counts", "length", "stream"], "rcfed")
        length = int(messages["length"].reshape(-1)[0])
        stream = messages["stream"].reshape(-1)
        if not 0 <= length <= stream.numel():
            raise CompressorError(f"rcfed: length {length} does not fit a stream of {stream.numel()} bytes")
        return self._decode_worker(messages["stats"], messages["counts"], stream[:length], shapes)

    def decode_codes(self, messages: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        """The level indices in the stream (what the entropy coder carried), int64."""
        check_messages(messages, ["counts", "length", "stream"], "rcfed")
        length = int(messages["length"].reshape(-1)[0])
        stream = messages["stream"].reshape(-1)[:length].cpu().numpy()
        return torch.from_numpy(entropy_decode(stream, messages["counts"].cpu().to(torch.int64).numpy(), n))

    # -- compressor-aware attacker ----------------------------------------------------------------
    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        return {"grads": flatten(self.decode(messages, shapes, public))}

    def simulate(self, grads, messages, public=None) -> dict[str, torch.Tensor]:
        """Normalize, quantize with the design, reconstruct: exactly the worker's map, straight-through."""
        parts = []
        for g in grads:
            x = g.reshape(-1).to(torch.float32)
            stats = self._stats(x.detach())
            q = self._reconstruct(self._quantize(x.detach(), stats), stats.to(x.device))
            parts.append(x + (q - x).detach())
        return {"grads": torch.cat(parts) if parts else torch.zeros(0)}

    def state_dict(self) -> dict[str, Any]:
        return {}
