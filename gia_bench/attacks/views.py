"""Threat views: what a candidate gradient is compared with.

* ``naive``: the attacker matches the dummy's full gradient to what the receiver
  decodes, ``compressor.decode(messages)`` (one key, the flat gradient).
* ``aware``: the attacker knows the compressor and its public state and matches
  ``compressor.simulate(grad(dummy), messages, public)`` to
  ``compressor.message_values(messages, shapes, public)``, key by key (sorted key
  order): Top-k's mask, PowerSGD/LQ-SGD's projection with the known Q,
  straight-through rounding. A compressor without ``simulate`` has no aware view.
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


def _flat_rows(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)]


def build_view(record: GradientRecord, view: str, device: torch.device | str = "cpu") -> ThreatView:
    """The naive or compressor-aware view of ``record`` (tensors on ``device``)."""
    if view not in VIEWS:
        raise AttackError(f"--view {view!r} is not one of {', '.join(VIEWS)}")
    public_keys = tuple(sorted(record.public))
    if view == "naive":
        target = torch.cat([g.reshape(-1) for g in record.decode()]).to(device, torch.float32)
        return ThreatView("naive", ("grads",), (target,), _flat_rows, "decoded gradient", False, public_keys)

    compressor: Compressor = record.compressor()
    if not compressor.supports_simulate:
        raise AttackError(
            f"--view aware: defense {record.meta.defense!r} has no compressor-aware view"
            " (its compressor does not implement simulate); use --view naive"
        )
    messages = {k: v.to(device) for k, v in record.messages.items()}
    public = {k: v.to(device) for k, v in record.public.items()}
    values = compressor.message_values(messages, record.param_shapes, public)
    keys = tuple(sorted(values))
    targets = tuple(values[k].reshape(-1).to(device, torch.float32) for k in keys)

    def transform(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        # simulate works on one gradient; restarts are few (<= 8) next to the double backward.
        rows = []
        for r in range(grads[0].shape[0]):
            out = compressor.simulate([g[r] for g in grads], messages, public)
            if sorted(out) != list(keys):
                raise AttackError(
                    f"defense {record.meta.defense!r}: simulate returned keys {sorted(out)},"
                    f" message_values {list(keys)}"
                )
            rows.append([out[k].reshape(-1) for k in keys])
        return [torch.stack(col) for col in zip(*rows)]

    return ThreatView("aware", keys, targets, transform, "messages", True, public_keys)
