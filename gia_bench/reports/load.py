"""Read what the attacks and the trainer wrote: ``result.json`` and training ``metrics.json`` files.

Reading is strict and forgiving at once: each file is checked against its schema,
and a file that is missing, unreadable or malformed is listed (:class:`Skipped`)
with the reason while the rest is reported.

Attack results (one per record x attack x view, written by the attack runner)::

    {"schema": 1 | 2, "kind": "attack_result", "record_id", "record", "dataset", "model",
     "defense", "attack", "view": "naive" | "aware" | "oracle", "threat": {...}, "bytes",
     "bytes_fp32", "batch_size", "labels_inferred", "labels_true", "seconds", "iterations",
     "final_loss", "metrics": BatchScores.to_json() | null, "ssim", "psnr", "lpips",
     "label_accuracy", "lpips_reason",
     "step": int (optional, 0 when absent), "source": "capture" | "train" | "federated" (optional),
     "budget": {"iterations", "restarts", "evaluations", "preset"} (optional), "seed" (optional),
     "record_sha256": sha256 of the record file (optional; with attack, view, seed and schema
     the result's identity, :mod:`gia_bench.identity`)}

with ``reconstruction.safetensors`` beside it (tensors ``reconstruction`` (B, C, H, W)
in [0, 1], in the originals' order after pairing, and optionally ``original``). A result
without ``budget`` (written before budgets were recorded) gets one read from its attack
spec (``iterations=``, ``restarts=``), marked :attr:`Budget.from_spec`.

Training runs (``DIR/metrics.json``, kind ``train``) give test accuracy, its history per
epoch (with ``test_examples`` where the trainer wrote it, for a binomial standard error)
and bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gia_bench.identity import ResultIdentity, content_digest, identity_of
from gia_bench.metrics import METRICS, BatchScores, ImageScores
from gia_bench.threat import VIEWS

RESULT_NAME = "result.json"
TRAIN_NAME = "metrics.json"
TENSORS_NAME = "reconstruction.safetensors"
SCHEMA = 1
SCHEMAS = (1, 2)  # result schemas this reporter reads (2 adds record_sha256, step, source, budget)
SOURCES = ("capture", "train", "federated")


class MalformedFile(Exception):
    """A result or metrics file that does not follow its schema (the message says how)."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file left out of the report, and why."""

    path: Path
    reason: str


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the attack was allowed to spend: optimiser iterations x random restarts.

    ``evaluations`` counts objective evaluations where the attack reports them (L-BFGS
    evaluates several times per iteration); ``preset`` names the budget preset used, if
    any. ``from_spec`` is True when the result predates recorded budgets and the numbers
    were read from its attack spec instead.
    """

    iterations: int
    restarts: int
    evaluations: int | None = None
    preset: str | None = None
    from_spec: bool = False

    def text(self) -> str:
        out = f"{self.iterations:,} it × {self.restarts}"
        if self.preset:
            out += f" ({self.preset})"
        return out


def _spec_int(spec: str, key: str) -> int | None:
    """``key=<int>`` from a ``name:k=v,...`` spec, without importing the registry (None when absent)."""
    for item in spec.split(":", 1)[1].split(",") if ":" in spec else ():
        k, _, v = item.partition("=")
        if k.strip() == key:
            try:
                return int(float(v))
            except ValueError:
                return None
    return None


def budget_from_spec(attack: str, iterations_field: int = 0) -> Budget:
    """The budget an older result implies: its spec's ``iterations``/``restarts``, else the attack's defaults."""
    iters, restarts = _spec_int(attack, "iterations"), _spec_int(attack, "restarts")
    if iters is None or restarts is None:
        try:
            from gia_bench.attacks import ATTACKS
            from gia_bench.registry import describe_params, parse_spec

            defaults = {p.name: p.default for p in describe_params(ATTACKS.get(parse_spec(attack).name))}
        except Exception:  # an attack this installation does not know: keep what the result says
            defaults = {}
        if iters is None:
            iters = iterations_field or (defaults.get("iterations") if isinstance(defaults.get("iterations"), int) else 0)
        if restarts is None:
            restarts = defaults.get("restarts") if isinstance(defaults.get("restarts"), int) else 1
    return Budget(int(iters or 0), max(int(restarts or 1), 1), None, None, True)


def _budget(data: dict[str, Any], attack: str, iterations_field: int) -> Budget:
    raw = data.get("budget")
    if raw is None:
        return budget_from_spec(attack, iterations_field)
    if not isinstance(raw, dict):
        raise MalformedFile(f"field 'budget' is {type(raw).__name__}, expected an object")
    iters = _get(raw, "iterations", int)
    restarts = _get(raw, "restarts", int)
    evals = _get(raw, "evaluations", int, optional=True)
    preset = _get(raw, "preset", str, optional=True)
    if iters < 0 or restarts < 1 or (evals is not None and evals < 0):
        raise MalformedFile(f"budget {iters} iterations x {restarts} restarts ({evals} evaluations) is not a budget")
    return Budget(iters, restarts, evals, preset, False)


@dataclasses.dataclass(frozen=True)
class AttackResult:
    """One ``result.json``: an attack with one threat view against one record."""

    path: Path
    record_id: str
    record: str
    dataset: str
    model: str
    defense: str
    attack: str
    view: str
    threat: dict[str, Any]
    bytes: int
    bytes_fp32: int
    batch_size: int
    labels_inferred: tuple[int, ...]
    labels_true: tuple[int, ...] | None
    seconds: float
    iterations: int
    final_loss: float
    scores: BatchScores | None  # None when the run had no ground truth
    step: int = 0  # the optimizer step the record was captured at (0 for `capture`)
    source: str = "capture"  # "capture" | "train" | "federated"
    budget: Budget = Budget(0, 1, None, None, True)
    seed: int | None = None
    record_sha256: str | None = None  # None in results written before records were hashed
    identity: ResultIdentity | None = None  # what it is the result of (gia_bench.identity)
    content: str = ""  # sha256 of what it measured (gia_bench.identity.content_digest)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def tensors_path(self) -> Path:
        return self.folder / TENSORS_NAME

    @property
    def compression_ratio(self) -> float:
        """Uncompressed fp32 bytes (what plain SGD sends) over the bytes this defense sent."""
        return self.bytes_fp32 / self.bytes if self.bytes > 0 else math.inf

    def load_images(self) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
        """(reconstruction, original, note): tensors from ``reconstruction.safetensors``, or a note why not."""
        return load_images(self.tensors_path, self.batch_size)


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


# -- field checks ----------------------------------------------------------------------------------


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if key not in data:
        if optional:
            return None
        raise MalformedFile(f"missing field {key!r}")
    value = data[key]
    if value is None and optional:
        return None
    # bool is an int in Python; never accept it for a number
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise MalformedFile(f"field {key!r} is a boolean, expected {_kind_name(kind)}")
    if not isinstance(value, kind):
        raise MalformedFile(f"field {key!r} is {type(value).__name__}, expected {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _int_list(data: dict[str, Any], key: str, *, optional: bool = False) -> tuple[int, ...] | None:
    value = _get(data, key, list, optional=optional)
    if value is None:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MalformedFile(f"field {key!r} must be a list of integers")
    return tuple(value)


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedFile(f"{what} is {type(value).__name__}, expected a number")
    return float(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MalformedFile(f"cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise MalformedFile("not UTF-8 text") from None
    try:
        data = json.loads(text)  # accepts Infinity, as json.dump writes an infinite PSNR
    except json.JSONDecodeError as exc:
        raise MalformedFile(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise MalformedFile(f"top level is a JSON {type(data).__name__}, expected an object")
    return data


def _check_header(data: dict[str, Any], kind: str) -> None:
    if data.get("kind") != kind:
        raise MalformedFile(f"kind is {data.get('kind')!r}, expected {kind!r}")
    schemas = SCHEMAS if kind == "attack_result" else (SCHEMA,)
    if data.get("schema") not in schemas or isinstance(data.get("schema"), bool):
        raise MalformedFile(
            f"schema {data.get('schema')!r} is not supported (this gia-bench reads {', '.join(map(str, schemas))})"
        )


def _extra_scores(d: dict[str, Any], where: str) -> dict[str, float | None]:
    """The registered metrics beyond ssim/psnr/lpips that an image's scores hold (older files have none)."""
    out: dict[str, float | None] = {}
    for name in METRICS:
        if name in ("ssim", "psnr", "lpips") or name not in d:
            continue
        v = d[name]
        if v is not None and not math.isfinite(v := _num(v, f"{where}.{name}")):
            raise MalformedFile(f"{where}.{name} is {v}, not a finite number")
        out[name] = v
    return out


