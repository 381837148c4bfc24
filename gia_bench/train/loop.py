"""One worker's training loop: DDP with the compressor as its comm hook, capture, metrics."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gia_bench.errors import ConfigError
from gia_bench.io import atomic_write_json
from gia_bench.optim import make_optimizer, sparsity
from gia_bench.text.causal import correct_and_total, targets_for
from gia_bench.train.checkpoint import (
    CheckpointState,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    to_cpu,
    to_device,
)
from gia_bench.train.config import (
    CHECKPOINT_FILE,
    FAIL_ENV,
    FAIL_EXIT_CODE,
    METRICS_FILE,
    PEER_LOST_EXIT_CODE,
    RECORDS_DIR,
    TrainConfig,
    load_data,
    lr_at,
)
from gia_bench.train.progress import Progress
from gia_bench.train.records import RecordedRun, StepCapture, record_path, save_step_record
from gia_bench.train.watchdog import LINGER_MARGIN_S, Watchdog, peer_lost_linger

def _fail_at() -> tuple[int, int] | None:
    text = os.environ.get(FAIL_ENV)
    if not text:
        return None
    rank, _, step = text.partition(":")
    return int(rank), int(step)


def _evaluate(model: torch.nn.Module, test: Any, device: torch.device, rank: int, world_size: int,
              batch: int = 500) -> float:
    """Accuracy (fraction) of rank 0's model on the whole test split, in eval mode, split across the ranks.

    Each rank scores every ``world_size``-th test example and the correct counts are
    summed, so the result is exactly rank 0 scoring the whole split alone, in
    1/world_size of the time. Buffers (BatchNorm running statistics) differ between
    ranks after their own last forward; they are broadcast from rank 0 first, as DDP
    does before each forward, so every rank scores the same model.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(test), world_size))
    # scored positions: one per example, or one per next token of a causal LM (gia_bench.text.causal)
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    with torch.no_grad():
        for i in range(0, len(mine), batch):
            inputs, labels = test.batch(mine[i : i + batch])
            inputs, labels = inputs.to(device), labels.to(device)
            hits, total = correct_and_total(model(inputs), targets_for(model, inputs, labels))
            counts += torch.stack((hits, total))
    model.train(was_training)
    dist.all_reduce(counts)  # a plain all-reduce of two integers, not gradient traffic
    return int(counts[0]) / max(int(counts[1]), 1)


def _raised_by_collective(exc: BaseException) -> bool:
    """True for errors raised inside a torch.distributed collective (gloo raises plain RuntimeErrors).

    Our collectives go through ``distributed_c10d.py``; DDP's own (bucket rebuild, buffer
    broadcast) raise straight from C++ in ``nn/parallel/distributed.py`` with the backend's
    message, so the innermost frame there and a gloo / NCCL message count too (a model's
    own error has its innermost frame in the model).
    """
    import traceback

    if isinstance(exc, dist.DistError):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    if any(frame.filename.endswith("distributed_c10d.py") for frame in frames):
        return True
    text = str(exc)
    return bool(frames) and Path(frames[-1].filename).parts[-3:] == ("nn", "parallel", "distributed.py") and (
        "gloo" in text or "NCCL" in text or "ProcessGroup" in text
    )


def run_worker(config: TrainConfig) -> None:
    """One worker's training loop (called by ``python -m gia_bench.train CONFIG``, one per process)."""
    torch.set_num_threads(config.threads_per_worker)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = config.backend if config.backend != "auto" else ("nccl" if use_cuda else "gloo")
    # the process group's timeout bounds every collective; the watchdog bounds everything between
    # two kicks (a step, an evaluation, a checkpoint write), a hang in C++ code included
    dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    world_size = dist.get_world_size()
    watchdog = Watchdog(config.out, rank, config.timeout_s)
    try:
        watchdog.start()
        _train(config, rank, world_size, device, backend, watchdog)
        # every rank done with every collective before any tears the group down: a peer that
        # exits while another still talks to it can abort that one in gloo's C++ threads
        watchdog.kick()
        dist.barrier()
    except RuntimeError as exc:
        if not _raised_by_collective(exc):
            raise
        # a peer died or hung: this worker is collateral damage, say so in its exit code
        watchdog.stop()
        print(f"rank {rank}: collective failed ({str(exc).splitlines()[0][:200]})", file=sys.stderr)
        # torchrun's agent records only the failures it sees in one poll and then stops the rest:
        # linger so that it sees the worker that died first, not this one; after a timeout (a peer
        # may be stuck, not dead) until that peer's watchdog has stopped it
        timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
        time.sleep(peer_lost_linger(config.timeout_s) if timed_out else LINGER_MARGIN_S)
        os._exit(PEER_LOST_EXIT_CODE)
    finally:
        if dist.is_initialized():
            watchdog.kick()
            dist.destroy_process_group()
        watchdog.stop()


