"""The ``gia-bench`` command line: parse flags, call the library, render with rich.

Each command is thin: it turns its flags into the library's own objects and calls
one library function. User mistakes (:class:`~gia_bench.errors.GiaBenchError`) are
printed as one red line and exit with code 2.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from gia_bench.errors import GiaBenchError

console = Console()
err_console = Console(stderr=True)


class _App(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except GiaBenchError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)


app = _App(
    name="gia-bench",
    help="How much private training data leaks through compressed gradients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    """How much private training data leaks through compressed gradients."""


def _registries() -> dict[str, Any]:
    from gia_bench import defenses, models

    tables: dict[str, Any] = {"defenses": defenses.DEFENSES, "models": models.MODELS}
    from gia_bench import attacks, data

    # attacks and datasets register themselves in their own modules
    for name, module, attr in (("attacks", attacks, "ATTACKS"), ("datasets", data, "DATASETS")):
        if hasattr(module, attr):
            tables[name] = getattr(module, attr)
    return tables


@app.command("list")
def list_cmd(
    kind: str = typer.Argument(None, help="defenses, attacks, datasets or models (default: all)"),
) -> None:
    """List what is registered, with each entry's parameters, defaults and description."""
    from gia_bench.registry import describe_params, summary

    tables = _registries()
    if kind is not None and kind not in tables:
        raise GiaBenchError(f"unknown kind {kind!r}; accepted: {', '.join(sorted(tables))}")
    for name in [kind] if kind else sorted(tables):
        registry = tables[name]
        table = Table(title=name, title_justify="left", show_lines=False)
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("parameters (default)")
        table.add_column("description")
        for entry, cls in registry.items():
            params = [
                p for p in describe_params(cls) if p.name not in ("in_shape", "num_classes")
            ]
            text = "\n".join(
                f"{p.name}: {p.type} = {p.default!r}" + (f"  [dim]{p.help}[/]" if p.help else "") for p in params
            )
            table.add_row(entry, text or "-", summary(cls))
        console.print(table)

