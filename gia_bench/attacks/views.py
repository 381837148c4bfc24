"""Threat views: what a candidate gradient is compared with.

* ``naive``: the attacker matches the dummy's full gradient to what the receiver
  decodes, ``compressor.decode(messages)`` (one key, the flat gradient).
* ``aware``: the attacker knows the compressor and its public state and matches
  ``compressor.simulate(grad(dummy), messages, public)`` to
  ``compressor.message_values(messages, shapes, public)``: Top-k's mask,
  PowerSGD/LQ-SGD's projection with the known Q, straight-through rounding. All
  messages are concatenated (sorted key order) into one observation, so the
  attack's distance is one distance over everything observed. A compressor
  without ``simulate`` has no aware view. The worker's error-feedback residual
  ``e`` (it sent ``C(g + e)``) is private and unknown to this attacker: it is
  **assumed zero**, exact for a fresh compressor (``capture``), an approximation
  mid-training.
* ``oracle``: ``aware`` plus the residual, read from the truth file by the evaluation
  side and attached to the record (``record.private``), never by the attack: the
  simulation is then exact, so this is an **upper bound**, not a threat.

A view also says which gradient the label strategies read (:attr:`ThreatView.gradient`,
the view's best estimate of the worker's gradient), and whether it is the naive
view in disguise (:attr:`ThreatView.same_as_naive`: ``none``'s aware view), so an
attack does not spend budget on a second, identical objective.

More views register a builder in :data:`VIEW_BUILDERS` (``name -> build(record, device)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from gia_bench.attacks.base import AttackError
from gia_bench.defenses.base import Compressor
from gia_bench.records import GradientRecord
from gia_bench.receiver import decode_record, record_compressor
from gia_bench.threat import VIEWS


@dataclasses.dataclass(frozen=True)
class ThreatView:
    """Targets (one flat tensor per key) and the map from batched candidate gradients to the same keys."""

    name: str
    keys: tuple[str, ...]
    targets: tuple[torch.Tensor, ...]  # (N_k,) each
    transform: Callable[[list[torch.Tensor]], list[torch.Tensor]]  # [(R, *shape_p)] -> [(R, N_k)]
    observed: str
    compressor_known: bool
    public_state_used: tuple[str, ...]
    #: the view's estimate of the worker's gradient, per parameter (what label strategies read)
    gradient: tuple[torch.Tensor, ...] = ()
    #: the view's objective is the naive one (same target, identity transform)
    same_as_naive: bool = False
    #: the naive objective's target, through the identity, is one of the view's keys, and the
    #: others are further observations (QSGD: its exact bucket norms): no naive phase needed
    extends_naive: bool = False
    residual: str = "not modelled"  # how the worker's private error-feedback residual is treated
    private_state_used: tuple[str, ...] = ()
    #: the observation cut finer than its keys (the naive view: one piece per parameter), and the map
    #: from candidate gradients to the same pieces; empty: the pieces are the keys (``transform``)
    target_segments: tuple[torch.Tensor, ...] = ()
    split: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None

    @property
    def target(self) -> torch.Tensor:
        """The whole observation as one flat row ``(N,)`` (keys concatenated in order)."""
        return self.targets[0] if len(self.targets) == 1 else torch.cat(self.targets)

    def rows(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Candidate gradients ``[(R, *shape_p)]`` -> the candidates' observations ``(R, N)``, like :attr:`target`."""
        parts = self.transform(grads)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @property
    def segments(self) -> tuple[torch.Tensor, ...]:
        """The observation in pieces ``(N_k,)`` whose concatenation is :attr:`target` (no copy made)."""
        return self.target_segments or self.targets

    def candidate_segments(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Candidate gradients ``[(R, *shape_p)]`` -> their observations in the pieces of :attr:`segments`,
        ``[(R, N_k)]`` (views where the candidate needs no transform): what the attack's distance
        reads, so the whole observation is never concatenated into one row."""
        return self.split(grads) if self.split is not None else self.transform(grads)


#: How each view treats the worker's private error-feedback residual (the threat line says it).
RESIDUAL = {
    "naive": "not modelled (matches the decoded gradient)",
    "aware": "unknown, assumed zero",
    "oracle": "read from the truth file (upper bound)",
}


def _per_parameter(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g.reshape(g.shape[0], -1) for g in grads]


def _flat_rows(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat(_per_parameter(grads), dim=1)]


def naive_view(record: GradientRecord, device: torch.device | str = "cpu") -> ThreatView:
    """Match the dummy's gradient to the decoded gradient."""
    decoded = [g.to(device, torch.float32) for g in decode_record(record)]
    target = torch.cat([g.reshape(-1) for g in decoded])
    public_keys = tuple(sorted(record.public))
    return ThreatView(
        "naive", ("grads",), (target,), _flat_rows, "decoded gradient", False, public_keys, tuple(decoded), True,
        RESIDUAL["naive"], target_segments=tuple(g.reshape(-1) for g in decoded), split=_per_parameter,
    )  # fmt: skip


def aware_view(record: GradientRecord, device: torch.device | str = "cpu", view: str = "aware") -> ThreatView:
    """Match ``simulate(grad(dummy))`` to the observed messages' values (``view="oracle"``: with the
    private residual the evaluation side attached to the record)."""
    compressor: Compressor = record_compressor(record)
    if not compressor.supports_simulate:
        raise AttackError(
            f"--view {view}: defense {record.meta.defense!r} has no compressor-aware view"
            " (its compressor does not implement simulate); use --view naive"
        )
    messages = {k: v.to(device) for k, v in record.messages.items()}
    public = {k: v.to(device) for k, v in record.public.items()}
    private = {k: v.to(device) for k, v in record.private.items()} if view == "oracle" else {}
    # a compressor with nothing private keeps the three-argument simulate (third-party ones too)
    extra = {"private": private} if private else {}
    values = compressor.message_values(messages, record.param_shapes, public)
    keys = tuple(sorted(values))
    targets = tuple(values[k].reshape(-1).to(device, torch.float32) for k in keys)

    def transform(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        # simulate works on one gradient; restarts are few (<= 8) next to the double backward.
        rows = []
        for r in range(grads[0].shape[0]):
            out = compressor.simulate([g[r] for g in grads], messages, public, **extra)
            if sorted(out) != list(keys):
                raise AttackError(
                    f"defense {record.meta.defense!r}: simulate returned keys {sorted(out)},"
                    f" message_values {list(keys)}"
                )
            rows.append([out[k].reshape(-1) for k in keys])
        return [torch.stack(col) for col in zip(*rows)]

    naive = naive_view(record, device)
    threat = ThreatView(
        view, keys, targets, transform, "messages", True, tuple(sorted(record.public)), naive.gradient,
        residual=RESIDUAL[view], private_state_used=tuple(sorted(private)),
    )  # fmt: skip
    holds = _holds_naive(threat, naive.target, record, device)
    if not holds or len(keys) > 1:
        return dataclasses.replace(threat, extends_naive=holds)
    # The naive objective in disguise: evaluate it exactly as the naive view does (same pieces, same
    # order of sums), so the two views give bit-identical attacks rather than ones that drift apart
    # through rounding in a chaotic optimiser.
    return dataclasses.replace(threat, same_as_naive=True, target_segments=naive.segments, split=naive.split)


def _holds_naive(view: ThreatView, naive_target: torch.Tensor, record: GradientRecord, device) -> bool:
    """True when one of the view's keys is the naive view: the decoded gradient as its target, and
    simulate the identity on it. The view's only key: the aware objective is the naive one (``none``,
    PowerSGD's uncompressed warm-up steps); one of several: the naive one and more (QSGD's values
    beside its norms). A mask, a projection or rounding is not the identity.

    Checked on the observation itself and on one seeded random gradient.
    """
    same = [i for i, t in enumerate(view.targets) if t.shape == naive_target.shape and torch.equal(t, naive_target)]
    if not same:
        return False
    probe = torch.randn(naive_target.numel(), generator=torch.Generator().manual_seed(0)).to(device)
    grads, offset = [], 0
    for shape in record.param_shapes:
        n = int(torch.Size(shape).numel())
        grads.append(probe[offset : offset + n].reshape(1, *shape))
        offset += n
    with torch.no_grad():
        parts = view.transform(grads)
    return any(torch.equal(parts[i][0], probe) for i in same)


#: ``name -> build(record, device)``; every name must also be in ``gia_bench.threat.VIEWS``.
VIEW_BUILDERS: dict[str, Callable[[GradientRecord, torch.device | str], ThreatView]] = {
    "naive": naive_view,
    "aware": aware_view,
    "oracle": lambda record, device: aware_view(record, device, "oracle"),
}


def build_view(record: GradientRecord, view: str, device: torch.device | str = "cpu") -> ThreatView:
    """The ``view`` of ``record`` (tensors on ``device``): naive, compressor-aware or oracle.

    ``oracle`` passes ``record.private`` (attached by the evaluation side) to ``simulate``.
    """
    if view not in VIEWS or view not in VIEW_BUILDERS:
        raise AttackError(f"--view {view!r} is not one of {', '.join(VIEWS)}")
    return VIEW_BUILDERS[view](record, device)