def _texts(value: Any, where: str) -> dict[str, str]:
    """A name -> sentence object (reasons, notes); absent in older files."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise MalformedFile(f"field {where!r} must map metric names to strings")
    return dict(value)


def _scores_from(data: dict[str, Any], batch_size: int) -> BatchScores | None:
    """The batch's scores: the ``metrics`` object, else the flat per-image lists."""
    metrics = data.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict) or not isinstance(metrics.get("images"), list):
            raise MalformedFile("field 'metrics' must be an object with an 'images' list")
        images = []
        for n, d in enumerate(metrics["images"]):
            if not isinstance(d, dict):
                raise MalformedFile(f"metrics.images[{n}] is not an object")
            try:
                images.append(
                    ImageScores(
                        index=int(_num(d["index"], f"metrics.images[{n}].index")),
                        matched=int(_num(d["matched"], f"metrics.images[{n}].matched")),
                        ssim=_num(d["ssim"], f"metrics.images[{n}].ssim"),
                        psnr=_num(d["psnr"], f"metrics.images[{n}].psnr"),
                        lpips=None if d.get("lpips") is None else _num(d["lpips"], f"metrics.images[{n}].lpips"),
                        extra=_extra_scores(d, f"metrics.images[{n}]"),
                    )
                )
            except KeyError as exc:
                raise MalformedFile(f"metrics.images[{n}] has no {exc.args[0]!r}") from None
        acc = metrics.get("label_accuracy")
        reason = metrics.get("lpips_reason")
        scores = BatchScores(
            tuple(images),
            None if acc is None else _num(acc, "metrics.label_accuracy"),
            reason if isinstance(reason, str) else None,
            _texts(metrics.get("unavailable"), "metrics.unavailable"),
            _texts(metrics.get("notes"), "metrics.notes"),
        )
    elif data.get("ssim") is not None:
        ssim = _get(data, "ssim", list)
        psnr = _get(data, "psnr", list)
        lp = _get(data, "lpips", list, optional=True) or [None] * len(ssim)
        if not len(ssim) == len(psnr) == len(lp):
            raise MalformedFile("fields 'ssim', 'psnr' and 'lpips' differ in length")
        images = [
            ImageScores(
                i,
                i,
                _num(s, f"ssim[{i}]"),
                _num(p, f"psnr[{i}]"),
                None if v is None else _num(v, f"lpips[{i}]"),
            )
            for i, (s, p, v) in enumerate(zip(ssim, psnr, lp))
        ]
        acc = data.get("label_accuracy")
        reason = data.get("lpips_reason")
        scores = BatchScores(
            tuple(images),
            None if acc is None else _num(acc, "label_accuracy"),
            reason if isinstance(reason, str) else None,
        )
    else:
        return None
    if len(scores.images) != batch_size:
        raise MalformedFile(f"{len(scores.images)} scored images for batch_size {batch_size}")
    for im in scores.images:
        if not (-1.0 <= im.ssim <= 1.0) or math.isnan(im.psnr) or (im.lpips is not None and not math.isfinite(im.lpips)):
            raise MalformedFile(f"image {im.index} has out-of-range scores (ssim {im.ssim}, psnr {im.psnr}, lpips {im.lpips})")
    if scores.label_accuracy is not None and not 0.0 <= scores.label_accuracy <= 1.0:
        raise MalformedFile(f"label_accuracy {scores.label_accuracy} is outside [0, 1]")
    return scores


