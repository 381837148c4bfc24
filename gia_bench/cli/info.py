"""``gia-bench list`` and ``gia-bench report``: what is registered, and the report of finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gia_bench.cli.base import app, apply_threads, console, err_console, plugin_option, print_warnings
from gia_bench.errors import GiaBenchError


def _registries() -> dict[str, Any]:
    from gia_bench import defenses, models

    tables: dict[str, Any] = {"defenses": defenses.DEFENSES, "models": models.MODELS}
    from gia_bench import attacks, data

    # attacks and datasets register themselves in their own modules
    for name, module, attr in (("attacks", attacks, "ATTACKS"), ("datasets", data, "DATASETS")):
        if hasattr(module, attr):
            tables[name] = getattr(module, attr)
    return tables


def _training_options() -> dict[str, Any]:
    """Trainer options that are not registries: (name, parameters, description) rows per kind."""
    from gia_bench import fewbit, metrics, optim

    # metrics: a registry of functions, not classes, listed by rows the same way
    return {"optimizers": optim.listing, "backward": fewbit.listing, "metrics": metrics.listing}


@app.command("list")
def list_cmd(
    kind: str = typer.Argument(
        None, help="defenses, attacks, datasets, models, optimizers, backward or metrics (default: all)"
    ),
) -> None:
    """List what is registered, with each entry's parameters, defaults and description."""
    from gia_bench.cli.tables import options_table, registry_table
    from gia_bench.registry import describe_params, summary

    tables = _registries()
    options = _training_options()
    if kind is not None and kind not in tables and kind not in options:
        raise GiaBenchError(f"unknown kind {kind!r}; accepted: {', '.join(sorted([*tables, *options]))}")
    for name in [kind] if kind else [*sorted(tables), *options]:
        if name in options:
            console.print(options_table(name, options[name]()))
        else:
            console.print(registry_table(name, tables[name], describe_params, summary))


@app.command("report")
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="folders with result.json files (searched recursively) or result files"),
    out: Path = typer.Option(..., "--out", help="folder for results.csv, summary.csv, report.md, report.html, figures/"),
    train: list[Path] = typer.Option([], "--train", help="training run folders (metrics.json) for test accuracy"),
    lpips_net: str = typer.Option("alex", "--lpips-net", help="LPIPS trunk: alex or vgg"),
    lpips_weights: Path = typer.Option(
        None, "--lpips-weights", help="trunk weights file (else $GIA_BENCH_LPIPS_WEIGHTS, else torchvision's cache)"
    ),
    no_lpips: bool = typer.Option(False, "--no-lpips", help="do not compute LPIPS the results lack"),
    plugin: list[str] = plugin_option(),
) -> None:
    """Privacy vs compression: tables, figures and an HTML report from attack results and training runs."""
    apply_threads()
    from gia_bench.cli.tables import headline_tables
    from gia_bench.evaluate import check_lpips_net
    from gia_bench.registry import trusted

    check_lpips_net(lpips_net)
    if lpips_weights is not None and not lpips_weights.is_file():
        raise GiaBenchError(f"--lpips-weights {lpips_weights}: no such file")
    from gia_bench.reports import ReportOptions, make_report, terminal_tables, warning_lines

    options = ReportOptions(
        runs=tuple(runs),
        out=out,
        train=tuple(train),
        lpips_net=lpips_net,
        lpips_weights=lpips_weights,
        compute_lpips=not no_lpips,
    )
    with trusted(plugin):
        output = make_report(options)
    for table in headline_tables(terminal_tables(output.data)):
        console.print(table)
    print_warnings(warning_lines(output.data), "the verdicts above")
    for note in output.data.lpips_notes:
        console.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)
    for s in output.data.runs.skipped:
        err_console.print(f"[yellow]skipped[/] {s.path}: {s.reason}", highlight=False, soft_wrap=True)
    n = len(output.data.runs.results)
    console.print(
        f"{n} result(s), {len(output.data.runs.trains)} training run(s), {len(output.data.runs.skipped)} skipped;"
        f" wrote {len(output.files)} files to [bold]{out}[/] (open {out / 'report.html'})"
    )
