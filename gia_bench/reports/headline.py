"""The report's first table: one row per defense setting, and the banner that says when a study cannot support it.

A :class:`DefenseRow` answers, for one dataset x model x defense: what it costs (bytes
per step, ratio against uncompressed fp32, test accuracy ± its standard error and
whether that differs from the uncompressed reference), and how much its strongest
attacker recovers with a verdict against the mean-colour floor. The strongest attacker
is the one whose images beat the floor most significantly (lowest sign-test p, every
attacker at the same Bonferroni level), then the highest mean SSIM: a setting leaks when
ANY attacker's images beat the floor, so no setting whose images do reads as protected.
The statistical rules are in :mod:`gia_bench.reports.stats`.

The structure-aware attacks (``feature``, ``analytic``: :mod:`gia_bench.reports.threats`)
compete like any other; :func:`structure_note` says when a setting leaks only to them.

The oracle view reads the worker's private residual from the truth file: it is an
upper bound, not an attacker, so it never counts as the strongest attacker; its best
row is kept beside (:attr:`DefenseRow.oracle`).

:func:`study_warnings` is the one rule for "this study is too small to support its
verdicts", shared by the report's banner and ``gia-bench audit``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence

from gia_bench.reports import stats
from gia_bench.reports.tables import ReportData, SummaryRow, TableGroup, short_spec
from gia_bench.results import FAR_BELOW, Budget
from gia_bench.reports.threats import is_structure_aware

REFERENCE = "none"  # accuracies are compared with the uncompressed baseline when the study has it

# a budget below this fraction of the published one is "far below": the rule the attacks warn by
BUDGET_FRACTION = FAR_BELOW


def published_budget(budget: Budget) -> tuple[int, int, str] | None:
    """(iterations, restarts, source) the attack's authors ran, as its result recorded; None: no such figure."""
    pub = budget.published
    if pub is None or not pub.iterations:
        return None
    return pub.iterations, pub.restarts, pub.source or "published"


BUDGET_RULE = (
    "The banner appears when a study cannot support its verdicts: (1) the strongest attacker of a defense"
    " setting was scored on fewer images than the sign test needs to say 'leaks' at its level (5 images for one"
    " attacker setting, more when the strongest is picked from several); (2) an attack ran fewer than"
    f" {BUDGET_FRACTION:.0%} of the published iterations x restarts its result records (the budgets table lists them);"
    " (3) the uncompressed baseline 'none' does not leak under the strongest attack, so the attacks cannot"
    " separate the defenses."
)


@dataclasses.dataclass(frozen=True)
class DefenseRow:
    """One defense setting of one dataset x model: cost, accuracy and its strongest attacker."""

    dataset: str
    model: str
    defense: str
    bytes_per_step: float
    bytes_fp32: float
    compression_ratio: float
    accuracy: stats.Estimate | None
    accuracy_model: str | None
    vs_reference: str | None  # "reference", "not different", "lower", "higher", "unknown"; None without accuracy
    reference: str | None  # the defense accuracies are compared with
    strongest: SummaryRow | None  # None when no attacker was scored
    oracle: SummaryRow | None  # the best oracle (upper bound) row, if any
    attackers: int  # attacker settings (attack x view x step, oracle excluded) the strongest was picked from
    verdict: stats.Verdict | None
    reference_accuracy: float | None = None
    name: str = ""  # the defense as tables show it (the study's spelling)
    matching: SummaryRow | None = None  # the strongest gradient-matching attacker (structure-aware ones left out)
    matching_verdict: stats.Verdict | None = None  # its verdict, at the same level as ``verdict``

    @property
    def shown(self) -> str:
        return self.name or self.defense

    @property
    def images(self) -> int:
        return 0 if self.strongest is None else self.strongest.images


@dataclasses.dataclass(frozen=True)
class HeadlineGroup:
    """The headline rows of one dataset x model, most bytes first."""

    group: TableGroup
    rows: tuple[DefenseRow, ...]

    @property
    def dataset(self) -> str:
        return self.group.dataset

    @property
    def model(self) -> str:
        return self.group.model


