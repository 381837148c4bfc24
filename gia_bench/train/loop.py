"""One worker's training loop: DDP with the compressor as its comm hook, capture, metrics."""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gia_bench.errors import ConfigError
from gia_bench.io import atomic_write_json
from gia_bench.optim import make_optimizer, sparsity
from gia_bench.train.checkpoint import load_checkpoint, save_checkpoint, set_rng_state, to_cpu, to_device
from gia_bench.train.config import (
    CHECKPOINT_FILE,
    FAIL_ENV,
    FAIL_EXIT_CODE,
    METRICS_FILE,
    PEER_LOST_EXIT_CODE,
    PEER_LOST_LINGER_S,
    RECORDS_DIR,
    TrainConfig,
    load_data,
)
from gia_bench.train.progress import Progress

def _lr_at(config: TrainConfig, step: int, total: int) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


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
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for i in range(0, len(mine), batch):
            inputs, labels = test.batch(mine[i : i + batch])
            correct += (model(inputs.to(device)).argmax(1) == labels.to(device)).sum()
    model.train(was_training)
    dist.all_reduce(correct)  # a plain all-reduce of one integer, not gradient traffic
    return int(correct) / max(len(test), 1)


def _capture(
    config: TrainConfig,
    model_before: torch.nn.Module,
    compressor_before: Any,
    model_spec: Any,
    dataset_spec: Any,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    grads: Sequence[torch.Tensor],
    step: int,
    epoch: int,
    world_size: int,
    wire: list[dict],
) -> None:
    """Save rank 0's step as a record: its raw local gradients through its live compressor state.

    What the record holds: ``compressor_before`` is a copy of rank 0's compressor
    as it stood before this step (error feedback, warm-start Q, RNG: everything
    that makes this step's messages); it compresses rank 0's raw local gradients
    (taken inside the hook, before any reduction) through a
    :class:`~gia_bench.comm.LocalCommunicator`, as ``gia-bench capture`` does. The
    first round of messages (PowerSGD's P, LQ-SGD's codes of P, Top-k's values...)
    is therefore exactly what rank 0 put on the wire in this step; later rounds
    (PowerSGD's Q, computed from the all-reduced P) are the one-worker view of a
    curious server talking to rank 0 alone. The weights are the model before this
    step's forward. ``extra["wire_messages"]`` lists the messages (tag, shape, bytes)
    rank 0 actually sent through ``torch.distributed`` in this step.
    """
    from gia_bench.capture import capture_batch
    from gia_bench.records import truth_path

    record_id = f"step{step:07d}"
    record, truth = capture_batch(
        model_before,
        model_spec,
        dataset_spec,
        inputs.cpu(),
        labels.cpu(),
        compressor_before,
        record_id=record_id,
        step=step,
        seed=config.seed,
        grads=[g.cpu() for g in grads],
        extra={
            "source": "train",
            "epoch": epoch,
            "rank": 0,
            "world_size": world_size,
            "view": "rank 0's raw gradient through a copy of its live compressor state, LocalCommunicator",
            "wire_messages": wire,
            "wire_bytes": sum(int(m["nbytes"]) for m in wire),
        },
    )
    path = config.out / RECORDS_DIR / f"{record_id}.safetensors"
    record.save(path)
    truth.save(truth_path(path))


