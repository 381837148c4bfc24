"""``report.md`` and the self-contained ``report.html`` (jinja2 template, images as data URIs)."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from gia_bench.reports.figures import Figure
from gia_bench.reports.tables import (
    ReportData,
    SummaryRow,
    TableGroup,
    fmt_accuracy,
    fmt_bytes,
    fmt_num,
    fmt_ratio,
    fmt_stat,
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
    " of its dummy batch and matches that to the messages.",
}
LEGEND = (
    "One row per defense x attack x view. Bytes: what one worker sent for that step; ratio: the uncompressed"
    " fp32 gradient (plain SGD) over those bytes. Test accuracy: from the training run with the same defense on"
    " the same dataset (the model it was trained on in brackets when it differs). For each metric: the mean"
    " over images, the worst case (the most leaking image: highest SSIM or PSNR, lowest LPIPS) and the spread"
    " (standard deviation over images). Higher SSIM/PSNR and lower LPIPS mean more leakage. Reconstructions"
    " are paired to originals by the Hungarian algorithm on pixel MSE before scoring; label accuracy uses the"
    " same pairing. The floor is what a flat image of each original's mean colour scores."
)
HEADERS = (
    "defense", "bytes/step", "ratio vs SGD", "test acc.", "attack", "view",
    "SSIM mean", "SSIM worst", "SSIM ±", "PSNR mean", "PSNR worst", "PSNR ±",
    "LPIPS mean", "LPIPS worst", "LPIPS ±", "label acc.", "images",
)  # fmt: skip
TEXT_COLUMNS = (0, 4, 5)


def row_cells(row: SummaryRow) -> list[str]:
    """The headline cells of a summary row, as text."""
    return [
        short_spec(row.defense, "defense"),
        fmt_bytes(row.bytes_per_step),
        fmt_ratio(row.compression_ratio),
        fmt_accuracy(row),
        short_spec(row.attack, "attack"),
        row.view,
        *fmt_stat(row.ssim, 3),
        *fmt_stat(row.psnr, 2),
        *(fmt_stat(row.lpips, 3) if row.lpips is not None else ("n/a", "n/a", "n/a")),
        "–" if row.label_accuracy is None else f"{100 * row.label_accuracy:.0f}%",
        str(row.images),
    ]


def floor_text(group: TableGroup) -> str:
    if group.floor_ssim is None:
        return "Floor: no originals stored, so no flat-image floor for this table."
    return (
        f"Floor (a flat image of each original's mean colour, over {group.floor_images} images):"
        f" SSIM {fmt_num(group.floor_ssim)}, PSNR {fmt_num(group.floor_psnr, 2)} dB."
        " Scores near the floor mean no leakage beyond the average colour."
    )


def _threats(group: TableGroup) -> list[dict[str, str]]:
    """Per attack and view: the full canonical spec and what the attacker used."""
    seen: dict[tuple[str, str], str] = {}
    for r in group.rows:
        seen.setdefault((r.attack, r.view), r.threat or "not stated")
    return [{"attack": a, "view": v, "text": t} for (a, v), t in sorted(seen.items())]


def _defense_specs(group: TableGroup) -> list[tuple[str, str]]:
    """(shown name, full canonical spec) of each defense whose name is shortened in the table."""
    out = []
    for d in dict.fromkeys(r.defense for r in group.rows):
        if short_spec(d, "defense") != d:
            out.append((short_spec(d, "defense"), d))
    return out


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(data: ReportData, figures: Sequence[Figure], out_dir: Path, title: str) -> str:
    """``report.md``: the same content as the HTML, with figures linked relative to ``out_dir``."""
    lines = [f"# {title}", "", "## Threat model", "", THREAT_MODEL, ""]
    lines += [f"- **{k}**: {v}" for k, v in VIEWS.items()]
    lines += ["", "Every row names the view its attack used.", "", "## How to read the tables", "", LEGEND, ""]
    for note in (*data.lpips_notes, *data.notes):
        lines += [f"> {note}", ""]
    for g in data.groups:
        lines += [f"## {g.dataset} / {g.model}", "", floor_text(g), ""]
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append("|" + "|".join(":--" if i in TEXT_COLUMNS else "--:" for i in range(len(HEADERS))) + "|")
        for r in g.rows:
            lines.append("| " + " | ".join(_md_escape(c) for c in row_cells(r)) + " |")
        lines.append("")
        threats = _threats(g)
        if threats:
            lines += ["What each attack used (full spec, view: threat):", ""]
            lines += [f"- `{t['attack']}` ({t['view']}): {_md_escape(t['text'])}" for t in threats]
            lines.append("")
        specs = _defense_specs(g)
        if specs:
            lines += ["Defenses in full: " + "; ".join(f"{a} = `{b}`" for a, b in specs), ""]
        for f in figures:
            if f.dataset == g.dataset and f.model == g.model:
                lines += [f"![{f.title}]({f.path.relative_to(out_dir).as_posix()})", "", f"*{f.caption}*", ""]
    others = [f for f in figures if not f.dataset]
    if others:
        lines += ["## Accuracy", ""]
        for f in others:
            lines += [f"![{f.title}]({f.path.relative_to(out_dir).as_posix()})", "", f"*{f.caption}*", ""]
    if data.runs.skipped:
        lines += ["## Skipped files", ""]
        lines += [f"- `{s.path}`: {s.reason}" for s in data.runs.skipped]
        lines.append("")
    return "\n".join(lines)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _template():
    import jinja2

    env = jinja2.Environment(autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    text = resources.files("gia_bench.reports").joinpath("templates/report.html.j2").read_text(encoding="utf-8")
    return env.from_string(text)


def html_report(data: ReportData, figures: Sequence[Figure], title: str) -> str:
    """``report.html``: self-contained (CSS inline, figures embedded as base64 PNG data URIs)."""
    from gia_bench import __version__

    def fig(f: Figure) -> dict[str, str]:
        return {**dataclasses.asdict(f), "uri": _data_uri(f.path)}

    groups = []
    for g in data.groups:
        rows = []
        prev = None
        for r in g.rows:
            rows.append({"cells": row_cells(r), "first": prev is not None and r.defense != prev})
            prev = r.defense
        groups.append(
            {
                "dataset": g.dataset,
                "model": g.model,
                "floor": floor_text(g),
                "rows": rows,
                "threats": _threats(g),
                "defense_specs": _defense_specs(g),
                "figures": [fig(f) for f in figures if f.dataset == g.dataset and f.model == g.model],
            }
        )
    return _template().render(
        title=title,
        version=__version__,
        n_results=len(data.runs.results),
        n_trains=len(data.runs.trains),
        threat_model=THREAT_MODEL,
        views=VIEWS,
        legend=LEGEND,
        lpips_notes=data.lpips_notes,
        notes=data.notes,
        headers=HEADERS,
        text_cols=TEXT_COLUMNS,
        groups=groups,
        other_figures=[fig(f) for f in figures if not f.dataset],
        skipped=[{"path": str(s.path), "reason": s.reason} for s in data.runs.skipped],
    )


__all__ = ["HEADERS", "THREAT_MODEL", "VIEWS", "html_report", "markdown", "row_cells", "floor_text"]
