"""``--engine ray``: every unit a Ray task, on a running cluster (``--address``) or a local Ray.

Ray decides where a task runs from the unit's request (``num_cpus``; one GPU for a CUDA
attack; ``nproc_per_node`` GPUs for a training unit, which launches its workers on the
node it lands on). Nothing assumes a shared file system:

1. the driver reads the files a unit needs (a record and its truth file; a training
   run's folder when it resumes) and puts them in Ray's object store, once per file;
2. the task writes them into a temp folder on its node, runs the unit there (the same
   function the local engine calls), and returns the bytes of every file the unit
   produced, JSON paths rewritten from the temp folder to the study folder;
3. the driver writes them atomically into the study folder, completion markers last.

So a rerun submits only the units whose outputs are missing, exactly like the local
engine, and the files are the same. Ctrl-C cancels the tasks in flight (``ray.cancel``
with ``force=True``) and keeps everything already written.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gia_bench.engines.driver import Driver, RunResult, ignore_interrupts
from gia_bench.engines.progress import Reporter
from gia_bench.engines.scheduler import Scheduler
from gia_bench.engines.units import EngineError, Outcome, Unit, UnitContext, execute, read_inputs, relocate_json

INSTALL_HINT = "pip install 'gia-bench[ray]'"


def require_ray() -> Any:
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise EngineError(f"--engine ray: Ray is not installed; {INSTALL_HINT}") from None
    return ray


def _collect(base: Path, rel_to: Path, prefixes: tuple[str, ...], origin: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    if not base.exists():
        return files
    for path in sorted(base.rglob("*")):
        if not path.is_file() or path.name.endswith(".tmp"):
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            for prefix in prefixes:
                data = relocate_json(data, prefix, origin)
        files[path.relative_to(rel_to).as_posix()] = data
    return files


def run_task(unit: Unit, ctx: UnitContext, origin: str, names: list[str], lpips: bytes | None,
             *blobs: bytes) -> tuple[Outcome, dict[str, bytes] | None]:
    """The Ray task: materialise the inputs, run the unit, return its files (see the module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="gia-bench-unit-"))
    try:
        src = tmp / "study"
        src.mkdir()
        for rel, data in zip(names, blobs, strict=True):
            path = src / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        out = src if unit.workdir is not None else tmp / "out"
        weights = None
        if lpips is not None:
            weights = tmp / "lpips.pth"
            weights.write_bytes(lpips)
        run_ctx = dataclasses.replace(
            ctx, inputs=src, outputs=out, threads=max(1, unit.cpus), fork_ok=False, lpips_weights=weights
        )
        outcome = execute(unit, run_ctx)
        if outcome.error is not None:
            return outcome, None
        prefixes = (str(out), str(src))
        if unit.workdir is not None:
            return outcome, _collect(src / unit.workdir, src, prefixes, origin)
        return outcome, _collect(out, out, prefixes, origin)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RayEngine(Driver):
    """See the module docstring."""

    def __init__(self, sched: Scheduler, ctx: UnitContext, reporter: Reporter, address: str | None = None) -> None:
        super().__init__(sched, ctx, reporter)
        self.address = address
        self.ray = require_ray()
        self._refs: dict[str, Any] = {}  # input file -> its object in the store (each file sent once)

    def _connect(self) -> bool:
        ray = self.ray
        if ray.is_initialized():
            return False
        quiet = logging.getLogger("ray")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # ray.init's notices would break the progress lines
        try:
            ray.init(
                address=self.address,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
        except ConnectionError as exc:
            raise EngineError(f"--address {self.address}: cannot connect to a Ray cluster ({exc})") from None
        except Exception as exc:  # Ray raises a bare Exception when its local node does not come up
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise EngineError(f"--engine ray: {where} did not start ({first})") from None
        finally:
            quiet.setLevel(level)
        return True

    def _inputs(self, unit: Unit) -> tuple[list[str], list[Any]]:
        names, refs = [], []
        for rel, data in read_inputs(self.root, unit).items():
            fresh = unit.workdir is not None and rel.startswith(unit.workdir.rstrip("/") + "/")
            if fresh or rel not in self._refs:
                ref = self.ray.put(data)
                if fresh:  # a resuming run's folder changes between runs: not cached
                    names.append(rel)
                    refs.append(ref)
                    continue
                self._refs[rel] = ref
            names.append(rel)
            refs.append(self._refs[rel])
        return names, refs

    def run(self) -> RunResult:
        ray = self.ray
        started = self._connect()
        task = ray.remote(run_task)
        origin = str(self.root)
        lpips = None
        if self.ctx.lpips_weights is not None:
            lpips = ray.put(Path(self.ctx.lpips_weights).read_bytes())
        inflight: dict[Any, Unit] = {}
        try:
            while True:
                with self.lock:
                    ready = self.sched.take_all()
                for unit in ready:
                    names, refs = self._inputs(unit)
                    ref = task.options(
                        num_cpus=max(unit.cpus, 0), num_gpus=unit.gpus, max_retries=0, name=f"gia-bench {unit.kind}"
                    ).remote(unit, self.context(unit), origin, names, lpips, *refs)
                    inflight[ref] = unit
                    self.started(unit)
                if not inflight:
                    break
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in done:
                    unit = inflight.pop(ref)
                    try:
                        outcome, files = ray.get(ref)
                    except Exception as exc:  # the task died (node lost, out of memory, a crash)
                        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        outcome, files = Outcome(unit.key, f"Ray task failed: {line[:300]}", 0.0), None
                    with self.lock:
                        self.complete(unit, outcome, files if files is not None else {})
        except BaseException:
            with ignore_interrupts():
                for ref in inflight:
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:  # already finished or gone: nothing left to cancel
                        pass
                with self.lock:
                    self.cancel_all()
            raise
        finally:
            self._refs.clear()
            if started:
                with ignore_interrupts():
                    ray.shutdown()
        return self.result

