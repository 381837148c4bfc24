"""Read what the attacks and the trainer wrote: ``result.json`` and training ``metrics.json`` files.

Reading is strict and forgiving at once: each file is checked against its schema,
and a file that is missing, unreadable or malformed is listed (:class:`Skipped`)
with the reason while the rest is reported.

Attack results are :class:`gia_bench.results.AttackResult` (the schema, old versions
included, is described there), with ``reconstruction.safetensors`` beside each
(tensors ``reconstruction`` (B, C, H, W) in [0, 1], in the originals' order after
pairing, and optionally ``original``).

Training runs (``DIR/metrics.json``, kind ``train``) give test accuracy, its history per
epoch (with ``test_examples`` where the trainer wrote it, for a binomial standard error)
and bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gia_bench.attack_skips import SKIP_FILE, skipped_entry
from gia_bench.results import (
    RESULT_FILE,
    TENSORS_FILE,
    AttackResult,
    Budget,
    MalformedFile,
    Skipped,
    get_field,
    load_images,
    number,
    read_json,
)

TRAIN_NAME = "metrics.json"
TRAIN_SCHEMA = 1

__all__ = [
    "RESULT_FILE", "TENSORS_FILE", "TRAIN_NAME", "AttackResult", "Budget", "EpochPoint", "MalformedFile", "RunSet",
    "Skipped", "TrainRun", "load_images", "load_runs", "parse_result", "parse_train",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EpochPoint:
    """One evaluation of a training run: test accuracy after ``step`` optimizer steps."""

    epoch: int
    step: int
    test_accuracy: float
    test_examples: int | None  # None in runs written before the trainer recorded it
    bytes_sent_per_worker: int  # during this epoch


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """One training run's ``metrics.json``: its final test accuracy and bytes, and the accuracy history."""

    path: Path
    dataset: str
    model: str
    defense: str
    world_size: int
    final_test_accuracy: float
    #: bytes a worker sent per step; a lone worker sends nothing, so for one its messages' size
    #: (``payload_bytes_per_worker`` / steps): what it would send beside peers
    bytes_per_step: float
    bytes_sent_per_worker: int
    steps: int
    seconds: float
    history: tuple[EpochPoint, ...] = ()
    seed: int | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def test_examples(self) -> int | None:
        """How many test examples the final accuracy was measured on (None when not recorded)."""
        return self.history[-1].test_examples if self.history else None


@dataclasses.dataclass(frozen=True)
class RunSet:
    """Everything a report is made of."""

    results: tuple[AttackResult, ...]
    trains: tuple[TrainRun, ...]
    skipped: tuple[Skipped, ...]


def parse_result(path: Path) -> AttackResult:
    """One ``result.json``; raises :class:`MalformedFile` saying what is wrong."""
    return AttackResult.read(path)


def parse_train(path: Path) -> TrainRun:
    """One training ``metrics.json``; raises :class:`MalformedFile` saying what is wrong."""
    data = read_json(path)
    if data.get("kind") != "train":
        raise MalformedFile(f"kind is {data.get('kind')!r}, expected 'train'")
    if data.get("schema") != TRAIN_SCHEMA or isinstance(data.get("schema"), bool):
        raise MalformedFile(f"schema {data.get('schema')!r} is not supported (this gia-bench reads {TRAIN_SCHEMA})")
    totals = get_field(data, "totals", dict)
    try:
        acc = number(totals["final_test_accuracy"], "totals.final_test_accuracy")
        bps = number(totals["bytes_per_step"], "totals.bytes_per_step")
        sent = int(number(totals.get("bytes_sent_per_worker", 0), "totals.bytes_sent_per_worker"))
        steps = int(number(totals.get("steps", 0), "totals.steps"))
        secs = number(totals.get("seconds", 0.0), "totals.seconds")
        payload = number(totals.get("payload_bytes_per_worker", 0), "totals.payload_bytes_per_worker")
    except KeyError as exc:
        raise MalformedFile(f"totals has no {exc.args[0]!r}") from None
    if not 0.0 <= acc <= 1.0:
        raise MalformedFile(f"final_test_accuracy {acc} is outside [0, 1]")
    world_size = int(get_field(data, "world_size", int, optional=True) or 1)
    history = _history(get_field(data, "epochs", list, optional=True) or [], lone=world_size == 1)
    if world_size == 1 and sent == 0 and steps > 0 and 0 < payload < math.inf:
        bps = payload / steps
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    seed = config.get("seed") if isinstance(config.get("seed"), int) and not isinstance(config.get("seed"), bool) else None
    return TrainRun(
        path=path,
        dataset=get_field(data, "dataset", str),
        model=get_field(data, "model", str),
        defense=get_field(data, "defense", str),
        world_size=world_size,
        final_test_accuracy=acc,
        bytes_per_step=bps,
        bytes_sent_per_worker=sent,
        steps=steps,
        seconds=secs,
        history=history,
        seed=seed,
    )