def _raised_by_collective(exc: BaseException) -> bool:
    """True for errors raised inside a torch.distributed collective (gloo raises plain RuntimeErrors)."""
    import traceback

    if isinstance(exc, dist.DistError):
        return True
    return any(frame.filename.endswith("distributed_c10d.py") for frame in traceback.extract_tb(exc.__traceback__))


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
    dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    world_size = dist.get_world_size()
    try:
        _train(config, rank, world_size, device, backend)
    except RuntimeError as exc:
        if not _raised_by_collective(exc):
            raise
        # a peer died or hung: this worker is collateral damage, say so in its exit code
        print(f"rank {rank}: collective failed ({str(exc).splitlines()[0][:200]})", file=sys.stderr)
        # torchrun's agent records only the failures it sees in one poll and then stops the rest:
        # linger so that it sees the worker that died first, not this one
        time.sleep(PEER_LOST_LINGER_S)
        os._exit(PEER_LOST_EXIT_CODE)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, rank: int, world_size: int, device: torch.device, backend: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DistributedSampler

    from gia_bench.defenses import create
    from gia_bench.defenses.ddp import clone_state, make_hook
    from gia_bench.models import ModelSpec, build_model

    train, test = load_data(config)
    dataset_spec = train.spec
    model_spec = ModelSpec(
        config.model, tuple(dataset_spec.shape), dataset_spec.num_classes, "train", config.fewbit_backward
    )
    model = build_model(model_spec, seed=config.seed, device=device)
    names = [n for n, _ in model.named_parameters()]
    compressor = create(config.defense_spec())
    optimizer = make_optimizer(
        config.optimizer, model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, l1=config.l1,
    )
    sampler = DistributedSampler(
        range(len(train)), num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // config.batch_size
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--batch-size {config.batch_size}: each of {world_size} workers has only {len(sampler)} training examples"
        )
    total_steps = steps_per_epoch * config.epochs

    ckpt_path = config.out / CHECKPOINT_FILE
    start_epoch, global_step, history = 0, 0, []
    checkpoint = load_checkpoint(ckpt_path) if config.resume and ckpt_path.exists() else None
    if checkpoint is not None:
        if checkpoint["world_size"] != world_size:
            raise ConfigError(
                f"{ckpt_path}: saved with {checkpoint['world_size']} workers, this run has {world_size}"
                " (error feedback is per worker)"
            )
        model.load_state_dict(checkpoint["model"])
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=config.bucket_cap_mb)
    state, hook = make_hook(compressor, ddp)
    ddp.register_comm_hook(state, hook)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        state.load_state_dict(to_device(checkpoint["ranks"][rank]["hook"], device))
        set_rng_state(checkpoint["ranks"][rank]["rng"], device)
        start_epoch, global_step = int(checkpoint["epoch"]), int(checkpoint["step"])
        history = list(checkpoint["epochs"])

    fail = _fail_at()
    progress = Progress(rank == 0, config.epochs, steps_per_epoch, start_epoch)
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.int64)
            bytes_before, payload_before = state.bytes_sent, state.payload_bytes
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            t0 = time.perf_counter()
            for s in range(steps_per_epoch):
                if fail is not None and fail == (rank, global_step):
                    os._exit(FAIL_EXIT_CODE)  # simulates a crashed worker (tests only)
                idx = order[s * config.batch_size : (s + 1) * config.batch_size]
                x, y = train.batch(idx.tolist())
                x, y = x.to(device), y.to(device)
                capturing = rank == 0 and config.capture_every > 0 and global_step % config.capture_every == 0
                if capturing:
                    model_before = copy.deepcopy(model).cpu()
                    compressor_before = create(compressor.spec)
                    compressor_before.load_state_dict(to_cpu(clone_state(compressor.state_dict())))
                    state.capture_grads = {}
                    state.keep_messages = True
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(config, global_step, total_steps)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                if capturing:
                    raw = state.capture_grads
                    state.capture_grads, state.keep_messages = None, False
                    wire = [m.info() for m in state.comm.reset()]
                    _capture(config, model_before, compressor_before, model_spec, dataset_spec, x, y,
                             [raw[n] for n in names], global_step, epoch + 1, world_size, wire)
                optimizer.step()
                loss_sum += loss.detach().double()
                global_step += 1
                progress.step(epoch, float(loss) if progress.enabled else 0.0)
            seconds = time.perf_counter() - t0
            # train loss averaged over workers; a plain all-reduce, not gradient traffic
            stats = torch.stack([loss_sum, torch.tensor(float(steps_per_epoch), dtype=torch.float64, device=device)])
            dist.all_reduce(stats)
            t1 = time.perf_counter()
            accuracy = _evaluate(model, test, device, rank, world_size)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": float(stats[0] / stats[1]),
                    "test_accuracy": accuracy,
                    "test_examples": len(test),
                    "sparsity": sparsity(model),
                    "bytes_sent_per_worker": state.bytes_sent - bytes_before,
                    "payload_bytes_per_worker": state.payload_bytes - payload_before,
                    "steps": steps_per_epoch,
                    "seconds": seconds,
                    "eval_seconds": time.perf_counter() - t1,
                }
            )
            save_checkpoint(config, rank, world_size, device, model, optimizer, state, epoch + 1, global_step, history)
            if rank == 0:
                atomic_write_json(config.out / METRICS_FILE, _metrics(config, compressor, world_size, backend, history))
                progress.epoch_done(history[-1])
    finally:
        progress.close()


def _metrics(config: TrainConfig, compressor: Any, world_size: int, backend: str, history: list[dict]) -> dict:
    steps = sum(e["steps"] for e in history)
    total_bytes = sum(e["bytes_sent_per_worker"] for e in history)
    return {
        "schema": 1,
        "kind": "train",
        "dataset": config.dataset,
        "model": config.model,
        "defense": compressor.spec,
        "world_size": world_size,
        "backend": backend,
        "collective": getattr(compressor, "collective", None),
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