def parse_result(path: Path) -> AttackResult:
    """One ``result.json``; raises :class:`MalformedFile` saying what is wrong."""
    data = _read_json(path)
    _check_header(data, "attack_result")
    view = _get(data, "view", str)
    if view not in VIEWS:
        raise MalformedFile(f"view {view!r} is not one of {', '.join(VIEWS)}")
    batch_size = _get(data, "batch_size", int)
    nbytes = _get(data, "bytes", int)
    nbytes32 = _get(data, "bytes_fp32", int)
    if batch_size < 1 or nbytes < 0 or nbytes32 < 0:
        raise MalformedFile(f"batch_size {batch_size}, bytes {nbytes}, bytes_fp32 {nbytes32}: must be positive")
    threat = _get(data, "threat", dict, optional=True) or {}
    step = _get(data, "step", int, optional=True)
    if step is not None and step < 0:
        raise MalformedFile(f"step {step} is negative")
    source = _get(data, "source", str, optional=True) or "capture"
    if source not in SOURCES:
        raise MalformedFile(f"source {source!r} is not one of {', '.join(SOURCES)}")
    attack = _get(data, "attack", str)
    iterations = int(_get(data, "iterations", int, optional=True) or 0)
    sha = _get(data, "record_sha256", str, optional=True)
    if sha is not None and not _is_sha256(sha):
        raise MalformedFile(f"record_sha256 {sha[:80]!r} is not a sha256 (64 hex digits)")
    seed = _get(data, "seed", int, optional=True)
    return AttackResult(
        path=path,
        record_id=_get(data, "record_id", str),
        record=str(_get(data, "record", str, optional=True) or ""),
        dataset=_get(data, "dataset", str),
        model=_get(data, "model", str),
        defense=_get(data, "defense", str),
        attack=attack,
        view=view,
        threat=threat,
        bytes=nbytes,
        bytes_fp32=nbytes32,
        batch_size=batch_size,
        labels_inferred=_int_list(data, "labels_inferred", optional=True) or (),
        labels_true=_int_list(data, "labels_true", optional=True),
        seconds=float(_get(data, "seconds", (int, float), optional=True) or 0.0),
        iterations=iterations,
        final_loss=float(_get(data, "final_loss", (int, float), optional=True) or math.nan),
        scores=_scores_from(data, batch_size),
        step=step or 0,
        source=source,
        budget=_budget(data, attack, iterations),
        seed=seed,
        record_sha256=sha,
        identity=identity_of(data),
        content=content_digest(data),
    )


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def parse_train(path: Path) -> TrainRun:
    """One training ``metrics.json``; raises :class:`MalformedFile` saying what is wrong."""
    data = _read_json(path)
    _check_header(data, "train")
    totals = _get(data, "totals", dict)
    try:
        acc = _num(totals["final_test_accuracy"], "totals.final_test_accuracy")
        bps = _num(totals["bytes_per_step"], "totals.bytes_per_step")
        sent = int(_num(totals.get("bytes_sent_per_worker", 0), "totals.bytes_sent_per_worker"))
        steps = int(_num(totals.get("steps", 0), "totals.steps"))
        secs = _num(totals.get("seconds", 0.0), "totals.seconds")
    except KeyError as exc:
        raise MalformedFile(f"totals has no {exc.args[0]!r}") from None
    if not 0.0 <= acc <= 1.0:
        raise MalformedFile(f"final_test_accuracy {acc} is outside [0, 1]")
    history = _history(_get(data, "epochs", list, optional=True) or [])
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    seed = config.get("seed") if isinstance(config.get("seed"), int) and not isinstance(config.get("seed"), bool) else None
    return TrainRun(
        path=path,
        dataset=_get(data, "dataset", str),
        model=_get(data, "model", str),
        defense=_get(data, "defense", str),
        world_size=int(_get(data, "world_size", int, optional=True) or 1),
        final_test_accuracy=acc,
        bytes_per_step=bps,
        bytes_sent_per_worker=sent,
        steps=steps,
        seconds=secs,
        history=history,
        seed=seed,
    )


