"""The DDP trainer: any compressor as the communication hook, launched through torchrun.

``launch(TrainConfig(...))`` (or ``gia-bench train ...``) starts one worker per GPU
(or ``nproc_per_node`` CPU workers on gloo where there is no GPU) through
``torch.distributed.run``'s elastic agent; each worker runs :func:`run_worker`
(``python -m gia_bench.train CONFIG.json``)::

    gia-bench train --dataset digits --model resnet18 --defense lqsgd:rank=2 \
        --nproc-per-node 2 --epochs 3 --batch-size 64 --lr 0.1 --out runs/lq

The optimizer. Gradients are compressed raw: the hook
(:mod:`gia_bench.defenses.ddp`) reduces each worker's plain gradient, and SGD with
momentum and weight decay runs afterwards on the reduced ``.grad``, as PowerSGD's
paper does (Vogels et al. 2019, Algorithm 2: compress the gradient with error
feedback, then the momentum update on the decompressed aggregate). A warm-up of
uncompressed steps (PowerSGD's ``start_iter``) is ``warmup_steps``.

What it writes in ``out``:

* ``metrics.json`` after every epoch, atomically (schema 1, ``kind: "train"``):
  per epoch train loss (mean over workers and steps), test accuracy (fraction in
  [0, 1], rank 0's model on the whole test split), bytes each worker sent through
  the hook (``Message.nbytes`` of its :class:`~gia_bench.comm.TorchCommunicator`,
  counted as the ring algorithms send them) and seconds; totals.
* ``checkpoint.pt`` after every epoch, atomically: model, optimizer, every rank's
  hook state (error feedback, warm-start Q, RNG) and RNG states, the metrics so far.
  Tensors and plain containers only; read back with ``weights_only=True``.
  ``resume=True`` continues from it bit-identically.
* ``records/`` with ``capture_every=K``: every K steps a
  :class:`~gia_bench.records.GradientRecord` (+ truth file) of rank 0's step. See
  :func:`_capture` for exactly what the record holds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gia_bench.errors import ConfigError, GiaBenchError

METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "train_config.json"
RECORDS_DIR = "records"
#: hidden fault injection for tests: "RANK:STEP" makes that rank exit with code 17 before that global step
FAIL_ENV = "GIA_BENCH_TRAIN_FAIL_AT"
FAIL_EXIT_CODE = 17
#: A worker whose collective failed because a peer is gone exits with this code, so that
#: the launcher names the worker that failed first, not the ones that lost it.
PEER_LOST_EXIT_CODE = 75
PEER_LOST_LINGER_S = 2.0


class TrainError(GiaBenchError):
    """A training run failed (a worker died, the rendezvous failed)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` is per worker; ``lr`` is not scaled by the world size.

    Args:
        out: run folder (metrics.json, checkpoint.pt, records/).
        dataset: data set name (``digits`` ships with scikit-learn).
        model: model spec (``resnet18``, ``lenet``, ``mlp:hidden=64``...).
        defense: compressor spec (``lqsgd:rank=2``).
        epochs: epochs in total (a resumed run continues up to this).
        batch_size: examples per worker per step.
        lr: SGD learning rate (peak, with the cosine schedule).
        momentum: SGD momentum, applied after the reduce.
        weight_decay: SGD weight decay, applied after the reduce.
        lr_schedule: ``constant`` or ``cosine`` (cosine decay to 0 over all steps).
        warmup_steps: uncompressed steps first: sets the compressor's ``start_iter``.
        collective: sets the compressor's ``collective`` (``auto``, ``allgather``, ``alltoall``).
        capture_every: save rank 0's GradientRecord every K steps (0: never).
        seed: model init, data order and compressor seeds derive from it.
        nproc_per_node: workers on this machine.
        nnodes: machines (``N`` or ``MIN:MAX``), as torchrun's ``--nnodes``.
        rdzv_endpoint: ``host:port`` of the rendezvous for several machines.
        rdzv_id: run id shared by all machines of one job.
        backend: ``auto`` (nccl with GPUs, else gloo), ``gloo`` or ``nccl``.
        device: ``auto`` (``cuda:LOCAL_RANK`` when there is a GPU), ``cpu`` or ``cuda``.
        bucket_cap_mb: DDP bucket size.
        max_steps_per_epoch: stop each epoch early (tests, benchmarks).
        data_root: folder of torchvision data sets (``--data-root``).
        download: let torchvision download the data set into ``data_root``.
        threads_per_worker: torch / OpenMP threads per worker process.
        timeout_s: collective timeout; a hang fails after this instead of blocking.
        resume: continue from ``out/checkpoint.pt``.
    """

    out: Path
    dataset: str = "digits"
    model: str = "resnet18"
    defense: str = "none"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int | None = None
    collective: str | None = None
    capture_every: int = 0
    seed: int = 0
    nproc_per_node: int = 1
    nnodes: str = "1"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bucket_cap_mb: float = 25.0
    max_steps_per_epoch: int | None = None
    data_root: Path | None = None
    download: bool = False
    threads_per_worker: int = 1
    timeout_s: float = 300.0
    resume: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.data_root is not None:
            object.__setattr__(self, "data_root", Path(self.data_root))

    # -- validation --------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag for a bad value."""
        positive = {
            "--epochs": self.epochs,
            "--batch-size": self.batch_size,
            "--nproc-per-node": self.nproc_per_node,
            "--threads-per-worker": self.threads_per_worker,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"--backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.capture_every < 0:
            raise ConfigError(f"--capture-every must be >= 0, got {self.capture_every}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"--max-steps-per-epoch must be >= 1, got {self.max_steps_per_epoch}")
        if not self.bucket_cap_mb > 0:
            raise ConfigError(f"--bucket-cap-mb must be > 0, got {self.bucket_cap_mb}")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.backend == "nccl" and self.device == "cpu":
            raise ConfigError("--backend nccl needs --device cuda (nccl has no CPU tensors)")
        if (self.device == "cuda" or self.backend == "nccl") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device} / --backend {self.backend}: no CUDA GPU on this machine")
        _nnodes(self.nnodes)
        if _nnodes(self.nnodes)[1] > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"--nnodes {self.nnodes}: several machines need --rdzv-endpoint host:port")
        self.defense_spec()
        from gia_bench.data import DATASETS
        from gia_bench.models import MODELS

        DATASETS.kwargs_for(self.dataset)  # bad names / values raise SpecError here, not in a worker
        MODELS.kwargs_for(self.model)

    def defense_spec(self) -> str:
        """The compressor spec with ``warmup_steps`` / ``collective`` folded in (checked against its parameters)."""
        from gia_bench.defenses import DEFENSES
        from gia_bench.registry import Spec, describe_params, parse_spec

        spec = parse_spec(self.defense)
        cls = DEFENSES.get(spec.name)
        params = {p.name for p in describe_params(cls)}
        kwargs = dict(spec.kwargs)
        for flag, key, value in (
            ("--warmup-steps", "start_iter", self.warmup_steps),
            ("--collective", "collective", self.collective),
        ):
            if value is None:
                continue
            if key not in params:
                raise ConfigError(f"{flag}: defense {spec.name!r} has no parameter {key!r} to set")
            if key in kwargs and str(kwargs[key]) != str(value):
                raise ConfigError(f"{flag} {value} contradicts {key}={kwargs[key]} in --defense {self.defense!r}")
            kwargs[key] = str(value)
        text = str(Spec(spec.name, kwargs))
        DEFENSES.kwargs_for(text)  # raises SpecError for bad values now, not in a worker
        return text

    # -- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["data_root"] = None if self.data_root is None else str(self.data_root)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"train config: unknown keys {unknown}")
        return cls(**data)


def _nnodes(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise ConfigError(f"--nnodes must be N or MIN:MAX, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ConfigError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


# -- data ----------------------------------------------------------------------------------------


def load_data(config: TrainConfig) -> tuple[Any, Any]:
    """``(train, test)`` :class:`~gia_bench.data.ImageDataset` objects of ``config.dataset``."""
    from gia_bench.data import load_dataset

    root = config.data_root
    return (
        load_dataset(config.dataset, root=root, download=config.download, split="train"),
        load_dataset(config.dataset, root=root, download=config.download, split="test"),
    )


# -- files ---------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")

    _atomic_write_bytes(path, write)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read our own checkpoint (never unpickles arbitrary objects: ``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no checkpoint") from None
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise ConfigError(f"{path}: not a gia-bench checkpoint ({exc})") from exc


# -- the worker ------------------------------------------------------------------------------------


def _lr_at(config: TrainConfig, step: int, total: int) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    """Floating tensors to ``device``; others (generator states, counters) stay on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def _fail_at() -> tuple[int, int] | None:
    text = os.environ.get(FAIL_ENV)
    if not text:
        return None
    rank, _, step = text.partition(":")
    return int(rank), int(step)


def _evaluate(model: torch.nn.Module, test: Any, device: torch.device, batch: int = 500) -> float:
    """Accuracy (fraction) of ``model`` on the whole test split, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), batch):
            inputs, labels = test.batch(range(i, min(i + batch, len(test))))
            correct += int((model(inputs.to(device)).argmax(1).cpu() == labels).sum())
    model.train(was_training)
    return correct / max(len(test), 1)


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
    model_spec = ModelSpec(config.model, tuple(dataset_spec.shape), dataset_spec.num_classes, "train")
    model = build_model(model_spec, seed=config.seed, device=device)
    names = [n for n, _ in model.named_parameters()]
    compressor = create(config.defense_spec())
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
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
        state.load_state_dict(_to_device(checkpoint["ranks"][rank]["hook"], device))
        _set_rng_state(checkpoint["ranks"][rank]["rng"], device)
        start_epoch, global_step = int(checkpoint["epoch"]), int(checkpoint["step"])
        history = list(checkpoint["epochs"])

    fail = _fail_at()
    progress = _Progress(rank == 0, config.epochs, steps_per_epoch, start_epoch)
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
                    compressor_before.load_state_dict(_to_cpu(clone_state(compressor.state_dict())))
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
            acc = torch.tensor([_evaluate(model, test, device) if rank == 0 else 0.0], dtype=torch.float64, device=device)
            dist.broadcast(acc, src=0)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": float(stats[0] / stats[1]),
                    "test_accuracy": float(acc[0]),
                    "bytes_sent_per_worker": state.bytes_sent - bytes_before,
                    "payload_bytes_per_worker": state.payload_bytes - payload_before,
                    "steps": steps_per_epoch,
                    "seconds": seconds,
                    "eval_seconds": time.perf_counter() - t1,
                }
            )
            _save_checkpoint(config, rank, world_size, device, model, optimizer, state, epoch + 1, global_step, history)
            if rank == 0:
                write_json_atomic(config.out / METRICS_FILE, _metrics(config, compressor, world_size, backend, history))
                progress.epoch_done(history[-1])
    finally:
        progress.close()


def _save_checkpoint(config, rank, world_size, device, model, optimizer, state, epoch, step, history) -> None:  # noqa: ANN001
    mine = {"hook": _to_cpu(state.state_dict()), "rng": _rng_state(device)}
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    # every rank's error feedback is its own, so rank 0 collects them all into one file
    dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return
    payload = {
        "format": "gia-bench-train-checkpoint",
        "version": 1,
        "epoch": epoch,
        "step": step,
        "world_size": world_size,
        "defense": state.compressor.spec,
        "model": _to_cpu(model.state_dict()),
        "optimizer": _to_cpu(optimizer.state_dict()),
        "ranks": gathered,
        "epochs": history,
    }
    _atomic_write_bytes(config.out / CHECKPOINT_FILE, lambda tmp: torch.save(payload, tmp))


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


class _Progress:
    """Rank 0's rich progress bar (only on a terminal; elsewhere one line per epoch)."""

    def __init__(self, enabled: bool, epochs: int, steps: int, start_epoch: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.rank0 = enabled
        self.enabled = enabled and self.console.is_terminal
        self.epochs = epochs
        self.bar = None
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=epochs * steps, completed=start_epoch * steps, loss=0.0)

    def step(self, epoch: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"epoch {epoch + 1}/{self.epochs}", loss=loss)

    def epoch_done(self, row: dict) -> None:
        if self.rank0:
            self.console.print(
                f"epoch {row['epoch']}/{self.epochs}: loss {row['train_loss']:.4f}"
                f"  test acc {100 * row['test_accuracy']:.2f}%  {row['bytes_sent_per_worker']:,} B/worker"
                f"  {row['seconds']:.1f} s",
                highlight=False,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- the launcher --------------------------------------------------------------------------------


def _checkpoint_note(out: Path) -> str:
    path = out / CHECKPOINT_FILE
    if not path.exists():
        return "no checkpoint was written yet"
    try:
        epoch = load_checkpoint(path)["epoch"]
    except GiaBenchError:
        return f"{path} could not be read"
    return f"last checkpoint {path} (epoch {epoch}) is intact"


def launch(config: TrainConfig, fork: bool = False) -> dict[str, Any]:
    """Run training with ``nproc_per_node`` workers through torchrun's elastic agent; returns metrics.json.

    Workers are ``python -m gia_bench.train CONFIG`` processes, as torchrun starts
    them. ``fork=True`` forks this process instead (same :func:`run_worker`; saves
    the seconds each fresh interpreter spends importing torch, which matters for
    short CPU runs such as tests; not with CUDA, which does not survive a fork).

    Raises :class:`TrainError` with one line (which worker, its exit code, the last
    checkpoint) when a worker fails.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config.validate()
    out = config.out
    if not config.resume and ((out / METRICS_FILE).exists() or (out / CHECKPOINT_FILE).exists()):
        raise ConfigError(f"--out {out}: already holds a run; pass --resume to continue it or choose another folder")
    if config.resume and (out / CHECKPOINT_FILE).exists():
        ck = load_checkpoint(out / CHECKPOINT_FILE)
        if ck.get("format") != "gia-bench-train-checkpoint":
            raise ConfigError(f"{out / CHECKPOINT_FILE}: not a gia-bench training checkpoint")
        from gia_bench.defenses import create

        spec = create(config.defense_spec()).spec
        if ck["defense"] != spec:
            raise ConfigError(f"--resume: {out / CHECKPOINT_FILE} was trained with {ck['defense']!r}, not {spec!r}")
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / CONFIG_FILE
    write_json_atomic(config_path, config.to_json())

    min_nodes, max_nodes = _nnodes(config.nnodes)
    standalone = max_nodes == 1 and not config.rdzv_endpoint
    launch_config = LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=config.nproc_per_node,
        run_id=config.rdzv_id or (uuid.uuid4().hex if standalone else "gia-bench-train"),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if standalone else str(config.rdzv_endpoint),
        max_restarts=0,
        monitor_interval=0.1,
        start_method="fork" if fork else "spawn",
    )
    # our own one-line TrainError says which worker failed; the agent's log lines would repeat it
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    threads = str(config.threads_per_worker)
    saved_env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = threads  # workers inherit it; torch's launcher would print a warning otherwise
    try:
        if fork:
            if torch.cuda.is_initialized():
                raise ConfigError("launch(fork=True): CUDA is already initialised in this process; use fork=False")
            elastic_launch(launch_config, _forked_worker)(str(config_path))
        else:
            elastic_launch(launch_config, sys.executable)("-u", "-m", "gia_bench.train", str(config_path))
    except ChildFailedError as exc:
        # The root cause: a worker that failed on its own, not one that lost a peer (exit 75) or
        # that the agent terminated (SIGTERM) after the first failure; then the earliest.
        def collateral(f) -> bool:
            return f.exitcode in (PEER_LOST_EXIT_CODE, -signal.SIGTERM)

        causes = {r: f for r, f in exc.failures.items() if not collateral(f)}
        if not causes:
            lost = ", ".join(map(str, sorted(exc.failures)))
            raise TrainError(
                f"worker rank(s) {lost} lost a peer in a collective or were stopped after another worker"
                f" failed; {_checkpoint_note(out)}"
            ) from None
        rank, failure = min(causes.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        how = (
            f"was killed by signal {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        )
        raise TrainError(f"worker rank {rank} {how}; {_checkpoint_note(out)}") from None
    finally:
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env
    try:
        return json.loads((out / METRICS_FILE).read_text())
    except FileNotFoundError:
        raise TrainError(f"{out / METRICS_FILE}: the workers finished without writing metrics") from None


def _forked_worker(config_path: str) -> None:
    run_worker(TrainConfig.from_json(json.loads(Path(config_path).read_text())))


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m gia_bench.train CONFIG.json`` (started by :func:`launch`)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m gia_bench.train CONFIG.json  (started by gia-bench train / torchrun)")
    config = TrainConfig.from_json(json.loads(Path(args[0]).read_text()))
    record(run_worker)(config)


if __name__ == "__main__":
    main()
