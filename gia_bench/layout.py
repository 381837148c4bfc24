"""The layout a record's messages must have: what its defense sends at its step, with its workers.

A record says which defense sent its messages, at which optimizer step, and (from a training
run) with how many workers and from which rank. All of it comes from the file, so none of it
is taken on trust: :func:`check_layout` refuses a record whose messages are not what a
compressor of the claimed spec sends there, whatever the step and world size. Without it a
plain fp32 gradient relabelled ``lqsgd:rank=100000`` at step 1, or 8-bit LQ-SGD codes
relabelled ``bits=4``, decodes, and its result reports that defense at the wrong bytes.

How the expected layout is found. A fresh compressor of the claimed spec takes one step on
random gradients of the record's shapes, keyed by its parameter names (as capture and the DDP
hook key them), through a :class:`MirrorCommunicator`: the claimed world size seen from the
claimed rank, every other worker sending what this one sends. Tags, collectives, dtypes and the
shapes that do not depend on the data come out of that step, and so does the public state's
layout. What the step alone cannot know is declared per defense family in :data:`FAMILIES`:

* the step: PowerSGD and LQ-SGD send plain fp32 gradients for their first ``start_iter`` steps
  and factors after (warm-started from the previous Q, which the record holds as public
  ``Q_init`` and which the check sizes against the spec's plan); LAQ may skip a round after its
  first, sending only its flag;
* the data: threshold quantization sends its kept positions as a bitmap or as indices and as
  many codes as it kept; RC-FED's entropy-coded stream is as long as the data makes it. Their
  sizes are checked against the messages' own counts by the content checks of
  :data:`gia_bench.receiver.MESSAGE_CHECKS`;
* the world size: only LQ-SGD's layout depends on how many workers there are (``auto`` picks
  all-gather or all-to-all from ``bits x workers``; all-to-all chunks follow the count), so only
  LQ-SGD is simulated with the claimed count. The other families' messages are this worker's own
  tensors (all-gather) or sums (all-reduce), the same for two workers as for thousands, and they
  are simulated with at most two: one extra worker shows every multi-worker message (LAQ's silent
  flag, PowerSGD's summed ``P_sum``) without decoding thousands of copies (LAQ keeps one per worker).

A record of a compressor's first step (step 0) is also held to the public state that does not
depend on the gradient (a seeded ``Q_init``, LAQ's zero ``last``, the bit widths of mixed
precision): found as what two fresh steps on different gradients agree on.

Bytes: a capture or a federated client counts a message's payload
(:class:`~gia_bench.comm.LocalCommunicator`); a training run counts what its ring collectives
send with ``world_size`` workers (:func:`~gia_bench.comm.ring_wire_bytes`). Every message's
``nbytes`` and the record's ``bytes_sent`` must be exactly that, so a result cannot report a
defense at bytes its messages do not take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from gia_bench.comm import Communicator, Message, ring_wire_bytes
from gia_bench.defenses import create
from gia_bench.defenses.codecs import packed_nbytes
from gia_bench.errors import GiaBenchError, RecordError
from gia_bench.records import GradientRecord
from gia_bench.registry import parse_spec

#: Errors a (possibly third-party) compressor may raise when it cannot run on these shapes: a record problem.
PLUGIN_ERRORS = (GiaBenchError, RuntimeError, ValueError, TypeError, IndexError, KeyError, NotImplementedError)
#: Workers simulated for a family whose layout does not depend on their number beyond the second.
_FEW_WORKERS = 2
#: Tolerance of the step-0 public state (a Q drawn on the CPU and orthogonalized on a GPU differs in the last bits).
_PUBLIC_RTOL, _PUBLIC_ATOL = 1e-4, 1e-5


@dataclasses.dataclass(frozen=True)
class Wire:
    """One message as far as its layout goes; ``shape`` None where its length depends on the data."""

    tag: str
    op: str
    dtype: str
    shape: tuple[int, ...] | None

    @classmethod
    def of_info(cls, info: Mapping[str, Any]) -> Wire:
        """A record's message description (``op`` defaults as :func:`gia_bench.records.check_meta_json` has it)."""
        return cls(str(info["tag"]), str(info.get("op", "all_reduce")), str(info["dtype"]), tuple(info["shape"]))

    @classmethod
    def of_message(cls, m: Message) -> Wire:
        return cls(m.tag, m.op, str(m.dtype).removeprefix("torch."), tuple(m.shape))

    def accepts(self, other: Wire) -> bool:
        same = (self.tag, self.op, self.dtype) == (other.tag, other.op, other.dtype)
        return same and (self.shape is None or self.shape == other.shape)

    def __str__(self) -> str:
        shape = "[*]" if self.shape is None else list(self.shape)
        return f"{self.tag} {self.dtype}{shape}"


