"""Events from another process: a worker writes them to a file, the caller's process replays them.

The trainer's rank 0 runs in a worker that torch's launcher forks or spawns as a fresh
``python -m gia_bench.train`` (no object can be handed to it, only files and flags), and the
audit's battery runs in a child interpreter. Both report through an :class:`EventWriter`: an
:class:`~gia_bench.events.Events` that appends one JSON line per call to a file and holds
nothing but that file's path, so it pickles and works the same under fork and spawn. The
caller wraps the run in :func:`relay`, whose thread reads the new lines a few times a second
and calls the same methods on the caller's own ``Events`` (the CLI's bars live there).

The lines are untrusted input: only the four method names are dispatched, with their
arguments checked for type; anything else is dropped.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gia_bench.events import SILENT, Events, Silent

#: Seconds between two reads of the file: a bar looks live, an idle run costs nothing.
POLL_S = 0.1


class EventWriter:
    """Events appended to ``path`` as JSON lines (``{"m": "on_step", "a": [...]}``); see the module docstring."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}  # the lock stays behind: a fresh one in the other process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._lock = threading.Lock()

    def _write(self, method: str, *args: Any) -> None:
        line = json.dumps({"m": method, "a": list(args)}, default=str) + "\n"
        with self._lock:
            # one write of the whole line to an O_APPEND descriptor: the reader never sees half a line
            # followed by another writer's line
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)

    def on_start(self, total: int, unit: str, plan: str = "") -> None:
        self._write("on_start", total, unit, plan)

    def on_step(self, done: int, label: str = "", fields: Mapping[str, Any] | None = None) -> None:
        self._write("on_step", done, label, dict(fields or {}))

    def on_result(self, label: str, summary: str = "") -> None:
        self._write("on_result", label, summary)

    def on_skip(self, label: str, reason: str) -> None:
        self._write("on_skip", label, reason)


#: The argument types of each method, in order (a line that does not match is dropped).
_SIGNATURES: dict[str, tuple[type | tuple[type, ...], ...]] = {
    "on_start": (int, str, str),
    "on_step": (int, str, dict),
    "on_result": (str, str),
    "on_skip": (str, str),
}


def dispatch(line: str, events: Events) -> bool:
    """Call the method one JSON line names on ``events``; False (and no call) for a line that is not one."""
    try:
        message = json.loads(line)
    except ValueError:
        return False
    if not isinstance(message, dict):
        return False
    method, args = message.get("m"), message.get("a")
    types = _SIGNATURES.get(method) if isinstance(method, str) else None
    if types is None or not isinstance(args, list) or len(args) != len(types):
        return False
    # bool is an int to isinstance: a count that is True is not a count
    if not all(isinstance(a, t) and not (t is int and isinstance(a, bool)) for a, t in zip(args, types)):
        return False
    getattr(events, method)(*args)
    return True


class _Reader:
    """Reads the complete lines added to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        return [c.decode("utf-8", "replace") for c in complete if c]


@contextmanager
def relay(events: Events, path: Path) -> Iterator[EventWriter | None]:
    """Replay the events a worker writes to ``path`` on ``events`` while the block runs.

    Yields the :class:`EventWriter` to hand to the worker (``None`` when ``events`` is
    silent: nothing listens, so the worker need not write). ``path`` is emptied first
    and removed at the end, after the last line has been replayed.
    """
    if type(events) is Silent:  # exactly the no-op: a view that inherits its no-ops still listens
        yield None
        return
    path = Path(path)
    path.write_bytes(b"")  # an earlier run's lines are not this run's
    reader, stop = _Reader(path), threading.Event()

    def pump() -> None:
        while not stop.wait(POLL_S):
            for line in reader.lines():
                dispatch(line, events)

    thread = threading.Thread(target=pump, name="gia-bench-event-relay", daemon=True)
    thread.start()
    try:
        yield EventWriter(path)
    finally:
        stop.set()
        thread.join()
        try:
            for line in reader.lines():  # what the worker wrote after the last read
                dispatch(line, events)
        finally:
            path.unlink(missing_ok=True)


__all__ = ["POLL_S", "SILENT", "EventWriter", "dispatch", "relay"]