@dataclasses.dataclass(frozen=True)
class _Worker:
    """Who this process is in the run (fixed once the process group is up)."""

    config: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    watchdog: Watchdog


@dataclasses.dataclass(frozen=True)
class _Run:
    """What a worker builds before its first step: data, model, compressor, optimizer, schedule."""

    train: Any
    test: Any
    model: torch.nn.Module
    recorded: RecordedRun  # what every record of this run shares
    compressor: Any
    optimizer: torch.optim.Optimizer
    sampler: Any  # DistributedSampler: this rank's share of each epoch
    peak_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup: int
    capture_at: frozenset[int]


def _build(w: _Worker) -> _Run:
    from torch.utils.data import DistributedSampler

    from gia_bench.defenses import create
    from gia_bench.models import build_recorded
    from gia_bench.specs import ModelSpec

    config = w.config
    train, test = load_data(config)
    dataset_spec = train.spec
    spec = ModelSpec.for_data(config.model, dataset_spec, "train", config.fewbit_backward)
    model, model_spec = build_recorded(spec, seed=config.seed, device=w.device)
    names = tuple(n for n, _ in model.named_parameters())
    compressor = create(config.defense_spec())
    peak_lr = config.peak_lr(w.world_size)
    optimizer = make_optimizer(
        config.optimizer, model.parameters(), lr=peak_lr, momentum=config.momentum,
        weight_decay=config.weight_decay, l1=config.l1,
    )
    sampler = DistributedSampler(
        range(len(train)), num_replicas=w.world_size, rank=w.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    steps_per_epoch = config.steps_per_epoch(len(train), w.world_size)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--batch-size {config.batch_size}: each of {w.world_size} workers has only {len(sampler)} training examples"
        )
    total_steps = steps_per_epoch * config.epochs
    recorded = RecordedRun(config.out / RECORDS_DIR, model_spec, dataset_spec, names, compressor.spec, config.seed)
    return _Run(
        train, test, model, recorded, compressor, optimizer, sampler, peak_lr, steps_per_epoch, total_steps,
        config.warmup(total_steps, steps_per_epoch), frozenset(config.capture_plan(total_steps)),
    )


def _train(
    config: TrainConfig, rank: int, world_size: int, device: torch.device, backend: str, watchdog: Watchdog
) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gia_bench.defenses.ddp import make_hook

    w = _Worker(config, rank, world_size, device, watchdog)
    run = _build(w)
    ckpt_path = config.out / CHECKPOINT_FILE
    checkpoint = load_checkpoint(ckpt_path) if config.resume and ckpt_path.exists() else None
    if checkpoint is not None:
        if checkpoint["world_size"] != world_size:
            raise ConfigError(
                f"{ckpt_path}: saved with {checkpoint['world_size']} workers, this run has {world_size}"
                " (error feedback is per worker)"
            )
        run.model.load_state_dict(checkpoint["model"])
    watchdog.kick()  # from here on every step, evaluation and checkpoint write is watched (not the data loading)
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(run.model, device_ids=device_ids, bucket_cap_mb=config.bucket_cap_mb)
    state, hook = make_hook(run.compressor, ddp)
    ddp.register_comm_hook(state, hook)
    start_epoch, global_step, history = 0, 0, []
    if checkpoint is not None:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        state.load_state_dict(to_device(checkpoint["ranks"][rank]["hook"], device))
        set_rng_state(checkpoint["ranks"][rank]["rng"], device)
        start_epoch, global_step = int(checkpoint["epoch"]), int(checkpoint["step"])
        history = list(checkpoint["epochs"])

    progress = Progress(rank == 0, config.epochs, run.steps_per_epoch, start_epoch, config.defense, out=config.out)
    try:
        for epoch in range(start_epoch, config.epochs):
            global_step = _epoch(w, run, ddp, state, epoch, global_step, history, progress)
            watchdog.kick()
            save_checkpoint(
                CheckpointState(config.out, rank, world_size, device, epoch + 1, global_step, history, run.model,
                                run.optimizer, state)  # fmt: skip
            )
            if rank == 0:
                atomic_write_json(
                    config.out / METRICS_FILE,
                    _metrics(config, run.compressor, world_size, backend, history, run.peak_lr, run.warmup,
                             run.total_steps),  # fmt: skip
                )
                progress.epoch_done(history[-1])
    finally:
        progress.close()


