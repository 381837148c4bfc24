"""``--engine local``: this process plus a pool of warm worker processes on this machine.

With ``workers = N`` the run holds N slots. The driver process itself is one of them: it
runs units inline from the first second. The other N-1 slots are worker processes that
start warm, with torch and gia-bench already imported, in one of two ways:

1. Forked from the driver itself, before its first unit: the driver imports what units
   need (:mod:`gia_bench.engines.preload`), which it would do for its own first unit
   anyway, then forks. A worker costs a fork (milliseconds, pages shared copy-on-write),
   not a second import of torch, so it takes units from the start and ``--workers 2`` is
   never slower than ``--workers 1``, even on a study of a few seconds. Done while forking
   is safe (:func:`fork_safe`): Linux, this thread the process's only one, CUDA not
   initialised, no Ray/gRPC/Flower threads, and GNU OpenMP's thread pools stopped first
   (:func:`_pause_openmp`).
2. Otherwise, and for a replacement of a worker that died mid-run: forked from a
   forkserver that imported torch and gia-bench once (the spawn start method made each
   worker re-import torch: 4.2 CPU s, 820 MiB each). It starts in the background while the
   driver works; its imports share the machine's cores with the driver's units.

A unit that needs several CPUs (a training run of ``nproc_per_node`` processes) or writes
in place runs in a worker once enough slots are free; units leave in plan order, so
nothing overtakes it.

Ctrl-C (SIGINT reaches only the driver: workers lead their own process groups): the
driver kills the process group of every busy worker, removes the partial files of the
units in flight, keeps everything finished, and re-raises KeyboardInterrupt, all within
a second or two. Workers die with the driver even on SIGKILL (see
:mod:`gia_bench.engines.worker`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from multiprocessing.connection import wait
from typing import Any

from gia_bench.engines.driver import Driver, RunResult, ignore_interrupts, pending
from gia_bench.engines.progress import Reporter
from gia_bench.engines.scheduler import Scheduler
from gia_bench.engines.units import Outcome, Unit, UnitContext, execute
from gia_bench.threads import choose_threads, torch_default_threads
from gia_bench.threads import pause_openmp as _pause_openmp

_PRELOAD = ["gia_bench.engines.preload"]
_preload_set = False


def mp_context() -> Any:
    """A forkserver that preloads torch and gia-bench where the platform has one, else spawn."""
    global _preload_set
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if not _preload_set:
        ctx.set_forkserver_preload(_PRELOAD)
        _preload_set = True
    return ctx


@dataclasses.dataclass
class _Worker:
    proc: Any
    conn: Any
    ready: bool = False
    unit: Unit | None = None


#: Libraries whose background native threads make a fork unsafe at any time (see
#: gia_bench.train.launch): with one of them loaded the workers come from the forkserver.
_FORK_UNSAFE = ("ray", "grpc", "flwr")


def fork_safe() -> bool:
    """May the driver fork its workers from itself now? See the module docstring, way 1."""
    if not (
        sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.current_thread() is threading.main_thread()  # PR_SET_PDEATHSIG follows the forking thread
        and threading.active_count() == 1
        and not any(name in sys.modules for name in _FORK_UNSAFE)
    ):
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()  # a forked child cannot use CUDA


def pool_size(sched: Scheduler, workers: int) -> int:
    """Worker processes a run needs: N-1, none for one unit, at least one for a unit the driver cannot run."""
    todo = pending(sched)
    size = 0 if workers == 1 or len(todo) <= 1 else workers - 1
    if any(not _inline_ok(u) for u in todo):
        size = max(size, 1)
    return size


def _inline_ok(unit: Unit) -> bool:
    """Runs in the driver: one CPU, staged (the trainer forks and resumes in place: a worker)."""
    return unit.cpus <= 1 and unit.workdir is None


def _forked_main(conn: Any, driver_pid: int, inherited: list[Any]) -> None:
    """A worker forked from the driver: drop the pipe ends it inherited (the driver's), then serve."""
    from gia_bench.engines.worker import worker_main

    for other in inherited:
        with contextlib.suppress(OSError):
            other.close()
    worker_main(conn, driver_pid)


def fork_workers(n: int) -> list[_Worker]:
    """Fork ``n`` warm workers from this process when :func:`fork_safe`, else none (the forkserver starts them).

    Call before any other thread starts (the progress display's) and before the run's first
    unit. Imports what units need first, so the workers share those pages.
    """
    if n <= 0 or not fork_safe():
        return []
    import importlib

    importlib.import_module(_PRELOAD[0])
    if not fork_safe() or not _pause_openmp():  # an import started a thread after all: the forkserver it is
        return []
    ctx = multiprocessing.get_context("fork")
    workers: list[_Worker] = []
    try:
        for _ in range(n):
            parent, child = ctx.Pipe()
            inherited = [parent] + [w.conn for w in workers]
            proc = ctx.Process(target=_forked_main, args=(child, os.getpid(), inherited), name="gia-bench-worker",
                               daemon=False)
            with warnings.catch_warnings():
                # Python >= 3.12 warns on any fork of a process with native threads; the ones left
                # here are OpenBLAS's idle pool, which shuts itself down around a fork (pthread_atfork)
                warnings.simplefilter("ignore", DeprecationWarning)
                proc.start()
            child.close()
            workers.append(_Worker(proc, parent))
    except BaseException:
        discard(workers)
        raise
    return workers


def discard(workers: list[_Worker]) -> None:
    """End idle workers that never got a unit (their run did not start)."""
    for w in workers:
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(None)
    for w in workers:
        w.proc.join(timeout=1.0)
        if w.proc.exitcode is None:
            _kill(w.proc)
        w.conn.close()


def _kill(proc: Any) -> None:
    """SIGKILL a worker's whole process group (it and what it started), then reap it."""
    if proc.pid is None:
        return
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover - no process groups
            proc.kill()
    except (ProcessLookupError, PermissionError, OSError):
        # a worker killed while it starts has not made its process group yet: kill it alone
        # (else it lived on until the interpreter's exit joined it, seconds later)
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            proc.kill()
    proc.join(timeout=2)


class LocalEngine(Driver):
    """See the module docstring."""

    def __init__(
        self, sched: Scheduler, ctx: UnitContext, reporter: Reporter, workers: int, forked: list[_Worker] = ()
    ) -> None:
        """``forked``: workers :func:`fork_workers` started (the engine owns them from here on)."""
        super().__init__(sched, ctx, reporter)
        self.workers = workers
        self.used = 0  # slots taken by units in flight
        self.pool: list[_Worker] = list(forked)  # they say "ready" once up
        self.pool_broken: str | None = None
        self.stop = threading.Event()
        self.pool_size = max(pool_size(sched, workers), len(self.pool))

    def slots(self, unit: Unit) -> int:
        return min(max(unit.cpus, 1), self.workers)

    def inline_ok(self, unit: Unit) -> bool:
        return _inline_ok(unit)

    def fits(self, unit: Unit) -> bool:
        return self.used + self.slots(unit) <= self.workers

    # -- the driver's own slot ---------------------------------------------------------------

    def run(self) -> RunResult:
        collector = None
        if self.pool_size:
            ctx = mp_context()
            if len(self.pool) < self.pool_size and ctx.get_start_method() == "forkserver":
                # started from the main thread: the forkserver's parent-death signal follows this thread
                from multiprocessing import forkserver

                forkserver.ensure_running()
            collector = threading.Thread(target=self._pool_loop, name="gia-bench-pool", daemon=True)
            collector.start()
        try:
            while True:
                with self.lock:
                    unit = None
                    while not self.sched.settled:
                        unit = self.sched.take(lambda u: (self.inline_ok(u) or self.pool_broken) and self.fits(u))
                        if unit is not None:
                            self.used += self.slots(unit)
                            break
                        self.lock.wait(0.2)
                    if unit is None:
                        break
                self.started(unit)
                outcome = execute(unit, self.context(unit))
                with self.lock:
                    self.used -= self.slots(unit)
                    self.complete(unit, outcome)
        except BaseException:
            with ignore_interrupts():
                self.stop.set()
                with self.lock:
                    for w in self.pool:
                        _kill(w.proc)
                    self.cancel_all()
            raise
        finally:
            self.stop.set()
            with ignore_interrupts():
                self._shutdown(collector)
        return self.result

    # -- the pool ----------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        from gia_bench.engines.worker import worker_main

        ctx = mp_context()
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(child, os.getpid()), name="gia-bench-worker", daemon=False)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _pool_loop(self) -> None:
        try:
            self._serve_pool()
        except Exception as exc:  # a bug here must not leave the driver waiting for units that never end
            with self.lock:
                self.pool_broken = f"{type(exc).__name__}: {exc}"
                for w in self.pool:
                    _kill(w.proc)
                    if w.unit is not None:
                        self.used -= self.slots(w.unit)
                        self.complete(w.unit, Outcome(w.unit.key, f"the worker pool failed ({self.pool_broken})", 0.0))
                self.pool = []
                self.lock.notify_all()

    def _serve_pool(self) -> None:
        try:
            for _ in range(self.pool_size - len(self.pool)):  # what fork_workers did not start
                if self.stop.is_set():
                    break
                worker = self._start_worker()
                with self.lock:
                    self.pool.append(worker)
                    if self.stop.is_set():  # the driver gave up while this one started
                        _kill(worker.proc)
                        return
        except Exception as exc:  # no pool: the driver runs everything itself
            with self.lock:
                self.pool_broken = f"{type(exc).__name__}: {exc}"
                self.lock.notify_all()
            return
        while not self.stop.is_set():
            with self.lock:
                for w in self.pool:
                    if not w.ready or w.unit is not None:
                        continue
                    unit = self.sched.take(self.fits)
                    if unit is None:
                        break
                    self.used += self.slots(unit)
                    w.unit = unit
                    self.started(unit)
                    try:
                        w.conn.send((unit, self.context(unit)))
                    except OSError:  # it died just now: its sentinel fires and the unit is failed there
                        pass
                if self.sched.settled:
                    self.lock.notify_all()
                    return
                waitables = [w.conn for w in self.pool] + [w.proc.sentinel for w in self.pool]
            for ready in wait(waitables, timeout=0.2):
                self._handle(ready)

    def _handle(self, ready: Any) -> None:
        with self.lock:
            if self.stop.is_set():
                return
            worker = next((w for w in self.pool if ready in (w.conn, w.proc.sentinel)), None)
            if worker is None:
                return
            message = None
            if ready is worker.conn or worker.conn.poll():
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    message = None
            if message is not None and message[0] == "ready":
                worker.ready = True
                return
            if message is not None and message[0] == "done":
                unit, worker.unit = worker.unit, None
                self.used -= self.slots(unit)
                self.complete(unit, message[1])
                return
            # the worker died (killed, out of memory, a crash in C code): its unit failed
            worker.proc.join(timeout=1)
            unit, worker.unit = worker.unit, None
            self.pool.remove(worker)
            if unit is not None:
                self.used -= self.slots(unit)
                code = worker.proc.exitcode
                self.complete(unit, Outcome(unit.key, f"its worker process died (exit code {code})", 0.0))
        try:
            replacement = self._start_worker()
        except Exception as exc:
            with self.lock:
                if not self.pool:
                    self.pool_broken = f"{type(exc).__name__}: {exc}"
                    self.lock.notify_all()
            return
        with self.lock:
            if self.stop.is_set():
                _kill(replacement.proc)
            else:
                self.pool.append(replacement)

    def _shutdown(self, collector: threading.Thread | None) -> None:
        if collector is not None:
            # it may be blocked starting a worker until the forkserver's imports finish; it kills
            # that worker itself once started (stop is set), and workers die with this process anyway
            collector.join(timeout=0.2)
        with self.lock:
            workers, self.pool = list(self.pool), []
        for w in workers:
            if w.unit is None:
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
        for w in workers:
            w.proc.join(timeout=1.0 if w.unit is None else 0)
            if w.proc.exitcode is None:
                _kill(w.proc)
            w.conn.close()


def default_threads(workers: int) -> int:
    """torch threads per unit: the cores left free shared among the ``workers`` units side by side (gia_bench.threads)."""
    return choose_threads(workers, ceiling=torch_default_threads())

