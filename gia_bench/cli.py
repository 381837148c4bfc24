"""The ``gia-bench`` command line: parse flags, call the library, render with rich.

Each command is thin: it turns its flags into the library's own objects and calls
one library function. User mistakes (:class:`~gia_bench.errors.GiaBenchError`) are
printed as one red line and exit with code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from gia_bench.console import make_console
from gia_bench.errors import GiaBenchError

console = make_console()  # off a terminal (a log): wide, so names and specs stay whole on their line
err_console = make_console(stderr=True)


_interrupted = False  # set once a Ctrl-C has been handled: exit at once


class _App(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except GiaBenchError as exc:
            # escaped: a message may hold brackets ("pip install 'gia-bench[flower]'") that rich would eat as markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except SystemExit as exc:
            if _interrupted:
                # Everything is cleaned up and said; the interpreter's own teardown (collecting
                # torch's objects, atexit hooks) takes seconds and a second ^C would print a
                # traceback from it. Ctrl-C must stop within seconds: leave now.
                import os

                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(exc.code if isinstance(exc.code, int) else 130)
            raise


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
    from gia_bench.registry import describe_params, summary

    tables = _registries()
    options = _training_options()
    if kind is not None and kind not in tables and kind not in options:
        raise GiaBenchError(f"unknown kind {kind!r}; accepted: {', '.join(sorted([*tables, *options]))}")
    for name in [kind] if kind else [*sorted(tables), *options]:
        table = Table(title=name, title_justify="left", show_lines=False)
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("parameters (default)")
        table.add_column("description")
        if name in options:
            for row in options[name]():
                table.add_row(*row)
            console.print(table)
            continue
        for entry, cls in tables[name].items():
            params = [
                p for p in describe_params(cls) if p.name not in ("in_shape", "num_classes")
            ]
            text = "\n".join(
                f"{p.name}: {p.type} = {p.default!r}" + (f"  [dim]{p.help}[/]" if p.help else "") for p in params
            )
            table.add_row(entry, text or "-", summary(cls))
        console.print(table)



from pathlib import Path  # noqa: E402  (typer reads the annotations below from this module's globals)


def _plugin_option() -> Any:
    return typer.Option(
        [], "--plugin", help="trust this module:Class (a compressor, model, attack ... named by a record or spec); repeatable"
    )


def _flag_plugins(*specs: str | None) -> list[str]:
    """The ``module:Class`` names among specs the user typed on the command line (trusted by typing them)."""
    from gia_bench.registry import _MODULE_CLASS, parse_spec

    names = []
    for spec in specs:
        if spec:
            try:
                name = parse_spec(spec).name
            except GiaBenchError:
                continue  # the command itself reports the bad spec
            if _MODULE_CLASS.match(name):
                names.append(name)
    return names




def _apply_threads() -> None:
    """torch threads by the one policy (:mod:`gia_bench.threads`): OMP_NUM_THREADS, else the cores left free."""
    from gia_bench.threads import apply_threads

    apply_threads()


@app.command("capture")
def capture_cmd(
    dataset: str = typer.Option("digits", "--dataset", help="data set spec, e.g. digits, faces, photos, cifar10:channels=1"),
    model: str = typer.Option("lenet", "--model", help="model spec, e.g. lenet, convnet:width=32, resnet18, mlp"),
    defense: str = typer.Option("none", "--defense", help="compressor spec, e.g. none, fp16, lqsgd:rank=1"),
    batch_size: int = typer.Option(1, "--batch-size", help="images per batch (per record)"),
    num: int = typer.Option(8, "--num", help="number of records (batches) to capture"),
    seed: int = typer.Option(0, "--seed", help="seeds the batch choice and the model's initial weights"),
    out: Path = typer.Option(Path("records"), "--out", help="folder for <id>.safetensors and <id>.truth.safetensors"),
    data_root: Path | None = typer.Option(None, "--data-root", help="where torchvision data sets live"),
    download: bool = typer.Option(False, "--download", help="let torchvision download the data set into --data-root"),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="trained weights (safetensors or torch.save state dict) instead of the seeded init"
    ),
    model_mode: str = typer.Option("train", "--model-mode", help="train or eval: BatchNorm behaviour in the gradient"),
    device: str = typer.Option("cpu", "--device", help="torch device for the gradient, e.g. cpu, cuda"),
    fewbit_backward: int = typer.Option(
        0, "--fewbit-backward", help="BITS: few-bit backward activations (Novikov et al.); 0 = exact backward"
    ),
    local_steps: int = typer.Option(
        1, "--local-steps", help="FedAvg: local SGD steps before the client sends (1: the FedSGD gradient)"
    ),
    local_lr: float = typer.Option(0.1, "--local-lr", help="FedAvg: the client's local learning rate"),
    local_batch: int = typer.Option(
        None, "--local-batch", help="FedAvg: examples per local step, cyclic over the batch (default: the whole batch)"
    ),
) -> None:
    """Capture gradient records: one worker's messages for one step, one file per batch (+ truth).

    With --local-steps K > 1 the record holds the client's FedAvg update (w_0 - w_K) / lr
    after K local SGD steps, compressed by the defense.
    """
    _apply_threads()
    from gia_bench.capture import capture, summarize
    from gia_bench.registry import trusted

    try:
        with trusted(_flag_plugins(dataset, model, defense)):  # module:Class typed here is trusted by the user
            paths = capture(
                dataset, model, defense, batch_size, num, seed, out, checkpoint=checkpoint, data_root=data_root,
                download=download, model_mode=model_mode, device=device, progress=True,
                fewbit_backward=fewbit_backward, local_steps=local_steps, local_lr=local_lr, local_batch=local_batch,
            )
    except KeyboardInterrupt:
        done = sorted(p for p in out.glob("*.safetensors") if not p.name.endswith(".truth.safetensors"))
        err_console.print(f"[yellow]interrupted:[/] {len(done)} complete records kept in {out}; run again to resume")
        raise typer.Exit(130) from None
    rows = summarize(paths)
    table = Table(title=f"{len(rows)} records in {out}", title_justify="left")
    table.add_column("record", style="bold cyan", no_wrap=True)
    table.add_column("batch", justify="right")
    table.add_column("bytes sent", justify="right")
    table.add_column("fp32 bytes", justify="right")
    table.add_column("ratio vs fp32", justify="right")
    for r in rows:
        table.add_row(r.record_id, str(r.batch_size), f"{r.bytes_sent:,}", f"{r.fp32_bytes:,}", f"{r.ratio:.1f}x")
    console.print(table)
    console.print(f"defense [bold]{defense}[/], model [bold]{model}[/], dataset [bold]{dataset}[/], seed {seed}")


def _print_warnings(warnings: Sequence[str], what: str) -> None:
    """The report's banner on the terminal (rule: gia_bench.reports.headline.BUDGET_RULE)."""
    from rich.markup import escape

    if warnings:
        console.print(f"[bold yellow]Not supported by this study: {what}.[/]")
        for w in warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)


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
    plugin: list[str] = _plugin_option(),
) -> None:
    """Privacy vs compression: tables, figures and an HTML report from attack results and training runs."""
    _apply_threads()
    from gia_bench.evaluate import check_lpips_net
    from gia_bench.registry import trusted

    check_lpips_net(lpips_net)
    if lpips_weights is not None and not lpips_weights.is_file():
        raise GiaBenchError(f"--lpips-weights {lpips_weights}: no such file")
    from gia_bench.reports import ReportOptions, make_report, rich_tables, warning_lines

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
    for table in rich_tables(output.data):
        console.print(table)
    _print_warnings(warning_lines(output.data), "the verdicts above")
    for note in output.data.lpips_notes:
        console.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)
    for s in output.data.runs.skipped:
        err_console.print(f"[yellow]skipped[/] {s.path}: {s.reason}", highlight=False, soft_wrap=True)
    n = len(output.data.runs.results)
    console.print(
        f"{n} result(s), {len(output.data.runs.trains)} training run(s), {len(output.data.runs.skipped)} skipped;"
        f" wrote {len(output.files)} files to [bold]{out}[/] (open {out / 'report.html'})"
    )