def _epoch(
    w: _Worker, run: _Run, ddp: Any, state: Any, epoch: int, global_step: int, history: list[dict], progress: Progress
) -> int:
    """Train one epoch, evaluate, and append its row to ``history``; returns the optimizer steps done."""
    config, device = w.config, w.device
    run.sampler.set_epoch(epoch)
    order = torch.tensor(list(run.sampler), dtype=torch.int64)
    bytes_before, payload_before = state.bytes_sent, state.payload_bytes
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    fail = _fail_at()
    t0 = time.perf_counter()
    for s in range(run.steps_per_epoch):
        w.watchdog.kick()
        if fail is not None and fail == (w.rank, global_step):
            os._exit(FAIL_EXIT_CODE)  # simulates a crashed worker (tests only)
        idx = order[s * config.batch_size : (s + 1) * config.batch_size]
        x, y = run.train.batch(idx.tolist())
        loss = _step(w, run, ddp, state, x.to(device), y.to(device), epoch, global_step)
        loss_sum += loss.detach().double()
        global_step += 1
        progress.step(epoch, loss.detach())  # read (a device sync) only when sent
    seconds = time.perf_counter() - t0
    w.watchdog.kick()
    # train loss averaged over workers; a plain all-reduce, not gradient traffic
    stats = torch.stack([loss_sum, torch.tensor(float(run.steps_per_epoch), dtype=torch.float64, device=device)])
    dist.all_reduce(stats)
    t1 = time.perf_counter()
    w.watchdog.kick()
    accuracy = _evaluate(run.model, run.test, device, w.rank, w.world_size)
    history.append(
        {
            "epoch": epoch + 1,
            "train_loss": float(stats[0] / stats[1]),
            "test_accuracy": accuracy,
            "test_examples": len(run.test),
            "sparsity": sparsity(run.model),
            "lr": lr_at(run.peak_lr, config.lr_schedule, global_step - 1, run.total_steps, run.warmup),
            "step": global_step,  # optimizer steps done at the end of the epoch
            "bytes_sent_per_worker": state.bytes_sent - bytes_before,
            "payload_bytes_per_worker": state.payload_bytes - payload_before,
            "steps": run.steps_per_epoch,
            "seconds": seconds,
            "eval_seconds": time.perf_counter() - t1,
        }
    )
    return global_step


def _step(
    w: _Worker, run: _Run, ddp: Any, state: Any, x: torch.Tensor, y: torch.Tensor, epoch: int, global_step: int
) -> torch.Tensor:
    """One optimizer step (the compressor runs as DDP's comm hook); saves it as a record when planned."""
    config = w.config
    capturing = w.rank in config.capture_ranks and (
        global_step in run.capture_at or (config.capture_every > 0 and global_step % config.capture_every == 0)
    )
    if capturing:
        # what the server has before this step (BN buffers too), and what this rank adds privately
        weights = to_cpu(run.model.state_dict())
        private = run.compressor.private_state(
            list(run.recorded.param_names), [p.shape for p in run.model.parameters()]
        )
        state.comm.record, state.keep_messages = True, True
    lr = lr_at(run.peak_lr, config.lr_schedule, global_step, run.total_steps, run.warmup)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ddp(x), targets_for(ddp, x, y))
    loss.backward()
    if capturing:
        messages = state.comm.reset()
        state.comm.record, state.keep_messages = False, False
        step = StepCapture(
            global_step, epoch + 1, w.rank, w.world_size, lr, weights, private, x, y, messages,
            run.compressor.public_state(),
        )  # fmt: skip
        save_step_record(run.recorded, step)
    run.optimizer.step()
    return loss


def _metrics(
    config: TrainConfig,
    compressor: Any,
    world_size: int,
    backend: str,
    history: list[dict],
    peak_lr: float,
    warmup: int,
    total_steps: int,
) -> dict:
    steps = sum(e["steps"] for e in history)
    total_bytes = sum(e["bytes_sent_per_worker"] for e in history)
    captured = sorted(
        {s for s in config.capture_plan(total_steps) if s < steps}
        | ({s for s in range(0, steps, config.capture_every)} if config.capture_every > 0 else set())
    )
    return {
        "schema": 1,
        "kind": "train",
        "dataset": config.dataset,
        "model": config.model,
        "defense": compressor.spec,
        "world_size": world_size,
        "backend": backend,
        "collective": getattr(compressor, "collective", None),
        "global_batch": config.batch_size * world_size,
        "lr": {
            "peak": peak_lr,
            "rule": "given" if config.lr is not None else "0.1 x global batch / 256",
            "warmup_steps": warmup,
            "schedule": config.lr_schedule,
        },
        "total_steps": total_steps,
        # records of rank 0's messages: step -> file under records/ (the study's attacks run on them)
        "records": {str(s): f"{RECORDS_DIR}/{record_path(Path(), s).name}" for s in captured},
        "epochs": history,
        "totals": {
            "final_test_accuracy": history[-1]["test_accuracy"] if history else 0.0,
            "bytes_sent_per_worker": total_bytes,
            "payload_bytes_per_worker": sum(e["payload_bytes_per_worker"] for e in history),
            "bytes_per_step": total_bytes / steps if steps else 0.0,
            "steps": steps,
            "seconds": sum(e["seconds"] for e in history),
        },
        "config": config.to_json(),
    }
