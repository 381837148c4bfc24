"""The ``gia-bench`` app, its consoles, and what every command shares (options, plug-ins, threads, Ctrl-C).

User mistakes (:class:`~gia_bench.errors.GiaBenchError`) are printed as one red line and exit
with code 2.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import typer
from rich.markup import escape

from gia_bench.cli.console import make_console
from gia_bench.errors import GiaBenchError

console = make_console()  # off a terminal (a log): wide, so names and specs stay whole on their line
err_console = make_console(stderr=True)


_interrupted = False  # set once a Ctrl-C has been handled: exit at once
#: After a Ctrl-C a command has this long to stop its work, keep what finished and say so;
#: past it the process leaves anyway (exit 130), so a stuck cleanup never holds the terminal.
CTRL_C_DEADLINE_S = 15.0
_deadline_armed = threading.Event()
_command_done = threading.Event()


def _leave_after_deadline(seconds: float) -> None:
    if _command_done.wait(seconds):
        return  # the command ended on its own
    sys.stderr.write(f"interrupted: the cleanup took over {seconds:g} s; stopped without it (finished work is kept)\n")
    sys.stderr.flush()
    os._exit(130)


def _on_ctrl_c(signum: int, frame: Any) -> None:
    """Python's own Ctrl-C (KeyboardInterrupt), plus a deadline for the command to be gone."""
    if not _deadline_armed.is_set():
        _deadline_armed.set()
        threading.Thread(target=_leave_after_deadline, args=(CTRL_C_DEADLINE_S,), name="gia-bench-ctrl-c-deadline",
                         daemon=True).start()  # fmt: skip
    raise KeyboardInterrupt


def mark_interrupted() -> None:
    """A Ctrl-C was handled and said: ignore a second one, and leave without the interpreter's teardown."""
    import signal

    global _interrupted
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _interrupted = True


class _App(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # only where Ctrl-C is Python's default (not ignored, e.g. under nohup; the main thread)
        ours = threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        previous = signal.signal(signal.SIGINT, _on_ctrl_c) if ours else None
        _command_done.clear()
        try:
            return super().__call__(*args, **kwargs)
        except GiaBenchError as exc:
            # escaped: a message may hold brackets ("pip install 'gia-bench[flower]'") that rich would eat as markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except SystemExit as exc:
            if _interrupted:
                # Everything is cleaned up and said; the interpreter's own teardown (collecting
                # torch's objects, atexit hooks) takes seconds and a second ^C would print a
                # traceback from it. Ctrl-C must stop within seconds: leave now.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(exc.code if isinstance(exc.code, int) else 130)
            raise
        finally:
            if not _deadline_armed.is_set():
                _command_done.set()  # no Ctrl-C: nothing to bound (called in-process by tests, nothing fires later)
            # after a Ctrl-C the deadline stays armed through the interpreter's teardown too
            if previous is not None and signal.getsignal(signal.SIGINT) is _on_ctrl_c:
                signal.signal(signal.SIGINT, previous)


app = _App(
    name="gia-bench",
    help="How much private training data leaks through compressed gradients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    """How much private training data leaks through compressed gradients."""


def plugin_option() -> Any:
    return typer.Option(
        [], "--plugin", help="trust this module:Class (a compressor, model, attack ... named by a record or spec); repeatable"
    )


def max_memory_option() -> Any:
    return typer.Option(
        "2GiB", "--max-memory",
        help="memory an attack may use (e.g. 8GiB); a record whose estimate exceeds it is refused before it runs",
    )


def flag_plugins(*specs: str | None) -> list[str]:
    """The ``module:Class`` names among specs the user typed on the command line (trusted by typing them)."""
    from gia_bench.registry import _MODULE_CLASS, parse_spec

    names = []
    for spec in specs:
        if spec:
            try:
                name = parse_spec(spec).name
            except GiaBenchError:
                continue  # the command itself reports the bad spec
            if _MODULE_CLASS.match(name):
                names.append(name)
    return names


def apply_threads() -> None:
    """torch threads by the one policy (:mod:`gia_bench.threads`): OMP_NUM_THREADS, else the cores left free."""
    from gia_bench.threads import apply_threads

    apply_threads()


def print_warnings(warnings: Sequence[str], what: str) -> None:
    """The report's banner on the terminal (rule: gia_bench.reports.headline.BUDGET_RULE)."""
    if warnings:
        console.print(f"[bold yellow]Not supported by this study: {what}.[/]")
        for w in warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
