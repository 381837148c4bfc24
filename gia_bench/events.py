"""What a long run tells its caller: one ``Events`` protocol taken by every ``run_*`` function.

The library never renders anything. A run (capture, attack, study, audit, training)
calls these four methods as it goes; the CLI passes an object that draws rich bars or
prints log lines, a test passes a recorder, and a library user passes nothing
(:data:`SILENT`). That is why no module outside ``gia_bench.cli`` imports rich.

- ``on_start(total, unit, plan)``: the run knows how much work it has: ``total`` units of
  kind ``unit`` ("record", "attack", "step", "defense", ...); ``plan`` is a one-line
  description (``"183 units: 18 captures, 156 attacks, 9 trainings"``) or ``""``.
- ``on_step(done, label, fields)``: ``done`` units are finished (cumulative, not a delta);
  ``label`` names what is in flight or just finished; ``fields`` carries figures a
  renderer may show (loss, PSNR, elapsed seconds). Runs call it often; renderers throttle.
- ``on_result(label, summary)``: one unit produced a result (a record path, an attack's
  scores); ``summary`` is a short plain-text line.
- ``on_skip(label, reason)``: one unit produced nothing, and why.

Methods may be called from worker threads; implementations that keep state lock it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Events(Protocol):
    def on_start(self, total: int, unit: str, plan: str = "") -> None: ...

    def on_step(self, done: int, label: str = "", fields: Mapping[str, Any] | None = None) -> None: ...

    def on_result(self, label: str, summary: str = "") -> None: ...

    def on_skip(self, label: str, reason: str) -> None: ...


class Silent:
    """Events that go nowhere: the default of every ``run_*`` function."""

    def on_start(self, total: int, unit: str, plan: str = "") -> None:
        pass

    def on_step(self, done: int, label: str = "", fields: Mapping[str, Any] | None = None) -> None:
        pass

    def on_result(self, label: str, summary: str = "") -> None:
        pass

    def on_skip(self, label: str, reason: str) -> None:
        pass


SILENT: Events = Silent()


@dataclass
class Recorded:
    """Events kept in a list, in order: ``("start", total, unit, plan)``, ``("step", done, label)``,
    ``("result", label, summary)``, ``("skip", label, reason)``. For tests and for callers that
    want to inspect a run afterwards."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def on_start(self, total: int, unit: str, plan: str = "") -> None:
        self.calls.append(("start", total, unit, plan))

    def on_step(self, done: int, label: str = "", fields: Mapping[str, Any] | None = None) -> None:
        self.calls.append(("step", done, label))

    def on_result(self, label: str, summary: str = "") -> None:
        self.calls.append(("result", label, summary))

    def on_skip(self, label: str, reason: str) -> None:
        self.calls.append(("skip", label, reason))
