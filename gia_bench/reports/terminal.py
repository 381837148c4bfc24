"""The report's headline columns as rich tables, for the terminal."""

from __future__ import annotations

from rich.table import Table

from gia_bench.reports.tables import ReportData, Stat, fmt_accuracy, fmt_bytes, fmt_num, fmt_ratio, short_spec
from gia_bench.reports.writers import floor_text


def _pair(s: Stat | None, digits: int) -> str:
    if s is None:
        return "–"
    return f"{fmt_num(s.mean, digits)} ({fmt_num(s.worst, digits)})"


def rich_tables(data: ReportData) -> list[Table]:
    """One table per dataset x model: defense, bytes, ratio, accuracy, attack, view, SSIM/PSNR/LPIPS, labels."""
    tables = []
    for g in data.groups:
        t = Table(title=f"{g.dataset} / {g.model}", title_justify="left", caption=floor_text(g), caption_justify="left")
        for name, justify in (
            ("defense", "left"), ("bytes/step", "right"), ("ratio", "right"), ("test acc.", "right"),
            ("attack", "left"), ("view", "left"), ("SSIM mean (worst)", "right"),
            ("PSNR dB mean (worst)", "right"), ("LPIPS mean (worst)", "right"), ("labels", "right"),
        ):  # fmt: skip
            t.add_column(name, justify=justify, overflow="fold", style="bold cyan" if name == "defense" else None)  # type: ignore[arg-type]
        prev = None
        for r in g.rows:
            t.add_row(
                short_spec(r.defense, "defense") if r.defense != prev else "",
                fmt_bytes(r.bytes_per_step),
                fmt_ratio(r.compression_ratio),
                fmt_accuracy(r),
                short_spec(r.attack, "attack"),
                r.view,
                _pair(r.ssim, 3),
                _pair(r.psnr, 1),
                _pair(r.lpips, 3) if r.lpips else "n/a",
                "–" if r.label_accuracy is None else f"{100 * r.label_accuracy:.0f}%",
                end_section=False,
            )
            prev = r.defense
        tables.append(t)
    return tables