def _key(r: SummaryRow) -> tuple[float, float]:
    s = r.ssim.mean if r.ssim is not None and not math.isnan(r.ssim.mean) else -math.inf
    p = r.psnr.mean if r.psnr is not None and not math.isnan(r.psnr.mean) else -math.inf
    return (s, p)


def strongest(rows: Sequence[SummaryRow], verdicts: Mapping[SummaryRow, stats.Verdict] | None = None) -> SummaryRow | None:
    """The attacker whose images beat the floor most significantly, then the highest mean SSIM (then PSNR).

    With ``verdicts`` (each row's sign test at the report's level) the pick follows the
    report's test: a setting leaks when ANY attacker's images beat the floor, so a DLG
    whose few images are recognisable is not hidden behind an IG with a higher mean SSIM
    over blurs. Without them, the highest mean SSIM. None when none was scored.
    """
    scored = [r for r in rows if r.ssim is not None]
    if not scored:
        return None
    if verdicts is None:
        return max(scored, key=_key)
    return max(scored, key=lambda r: (-verdicts[r].p if r in verdicts else -2.0, *_key(r)))


def _pairs(data: ReportData) -> dict[tuple, list[tuple[float, float, float | None, float | None]]]:
    out: dict[tuple, list[tuple[float, float, float | None, float | None]]] = defaultdict(list)
    for i in data.image_rows:
        out[(i.dataset, i.model, i.defense, i.attack, i.view, i.step, i.source)].append(
            (i.ssim, i.psnr, i.floor_ssim, i.floor_psnr)
        )
    return out


def _defense_row(g: TableGroup, defense: str, rs: list[SummaryRow], pairs: Mapping[tuple, list]) -> DefenseRow:
    attackers = [r for r in rs if r.view != "oracle" and r.ssim is not None]
    # every attacker tested at the same Bonferroni level: the strongest is picked after the fact out of all of them
    verdicts = {
        r: stats.floor_verdict(pairs.get((g.dataset, g.model, defense, r.attack, r.view, r.step, r.source), []),
                               comparisons=len(attackers))
        for r in attackers
    }  # fmt: skip
    best = strongest(attackers, verdicts)
    matching = strongest([r for r in attackers if not is_structure_aware(r.attack)], verdicts)
    acc_row = next((r for r in rs if r.accuracy is not None), None)
    bytes_mean = statistics.fmean(r.bytes_per_step for r in rs)
    bytes32 = statistics.fmean(r.bytes_fp32 for r in rs)
    return DefenseRow(
        dataset=g.dataset, model=g.model, defense=defense, bytes_per_step=bytes_mean, bytes_fp32=bytes32,
        compression_ratio=bytes32 / bytes_mean if bytes_mean > 0 else math.inf,
        accuracy=None if acc_row is None else acc_row.accuracy,
        accuracy_model=None if acc_row is None else acc_row.accuracy_model, vs_reference=None, reference=None,
        strongest=best, oracle=strongest([r for r in rs if r.view == "oracle"]), attackers=len(attackers),
        verdict=None if best is None else verdicts[best], name=g.shown(defense),
        matching=matching, matching_verdict=None if matching is None else verdicts[matching],
    )  # fmt: skip


def _separates(rows: Sequence[DefenseRow]) -> bool:
    """The table tells defenses apart: some leak and some do not (by the report's verdicts)."""
    leaks = {r.verdict.verdict == stats.LEAKS for r in rows if r.verdict is not None}
    return leaks == {True, False}


