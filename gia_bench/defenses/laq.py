"""LAQ: Lazily Aggregated Quantized gradients (Sun, Chen, Giannakis, Yang, NeurIPS 2019).

"Communication-Efficient Distributed Learning via Lazily Aggregated Quantized
Gradients" (arXiv 1909.07588). Each worker m keeps ``Q_m``, the quantized gradient
it sent last; the receiver keeps the same stale copy. At step k:

1. Quantize the innovation on the radius ``R = ||g - Q_m||_inf`` with ``b`` bits
   (their quantizer, Eq. 3-4): with ``tau = 1/(2^b - 1)``,
   ``q = floor((g - Q_m + R) / (2 tau R) + 1/2)`` in ``{0, ..., 2^b - 1}`` and
   ``dQ = 2 tau R q - R``, so ``Q(g) = Q_m + dQ`` and ``|Q(g) - g| <= tau R`` entrywise.
2. Skip rule (their Eq. 7, as in the authors' code): the worker stays silent when

       ||dQ||^2 < (1 / (alpha^2 M^2)) sum_{d=1}^{D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2
                  + 3 (||eps^k||^2 + ||eps_hat||^2)

   and it has skipped fewer than ``max_skip`` rounds in a row; ``eps^k = Q(g) - g``
   and ``eps_hat`` is the error of the last sent ``Q_m``. A sent round replaces
   ``Q_m`` by ``Q(g)``; a skipped one leaves the receiver's stale ``Q_m`` in use.
3. Every worker (and the receiver) updates the aggregate with the innovations that
   were sent and steps with ``(1/M) sum_m Q_m``.

The compressor never sees the model, so the model changes come from the aggregates
it returned: with plain SGD at any learning rate alpha, ``theta^{k+1} - theta^k =
-alpha sum_m Q_m = -alpha M * mean``, so the bracket is exactly ``sum_d xi_d
||mean^{k-d}||^2`` and no learning rate is needed (with momentum or weight decay
this is the estimate from the gradient part of the step). As in the authors' code
``xi_d = threshold / D'`` with ``D'`` the number of past steps on record (at most
``memory``). The first round always sends (the receiver has no copy yet).

Messages (fixed tags):

* ``"flag"`` (uint8, 1 value): 1 when this worker sends this round. It is always
  sent, so a skipped round costs 1 byte, not 0: in an all-gather every worker must
  learn who is silent, and a record shows the skip. (With a parameter server that
  treats silence as a skip the byte could be saved; we count what we send.)
* ``"codes"`` (uint8, the innovation codes packed ``b`` bits each, one stream over
  all tensors) and ``"radius"`` (fp32, ``R``): only when some worker sends. In a
  multi-worker all-gather a silent worker still takes part with a zero buffer
  (counted: the collective moves it); with one worker a skipped round is the flag alone.

The receiver's stale copy ``Q_m`` before the step is public (:meth:`LAQ.public_state`,
``"last"``), so :meth:`LAQ.decode` returns what the receiver actually has: the stale
gradient on a skipped round (nothing new leaks), ``Q_m + dQ`` on a sent one (the
innovation leaks). ``rounds_sent`` / ``rounds_skipped`` count this worker's rounds.

State is kept per group of keys (one group per distinct ``keys`` list), so a DDP
hook that calls :meth:`LAQ.step` bucket by bucket makes the skip decision per bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from gia_bench.comm import Communicator
from gia_bench.defenses.base import Compressor, check_messages, flatten, register, resolve_keys, unflatten
from gia_bench.defenses.codecs import pack_bits, packed_nbytes, unpack_bits
from gia_bench.errors import CompressorError, SpecError


@dataclasses.dataclass
class _Group:
    """LAQ state of one group of tensors (one ``keys`` list)."""

    keys: list[Hashable]
    peers: torch.Tensor  # [world_size, numel]: every worker's last sent Q (the stale copies)
    eps_last_sq: float = 0.0  # ||eps_hat||^2 of this worker's last sent Q
    skips: int = 0  # consecutive skipped rounds of this worker
    history: list[float] = dataclasses.field(default_factory=list)  # ||mean^{k-d}||^2, newest last


def laq_quantize(innovation: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in ``[0, 2^b)`` and radius ``R = max|innovation|`` (Sun et al. 2019, Eq. 3)."""
    top = 2**bits - 1
    radius = innovation.abs().max() if innovation.numel() else torch.zeros((), device=innovation.device)
    step = 2 * radius / top
    safe = torch.where(step > 0, step, torch.ones_like(step))
    # the narrowest integer type holding the codes: one byte per entry at the default 8 bits
    dtype = torch.uint8 if bits <= 8 else torch.int32
    codes = torch.floor((innovation + radius) / safe + 0.5).clamp_(0, top).to(dtype)
    return codes, radius.to(torch.float32).reshape(1)


