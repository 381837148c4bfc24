"""The report's headline for the terminal: one row per defense setting, units in every header.

Every text cell is passed to rich as a :class:`rich.text.Text`, so a ``[bold]`` in a
record's spec prints as itself instead of being read as console markup.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from gia_bench.reports.headline import headline, study_warnings
from gia_bench.reports.tables import ReportData
from gia_bench.reports.writers import Cell, floor_text, headline_table

HEADERS = (
    "defense", "bytes/worker/step", "ratio vs fp32", "test acc. ± SE", "vs reference", "strongest attack",
    "SSIM mean (worst)", "PSNR dB mean (worst)", "labels", "vs floor", "budget, images",
)  # fmt: skip


def _text(c: Cell, with_sub: bool) -> Text:
    text = c.text
    if with_sub and c.sub:
        text += f" ({c.sub})"
    return Text(text, style="bold" if c.strong else "")


def rich_tables(data: ReportData) -> list[Table]:
    """One table per dataset x model: the headline row of each defense setting."""
    tables = []
    heads = headline(data)
    for hg in heads:
        t = Table(
            title=f"{hg.dataset} / {hg.model}",
            title_justify="left",
            caption=floor_text(hg.group),
            caption_justify="left",
        )
        for n, name in enumerate(HEADERS):
            numeric = n in (1, 2, 3, 6, 7, 8, 10)
            t.add_column(name, justify="right" if numeric else "left", overflow="fold",
                         style="bold cyan" if n == 0 else None)  # fmt: skip
        for row in headline_table(hg).rows:
            # the worst case and the strongest attack's view travel with their numbers
            t.add_row(*(_text(c, with_sub=n in (5, 6, 7, 9)) for n, c in enumerate(row)))
        tables.append(t)
    return tables


def warning_lines(data: ReportData) -> tuple[str, ...]:
    """The banner's lines (empty when the study supports its verdicts)."""
    return study_warnings(data)