@app.command("train")
def train_cmd(
    out: Path = typer.Option(..., "--out", help="run folder: metrics.json, checkpoint.pt, records/"),
    dataset: str = typer.Option("digits", "--dataset", help="data set spec, e.g. digits or cifar10"),
    model: str = typer.Option("resnet18", "--model", help="model spec, e.g. resnet18, lenet, mlp:hidden=64"),
    defense: str = typer.Option("none", "--defense", help="compressor spec, e.g. lqsgd:rank=2"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="workers on this machine (one per GPU)"),
    nnodes: str = typer.Option("1", "--nnodes", help="machines, N or MIN:MAX (as torchrun)"),
    rdzv_endpoint: str = typer.Option(None, "--rdzv-endpoint", help="host:port of the rendezvous (several machines)"),
    rdzv_id: str = typer.Option(None, "--rdzv-id", help="job id shared by all machines"),
    epochs: int = typer.Option(3, "--epochs", help="epochs in total (a resumed run continues up to this)"),
    batch_size: int = typer.Option(64, "--batch-size", help="examples per worker per step"),
    lr: float = typer.Option(
        None, "--lr", help="peak SGD learning rate (default: 0.1 x global batch / 256, global = batch x workers)"
    ),
    lr_warmup_steps: int = typer.Option(
        None, "--lr-warmup-steps", help="linear lr warm-up steps (default: 5% of the run, at least 1; 0: none)"
    ),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum, applied after the reduce"),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="SGD weight decay, applied after the reduce"),
    lr_schedule: str = typer.Option("cosine", "--lr-schedule", help="constant or cosine"),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="uncompressed steps first (the defense's start_iter)"),
    collective: str = typer.Option(
        None, "--collective", help="the defense's collective: auto, allgather or alltoall (lqsgd)"
    ),
    capture_every: int = typer.Option(0, "--capture-every", help="save rank 0's GradientRecord every K steps"),
    capture_steps: str = typer.Option(
        None, "--capture-steps", help='save rank 0\'s GradientRecord at these optimizer steps, e.g. 0,50,end'
    ),
    seed: int = typer.Option(0, "--seed", help="model init, data order and compressor seed"),
    backend: str = typer.Option("auto", "--backend", help="auto, gloo or nccl"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    bucket_cap_mb: float = typer.Option(25.0, "--bucket-cap-mb", help="DDP bucket size in MB"),
    max_steps_per_epoch: int = typer.Option(None, "--max-steps-per-epoch", help="cut each epoch short"),
    data_root: Path = typer.Option(None, "--data-root", help="folder of torchvision data sets"),
    download: bool = typer.Option(False, "--download", help="let torchvision download the data set"),
    threads_per_worker: int = typer.Option(
        None, "--threads-per-worker", help="torch threads per worker (default: OMP_NUM_THREADS, else the free cores shared)"
    ),
    timeout: float = typer.Option(
        300.0, "--collective-timeout", "--timeout",
        help="seconds before a stuck collective fails the run; a worker stuck 1.5x this is stopped, its stack saved",
    ),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt"),
    fewbit_backward: int = typer.Option(
        0, "--fewbit-backward", help="BITS: few-bit backward activations (Novikov et al.); 0 = exact backward"
    ),
    optimizer: str = typer.Option(
        "sgd", "--optimizer", help="sgd, qcmd-adagrad or qrda-adagrad (AdaGrad with an L1 step; Xu et al.)"
    ),
    l1: float = typer.Option(0.0, "--l1", help="L1 weight lambda of the adagrad optimizers (sparse models)"),
) -> None:
    """Train with DDP, any defense as the gradient communication hook (torchrun underneath)."""
    from gia_bench.registry import trusted
    from gia_bench.train import TrainConfig, launch, parse_capture_steps
    from gia_bench.train.checkpoint import checkpoint_note

    with trusted(_flag_plugins(dataset, model, defense)):  # module:Class typed here is trusted by the user
        config = TrainConfig(
            out=out, dataset=dataset, model=model, defense=defense, epochs=epochs, batch_size=batch_size, lr=lr,
            momentum=momentum, weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps,  # type: ignore[arg-type]
            lr_warmup_steps=lr_warmup_steps, capture_steps=parse_capture_steps(capture_steps or ""),
            collective=collective, capture_every=capture_every, seed=seed, nproc_per_node=nproc_per_node,
            nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, backend=backend, device=device,  # type: ignore[arg-type]
            bucket_cap_mb=bucket_cap_mb, max_steps_per_epoch=max_steps_per_epoch, data_root=data_root,
            download=download, threads_per_worker=threads_per_worker, timeout_s=timeout, resume=resume,
            fewbit_backward=fewbit_backward, optimizer=optimizer, l1=l1,
        )
        try:
            metrics = launch(config)
        except KeyboardInterrupt:
            err_console.print(f"[yellow]interrupted:[/] {checkpoint_note(out)}; run again with --resume to continue")
            raise typer.Exit(130) from None
    totals = metrics["totals"]
    console.print(
        f"{metrics['defense']} on {metrics['world_size']} workers: test accuracy"
        f" {100 * totals['final_test_accuracy']:.2f}%, {totals['bytes_sent_per_worker']:,} bytes per worker"
        f" ({totals['bytes_per_step']:,.0f} per step), {totals['seconds']:.1f} s; wrote [bold]{out / 'metrics.json'}[/]",
        highlight=False, soft_wrap=True,
    )


