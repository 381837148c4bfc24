"""LQ-SGD: PowerSGD whose factors travel log-quantized (arXiv 2506.17974).

PowerSGD's steps (:class:`~gia_bench.defenses.powersgd.PowerSGD`) with one change at
each exchange: the worker log-quantizes what it sends (DESIGN.md's codec, one fp32 scale
per tensor and factor), and the receivers sum the dequantized values. Codes are not
linear, so they cannot be all-reduced: they are all-gathered (or, for many workers,
reduced chunk-wise after an all-to-all), and the byte counts say so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from gia_bench.comm import Communicator
from gia_bench.defenses.base import check_messages, register
from gia_bench.defenses.codecs import (
    log_dequantize_segments,
    log_quantize_segments,
    pack_bits,
    packed_nbytes,
    segment_ids,
    unpack_bits,
)
from gia_bench.defenses.lowrank import LQSGDSettings, Plan, setting_property
from gia_bench.defenses.powersgd import PowerSGD
from gia_bench.errors import CompressorError

# -- the compressor -----------------------------------------------------------------------------------------


@register("lqsgd")
class LQSGD(PowerSGD):
    """LQ-SGD (arXiv 2506.17974): PowerSGD with P, Q (and the rest) log-quantized on the wire.

    PowerSGD's nine steps, with the exchanges of steps 2, 5 and 8 replaced by:

    a. quantize: the worker log-quantizes the buffer (P, Q or the rest) with one fp32
       scale per tensor (``s = max|x|`` of that tensor's factor; layers differ by orders
       of magnitude, one scale per buffer would flush small layers to zero), packs the
       b-bit codes and sends codes and scales (messages ``"P.codes"``, ``"P.scales"``...);
    b. ``collective=allgather``: every worker's codes and scales are all-gathered and
       each rank dequantizes them and sums **in rank order**, so that every rank holds a
       bit-identical P before orthogonalizing (and an identical warm-start Q);
    c. ``collective=alltoall`` (many workers): the codes go by all-to-all, rank j gets
       chunk j of every worker, sums them in rank order, re-quantizes its chunk (per
       tensor scales) and the re-quantized chunks are all-gathered
       (``"P.reduced.codes"``...). The re-quantization error of Q and of the rest is a
       second error-feedback residual: rank j adds it, mapped to gradient space
       (``P_hat r^T`` for Q), to its own residual, so the feedback stays exact although
       P_hat changes between steps. P's is not fed back: P only chooses the basis.
       ``auto`` takes all-gather while ``bits x workers < 64``: beyond that all-gathering
       b-bit codes costs more than an fp32 ring all-reduce.

    Error feedback: ``e = M - P_hat Q_i^T`` with ``Q_i`` this worker's *dequantized* Q,
    what a receiver reconstructs from this worker's factors; the quantized rest keeps
    ``e = rest - dequantized rest``. So N x (sum of aggregates over steps) + the sum of
    the workers' residuals equals the sum of all gradients (tests/defenses/test_lqsgd.py).

    Receiver and attacker: :meth:`decode` dequantizes and reconstructs as PowerSGD does
    (``P_hat = orth(dequantized P)``, exact at world size 1). :meth:`simulate` quantizes
    with nearest rounding and a straight-through gradient.

    Args:
        rank: matrix_approximation_rank r of the factors (capped at min(n, m) per tensor).
        bits: bits per code, sign included (2..16).
        alpha: curvature of the log codec; larger spends more levels near zero.
        rounding: nearest, or stochastic (unbiased in the log domain u).
        quantize_rest: log-quantize the tensors PowerSGD sends uncompressed (1-D, small).
        collective: allgather, alltoall, or auto (allgather iff bits x workers < 64).
        warm_start: reuse last step's Q (True) or draw a fresh one every step.
        error_feedback: add last step's compression residual to the gradient.
        min_compression_rate: compress a matrix only if it shrinks by more than this factor.
        start_iter: steps of plain fp32 all-reduce before compression starts.
        epsilon: added to column norms in Gram-Schmidt (PyTorch's orthogonalization_epsilon).
        seed: seeds the Q draws (shared by all workers) and the stochastic rounding (per worker).
    """

    def __init__(
        self,
        rank: int = 2,
        bits: int = 8,
        alpha: float = 10.0,
        rounding: Literal["nearest", "stochastic"] = "nearest",
        quantize_rest: bool = True,
        collective: Literal["auto", "allgather", "alltoall"] = "auto",
        warm_start: bool = True,
        error_feedback: bool = True,
        min_compression_rate: float = 2.0,
        start_iter: int = 0,
        epsilon: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.settings = LQSGDSettings(
            rank=rank, warm_start=warm_start, error_feedback=error_feedback,
            min_compression_rate=min_compression_rate, start_iter=start_iter, epsilon=epsilon, seed=seed,
            bits=bits, alpha=alpha, rounding=rounding, quantize_rest=quantize_rest, collective=collective,
            name=self._name(),
        )
        self._init_state()
        self._round_gen: torch.Generator | None = None
        self._segment_cache: dict[tuple[tuple[int, ...], int, str], torch.Tensor] = {}

    bits = setting_property("bits")
    alpha = setting_property("alpha")
    rounding = setting_property("rounding")
    quantize_rest = setting_property("quantize_rest")
    collective = setting_property("collective")

    def collective_for(self, world_size: int) -> str:
        """The collective a step with ``world_size`` workers uses."""
        if self.collective != "auto":
            return self.collective
        return "allgather" if self.bits * world_size < 64 else "alltoall"

    # -- quantization helpers ------------------------------------------------------------------------------
    def _segments(self, sizes: Sequence[int], total: int, device: torch.device) -> torch.Tensor:
        """Segment index of every value of a buffer of ``sizes``, padded with segment 0 up to ``total``."""
        key = (tuple(sizes), total, str(device))
        seg = self._segment_cache.get(key)
        if seg is None:
            seg = F.pad(segment_ids(sizes), (0, total - sum(sizes))).to(device)
            self._segment_cache[key] = seg
        return seg

    def _noise(self, like: torch.Tensor, rank: int) -> torch.Tensor | None:
        if self.rounding != "stochastic":
            return None
        if self._round_gen is None:
            # each worker its own stream, so that the rounding errors of workers are independent
            self._round_gen = torch.Generator()
            self._round_gen.manual_seed(self.seed * 1_000_003 + 7919 * (rank + 1))
        # drawn on the CPU and moved, so CPU and GPU runs round the same way
        return torch.rand(like.shape, generator=self._round_gen).to(like.device)

    def _quantize(self, x: torch.Tensor, seg: torch.Tensor, num_segments: int, rank: int):
        codes, scales = log_quantize_segments(x, seg, num_segments, self.bits, self.alpha, self._noise(x, rank))
        return codes, scales, log_dequantize_segments(codes, scales[seg], self.bits, self.alpha)

    def _dequantize(self, packed: torch.Tensor, scales: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        codes = unpack_bits(packed, self.bits, seg.numel())
        return log_dequantize_segments(codes, scales[seg], self.bits, self.alpha)

    # -- the exchanges -------------------------------------------------------------------------------------
    def _exchange(
        self,
        x: torch.Tensor,
        sizes: Sequence[int],
        tag: str,
        comm: Communicator,
        mean: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum (``mean``: mean) over workers of the quantized ``x``, and this worker's share of it.

        The share is what the receivers reconstruct of this worker's ``x`` (its dequantized
        values), less, on the all-to-all path, the re-quantization error of the chunk this
        rank reduced: that error enters this rank's error-feedback residual, so that the
        sum over workers of shares is exactly N times the aggregate.
        """
        n_workers, S, L = comm.world_size, len(sizes), x.numel()
        seg = self._segments(sizes, L, x.device)
        codes, scales, own = self._quantize(x, seg, S, comm.rank)
        if self.collective_for(n_workers) == "allgather":
            all_codes = comm.all_gather(pack_bits(codes, self.bits), f"{tag}.codes")
            all_scales = comm.all_gather(scales, f"{tag}.scales")
            if n_workers == 1:
                own = own.to(x.dtype)
                return own, own
            total = None
            for j in range(n_workers):  # fixed rank order: the same float sum on every rank
                d = own if j == comm.rank else self._dequantize(all_codes[j], all_scales[j], seg)
                total = d if total is None else total + d
        else:
            total, requant_error = self._alltoall(codes, scales, sizes, tag, comm)
            total, own = total[:L], own - requant_error[:L]
        if mean:
            total = total / n_workers
        return total.to(x.dtype), own.to(x.dtype)

    def _alltoall(
        self, codes: torch.Tensor, scales: torch.Tensor, sizes: Sequence[int], tag: str, comm: Communicator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce-scatter of codes by all-to-all, re-quantize each chunk, all-gather.

        Returns the sum over workers (padded to whole chunks) and the re-quantization
        error of this rank's chunk (zero outside it), in the same units.
        """
        n_workers, rank, S = comm.world_size, comm.rank, len(sizes)
        # chunks of a multiple of 8 codes fall on byte boundaries of the packed stream
        chunk = max(8, math.ceil(codes.numel() / n_workers / 8) * 8)
        total = n_workers * chunk
        seg = self._segments(sizes, total, codes.device)
        packed = pack_bits(F.pad(codes, (0, total - codes.numel())), self.bits)
        received = comm.all_to_all(list(packed.view(n_workers, -1)), f"{tag}.codes")
        all_scales = comm.all_gather(scales, f"{tag}.scales")
        mine = seg[rank * chunk : (rank + 1) * chunk]
        part = None
        for j in range(n_workers):  # rank order
            d = self._dequantize(received[j], all_scales[j], mine)
            part = d if part is None else part + d
        codes2, scales2, sent = self._quantize(part, mine, S, rank)
        all_codes = comm.all_gather(pack_bits(codes2, self.bits), f"{tag}.reduced.codes")
        all_scales2 = comm.all_gather(scales2, f"{tag}.reduced.scales")
        reduced = torch.cat(
            [
                self._dequantize(all_codes[j], all_scales2[j], seg[j * chunk : (j + 1) * chunk])
                for j in range(n_workers)
            ]
        )
        requant_error = torch.zeros_like(reduced)
        requant_error[rank * chunk : (rank + 1) * chunk] = part - sent
        return reduced, requant_error

    def _send_rest(self, rest, comm, plan, keys):
        if not self.quantize_rest:
            return super()._send_rest(rest, comm, plan, keys)
        return self._exchange(rest, plan.rest_sizes(), "rest", comm, mean=True)

    def _send_P(self, P, comm, plan, keys):
        return self._exchange(P, plan.p_sizes(), "P", comm, mean=False)[0]

    def _send_Q(self, Q, comm, plan, keys):
        return self._exchange(Q, plan.q_sizes(), "Q", comm, mean=True)

    # -- the receiver's and the attacker's side ----------------------------------------------------------
    def _sizes(self, tag: str, plan: Plan) -> list[int]:
        return {"P": plan.p_sizes, "Q": plan.q_sizes, "rest": plan.rest_sizes}[tag]()

    def message_values(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """This worker's dequantized P, Q and rest (``{"grads": ...}`` for a warm-up step)."""
        if "grads" in messages:
            return {"grads": messages["grads"].to(torch.float32)}
        plan = self.plan(shapes)
        tags = (["P", "Q"] if plan.groups else []) + (["rest"] if plan.rest else [])
        out: dict[str, torch.Tensor] = {}
        for tag in tags:
            if tag == "rest" and not self.quantize_rest:
                check_messages(messages, ["rest"], "lqsgd")
                out["rest"] = messages["rest"].to(torch.float32).reshape(-1)
                continue
            check_messages(messages, [f"{tag}.codes", f"{tag}.scales"], "lqsgd")
            sizes = self._sizes(tag, plan)
            n = sum(sizes)
            packed = messages[f"{tag}.codes"].reshape(-1)
            scales = messages[f"{tag}.scales"].to(torch.float32).reshape(-1)
            need = packed_nbytes(n, self.bits)
            # the all-to-all layout pads the stream with zero codes to equal chunks
            if packed.dtype != torch.uint8 or packed.numel() < need or scales.numel() != len(sizes):
                raise CompressorError(
                    f"lqsgd: message {tag!r} has {packed.numel()} {packed.dtype} bytes and {scales.numel()} scales; "
                    f"shapes need {need} uint8 bytes and {len(sizes)} scales at bits={self.bits}"
                )
            out[tag] = self._dequantize(packed[:need], scales, self._segments(sizes, n, packed.device))
        return out

    def _simulate_quantize(self, x: torch.Tensor, tag: str, plan: Plan) -> torch.Tensor:
        if tag == "rest" and not self.quantize_rest:
            return x
        sizes = self._sizes(tag, plan)
        seg = self._segments(sizes, x.numel(), x.device)
        codes, scales = log_quantize_segments(x, seg, len(sizes), self.bits, self.alpha)
        q = log_dequantize_segments(codes, scales[seg], self.bits, self.alpha).to(x.dtype)
        return x + (q - x).detach()  # straight-through: rounding has no useful gradient

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["round_gen"] = None if self._round_gen is None else self._round_gen.get_state().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"rng_key", "rng_pos", "rng_has_gauss", "rng_cached_gaussian", "steps", "q", "residuals"}
        if "round_gen" not in state:
            raise CompressorError("lqsgd: state lacks 'round_gen'")
        self._load_common({k: v for k, v in state.items() if k != "round_gen"}, expected)
        self._round_gen = None
        if state["round_gen"] is not None:
            self._round_gen = torch.Generator()
            self._round_gen.set_state(state["round_gen"].clone())
