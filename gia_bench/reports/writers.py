"""``report.md`` and the self-contained ``report.html`` (jinja2 template, images as data URIs).

Both documents are built from the same :class:`Doc`: the banner, the headline table (one
row per defense setting), the threat model with every attack's budget, then the details
(every attack and view, every training step, image grids), collapsible.

Everything that comes from a record, a spec, a path or a result file is untrusted text:
the HTML template autoescapes it, and :func:`md_text` escapes it for Markdown (HTML
entities for ``<``, ``>``, ``&``, ``"``; a backslash before Markdown punctuation), so a
``<script>`` in a record id reaches neither document as markup.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from gia_bench.reports import stats
from gia_bench.reports.figures import Figure
from gia_bench.reports.headline import (
    BUDGET_RULE,
    DefenseRow,
    HeadlineGroup,
    accuracy_pairs,
    headline,
    published_budget,
    structure_note,
    study_warnings,
    summary_sentence,
)
from gia_bench.results import Budget
from gia_bench.reports.names import full_spec
from gia_bench.reports.tables import (
    VIEW_ORDER,
    ReportData,
    Stat,
    SummaryRow,
    TableGroup,
    fmt_bytes,
    fmt_num,
    fmt_ratio,
    perceptual_metric,
    short_spec,
)

THREAT_MODEL = (
    "Honest-but-curious server (or a peer in an all-gather), white-box model: it knows the model's weights,"
    " the compressor and its public randomness (shared seeds, the previous round's Q), and sees one worker's"
    " messages for one step of a batch of B private images. It never sees the data or the labels."
)
VIEWS = {
    "naive": "the attacker decodes the messages into a gradient as the receiver does, and matches the gradient"
    " of its dummy batch to that.",
    "aware": "the attacker runs the compressor's own simulation (same mask, same Q, same codec) on the gradient"
    " of its dummy batch and matches that to the messages; the worker's private error-feedback residual is"
    " unknown to it (the threat line of each attack says how it is treated).",
    "oracle": "UPPER BOUND, not an attacker: the aware view given the worker's private residual, read from the"
    " truth file by the evaluation. Never counted as the strongest attacker.",
}
ORACLE_LABEL = "oracle (upper bound)"
STRONGEST = (
    "Strongest attack: the attacker whose images beat the floor most significantly (lowest sign-test p, every"
    " attacker of a setting at the same Bonferroni level), then the highest mean SSIM; a setting leaks when any"
    " attacker's images beat the floor. The oracle view is an upper bound and never counts as an attacker."
)
LEGEND = (
    "Bytes: what one worker sent per optimizer step (bytes/worker/step); ratio: the uncompressed fp32 gradient (plain SGD) over those bytes."
    " Test accuracy: from the training run with the same defense on the same dataset (the model it was trained"
    " on in brackets when it differs), ± its standard error; 'vs' compares it with the reference. For each"
    " metric: the mean over images and the worst case (the most leaking image: highest SSIM or PSNR, lowest"
    " LPIPS); ± is the spread (standard deviation over images). Label accuracy: mean over records, and the worst"
    " record (the most labels recovered). Higher SSIM/PSNR and lower LPIPS mean more leakage. A table shows"
    " LPIPS where its ImageNet trunk weights were given, else ST-LPIPS (shift-tolerant LPIPS, Ghildyal & Liu"
    " 2022, weights shipped with stlpips-pytorch), a different scale: not comparable to LPIPS-Alex. Reconstructions are paired to originals by the"
    " Hungarian algorithm on pixel MSE before scoring; label accuracy uses the same pairing. The floor is what a"
    " flat image of each original's mean colour scores. Budget: iterations x restarts of the attack; n: images."
)


# -- the neutral document ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """A table cell: ``text`` (a spec when ``code``), and an optional smaller second line."""

    text: str
    sub: str = ""
    code: bool = False
    num: bool = False
    strong: bool = False


@dataclasses.dataclass(frozen=True)
class Table:
    headers: tuple[tuple[str, bool], ...]  # (name, numeric)
    rows: tuple[tuple[Cell, ...], ...]
    starts: tuple[bool, ...] = ()  # per row: first row of a new defense (a rule above it)
    compact: bool = False


@dataclasses.dataclass(frozen=True)
class Details:
    """A collapsible section."""

    summary: str
    paragraphs: tuple[str, ...] = ()
    tables: tuple[Table, ...] = ()
    figures: tuple[Figure, ...] = ()
    specs: tuple[tuple[str, str], ...] = ()  # (shown, full spec)
    open: bool = False


@dataclasses.dataclass(frozen=True)
class GroupDoc:
    dataset: str
    model: str
    intro: str  # the section's first paragraph: what the structure-aware attackers changed
    floor: str
    headline: Table
    figures: tuple[Figure, ...]
    details: tuple[Details, ...]


@dataclasses.dataclass(frozen=True)
class Doc:
    title: str
    summary: str  # one sentence: which settings leak, which do not
    warnings: tuple[str, ...]
    groups: tuple[GroupDoc, ...]
    rules: tuple[str, ...]
    budgets: Table | None
    notes: tuple[str, ...]
    other: tuple[Details, ...]
    skipped: tuple[tuple[str, str], ...]


# -- formatting ----------------------------------------------------------------------------------------


def view_text(view: str) -> str:
    """The view as every table shows it: the oracle is labelled an upper bound."""
    return ORACLE_LABEL if view == "oracle" else view


def _mean_worst(s: Stat | None, digits: int, spread: bool = True) -> Cell:
    if s is None:
        return Cell("–", num=True)
    sub = f"worst {fmt_num(s.worst, digits)}"
    if spread:
        sub += f" ± {fmt_num(s.spread, digits)}"
    return Cell(fmt_num(s.mean, digits), sub, num=True)


def _labels(mean: float | None, worst: float | None) -> Cell:
    if mean is None:
        return Cell("–", num=True)
    return Cell(f"{100 * mean:.0f}%", "" if worst is None else f"worst record {100 * worst:.0f}%", num=True)


def _accuracy_cell(acc: stats.Estimate | None, model: str | None, own_model: str) -> Cell:
    if acc is None:
        return Cell("–", num=True)
    text = f"{100 * acc.mean:.1f}%"
    if acc.se is not None:
        text += f" ± {100 * acc.se:.1f}"
    if acc.method == "binomial":
        sub = f"n = {acc.examples:,} test images"
    elif acc.method == "seeds":
        sub = f"over {acc.runs} seeds"
    else:
        sub = "SE unknown: test size not recorded"
    if model and model.split(":", 1)[0] != own_model.split(":", 1)[0]:
        sub += f"; trained on {model}"
    return Cell(text, sub, num=True)


def _vs_cell(row: DefenseRow) -> Cell:
    if row.vs_reference is None:
        return Cell("–")
    if row.vs_reference == "reference":
        return Cell("reference", "the others are compared with it")
    diff = 100 * (row.accuracy.mean - row.reference_accuracy)  # type: ignore[union-attr,operator]
    if row.vs_reference == "not different":
        return Cell("not different", f"{diff:+.1f} pts, within noise")
    if row.vs_reference == "unknown":
        return Cell(f"{diff:+.1f} pts", "noise unknown")
    return Cell(f"{row.vs_reference} ({diff:+.1f} pts)", "beyond noise", strong=row.vs_reference == "lower")


def budget_cell(b: Budget, images: int | None = None) -> Cell:
    sub = ""
    if b.from_spec:
        sub = "from the spec"
    if b.evaluations:
        sub = (sub + "; " if sub else "") + f"{b.evaluations:,} evaluations"
    text = b.text() if b.iterations else "–"
    if images is not None:
        text += f", n = {images}"
    return Cell(text, sub, num=True)


def _verdict_cell(v: stats.Verdict | None) -> Cell:
    if v is None:
        return Cell("–")
    if v.n == 0:
        return Cell("no floor", "originals not stored")
    level = f", level {v.level:.2g}" if v.comparisons > 1 else ""
    return Cell(v.verdict, f"{v.beats}/{v.n} beat the floor, p = {v.p:.2g}{level}", strong=v.verdict == stats.LEAKS)


def floor_text(group: TableGroup) -> str:
    if group.floor_ssim is None:
        return "Floor: no originals stored, so no flat-image floor for this table."
    return (
        f"Floor (a flat image of each original's mean colour, over {group.floor_images} images):"
        f" SSIM {fmt_num(group.floor_ssim)}, PSNR {fmt_num(group.floor_psnr, 2)} dB."
        " Scores near the floor mean no leakage beyond the average colour."
    )


HEADLINE_HEADERS = (
    ("defense", False), ("bytes/worker/step", True), ("ratio vs fp32", True), ("test acc. ± SE", True),
    ("vs reference", False), ("strongest attack", False), ("SSIM", True), ("PSNR dB", True), ("labels", True),
    ("vs floor", False), ("budget, images", True),
)  # fmt: skip


def headline_table(g: HeadlineGroup) -> Table:
    rows = []
    for r in g.rows:
        s = r.strongest
        if s is None:
            attack = Cell("not scored")
            cells = [Cell("–", num=True)] * 3 + [Cell("–"), Cell("–", num=True)]
        else:
            where = view_text(s.view) + (f", step {s.step}" if s.source == "train" else "")
            sub = f"{where}; best of {r.attackers}" if r.attackers > 1 else where
            if r.oracle is not None and r.oracle.ssim is not None:
                sub += f"; oracle (upper bound) SSIM {fmt_num(r.oracle.ssim.mean)}"
            attack = Cell(short_spec(s.attack, "attack"), sub, code=True)
            cells = [
                _mean_worst(s.ssim, 3, spread=False),
                _mean_worst(s.psnr, 1, spread=False),
                _labels(s.label_accuracy, s.label_worst),
                _verdict_cell(r.verdict),
                budget_cell(s.budget, s.images),
            ]
        rows.append(
            (
                Cell(r.shown, code=True, strong=True),
                Cell(fmt_bytes(r.bytes_per_step), num=True),
                Cell(fmt_ratio(r.compression_ratio), num=True),
                _accuracy_cell(r.accuracy, r.accuracy_model, r.model),
                _vs_cell(r),
                attack,
                *cells,
            )
        )
    return Table(HEADLINE_HEADERS, tuple(rows))


DETAIL_HEADERS = (
    ("defense", False), ("attack", False), ("view", False), ("budget, images", True), ("SSIM", True),
    ("PSNR dB", True), ("LPIPS", True), ("labels", True), ("vs floor (this row alone)", False),
)  # fmt: skip
# the perceptual column's heading, by the metric a table shows (tables.perceptual_metric)
PERCEPTUAL_LABELS = {"lpips": "LPIPS", "st_lpips": "ST-LPIPS"}
STEP_HEADERS = (
    ("defense", False), ("step", True), ("test acc. at step", True), ("attack", False), ("view", False),
    ("budget, images", True), ("SSIM", True), ("PSNR dB", True), ("labels", True), ("vs floor (this row alone)", False),
)  # fmt: skip


def _detail_row(r: SummaryRow, perceptual: str = "lpips", shown: Callable[[str], str] = str) -> tuple[Cell, ...]:
    lp: Stat | None = getattr(r, perceptual)
    return (
        Cell(shown(r.defense), code=True, strong=True),
        Cell(short_spec(r.attack, "attack"), code=True),
        Cell(view_text(r.view)),
        budget_cell(r.budget, r.images),
        _mean_worst(r.ssim, 3),
        _mean_worst(r.psnr, 2),
        _mean_worst(lp, 3) if lp is not None else Cell("n/a", num=True),
        _labels(r.label_accuracy, r.label_worst),
        _verdict_cell(r.verdict),
    )


def detail_table(rows: Sequence[SummaryRow], shown: Callable[[str], str] = str) -> Table:
    """The per-setting table; its perceptual column is LPIPS, or ST-LPIPS when LPIPS has no weights."""
    cells, starts, prev = [], [], None
    perceptual = perceptual_metric(rows)
    for r in rows:
        cells.append(_detail_row(r, perceptual, shown))
        starts.append(prev is not None and r.defense != prev)
        prev = r.defense
    headers = tuple((PERCEPTUAL_LABELS[perceptual], n) if h == "LPIPS" else (h, n) for h, n in DETAIL_HEADERS)
    return Table(headers, tuple(cells), tuple(starts), compact=True)


def accuracy_at(data: ReportData, row: SummaryRow) -> Cell:
    """The training run's test accuracy for the weights the row's record was computed on.

    A record at step s holds the gradient of the weights after s updates; an evaluation
    row's ``step`` counts the updates done before it. So the latest evaluation with
    ``step <= s`` is the accuracy of weights at most that old; an evaluation right after
    step s's own update (``step == s + 1``: the last step of an epoch, e.g. a record at
    "end") is closer unless one is at step s itself, and is used then, saying so.
    """
    run = next((t for t in data.runs.trains if row.train_run and str(t.path) == row.train_run), None)
    if run is None or not run.history:
        return Cell("–", num=True)
    before = [e for e in run.history if e.step <= row.step]
    after = [e for e in run.history if e.step == row.step + 1]
    if after and (not before or row.step - before[-1].step > 1):
        e, where = after[0], f"after its update: step {after[0].step}"
    elif before:
        e, where = before[-1], f"at step {before[-1].step}"
    else:
        return Cell("–", "no evaluation yet", num=True)
    text = f"{100 * e.test_accuracy:.1f}%"
    if e.test_examples:
        text += f" ± {100 * stats.binomial_se(e.test_accuracy, e.test_examples):.1f}"
    return Cell(text, where, num=True)


def step_table(data: ReportData, rows: Sequence[SummaryRow]) -> Table:
    cells, starts, prev = [], [], None
    for r in sorted(rows, key=lambda r: (-r.bytes_per_step, r.defense, r.step, r.attack, VIEW_ORDER.get(r.view, 9))):
        d = _detail_row(r, shown=data.shown)
        cells.append((d[0], Cell(str(r.step), num=True), accuracy_at(data, r), d[1], d[2], d[3], d[4], d[5], d[7], d[8]))
        starts.append(prev is not None and r.defense != prev)
        prev = r.defense
    return Table(STEP_HEADERS, tuple(cells), tuple(starts), compact=True)


def _threats(group: TableGroup) -> Table:
    seen: dict[tuple[str, str], str] = {}
    for r in group.rows:
        seen.setdefault((r.attack, r.view), r.threat or "not stated")
    rows = tuple((Cell(full_spec(a), code=True), Cell(view_text(v)), Cell(t)) for (a, v), t in sorted(seen.items()))
    return Table((("attack (full spec)", False), ("view", False), ("threat", False)), rows, compact=True)


def _defense_specs(group: TableGroup) -> tuple[tuple[str, str], ...]:
    out = []
    for d in dict.fromkeys(r.defense for r in group.rows):
        if group.shown(d) != full_spec(d):
            out.append((group.shown(d), full_spec(d)))
    return tuple(out)


def _pairs_table(g: HeadlineGroup) -> Table | None:
    pairs = accuracy_pairs(g.rows)
    if not pairs:
        return None
    rows = []
    for a, b, same in pairs:
        diff = 100 * (a.accuracy.mean - b.accuracy.mean)  # type: ignore[union-attr]
        verdict = "unknown (no standard error)" if same is None else ("not different" if same else "different")
        rows.append(
            (Cell(a.shown, code=True), Cell(b.shown, code=True),
             Cell(f"{diff:+.1f} pts", num=True), Cell(verdict, strong=same is False))
        )  # fmt: skip
    return Table((("defense", False), ("defense", False), ("difference", True), ("accuracies", False)), tuple(rows), compact=True)


def budgets_table(data: ReportData) -> Table | None:
    seen: dict[str, Budget] = {}
    for r in data.summary:
        seen.setdefault(r.attack, r.budget)
    if not seen:
        return None
    rows = []
    for attack, b in sorted(seen.items()):
        pub = published_budget(b)
        # a result older than schema 3 did not record the published budget: say so, not "none"
        none = "–" if b.published_known else "not recorded"
        rows.append(
            (
                Cell(full_spec(attack), code=True),
                budget_cell(b),
                Cell(none if pub is None else f"{pub[0]:,} it × {pub[1]}", "" if pub is None else pub[2].split(": ", 1)[0], num=True),
            )
        )
    return Table((("attack (full spec)", False), ("budget used", True), ("published budget", True)), tuple(rows), compact=True)


def build_doc(data: ReportData, figures: Sequence[Figure], title: str) -> Doc:
    """The report's content, independent of the output format (text results: :mod:`gia_bench.reports.text`)."""
    from gia_bench.reports.text import TEXT_FLOOR_RULE, text_sections, text_warnings
    heads, texts = headline(data), text_sections(data)
    groups = []
    for hg in heads:
        g = hg.group
        mine = [f for f in figures if f.dataset == g.dataset and f.model == g.model]
        main = tuple(f for f in mine if f.kind == "privacy")
        details = []
        captures = [r for r in g.rows if r.source != "train"]
        trained = [r for r in g.rows if r.source == "train"]
        if captures:
            details.append(
                Details(
                    f"Every attack and view ({len(captures)} rows: defense x attack x view)",
                    tables=(detail_table(captures, g.shown),),
                    specs=_defense_specs(g),
                )
            )
        if trained:
            details.append(
                Details(
                    f"Leakage along training ({len({r.step for r in trained})} steps, {len(trained)} rows)",
                    paragraphs=(
                        "Records captured during a training run at the given optimizer step (the weights and the"
                        " compressor's live state at that step). Test accuracy is the run's latest evaluation at or"
                        " before that step, or the one right after its own update when that is closer (the last"
                        " step of an epoch: the record at \"end\").",
                    ),
                    tables=(step_table(data, trained),),
                    figures=tuple(f for f in mine if f.kind == "steps"),
                    specs=_defense_specs(g) if not captures else (),
                )
            )
        details.append(Details("What each attack used (full spec, view, threat)", tables=(_threats(g),)))
        pairs = _pairs_table(hg)
        if pairs is not None:
            details.append(
                Details("Accuracy: which settings are within noise of each other", (stats.ACCURACY_RULE,), (pairs,))
            )
        grids = tuple(f for f in mine if f.kind == "grid")
        if grids:
            details.append(Details(f"Reconstructions ({len(grids)} image grids)", figures=grids))
        groups.append(
            GroupDoc(g.dataset, g.model, structure_note(hg), floor_text(g), headline_table(hg), main, tuple(details))
        )
    other = tuple(
        Details(f.title, paragraphs=(), figures=(f,)) for f in figures if not f.dataset
    )
    return Doc(
        title=title,
        summary=summary_sentence((*heads, *(t.group for t in texts))),
        warnings=study_warnings(data, heads) + text_warnings(texts),
        groups=(*groups, *(t.doc for t in texts)),
        rules=(stats.ACCURACY_RULE, stats.FLOOR_RULE, BUDGET_RULE, *((TEXT_FLOOR_RULE,) if texts else ())),
        budgets=budgets_table(data),
        notes=(*data.lpips_notes, *data.notes),
        other=other,
        skipped=tuple((str(s.path), s.reason) for s in data.runs.skipped),
    )