def _epoch_bytes(e: dict, n: int, lone: bool) -> int:
    sent = int(number(e.get("bytes_sent_per_worker", 0), f"epochs[{n}].bytes_sent_per_worker"))
    payload = number(e.get("payload_bytes_per_worker", 0), f"epochs[{n}].payload_bytes_per_worker")
    return int(payload) if lone and sent == 0 and 0 < payload < math.inf else sent


def _history(epochs: list[Any], lone: bool = False) -> tuple[EpochPoint, ...]:
    """Per-epoch test accuracy at its optimizer step (an explicit ``step``, else the running sum of ``steps``).

    ``lone`` (one worker, who sends nothing): an epoch's bytes are its messages' size
    (``payload_bytes_per_worker``), as :attr:`TrainRun.bytes_per_step`."""
    out = []
    step = 0
    for n, e in enumerate(epochs):
        if not isinstance(e, dict):
            raise MalformedFile(f"epochs[{n}] is not an object")
        try:
            acc = number(e["test_accuracy"], f"epochs[{n}].test_accuracy")
        except KeyError:
            raise MalformedFile(f"epochs[{n}] has no 'test_accuracy'") from None
        if not 0.0 <= acc <= 1.0:
            raise MalformedFile(f"epochs[{n}].test_accuracy {acc} is outside [0, 1]")
        step += int(number(e.get("steps", 0), f"epochs[{n}].steps"))
        at = int(number(e["step"], f"epochs[{n}].step")) if "step" in e else step
        examples = e.get("test_examples")
        if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
            raise MalformedFile(f"epochs[{n}].test_examples {examples!r} is not a positive integer")
        out.append(
            EpochPoint(
                epoch=int(number(e.get("epoch", n + 1), f"epochs[{n}].epoch")),
                step=at,
                test_accuracy=acc,
                test_examples=examples,
                bytes_sent_per_worker=_epoch_bytes(e, n, lone),
            )
        )
    return tuple(out)


# -- folders ---------------------------------------------------------------------------------------


def _candidates(paths: Iterable[Path], name: str) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(p.rglob(name))
        else:
            found.append(p)
    return found


def load_runs(runs: Iterable[Path], train: Iterable[Path] = ()) -> RunSet:
    """Every ``result.json`` under ``runs`` and training ``metrics.json`` under ``train`` and ``runs``.

    A path given that does not exist, or a file that does not parse, is listed in
    :attr:`RunSet.skipped` with the reason. A ``metrics.json`` found under ``runs``
    that is not a training run (another kind) is ignored silently; one given in
    ``train`` must be a training run.

    Each result counts once (:mod:`gia_bench.reports.dedupe`): one file reached twice is
    read once, copies of one result (same identity and content) count once and are listed
    as skipped, a result its record file contradicts is listed as skipped, and two
    different results of one identity raise
    :class:`~gia_bench.identity.ResultConflictError` naming both.
    """
    from gia_bench.reports.dedupe import dedupe

    runs, train = [Path(p) for p in runs], [Path(p) for p in train]
    results: list[AttackResult] = []
    trains: dict[Path, TrainRun] = {}
    skipped: list[Skipped] = []
    for p in runs + train:
        if not p.exists():
            skipped.append(Skipped(p, "no such file or folder"))
    # a metrics.json named directly among the runs is a training run
    train = train + [p for p in runs if p.is_file() and p.name == TRAIN_NAME]
    runs = [p for p in runs if not (p.is_file() and p.name == TRAIN_NAME)]
    for path in _candidates([p for p in runs if p.exists()], RESULT_FILE):
        try:
            results.append(parse_result(path))
        except MalformedFile as exc:
            skipped.append(Skipped(path, str(exc)))
    for path in _candidates([p for p in runs if p.is_dir()], SKIP_FILE):  # attacks that refused a record
        entry = skipped_entry(path)
        if entry is not None:
            skipped.append(entry)
    for path in _candidates([p for p in runs if p.is_dir()], TRAIN_NAME):
        try:
            data_kind = read_json(path).get("kind")
        except MalformedFile:
            data_kind = None
        if data_kind != "train":
            continue
        try:
            trains[path.resolve()] = parse_train(path)
        except MalformedFile as exc:
            skipped.append(Skipped(path, str(exc)))
    for path in _candidates([p for p in train if p.exists()], TRAIN_NAME):
        if path.resolve() in trains:
            continue
        try:
            trains[path.resolve()] = parse_train(path)
        except MalformedFile as exc:
            skipped.append(Skipped(path, str(exc)))
    results, repeated = dedupe(results)
    skipped += repeated
    results.sort(key=lambda r: (r.dataset, r.model, r.defense, r.step, r.attack, r.view, r.record_id, str(r.path)))
    return RunSet(tuple(results), tuple(sorted(trains.values(), key=lambda t: str(t.path))), tuple(skipped))
