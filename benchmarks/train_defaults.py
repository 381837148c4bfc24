"""Benchmark: does ``gia-bench train`` train with its defaults? Prints JSON.

For each model, ``none`` is trained with every :class:`~gia_bench.train.TrainConfig`
default (digits, 3 epochs, batch 64 per worker, lr = 0.1 x global batch / 256 with a
linear warm-up over 5% of the steps then cosine decay, momentum 0.9, weight decay 1e-4)
except ``--nproc`` and the seeds. Per epoch it reports the test accuracy and its binomial
standard error ``sqrt(p (1 - p) / n)`` over the ``n`` test images; with several seeds,
also their mean and the standard error of the mean across seeds.

    .venv/bin/python benchmarks/train_defaults.py                          # 1 worker, seed 0
    .venv/bin/python benchmarks/train_defaults.py --nproc 2 --seeds 0 1 2

Target (issue 12): >= 90% test accuracy within 3 epochs for ``convnet:width=16``,
``resnet18`` and ``mlp``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gia_bench.train import TrainConfig, launch


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent test images."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "convnet:width=16", "resnet18"])
    parser.add_argument("--defense", default="none")
    parser.add_argument("--nproc", type=int, default=1, help="gloo CPU workers (default 1, the trainer's default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            runs = []
            for seed in args.seeds:
                out = Path(tmp) / f"{model.replace(':', '_')}-{seed}"
                config = TrainConfig(
                    out=out, model=model, defense=args.defense, seed=seed, nproc_per_node=args.nproc,
                    backend="gloo", device="cpu", threads_per_worker=args.threads,
                )
                t0 = time.perf_counter()
                metrics = launch(config, fork=True)
                seconds = time.perf_counter() - t0
                epochs = [
                    {
                        "epoch": e["epoch"],
                        "test_accuracy": e["test_accuracy"],
                        "se": binomial_se(e["test_accuracy"], e["test_examples"]),
                        "train_loss": e["train_loss"],
                    }
                    for e in metrics["epochs"]
                ]
                runs.append({"seed": seed, "epochs": epochs, "lr": metrics["lr"], "seconds": seconds,
                             "test_examples": metrics["epochs"][-1]["test_examples"]})
                print(json.dumps({"model": model, **runs[-1]}), file=sys.stderr, flush=True)
            final = [r["epochs"][-1]["test_accuracy"] for r in runs]
            row = {
                "model": model,
                "defense": args.defense,
                "workers": args.nproc,
                "global_batch": 64 * args.nproc,
                "peak_lr": runs[0]["lr"]["peak"],
                "warmup_steps": runs[0]["lr"]["warmup_steps"],
                "final_accuracy_mean": statistics.fmean(final),
                # one seed: the binomial standard error; several: the spread across seeds
                "final_accuracy_se": (
                    statistics.stdev(final) / math.sqrt(len(final)) if len(final) > 1 else runs[0]["epochs"][-1]["se"]
                ),
                "se_kind": "across seeds" if len(final) > 1 else "binomial, n = test images",
                "reaches_90": all(any(e["test_accuracy"] >= 0.9 for e in r["epochs"]) for r in runs),
                "runs": runs,
            }
            rows.append(row)
    result = {"benchmark": "train_defaults", "dataset": "digits", "epochs": 3, "rows": rows}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