def headline(data: ReportData) -> tuple[HeadlineGroup, ...]:
    """One :class:`DefenseRow` per dataset x model x defense; the tables that separate defenses first.

    Order: tables where some settings leak and others do not, then the rest; a table of
    training-run records (where attacks face batches of a live run) after the captures.
    """
    pairs = _pairs(data)
    out = []
    for g in data.groups:
        by_defense: dict[str, list[SummaryRow]] = {}
        for r in g.rows:
            by_defense.setdefault(r.defense, []).append(r)
        rows = _compare_accuracies([_defense_row(g, d, rs, pairs) for d, rs in by_defense.items()])
        rows.sort(key=lambda r: (-r.bytes_per_step, r.defense))
        out.append(HeadlineGroup(g, tuple(rows)))
    out.sort(key=lambda h: (not _separates(h.rows), any(r.source == "train" for r in h.group.rows)))
    return tuple(out)


def reference_of(rows: Sequence[DefenseRow]) -> DefenseRow | None:
    """``none`` when it has an accuracy, else the setting with an accuracy that sends the most bytes."""
    with_acc = [r for r in rows if r.accuracy is not None]
    if not with_acc:
        return None
    return next((r for r in with_acc if r.defense == REFERENCE), max(with_acc, key=lambda r: r.bytes_per_step))


def _compare_accuracies(rows: list[DefenseRow]) -> list[DefenseRow]:
    ref = reference_of(rows)
    if ref is None:
        return rows
    out = []
    for r in rows:
        if r.accuracy is None:
            out.append(r)
            continue
        if r is ref:
            vs = "reference"
        else:
            same = stats.not_different(r.accuracy, ref.accuracy)  # type: ignore[arg-type]
            if same is None:
                vs = "unknown"
            elif same:
                vs = "not different"
            else:
                vs = "higher" if r.accuracy.mean > ref.accuracy.mean else "lower"  # type: ignore[union-attr]
        out.append(dataclasses.replace(r, vs_reference=vs, reference=ref.defense, reference_accuracy=ref.accuracy.mean))  # type: ignore[union-attr]
    return out


def accuracy_pairs(rows: Sequence[DefenseRow]) -> list[tuple[DefenseRow, DefenseRow, bool | None]]:
    """Every pair of settings with an accuracy, and whether they are within noise of each other."""
    acc = [r for r in rows if r.accuracy is not None]
    return [(a, b, stats.not_different(a.accuracy, b.accuracy)) for i, a in enumerate(acc) for b in acc[i + 1 :]]  # type: ignore[arg-type]


def study_warnings(data: ReportData, groups: Sequence[HeadlineGroup] | None = None) -> tuple[str, ...]:
    """Why the study's verdicts (and any ranking built on them) are not supported; empty when they are.

    The rule is :data:`BUDGET_RULE`; the report shows these lines as a banner and
    ``gia-bench audit`` prints them beside its standings.
    """
    groups = headline(data) if groups is None else groups
    warnings: list[str] = []
    scored = [r for g in groups for r in g.rows if r.strongest is not None]
    few = [r for r in scored if r.images < stats.min_images(r.attackers)]
    if few:
        least, most = min(r.images for r in few), max(r.images for r in few)
        need = max(stats.min_images(r.attackers) for r in few)
        warnings.append(
            f"Too few images: {len(few)} of {len(scored)} defense settings rest on"
            f" {least if least == most else f'{least} to {most}'} image(s) under their strongest attacker, fewer than"
            f" the {need} the sign test needs to call anything a leak at its level; their verdicts can only read"
            " 'too few images to tell', and their worst cases and spreads rest on those images alone."
        )
    seen: set[str] = set()
    for g in data.groups:
        for r in g.rows:
            if r.attack in seen:
                continue
            seen.add(r.attack)
            pub = published_budget(r.budget)
            if pub is None:
                continue
            spent = r.budget.iterations * r.budget.restarts
            wanted = pub[0] * pub[1]
            if spent < BUDGET_FRACTION * wanted:
                where = " (read from its spec; the result did not record its budget)" if r.budget.from_spec else ""
                warnings.append(
                    f"Attack budget far below the published one: {short_spec(r.attack, 'attack')} ran"
                    f" {r.budget.iterations:,} iterations x {r.budget.restarts} restart(s){where},"
                    f" {spent / wanted:.1%} of {pub[0]:,} x {pub[1]} ({pub[2]}). A defense that does not leak under"
                    " it may leak under the full attack."
                )
    for g in groups:
        base = next((r for r in g.rows if r.defense == REFERENCE and r.verdict is not None), None)
        if base is not None and base.verdict.verdict == stats.FLOOR:  # type: ignore[union-attr]
            warnings.append(
                f"On {g.dataset} / {g.model} the uncompressed baseline 'none' is indistinguishable from the floor"
                " under its strongest attack: the attacks are too weak at this budget to separate the defenses,"
                " so no ranking of them follows from this study."
            )
    return tuple(warnings)


