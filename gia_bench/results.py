"""One attack result: what ``result.json`` holds, written by :mod:`gia_bench.evaluate`, read by reports and the CLI.

:class:`AttackResult` is the only description of the file: :meth:`AttackResult.to_json`
is what the attack runner writes and :meth:`AttackResult.from_json` what every reader
parses, strictly (a file that does not follow the schema raises :class:`MalformedFile`
saying which field is wrong). This module imports no attack or defense registry:
everything a report needs (the budget the attack ran with and the published budget
it should be compared with) is in the file.

Schema 3 (written now)::

    {"schema": 3, "kind": "attack_result", "record_id", "record", "record_sha256",
     "dataset", "model", "defense", "attack" (canonical spec), "view", "threat": {...},
     "step", "source": "capture" | "train" | "federated", "bytes", "bytes_fp32",
     "batch_size", "labels_inferred", "labels_true" | null, "seconds", "iterations",
     "final_loss", "seed", "device",
     "budget": {"iterations", "restarts", "evaluations", "preset",
                "published": {"iterations", "restarts", "evaluations", "preset", "source"} | null},
     "scores": BatchScores.to_json() | null   (per image: {"index", "matched", <metric name>: value, ...}),
     "extra": {...}}

Per-image scores are keyed by the names in :data:`gia_bench.metrics.METRICS`; a name
this installation does not register is ignored, so adding a metric is one registration.

Older files are read too: schema 1 (and 2) kept the scores under ``"metrics"`` (or, oldest,
as flat ``ssim``/``psnr``/``lpips`` lists), and no published budget: :attr:`Budget.published_known`
is False for them, and reports say the published budget was not recorded. A result without
``"budget"`` gets one read from its attack spec (``iterations=``, ``restarts=``; the canonical
spec the runner writes spells both out), marked :attr:`Budget.from_spec`. The schema is part
of a result's identity (:mod:`gia_bench.identity`), so ``gia-bench attack`` recomputes an
older result rather than reuse it, and the report counts it apart from a schema-3 one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gia_bench.errors import GiaBenchError
from gia_bench.threat import VIEWS

if TYPE_CHECKING:  # imported where used: gia_bench.identity reads the schema from here and stays light
    import torch

    from gia_bench.identity import ResultIdentity
    from gia_bench.metrics import BatchScores, ImageScores

#: Version of the result.json format written now; part of every result's identity.
RESULT_SCHEMA = 3
#: Versions this gia-bench reads (1 and 2 predate the published budget and the "scores" field).
READABLE_SCHEMAS = (1, 2, 3)
RESULT_FILE = "result.json"
TENSORS_FILE = "reconstruction.safetensors"
GRID_FILE = "reconstruction.png"
KIND = "attack_result"
SOURCES = ("capture", "train", "federated")
#: a budget below this fraction of the published one is "far below" (attacks and reports warn)
FAR_BELOW = 0.25


class MalformedFile(GiaBenchError):
    """A result or metrics file that does not follow its schema (the message says how)."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file left out (of an attack grid or a report), and why."""

    path: Path
    reason: str


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much an attack optimised: ``iterations`` optimiser steps per restart x ``restarts``.

    ``evaluations`` counts loss+gradient evaluations actually made (L-BFGS evaluates
    several times per iteration; None when not counted, e.g. a budget read from a paper);
    ``preset`` names the preset the settings came from (``ig:preset=paper``); ``source``
    says where a published budget comes from. ``published`` is the budget of the published
    attack this one should be compared with (None: there is no such figure, or, when
    ``published_known`` is False, the result predates recording it). ``from_spec`` is True
    when the result predates recorded budgets and the numbers were read from its attack spec.
    """

    iterations: int
    restarts: int = 1
    evaluations: int | None = None
    preset: str | None = None
    source: str = dataclasses.field(default="", compare=False)
    published: Budget | None = None
    published_known: bool = False  # set by the attack runner when it records ``published``
    from_spec: bool = False

    @property
    def steps(self) -> int:
        """Iterations times restarts: the comparable size of a budget."""
        return self.iterations * self.restarts

    def text(self) -> str:
        out = f"{self.iterations:,} it × {self.restarts}"
        if self.preset:
            out += f" ({self.preset})"
        return out

    def to_json(self) -> dict[str, Any]:
        """``budget`` in result.json; a published budget is nested under ``published`` (null: none)."""
        out: dict[str, Any] = {"iterations": self.iterations, "restarts": self.restarts,
                               "evaluations": self.evaluations, "preset": self.preset}  # fmt: skip
        if self.source:
            out["source"] = self.source
        if self.published_known:  # an older result's unknown published budget stays absent, not null
            out["published"] = None if self.published is None else self.published.to_json()
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str = "budget") -> Budget:
        """The budget ``to_json`` wrote; ``published_known`` is whether the object has ``published``."""
        if not isinstance(raw, dict):
            raise MalformedFile(f"field {where!r} is {type(raw).__name__}, expected an object")
        iters = get_field(raw, "iterations", int)
        restarts = get_field(raw, "restarts", int)
        evals = get_field(raw, "evaluations", int, optional=True)
        preset = get_field(raw, "preset", str, optional=True)
        if iters < 0 or restarts < 1 or (evals is not None and evals < 0):
            raise MalformedFile(f"{where} {iters} iterations x {restarts} restarts ({evals} evaluations) is not a budget")
        source = get_field(raw, "source", str, optional=True) or ""
        if where.endswith(".published"):  # a published budget has none of its own
            return cls(iters, restarts, evals, preset, source, None, False)
        published = None
        if raw.get("published") is not None:
            published = cls.from_json(raw["published"], f"{where}.published")
        return cls(iters, restarts, evals, preset, source, published, "published" in raw)


def budget_from_spec(attack: str, iterations_field: int = 0) -> Budget:
    """The budget an older result implies: its spec's ``iterations=``/``restarts=``.

    Without them, the iterations the result says it took and one restart. No registry is
    asked: the canonical spec the runner writes spells both out where the attack has them.
    """
    iters, restarts = _spec_int(attack, "iterations"), _spec_int(attack, "restarts")
    return Budget(iters if iters is not None else iterations_field, max(restarts or 1, 1), from_spec=True)


def _spec_int(spec: str, key: str) -> int | None:
    """``key=<int>`` from a ``name:k=v,...`` spec (None when absent or not a number)."""
    for item in spec.split(":", 1)[1].split(",") if ":" in spec else ():
        k, _, v = item.partition("=")
        if k.strip() == key:
            try:
                return int(float(v))
            except (ValueError, OverflowError):
                return None
    return None


@dataclasses.dataclass(frozen=True)
class AttackResult:
    """One ``result.json``: an attack with one threat view against one record, and its scores."""

    path: Path | None  # where it was read from or written to (not stored in the file)
    record_id: str
    record: str  # the record file's path as the runner was given it ("" when unknown)
    dataset: str
    model: str
    defense: str
    attack: str  # canonical spec
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
    budget: Budget
    step: int = 0  # the optimizer step the record was captured at (0 for `capture`)
    source: str = "capture"
    seed: int | None = None  # None in results written before seeds were recorded
    record_sha256: str | None = None  # None in results written before records were hashed
    device: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # how reports show the attack and defense specs (parameters at their defaults left out), decided by
    # the writer, which has the registries; reports import none ({} in older files: specs shown whole)
    shown: dict[str, str] = dataclasses.field(default_factory=dict)
    schema: int = RESULT_SCHEMA

    # -- derived ---------------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        assert self.path is not None, "a result not read from or written to a file has no folder"
        return self.path.parent

    @property
    def tensors_path(self) -> Path:
        return self.folder / TENSORS_FILE

    @property
    def compression_ratio(self) -> float:
        """Uncompressed fp32 bytes (what plain SGD sends) over the bytes this defense sent."""
        return self.bytes_fp32 / self.bytes if self.bytes > 0 else math.inf

    @property
    def label_accuracy(self) -> float | None:
        return None if self.scores is None else self.scores.label_accuracy

    def mean(self, metric: str) -> float | None:
        """Mean of a registered per-image metric over the batch; None if unscored or not computed."""
        if self.scores is None:
            return None
        values = [v for im in self.scores.images if (v := im.value(metric)) is not None]
        return sum(values) / len(values) if values else None

    @property
    def identity(self) -> ResultIdentity:
        """What this is the result of (:mod:`gia_bench.identity`), with the attack spec as stored.

        The runner stores the canonical spec, so no registry is needed to compare two results.
        """
        from gia_bench.identity import ResultIdentity

        return ResultIdentity(self.record_sha256, self.attack, self.view, self.seed, self.schema)

    @property
    def content(self) -> str:
        """sha256 of what it measured (:func:`gia_bench.identity.content_digest` of :meth:`to_json`)."""
        from gia_bench.identity import content_digest

        return content_digest(self.to_json())

    def load_images(self) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
        """(reconstruction, original, note): tensors from ``reconstruction.safetensors``, or a note why not."""
        return load_images(self.tensors_path, self.batch_size)

    # -- the file --------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The ``result.json`` object (schema :data:`RESULT_SCHEMA`; an infinite PSNR stays ``inf``)."""
        return {
            "schema": RESULT_SCHEMA, "kind": KIND,
            "record_id": self.record_id, "record": self.record, "record_sha256": self.record_sha256,
            "dataset": self.dataset, "model": self.model, "defense": self.defense,
            "attack": self.attack, "view": self.view, "threat": self.threat,
            "step": self.step, "source": self.source, "bytes": self.bytes, "bytes_fp32": self.bytes_fp32,
            "batch_size": self.batch_size, "labels_inferred": list(self.labels_inferred),
            "labels_true": None if self.labels_true is None else list(self.labels_true),
            "seconds": self.seconds, "iterations": self.iterations, "final_loss": self.final_loss,
            "seed": self.seed, "device": self.device, "budget": self.budget.to_json(),
            "scores": None if self.scores is None else self.scores.to_json(),
            "extra": self.extra, "shown": self.shown,
        }  # fmt: skip

    def write(self, path: Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically (a reader never sees half a result)."""
        from gia_bench.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: Any, path: Path | None = None) -> AttackResult:
        """Parse a ``result.json`` object of any readable schema; :class:`MalformedFile` says what is wrong."""
        if not isinstance(data, dict):
            raise MalformedFile(f"top level is a JSON {type(data).__name__}, expected an object")
        if data.get("kind") != KIND:
            raise MalformedFile(f"kind is {data.get('kind')!r}, expected {KIND!r}")
        schema = data.get("schema")
        if schema not in READABLE_SCHEMAS or isinstance(schema, bool):
            raise MalformedFile(
                f"schema {schema!r} is not supported (this gia-bench reads {', '.join(map(str, READABLE_SCHEMAS))})"
            )
        view = get_field(data, "view", str)
        if view not in VIEWS:
            raise MalformedFile(f"view {view!r} is not one of {', '.join(VIEWS)}")
        batch_size, nbytes, nbytes32 = (get_field(data, k, int) for k in ("batch_size", "bytes", "bytes_fp32"))
        if batch_size < 1 or nbytes < 0 or nbytes32 < 0:
            raise MalformedFile(f"batch_size {batch_size}, bytes {nbytes}, bytes_fp32 {nbytes32}: must be positive")
        step = get_field(data, "step", int, optional=True) or 0
        if step < 0:
            raise MalformedFile(f"step {step} is negative")
        source = get_field(data, "source", str, optional=True) or "capture"
        if source not in SOURCES:
            raise MalformedFile(f"source {source!r} is not one of {', '.join(SOURCES)}")
        attack = get_field(data, "attack", str)
        iterations = int(get_field(data, "iterations", int, optional=True) or 0)
        sha = get_field(data, "record_sha256", str, optional=True)
        if sha is not None and not _is_sha256(sha):
            raise MalformedFile(f"record_sha256 {sha[:80]!r} is not a sha256 (64 hex digits)")
        raw_budget = data.get("budget")
        budget = budget_from_spec(attack, iterations) if raw_budget is None else Budget.from_json(raw_budget)
        if schema < 3:  # a published budget was never recorded before schema 3, whatever the file says
            budget = dataclasses.replace(budget, published=None, published_known=False)
        final_loss = get_field(data, "final_loss", (int, float), optional=True)
        return cls(
            path=path, record_id=get_field(data, "record_id", str),
            record=get_field(data, "record", str, optional=True) or "",
            dataset=get_field(data, "dataset", str), model=get_field(data, "model", str), defense=get_field(data, "defense", str),
            attack=attack, view=view, threat=get_field(data, "threat", dict, optional=True) or {},
            bytes=nbytes, bytes_fp32=nbytes32, batch_size=batch_size,
            labels_inferred=_int_list(data, "labels_inferred", optional=True) or (),
            labels_true=_int_list(data, "labels_true", optional=True),
            seconds=float(get_field(data, "seconds", (int, float), optional=True) or 0.0),
            iterations=iterations, final_loss=math.nan if final_loss is None else float(final_loss),
            scores=_scores_from(data, batch_size), budget=budget, step=step, source=source,
            seed=get_field(data, "seed", int, optional=True), record_sha256=sha,
            device=get_field(data, "device", str, optional=True) or "",
            extra=get_field(data, "extra", dict, optional=True) or {}, schema=schema,
            shown=_shown(data),
        )  # fmt: skip

    @classmethod
    def read(cls, path: Path) -> AttackResult:
        """One ``result.json`` file; raises :class:`MalformedFile` saying what is wrong."""
        return cls.from_json(read_json(path), Path(path))


def load_images(path: Path, batch_size: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """(reconstruction, original, note) from a ``reconstruction.safetensors``; never raises."""
    path = Path(path)
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


# -- field checks (shared with the training-run reader in gia_bench.reports.load) ----------------


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`MalformedFile` when it cannot be read or is not an object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MalformedFile(f"cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise MalformedFile("not UTF-8 text") from None
    try:
        data = json.loads(text)  # accepts Infinity, as json.dump writes an infinite PSNR
    except json.JSONDecodeError as exc:
        raise MalformedFile(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise MalformedFile("not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise MalformedFile(f"top level is a JSON {type(data).__name__}, expected an object")
    return data


def get_field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if key not in data:
        if optional:
            return None
        raise MalformedFile(f"missing field {key!r}")
    value = data[key]
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; never accept it for a number
    if isinstance(value, bool) and bool not in kinds:
        raise MalformedFile(f"field {key!r} is a boolean, expected {_kind_name(kinds)}")
    if not isinstance(value, kind):
        raise MalformedFile(f"field {key!r} is {type(value).__name__}, expected {_kind_name(kinds)}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def _int_list(data: dict[str, Any], key: str, *, optional: bool = False) -> tuple[int, ...] | None:
    value = get_field(data, key, list, optional=optional)
    if value is None:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MalformedFile(f"field {key!r} must be a list of integers")
    return tuple(value)


def number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedFile(f"{what} is {type(value).__name__}, expected a number")
    return float(value)


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


# -- scores ----------------------------------------------------------------------------------------


def _texts(value: Any, where: str) -> dict[str, str]:
    """A name -> sentence object (reasons, notes); absent in older files."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise MalformedFile(f"field {where!r} must map metric names to strings")
    return dict(value)


def _shown(data: dict[str, Any]) -> dict[str, str]:
    """``shown``: display spellings of the attack and defense (strings of bounded length, else dropped)."""
    raw = data.get("shown")
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if k in ("attack", "defense") and isinstance(v, str) and len(v) <= 1000}