@app.command("federated")
def federated_cmd(
    out: Path = typer.Option(..., "--out", help="run folder: metrics.json, records/ (captured rounds)"),
    dataset: str = typer.Option("digits", "--dataset", help="data set spec; clients hold IID shards of its train split"),
    model: str = typer.Option("convnet:width=16", "--model", help="model spec, e.g. convnet:width=16, lenet"),
    defense: str = typer.Option("none", "--defense", help="compressor spec applied to each client's update"),
    clients: int = typer.Option(4, "--clients", help="simulated clients (Flower SuperNodes); all train every round"),
    rounds: int = typer.Option(5, "--rounds", help="FedAvg rounds"),
    local_steps: int = typer.Option(5, "--local-steps", help="local SGD steps per round (K)"),
    local_lr: float = typer.Option(0.1, "--local-lr", help="the clients' SGD learning rate"),
    local_batch: int = typer.Option(16, "--local-batch", help="examples per local step"),
    batch_size: int = typer.Option(64, "--batch-size", help="private examples per client per round (a record's batch)"),
    capture_rounds: str = typer.Option("", "--capture-rounds", help="rounds whose client updates become records, e.g. 1,5"),
    seed: int = typer.Option(0, "--seed", help="model init, shards and each round's examples"),
    data_root: Path = typer.Option(None, "--data-root", help="where torchvision data sets live"),
    download: bool = typer.Option(False, "--download", help="let torchvision download the data set into --data-root"),
    cpus_per_client: float = typer.Option(1.0, "--cpus-per-client", help="Ray CPUs each simulated client reserves"),
    num_cpus: int = typer.Option(None, "--num-cpus", help="CPUs Ray may use (default: all)"),
    plugin: list[str] = _plugin_option(),
) -> None:
    """Federated averaging on Flower's simulation engine, each client's update through the defense; records of it."""
    from gia_bench.federated import FederatedConfig, parse_rounds, require_flower, run_federated

    require_flower()
    cfg = FederatedConfig(
        dataset=dataset, model=model, defense=defense, clients=clients, rounds=rounds, local_steps=local_steps,
        local_lr=local_lr, local_batch=local_batch, batch_size=batch_size, capture_rounds=parse_rounds(capture_rounds),
        out=out, seed=seed, data_root=data_root, download=download, cpus_per_client=cpus_per_client, num_cpus=num_cpus,
        # module:Class typed in a spec here is trusted by the user, as in capture and train
        plugins=tuple(dict.fromkeys([*plugin, *_flag_plugins(dataset, model, defense)])),
    )

    def line(row: dict) -> None:
        console.print(
            f"round {row['round']}/{rounds}: test accuracy {100 * row['test_accuracy']:.2f}%,"
            f" {row['bytes_per_client']:,.0f} bytes per client"
            + (f", {sum(1 for c in row['clients'] if c['record'])} records" if any(c["record"] for c in row["clients"]) else ""),
            highlight=False,
        )

    try:
        result = run_federated(cfg, on_round=line)
    except KeyboardInterrupt:
        # Flower's threads may still be winding down: exit at once (_App), a second ^C must not print a traceback
        import signal

        global _interrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _interrupted = True
        kept = len([p for p in (out / "records").glob("*.safetensors") if not p.name.endswith(".truth.safetensors")])
        err_console.print(f"[yellow]interrupted:[/] the finished rounds' {kept} records are kept in {out / 'records'}")
        raise typer.Exit(130) from None
    m = result.metrics
    console.print(
        f"{m['defense']} on {clients} clients: test accuracy {100 * m['totals']['final_test_accuracy']:.2f}%"
        f" after {rounds} rounds, {m['totals']['records']} records, {m['totals']['simulation_seconds']:.1f} s;"
        f" wrote [bold]{result.path}[/]",
        highlight=False,
    )


