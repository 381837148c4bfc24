"""The report's numbers: one row per image, one summary row per dataset x model x defense x attack x view.

Leakage statistics over the images of a group (all records of that setting):

* **mean**;
* **worst case**: the most leaking image (highest SSIM, highest PSNR, lowest LPIPS);
* **spread**: the population standard deviation over images.

Beside them, the *floor*: the SSIM / PSNR a flat image of each original's mean
colour scores (:func:`gia_bench.metrics.mean_colour_floor`), computed from the
stored originals. A reconstruction that does not beat the floor leaks nothing
the mean colour does not.

The compression ratio is ``bytes_fp32 / bytes``: the uncompressed fp32 gradient
(what plain SGD sends) over what the worker sent for that step.

Results from a training run (``source: "train"``) carry the optimizer ``step`` their
record was captured at; a setting is then dataset x model x defense x attack x view x
step. The report opens with one :class:`DefenseRow` per defense setting
(:func:`headline`): its bytes, its accuracy with a standard error, and its strongest
attacker with a verdict against the floor (rules in :mod:`gia_bench.reports.stats`).

CSV cells that come from a record, a spec or a path are escaped against spreadsheet
formula injection (OWASP: a cell starting with ``=``, ``+``, ``-``, ``@``, tab or CR
gets a leading ``'``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gia_bench.metrics import LPIPSScorer, get_st_lpips, mean_colour_floor
from gia_bench.reports import stats
from gia_bench.reports.load import AttackResult, Budget, RunSet, TrainRun
from gia_bench.reports.names import display_names, full_spec
from gia_bench.reports.text_scores import is_text_result
from gia_bench.reports.threats import exploited_text, is_structure_aware, read_extra, threat_text

if TYPE_CHECKING:
    from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Stat:
    """A metric over the images of a group."""

    mean: float
    worst: float  # the most leaking image
    spread: float  # population standard deviation over images (nan when undefined, e.g. with inf)
    n: int


@dataclasses.dataclass(frozen=True)
class ImageRow:
    """One original image of one record, scored for one attack and view (a row of ``results.csv``)."""

    dataset: str
    model: str
    defense: str
    attack: str
    view: str
    step: int
    source: str
    record_id: str
    image: int
    matched: int
    ssim: float
    psnr: float
    lpips: float | None
    floor_ssim: float | None
    floor_psnr: float | None
    label_true: int | None
    label_inferred: int | None
    bytes: int
    bytes_fp32: int
    compression_ratio: float
    batch_size: int
    seconds: float
    iterations: int
    restarts: int
    final_loss: float
    result: str
    st_lpips: float | None = None  # shift-tolerant LPIPS; not comparable to LPIPS-Alex


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One setting: dataset x model x defense x attack x view x step, over all its records' images."""

    dataset: str
    model: str
    defense: str
    attack: str
    view: str
    step: int
    source: str
    budget: Budget
    records: int
    images: int
    bytes_per_step: float
    bytes_fp32: float
    compression_ratio: float
    test_accuracy: float | None
    accuracy_model: str | None  # the model the accuracy was trained on (may differ from `model`)
    ssim: Stat | None
    psnr: Stat | None
    lpips: Stat | None
    label_accuracy: float | None  # mean over records
    floor_ssim: float | None
    floor_psnr: float | None
    lpips_reason: str | None
    threat: str  # what the attacker used, as the attack described it
    seconds: float
    label_worst: float | None = None  # the record whose labels leaked most
    accuracy: stats.Estimate | None = None  # test accuracy of the same defense, with its standard error
    verdict: stats.Verdict | None = None  # this setting alone against the floor (one comparison)
    train_run: str | None = None  # the training run the record came from (source "train"), if found
    st_lpips: Stat | None = None  # ST-LPIPS, over the same images (None when any image lacks it)


@dataclasses.dataclass(frozen=True)
class TableGroup:
    """The rows of one dataset x model table, and that table's floor."""

    dataset: str
    model: str
    rows: tuple[SummaryRow, ...]
    floor_ssim: float | None
    floor_psnr: float | None
    floor_images: int
    names: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)  # defense -> shown name

    def shown(self, defense: str) -> str:
        """The defense as tables name it (:mod:`gia_bench.reports.names`)."""
        return self.names.get(defense, defense)


