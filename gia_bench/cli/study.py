"""``gia-bench study run|show``, ``demo`` and ``audit``: runs of many units, with their progress and tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gia_bench.cli.base import (
    app,
    apply_threads,
    console,
    err_console,
    flag_plugins,
    mark_interrupted,
    max_memory_option,
    plugin_option,
    print_warnings,
)

study_app = typer.Typer(help="Run a study file (TOML): captures, attacks, trainings, one report.", no_args_is_help=True)
app.add_typer(study_app, name="study")


def _print_status(st: Any, out: Path) -> None:
    from gia_bench.cli.tables import status_table

    console.print(status_table(st, out))
    for f in st.failures:
        err_console.print(f"[red]failed[/] {f['stage']} {f['unit']}: {f['error']}", highlight=False, soft_wrap=True)
    if st.report is not None:
        console.print(f"report: [bold]{st.report / 'report.html'}[/] (and report.md, summary.csv)", highlight=False)


def _run_study_cli(
    source: Path, out: Path, workers: int, device: str, lpips_net: str, lpips_weights: Path | None,
    engine: str = "local", address: str | None = None, plugins: tuple[str, ...] = (), max_memory: str = "2GiB",
) -> None:
    import time

    from gia_bench.budget import parse_memory
    from gia_bench.cli.render import UnitsView
    from gia_bench.evaluate import check_lpips_net
    from gia_bench.registry import trusted
    from gia_bench.study import StudyOptions, prepare, run_study

    check_lpips_net(lpips_net)
    options = StudyOptions(workers=workers, device=device, lpips_net=lpips_net, lpips_weights=lpips_weights,
                           engine=engine, address=address, plugins=plugins, max_memory=parse_memory(max_memory))
    with trusted(plugins):  # the study file's specs resolve only to registered or trusted classes
        config = prepare(source, out)
    start = time.perf_counter()
    try:
        with UnitsView(console) as shown:
            st = run_study(config, out, options, events=shown)
    except KeyboardInterrupt:
        # the units in flight are cancelled already; a second ^C while exiting must not print a traceback
        mark_interrupted()
        err_console.print(f"[yellow]interrupted:[/] finished units are kept in {out}; run the same command to resume")
        raise typer.Exit(130) from None
    _print_status(st, out)
    console.print(f"finished in {time.perf_counter() - start:.0f} s", highlight=False)
    if st.failures:
        raise typer.Exit(1)


@study_app.command("run")
def study_run_cmd(
    study: Path = typer.Argument(..., help="study file (TOML)"),
    out: Path = typer.Option(..., "--out", help="study folder (a rerun resumes it)"),
    workers: int = typer.Option(1, "--workers", help="local engine: units in parallel (this process + N-1 workers)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    lpips_net: str = typer.Option("alex", "--lpips-net", help="LPIPS trunk: alex or vgg"),
    lpips_weights: Path = typer.Option(None, "--lpips-weights", help="LPIPS trunk weights (else env / torch cache)"),
    engine: str = typer.Option("local", "--engine", help="local (process pool) or ray (every unit a Ray task)"),
    address: str = typer.Option(None, "--address", help="--engine ray: a running cluster (ray start --head); default a local Ray"),
    plugin: list[str] = plugin_option(),
    max_memory: str = max_memory_option(),
) -> None:
    """Expand the study's grid, capture, attack, train, and report; skips what is finished."""
    _run_study_cli(study, out, workers, device, lpips_net, lpips_weights, engine, address, tuple(plugin), max_memory)


@study_app.command("show")
def study_show_cmd(out: Path = typer.Argument(..., help="study folder")) -> None:
    """What is done and what is left in a study folder."""
    from gia_bench.study import status

    _print_status(status(out), out)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo"), "--out", help="folder for the demo study and its report"),
    workers: int = typer.Option(2, "--workers", help="attack processes in parallel"),
    lpips_weights: Path = typer.Option(None, "--lpips-weights", help="LPIPS trunk weights (else env / torch cache)"),
    max_memory: str = max_memory_option(),
) -> None:
    """The built-in study on the embedded data: every compressor x DLG and IG x naive and aware, with training."""
    from gia_bench.study import DEMO_STUDY

    _run_study_cli(DEMO_STUDY, out, workers, "cpu", "alex", lpips_weights, max_memory=max_memory)


@app.command("audit")
def audit_cmd(
    spec: str = typer.Argument(..., help="compressor: module:Class[:k=v,...], an entry-point name, or a built-in name"),
    out: Path = typer.Option(Path("audit"), "--out", help="folder for the battery's runs, report and audit.json"),
    workers: int = typer.Option(2, "--workers", help="attack processes in parallel"),
    quick: bool = typer.Option(False, "--quick", help="one image, short attacks, no training (a smoke test)"),
    no_train: bool = typer.Option(False, "--no-train", help="skip the short training (no accuracy column)"),
    lpips_weights: Path = typer.Option(None, "--lpips-weights", help="LPIPS trunk weights (else env / torch cache)"),
) -> None:
    """Check a compressor's contract, then rank it against none / powersgd / lqsgd at matched bytes."""
    apply_threads()
    from gia_bench.audit import AUDIT_FILE, AuditOptions, run_audit
    from gia_bench.cli.render import UnitsView
    from gia_bench.cli.tables import audit_tables
    from gia_bench.registry import trusted

    try:
        with trusted(flag_plugins(spec)), UnitsView(console) as shown:  # auditing a module:Class trusts it
            options = AuditOptions(workers=workers, quick=quick, train=not no_train, lpips_weights=lpips_weights)
            result = run_audit(spec, out, options, events=shown)
    except KeyboardInterrupt:
        mark_interrupted()  # leave at once: the interpreter's teardown must not hold the command after Ctrl-C
        err_console.print(f"[yellow]interrupted:[/] the audit stopped; its finished battery units are kept in {out}")
        raise typer.Exit(130) from None
    for table in audit_tables(result):
        console.print(table)
    print_warnings(result.warnings, "the frontier column above: this ranking means nothing at this budget")
    console.print(f"wrote [bold]{out / AUDIT_FILE}[/]" + (f" and {result.report / 'report.html'}" if result.report else ""))
    if not result.passed:
        err_console.print(f"[bold red]audit failed:[/] {next(c for c in result.checks if not c.passed and not c.skipped).reason}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
