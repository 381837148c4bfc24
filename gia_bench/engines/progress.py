"""Progress of a run of units, as :class:`~gia_bench.events.Events`: the plan, one step per unit, the ETA.

The engine tells a :class:`Reporter` when a unit starts and finishes; the reporter keeps the
counts per kind and the ETA and passes them on as events (it renders nothing: the CLI draws
a bar on a terminal and one plain line per finished unit in a log)::

    on_start(183, "unit", "183 units: 18 captures, 156 attacks, 9 trainings")
    on_step(7, "attack done in 4.1 s: defense=topk:ratio=0.01 attack=dlg:iterations=30 ...",
            {"eta": "ETA 6m12s", "counts": "capture 2/18 · attack 5/156", "failed": 0, "running": (...)})

``on_step`` also comes when a unit starts (``done`` unchanged; ``running`` names the units in
flight). A unit that ran is also an ``on_result``; one that failed, or was skipped because a
unit it needs failed, an ``on_skip``.

The ETA weights units by kind: a training takes minutes where an attack takes seconds,
so "units left x seconds per unit" said 17 s with 20 minutes to go. Each kind's mean
unit time (this run's units of that kind) prices the units left of that kind; the wall
time this run has taken per second of unit time finished (below 1 with units side by
side) turns that into wall time. Until every kind with units left has finished one unit
this run there is no price for it, so no ETA is given: the text says which kinds it waits for.

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
from gia_bench.events import Events


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
    """Counts per kind and the ETA, passed on to ``events`` (see the module docstring).

    ``clock`` (seconds, monotonic) is a parameter so that tests can drive the ETA.
    """

    def __init__(
        self, events: Events, kinds: dict[str, int], cached: dict[str, int],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.events = events
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
        self.running: dict[str, str] = {}  # unit key -> "kind describe", in start order
        self._lock = threading.Lock()
        events.on_start(self.total, "unit", self.plan_line())

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

    def fields(self) -> dict[str, Any]:
        """What a renderer may show beside the count: the ETA text, per-kind counts, failures, units in flight."""
        return {"eta": self.eta_text(), "counts": self.kind_counts(), "failed": self.failed,
                "running": tuple(self.running.values())}

    def started(self, unit: Unit) -> None:
        with self._lock:
            self.running[unit.key] = f"{unit.kind} {unit.describe()}"
            self.events.on_step(self.finished_total, "", self.fields())

    def finished(self, unit: Unit, outcome: Outcome | None, how: str = "ran") -> None:
        """``how``: ``ran`` (``outcome`` says how it went), ``cached`` (an earlier run finished it),
        ``skipped`` (a unit it needs failed)."""
        with self._lock:
            self.running.pop(unit.key, None)
            self.finished_by_kind[unit.kind] += 1
            if how == "ran":  # cached and skipped units cost nothing now: no price for the ETA
                self.ran += 1
                if outcome is not None:
                    self.ran_by_kind[unit.kind] += 1
                    self.seconds_by_kind[unit.kind] += max(outcome.seconds, 0.0)
            error = outcome.error if outcome is not None else None
            if how == "skipped" or error is not None:
                self.failed += 1
            name = f"{unit.kind} {unit.describe()}"
            if how == "cached":
                what = "already done"
            elif how == "skipped":
                what = "skipped (a unit it needs failed)"
                self.events.on_skip(name, "a unit it needs failed")
            elif error is not None:
                what = f"FAILED after {outcome.seconds:.1f} s ({error.splitlines()[0][:200]})"
                self.events.on_skip(name, error.splitlines()[0][:200])
            else:
                what = f"done in {outcome.seconds:.1f} s" if outcome else "done"
                self.events.on_result(name, what)
            self.events.on_step(self.finished_total, f"{unit.kind} {what}: {unit.describe()}", self.fields())