def laq_dequantize(codes: torch.Tensor, radius: torch.Tensor, bits: int) -> torch.Tensor:
    """The innovation ``dQ = 2 tau R q - R`` (Sun et al. 2019, Eq. 4)."""
    top = 2**bits - 1
    r = radius.to(torch.float32).reshape(())
    return codes.to(torch.float32) * (2 * r / top) - r


@register("laq")
class LAQ(Compressor):
    """Lazily Aggregated Quantized gradients: quantized innovations, silent rounds skipped (Sun et al. 2019).

    Args:
        bits: bits per innovation code (the paper's b).
        threshold: xi, total weight of the recent model changes in the skip rule (Eq. 7); 0 makes
            the rule skip only when the innovation is below the quantization error. The authors'
            code uses 0.8.
        memory: D, how many past model changes the skip rule weighs.
        max_skip: force a send after this many consecutive skipped rounds (the paper's t-bar;
            0 turns skipping off, giving plain quantized-innovation SGD).
    """

    supports_simulate = True

    def __init__(self, bits: int = 8, threshold: float = 0.8, memory: int = 10, max_skip: int = 100) -> None:
        if not 1 <= bits <= 16:
            raise SpecError(f"laq bits: must be in 1..16, got {bits}")
        if threshold < 0:
            raise SpecError(f"laq threshold: must be >= 0, got {threshold}")
        if memory < 1:
            raise SpecError(f"laq memory: must be >= 1, got {memory}")
        if max_skip < 0:
            raise SpecError(f"laq max_skip: must be >= 0, got {max_skip}")
        self.bits = int(bits)
        self.threshold = float(threshold)
        self.memory = int(memory)
        self.max_skip = int(max_skip)
        self._groups: dict[tuple, _Group] = {}
        self._public: dict[str, torch.Tensor] = {}
        #: rounds this worker sent / skipped (over all groups), and whether the last step sent
        self.rounds_sent = 0
        self.rounds_skipped = 0
        self.last_sent = False

    # -- worker --------------------------------------------------------------------------------
    def skip_bound(self, group: _Group, eps_sq: float) -> float:
        """Right-hand side of the skip rule (Eq. 7) with the model changes taken from past aggregates."""
        recent = group.history[-self.memory :]
        changes = self.threshold / len(recent) * sum(recent) if recent else 0.0
        return changes + 3.0 * (eps_sq + group.eps_last_sq)

    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        if not grads:  # nothing to send: every rank sees the same empty list
            return []
        keys = resolve_keys(grads, keys)
        shapes = [g.shape for g in grads]
        g = flatten(grads).detach().to(torch.float32)
        n, rank = comm.world_size, comm.rank
        gkey = tuple(keys)
        group = self._groups.get(gkey)
        first = group is None
        if group is None:
            group = _Group(list(keys), torch.zeros(n, g.numel(), device=g.device))
            self._groups[gkey] = group
        if group.peers.shape != (n, g.numel()):
            raise CompressorError(
                f"laq: state holds {tuple(group.peers.shape)} (workers, values) for these tensors,"
                f" the step has {n} workers and {g.numel()} values"
            )
        last = group.peers[rank]
        self._public = {"last": last.detach().cpu().clone()}

        codes, radius = laq_quantize(g - last, self.bits)
        dq = laq_dequantize(codes, radius, self.bits)
        q = last + dq
        dq_sq = float(dq.pow(2).sum())
        eps_sq = float((q - g).pow(2).sum())
        send = first or group.skips >= self.max_skip or dq_sq >= self.skip_bound(group, eps_sq)

        flags = comm.all_gather(torch.tensor([int(send)], dtype=torch.uint8, device=g.device), "flag")
        if any(int(f.item()) for f in flags):
            nbytes = packed_nbytes(g.numel(), self.bits)
            packed = pack_bits(codes, self.bits) if send else torch.zeros(nbytes, dtype=torch.uint8, device=g.device)
            all_codes = comm.all_gather(packed, "codes")
            all_radius = comm.all_gather(radius if send else torch.zeros_like(radius), "radius")
            for m, flag in enumerate(flags):
                if int(flag.item()):
                    # this worker's own innovation is the dq above (same codes, same radius): no unpacking
                    dq_m = dq if m == rank else laq_dequantize(
                        unpack_bits(all_codes[m].reshape(-1), self.bits, g.numel(), torch.int32),
                        all_radius[m],
                        self.bits,
                    )
                    group.peers[m].add_(dq_m.to(group.peers.device))

        if send:
            group.eps_last_sq, group.skips = eps_sq, 0
            self.rounds_sent += 1
        else:
            group.skips += 1
            self.rounds_skipped += 1
        self.last_sent = send

        mean = _mean_rows(group.peers)
        group.history.append(float(mean.pow(2).sum()))
        del group.history[: -self.memory]
        return [t.to(x.dtype) for t, x in zip(unflatten(mean, shapes), grads)]

    # -- receiver ------------------------------------------------------------------------------
    def public_state(self) -> dict[str, torch.Tensor]:
        """``"last"``: the receiver's stale copy of this worker's quantized gradient before the step."""
        return dict(self._public)

    def _last(self, shapes: Sequence[torch.Size], public: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        if public is None or "last" not in public:
            raise CompressorError("laq: decoding needs public['last'], the receiver's stale copy of the gradient")
        last = public["last"].reshape(-1).to(torch.float32)
        total = sum(int(torch.Size(s).numel()) for s in shapes)
        if last.numel() != total:
            raise CompressorError(f"laq: public['last'] has {last.numel()} values, the shapes need {total}")
        return last

    @staticmethod
    def sent(messages: Mapping[str, torch.Tensor]) -> bool:
        """Whether the worker sent an innovation in these messages (False: a skipped round)."""
        check_messages(messages, ["flag"], "laq")
        return bool(int(messages["flag"].reshape(-1)[0]))

    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """What the receiver has: the stale ``Q_m`` on a skipped round, ``Q_m + dQ`` on a sent one."""
        last = self._last(shapes, public)
        if not self.sent(messages):
            return unflatten(last.clone(), shapes)
        check_messages(messages, ["codes", "radius"], "laq")
        # 8 bits or fewer: the codes stay bytes until the float conversion (no int32/int64 copy)
        dtype = torch.uint8 if self.bits <= 8 else torch.int32
        codes = unpack_bits(messages["codes"].reshape(-1), self.bits, last.numel(), dtype)
        return unflatten(last + laq_dequantize(codes, messages["radius"], self.bits), shapes)

    # -- compressor-aware attacker ----------------------------------------------------------------
    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        if not self.sent(messages):
            raise CompressorError("laq: skipped round: the messages carry nothing about this step's gradient")
        return {"grads": flatten(self.decode(messages, shapes, public))}

    def simulate(self, grads, messages, public=None) -> dict[str, torch.Tensor]:
        """``Q_m + dQ(g)`` for a candidate ``g`` on the observed stale copy, straight-through."""
        if not self.sent(messages):
            raise CompressorError("laq: skipped round: the messages carry nothing about this step's gradient")
        g = flatten(grads).to(torch.float32)
        last = self._last([t.shape for t in grads], public).to(g.device)
        codes, radius = laq_quantize((g - last).detach(), self.bits)
        q = last + laq_dequantize(codes, radius, self.bits)
        return {"grads": g + (q - g).detach()}

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": [
                {
                    "keys": list(gr.keys),
                    "peers": gr.peers.detach().cpu().clone(),
                    "eps_last_sq": gr.eps_last_sq,
                    "skips": gr.skips,
                    "history": list(gr.history),
                }
                for gr in self._groups.values()
            ],
            "rounds_sent": self.rounds_sent,
            "rounds_skipped": self.rounds_skipped,
            "last_sent": self.last_sent,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - {"groups", "rounds_sent", "rounds_skipped", "last_sent"}
        if unknown:
            raise CompressorError(f"laq: unexpected state keys {sorted(unknown)}")
        self._groups = {}
        for gr in state.get("groups", []):
            group = _Group(
                list(gr["keys"]),
                gr["peers"].clone().to(torch.float32),
                float(gr["eps_last_sq"]),
                int(gr["skips"]),
                [float(h) for h in gr["history"]],
            )
            self._groups[tuple(group.keys)] = group
        self.rounds_sent = int(state.get("rounds_sent", 0))
        self.rounds_skipped = int(state.get("rounds_skipped", 0))
        self.last_sent = bool(state.get("last_sent", False))


def _mean_rows(rows: torch.Tensor) -> torch.Tensor:
    """Mean of the rows summed in rank order (every worker gets the same bits)."""
    if rows.shape[0] == 1:  # x / 1 == x: a copy is all it takes
        return rows[0].clone()
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total.div_(rows.shape[0])
