"""``gia-bench capture``, ``attack``, ``train`` and ``federated``: the runs that make records, results and models."""

from __future__ import annotations

from pathlib import Path

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
)
from gia_bench.cli.render import AttackView, CaptureView, RoundsView, TrainView


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
    apply_threads()
    from gia_bench.capture import CaptureConfig, capture, summarize
    from gia_bench.cli.tables import capture_table
    from gia_bench.registry import trusted

    cfg = CaptureConfig(
        dataset, model, defense, batch_size, num, seed, out, checkpoint=checkpoint, data_root=data_root,
        download=download, model_mode=model_mode, device=device,
        fewbit_backward=fewbit_backward, local_steps=local_steps, local_lr=local_lr, local_batch=local_batch,
    )
    try:
        with trusted(flag_plugins(dataset, model, defense)), CaptureView(console) as view:  # typed here: trusted
            paths = capture(cfg, events=view)
    except KeyboardInterrupt:
        done = sorted(p for p in out.glob("*.safetensors") if not p.name.endswith(".truth.safetensors"))
        err_console.print(f"[yellow]interrupted:[/] {len(done)} complete records kept in {out}; run again to resume")
        raise typer.Exit(130) from None
    console.print(capture_table(summarize(paths), out))
    console.print(f"defense [bold]{defense}[/], model [bold]{model}[/], dataset [bold]{dataset}[/], seed {seed}")


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
    plugin: list[str] = plugin_option(),
    max_memory: str = max_memory_option(),
) -> None:
    """Reconstruct the images and labels of saved gradient records; score them where a truth file exists."""
    apply_threads()
    from gia_bench.budget import parse_memory
    from gia_bench.evaluate import AttackOptions, run_attacks

    options = AttackOptions(
        out=Path(out), seed=seed, device=device, lpips_net=lpips_net,
        lpips_weights=Path(lpips_weights) if lpips_weights else None, plugins=tuple(plugin),
        max_memory=parse_memory(max_memory),
    )
    with AttackView(console, err_console) as shown:
        try:
            finished = run_attacks(records=[Path(r) for r in records], attacks=attack, views=view, options=options,
                                   events=shown)
        except KeyboardInterrupt:
            shown.close()
            err_console.print(f"[yellow]interrupted:[/] {shown.results} results kept under {out}")
            raise typer.Exit(130) from None
    reused = sum(r.reused for r in finished)
    console.print(f"{len(finished)} result(s) under [bold]{out}[/], {reused} reused (same record content, attack,"
                  " view and seed)", highlight=False)


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
        None, "--lr-warmup-steps", help="linear lr warm-up steps (default: 5% of the run, at least 10 steps or the first epoch; 0: none)"
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

    with trusted(flag_plugins(dataset, model, defense)):  # module:Class typed here is trusted by the user
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
            with TrainView(err_console) as shown:  # rank 0's bar and epoch lines, on stderr as before
                metrics = launch(config, events=shown)
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
    plugin: list[str] = plugin_option(),
) -> None:
    """Federated averaging on Flower's simulation engine, each client's update through the defense; records of it."""
    from gia_bench.federated import FederatedConfig, parse_rounds, require_flower, run_federated

    require_flower()
    cfg = FederatedConfig(
        dataset=dataset, model=model, defense=defense, clients=clients, rounds=rounds, local_steps=local_steps,
        local_lr=local_lr, local_batch=local_batch, batch_size=batch_size, capture_rounds=parse_rounds(capture_rounds),
        out=out, seed=seed, data_root=data_root, download=download, cpus_per_client=cpus_per_client, num_cpus=num_cpus,
        # module:Class typed in a spec here is trusted by the user, as in capture and train
        plugins=tuple(dict.fromkeys([*plugin, *flag_plugins(dataset, model, defense)])),
    )
    try:
        with RoundsView(console) as shown:
            result = run_federated(cfg, events=shown)
    except KeyboardInterrupt:
        # Flower's threads may still be winding down: exit at once (_App), a second ^C must not print a traceback
        mark_interrupted()
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
