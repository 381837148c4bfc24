"""SGD vs QCMD adagrad vs QRDA adagrad (Xu et al., TPAMI 2022) on digits: accuracy, sparsity, bytes, leakage.

1. Training (2 gloo workers, :func:`gia_bench.train.launch`): for each optimizer, with the
   ``tq`` defense (threshold quantization) and, for reference, SGD on uncompressed
   gradients: final test accuracy, the model's sparsity (fraction of exact zeros) and
   bytes per worker per step.
2. Leakage at demo size: a record of one digit per (defense) through ``none`` and ``tq``
   attacked with DLG (naive and aware views), PSNR / SSIM.

    .venv/bin/python benchmarks/optimizers.py [--epochs 3] [--l1 1e-4] [--skip-leakage]

prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def train_rows(args: argparse.Namespace, out: Path) -> list[dict]:
    from gia_bench.train import TrainConfig, launch

    runs = [
        ("sgd", "none", 0.0, args.lr_sgd),
        ("sgd", args.tq, 0.0, args.lr_sgd),
        ("qcmd-adagrad", args.tq, args.l1, args.lr_adagrad),
        ("qrda-adagrad", args.tq, args.l1, args.lr_adagrad),
    ]
    rows = []
    for optimizer, defense, l1, lr in runs:
        name = f"{optimizer}-{defense}".replace(":", "_").replace(",", "_").replace("=", "")
        config = TrainConfig(
            out=out / name, dataset=args.dataset, model=args.model, defense=defense, nproc_per_node=2,
            epochs=args.epochs, batch_size=args.batch_size, lr=lr, momentum=0.9 if optimizer == "sgd" else 0.0,
            optimizer=optimizer, l1=l1, seed=args.seed,
        )
        metrics = launch(config, fork=True)
        last = metrics["epochs"][-1]
        rows.append(
            {
                "optimizer": optimizer,
                "defense": defense,
                "l1": l1,
                "lr": lr,
                "test_accuracy": last["test_accuracy"],
                "test_examples": last.get("test_examples"),
                "sparsity": last.get("sparsity"),
                "bytes_per_step": metrics["totals"]["bytes_per_step"],
                "accuracy_per_epoch": [e["test_accuracy"] for e in metrics["epochs"]],
            }
        )
    return rows


def leakage_rows(args: argparse.Namespace, out: Path) -> list[dict]:
    """DLG on ``none`` and ``tq`` records, through the CLI users script against; scores from result.json."""
    import subprocess
    import sys

    from gia_bench.capture import CaptureConfig, capture

    rows = []
    for defense in ("none", args.tq):
        slug = defense.replace(":", "_").replace(",", "_").replace("=", "")
        paths = capture(CaptureConfig("digits", "lenet", defense, 1, args.images, args.seed, out / "records" / slug))
        for view in ("naive", "aware"):
            results = out / "results" / slug / view
            cmd = [sys.executable, "-m", "gia_bench", "attack", *map(str, paths), "--attack", args.attack,
                   "--view", view, "--out", str(results)]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            scores = [json.loads(p.read_text()) for p in sorted(results.rglob("result.json"))]
            rows.append(
                {
                    "defense": defense,
                    "view": view,
                    "attack": args.attack,
                    "psnr": [v for r in scores for v in (r.get("psnr") or [])],
                    "ssim": [v for r in scores for v in (r.get("ssim") or [])],
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="convnet:width=16")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr-sgd", type=float, default=0.02)
    ap.add_argument("--lr-adagrad", type=float, default=0.01)
    ap.add_argument("--l1", type=float, default=1e-4)
    ap.add_argument("--tq", default="tq:threshold=0.1,bits=4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=2, help="digits attacked per defense and view")
    ap.add_argument("--attack", default="dlg:iterations=100,line_search=true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-leakage", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_training:
            result["training"] = train_rows(args, Path(tmp))
        if not args.skip_leakage:
            result["leakage"] = leakage_rows(args, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
