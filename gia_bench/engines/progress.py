"""Progress of a run of units: a rich display on a terminal, one plain line per unit in a log.

On a terminal: one bar over all units (per-kind counts in its title, elapsed, ETA) and a
line per unit in flight naming it (kind, defense, attack, view, record, step). When the
output is not a terminal (CI, a cluster job's log), one line per finished unit::

    [  7/104] attack done in 4.1 s: defense=topk:ratio=0.01 attack=dlg:iterations=30 view=aware record=... | ETA 6m12s

so a log shows what is happening instead of silence. Engines call :meth:`started` and
:meth:`finished` from their scheduling thread(s); both are thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

from gia_bench.engines.units import Outcome, Unit


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Reporter:
    """Counts per kind and the ETA; subclasses render them."""

    def __init__(self, console: Any, kinds: dict[str, int], cached: dict[str, int]) -> None:
        self.console = console
        self.kinds = dict(kinds)  # total per kind
        self.finished_by_kind: dict[str, int] = defaultdict(int, cached)
        self.failed = 0
        self.total = sum(kinds.values())
        self.start = time.perf_counter()
        self.ran = 0  # units finished by this run (the ETA's base; cached ones cost nothing)
        self._lock = threading.Lock()

    @property
    def finished_total(self) -> int:
        return sum(self.finished_by_kind.values())

    def eta(self) -> float | None:
        """Seconds left: this run's wall time per finished unit times the units left."""
        if self.ran == 0:
            return None
        left = self.total - self.finished_total
        return (time.perf_counter() - self.start) / self.ran * left

    def kind_counts(self) -> str:
        return " · ".join(f"{k} {self.finished_by_kind[k]}/{n}" for k, n in self.kinds.items() if n)

    def started(self, unit: Unit) -> None:
        with self._lock:
            self._started(unit)

    def finished(self, unit: Unit, outcome: Outcome | None, how: str = "ran") -> None:
        """``how``: ``ran`` (``outcome`` says how it went), ``cached`` (an earlier run finished it),
        ``skipped`` (a unit it needs failed)."""
        with self._lock:
            self.finished_by_kind[unit.kind] += 1
            if how == "ran":  # cached units cost nothing now: not in the ETA's base
                self.ran += 1
            if how == "skipped" or outcome is not None and outcome.error is not None:
                self.failed += 1
            self._finished(unit, outcome, how)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _started(self, unit: Unit) -> None:  # pragma: no cover - overridden
        pass

    def _finished(self, unit: Unit, outcome: Outcome | None, how: str) -> None:  # pragma: no cover
        pass

    def close(self) -> None:
        pass


class LineReporter(Reporter):
    """One plain line per finished unit (output that is not a terminal)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cached = self.finished_total
        self._print(f"{self.total} units ({self.kind_counts()} already done)" if cached else f"{self.total} units")

    def _print(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)
        file = getattr(self.console, "file", None)
        if file is not None and hasattr(file, "flush"):
            file.flush()

    def _finished(self, unit: Unit, outcome: Outcome | None, how: str) -> None:
        width = len(str(self.total))
        k = f"[{self.finished_total:>{width}}/{self.total}]"
        if how == "cached":
            what = "already done"
        elif how == "skipped":
            what = "skipped (a unit it needs failed)"
        elif outcome is not None and outcome.error is not None:
            what = f"FAILED after {outcome.seconds:.1f} s ({outcome.error.splitlines()[0][:200]})"
        else:
            what = f"done in {outcome.seconds:.1f} s" if outcome else "done"
        eta = self.eta()
        tail = f" | ETA {_duration(eta)}" if eta is not None and self.finished_total < self.total else ""
        self._print(f"{k} {unit.kind} {what}: {unit.describe()}{tail}")


class RichReporter(Reporter):
    """A bar over all units with per-kind counts, and one line per unit in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            refresh_per_second=4,
        )
        self.progress.start()
        self.bar = self.progress.add_task(self._title(), total=self.total, completed=self.finished_total)
        self.lines: dict[str, Any] = {}

    def _title(self) -> str:
        return f"[bold]units[/] {self.kind_counts()}" + (f" · [red]{self.failed} failed[/]" if self.failed else "")

    def _started(self, unit: Unit) -> None:
        from rich.markup import escape

        self.lines[unit.key] = self.progress.add_task(
            f"  [cyan]{unit.kind}[/] {escape(unit.describe())}", total=None, start=True
        )

    def _finished(self, unit: Unit, outcome: Outcome | None, how: str) -> None:
        task = self.lines.pop(unit.key, None)
        if task is not None:
            self.progress.remove_task(task)
        if outcome is not None and outcome.error is not None:
            from rich.markup import escape

            self.progress.console.print(
                f"[red]failed[/] {unit.kind} {escape(unit.describe())}: {escape(outcome.error.splitlines()[0][:200])}",
                highlight=False,
            )
        self.progress.update(self.bar, completed=self.finished_total, description=self._title())

    def close(self) -> None:
        for task in self.lines.values():
            self.progress.remove_task(task)
        self.lines.clear()
        self.progress.stop()


def make_reporter(console: Any, kinds: dict[str, int], cached: dict[str, int]) -> Reporter:
    """Rich on a terminal, plain lines otherwise."""
    if console is None:
        from rich.console import Console

        console = Console()
    cls = RichReporter if console.is_terminal else LineReporter
    return cls(console, kinds, cached)
