"""The report's text section: one row per defense with its verdict, every setting, reconstructions beside originals.

The numbers and the rules are :mod:`gia_bench.reports.text_scores`; this module lays them
out as the writers' neutral :class:`~gia_bench.reports.writers.Table` /
:class:`~gia_bench.reports.writers.Details` (so both documents render them, escaped, with
the image tables' code) and writes ``text.csv`` (one row per sentence).

The headline metric is ROUGE-1 (mean over sentences, the most leaking sentence below);
ROUGE-2 / ROUGE-L, token F1, exact-sequence rate and PII fields stand beside it, then the
floor (the token bag in random order) and the verdict against it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence

from gia_bench.reports import stats
from gia_bench.reports.tables import (
    ReportData,
    csv_text,
    fmt_bytes,
    fmt_num,
    fmt_ratio,
    short_spec,
)
from gia_bench.reports.text_scores import (
    FLOOR_KEYS,
    TEXT_FLOOR_RULE,
    TEXT_KEYS,
    TextDefenseRow,
    TextGroup,
    TextSetting,
    read_reconstruction_text,
    text_groups,
)
from gia_bench.reports.writers import (
    Cell,
    Details,
    GroupDoc,
    Table,
    _accuracy_cell,
    _verdict_cell,
    budget_cell,
    view_text,
)

TEXT_THREAT = (
    "Threat model as for images: an honest-but-curious server with the model's weights and the compressor's public"
    " state sees one worker's messages for one step of a batch of B private sentences; it never sees the sentences"
    " or the labels. Text attacks here are analytic (no iterations; their budget reads '–') unless their spec"
    " names iterations."
)
TEXT_LEGEND = (
    "ROUGE-1/2/L: rouge-score F-measures on token ids, each reconstructed sentence paired with an original by"
    " maximal ROUGE-1; the mean over sentences, the most leaking sentence below. Token F1: the batch's distinct"
    " token ids recovered (the bag). Exact: the share of sentences recovered token for token. PII: the share of a"
    " sentence's PII fields (names, e-mails, phones, ...) found contiguously. Floor R-2 / R-L: the mean ROUGE-2 /"
    " ROUGE-L of each original's token bag in random order."
)
__all__ = ["TEXT_FLOOR_RULE", "TextSection", "headline_table", "text_csv", "text_sections", "text_warnings"]

#: sentences of one defense shown beside their originals
EXAMPLES = 4


@dataclasses.dataclass(frozen=True)
class TextSection:
    """One dataset x model of text results, ready for both writers."""

    dataset: str
    model: str
    paragraphs: tuple[str, ...]
    headline: Table
    details: tuple[Details, ...]
    group: TextGroup

    @property
    def doc(self) -> GroupDoc:
        """As the writers lay out a table's section (heading, intro, floor, headline table; details later)."""
        return GroupDoc(self.dataset, f"{self.model} (text)", self.paragraphs[0], self.paragraphs[1], self.headline,
                        (), self.details)  # fmt: skip


def _mean_worst(setting: TextSetting, key: str, digits: int = 3) -> Cell:
    mean, worst = setting.mean(key), setting.worst(key)
    if mean is None:
        return Cell("–", num=True)
    return Cell(fmt_num(mean, digits), f"worst {fmt_num(worst, digits)}", num=True)


def _accuracy(r: TextDefenseRow) -> Cell:
    cell = _accuracy_cell(r.accuracy, r.accuracy_model, r.model)  # the image tables' cell, on sentences
    return dataclasses.replace(cell, sub=cell.sub.replace("test images", "test sentences"))


def _verdict(v: stats.Verdict | None) -> Cell:
    cell = _verdict_cell(v)
    return dataclasses.replace(cell, text=cell.text.replace("too few images", "too few sentences"))


def _attacker(s: TextSetting, attackers: int) -> Cell:
    where = view_text(s.view) + (f", step {s.step}" if s.source == "train" else "")
    return Cell(short_spec(s.attack, "attack"), f"{where}; best of {attackers}" if attackers > 1 else where, code=True)


