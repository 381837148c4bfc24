"""The CLI's rich tables: the registries, the captured records, the report's headline, a study's status, an audit.

Every cell that comes from a record, a spec or a result is passed as :class:`rich.text.Text`
or escaped, so a ``[bold]`` in a name prints as itself instead of being read as markup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gia_bench.reports.terminal import HEADERS, NUMERIC, TerminalTable


def options_table(name: str, rows: Iterable[Sequence[str]]) -> Table:
    """A trainer option listing: (name, parameters, description) rows."""
    table = _listing(name)
    for row in rows:
        table.add_row(*row)
    return table


def registry_table(name: str, entries: dict[str, Any], describe: Callable[[Any], list[Any]],
                   summary: Callable[[Any], str]) -> Table:
    """A registry: each entry's parameters (type = default, help) and description."""
    table = _listing(name)
    for entry, cls in entries.items():
        params = [p for p in describe(cls) if p.name not in ("in_shape", "num_classes")]
        text = "\n".join(
            f"{p.name}: {p.type} = {p.default!r}" + (f"  [dim]{p.help}[/]" if p.help else "") for p in params
        )
        table.add_row(entry, text or "-", summary(cls))
    return table


def _listing(name: str) -> Table:
    table = Table(title=name, title_justify="left", show_lines=False)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("parameters (default)")
    table.add_column("description")
    return table


def capture_table(rows: Sequence[Any], out: Path) -> Table:
    """``gia-bench capture``'s summary: bytes sent per record against fp32."""
    table = Table(title=f"{len(rows)} records in {out}", title_justify="left")
    table.add_column("record", style="bold cyan", no_wrap=True)
    table.add_column("batch", justify="right")
    table.add_column("bytes sent", justify="right")
    table.add_column("fp32 bytes", justify="right")
    table.add_column("ratio vs fp32", justify="right")
    for r in rows:
        table.add_row(r.record_id, str(r.batch_size), f"{r.bytes_sent:,}", f"{r.fp32_bytes:,}", f"{r.ratio:.1f}x")
    return table


def headline_tables(tables: Sequence[TerminalTable]) -> list[Table]:
    """The report's headline (:func:`gia_bench.reports.terminal.terminal_tables`) as rich tables."""
    out = []
    for tt in tables:
        t = Table(title=tt.title, title_justify="left", caption=tt.caption, caption_justify="left")
        for n, name in enumerate(HEADERS):
            t.add_column(name, justify="right" if n in NUMERIC else "left", overflow="fold",
                         style="bold cyan" if n == 0 else None)  # fmt: skip
        for row in tt.rows:
            t.add_row(*(Text(c.text, style="bold" if c.strong else "") for c in row))
        out.append(t)
    return out


def status_table(st: Any, out: Path) -> Table:
    """What a study has done and has left, per stage."""
    table = Table(title=f"study {out}", title_justify="left")
    table.add_column("stage", style="bold")
    table.add_column("done", justify="right")
    table.add_column("left", justify="right")
    for name, (done, total) in (("capture", st.captures), ("attack", st.attacks), ("train", st.trains)):
        table.add_row(name, str(done), str(total - done))
    return table


def audit_tables(result: Any) -> list[Table]:
    """The audit's contract checks and, when it got that far, where the compressor stands."""
    checks = Table(title=f"audit of {escape(result.spec)}: contract", title_justify="left")
    checks.add_column("check")
    checks.add_column("result")
    for c in result.checks:
        if c.skipped:
            checks.add_row(c.name, f"[dim]{'n/a' if c.passed else 'skipped'}[/] {c.reason}")
        else:
            checks.add_row(c.name, "[green]pass[/]" if c.passed else f"[red]FAIL[/] {c.reason}")
    if not result.standings:
        return [checks]
    table = Table(title="where it stands (worst case over images, attacks and views)", title_justify="left")
    for col in ("defense", "bytes/step", "test acc.", "worst SSIM", "worst PSNR", "worst LPIPS", "frontier"):
        # a narrow terminal folds a spec onto a second line rather than cutting it ("powersg…")
        table.add_column(col, justify="left" if col == "defense" else "right",
                         overflow="fold" if col == "defense" else "ellipsis")

    def fmt(v: float | None, f: str) -> str:
        return "-" if v is None else format(v, f)

    for s in result.standings:
        name = f"[bold]{s.defense}[/]" if s.audited else s.defense
        table.add_row(
            name, f"{s.bytes:,.0f}", fmt(None if s.test_accuracy is None else 100 * s.test_accuracy, ".1f"),
            fmt(s.worst_ssim, ".3f"), fmt(s.worst_psnr, ".2f"), fmt(s.worst_lpips, ".3f"),
            "yes" if s.on_frontier else "no",
        )
    return [checks, table]
