"""Which unit may run next: dependencies, plan order, and what is already finished.

The scheduler is the engines' shared bookkeeping, free of processes and threads: a unit
is *ready* once every unit it depends on has finished; units leave in plan order; a unit
whose outputs exist when it becomes ready is *cached* (finished by an earlier run: a
rerun submits only what is missing); a unit whose dependency failed is *skipped* (it has
nothing to read).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from gia_bench.engines.units import EngineError, Outcome, Unit

WAITING, READY, RUNNING, DONE, CACHED, FAILED, SKIPPED = (
    "waiting", "ready", "running", "done", "cached", "failed", "skipped",
)  # fmt: skip
FINAL = (DONE, CACHED, FAILED, SKIPPED)


class Scheduler:
    """Dependency-ordered hand-out of units; see the module docstring."""

    def __init__(self, units: Iterable[Unit], root: Path) -> None:
        self.root = Path(root)
        self.units: dict[str, Unit] = {}
        self.order: dict[str, int] = {}
        for unit in units:
            if unit.key in self.units:
                raise EngineError(f"two units share the key {unit.key!r}")
            self.order[unit.key] = len(self.units)
            self.units[unit.key] = unit
        self.dependents: dict[str, list[str]] = defaultdict(list)
        for unit in self.units.values():
            for dep in unit.deps:
                if dep not in self.units:
                    raise EngineError(f"unit {unit.key!r} depends on an unknown unit {dep!r}")
                self.dependents[dep].append(unit.key)
        self.state: dict[str, str] = {key: WAITING for key in self.units}
        self.outcomes: dict[str, Outcome] = {}
        self._ready: list[tuple[int, str]] = []
        self._events: list[tuple[str, str]] = []  # (key, CACHED | SKIPPED) settled without running
        for key, unit in self.units.items():
            if not unit.deps:
                self._make_ready(key)

    def _make_ready(self, key: str) -> None:
        if self.units[key].is_done(self.root):
            self._settle(key, CACHED)
            return
        self.state[key] = READY
        heapq.heappush(self._ready, (self.order[key], key))

    def _settle(self, key: str, state: str) -> None:
        self.state[key] = state
        if state in (CACHED, SKIPPED):
            self._events.append((key, state))
        for child in self.dependents.get(key, ()):
            if self.state[child] != WAITING:
                continue
            if state in (FAILED, SKIPPED):
                self._settle(child, SKIPPED)
            elif all(self.state[d] in (DONE, CACHED) for d in self.units[child].deps):
                self._make_ready(child)

    def head(self) -> Unit | None:
        """The next ready unit in plan order (not removed)."""
        return self.units[self._ready[0][1]] if self._ready else None

    def take(self, fits: Callable[[Unit], bool] = lambda u: True) -> Unit | None:
        """Hand out the next ready unit if ``fits`` accepts it (head of the line only: no overtaking)."""
        unit = self.head()
        if unit is None or not fits(unit):
            return None
        heapq.heappop(self._ready)
        self.state[unit.key] = RUNNING
        return unit

    def take_all(self) -> list[Unit]:
        """Hand out every ready unit (an engine with its own resource scheduler, e.g. Ray)."""
        units = []
        while (unit := self.take()) is not None:
            units.append(unit)
        return units

    def finish(self, outcome: Outcome) -> list[tuple[Unit, str]]:
        """A running unit has finished (or failed: ``outcome.error``).

        Returns the units this settled without running: ``(unit, CACHED)`` for one whose
        outputs an earlier run left, ``(unit, SKIPPED)`` for one whose dependency failed.
        """
        self.outcomes[outcome.key] = outcome
        self._events.clear()
        self._settle(outcome.key, DONE if outcome.error is None else FAILED)
        events = [(self.units[k], s) for k, s in self._events]
        self._events.clear()
        return events

    def running(self) -> list[Unit]:
        return [self.units[k] for k, s in self.state.items() if s == RUNNING]

    @property
    def settled(self) -> bool:
        """Nothing ready and nothing running: the run is over (what still waits never can run)."""
        return not self._ready and not any(s == RUNNING for s in self.state.values())

    def counts(self) -> dict[str, dict[str, int]]:
        """Per kind: how many units are in each state."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for key, state in self.state.items():
            out[self.units[key].kind][state] += 1
        return {k: dict(v) for k, v in out.items()}