def _floor(s: TextSetting) -> Cell:
    r2, rl = s.floor_mean("rouge2"), s.floor_mean("rougeL")
    return Cell("–", "no originals stored", num=True) if r2 is None else Cell(f"{fmt_num(r2)} / {fmt_num(rl)}", num=True)


HEADLINE_HEADERS = (
    ("defense", False), ("bytes/worker/step", True), ("ratio vs fp32", True), ("test acc. ± SE", True),
    ("strongest attack", False), ("ROUGE-1", True), ("ROUGE-2 / ROUGE-L", True), ("token F1", True),
    ("exact", True), ("PII", True), ("floor R-2 / R-L", True), ("vs floor", False), ("budget, sentences", True),
)  # fmt: skip


def _metric_cells(s: TextSetting) -> list[Cell]:
    r2, rl = s.mean("rouge2"), s.mean("rougeL")
    return [
        _mean_worst(s, "rouge1"),
        Cell(f"{fmt_num(r2)} / {fmt_num(rl)}", num=True),
        Cell(fmt_num(s.mean("token_f1")), num=True),
        Cell(fmt_num(s.mean("exact")), num=True),
        Cell(fmt_num(s.mean("pii")), num=True),
        _floor(s),
    ]


def headline_table(g: TextGroup) -> Table:
    rows = []
    for r in g.rows:
        s = r.strongest
        cost = [Cell(r.shown, code=True, strong=True), Cell(fmt_bytes(r.bytes_per_step), num=True),
                Cell(fmt_ratio(r.compression_ratio), num=True), _accuracy(r)]  # fmt: skip
        if s is None:
            rows.append((*cost, Cell("not scored"), *[Cell("–", num=True)] * 6, Cell("–"), Cell("–", num=True)))
            continue
        n = len(s.sentences)
        rows.append((*cost, _attacker(s, r.attackers), *_metric_cells(s), _verdict(r.verdict),
                     budget_cell(s.budget, n)))  # fmt: skip
    return Table(HEADLINE_HEADERS, tuple(rows))


def detail_table(g: TextGroup) -> Table:
    """Every attack and view (and step) of every defense, each with its own one-comparison verdict."""
    headers = (("defense", False), ("attack", False), *HEADLINE_HEADERS[5:11], ("vs floor alone", False),
               ("budget, sentences", True))  # fmt: skip
    shown = {r.defense: r.shown for r in g.rows}
    order = {r.defense: i for i, r in enumerate(g.rows)}
    settings = sorted(g.settings, key=lambda s: (order.get(s.defense, 0), s.source, s.step, s.attack, s.view))
    rows, starts = [], []
    for i, s in enumerate(settings):
        rows.append((Cell(shown.get(s.defense, s.defense), code=True), _attacker(s, 1), *_metric_cells(s),
                     _verdict(s.verdict()), budget_cell(s.budget, len(s.sentences))))  # fmt: skip
        starts.append(i == 0 or settings[i - 1].defense != s.defense)
    return Table(headers, tuple(rows), tuple(starts))


def examples_table(g: TextGroup, per_defense: int = EXAMPLES) -> Table | None:
    """Each defense's strongest attacker: its first sentences beside their originals (``reconstruction.txt``)."""
    rows, starts = [], []
    for r in g.rows:
        if r.strongest is None:
            continue
        pairs = [(res, p) for res in r.strongest.results for p in read_reconstruction_text(res, per_defense)]
        for i, (res, (rec, orig)) in enumerate(pairs[:per_defense]):
            where = f"{short_spec(r.strongest.attack, 'attack')}, {view_text(r.strongest.view)}"
            rows.append((Cell(r.shown, where if i == 0 else "", code=True), Cell(res.record_id, code=True),
                         Cell(rec), Cell(orig or "(no truth)")))  # fmt: skip
            starts.append(i == 0)
    if not rows:
        return None
    headers = (("defense", False), ("record", False), ("reconstruction ([recovered tokens])", False), ("original", False))
    return Table(headers, tuple(rows), tuple(starts), compact=True)