@dataclasses.dataclass(frozen=True)
class ReportData:
    """Everything the writers need."""

    runs: RunSet
    image_rows: tuple[ImageRow, ...]
    groups: tuple[TableGroup, ...]
    lpips_notes: tuple[str, ...]  # distinct "LPIPS unavailable: ..." reasons
    notes: tuple[str, ...]  # other things the reader should know (e.g. results without truth)
    names: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)  # defense -> shown name

    def shown(self, defense: str) -> str:
        """The defense as tables name it (:mod:`gia_bench.reports.names`)."""
        return self.names.get(defense, defense)

    @property
    def summary(self) -> tuple[SummaryRow, ...]:
        return tuple(r for g in self.groups for r in g.rows)


def stat(values: Sequence[float], worst: Callable[[Iterable[float]], float]) -> Stat | None:
    """Mean, worst case and spread of ``values`` (None when there are none)."""
    vals = [float(v) for v in values]
    if not vals:
        return None
    mean = math.fsum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else (
        math.inf if any(v == math.inf for v in vals) else math.nan
    )
    finite = all(math.isfinite(v) for v in vals)
    spread = statistics.pstdev(vals) if finite and len(vals) > 1 else (0.0 if finite else math.nan)
    return Stat(mean, worst(vals), spread, len(vals))


def _base(spec: str) -> str:
    return spec.split(":", 1)[0]


def _accuracy_for(result: AttackResult, trains: Sequence[TrainRun]) -> TrainRun | None:
    """The training run with the same canonical defense and dataset; the same model preferred.

    A dataset matches exactly, or else by name alone ("digits" for "digits:channels=3,size=32"),
    an exact match winning. A result captured inside a training run (its record file lies in
    that run's folder) takes that very run.
    """
    own = _own_run(result, trains)
    if own is not None:
        return own
    same = [t for t in trains if t.defense == result.defense and _base(t.dataset) == _base(result.dataset)]
    if not same:
        return None
    same.sort(
        key=lambda t: (t.dataset != result.dataset, _base(t.model) != _base(result.model), t.model != result.model, str(t.path))
    )
    return same[0]


def _own_run(result: AttackResult, trains: Sequence[TrainRun]) -> TrainRun | None:
    """The training run whose folder holds the result's record (records captured by ``train``)."""
    if result.source != "train" or not result.record:
        return None
    record = Path(result.record)
    for t in trains:
        try:
            record.resolve().relative_to(t.folder.resolve())
        except ValueError:
            continue
        return t
    return None


def _seeds_of(run: TrainRun, trains: Sequence[TrainRun]) -> list[TrainRun]:
    """Every run of the same setting as ``run`` (dataset, model, defense): the seeds of one setting."""
    return [t for t in trains if (t.dataset, t.model, t.defense) == (run.dataset, run.model, run.defense)]


def accuracy_of(run: TrainRun | None, trains: Sequence[TrainRun]) -> stats.Estimate | None:
    """Final test accuracy of ``run``'s setting with its standard error (binomial, or over seeds)."""
    if run is None:
        return None
    runs = _seeds_of(run, trains) if run.seed is not None or len(_seeds_of(run, trains)) > 1 else [run]
    # two files of the same seed are one run counted twice, not two seeds
    by_seed: dict[object, TrainRun] = {}
    for t in sorted(runs, key=lambda t: str(t.path)):
        by_seed.setdefault(t.seed if t.seed is not None else str(t.path), t)
    runs = list(by_seed.values())
    return stats.accuracy_estimate([t.final_test_accuracy for t in runs], [t.test_examples for t in runs])


def perceptual_metric(rows: Sequence[SummaryRow]) -> str:
    """The perceptual column of a table: ``lpips`` when every row has LPIPS, else ``st_lpips``.

    LPIPS proper needs ImageNet trunk weights the user supplies; ST-LPIPS ships its
    own, so it is the default. One table never mixes the two: their values are not
    comparable.
    """
    return "lpips" if rows and all(r.lpips is not None for r in rows) else "st_lpips"


def _st_lpips_fill(res: AttackResult, rec: Tensor | None, orig: Tensor | None, compute: bool) -> list[float] | None:
    """ST-LPIPS of the stored pairs, for a result written before ST-LPIPS was scored (else None)."""
    if not compute or rec is None or orig is None or res.scores is None:
        return None
    if all(im.value("st_lpips") is not None for im in res.scores.images):
        return None
    scorer = get_st_lpips("alex")
    return [float(v) for v in scorer(rec, orig)] if scorer.available else None


@dataclasses.dataclass
class _Stored:
    """What a result's stored images give, computed once per tensors file."""

    floors: list[tuple[float, float]] | None
    lpips: list[float] | None
    st_lpips: list[float] | None


