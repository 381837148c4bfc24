"""Benchmark of the DDP hook and the trainer; prints JSON.

1. Step time and bytes per step, measured side by side in one run (interleaved rounds,
   median): DDP's own all-reduce, our hook with ``powersgd`` and ``lqsgd``, and
   PyTorch's ``powerSGD_hook`` at the same rank (ResNet-18, 32x32 inputs, one DDP bucket
   so that PyTorch's hook is safe on gloo, compression from step 2 on both sides).
2. Test accuracy after N epochs on digits for none / topk / qsgd / powersgd / lqsgd,
   trained with :func:`gia_bench.train.launch`.

    .venv/bin/python benchmarks/train.py                       # 2 gloo CPU processes
    .venv/bin/python benchmarks/train.py --backend nccl --device cuda --nproc 1

Targets: our PowerSGD step time <= 1.05x PyTorch's; LQ-SGD <= 1.15x PyTorch's PowerSGD
time with <= 30% of its bytes; LQ-SGD accuracy within 1 point of uncompressed.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _variants(rank: int) -> dict[str, str]:
    return {
        "ddp_allreduce": "",
        "torch_powerSGD_hook": "",
        "ours_powersgd": f"powersgd:rank={rank},start_iter=2",
        "ours_lqsgd": f"lqsgd:rank={rank},start_iter=2",
    }


def _step_worker(rank: int, world: int, store: str, args: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(args.threads)
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gia_bench.defenses.ddp import make_hook
    from gia_bench.models import ModelSpec, build_model

    # several ranks may share one GPU (nccl refuses that; gloo with CUDA tensors does not)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    spec = ModelSpec("resnet18", (3, 32, 32), 10)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    runs: dict[str, Any] = {}
    for name, defense in _variants(args.rank).items():
        model = build_model(spec, seed=0, device=device)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=100)
        state = None
        if name == "torch_powerSGD_hook":
            state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=args.rank, start_powerSGD_iter=2,
                                     min_compression_rate=2, use_error_feedback=True, warm_start=True, random_seed=0)
            ddp.register_comm_hook(state, ps.powerSGD_hook)
        elif defense:
            state, hook = make_hook(defense, ddp)
            ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        runs[name] = {"ddp": ddp, "opt": opt, "state": state, "times": [], "bytes": [], "model": model}

    def one_step(run: dict) -> tuple[float, int]:
        if run["state"] is None:  # DDP's own ring all-reduce of every fp32 gradient
            n_bytes = sum(p.numel() * p.element_size() for p in run["model"].parameters())
            before, after = 0, round(2 * (world - 1) * n_bytes / world)
        else:
            before = _bytes(run, world)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run["opt"].zero_grad(set_to_none=True)
        F.cross_entropy(run["ddp"](x), y).backward()
        run["opt"].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if run["state"] is not None:
            after = _bytes(run, world)
        return seconds, after - before

    for run in runs.values():  # warm-up: past start_iter=2 and DDP's bucket rebuild
        for _ in range(args.warmup):
            one_step(run)
    for r in range(args.rounds):
        names = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate to cancel drift
        for name in names:
            for _ in range(args.steps):
                t, b = one_step(runs[name])
                runs[name]["times"].append(t)
                runs[name]["bytes"].append(b)
    result = {name: {"times": run["times"], "bytes": run["bytes"]} for name, run in runs.items()}
    dist.barrier()
    dist.destroy_process_group()
    buf = io.BytesIO()
    torch.save(result, buf)
    out.put((rank, buf.getvalue()))
    out.close()
    out.join_thread()


def _bytes(run: dict, world: int) -> int:
    """Wire bytes per worker so far: our communicator's log, or the ring all-reduce count for PyTorch's hook."""
    state = run["state"]
    if hasattr(state, "bytes_sent"):
        return state.bytes_sent
    # PyTorch's hook counts the elements it all-reduces (P, Q, uncompressed) in total_numel_after_compression;
    # before start_powerSGD_iter it all-reduces the whole bucket, which that counter misses
    n_full = sum(p.numel() for p in run["model"].parameters())
    warm = min(state.iter, state.start_powerSGD_iter)
    numel = state.total_numel_after_compression + warm * n_full
    return round(2 * (world - 1) * 4 * numel / world)


def step_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn" if args.device == "cuda" else "fork")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_step_worker, args=(r, args.nproc, os.path.join(tmp, "s"), args, out))
                 for r in range(args.nproc)]
        for p in procs:
            p.start()
        results: dict[int, bytes] = {}
        while len(results) < len(procs):
            try:
                rank, data = out.get(timeout=5)
                results[rank] = data
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:  # a worker died (import error, OOM...): do not wait forever
                    for p in procs:
                        p.kill()
                    raise SystemExit(f"a benchmark worker exited with code {dead[0]}")
        for p in procs:
            p.join()
    r0 = torch.load(io.BytesIO(results[0]), weights_only=True)
    table = {}
    for name, run in r0.items():
        table[name] = {
            "step_seconds_median": statistics.median(run["times"]),
            "step_seconds_min": min(run["times"]),
            "bytes_per_step": statistics.median(run["bytes"]),
        }
    ref = table["torch_powerSGD_hook"]

    def ratio(a: float, b: float) -> float | None:  # None: nothing to compare (one worker sends no bytes)
        return a / b if b else None

    summary = {
        "ours_powersgd_time_ratio_vs_torch": ratio(table["ours_powersgd"]["step_seconds_median"], ref["step_seconds_median"]),
        "lqsgd_time_ratio_vs_torch_powersgd": ratio(table["ours_lqsgd"]["step_seconds_median"], ref["step_seconds_median"]),
        "lqsgd_bytes_ratio_vs_torch_powersgd": ratio(table["ours_lqsgd"]["bytes_per_step"], ref["bytes_per_step"]),
        "ours_powersgd_bytes_ratio_vs_torch": ratio(table["ours_powersgd"]["bytes_per_step"], ref["bytes_per_step"]),
    }
    return {"per_variant": table, "summary": summary}


def accuracy_benchmark(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from gia_bench.train import TrainConfig, launch

    table = {}
    from gia_bench.defenses import DEFENSES
    from gia_bench.registry import describe_params, parse_spec

    from gia_bench.study import slug

    for defense in args.defenses.split(";"):
        # PowerSGD-style compressors start after uncompressed warm-up steps (PowerSGD's start_iter)
        has_start = any(p.name == "start_iter" for p in describe_params(DEFENSES.get(parse_spec(defense).name)))
        config = TrainConfig(
            warmup_steps=args.warmup_steps if has_start and args.warmup_steps else None,
            out=out_dir / slug(defense), dataset=args.dataset, model=args.acc_model, defense=defense, epochs=args.epochs,
            batch_size=args.acc_batch_size, lr=args.lr, nproc_per_node=args.nproc, backend=args.backend,
            device=args.device, threads_per_worker=args.threads, timeout_s=600,
        )
        metrics = launch(config, fork=args.device != "cuda")
        table[metrics["defense"]] = {
            "test_accuracy_percent": 100 * metrics["totals"]["final_test_accuracy"],
            "bytes_per_step": metrics["totals"]["bytes_per_step"],
            "train_seconds": metrics["totals"]["seconds"],
            "per_epoch_accuracy_percent": [round(100 * e["test_accuracy"], 2) for e in metrics["epochs"]],
        }
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--rank", type=int, default=2, help="PowerSGD / LQ-SGD rank")
    p.add_argument("--batch-size", type=int, default=16, help="per worker, step-time part")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--acc-model", default="convnet:width=16")
    p.add_argument("--acc-batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--warmup-steps", type=int, default=20, help="uncompressed steps first, where a defense has start_iter")
    p.add_argument("--defenses", default="none;topk:ratio=0.01;qsgd;powersgd:rank=2;lqsgd:rank=2")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="keep the training runs here (default: a temp folder)")
    args = p.parse_args()
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
    }
    if not args.skip_steps:
        report["step_time_resnet18_32x32"] = step_benchmark(args)
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            report["accuracy"] = accuracy_benchmark(args, args.out or Path(tmp))
        acc = report["accuracy"]
        none = next(v for k, v in acc.items() if k == "none")
        lq = next((v for k, v in acc.items() if k.startswith("lqsgd")), None)
        if lq is not None:
            report["lqsgd_accuracy_points_vs_none"] = lq["test_accuracy_percent"] - none["test_accuracy_percent"]
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
