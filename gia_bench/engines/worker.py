"""The local engine's worker process: runs units sent over a pipe, and dies with the driver.

Workers are forked from a forkserver that imported torch and gia-bench once
(:mod:`gia_bench.engines.preload`), so starting one costs a fork, not the 4 CPU seconds
and ~800 MiB of a fresh interpreter importing torch (what the spawn start method paid).

A worker never outlives the driver, even when the driver is SIGKILLed:

1. Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel signals the worker when its
   parent (the forkserver, which exits as soon as the driver's end of its pipe closes)
   dies; the handler kills the worker's process group (the worker and anything it
   started, e.g. the trainer's processes).
2. Everywhere: a watchdog thread checks every 0.5 s that the parent is unchanged and
   the driver alive, and kills the process group otherwise (the handler in 1 runs only
   between bytecodes of the main thread).

Each worker leads its own process group: a terminal's Ctrl-C reaches the driver only,
which cancels the units in flight itself (kills the worker's group) and cleans up.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

WATCHDOG_S = 0.5


def _kill_group(*_: object) -> None:
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(137)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pdeathsig(sig: int) -> bool:
    """Ask Linux to send ``sig`` when the parent dies (False where prctl is unavailable)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with(driver_pid: int) -> None:
    """Make this process (and its group) die when its parent or the driver dies; see the module docstring."""
    parent = os.getppid()
    if hasattr(os, "setpgid"):
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    signal.signal(signal.SIGTERM, _kill_group)
    _pdeathsig(signal.SIGTERM)
    if os.getppid() != parent or not _alive(driver_pid):  # it died before prctl took effect
        _kill_group()

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_S)
            if os.getppid() != parent or not _alive(driver_pid):
                _kill_group()

    threading.Thread(target=watch, name="gia-bench-watchdog", daemon=True).start()


def worker_main(conn: Connection, driver_pid: int) -> None:
    """Receive ``(unit, ctx)``, run it, send the :class:`Outcome`; ``None`` or a closed pipe ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides what a Ctrl-C cancels
    die_with(driver_pid)
    from gia_bench.engines.units import execute

    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        unit, ctx = msg
        outcome = execute(unit, ctx)
        try:
            conn.send(("done", outcome))
        except (BrokenPipeError, OSError):
            return
