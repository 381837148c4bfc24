"""The study's units: public typed functions an engine calls as ``fn(ctx, **args)`` in any process.

Each takes the :class:`~gia_bench.engines.UnitContext` (where to read and write, the
device, the plugins the user trusted) and one frozen argument object; paths inside are
relative to the study folder, so a unit runs the same in a local worker or a Ray task.
The ``*_done`` functions are the units' ``done_check``: is the unit finished, given what
is in the study folder now.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gia_bench.budget import DEFAULT_MAX_MEMORY
from gia_bench.capture import CaptureConfig
from gia_bench.engines.units import Unit, UnitContext
from gia_bench.study.plan import TrainJob, train_config, train_finished
from gia_bench.study.schema import StudyTrain


@dataclasses.dataclass(frozen=True)
class AttackArgs:
    """One attack in one view on one record (``record`` and ``out_root`` relative to the study folder)."""

    record: str
    attack: str
    view: str
    out_root: str
    seed: int
    max_memory: int = DEFAULT_MAX_MEMORY


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """One training run: the study's ``[train]``, its defense and seed, its folder (relative)."""

    defense: str
    seed: int
    train: StudyTrain
    out: str

    def job(self, root: Path) -> TrainJob:
        return TrainJob(self.defense, self.seed, self.train, root / self.out)


def capture_unit(ctx: UnitContext, config: CaptureConfig) -> None:
    """Capture ``config`` (``out`` relative to the staging folder) on the context's device."""
    from gia_bench.capture import capture
    from gia_bench.registry import trusted

    with trusted(ctx.plugins):  # a worker (or a Ray task) applies the user's --plugin set itself
        capture(dataclasses.replace(config, out=ctx.outputs / config.out, device=ctx.device))


def attack_unit(ctx: UnitContext, job: AttackArgs) -> None:
    """Run one attack on one record; its result.json lands under ``out_root``."""
    from gia_bench.evaluate import run_attack
    from gia_bench.registry import trusted

    from gia_bench.attacks.base import NotApplicable

    with trusted(ctx.plugins):
        try:
            run_attack(
                ctx.inputs / job.record, job.attack, job.view, ctx.outputs / job.out_root, seed=job.seed,
                device=ctx.device, lpips_net=ctx.lpips_net, lpips_weights=ctx.lpips_weights,
                max_memory=job.max_memory,
            )
        except NotApplicable:
            pass  # a refusal with its reason: skipped.json stands where result.json would (the report lists it)


def train_unit(ctx: UnitContext, job: TrainArgs) -> None:
    """Train (or resume) one run in place; the trainer saves rank 0's records at ``attack_steps``."""
    from gia_bench.train import launch

    config = train_config(job.job(ctx.inputs), ctx.device)
    launch(config, fork=ctx.device == "cpu" and ctx.fork_ok)


def train_done(root: Path, unit: Unit) -> bool:
    """A training unit is finished when its metrics.json has every epoch."""
    job: TrainArgs = unit.args["job"]
    return train_finished(root / job.out, job.train.base.epochs)


def attack_done(root: Path, unit: Unit) -> bool:
    """An attack unit is finished when its result.json is current for the record now in the folder."""
    from gia_bench.attack_skips import settled

    a: AttackArgs = unit.args["job"]
    return settled(root / unit.outputs[0], root / a.record, a.attack, a.view, a.seed)  # a refusal counts as done
