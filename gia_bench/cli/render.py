"""The CLI's :class:`~gia_bench.events.Events`: rich bars on a terminal, plain lines in a log.

The library's runs only call ``on_start`` / ``on_step`` / ``on_result`` / ``on_skip``; what
a person sees is decided here, one view per kind of run:

- :class:`UnitsView` (study, demo, the audit's battery): the plan line, then on a terminal one
  bar over all units with per-kind counts and the kind-weighted ETA plus a line per unit in
  flight; in a log one line per finished unit,
  ``[  7/183] attack done in 4.1 s: defense=... | ETA 6m12s``.
- :class:`AttackView` (``attack``): a bar per attack's iterations (terminal), a line per result.
- :class:`CaptureView` (``capture``): one bar over the records.
- :class:`TrainView` (``train``): rank 0's bar (terminal) and its epoch lines (everywhere).
- :class:`RoundsView` (``federated``): one line per round.

Every view is a context manager: leaving it stops its display (on Ctrl-C too). Events may
come from other threads (the engine's, a relay's): each view locks its state.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gia_bench.events import Silent


class _View(Silent):  # each view overrides the events it shows
    """A lock, a rich Progress started on demand, and ``with`` support."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self._lock = threading.RLock()

    def _print(self, text: str) -> None:
        """One plain line (no markup: a spec may hold brackets), flushed so that a log is live."""
        target = self.progress.console if self.progress is not None else self.console
        target.print(text, highlight=False, markup=False, soft_wrap=True)
        file = getattr(target, "file", None)
        if file is not None and hasattr(file, "flush"):
            file.flush()

    def close(self) -> None:
        with self._lock:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    def __enter__(self) -> _View:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class UnitsView(_View):
    """A run of units (see the module docstring). Counts and the ETA come in ``on_step``'s fields."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.total = 0
        self.bar: TaskID | None = None
        self.lines: dict[str, TaskID] = {}  # unit in flight -> its line

    def on_start(self, total: int, unit: str, plan: str = "") -> None:
        with self._lock:
            self.total = total
            if plan:
                self._print(plan)
            if self.console.is_terminal:
                self.progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(bar_width=30),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[eta]}"),  # the library's, by kind: rich's own is one rate for all
                    console=self.console,
                    transient=False,
                    refresh_per_second=4,
                )
                self.progress.start()
                self.bar = self.progress.add_task("[bold]units[/]", total=total, completed=0, eta="")

    def on_step(self, done: int, label: str = "", fields: Mapping[str, Any] | None = None) -> None:
        fields = fields or {}
        with self._lock:
            if self.progress is None:
                if label:  # a unit finished (a start has no label): its line, as in every log
                    eta = fields.get("eta") or ""
                    self._print(f"[{done:>{len(str(self.total))}}/{self.total}] {label}" + (f" | {eta}" if eta else ""))
                return
            running = list(fields.get("running", ()))
            for name in [n for n in self.lines if n not in running]:
                self.progress.remove_task(self.lines.pop(name))
            for name in running:
                if name not in self.lines:
                    kind, _, rest = name.partition(" ")
                    self.lines[name] = self.progress.add_task(f"  [cyan]{escape(kind)}[/] {escape(rest)}", total=None,
                                                              eta="")
            failed = int(fields.get("failed", 0))
            title = f"[bold]units[/] {escape(str(fields.get('counts', '')))}" + (
                f" · [red]{failed} failed[/]" if failed else "")
            assert self.bar is not None
            self.progress.update(self.bar, completed=done, description=title, eta=str(fields.get("eta", "")))

    def on_skip(self, label: str, reason: str) -> None:
        with self._lock:
            if self.progress is not None:  # a log says it in the unit's own line
                self.progress.console.print(f"[red]failed[/] {escape(label)}: {escape(reason)}", highlight=False)

    def close(self) -> None:
        with self._lock:
            if self.progress is not None:
                for task in self.lines.values():
                    self.progress.remove_task(task)
                self.lines.clear()
        super().close()


class AttackView(_View):
    """``gia-bench attack``: the running attack's iterations (terminal), one line per result or skip."""

    def __init__(self, console: Console, err_console: Console) -> None:
        super().__init__(console)
        self.err_console = err_console
        self.task: TaskID | None = None
        self.label = ""
        self.results = 0

    def on_start(self, total: int, unit: str, plan: str = "") -> None:
        with self._lock:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("it {task.completed:.0f}/{task.total:.0f}  loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()

    def on_step(self, done: int, label: str = "", fields: Mapping[str, Any] | None = None) -> None:
        fields = fields or {}
        with self._lock:
            if self.progress is None:
                return
            if self.task is not None and (label != self.label or "iteration" not in fields):
                self.progress.remove_task(self.task)  # the attack finished, or the next one began
                self.task = None
            if "iteration" in fields:
                if self.task is None:
                    self.label = label
                    self.task = self.progress.add_task(escape(label), total=1, loss="-")
                self.progress.update(self.task, completed=fields["iteration"], total=fields["iterations"],
                                     loss=f"{fields['loss']:.4g}")

    def on_result(self, label: str, summary: str = "") -> None:
        with self._lock:
            self.results += 1
            self._print(summary)

    def on_skip(self, label: str, reason: str) -> None:
        self.err_console.print(f"[yellow]skipped[/] {escape(reason)}", highlight=False, soft_wrap=True)


class CaptureView(_View):
    """``gia-bench capture``: one bar over the records; how many were already there."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.task: TaskID | None = None
        self.kept = 0

    def on_start(self, total: int, unit: str, plan: str = "") -> None:
        with self._lock:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(escape(plan), total=total, note="")

    def on_step(self, done: int, label: str = "", fields: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            if self.progress is not None and self.task is not None:
                note = f"{self.kept} already there" if self.kept else ""
                self.progress.update(self.task, completed=done, note=note)

    def on_skip(self, label: str, reason: str) -> None:
        with self._lock:
            self.kept += 1


class TrainView(_View):
    """``gia-bench train``: rank 0's bar on a terminal; its epoch lines everywhere (they name their defense)."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.task: TaskID | None = None

    def on_start(self, total: int, unit: str, plan: str = "") -> None:
        with self._lock:
            if not self.console.is_terminal or self.progress is not None:
                return
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=self.console,
            )  # fmt: skip
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, completed=0, loss=0.0)

    def on_step(self, done: int, label: str = "", fields: Mapping[str, Any] | None = None) -> None:
        fields = fields or {}
        with self._lock:
            if self.progress is not None and self.task is not None:
                loss = fields.get("loss")
                extra = {} if not isinstance(loss, (int, float)) else {"loss": float(loss)}
                self.progress.update(self.task, completed=done, description=escape(label), **extra)

    def on_result(self, label: str, summary: str = "") -> None:
        with self._lock:
            self._print(summary)


class RoundsView(_View):
    """``gia-bench federated``: one line per round."""

    def on_result(self, label: str, summary: str = "") -> None:
        with self._lock:
            self._print(summary)
