"""Threat views: what a candidate gradient is compared with.

* ``naive``: the attacker matches the dummy's full gradient to what the receiver
  decodes, ``compressor.decode(messages)`` (one key, the flat gradient).
* ``aware``: the attacker knows the compressor and its public state and matches
  ``compressor.simulate(grad(dummy), messages, public)`` to
  ``compressor.message_values(messages, shapes, public)``, key by key (sorted key
  order): Top-k's mask, PowerSGD/LQ-SGD's projection with the known Q,
  straight-through rounding. A compressor without ``simulate`` has no aware view.
  The worker's error-feedback residual ``e`` (it sent ``C(g + e)``) is private and
  unknown to this attacker: it is **assumed zero**, exact for a fresh compressor
  (``capture``), an approximation mid-training.
* ``oracle``: ``aware`` plus the residual, read from the truth file by the evaluation
  side and attached to the record (``record.private``), never by the attack: the
  simulation is then exact, so this is an **upper bound**, not a threat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from gia_bench.attacks.base import VIEWS, AttackError
from gia_bench.defenses.base import Compressor
from gia_bench.records import GradientRecord


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
    residual: str = "not modelled"  # how the worker's private error-feedback residual is treated
    private_state_used: tuple[str, ...] = ()


#: How each view treats the worker's private error-feedback residual (the threat line says it).
RESIDUAL = {
    "naive": "not modelled (matches the decoded gradient)",
    "aware": "unknown, assumed zero",
    "oracle": "read from the truth file (upper bound)",
}


def _flat_rows(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)]


def build_view(record: GradientRecord, view: str, device: torch.device | str = "cpu") -> ThreatView:
    """The naive, compressor-aware or oracle view of ``record`` (tensors on ``device``).

    ``oracle`` passes ``record.private`` (attached by the evaluation side) to ``simulate``.
    """
    if view not in VIEWS:
        raise AttackError(f"--view {view!r} is not one of {', '.join(VIEWS)}")
    public_keys = tuple(sorted(record.public))
    if view == "naive":
        target = torch.cat([g.reshape(-1) for g in record.decode()]).to(device, torch.float32)
        return ThreatView(
            "naive", ("grads",), (target,), _flat_rows, "decoded gradient", False, public_keys, RESIDUAL["naive"]
        )

    compressor: Compressor = record.compressor()
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

    return ThreatView(
        view, keys, targets, transform, "messages", True, public_keys, RESIDUAL[view], tuple(sorted(private))
    )