def _stored(res: AttackResult, lpips: LPIPSScorer | None) -> _Stored:
    rec, orig, _ = res.load_images()
    computed = None
    if rec is not None and orig is not None and lpips is not None and lpips.available:
        computed = [float(v) for v in lpips(rec, orig)]
    floors = mean_colour_floor(orig) if orig is not None else None
    return _Stored(floors, computed, _st_lpips_fill(res, rec, orig, lpips is not None))


def _at(values: Sequence[float] | None, i: int) -> float | None:
    return values[i] if values is not None and i < len(values) else None


def _image_rows(res: AttackResult, stored: _Stored) -> list[ImageRow]:
    """The result's images, scored, with their floors and any LPIPS / ST-LPIPS computed here."""
    rows = []
    for im in res.scores.images if res.scores is not None else ():
        lp = im.lpips if im.lpips is not None else _at(stored.lpips, im.index)
        st = im.value("st_lpips")
        st = st if st is not None else _at(stored.st_lpips, im.index)
        floor = stored.floors[im.index] if stored.floors is not None and im.index < len(stored.floors) else None
        truth = res.labels_true
        rows.append(
            ImageRow(
                dataset=res.dataset, model=res.model, defense=res.defense, attack=res.attack, view=res.view,
                step=res.step, source=res.source, record_id=res.record_id, image=im.index, matched=im.matched,
                ssim=im.ssim, psnr=im.psnr, lpips=lp,
                floor_ssim=None if floor is None else floor[0], floor_psnr=None if floor is None else floor[1],
                label_true=truth[im.index] if truth is not None and im.index < len(truth) else None,
                label_inferred=res.labels_inferred[im.matched] if im.matched < len(res.labels_inferred) else None,
                bytes=res.bytes, bytes_fp32=res.bytes_fp32, compression_ratio=res.compression_ratio,
                batch_size=res.batch_size, seconds=res.seconds, iterations=res.budget.iterations,
                restarts=res.budget.restarts, final_loss=res.final_loss, result=str(res.path), st_lpips=st,
            )  # fmt: skip
        )
    return rows


def _threat_line(results: Sequence[AttackResult]) -> str:
    """Each distinct threat text of a setting's results, with what a structure-aware attack exploited."""
    texts: list[str] = []
    for r in results:
        t = threat_text(r.threat)
        used = exploited_text(read_extra(r)) if is_structure_aware(r.attack) else ""
        t = "; ".join(x for x in (t, f"exploited: {used}" if used else "") if x)
        if t and t not in texts:
            texts.append(t)
    return " | ".join(texts)


def _summary_row(key: tuple[str, str, str, str, str, int, str], items: list[tuple[AttackResult, list[ImageRow]]],
                 trains: Sequence[TrainRun]) -> SummaryRow:  # fmt: skip
    """One setting over all its records' images."""
    dataset, model, defense, attack, view, step, _source = key
    results = [r for r, _ in items]
    rows = [row for _, rs in items for row in rs]
    scored = [r.scores for r in results if r.scores is not None]
    label_accs = [s.label_accuracy for s in scored if s.label_accuracy is not None]
    train, own = _accuracy_for(results[0], trains), _own_run(results[0], trains)
    lp_vals = [r.lpips for r in rows]
    reasons = [s.lpips_reason for s in scored if s.lpips_reason]
    floor_s = [r.floor_ssim for r in rows if r.floor_ssim is not None]
    floor_p = [r.floor_psnr for r in rows if r.floor_psnr is not None]
    bytes_mean = statistics.fmean(r.bytes for r in results)
    bytes32 = statistics.fmean(r.bytes_fp32 for r in results)
    all_lpips = all(v is not None for v in lp_vals)
    return SummaryRow(
        dataset=dataset, model=model, defense=defense, attack=attack, view=view, step=step,
        source=results[0].source, budget=results[0].budget, records=len({r.record_id for r in results}),
        images=len(rows), bytes_per_step=bytes_mean, bytes_fp32=bytes32,
        compression_ratio=bytes32 / bytes_mean if bytes_mean > 0 else math.inf,
        test_accuracy=None if train is None else train.final_test_accuracy,
        accuracy_model=None if train is None else train.model,
        ssim=stat([r.ssim for r in rows], max), psnr=stat([r.psnr for r in rows], max),
        lpips=stat([v for v in lp_vals if v is not None], min) if all_lpips else None,
        label_accuracy=statistics.fmean(label_accs) if label_accs else None,
        floor_ssim=statistics.fmean(floor_s) if floor_s else None,
        floor_psnr=statistics.fmean(floor_p) if floor_p else None,
        lpips_reason=None if all_lpips else (reasons[0] if reasons else "LPIPS missing"),
        threat=_threat_line(results), seconds=statistics.fmean(r.seconds for r in results),
        label_worst=max(label_accs) if label_accs else None, accuracy=accuracy_of(train, trains),
        verdict=stats.floor_verdict([(r.ssim, r.psnr, r.floor_ssim, r.floor_psnr) for r in rows]) if rows else None,
        train_run=None if own is None else str(own.path),
        st_lpips=stat([r.st_lpips for r in rows if r.st_lpips is not None], min)
        if all(r.st_lpips is not None for r in rows) else None,
    )  # fmt: skip


