"""Rank 0's progress as :class:`~gia_bench.events.Events`, sent from its worker to the launching process.

Workers are forked or spawned by torch's launcher (``python -m gia_bench.train CONFIG``):
no object reaches them but the run folder. So :func:`~gia_bench.train.launch` listens with
:func:`gia_bench.event_relay.relay` on :data:`EVENTS_FILE` in the run folder, and rank 0
writes its events there only when that file exists (a launch with no listener creates none,
and the worker then reads no loss value it would not send).

What rank 0 says: ``on_start(epochs x steps, "step", ...)``; ``on_step(steps done,
"DEFENSE epoch E/N", {"loss": ...})`` at most every :data:`STEP_INTERVAL_S`; per epoch
``on_result(DEFENSE, "DEFENSE epoch E/N: loss ... test acc ... bytes/worker this epoch ... s")``.
A study trains several defenses and their epoch lines land in one log: each names its defense.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gia_bench.event_relay import EventWriter

#: The file in the run folder that rank 0 writes its events to while the launcher listens.
EVENTS_FILE = ".events.jsonl"
#: Seconds between two step events: a bar refreshes a few times a second, a file stays small.
STEP_INTERVAL_S = 0.25


def epoch_line(defense: str, row: dict[str, Any], epochs: int) -> str:
    """``powersgd:rank=2 epoch 1/2: loss 0.5000  test acc 75.00%  9,876,543 bytes/worker this epoch  3.0 s``."""
    name = f"{defense} " if defense else ""
    return (
        f"{name}epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}"
        f"  test acc {100 * row['test_accuracy']:.2f}%  {row['bytes_sent_per_worker']:,} bytes/worker this epoch"
        f"  {row['seconds']:.1f} s"
    )


class Progress:
    """Rank 0's events (the other ranks, and a launch nobody listens to, send none)."""

    def __init__(
        self, rank0: bool, epochs: int, steps: int, start_epoch: int, defense: str = "", out: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        path = None if out is None else Path(out) / EVENTS_FILE
        self.events = EventWriter(path) if rank0 and path is not None and path.exists() else None
        self.enabled = self.events is not None
        self.defense, self.epochs, self.steps = defense, epochs, steps
        self.name = f"{defense} " if defense else ""
        self.done = start_epoch * steps
        self.clock = clock
        self.last = -float("inf")
        if self.events is not None:
            self.events.on_start(epochs * steps, "step", f"{self.name}{epochs} epochs of {steps} steps")
            self.events.on_step(self.done, f"{self.name}epoch {start_epoch + 1}/{epochs}", {})

    def step(self, epoch: int, loss: Any) -> None:
        """One optimizer step of ``epoch`` (0-based); ``loss`` a float or a tensor, read only when it is sent."""
        self.done += 1
        if self.events is None:
            return
        now = self.clock()
        if now - self.last < STEP_INTERVAL_S and self.done % self.steps:  # an epoch's last step is always sent
            return
        self.last = now
        self.events.on_step(self.done, f"{self.name}epoch {epoch + 1}/{self.epochs}", {"loss": float(loss)})

    def epoch_done(self, row: dict[str, Any]) -> None:
        if self.events is not None:
            self.events.on_result(self.defense, epoch_line(self.defense, row, self.epochs))

    def close(self) -> None:
        pass  # nothing held: every event is written (and closed) as it happens