# -- Markdown ------------------------------------------------------------------------------------------

# inline Markdown syntax; "(", "#", "+", "!" only act after "]" or at a line's start, which we never give untrusted text
_MD_PUNCT = set("\\`*_[]|~")
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}


def md_text(text: object) -> str:
    """Untrusted text as inert Markdown: HTML-significant characters as entities, Markdown punctuation escaped."""
    out = []
    for ch in str(text):
        if ch in _MD_ENTITIES:
            out.append(_MD_ENTITIES[ch])
        elif ch in _MD_PUNCT:
            out.append("\\" + ch)
        elif ch in "\r\n\t":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def md_code(text: object) -> str:
    """A spec in monospace that keeps its characters (underscores included) and stays inert."""
    return f"<code>{md_text(text)}</code>"


def _md_cell(c: Cell) -> str:
    main = md_code(c.text) if c.code else md_text(c.text)
    if c.strong and not c.code:
        main = f"**{main}**"
    return main + (f"<br><sub>{md_text(c.sub)}</sub>" if c.sub else "")


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(md_text(h) for h, _ in t.headers) + " |"]
    lines.append("|" + "|".join("--:" if num else ":--" for _, num in t.headers) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return lines + [""]


def _md_figure(f: Figure, out_dir: Path) -> list[str]:
    return [f"![{md_text(f.title)}]({f.path.relative_to(out_dir).as_posix()})", "", f"*{md_text(f.caption)}*", ""]


def _md_details(d: Details, out_dir: Path) -> list[str]:
    lines = ["<details>", f"<summary>{md_text(d.summary)}</summary>", ""]
    for p in d.paragraphs:
        lines += [md_text(p), ""]
    for t in d.tables:
        lines += _md_table(t)
    if d.specs:
        lines += ["Defenses in full: " + "; ".join(f"{md_text(a)} = {md_code(b)}" for a, b in d.specs), ""]
    for f in d.figures:
        lines += _md_figure(f, out_dir)
    return lines + ["</details>", ""]


def markdown(data: ReportData, figures: Sequence[Figure], out_dir: Path, title: str) -> str:
    """``report.md``: the same content as the HTML, with figures linked relative to ``out_dir``."""
    doc = build_doc(data, figures, title)
    lines = [f"# {md_text(title)}", "", f"**{md_text(doc.summary)}**", ""]
    if doc.warnings:
        lines += ["> **These results cannot support their verdicts:**", ">"]
        lines += [f"> - {md_text(w)}" for w in doc.warnings]
        lines += [">", f"> *Rule:* {md_text(BUDGET_RULE)}", ""]
    lines += ["## At a glance: one row per defense setting", ""]
    lines += [md_text(THREAT_MODEL.split(":", 1)[0] + ". " + STRONGEST), ""]
    for g in doc.groups:
        lines += [f"### {md_text(g.dataset)} / {md_text(g.model)}", "", md_text(g.intro), "", md_text(g.floor), ""]
        lines += _md_table(g.headline)
        for f in g.figures:
            lines += _md_figure(f, out_dir)
    for d in doc.other:
        lines += [f"### {md_text(d.summary)}", ""]
        for f in d.figures:
            lines += _md_figure(f, out_dir)
    lines += ["**How the verdicts are made.**", ""] + [f"- {md_text(r)}" for r in doc.rules] + [""]
    lines += ["## Threat model and attack budgets", "", md_text(THREAT_MODEL), ""]
    lines += [f"- **{md_text(view_text(k))}**: {md_text(v)}" for k, v in VIEWS.items()]
    lines += ["", md_text(LEGEND), ""]
    if doc.budgets is not None:
        lines += _md_table(doc.budgets)
    for note in doc.notes:
        lines += [f"> {md_text(note)}", ""]
    lines += ["## Details", ""]
    for g in doc.groups:
        lines += [f"### {md_text(g.dataset)} / {md_text(g.model)}", ""]
        for d in g.details:
            lines += _md_details(d, out_dir)
    if doc.skipped:
        lines += ["## Skipped files and refused attacks", ""]
        lines += [f"- {md_code(p)}: {md_text(r)}" for p, r in doc.skipped]
        lines.append("")
    return "\n".join(lines)


# -- HTML ------------------------------------------------------------------------------------------------


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _wbr(text: str):
    """Escaped text with line-break opportunities after ':' and ',' (a spec wraps between its parameters)."""
    from markupsafe import Markup, escape

    return Markup(str(escape(text)).replace(":", ":<wbr>").replace(",", ",<wbr>"))


def _template():
    import jinja2

    env = jinja2.Environment(autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    env.filters["wbr"] = _wbr
    text = resources.files("gia_bench.reports").joinpath("templates/report.html.j2").read_text(encoding="utf-8")
    return env.from_string(text)


def html_report(data: ReportData, figures: Sequence[Figure], title: str) -> str:
    """``report.html``: self-contained (CSS inline, figures embedded as base64 PNG data URIs)."""
    from gia_bench import __version__

    doc = build_doc(data, figures, title)
    uris = {f.path: _data_uri(f.path) for f in figures}
    return _template().render(
        doc=doc,
        uris=uris,
        version=__version__,
        n_results=len(data.runs.results),
        n_trains=len(data.runs.trains),
        threat_model=THREAT_MODEL,
        views={view_text(k): v for k, v in VIEWS.items()},
        legend=LEGEND,
        strongest=STRONGEST,
        budget_rule=BUDGET_RULE,
    )


__all__ = [
    "HEADLINE_HEADERS", "LEGEND", "THREAT_MODEL", "VIEWS", "build_doc", "floor_text", "html_report", "markdown",
    "md_code", "md_text", "view_text",
]  # fmt: skip
