"""A worker's watchdog: a worker that makes no progress is stopped, and its stack is saved.

Why not a Python thread or ``faulthandler.dump_traceback_later``? The hangs this
guards against (a collective that never returns, ``torch.save`` of a checkpoint, a
destructor that joins a thread that a fork left behind) sit in C++ code, often
holding the GIL: a Python thread never runs again. ``dump_traceback_later`` runs
its own C thread, but a forked child of a process that had armed it (pytest's
``faulthandler_timeout`` does, for every test) blocks forever the first time it
arms or cancels it: its lock is held by a thread that the fork did not copy.

So the watchdog is the process's real-time interval timer (``setitimer``: one
system call to re-arm, not inherited by a fork) and SIGALRM, whose handler is
:func:`faulthandler.register`'s, written in C: when the timer expires, the
kernel delivers SIGALRM, the handler writes every thread's Python stack to
``watchdog-rank{R}.txt`` in the run folder without taking the GIL, then
re-raises SIGALRM with its default action, which ends the process. The launcher
sees a worker killed by SIGALRM next to a stack file and names that rank
(:func:`stuck_message`).

The deadline is :data:`STUCK_FACTOR` x the collective timeout, longer than the
timeout itself on purpose: a rank blocked in a collective waits for a stuck
peer, and its collective fails first (after ``timeout_s``, the process group's
timeout); it stops its own watchdog and lingers (:func:`peer_lost_linger`)
until the stuck peer's watchdog has fired, so the run names the rank that hung,
not the ones that waited for it. The training loop re-arms the timer at every
step and before every evaluation and checkpoint write (:meth:`Watchdog.kick`),
so the deadline bounds each step, each collective and each checkpoint write.
"""

from __future__ import annotations

import faulthandler
import signal
from pathlib import Path
from typing import IO

#: A worker that makes no progress for STUCK_FACTOR x ``timeout_s`` seconds is stopped.
STUCK_FACTOR = 1.5
#: After its collective failed, a worker lingers this long (beyond a stuck peer's deadline
#: when the collective timed out), so that the launcher sees the peer fail first.
LINGER_MARGIN_S = 2.0


def stuck_after(timeout_s: float) -> float:
    """Seconds without progress after which a worker's watchdog stops it."""
    return STUCK_FACTOR * timeout_s


def peer_lost_linger(timeout_s: float) -> float:
    """Seconds a worker whose collective failed waits before it exits as collateral damage.

    Its collective failed ``timeout_s`` after it began; a peer stuck since about
    then is stopped by its watchdog ``stuck_after(timeout_s)`` after its last step
    began, so lingering the difference plus a margin lets the launcher see that
    peer first. Bounded: a hang ends the run within ``2 x timeout_s`` plus the margin.
    """
    return stuck_after(timeout_s) - timeout_s + LINGER_MARGIN_S


def watchdog_path(out: Path, rank: int) -> Path:
    """Where rank ``rank``'s stack goes when its watchdog fires."""
    return Path(out) / f"watchdog-rank{rank}.txt"


class Watchdog:
    """Stops this worker with its stack saved when it makes no progress for ``seconds``.

    Main thread only (it installs a signal handler). ``start()`` prepares the file and
    the handler, disarmed; ``kick()`` (re)arms the deadline; ``pause()`` disarms it;
    ``stop()`` disarms it, restores SIGALRM and removes the file (nothing happened).
    """

    def __init__(self, out: Path, rank: int, timeout_s: float) -> None:
        self.path = watchdog_path(out, rank)
        self.rank = rank
        self.timeout_s = timeout_s
        self.seconds = stuck_after(timeout_s)
        self._file: IO[str] | None = None

    def start(self) -> None:
        self._file = self.path.open("w")
        self._file.write(
            f"gia-bench train: worker rank {self.rank} made no progress for {self.seconds:g} s"
            f" ({STUCK_FACTOR:g} x the collective timeout of {self.timeout_s:g} s) and was stopped;"
            " its threads' stacks, most recent call first:\n"
        )
        self._file.flush()
        # a forked worker inherits its launcher's SIGALRM handler (pytest-timeout installs one);
        # the default action is what ends the process once faulthandler has written the stacks
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        faulthandler.register(signal.SIGALRM, file=self._file, all_threads=True, chain=True)

    def kick(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def pause(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    def stop(self) -> None:
        self.pause()
        if self._file is None:
            return
        faulthandler.unregister(signal.SIGALRM)
        self._file.close()
        self._file = None
        self.path.unlink(missing_ok=True)


def stuck_message(out: Path, rank: int, timeout_s: float) -> str | None:
    """The launcher's line for a worker its watchdog stopped (killed by SIGALRM, stack saved), else None."""
    path = watchdog_path(out, rank)
    if not path.is_file():
        return None
    return (
        f"worker rank {rank} made no progress for {stuck_after(timeout_s):g} s (stuck in a collective, a step or"
        f" a checkpoint write; --collective-timeout {timeout_s:g}) and was stopped; its stack: {path}"
    )


def remove_stack_files(out: Path, keep: frozenset[int] = frozenset()) -> None:
    """Remove ``watchdog-rank*.txt`` left in ``out`` (by a worker that crashed), except those of ``keep``."""
    for path in Path(out).glob("watchdog-rank*.txt"):
        rank = path.stem.removeprefix("watchdog-rank")
        if not (rank.isdigit() and int(rank) in keep):
            path.unlink(missing_ok=True)
