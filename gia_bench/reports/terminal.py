"""The report's headline columns as rich tables, for the terminal."""

from __future__ import annotations

from rich.table import Table

from gia_bench.reports.tables import ReportData, fmt_accuracy, fmt_bytes, fmt_num, fmt_ratio
from gia_bench.reports.writers import floor_text


def rich_tables(data: ReportData) -> list[Table]:
    """One table per dataset x model: defense, bytes, ratio, accuracy, attack, view, SSIM/PSNR/LPIPS, labels."""
    tables = []
    for g in data.groups:
        t = Table(title=f"{g.dataset} / {g.model}", title_justify="left", caption=floor_text(g), caption_justify="left")
        for name, justify in (
            ("defense", "left"), ("bytes/step", "right"), ("ratio", "right"), ("test acc.", "right"),
            ("attack", "left"), ("view", "left"), ("SSIM mean", "right"), ("SSIM worst", "right"),
            ("PSNR mean", "right"), ("PSNR worst", "right"), ("LPIPS mean", "right"), ("label acc.", "right"),
        ):  # fmt: skip
            t.add_column(name, justify=justify, style="bold cyan" if name == "defense" else None)  # type: ignore[arg-type]
        prev = None
        for r in g.rows:
            t.add_row(
                r.defense if r.defense != prev else "",
                fmt_bytes(r.bytes_per_step),
                fmt_ratio(r.compression_ratio),
                fmt_accuracy(r),
                r.attack,
                r.view,
                fmt_num(r.ssim.mean if r.ssim else None),
                fmt_num(r.ssim.worst if r.ssim else None),
                fmt_num(r.psnr.mean if r.psnr else None, 2),
                fmt_num(r.psnr.worst if r.psnr else None, 2),
                fmt_num(r.lpips.mean, 3) if r.lpips else "n/a",
                "–" if r.label_accuracy is None else f"{100 * r.label_accuracy:.0f}%",
                end_section=False,
            )
            prev = r.defense
        tables.append(t)
    return tables