def _table_group(dataset: str, model: str, rows: list[SummaryRow], image_rows: Sequence[ImageRow],
                 names: Mapping[str, str]) -> TableGroup:  # fmt: skip
    rows.sort(key=lambda r: (-r.bytes_per_step, r.defense, r.source, r.step, r.attack, VIEW_ORDER.get(r.view, 9), r.view))
    # the table's floor: each distinct original image once
    seen: dict[tuple[str, int], tuple[float, float]] = {}
    for row in image_rows:
        if row.dataset == dataset and row.model == model and row.floor_ssim is not None and row.floor_psnr is not None:
            seen[(row.record_id, row.image)] = (row.floor_ssim, row.floor_psnr)
    floor_s = statistics.fmean(v[0] for v in seen.values()) if seen else None
    floor_p = statistics.fmean(v[1] for v in seen.values()) if seen else None
    return TableGroup(dataset, model, tuple(rows), floor_s, floor_p, len(seen), names)


def defense_names(runs: RunSet, spellings: Sequence[str] = ()) -> dict[str, str]:
    """Every defense of the runs -> the name tables show (:mod:`gia_bench.reports.names`)."""
    learn_shown(runs.results)
    specs = list(dict.fromkeys([r.defense for r in runs.results] + [t.defense for t in runs.trains]))
    return display_names(specs, spellings, {s: short_spec(s, "defense") for s in specs})


def build_report(runs: RunSet, lpips: LPIPSScorer | None = None, spellings: Sequence[str] = ()) -> ReportData:
    """Score tables from loaded runs.

    Floors come from the originals stored beside each result. Where a result has no
    LPIPS value and ``lpips`` is available, LPIPS is computed here from the stored
    reconstruction and original (already in paired order); so is ST-LPIPS for a result
    written before it was scored (only when ``lpips`` is given: the compute switch).
    ``spellings``: the study's own defense specs, for the names tables show.
    """
    learn_shown(runs.results)
    cache: dict[str, _Stored] = {}
    image_rows: list[ImageRow] = []
    lpips_notes: list[str] = []
    by_setting: dict[tuple[str, str, str, str, str, int, str], list[tuple[AttackResult, list[ImageRow]]]] = defaultdict(list)
    for res in runs.results:
        if is_text_result(res):  # sentences, not images: the text section (gia_bench.reports.text_scores)
            continue
        key = str(res.tensors_path)
        if key not in cache:
            cache[key] = _stored(res, lpips)
        rows = _image_rows(res, cache[key])
        reason = res.scores.lpips_reason if res.scores is not None else None
        if any(r.lpips is None for r in rows) and reason and reason not in lpips_notes:
            lpips_notes.append(reason)
        image_rows += rows
        # source too: a training run's step-0 record is not the capture's step-0 record (other batch, weights)
        by_setting[(res.dataset, res.model, res.defense, res.attack, res.view, res.step, res.source)].append((res, rows))
    if lpips is not None and not lpips.available and any(r.lpips is None for r in image_rows):
        if lpips.reason and lpips.reason not in lpips_notes:
            lpips_notes.append(lpips.reason)
    no_truth = sum(1 for r in runs.results if r.scores is None)
    notes = [f"{no_truth} result(s) had no ground truth: listed with bytes only, no leakage scores."] if no_truth else []
    summary: dict[tuple[str, str], list[SummaryRow]] = defaultdict(list)
    for key, items in by_setting.items():
        summary[key[:2]].append(_summary_row(key, items, runs.trains))
    names = defense_names(runs, spellings)
    groups = tuple(_table_group(d, m, rows, image_rows, names) for (d, m), rows in sorted(summary.items()))
    return ReportData(runs, tuple(image_rows), groups, tuple(lpips_notes), tuple(notes), names)