@dataclasses.dataclass(frozen=True)
class Expected:
    """One layout a compressor of the claimed spec may send at the record's step, with its public state."""

    wires: tuple[Wire, ...]
    public: dict[str, torch.Tensor]
    when: str  # which case of the family this is, for the error message
    overrides: tuple[tuple[str, Any], ...] = ()  # spec overrides the run used (to repeat it)

    def matches(self, wires: tuple[Wire, ...]) -> bool:
        return len(wires) == len(self.wires) and all(w.accepts(h) for w, h in zip(self.wires, wires))

    def describe(self) -> str:
        return ", ".join(str(w) for w in self.wires)


class MirrorCommunicator(Communicator):
    """``world_size`` workers seen from ``rank``, every other worker sending what this one sends.

    Enough to see a layout: a collective's shape and dtype are the same on every worker, so the
    messages this worker logs are the ones it logs among real workers with other gradients
    (except lengths that depend on the data, which :data:`FAMILIES` declares).
    """

    def __init__(self, world_size: int, rank: int) -> None:
        super().__init__(record=False)
        self.world_size, self.rank = world_size, rank

    def wire_bytes(self, op: str, payload: int) -> int:
        return payload  # bytes are checked from the record's own payloads (check_layout)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.mul_(self.world_size)

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor] * self.world_size

    def _all_to_all(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        return [chunks[self.rank]] * self.world_size


@dataclasses.dataclass(frozen=True)
class LayoutContext:
    """A record's claims, and fresh steps of its defense under them."""

    record: GradientRecord
    where: Path | str
    world_size: int  # claimed (extra.world_size, 1 when absent)
    rank: int  # claimed (extra.rank, 0 when absent)
    #: how many steps the record's compressor may have taken before this one: exactly ``step`` in a
    #: capture or training run; 0 to ``step`` for a Flower client, which need not be sampled every round
    steps_before: tuple[int, int]
    exact_world: bool  # simulate the claimed number of workers (else at most _FEW_WORKERS)

    @property
    def spec(self) -> str:
        return self.record.meta.defense

    def compressor(self, **overrides: Any) -> Any:
        try:
            return create(self.spec, **overrides)
        except PLUGIN_ERRORS as exc:
            raise RecordError(f"{self.where}: defense {self.spec!r} cannot be built ({exc})") from None

    def run(
        self, seed: int = 0, solo: bool = False, **overrides: Any
    ) -> tuple[tuple[Wire, ...], dict[str, torch.Tensor]]:
        """The messages and public state of one fresh step on N(0, 1) gradients drawn from ``seed``
        (``solo``: as one worker, whatever the record claims)."""
        world = self.world_size if self.exact_world else min(self.world_size, _FEW_WORKERS)
        world = 1 if solo else world
        comm = MirrorCommunicator(world, min(self.rank, world - 1))
        gen = torch.Generator().manual_seed(seed)
        grads = [torch.randn(s, generator=gen) for s in self.record.param_shapes]
        compressor = self.compressor(**overrides)
        try:
            compressor.step(grads, comm, keys=list(self.record.meta.param_names))
            public = {k: v.detach().cpu() for k, v in compressor.public_state().items()}
        except PLUGIN_ERRORS as exc:
            raise RecordError(f"{self.where}: defense {self.spec!r} cannot run on this model ({exc})") from None
        return tuple(Wire.of_message(m) for m in comm.messages), public

    def fresh(self, when: str = "its step", **overrides: Any) -> Expected:
        wires, public = self.run(**overrides)
        return Expected(wires, public, when, tuple(sorted(overrides.items())))


# -- what each family may send at a step -------------------------------------------------------------


def _default(ctx: LayoutContext) -> list[Expected]:
    """A compressor whose layout is the same at every step: a fresh one's."""
    return [ctx.fresh()]


def _powersgd(ctx: LayoutContext) -> list[Expected]:
    """PowerSGD / LQ-SGD: fp32 ``grads`` for the first ``start_iter`` steps, factors after."""
    start = int(ctx.compressor().start_iter)
    lo, hi = ctx.steps_before
    if start == 0:
        return [ctx.fresh("a compressed step")]
    out = []
    if lo < start:
        out.append(ctx.fresh(f"a warm-up step (fewer than start_iter={start} steps before)"))
    if hi >= start:
        out.append(ctx.fresh(f"a compressed step (start_iter={start} steps before)", start_iter=0))
    return out


def _laq(ctx: LayoutContext) -> list[Expected]:
    """LAQ: the first round always sends; a later one may be skipped (its flag alone)."""
    sent = ctx.fresh("a sent round")
    if ctx.steps_before[1] == 0:
        return [sent]
    flag = tuple(w for w in sent.wires if w.tag == "flag")
    return [sent, Expected(flag, sent.public, "a skipped round")]


def _tq(ctx: LayoutContext) -> list[Expected]:
    """Threshold quantization: positions as a bitmap or as int32 indices, as many codes as were kept."""
    run = ctx.fresh()
    n = sum(int(torch.Size(s).numel()) for s in ctx.record.param_shapes)
    out = []
    for tag, dtype, shape in (("mask", "uint8", (packed_nbytes(n, 1),)), ("indices", "int32", None)):
        wires = tuple(
            dataclasses.replace(w, tag=tag, dtype=dtype, shape=shape) if w.tag in ("mask", "indices")
            else dataclasses.replace(w, shape=None) if w.tag == "codes" else w
            for w in run.wires
        )  # fmt: skip
        out.append(Expected(wires, run.public, f"kept positions as {tag}"))
    return out


def _rcfed(ctx: LayoutContext) -> list[Expected]:
    """RC-FED: the entropy-coded stream is as long as the data makes it (``length`` says how long)."""
    run = ctx.fresh()
    wires = tuple(dataclasses.replace(w, shape=None) if w.tag == "stream" else w for w in run.wires)
    return [Expected(wires, run.public, run.when)]


@dataclasses.dataclass(frozen=True)
class Family:
    """What a fresh step cannot tell about a defense family: its layouts at a step, and whether
    they depend on the exact number of workers."""

    layouts: Callable[[LayoutContext], list[Expected]] = _default
    exact_world: bool = False


#: Registry name -> what :func:`check_layout` must know beyond a fresh step (absent: :class:`Family()`:
#: the layout of a fresh compressor, at every step; a plugin whose layout changes registers here).
FAMILIES: dict[str, Family] = {
    "powersgd": Family(_powersgd),
    "lqsgd": Family(_powersgd, exact_world=True),
    "laq": Family(_laq),
    "tq": Family(_tq),
    "rcfed": Family(_rcfed),
}


# -- the check ------------------------------------------------------------------------------------------


def layout_context(record: GradientRecord, where: Path | str) -> LayoutContext:
    meta = record.meta
    family = FAMILIES.get(parse_spec(meta.defense).name, Family())
    step = meta.step
    federated = meta.extra.get("source") == "federated"
    return LayoutContext(
        record, where, int(meta.extra.get("world_size", 1)), int(meta.extra.get("rank", 0)),
        (0 if federated else step, step), family.exact_world,
    )  # fmt: skip


def check_layout(record: GradientRecord, where: Path | str) -> Expected:
    """Refuse (one :class:`RecordError`) a record whose messages, public state or bytes are not what
    its defense sends at its step with its workers; returns the layout it matched."""
    ctx = layout_context(record, where)
    meta = record.meta
    family = FAMILIES.get(parse_spec(meta.defense).name, Family())
    candidates = family.layouts(ctx)
    have = tuple(Wire.of_info(m) for m in meta.messages)
    match = next((c for c in candidates if c.matches(have)), None)
    if match is None:
        at = f"step {meta.step}" + (f" with {ctx.world_size} workers" if ctx.world_size > 1 else "")
        want = " or ".join(f"[{c.describe()}] ({c.when})" for c in candidates)
        raise RecordError(
            f"{where}: messages [{', '.join(map(str, have))}] are not what defense {meta.defense!r} sends at {at}:"
            f" {_cut(want, 400)}"
        )
    _check_public(ctx, match)
    _check_bytes(ctx)
    return match


def _check_public(ctx: LayoutContext, match: Expected) -> None:
    """The record's public state has the keys and sizes the defense's step leaves; at a first step,
    the values that do not depend on the gradient too."""
    record, where = ctx.record, ctx.where
    have, want = record.public, match.public
    if set(have) != set(want):
        raise RecordError(
            f"{where}: public state {sorted(have)} is not what defense {record.meta.defense!r} leaves"
            f" at this step ({sorted(want)})"
        )
    for key, ref in want.items():
        got = have[key]
        if got.numel() != ref.numel() or got.is_floating_point() != ref.is_floating_point():
            raise RecordError(
                f"{where}: public {key!r} is {got.dtype} with {got.numel()} values; defense"
                f" {record.meta.defense!r} on this model leaves {ref.dtype} with {ref.numel()}"
            )
    if ctx.steps_before[1] != 0 or not want:
        return
    # What two single workers with different gradients agree on does not depend on the gradient. Not
    # among mirrored workers: their aggregates (P_sum) are copies of one gradient's, not a real sum.
    overrides = dict(match.overrides)
    first = want if ctx.world_size == 1 else ctx.run(seed=0, solo=True, **overrides)[1]
    _, other = ctx.run(seed=1, solo=True, **overrides)
    for key, ref in first.items():
        if key not in want or key not in other or not torch.equal(other[key], ref):
            continue  # depends on the gradient (or only a multi-worker step has it)
        got = have[key].reshape(ref.shape).to(ref.dtype)
        same = torch.allclose(got, ref, rtol=_PUBLIC_RTOL, atol=_PUBLIC_ATOL) if ref.is_floating_point() else (
            torch.equal(got, ref))  # fmt: skip
        if not same:
            raise RecordError(
                f"{where}: public {key!r} is not what defense {record.meta.defense!r} starts from at step 0"
                " (it does not depend on the gradient)"
            )


def _check_bytes(ctx: LayoutContext) -> None:
    """Every message's ``nbytes`` and ``bytes_sent`` are what the record's communicator counts."""
    record, where = ctx.record, ctx.where
    ring = record.meta.extra.get("source") == "train"
    total = 0
    for info in record.meta.messages:
        t = record.messages[info["tag"]]
        payload = t.numel() * t.element_size()
        op = info.get("op", "all_reduce")
        want = ring_wire_bytes(op, payload, ctx.world_size) if ring else payload
        if "nbytes" in info and info["nbytes"] != want:
            how = f"{op} of {payload} bytes among {ctx.world_size} workers" if ring else f"a {payload}-byte payload"
            raise RecordError(f"{where}: message {info['tag']!r} declares {info['nbytes']} bytes sent, {how} sends {want}")
        total += want
    if record.meta.bytes_sent != total:
        raise RecordError(f"{where}: bytes_sent {record.meta.bytes_sent} is not what the messages take ({total})")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
