"""The rich consoles gia-bench prints on: a terminal's width on a terminal, whole lines in a log.

Off a terminal (a file, a pipe, CI, a cluster job's log) rich lays everything out for 80
columns: the report's table squeezed and its names folded, the audit's cut to
``powersg…``, the trainer's summary broken in the middle of a spec. A log is read with
``less`` and ``grep``, which want every value whole on its line; so off a terminal the
console is :data:`LOG_WIDTH` columns wide (a table takes only the width it needs). On a
terminal, and wherever ``COLUMNS`` or an explicit width is set, rich's own width stands.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console, ConsoleDimensions

#: Columns off a terminal: wider than any line gia-bench prints, so nothing wraps.
LOG_WIDTH = 1000


class LogConsole(Console):
    """A :class:`rich.console.Console` that is :data:`LOG_WIDTH` wide when it does not print to a terminal.

    Decided at every print (``size`` is a property), not when the console is made: the
    CLI's module-level console follows whatever ``sys.stdout`` is at the time.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        # rich's _width is the width the caller (or COLUMNS, read at construction) fixed
        fixed = getattr(self, "_width", None) is not None or os.environ.get("COLUMNS", "").isdigit()
        if not fixed and not self.is_terminal:
            return ConsoleDimensions(LOG_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def make_console(stderr: bool = False, **kwargs: Any) -> LogConsole:
    """The console for stdout (or stderr): see the module docstring."""
    return LogConsole(stderr=stderr, **kwargs)
