"""``gia-bench report``: results and training runs in, CSV + Markdown + HTML + figures out."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from gia_bench.errors import GiaBenchError
from gia_bench.metrics import get_lpips
from gia_bench.reports import figures as figs
from gia_bench.reports.claims import write_claims
from gia_bench.reports.io import write_text
from gia_bench.reports.headline import headline
from gia_bench.reports.load import AttackResult, RunSet, load_runs
from gia_bench.reports.names import study_spellings
from gia_bench.reports.text import text_csv, text_sections
from gia_bench.reports.text_scores import is_text_result
from gia_bench.reports.tables import ReportData, build_report, results_csv, summary_csv
from gia_bench.reports.writers import html_report, markdown

TITLE = "gia-bench: privacy vs compression"


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """What to read and how to score (the CLI's flags)."""

    runs: tuple[Path, ...]
    out: Path
    train: tuple[Path, ...] = ()
    lpips_net: str = "alex"
    lpips_weights: Path | None = None  # else $GIA_BENCH_LPIPS_WEIGHTS, else torchvision's cache
    compute_lpips: bool = True  # fill LPIPS the results lack, when the trunk weights are there
    title: str = TITLE
    # the study's own defense specs, for the names tables show; empty: read from the study.toml beside the runs
    spellings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ReportOutput:
    """What was written."""

    data: ReportData
    files: tuple[Path, ...]
    figures: tuple[figs.Figure, ...]


def _grids(results: Sequence[AttackResult], data: ReportData, fig_dir: Path) -> list[figs.Figure]:
    by_key: dict[tuple[str, str, str, str], list[AttackResult]] = defaultdict(list)
    for r in results:
        # one grid per attack and view of the step-0 captures; a training run's later steps are in the step figure
        if r.source == "train" and r.step != min(x.step for x in results if x.source == "train" and x.defense == r.defense):
            continue
        by_key[(r.dataset, r.model, r.attack, r.view)].append(r)
    out = []
    for (dataset, model, _, _), rs in sorted(by_key.items()):
        # same defense order as the table: most bytes first
        group = next((g for g in data.groups if g.dataset == dataset and g.model == model), None)
        order = list(dict.fromkeys(row.defense for row in group.rows)) if group else []
        f = figs.image_grid(rs, fig_dir, order, data.shown)
        if f is not None:
            out.append(f)
    return out


def make_report(options: ReportOptions, runs: RunSet | None = None) -> ReportOutput:
    """Read the runs, score, and write every output into ``options.out`` (each file atomically)."""
    runs = runs if runs is not None else load_runs(options.runs, options.train)
    if not runs.results and not runs.trains:
        why = "; ".join(f"{s.path}: {s.reason}" for s in runs.skipped[:3])
        raise GiaBenchError(
            f"no attack results (result.json) or training runs (metrics.json) found under"
            f" {', '.join(map(str, options.runs))}" + (f" (skipped: {why})" if why else "")
        )
    scorer = get_lpips(options.lpips_net, options.lpips_weights) if options.compute_lpips else None
    data = build_report(runs, scorer, options.spellings or study_spellings(options.runs))
    out = Path(options.out)
    fig_dir = out / "figures"
    figures: list[figs.Figure] = []
    for hg in headline(data):
        f = figs.privacy_vs_bandwidth(hg.group, fig_dir, {r.defense: r.strongest for r in hg.rows})
        if f is not None:
            figures.append(f)
    for g in data.groups:
        f = figs.leakage_vs_step(g, runs.trains, fig_dir)
        if f is not None:
            figures.append(f)
    figures += _grids([r for r in runs.results if not is_text_result(r)], data, fig_dir)
    acc = figs.accuracy_vs_bandwidth(runs.trains, fig_dir, data.shown)
    if acc is not None:
        figures.append(acc)
    files = [
        write_text(out / "results.csv", results_csv(data)),
        write_text(out / "summary.csv", summary_csv(data)),
        write_text(out / "report.md", markdown(data, figures, out, options.title)),
        write_text(out / "report.html", html_report(data, figures, options.title)),
    ]
    texts = text_sections(data)
    if texts:  # one row per sentence, with its token-bag floor (gia_bench.reports.text)
        files.append(write_text(out / "text.csv", text_csv(texts)))
    files += write_claims(runs, out)  # the LQ-SGD paper's claims, where SGD trained beside PowerSGD / LQ-SGD
    return ReportOutput(data, tuple(files + [f.path for f in figures]), tuple(figures))
