"""Units of work: what an engine runs, where it reads and writes, and how its files land.

A study is a set of independent *units* (a capture, an attack, a training run), some of
which wait for others (an attack waits for the records its capture or training writes).
A unit is plain data: the function to call (a public module-level function, which pickles
by its module and name, so any engine can run it in any process or on any node), its
arguments, the files it reads and the files that say it is finished, all as paths
relative to the study folder. Engines differ only in
*where* a unit runs; what lands in the study folder is the same:

- A *staged* unit writes into a private folder (``ctx.outputs``); only when it has
  finished are its files moved into the study folder, the ``outputs`` (its completion
  markers) last. An interrupted unit therefore leaves nothing behind, and a unit whose
  markers exist is finished: a rerun skips it. Where existing markers are not enough,
  ``done_check`` decides: an attack unit is finished only when its ``result.json`` is
  of the record now in the study folder (:func:`gia_bench.evaluate.result_is_current`;
  a record replaced since is attacked again, its staged result replacing the old one).
- An *in-place* unit (``workdir`` set; the trainer, which checkpoints and resumes on its
  own) writes into its folder directly; a cancelled one loses only its temp files.

On Ray (no shared file system) the unit's inputs travel to the task as bytes, its output
files come back as bytes, and the driver writes them with the same ordering
(:func:`write_files`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gia_bench.errors import GiaBenchError
from gia_bench.io import atomic_write_bytes

#: Staging folders of units in flight, under the study folder (removed when a run starts).
STAGING_DIR = ".staging"


class EngineError(GiaBenchError):
    """An engine cannot run (Ray missing, a cluster that does not answer)."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of work. Paths are relative to the study folder (``root``).

    Args:
        kind: what it is (``capture``, ``attack``, ``train``; engines treat kinds alike).
        key: unique and stable across runs (a rerun finds the same unit).
        fn: a module-level function, called as ``fn(ctx, **args)`` (it travels to workers by reference).
        args: keyword arguments (picklable).
        outputs: files that exist once the unit has finished (written last).
        inputs: files (or folders, read recursively) the unit reads from the study folder.
        deps: keys of units that must have finished first.
        label: what progress shows (``defense``, ``attack``, ``view``, ``record``, ``step``...).
        cpus, gpus: resources it needs (a Ray request; local slots for ``cpus``).
        workdir: set for an in-place unit: the folder it writes into directly.
        done_check: a module-level ``(root, unit) -> bool`` when existing outputs are not enough
            (a training run's epochs, an attack result's identity); asked when the unit becomes
            ready, so its dependencies' files are there to check against.
    """

    kind: str
    key: str
    fn: Callable[..., None]
    args: Mapping[str, Any]
    outputs: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    deps: tuple[str, ...] = ()
    label: tuple[tuple[str, str], ...] = ()
    cpus: int = 1
    gpus: int = 0
    workdir: str | None = None
    done_check: Callable[[Path, Unit], bool] | None = None

    def describe(self) -> str:
        """``key=value`` pairs of the label, for progress lines and failures."""
        return " ".join(f"{k}={v}" for k, v in self.label) or self.key

    def is_done(self, root: Path) -> bool:
        if self.done_check is not None:
            return bool(self.done_check(root, self))
        return all((root / p).exists() for p in self.outputs)


@dataclasses.dataclass(frozen=True)
class UnitContext:
    """Where a unit reads and writes, and the run-wide options every unit gets.

    ``inputs`` is the root the unit's ``inputs`` are read from (the study folder, or a
    copy of them on a Ray node); ``outputs`` the root it writes under (a staging folder
    or, for an in-place unit, the same as ``inputs``). ``plugins`` are the
    ``module:Class`` names the user trusted on the command line (``--plugin``).
    """

    inputs: Path
    outputs: Path
    device: str = "cpu"
    threads: int = 0  # torch threads; 0 leaves torch's default
    lpips_net: str = "alex"
    lpips_weights: Path | None = None
    plugins: tuple[str, ...] = ()
    fork_ok: bool = True  # may the unit fork this process (the trainer's fast CPU path)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What running a unit gave: the error line (None: success) and the seconds it took."""

    key: str
    error: str | None
    seconds: float


