"""The report's headline for the terminal, as plain data: one row per defense setting, units in every header.

The CLI draws these as rich tables (:mod:`gia_bench.cli.tables`); the library renders nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from gia_bench.reports.headline import headline, study_warnings
from gia_bench.reports.tables import ReportData
from gia_bench.reports.writers import Cell, floor_text, headline_table

HEADERS = (
    "defense", "bytes/worker/step", "ratio vs fp32", "test acc. ± SE", "vs reference", "strongest attack",
    "SSIM mean (worst)", "PSNR dB mean (worst)", "labels", "vs floor", "budget, images",
)  # fmt: skip
#: Columns (by index in :data:`HEADERS`) that hold numbers: right-aligned.
NUMERIC = frozenset({1, 2, 3, 6, 7, 8, 10})
#: Columns whose cell carries its worst case or the strongest attack's view after the number.
WITH_SUB = frozenset({5, 6, 7, 9})


@dataclass(frozen=True)
class TerminalCell:
    text: str
    strong: bool = False


@dataclass(frozen=True)
class TerminalTable:
    """One dataset x model: its title, the floor caption, and one row of cells per defense setting."""

    title: str
    caption: str
    rows: tuple[tuple[TerminalCell, ...], ...]


def _cell(c: Cell, with_sub: bool) -> TerminalCell:
    text = c.text
    if with_sub and c.sub:
        text += f" ({c.sub})"
    return TerminalCell(text, bool(c.strong))


def terminal_tables(data: ReportData) -> list[TerminalTable]:
    """One table per dataset x model: the headline row of each defense setting."""
    return [
        TerminalTable(
            title=f"{hg.dataset} / {hg.model}",
            caption=floor_text(hg.group),
            # the worst case and the strongest attack's view travel with their numbers
            rows=tuple(tuple(_cell(c, n in WITH_SUB) for n, c in enumerate(row)) for row in headline_table(hg).rows),
        )
        for hg in headline(data)
    ]


def warning_lines(data: ReportData) -> tuple[str, ...]:
    """The banner's lines (empty when the study supports its verdicts)."""
    return study_warnings(data)
