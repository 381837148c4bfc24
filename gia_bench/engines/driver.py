"""What every engine does on the driver: hand out units, land their files, count, report.

An engine decides where units run (:mod:`gia_bench.engines.local`: this process and a
pool of forked workers; :mod:`gia_bench.engines.ray_engine`: Ray tasks); the driver is
the one writer of the study folder and the one place that settles a unit.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from gia_bench.engines.progress import Reporter
from gia_bench.engines.scheduler import CACHED, FINAL, Scheduler
from gia_bench.engines.units import (
    STAGING_DIR,
    Outcome,
    Unit,
    UnitContext,
    commit_staged,
    remove_partial,
    staging_dir,
    write_files,
)


@dataclasses.dataclass
class RunResult:
    """What a run did: failures (``stage``, ``unit``, ``error``) and units run per kind."""

    failures: list[dict[str, str]]
    ran: Counter


class Driver:
    """Shared bookkeeping of one run; engines subclass it and implement :meth:`run`."""

    def __init__(self, sched: Scheduler, ctx: UnitContext, reporter: Reporter) -> None:
        self.sched = sched
        self.root = sched.root
        self.ctx = ctx  # inputs/outputs are filled per unit
        self.reporter = reporter
        self.lock = threading.Condition()
        self.result = RunResult([], Counter())

    def context(self, unit: Unit, root: Path | None = None, staging: Path | None = None) -> UnitContext:
        """The unit's context: reads under ``root``, writes into ``staging`` (or in place)."""
        root = self.root if root is None else root
        out = root if unit.workdir is not None else (staging_dir(root, unit) if staging is None else staging)
        return dataclasses.replace(self.ctx, inputs=root, outputs=out)

    def started(self, unit: Unit) -> None:
        self.reporter.started(unit)

    def complete(self, unit: Unit, outcome: Outcome, files: Mapping[str, bytes] | None = None) -> None:
        """Land a finished unit (its staged files, or ``files`` sent back as bytes) and settle it.

        Call with :attr:`lock` held. A failed unit's partial files are removed.
        """
        error = outcome.error
        if error is None:
            try:
                if files is not None:
                    write_files(self.root, unit, files)
                elif unit.workdir is None:
                    commit_staged(self.root, unit, staging_dir(self.root, unit))
            except OSError as exc:
                error = f"could not write its files into {self.root}: {exc}"
                outcome = dataclasses.replace(outcome, error=error)
        if error is not None:
            remove_partial(self.root, unit)
            self.result.failures.append({"stage": unit.kind, "unit": unit.describe(), "error": error})
        self.result.ran[unit.kind] += 1
        events = self.sched.finish(outcome)
        self.reporter.finished(unit, outcome)
        for other, state in events:
            self.reporter.finished(other, None, how="cached" if state == CACHED else "skipped")
        self.lock.notify_all()

    def cancel_all(self) -> None:
        """Remove the partial files of every unit in flight (they stay unfinished: a rerun redoes them)."""
        for unit in self.sched.running():
            remove_partial(self.root, unit)

    def run(self) -> RunResult:  # pragma: no cover - engines implement it
        raise NotImplementedError


def clean_staging(root: Path) -> None:
    """Drop staging folders a killed run left (nothing in them was finished)."""
    shutil.rmtree(Path(root) / STAGING_DIR, ignore_errors=True)


@contextmanager
def ignore_interrupts() -> Iterator[None]:
    """While cleaning up after a Ctrl-C: a second one must not cut the cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def pending(sched: Scheduler) -> list[Unit]:
    """Units not settled yet."""
    return [sched.units[k] for k, s in sched.state.items() if s not in FINAL]


