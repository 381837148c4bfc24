"""FedAvg: reconstruction quality (PSNR / SSIM) vs the client's local steps K, beside a plain reference loop.

For every image (``--images`` of the ``digits`` train split, one per record, LeNet as in
DLG, seeded) and every K in ``--steps`` (default 1, 2, 5, 10) a record holds the client's
update after K full-batch local SGD steps (``--local-lr``), for ``none`` and ``lqsgd``
(defaults). Rows per (K, defense, view):

* ``gia_bench``: the attack (``--attack``, default DLG with L-BFGS and a strong-Wolfe line
  search) through :mod:`gia_bench.attacks`: labels inferred, K steps simulated on the
  candidate (``gia_bench.fedavg.CandidateUpdates``), naive (decode) and aware (LQ-SGD's
  simulate) views;
* ``reference``: a plain hand-written multi-step inversion (Geiping et al. 2020's multi-step
  setting written from scratch: torch.optim.LBFGS on the image, K SGD steps unrolled with
  ``create_graph``, squared L2 to the decoded update), same start, same label, same
  budget (naive view only: the reference knows no compressor);
* ``floor``: PSNR / SSIM of a flat mean-colour image (what "nothing recovered" scores).

Small defaults (2 images, 30 L-BFGS steps); ``--full`` runs 8 images and 300 steps.

    .venv/bin/python benchmarks/attacks_fedavg.py --steps 1,2,5 --images 1

prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gia_bench.attacks import create
from gia_bench.capture import capture_batch
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.fedavg import LocalTraining
from gia_bench.metrics import mean_colour_floor, psnr, ssim
from gia_bench.models import ModelSpec, build_model
from gia_bench.receiver import decode_record, record_model
from gia_bench.records import GradientRecord


def reference_inversion(
    record: GradientRecord, label: torch.Tensor, x0: torch.Tensor, iterations: int, lr: float, line_search: bool
) -> torch.Tensor:
    """Hand-written multi-step inversion: L-BFGS on x so that K unrolled SGD steps give the decoded update."""
    local = record.meta.local_training()  # K = 1, whole batch, for a FedSGD record
    model = record_model(record)
    torch.func.replace_all_batch_norm_modules_(model)
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    target = [t.detach() for t in decode_record(record)]
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=lr, line_search_fn="strong_wolfe" if line_search else None)

    def update(x: torch.Tensor) -> list[torch.Tensor]:
        weights = [p.clone().requires_grad_(True) for p in params]
        total = [torch.zeros_like(p) for p in params]
        n = x.shape[0]
        b = local.local_batch(n)
        for k in range(local.steps):
            idx = [(k * b + j) % n for j in range(b)]
            out = torch.func.functional_call(model, dict(zip(names, weights)), (x[idx],))
            grads = torch.autograd.grad(F.cross_entropy(out, label[idx]), weights, create_graph=True)
            total = [t + g for t, g in zip(total, grads)]
            weights = [w - local.lr * g for w, g in zip(weights, grads)]
        return total

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(((u - t) ** 2).sum() for u, t in zip(update(x), target))
        loss.backward()
        return loss

    best, best_loss = x.detach().clone(), float("inf")
    for _ in range(iterations):
        loss = float(opt.step(closure))
        if not torch.isfinite(x).all() or not math.isfinite(loss):
            break
        if loss < best_loss:
            best, best_loss = x.detach().clone(), loss
    return best


def scores(spec, rec_inputs: torch.Tensor, truth_inputs: torch.Tensor) -> dict[str, float]:
    a = spec.denormalize(rec_inputs).clamp(0, 1)
    b = spec.denormalize(truth_inputs).clamp(0, 1)
    return {"psnr": round(psnr(a[0], b[0]), 2), "ssim": round(ssim(a[0], b[0]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,2,5,10", help="local steps K (comma-separated)")
    parser.add_argument("--local-lr", type=float, default=0.1)
    parser.add_argument("--defenses", default="none,lqsgd")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=30, help="L-BFGS steps (attack and reference)")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--full", action="store_true", help="8 images, 300 L-BFGS steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.full:
        args.images, args.iterations = 8, 300
    torch.set_num_threads(args.threads)
    attack_spec = f"dlg:iterations={args.iterations},line_search=true"
    data = load_dataset("digits", split="train")
    spec = data.spec
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: args.images].tolist()
    rows = []
    for K in (int(k) for k in args.steps.split(",")):
        for defense in args.defenses.split(","):
            views = ["naive", "aware"] if defense != "none" else ["naive"]
            per = {(v, who): [] for v in views for who in ("gia_bench", "reference")}
            floor, secs, labels_right = [], {}, []
            for i in picks:
                x, y = data.batch([i])
                ms = ModelSpec(args.model, spec.shape, spec.num_classes, "train")
                net = build_model(ms, seed=0)
                record, truth = capture_batch(
                    net, ms, spec, x, y, create_defense(defense), f"fedavg-{i}", local=LocalTraining(K, args.local_lr)
                )
                floor.append(mean_colour_floor(spec.denormalize(truth.inputs).clamp(0, 1))[0][1])
                for view in views:
                    t0 = time.perf_counter()
                    rec = create(attack_spec).run(record, view, torch.Generator().manual_seed(0))
                    secs.setdefault((view, "gia_bench"), []).append(time.perf_counter() - t0)
                    per[(view, "gia_bench")].append(scores(spec, rec.inputs, truth.inputs))
                    labels_right.append(bool(torch.equal(rec.labels, truth.labels)))
                    if view == "naive":
                        # same start as the attack's first restart (randn from the same seeded generator)
                        x0 = torch.randn((1, 1, *spec.shape), generator=torch.Generator().manual_seed(0))[0]
                        t0 = time.perf_counter()
                        ref = reference_inversion(record, rec.labels, x0, args.iterations, 1.0, True)
                        secs.setdefault((view, "reference"), []).append(time.perf_counter() - t0)
                        per[(view, "reference")].append(scores(spec, ref, truth.inputs))
            for (view, who), vals in per.items():
                if not vals:
                    continue
                rows.append({
                    "local_steps": K, "defense": defense, "view": view, "implementation": who,
                    "psnr_median": round(statistics.median(v["psnr"] for v in vals), 2),
                    "psnr_mean": round(statistics.fmean(v["psnr"] for v in vals), 2),
                    "ssim_mean": round(statistics.fmean(v["ssim"] for v in vals), 4),
                    "psnr_each": [v["psnr"] for v in vals],
                    "seconds_mean": round(statistics.fmean(secs[(view, who)]), 2),
                    "floor_psnr_mean": round(statistics.fmean(floor), 2),
                    "labels_right": sum(labels_right) / len(labels_right),
                })
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "attacks_fedavg",
        "model": args.model,
        "attack": attack_spec,
        "local_lr": args.local_lr,
        "images": args.images,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
