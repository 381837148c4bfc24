"""The Attack interface, the attack registry and the Reconstruction an attack returns.

An attack sees what a curious server sees and nothing else: it receives a
:class:`~gia_bench.records.GradientRecord` (model weights, messages, public
compressor state, the public metadata), a threat *view* and a seeded
``torch.Generator``. It never receives a path to, or the contents of, the truth
file; :func:`gia_bench.evaluate.run_attack` opens that only after the
attack has returned, to score the result::

    attack = gia_bench.attacks.create("ig:iterations=2000,restarts=4")
    rec = attack.run(record, "aware", torch.Generator().manual_seed(0))
    rec.inputs   # (B, C, H, W) in model-input space
    rec.labels   # (B,) the inferred labels

Attacks are registered like defenses (``@register("ig")``) and built from spec
strings; a variant (another loss, prior, optimiser or label strategy) is a spec,
e.g. ``ig:loss=l2,optimizer=lbfgs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from gia_bench.errors import GiaBenchError
from gia_bench.io import slug as io_slug
from gia_bench.records import GradientRecord
from gia_bench.registry import Registry, canonical_spec, describe_params
from gia_bench.results import FAR_BELOW, Budget  # one Budget: what result.json stores
from gia_bench.threat import VIEWS

ATTACKS: Registry[Attack] = Registry("attack", entry_point_group="gia_bench.attacks", base=lambda: Attack)
register = ATTACKS.register

#: ``progress(iteration, total, loss)``: called while an attack runs (loss may be NaN before the first step).
Progress = Callable[[int, int, float], None]



class AttackError(GiaBenchError):
    """An attack cannot run on this record or view (e.g. no compressor-aware view, wrong model)."""


class NotApplicable(AttackError):
    """The attack does not apply to this record, for a reason it states: a refusal, not a failure.

    A structure-aware attack refuses a record whose messages carry nothing it reads exactly
    (quantized or noisy tensors, a rank too low for the batch, a first layer that is not fully
    connected). It never returns noise instead. ``gia-bench attack`` prints the reason and goes
    on; a study records the skip beside the result it would have written
    (:mod:`gia_bench.attack_skips`) and counts the unit as done, and the report lists it.
    """


def create(spec: str, **overrides: Any) -> Attack:
    """Build an attack from a spec string such as ``"ig:iterations=2000,tv=1e-4"``."""
    return ATTACKS.create(spec, **overrides)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """What an attack recovered from one record (no ground truth in here)."""

    inputs: torch.Tensor  # (B, C, H, W), model-input space (normalised), CPU float32
    labels: torch.Tensor  # (B,) int64, inferred
    iterations: int  # optimiser steps taken (0 for analytic attacks)
    final_loss: float  # the matching objective of the kept result (without priors)
    view: str  # "naive", "aware" or "oracle"
    label_strategy: str  # registry name of the label strategy used
    observed: str  # "decoded gradient" or "messages"
    public_state_used: tuple[str, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # what the attacker assumed the observation is: a FedSGD gradient or a FedAvg update after
    # K local steps (gia_bench.fedavg.LocalTraining.describe); "" where the attack does not say
    update: str = ""
    budget: Budget | None = None  # what was spent (evaluations counted)


class Attack:
    """Base class of every attack: ``run(record, view, generator, progress)`` -> :class:`Reconstruction`."""

    registry_name: ClassVar[str]
    #: threat views this attack implements
    views: ClassVar[tuple[str, ...]] = VIEWS

    def run(
        self,
        record: GradientRecord,
        view: str,
        generator: torch.Generator,
        progress: Progress | None = None,
        device: torch.device | str = "cpu",
    ) -> Reconstruction:
        raise NotImplementedError

    def check_view(self, view: str) -> None:
        if view not in VIEWS:
            raise AttackError(f"--view {view!r} is not one of {', '.join(VIEWS)}")
        if view not in self.views:
            raise AttackError(
                f"attack {self.registry_name!r} has no {view!r} view (it implements: {', '.join(self.views)})"
            )

    @property
    def budget(self) -> Budget:
        """The budget this attack is configured with (analytic attacks: 0 iterations)."""
        return Budget(iterations=0, restarts=1)

    @property
    def published_budget(self) -> Budget | None:
        """The budget of the published attack this one should be compared with (None: no such figure)."""
        return None

    def budget_warning(self) -> str | None:
        """A one-line warning when :attr:`budget` is far below :attr:`published_budget`, else None."""
        published = self.published_budget
        if published is None or published.steps == 0:
            return None
        own = self.budget
        fraction = own.steps / published.steps
        if fraction >= FAR_BELOW:
            return None
        return (
            f"budget far below published: {own.iterations:,} iterations x {own.restarts} restart(s)"
            f" is {100 * fraction:.2g}% of {published.iterations:,} x {published.restarts} ({published.source})"
        )

    def spec_defaults(self) -> dict[str, Any]:
        """The value of every parameter that the slug leaves out (the defaults, or a preset's values)."""
        return {p.name: p.default for p in describe_params(type(self))}

    @property
    def spec(self) -> str:
        """The canonical spec: registry name and every parameter value."""
        return canonical_spec(self)

    @property
    def slug(self) -> str:
        """A filesystem-safe name: the registry name, plus ``_key-value`` for every non-default parameter.

        ``ig`` with defaults -> ``ig``; ``ig:iterations=2000`` -> ``ig_iterations-2000``.
        """
        name = getattr(type(self), "registry_name", type(self).__name__)
        defaults = self.spec_defaults()
        parts = []
        for p in describe_params(type(self)):
            value = getattr(self, p.name, p.default)
            if value != defaults.get(p.name, p.default):
                if isinstance(value, bool):
                    value = str(value).lower()
                parts.append(f"{p.name}-{value}")
        return io_slug("_".join([name, *parts]))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


