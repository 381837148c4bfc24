"""How many threads torch may use: one policy for the CLI, study units and the trainer.

Why: torch's intra-op pool starts one thread per core, and its OpenMP threads wait for
each other at the end of every parallel region. When other processes keep the cores busy
(other jobs, or this run's own workers), a thread that loses its core holds up every
region it is part of: ``gia-bench attack`` took 89.2 s at torch's default against 3.3 s
with ``OMP_NUM_THREADS=1`` for the same record on 2 cores at load 4.3.

The policy (:func:`choose_threads`):

1. An explicit setting wins: the caller's ``requested`` (a flag such as
   ``--threads-per-worker``), else ``OMP_NUM_THREADS``.
2. Otherwise: the cores this process may run on (``os.sched_getaffinity``), less the
   cores other processes keep busy (the larger of the 1-minute load average and the
   threads runnable right now besides this one, rounded), shared among the ``processes``
   the caller runs side by side; at least 1, and never more than torch's own default
   (``ceiling``), so an idle machine runs exactly as before.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from pathlib import Path

#: Reads of the runnable count (``/proc/loadavg``) whose median counts as "now" (one read is noisy).
_SAMPLES = 5
_SAMPLE_GAP_S = 0.005


def explicit_threads(environ: dict[str, str] | None = None) -> int | None:
    """``OMP_NUM_THREADS`` when it holds a positive integer (OpenMP's own reading of it), else None."""
    value = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def _runnable_now() -> float | None:
    """Threads runnable on this machine right now besides this one (median of a few reads), or None."""
    reads = []
    for i in range(_SAMPLES):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            reads.append(max(0, int(running) - 1))  # the reader itself is running
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < _SAMPLES:
            time.sleep(_SAMPLE_GAP_S)
    return statistics.median(reads)


def busy_cores() -> float:
    """Cores other processes keep busy: the larger of the 1-minute load average and the threads runnable now.

    The load average lags a minute behind a job that just started; the runnable count
    sees it at once but is noisy, hence the median of a few reads.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    now = _runnable_now()
    return max(load, now or 0.0)


def choose_threads(
    processes: int = 1,
    requested: int | None = None,
    *,
    cores: int | None = None,
    busy: float | None = None,
    ceiling: int | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    """Torch intra-op threads for each of ``processes`` processes the caller runs; see the module docstring.

    ``cores``, ``busy``, ``ceiling`` and ``environ`` default to this machine's (they are
    parameters so that the rule can be checked on any machine); ``ceiling`` None means
    no cap beyond the cores.
    """
    if requested is not None and requested > 0:
        return requested
    explicit = explicit_threads(environ)
    if explicit is not None:
        return explicit
    cores = available_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    free = cores - int(busy + 0.5)
    share = max(1, free // max(1, processes))
    cap = max(1, cores // max(1, processes))
    if ceiling is not None:
        cap = min(cap, max(1, ceiling))
    return min(share, cap)


def torch_default_threads() -> int:
    """The intra-op threads torch runs with now (its own default unless something set it)."""
    import torch

    return torch.get_num_threads()


def apply_threads(processes: int = 1, requested: int | None = None) -> int:
    """Set this process's torch threads by :func:`choose_threads` (capped at torch's default); returns them."""
    import torch

    threads = choose_threads(processes, requested, ceiling=torch_default_threads())
    torch.set_num_threads(threads)
    return threads


def pause_openmp() -> bool:
    """Stop GNU OpenMP's thread pools in this process (True when none is left running).

    After torch has run an operation on several threads, libgomp keeps a pool of threads
    that a forked child does not have; the child's next parallel region on more than one
    thread then hangs forever (measured: torch 2.14, a matmul in the child). OpenMP 5.0's
    ``omp_pause_resource_all(omp_pause_hard)`` ends the pool; the next parallel region here
    starts a new one. Every libgomp this process loaded has its own pool (torch's,
    scikit-learn's). OpenBLAS and Intel/LLVM OpenMP handle a fork themselves. Call it
    right before forking a child that may run torch on more than one thread.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    libs = {line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}
    for lib in sorted(libs):
        try:
            pause = ctypes.CDLL(lib).omp_pause_resource_all
        except (OSError, AttributeError):  # an old libgomp without OpenMP 5.0's pause
            return False
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        if pause(2) != 0:  # 2: omp_pause_hard
            return False
    return True