def summary_sentence(groups: Sequence[HeadlineGroup]) -> str:
    """One plain sentence: which settings leak, which do not, which cannot be told, over every table.

    A setting leaks when any attacker's images beat the floor by the sign test (its
    row's verdict); a setting with too few images is never listed as protected.
    """
    where: dict[str, dict[str, list[str]]] = {}
    for g in groups:
        for r in g.rows:
            if r.verdict is not None and r.verdict.n:
                where.setdefault(r.shown, {}).setdefault(r.verdict.verdict, []).append(f"{g.dataset} / {g.model}")
    if not where:
        return "No reconstruction was scored against its floor, so this report names no leaking setting."
    parts = []
    labels = (
        (stats.LEAKS, "leak"),
        (stats.FLOOR, "no leak shown (no attacker beat the floor by the sign test)"),
        (stats.TOO_FEW, "too few images to tell"),
    )
    for verdict, label in labels:
        names = []
        for name, by in where.items():
            if verdict in by:
                # the tables are named only where the same setting reads otherwise on another table
                names.append(f"'{name}'" + ("" if len(by) == 1 else f" (on {', '.join(by[verdict])})"))
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "."


def structure_note(g: HeadlineGroup) -> str:
    """The section's first paragraph: settings that leak only to a structure-aware attacker, said plainly."""
    ran = {r.attack.split(":", 1)[0] for r in g.group.rows if is_structure_aware(r.attack)}
    if not ran:
        return ("No structure-aware attacker ('feature', 'analytic') ran on this table: its verdicts rest on"
                " gradient matching alone.")  # fmt: skip
    if all(is_structure_aware(r.attack) for r in g.group.rows):
        quoted = ", ".join(f"'{n}'" for n in sorted(ran))
        return (f"Only structure-aware attackers ({quoted}) ran on this table, no gradient matching: its verdicts"
                " say what the exactly sent layers give away, not whether matching would find the same.")
    only = [
        r for r in g.rows
        if r.verdict is not None and r.verdict.verdict == stats.LEAKS and r.strongest is not None
        and is_structure_aware(r.strongest.attack)
        and (r.matching_verdict is None or r.matching_verdict.verdict != stats.LEAKS)
    ]  # fmt: skip
    if not only:
        quoted = ", ".join(f"'{n}'" for n in sorted(ran))
        return (f"The structure-aware attackers ({quoted}) change no verdict here: every setting that"
                " leaks to them also leaks to gradient matching (naive or aware view), or leaks to neither.")
    parts = []
    for r in only:
        s, m = r.strongest, r.matching_verdict
        assert s is not None and r.verdict is not None
        matched = "no gradient-matching attacker scored" if m is None else f"matching {m.beats}/{m.n}, {m.verdict}"
        parts.append(f"'{r.shown}' ({s.attack.split(':', 1)[0]}, {s.view}: {r.verdict.beats}/{r.verdict.n} images"
                     f" beat the floor; {matched})")  # fmt: skip
    return (f"{len(only)} compressed setting(s) leak under a structure-aware attacker although gradient matching"
            " (naive and aware views) says they do not: " + "; ".join(parts) + ".")
