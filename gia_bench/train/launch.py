"""The launcher: torchrun's elastic agent starts the workers; a failure is attributed to one worker."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gia_bench.errors import ConfigError
from gia_bench.event_relay import relay
from gia_bench.events import SILENT, Events
from gia_bench.io import atomic_write_json
from gia_bench.threads import pause_openmp
from gia_bench.train.checkpoint import check_resume, checkpoint_note
from gia_bench.train.config import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    PEER_LOST_EXIT_CODE,
    TrainConfig,
    TrainError,
    _nnodes,
    load_data,
    planned_steps,
)
from gia_bench.train.loop import run_worker
from gia_bench.train.progress import EVENTS_FILE
from gia_bench.train.watchdog import remove_stack_files, stuck_message

# Forking safely. A forked worker inherits every object of the launching process, among
# them garbage that no collection has freed yet: a TCPStore of an earlier elastic_launch's
# rendezvous (or of this one's), whose destructor joins its libuv thread. That thread does
# not exist in the child, so a garbage collection in the worker that frees the store hangs
# in std::thread::join or aborts (seen: `python -m pytest` stuck in save_checkpoint at 96%).
# Two layers, because garbage is also made during the launch, after any collection here:
#  1. the launching process collects its garbage before the agent starts (there the
#     destructors run normally, their threads alive) and does not fork at all while it holds
#     a process group of its own (_fork_unsafe: the workers spawn instead);
#  2. every child forked during a launch freezes the garbage collector first thing
#     (os.register_at_fork runs it in the child right after fork(), before any Python code):
#     gc.freeze() moves every inherited object to the permanent generation, which no
#     collection in the child ever examines, so nothing the parent owned is finalized there.
#     Inherited objects are never freed in the worker; the worker exits with os._exit, so
#     nothing is lost, and the pages stay shared with the parent (copy-on-write).
# A forkserver would also give clean workers, but each launch would pay for a fresh
# interpreter importing torch, which is what fork=True exists to avoid.
_forking_launches = 0
_forking_lock = threading.Lock()


def _freeze_inherited_objects() -> None:
    if _forking_launches:
        gc.freeze()


os.register_at_fork(after_in_child=_freeze_inherited_objects)


def launch(config: TrainConfig, fork: bool = False, events: Events = SILENT) -> dict[str, Any]:
    """Run training with ``nproc_per_node`` workers through torchrun's elastic agent; returns metrics.json.

    Workers are ``python -m gia_bench.train CONFIG`` processes, as torchrun starts
    them. ``fork=True`` forks this process instead (same :func:`run_worker`; saves
    the seconds each fresh interpreter spends importing torch, which matters for
    short CPU runs such as tests; not with CUDA, which does not survive a fork).

    Raises :class:`TrainError` with one line (which worker, its exit code, the last
    checkpoint) when a worker fails.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    config_path = _prepare(config)
    out = config.out
    # our own one-line TrainError says which worker failed; the agent's log lines would repeat it
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    threads = str(config.threads_per_worker)
    saved_env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = threads  # workers inherit it; torch's launcher would print a warning otherwise
    if fork and _fork_unsafe():
        # Ray / gRPC keep native threads that a forked child inherits mid-operation: forked
        # workers hung in torch.save after a Ray test had run in the same process. A process
        # group of the caller's would be inherited too. Spawn instead.
        fork = False
    remove_stack_files(out)  # stacks of an earlier run's stuck workers: this run's failure names its own
    (out / EVENTS_FILE).unlink(missing_ok=True)  # a killed run's: rank 0 writes events only while we listen
    try:
        with relay(events, out / EVENTS_FILE):
            _run_agent(config, config_path, fork)
    except SignalException as exc:
        # torch's agent turns SIGINT/SIGTERM into this after stopping the workers: Ctrl-C is an
        # interruption (the CLI says what was kept), any other signal a one-line failure
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise TrainError(f"stopped by signal {exc.sigval.name}; {checkpoint_note(out)}") from None
    except ChildFailedError as exc:
        raise _failure(exc, config) from None
    finally:
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env
    try:
        return json.loads((out / METRICS_FILE).read_text())
    except FileNotFoundError:
        raise TrainError(f"{out / METRICS_FILE}: the workers finished without writing metrics") from None


def _prepare(config: TrainConfig) -> Path:
    """Check the run before any worker starts, create its folder and write its config; returns the config's path."""
    config.validate()
    min_nodes, max_nodes = _nnodes(config.nnodes)
    if config.capture_steps and min_nodes == max_nodes:
        # a step past the end fails here, with its flag, not in a worker
        config.capture_plan(planned_steps(config, config.nproc_per_node * min_nodes))
    out = config.out
    if not config.resume and ((out / METRICS_FILE).exists() or (out / CHECKPOINT_FILE).exists()):
        raise ConfigError(f"--out {out}: already holds a run; pass --resume to continue it or choose another folder")
    check_resume(config)  # field by field, before any worker starts: one line naming the file and the field
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / CONFIG_FILE
    atomic_write_json(config_path, config.to_json())
    return config_path