def _max_memory_option() -> Any:
    return typer.Option(
        "2GiB", "--max-memory",
        help="memory an attack may use (e.g. 8GiB); a record whose estimate exceeds it is refused before it runs",
    )


@app.command("attack")
def attack_cmd(
    records: list[str] = typer.Argument(..., help="gradient records (.safetensors) or folders searched for them"),
    attack: list[str] = typer.Option(
        ["dlg"], "--attack", "-a", help="attack spec, e.g. ig:iterations=2000,tv=1e-4 (repeatable)"
    ),
    view: list[str] = typer.Option(
        ["naive"], "--view",
        help="naive (match decode(messages)), aware (match simulate(...); residual assumed zero) or oracle"
        " (aware + the private residual from the truth file: an upper bound); repeatable",
    ),
    out: str = typer.Option("runs", "--out", "-o", help="results go to OUT/<defense>/<record-id>/<attack>-<view>/"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    seed: int = typer.Option(0, "--seed", help="seed of the attack's random initialisation"),
    lpips_net: str = typer.Option("alex", "--lpips-net", help="LPIPS trunk: alex or vgg"),
    lpips_weights: str = typer.Option(
        None, "--lpips-weights", help="local trunk weights file (else $GIA_BENCH_LPIPS_WEIGHTS / torch cache)"
    ),
    plugin: list[str] = _plugin_option(),
    max_memory: str = _max_memory_option(),
) -> None:
    """Reconstruct the images and labels of saved gradient records; score them where a truth file exists."""
    _apply_threads()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from gia_bench.budget import parse_memory
    from gia_bench.evaluate import AttackOptions, AttackResult, Skipped, run_attacks

    options = AttackOptions(
        out=Path(out), seed=seed, device=device, lpips_net=lpips_net,
        lpips_weights=Path(lpips_weights) if lpips_weights else None, plugins=tuple(plugin),
        max_memory=parse_memory(max_memory),
    )
    finished: list[AttackResult] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("it {task.completed:.0f}/{task.total:.0f}  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: list[Any] = []

        def start(path: Path, spec: str, v: str):
            task = bar.add_task(f"{path.name} {spec.split(':')[0]}-{v}", total=1, loss="-")
            tasks.append(task)

            def report(i: int, total: int, loss: float) -> None:
                bar.update(task, completed=i, total=total, loss=f"{loss:.4g}")

            return report

        def done(r: AttackResult) -> None:
            while tasks:
                bar.remove_task(tasks.pop())
            finished.append(r)
            psnr, ssim, acc = r.mean("psnr"), r.mean("ssim"), r.data.get("label_accuracy")
            scored = "" if psnr is None else f", PSNR {psnr:.2f} dB, SSIM {ssim:.3f}, label accuracy {acc:.2f}"
            if r.mean("token_f1") is not None:  # a text result (gia_bench.text): its own metrics
                scored = (f", token F1 {r.mean('token_f1'):.3f}, ROUGE-1 {r.mean('rouge1'):.3f},"
                          f" exact {r.mean('exact'):.2f}, label accuracy {acc:.2f}")
            mark = "[cyan]reused[/] " if r.reused else ""
            console.print(
                f"{mark}{r.record_id} {escape('[' + r.defense.split(':')[0] + ']')} {r.attack.split(':')[0]} ({r.view}):"
                f" {r.data['iterations']} it, {r.data['seconds']:.1f} s{scored} -> [bold]{r.path}[/]",
                highlight=False, soft_wrap=True,
            )

        def skip(s: Skipped) -> None:
            err_console.print(f"[yellow]skipped[/] {s.reason}", highlight=False, soft_wrap=True)

        try:
            run_attacks(records=[Path(r) for r in records], attacks=attack, views=view, options=options,
                        on_start=start, on_result=done, on_skip=skip)
        except KeyboardInterrupt:
            err_console.print(f"[yellow]interrupted:[/] {len(finished)} results kept under {out}")
            raise typer.Exit(130) from None
    reused = sum(r.reused for r in finished)
    console.print(f"{len(finished)} result(s) under [bold]{out}[/], {reused} reused (same record content, attack,"
                  " view and seed)", highlight=False)


study_app = typer.Typer(help="Run a study file (TOML): captures, attacks, trainings, one report.", no_args_is_help=True)
app.add_typer(study_app, name="study")


def _print_status(st: Any, out: Path) -> None:
    table = Table(title=f"study {out}", title_justify="left")
    table.add_column("stage", style="bold")
    table.add_column("done", justify="right")
    table.add_column("left", justify="right")
    for name, (done, total) in (("capture", st.captures), ("attack", st.attacks), ("train", st.trains)):
        table.add_row(name, str(done), str(total - done))
    console.print(table)
    for f in st.failures:
        err_console.print(f"[red]failed[/] {f['stage']} {f['unit']}: {f['error']}", highlight=False, soft_wrap=True)
    if st.report is not None:
        console.print(f"report: [bold]{st.report / 'report.html'}[/] (and report.md, summary.csv)", highlight=False)


def _run_study_cli(
    source: Path, out: Path, workers: int, device: str, lpips_net: str, lpips_weights: Path | None,
    engine: str = "local", address: str | None = None, plugins: tuple[str, ...] = (), max_memory: str = "2GiB",
) -> None:
    import signal
    import time

    from gia_bench.budget import parse_memory
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
        st = run_study(config, out, options, console=console)
    except KeyboardInterrupt:
        # the units in flight are cancelled already; a second ^C while exiting must not print a traceback
        global _interrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _interrupted = True
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
    plugin: list[str] = _plugin_option(),
    max_memory: str = _max_memory_option(),
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
    max_memory: str = _max_memory_option(),
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
    _apply_threads()
    from gia_bench.audit import AUDIT_FILE, AuditOptions, run_audit

    from gia_bench.registry import trusted

    try:
        with trusted(_flag_plugins(spec)):  # auditing a module:Class trusts it
            result = run_audit(
                spec, out, AuditOptions(workers=workers, quick=quick, train=not no_train, lpips_weights=lpips_weights),
                console,
            )
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted:[/] the audit stopped; its finished battery units are kept in {out}")
        raise typer.Exit(130) from None
    checks = Table(title=f"audit of {result.spec}: contract", title_justify="left")
    checks.add_column("check")
    checks.add_column("result")
    for c in result.checks:
        if c.skipped:
            checks.add_row(c.name, f"[dim]{'n/a' if c.passed else 'skipped'}[/] {c.reason}")
        else:
            checks.add_row(c.name, "[green]pass[/]" if c.passed else f"[red]FAIL[/] {c.reason}")
    console.print(checks)
    if result.standings:
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
        console.print(table)
    _print_warnings(result.warnings, "the frontier column above: this ranking means nothing at this budget")
    console.print(f"wrote [bold]{out / AUDIT_FILE}[/]" + (f" and {result.report / 'report.html'}" if result.report else ""))
    if not result.passed:
        err_console.print(f"[bold red]audit failed:[/] {next(c for c in result.checks if not c.passed and not c.skipped).reason}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
