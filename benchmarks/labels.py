"""Batch label recovery: label-count accuracy and exact-multiset rate per model x batch size x strategy.

Every batch is ``--batches`` seeded batches of the ``--dataset`` train split (repeated labels
allowed, as they come), its gradient captured in memory (train mode, no compression) on an
untrained model seeded per batch, or on a model trained for ``--train-steps`` plain SGD steps
(a trained-model data point). Each strategy sees only the record (what a server observes).

* ``label_count_accuracy``: mean over batches of sum_c min(k̂_c, k_c) / B (the share of the
  batch's labels recovered as a multiset; iLRG's "LnAcc" up to the per-class vs per-image
  normalisation);
* ``exact_multiset_rate``: share of batches whose whole multiset is right;
* ``seconds``: mean inference time per batch (this machine; compare rows, not machines).

    .venv/bin/python benchmarks/labels.py                       # ResNet-18 and ConvNet, B = 8, 32
    .venv/bin/python benchmarks/labels.py --models convnet:width=16 --batches 4 --batch-sizes 32
    .venv/bin/python benchmarks/labels.py --train-steps 300      # a trained model
    .venv/bin/python benchmarks/labels.py --local-steps 5 --local-lr 0.05   # FedAvg updates

prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from gia_bench.attacks.labels import infer_labels
from gia_bench.attacks.matching import attack_model
from gia_bench.capture import batch_indices, capture_batch
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.fedavg import LocalTraining
from gia_bench.models import ModelSpec, build_model


def train(model: torch.nn.Module, data, steps: int, lr: float, batch: int, seed: int) -> float:
    """``steps`` plain SGD steps (mean cross-entropy) on random batches; returns the last batch's accuracy."""
    gen = torch.Generator().manual_seed(seed + 1000)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    acc = float("nan")
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=gen).tolist()
        x, y = data.batch(idx)
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = float((out.argmax(1) == y).float().mean())
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--models", default="resnet18,convnet", help="comma-separated model specs")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--strategies", default="bias-corrected,ilrg,llg,mean-embedding,mean-embedding-eb")
    parser.add_argument("--batches", type=int, default=10, help="batches per model x batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="train", choices=("train", "eval"))
    parser.add_argument("--train-steps", type=int, default=0, help="SGD steps before capture (0: untrained)")
    parser.add_argument("--train-lr", type=float, default=0.05)
    parser.add_argument("--local-steps", type=int, default=1, help="FedAvg local steps of the captured update")
    parser.add_argument("--local-lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset, split="train")
    spec = data.spec
    strategies = args.strategies.split(",")
    rows = []
    for model_name in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            stats = {s: {"acc": [], "exact": 0, "seconds": 0.0} for s in strategies}
            train_acc = []
            for i, indices in enumerate(batch_indices(len(data), batch, args.batches, args.seed)):
                ms = ModelSpec(model_name, spec.shape, spec.num_classes, args.mode)
                net = build_model(ms, seed=args.seed + i)
                if args.train_steps:
                    train_acc.append(train(net, data, args.train_steps, args.train_lr, 64, args.seed + i))
                    net.train(args.mode == "train")
                x, y = data.batch(indices)
                local = LocalTraining(args.local_steps, args.local_lr)
                record, truth = capture_batch(net, ms, spec, x, y, create_defense("none"), f"b{i}", local=local)
                model = attack_model(record, "cpu")
                true = torch.bincount(truth.labels, minlength=spec.num_classes)
                for s in strategies:
                    t0 = time.perf_counter()
                    _, labels = infer_labels(record, model, s, torch.Generator().manual_seed(args.seed))
                    stats[s]["seconds"] += time.perf_counter() - t0
                    got = torch.bincount(labels, minlength=spec.num_classes)
                    stats[s]["acc"].append(float(torch.minimum(got, true).sum()) / batch)
                    stats[s]["exact"] += int(torch.equal(got, true))
            for s in strategies:
                n = len(stats[s]["acc"])
                rows.append({
                    "model": model_name, "batch_size": batch, "strategy": s, "batches": n,
                    "label_count_accuracy": round(sum(stats[s]["acc"]) / n, 4),
                    "worst_batch": round(min(stats[s]["acc"]), 4),
                    "exact_multiset_rate": round(stats[s]["exact"] / n, 4),
                    "seconds": round(stats[s]["seconds"] / n, 3),
                    **({"trained_batch_accuracy": round(sum(train_acc) / len(train_acc), 3)} if train_acc else {}),
                })
                print(json.dumps(rows[-1]), flush=True, file=sys.stderr)
    print(json.dumps({
        "benchmark": "labels",
        "dataset": args.dataset,
        "classes": spec.num_classes,
        "mode": args.mode,
        "train_steps": args.train_steps,
        "local_steps": args.local_steps,
        "local_lr": args.local_lr if args.local_steps > 1 else None,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