def execute(unit: Unit, ctx: UnitContext) -> Outcome:
    """Run ``unit`` in this process; a failure becomes its one-line error, never an exception.

    KeyboardInterrupt and SystemExit pass through (the engine cancels the unit).
    """
    start = time.perf_counter()
    saved = None
    if ctx.threads > 0:
        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(ctx.threads)
    try:
        unit.fn(ctx, **dict(unit.args))
    except GiaBenchError as exc:
        return Outcome(unit.key, str(exc) or type(exc).__name__, time.perf_counter() - start)
    except Exception as exc:  # one broken unit must not stop the study; it is listed as failed
        return Outcome(unit.key, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    finally:
        if saved is not None:
            import torch

            torch.set_num_threads(saved)
    return Outcome(unit.key, None, time.perf_counter() - start)


# -- files -----------------------------------------------------------------------------------------


def staging_dir(root: Path, unit: Unit) -> Path:
    """The private folder a staged unit writes into (one per unit key)."""
    import hashlib

    return root / STAGING_DIR / hashlib.sha256(unit.key.encode()).hexdigest()[:20]


def _markers_last(unit: Unit, rels: list[str]) -> list[str]:
    markers = set(unit.outputs)
    return sorted(rels, key=lambda r: (r in markers, r))


@contextmanager
def no_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C back while files are moved, so a commit is never cut in half.

    The Python-level handler runs only in the main thread; elsewhere nothing can interrupt.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def commit_staged(root: Path, unit: Unit, staging: Path) -> None:
    """Move a finished unit's files from its staging folder into the study folder, markers last."""
    rels = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()]
    for rel in rels:  # a file that names its own folder names it in the study folder
        if rel.endswith(".json"):
            data = (staging / rel).read_bytes()
            fixed = relocate_json(data, str(staging), str(root))
            if fixed is not data:
                atomic_write_bytes(staging / rel, fixed)
    with no_interrupt():
        for rel in _markers_last(unit, rels):
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, dest)
    shutil.rmtree(staging, ignore_errors=True)


def write_files(root: Path, unit: Unit, files: Mapping[str, bytes]) -> None:
    """Write a unit's files (relative path -> bytes, e.g. back from a Ray task) atomically, markers last."""
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise GiaBenchError(f"unit {unit.key}: refuses to write outside the study folder ({rel!r})")
    with no_interrupt():
        for rel in _markers_last(unit, list(files)):
            atomic_write_bytes(root / rel, files[rel])


def remove_partial(root: Path, unit: Unit) -> None:
    """Remove what a cancelled unit leaves: its staging folder, or the temp files in its workdir."""
    if unit.workdir is None:
        shutil.rmtree(staging_dir(root, unit), ignore_errors=True)
        return
    for tmp in (root / unit.workdir).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def read_inputs(root: Path, unit: Unit) -> dict[str, bytes]:
    """The bytes of every file the unit reads (folders recursively), keyed by relative path."""
    files: dict[str, bytes] = {}
    paths = list(unit.inputs) + ([unit.workdir] if unit.workdir else [])
    for rel in paths:
        path = root / rel
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and not p.name.endswith(".tmp"):
                    files[p.relative_to(root).as_posix()] = p.read_bytes()
        elif path.is_file():
            files[rel] = path.read_bytes()
    return files


def relocate_json(data: bytes, old: str, new: str) -> bytes:
    """Paths written while a unit ran under ``old`` (a Ray node's temp folder) as if under ``new``.

    Only JSON strings that are such paths change, so a result written on another node
    names the file in the study folder exactly as a local run would.
    """
    try:
        doc = json.loads(data)
    except ValueError:
        return data

    def fix(value: Any) -> Any:
        if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
            return new + value[len(old) :]
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    fixed = fix(doc)
    if fixed == doc:
        return data
    return (json.dumps(fixed, indent=2) + ("\n" if data.endswith(b"\n") else "")).encode()
