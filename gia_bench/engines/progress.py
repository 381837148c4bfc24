"""Progress of a run of units: a rich display on a terminal, one plain line per unit in a log.

On a terminal: one bar over all units (per-kind counts in its title, elapsed, ETA) and a
line per unit in flight naming it (kind, defense, attack, view, record, step). When the
output is not a terminal (CI, a cluster job's log), the plan first, then one line per
finished unit::

    183 units: 18 captures, 156 attacks, 9 trainings
    [  7/183] attack done in 4.1 s: defense=topk:ratio=0.01 attack=dlg:iterations=30 view=aware record=... | ETA 6m12s

so a log shows what is happening instead of silence.

The ETA weights units by kind: a training takes minutes where an attack takes seconds,
so "units left x seconds per unit" said 17 s with 20 minutes to go. Each kind's mean
unit time (this run's units of that kind) prices the units left of that kind; the wall
time this run has taken per second of unit time finished (below 1 with units side by
side) turns that into wall time. Until every kind with units left has finished one unit
this run there is no price for it, so no ETA is given: the line says which kinds it waits for.

Engines call :meth:`Reporter.started` and :meth:`Reporter.finished` from their scheduling
thread(s); both are thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from gia_bench.engines.units import Outcome, Unit


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


#: How a log names a number of units of each kind (``2 trainings``); other kinds take an ``s``.
_NOUNS = {"train": ("training", "trainings")}


def count_of(kind: str, n: int) -> str:
    """``18 captures``, ``1 attack``, ``9 trainings``."""
    one, many = _NOUNS.get(kind, (kind, kind + "s"))
    return f"{n} {one if n == 1 else many}"


def plan_text(kinds: dict[str, int]) -> str:
    """``18 captures, 156 attacks, 9 trainings`` (kinds in the order given, empty ones left out)."""
    return ", ".join(count_of(k, n) for k, n in kinds.items() if n)


class Reporter:
    """Counts per kind and the ETA; subclasses render them.

    ``clock`` (seconds, monotonic) is a parameter so that tests can drive the ETA.
    """

    def __init__(
        self, console: Any, kinds: dict[str, int], cached: dict[str, int],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.console = console
        self.kinds = dict(kinds)  # total per kind
        self.finished_by_kind: dict[str, int] = defaultdict(int, cached)
        self.failed = 0
        self.total = sum(kinds.values())
        self.clock = clock
        self.start = clock()
        self.ran = 0  # units finished by this run (cached ones cost nothing)
        # this run's units that ran, per kind, and their seconds: the ETA's prices
        self.ran_by_kind: dict[str, int] = defaultdict(int)
        self.seconds_by_kind: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @property
    def finished_total(self) -> int:
        return sum(self.finished_by_kind.values())

    def left_by_kind(self) -> dict[str, int]:
        """Units not finished yet, per kind (kinds with none left are left out)."""
        left = {k: n - self.finished_by_kind[k] for k, n in self.kinds.items()}
        return {k: n for k, n in left.items() if n > 0}

    def unpriced(self) -> list[str]:
        """Kinds with units left but no unit of theirs finished by this run: the ETA waits for them."""
        return [k for k in self.left_by_kind() if self.ran_by_kind[k] == 0]

    def eta(self) -> float | None:
        """Wall seconds left, each kind's units priced at its mean unit time; None until every kind has one.

        ``sum over kinds (units left x mean seconds) x wall time / unit seconds done``: the
        last factor is this run's pace (with N units side by side about 1/N).
        """
        left = self.left_by_kind()
        if not left or self.unpriced():
            return None
        done = sum(self.seconds_by_kind.values())
        if done <= 0:
            return None
        work_left = sum(n * self.seconds_by_kind[k] / self.ran_by_kind[k] for k, n in left.items())
        return work_left * (self.clock() - self.start) / done

    def eta_text(self) -> str:
        """``ETA 6m12s``; ``ETA once a training has run`` while a kind has no price; empty when nothing is left."""
        eta = self.eta()
        if eta is not None:
            return f"ETA {_duration(eta)}"
        waiting = [count_of(k, 1)[2:] for k in self.unpriced()]  # "training", "capture"
        if not waiting:
            return ""
        one = " and ".join(f"{'an' if w[0] in 'aeiou' else 'a'} {w}" for w in waiting)
        return f"ETA once {one} {'has' if len(waiting) == 1 else 'have'} run"

    def kind_counts(self) -> str:
        return " · ".join(f"{k} {self.finished_by_kind[k]}/{n}" for k, n in self.kinds.items() if n)

    def plan_line(self) -> str:
        """The first line: ``183 units: 18 captures, 156 attacks, 9 trainings (20 already done)``."""
        cached = self.finished_total
        return f"{self.total} units: {plan_text(self.kinds)}" + (f" ({cached} already done)" if cached else "")

    def started(self, unit: Unit) -> None:
        with self._lock:
            self._started(unit)

    def finished(self, unit: Unit, outcome: Outcome | None, how: str = "ran") -> None:
        """``how``: ``ran`` (``outcome`` says how it went), ``cached`` (an earlier run finished it),
        ``skipped`` (a unit it needs failed)."""
        with self._lock:
            self.finished_by_kind[unit.kind] += 1
            if how == "ran":  # cached and skipped units cost nothing now: no price for the ETA
                self.ran += 1
                if outcome is not None:
                    self.ran_by_kind[unit.kind] += 1
                    self.seconds_by_kind[unit.kind] += max(outcome.seconds, 0.0)
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
        self._print(self.plan_line())

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
        eta = self.eta_text()
        tail = f" | {eta}" if eta else ""
        self._print(f"{k} {unit.kind} {what}: {unit.describe()}{tail}")


class RichReporter(Reporter):
    """A bar over all units with per-kind counts, and one line per unit in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console.print(self.plan_line(), highlight=False, markup=False)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),  # ours, by kind (Reporter.eta): rich's own is one rate for all units
            console=self.console,
            transient=False,
            refresh_per_second=4,
        )
        self.progress.start()
        self.bar = self.progress.add_task(
            self._title(), total=self.total, completed=self.finished_total, eta=self.eta_text()
        )
        self.lines: dict[str, Any] = {}

    def _title(self) -> str:
        return f"[bold]units[/] {self.kind_counts()}" + (f" · [red]{self.failed} failed[/]" if self.failed else "")

    def _started(self, unit: Unit) -> None:
        from rich.markup import escape

        self.lines[unit.key] = self.progress.add_task(
            f"  [cyan]{unit.kind}[/] {escape(unit.describe())}", total=None, start=True, eta=""
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
        self.progress.update(self.bar, completed=self.finished_total, description=self._title(), eta=self.eta_text())

    def close(self) -> None:
        for task in self.lines.values():
            self.progress.remove_task(task)
        self.lines.clear()
        self.progress.stop()


def make_reporter(console: Any, kinds: dict[str, int], cached: dict[str, int]) -> Reporter:
    """Rich on a terminal, plain lines otherwise."""
    if console is None:
        from gia_bench.console import make_console

        console = make_console()
    cls = RichReporter if console.is_terminal else LineReporter
    return cls(console, kinds, cached)