def _paragraphs(g: TextGroup) -> tuple[str, ...]:
    floors = {(x.record_id, x.sentence): x.floor for st in g.settings for x in st.sentences if x.floor is not None}
    if not floors:
        return TEXT_THREAT, "Floor: no originals stored (or rouge-score missing), so no token-bag floor for this table."
    r2 = [f["rouge2"] for f in floors.values()]
    rl = [f["rougeL"] for f in floors.values()]
    return TEXT_THREAT, (f"Floor (each original's token bag in random order, over {len(floors)} sentences): ROUGE-1 1"
                         f" by construction, ROUGE-2 {fmt_num(sum(r2) / len(r2))}, ROUGE-L {fmt_num(sum(rl) / len(rl))}.")


def text_sections(data: ReportData) -> tuple[TextSection, ...]:
    """The text section of every dataset x model with text results (empty when there are none)."""
    out = []
    for g in text_groups(data.runs, data.names):
        details = [Details(f"Every text attack and view ({len(g.settings)} rows)", (TEXT_LEGEND,), (detail_table(g),))]
        examples = examples_table(g)
        if examples is not None:
            details.append(Details(
                "Reconstructions beside their originals (each defense's strongest attacker; recovered tokens in"
                " [brackets])", tables=(examples,), open=True,
            ))  # fmt: skip
        out.append(TextSection(g.dataset, g.model, _paragraphs(g), headline_table(g), tuple(details), g))
    return tuple(out)


def text_warnings(sections: Sequence[TextSection]) -> tuple[str, ...]:
    """The banner's lines for the text tables (the image rule's (1) and (3), on sentences)."""
    out = []
    rows = [r for s in sections for r in s.group.rows if r.strongest is not None]
    few = [r for r in rows if len(r.strongest.sentences) < stats.min_images(r.attackers)]  # type: ignore[union-attr]
    if few:
        need = max(stats.min_images(r.attackers) for r in few)
        out.append(f"Too few sentences: {len(few)} of {len(rows)} text defense settings rest on fewer sentences"
                   f" under their strongest attacker than the {need} the sign test needs to call anything a leak.")
    for s in sections:
        base = next((r for r in s.group.rows if r.defense == "none" and r.verdict is not None), None)
        if base is not None and base.verdict.verdict == stats.FLOOR:  # type: ignore[union-attr]
            out.append(f"On {s.dataset} / {s.model} the uncompressed baseline 'none' is indistinguishable from the"
                       " token-bag floor: no attacker recovered word order, so the text verdicts cannot separate the"
                       " defenses (token F1 still says how much of the bag leaks).")
    return tuple(out)


TEXT_CSV_FIELDS = (
    "dataset", "model", "defense", "attack", "view", "step", "source", "record_id", "sentence", "matched", "tokens",
    *TEXT_KEYS, *(f"floor_{k}" for k in FLOOR_KEYS), "beats_floor", "bytes", "bytes_fp32", "batch_size", "seconds",
    "result",
)  # fmt: skip


def _csv_cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, (bool, int, float)):
        return repr(v) if isinstance(v, float) else v
    return csv_text(str(v))


def text_csv(sections: Sequence[TextSection]) -> str:
    """``text.csv``: one row per original sentence x attack x view x defense (x record), with its floor."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TEXT_CSV_FIELDS)
    for sec in sections:
        for st in sec.group.settings:
            for s in st.sentences:
                flat = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
                flat.update(s.scores)
                flat.update({f"floor_{k}": None if s.floor is None else s.floor[k] for k in FLOOR_KEYS})
                flat["beats_floor"] = s.beats
                w.writerow([_csv_cell(flat[f]) for f in TEXT_CSV_FIELDS])
    return buf.getvalue()