def _image(d: Any, where: str) -> ImageScores:
    """One image's scores: every registered metric the object holds, by name (others are ignored)."""
    from gia_bench.metrics import METRICS, ImageScores

    if not isinstance(d, dict):
        raise MalformedFile(f"{where} is not an object")
    text = any(name in d for name, m in METRICS.items() if m.modality == "text")
    # every schema has these; an image's scores have SSIM and PSNR, a sentence's its text metrics
    for key in ("index", "matched") if text else ("index", "matched", "ssim", "psnr"):
        if key not in d:
            raise MalformedFile(f"{where} has no {key!r}")
    values: dict[str, float | None] = {}
    for name in METRICS:
        if name in d:
            values[name] = None if d[name] is None else number(d[name], f"{where}.{name}")
    return ImageScores(int(number(d["index"], f"{where}.index")), int(number(d["matched"], f"{where}.matched")), values)


def _scores_from(data: dict[str, Any], batch_size: int) -> BatchScores | None:
    """The batch's scores: ``scores`` (schema 3), ``metrics`` (1, 2), else the oldest flat lists."""
    from gia_bench.metrics import BatchScores

    key = "scores" if "scores" in data else "metrics"
    raw = data.get(key)
    if raw is not None:
        if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
            raise MalformedFile(f"field {key!r} must be an object with an 'images' list")
        images = tuple(_image(d, f"{key}.images[{n}]") for n, d in enumerate(raw["images"]))
        acc, reason = raw.get("label_accuracy"), raw.get("lpips_reason")
        scores = BatchScores(
            images, None if acc is None else number(acc, f"{key}.label_accuracy"),
            reason if isinstance(reason, str) else None,
            _texts(raw.get("unavailable"), f"{key}.unavailable"), _texts(raw.get("notes"), f"{key}.notes"),
        )  # fmt: skip
    elif data.get("ssim") is not None:
        ssim, psnr = get_field(data, "ssim", list), get_field(data, "psnr", list)
        lp = get_field(data, "lpips", list, optional=True) or [None] * len(ssim)
        if not len(ssim) == len(psnr) == len(lp):
            raise MalformedFile("fields 'ssim', 'psnr' and 'lpips' differ in length")
        images = tuple(_image({"index": i, "matched": i, "ssim": s, "psnr": p, "lpips": v}, f"image {i}")
                       for i, (s, p, v) in enumerate(zip(ssim, psnr, lp)))  # fmt: skip
        acc, reason = data.get("label_accuracy"), data.get("lpips_reason")
        scores = BatchScores(images, None if acc is None else number(acc, "label_accuracy"),
                             reason if isinstance(reason, str) else None)  # fmt: skip
    else:
        return None
    _check_scores(scores, batch_size)
    return scores


def _check_scores(scores: BatchScores, batch_size: int) -> None:
    if len(scores.images) != batch_size:
        raise MalformedFile(f"{len(scores.images)} scored images for batch_size {batch_size}")
    for im in scores.images:
        for name, v in im.values.items():
            if v is None:
                continue
            if name == "ssim" and not -1.0 <= v <= 1.0:
                raise MalformedFile(f"image {im.index} has an out-of-range ssim {v}")
            # PSNR is +inf on identical images; every other value is finite
            if math.isnan(v) or (name != "psnr" and not math.isfinite(v)):
                raise MalformedFile(f"image {im.index} has {name} {v}, not a finite number")
    if scores.label_accuracy is not None and not 0.0 <= scores.label_accuracy <= 1.0:
        raise MalformedFile(f"label_accuracy {scores.label_accuracy} is outside [0, 1]")