def _run_agent(config: TrainConfig, config_path: Path, fork: bool) -> None:
    """Start the workers through torchrun's elastic agent and wait for them (forked or spawned)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    global _forking_launches
    min_nodes, max_nodes = _nnodes(config.nnodes)
    standalone = max_nodes == 1 and not config.rdzv_endpoint
    launch_config = LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=config.nproc_per_node,
        run_id=config.rdzv_id or (uuid.uuid4().hex if standalone else "gia-bench-train"),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if standalone else str(config.rdzv_endpoint),
        max_restarts=0,
        monitor_interval=0.1,
        start_method="fork" if fork else "spawn",
    )
    if not fork:
        elastic_launch(launch_config, sys.executable)("-u", "-m", "gia_bench.train", str(config_path))
        return
    if torch.cuda.is_initialized():
        raise ConfigError("launch(fork=True): CUDA is already initialised in this process; use fork=False")
    # Load the data here once so that its modules (scikit-learn, joblib, cloudpickle...) are imported
    # before the fork: a forked child that imports while the parent's threads hold locks can hang
    # (seen: workers stuck in importlib under load once cloudpickle was installed).
    load_data(config)
    gc.collect()  # layer 1 above: free earlier runs' stores here, where their threads exist
    pause_openmp()  # libgomp's thread pool does not survive a fork: a child on > 1 thread would hang
    with _forking_lock:
        _forking_launches += 1
    try:
        elastic_launch(launch_config, _forked_worker)(str(config_path))
    finally:
        with _forking_lock:
            _forking_launches -= 1


def _failure(exc: Any, config: TrainConfig) -> TrainError:
    """The one-line error of a failed run: the worker that failed first on its own (``exc``: ChildFailedError).

    Not one that lost a peer (exit 75) or that the agent terminated (SIGTERM) after the first
    failure; a worker that its watchdog stopped (killed by SIGALRM, its stack saved) hung, and
    that is the cause. Among several, the earliest.
    """
    out = config.out

    def collateral(f) -> bool:  # noqa: ANN001
        return f.exitcode in (PEER_LOST_EXIT_CODE, -signal.SIGTERM)

    stuck = {
        r: line for r, f in exc.failures.items()
        if f.exitcode == -signal.SIGALRM and (line := stuck_message(out, r, config.timeout_s))
    }
    remove_stack_files(out, keep=frozenset(stuck))
    if stuck:
        rank = min(stuck, key=lambda r: (exc.failures[r].timestamp, r))
        return TrainError(f"{stuck[rank]}; {checkpoint_note(out)}")
    causes = {r: f for r, f in exc.failures.items() if not collateral(f)}
    if not causes:
        lost = ", ".join(map(str, sorted(exc.failures)))
        return TrainError(
            f"worker rank(s) {lost} lost a peer in a collective or were stopped after another worker"
            f" failed; {checkpoint_note(out)}"
        )
    rank, failure = min(causes.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
    how = (
        f"was killed by signal {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    )
    return TrainError(f"worker rank {rank} {how}; {checkpoint_note(out)}")


def _fork_unsafe() -> bool:
    """True when forking this process is unsafe: Ray / gRPC threads, or a process group of its own."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    return any(name in sys.modules for name in ("ray", "grpc", "flwr"))


def _quiet_ctrl_c() -> None:
    """A worker stops on Ctrl-C without a traceback: a terminal's SIGINT reaches the whole process
    group, the launcher's agent passes it on to every worker as it shuts them down, and the CLI
    prints the one line that says what was kept. Exit code 130, as a shell gives an interrupted job.
    ``os._exit``, not an exception: a peer interrupted inside a collective would otherwise unwind
    through the comm hook with a traceback; checkpoints and records are written by rename, so
    leaving at any point keeps the last complete one."""

    def stop(signum: int, frame: object) -> None:
        os._exit(130)

    signal.signal(signal.SIGINT, stop)


def _forked_worker(config_path: str) -> None:
    _quiet_ctrl_c()
    run_worker(TrainConfig.from_json(json.loads(Path(config_path).read_text())))


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m gia_bench.train CONFIG.json`` (started by :func:`launch`)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m gia_bench.train CONFIG.json  (started by gia-bench train / torchrun)")
    config = TrainConfig.from_json(json.loads(Path(args[0]).read_text()))
    _quiet_ctrl_c()
    record(run_worker)(config)


if __name__ == "__main__":
    main()
