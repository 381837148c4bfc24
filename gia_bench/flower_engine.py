"""Flower's simulation engine, run so that Ctrl-C stops it: the default engine of ``gia-bench federated``.

``flwr.simulation.run_simulation`` run in the main thread ignores Ctrl-C (see
:func:`flower_simulation`); this module runs it in a thread the main thread can leave.
"""

from __future__ import annotations

import logging
from typing import Any

from gia_bench.errors import GiaBenchError


def flower_simulation(server_app: Any, client_app: Any, num_supernodes: int, backend_config: dict[str, Any]) -> None:
    """Flower's simulation engine (``flwr.simulation.run_simulation``, Ray underneath): the default :data:`gia_bench.federated.Engine`.

    Ctrl-C stops it within seconds, raising :class:`KeyboardInterrupt`. Run in the main
    thread, Flower swallows it: the interrupt lands in its thread pool's ``shutdown(wait=True)``,
    whose workers wait for a stop event that is set only after that wait (a second Ctrl-C,
    or SIGKILL, was needed). So the simulation runs in a daemon thread, the main thread
    waits for it with Python's own SIGINT handler in place, and on Ctrl-C sets Flower's stop
    event and shuts Ray down. The rounds finished before stay: their records were written
    atomically as each round was aggregated.
    """
    import signal
    import threading

    from flwr.simulation import run_simulation

    failed: list[BaseException] = []

    def simulate() -> None:
        try:
            run_simulation(
                server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                backend_config=backend_config,
            )
        except SystemExit as exc:  # Flower's own exit (flwr_exit) on a missing extra or a failed app
            failed.append(GiaBenchError(f"Flower's simulation exited with code {exc.code} (see its errors above)"))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread below)
            failed.append(exc)

    thread = threading.Thread(target=simulate, name="gia-bench-flower-simulation", daemon=True)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
    # Ray notes that it set no SIGTERM handler outside the main thread; this wait handles the signals
    ray_worker_log = logging.getLogger("ray._private.worker")
    ray_worker_log.addFilter(_no_sigterm_note)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        _stop_simulation(thread)
        raise
    finally:
        ray_worker_log.removeFilter(_no_sigterm_note)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if failed:
        raise failed[0]


def _no_sigterm_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")


def _stop_simulation(thread: Any, wait_s: float = 3.0) -> None:
    """Set Flower's stop event (the ``f_stop`` its simulation loops poll) in ``thread``'s frames; shut Ray down.

    Each step is best effort and bounded in time: Ctrl-C must end the command within seconds.
    """
    import sys
    import threading

    frame = sys._current_frames().get(thread.ident) if thread.ident is not None else None
    while frame is not None:
        stop = frame.f_locals.get("f_stop")
        if isinstance(stop, threading.Event):
            stop.set()
            break
        frame = frame.f_back

    def shutdown() -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001  (a Ray half torn down by the same Ctrl-C: nothing left to stop)
            pass

    stopper = threading.Thread(target=shutdown, name="gia-bench-ray-shutdown", daemon=True)
    stopper.start()
    stopper.join(wait_s)