def _history(epochs: list[Any]) -> tuple[EpochPoint, ...]:
    """Per-epoch test accuracy at its optimizer step (an explicit ``step``, else the running sum of ``steps``)."""
    out = []
    step = 0
    for n, e in enumerate(epochs):
        if not isinstance(e, dict):
            raise MalformedFile(f"epochs[{n}] is not an object")
        try:
            acc = _num(e["test_accuracy"], f"epochs[{n}].test_accuracy")
        except KeyError:
            raise MalformedFile(f"epochs[{n}] has no 'test_accuracy'") from None
        if not 0.0 <= acc <= 1.0:
            raise MalformedFile(f"epochs[{n}].test_accuracy {acc} is outside [0, 1]")
        step += int(_num(e.get("steps", 0), f"epochs[{n}].steps"))
        at = int(_num(e["step"], f"epochs[{n}].step")) if "step" in e else step
        examples = e.get("test_examples")
        if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
            raise MalformedFile(f"epochs[{n}].test_examples {examples!r} is not a positive integer")
        out.append(
            EpochPoint(
                epoch=int(_num(e.get("epoch", n + 1), f"epochs[{n}].epoch")),
                step=at,
                test_accuracy=acc,
                test_examples=examples,
                bytes_sent_per_worker=int(_num(e.get("bytes_sent_per_worker", 0), f"epochs[{n}].bytes_sent_per_worker")),
            )
        )
    return tuple(out)


def load_images(path: Path, batch_size: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """(reconstruction, original, note) from a ``reconstruction.safetensors``; never raises."""
    if not path.is_file():
        return None, None, f"{path.name} missing"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            if "reconstruction" not in keys:
                return None, None, f"{path} has no 'reconstruction' tensor"
            rec = fh.get_tensor("reconstruction")
            orig = fh.get_tensor("original") if "original" in keys else None
    except Exception as exc:  # a damaged image file costs its grid cell, not the report
        return None, None, f"{path} unreadable ({type(exc).__name__}: {exc})"
    for name, t in (("reconstruction", rec), ("original", orig)):
        if t is None:
            continue
        if t.dim() != 4 or not t.is_floating_point() or (batch_size is not None and t.shape[0] != batch_size):
            return None, None, f"{path}: {name} is {t.dtype} {tuple(t.shape)}, expected (B={batch_size}, C, H, W) floats"
    if orig is not None and orig.shape != rec.shape:
        return None, None, f"{path}: original {tuple(orig.shape)} and reconstruction {tuple(rec.shape)} differ"
    rec = rec.float().nan_to_num(0.0).clamp(0, 1)
    orig = None if orig is None else orig.float().clamp(0, 1)
    return rec, orig, None


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
    for path in _candidates([p for p in runs if p.exists()], RESULT_NAME):
        try:
            results.append(parse_result(path))
        except MalformedFile as exc:
            skipped.append(Skipped(path, str(exc)))
    for path in _candidates([p for p in runs if p.is_dir()], TRAIN_NAME):
        try:
            data_kind = _read_json(path).get("kind")
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
