"""Engines: run a set of units (captures, attacks, trainings) locally or on Ray.

:func:`run_units` is the one way in; see :mod:`gia_bench.engines.units` for what a unit
is, :mod:`gia_bench.engines.local` and :mod:`gia_bench.engines.ray_engine` for where
units run.
"""

from __future__ import annotations

from pathlib import Path

from gia_bench.engines.driver import RunResult, clean_staging
from gia_bench.engines.progress import Reporter
from gia_bench.engines.scheduler import CACHED, Scheduler
from gia_bench.engines.units import STAGING_DIR, EngineError, Outcome, Unit, UnitContext, execute
from gia_bench.events import SILENT, Events

ENGINES = ("local", "ray")


def run_units(
    units: list[Unit],
    root: Path,
    ctx: UnitContext,
    engine: str = "local",
    workers: int = 1,
    address: str | None = None,
    events: Events = SILENT,
) -> RunResult:
    """Run every unit not finished yet (dependencies first), land its files in ``root``.

    Resumable: a unit whose outputs exist is not run again. On KeyboardInterrupt the
    units in flight are cancelled, their partial files removed, and the interrupt
    re-raised; finished units stay. ``events`` hears the plan, each unit's start and
    end, and the ETA (:mod:`gia_bench.engines.progress`).
    """
    if engine not in ENGINES:
        raise EngineError(f"--engine {engine!r}: accepted values are {', '.join(ENGINES)}")
    if workers < 1:
        raise EngineError(f"--workers must be >= 1, got {workers}")
    if address is not None and engine != "ray":
        raise EngineError("--address needs --engine ray")
    root = Path(root)
    if engine == "ray":
        from gia_bench.engines.ray_engine import require_ray

        require_ray()  # before anything runs: one line when Ray is missing
    clean_staging(root)
    sched = Scheduler(units, root)
    kinds: dict[str, int] = {}
    for unit in units:
        kinds[unit.kind] = kinds.get(unit.kind, 0) + 1
    cached: dict[str, int] = {}
    for kind, states in sched.counts().items():
        cached[kind] = states.get(CACHED, 0)
    forked: list = []
    if engine == "local":
        from gia_bench.engines.local import LocalEngine, fork_workers, pool_size

        # before the first event: forking is safe only while this is the process's one thread (a
        # renderer may start a display thread on on_start)
        forked = fork_workers(pool_size(sched, workers))
    try:
        reporter = Reporter(events, kinds, cached)
        if engine == "ray":
            from gia_bench.engines.ray_engine import RayEngine

            result = RayEngine(sched, ctx, reporter, address).run()
        else:
            local = LocalEngine(sched, ctx, reporter, workers, forked)
            forked = []  # the engine owns them now: its run shuts them down
            result = local.run()
    finally:
        if forked:  # the reporter failed before the engine ran: nothing else ends them
            from gia_bench.engines.local import discard

            discard(forked)
    clean_staging(root)
    return result


__all__ = [
    "ENGINES", "STAGING_DIR", "EngineError", "Outcome", "RunResult", "Unit", "UnitContext", "execute", "run_units",
]  # fmt: skip