VIEW_ORDER = {"naive": 0, "aware": 1, "oracle": 2}


# -- CSV -------------------------------------------------------------------------------------------


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_text(text: str) -> str:
    """A text cell made inert for spreadsheets (OWASP CSV injection: prefix a leading =, +, -, @, tab, CR with ')."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def _cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, bool):
        return v
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, int):
        return v
    # anything else is text that came from a record, a spec or a path: never a formula; a bare CR
    # would end the row (csv quotes only the line terminator's characters), so it becomes a quoted LF
    return csv_text(str(v)).replace("\r\n", "\n").replace("\r", "\n")


def results_csv(data: ReportData) -> str:
    """``results.csv``: one row per image x attack x view x defense (x record)."""
    buf = io.StringIO()
    fields = [f.name for f in dataclasses.fields(ImageRow)]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for row in data.image_rows:
        w.writerow([_cell(getattr(row, f)) for f in fields])
    return buf.getvalue()


SUMMARY_FIELDS = (
    "dataset", "model", "defense", "attack", "view", "step", "source", "records", "images",
    "bytes_per_step", "bytes_fp32", "compression_ratio", "test_accuracy", "accuracy_model",
    "ssim_mean", "ssim_worst", "ssim_spread", "psnr_mean", "psnr_worst", "psnr_spread",
    "lpips_mean", "lpips_worst", "lpips_spread", "label_accuracy",
    "floor_ssim", "floor_psnr", "seconds", "threat", "lpips_reason",
    "label_worst", "test_accuracy_se", "test_accuracy_runs", "iterations", "restarts", "evaluations",
    "budget_preset", "budget_from_spec", "verdict", "verdict_images", "verdict_beat_floor", "verdict_p",
    "train_run", "st_lpips_mean", "st_lpips_worst", "st_lpips_spread",
)  # fmt: skip


def summary_csv(data: ReportData) -> str:
    """``summary.csv``: one row per dataset x model x defense x attack x view x step."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_FIELDS)
    for r in data.summary:
        flat: dict[str, object] = {f.name: getattr(r, f.name) for f in dataclasses.fields(SummaryRow)}
        for name in ("ssim", "psnr", "lpips", "st_lpips"):
            s: Stat | None = flat.pop(name)  # type: ignore[assignment]
            flat[f"{name}_mean"] = None if s is None else s.mean
            flat[f"{name}_worst"] = None if s is None else s.worst
            flat[f"{name}_spread"] = None if s is None else s.spread
        acc, budget, verdict = r.accuracy, r.budget, r.verdict
        flat.update(
            test_accuracy_se=None if acc is None else acc.se,
            test_accuracy_runs=None if acc is None else acc.runs,
            iterations=budget.iterations,
            restarts=budget.restarts,
            evaluations=budget.evaluations,
            budget_preset=budget.preset,
            budget_from_spec=budget.from_spec,
            verdict=None if verdict is None else verdict.verdict,
            verdict_images=None if verdict is None else verdict.n,
            verdict_beat_floor=None if verdict is None else verdict.beats,
            verdict_p=None if verdict is None else verdict.p,
        )
        w.writerow([_cell(flat[f]) for f in SUMMARY_FIELDS])
    return buf.getvalue()


# -- formatting shared by the writers --------------------------------------------------------------


#: spec -> how results written by :mod:`gia_bench.evaluate` show it (``AttackResult.shown``), filled as
#: results are loaded; a spec no result has shown (an older file, a training run's) is shown whole
_SHOWN: dict[tuple[str, str], str] = {}


def learn_shown(results: Sequence[AttackResult]) -> None:
    """Remember how each result's writer shows its attack and defense specs (for :func:`short_spec`)."""
    for r in results:
        for kind, spec in (("attack", r.attack), ("defense", r.defense)):
            if r.shown.get(kind):
                _SHOWN[(kind, spec)] = r.shown[kind]


def short_spec(spec: str, kind: str) -> str:
    """``spec`` without the parameters left at their defaults, for tables and legends.

    ``kind`` is "attack" or "defense". The writer of each result decided this with the registries
    (:func:`gia_bench.registry.display_spec`); reports import none. The CSV files keep the full
    canonical spec; a spec no loaded result showed is given in full (less its unset ``=None`` parameters).
    """
    return _SHOWN.get((kind, spec)) or full_spec(spec)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:.{digits}f}"


def fmt_ratio(v: float) -> str:
    return "∞" if math.isinf(v) else f"{v:.3g}×"

