"""Speed of the attacks: seconds per iteration, restarts batched vs one by one, end-to-end demo runs.

Records are captured in memory from the embedded ``photos`` data set (32x32 RGB),
uncompressed, with seeded models. Rows:

* ``per_iteration``: DLG (L-BFGS, also per loss+gradient evaluation) on LeNet, and
  Inverting Gradients on ResNet-18 and ConvNet (width 64), B = 1 and B = 8, eval mode;
  the median over ``--repeats`` timed runs of ``--iterations`` steps after a warm-up run.
* ``restarts``: IG with R restarts stacked in one vmap'd forward/backward vs R runs of
  one restart (what a Python loop over restarts costs).
* ``end_to_end``: :func:`gia_bench.evaluate.run_attack` on a saved record with a truth file
  (attack + scoring + files), at the demo study's attack settings (LeNet, one ``digits``
  image; ``--demo SPEC`` to change them).

    .venv/bin/python benchmarks/attacks.py --quick

prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gia_bench.attacks import create
from gia_bench.evaluate import run_attack
from gia_bench.attacks.matching import CandidateGradients
from gia_bench.capture import capture_batch
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import GradientRecord, truth_path
from gia_bench.study import DEMO_STUDY, load_study

# The demo study's attacks, read from the study itself: DLG's LeNet on digits, one image.
DEMO = list(load_study(DEMO_STUDY).attacks)
DEMO_DATA, DEMO_MODEL = "digits", "lenet"


def make_record(
    model: str, batch: int, mode: str = "eval", pixel_space: bool = False, defense: str = "none", data: str = "photos"
):
    ds = load_dataset(data, split="train")
    spec = ds.spec
    if pixel_space:
        spec = dataclasses.replace(spec, mean=(0.0,) * 3, std=(1.0,) * 3)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:batch].tolist()
    inputs = torch.stack([spec.normalize(ds.pixels(i)) for i in idx])
    labels = torch.tensor([ds.label(i) for i in idx])
    ms = ModelSpec(model, spec.shape, spec.num_classes, mode)
    net = build_model(ms, seed=0)
    return capture_batch(net, ms, spec, inputs, labels, create_defense(defense), f"bench-{model}-{batch}".replace(":", "-"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_attack(spec: str, record: GradientRecord, device: torch.device, repeats: int) -> dict:
    """Median seconds of ``create(spec).run`` and the number of loss+gradient evaluations per run."""
    calls = [0]
    original = CandidateGradients.__call__

    def counted(self, x, y):
        calls[0] += 1
        return original(self, x, y)

    CandidateGradients.__call__ = counted  # type: ignore[method-assign]
    try:
        attack = create(spec)
        warm = create(spec.replace(f"iterations={attack.iterations}", "iterations=2"))
        warm.run(record, "naive", torch.Generator(device).manual_seed(0), device=device)
        times, evals = [], []
        for r in range(repeats):
            calls[0] = 0
            _sync(device)
            t = time.perf_counter()
            attack.run(record, "naive", torch.Generator(device).manual_seed(r), device=device)
            _sync(device)
            times.append(time.perf_counter() - t)
            evals.append(calls[0])
    finally:
        CandidateGradients.__call__ = original  # type: ignore[method-assign]
    seconds = statistics.median(times)
    n_evals = statistics.median(evals)
    return {
        "spec": spec,
        "seconds": seconds,
        "seconds_per_iteration": seconds / attack.iterations,
        "evaluations": n_evals,
        "ms_per_evaluation": 1e3 * seconds / max(n_evals, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--iterations", type=int, default=10, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 repeat")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end runs")
    parser.add_argument("--demo", action="append", default=None, help="attack spec for the end-to-end run (repeatable)")
    parser.add_argument("--only-e2e", action="store_true", help="only the end-to-end runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    its, repeats = (3, 1) if args.quick else (args.iterations, args.repeats)

    rows = []
    cases = [("dlg", "lenet", 1, "train", True)]
    cases += [("ig", m, b, "eval", False) for m in ("resnet18", "convnet") for b in (1, 8)]
    if args.only_e2e:
        cases = []
    for name, model, batch, mode, pixel in cases:
        record, _ = make_record(model, batch, mode, pixel)
        row = time_attack(f"{name}:iterations={its}", record, device, repeats)
        rows.append({"attack": name, "model": model, "batch_size": batch, "mode": mode, **row})

    restarts = []
    for model, batch in [] if args.only_e2e else [("convnet", 1), ("resnet18", 1)]:
        record, _ = make_record(model, batch)
        stacked = time_attack(f"ig:iterations={its},restarts=4", record, device, repeats)
        single = time_attack(f"ig:iterations={its},restarts=1", record, device, repeats)
        restarts.append({
            "model": model, "batch_size": batch, "restarts": 4,
            "stacked_seconds_per_iteration": stacked["seconds_per_iteration"],
            "one_by_one_seconds_per_iteration": 4 * single["seconds_per_iteration"],
            "speedup": 4 * single["seconds_per_iteration"] / stacked["seconds_per_iteration"],
        })  # fmt: skip

    e2e = []
    if not args.no_e2e:
        demo = args.demo or DEMO
        with tempfile.TemporaryDirectory() as tmp:
            for spec in demo:
                model = DEMO_MODEL
                record, truth = make_record(model, 1, "train", data=DEMO_DATA)
                path = record.save(Path(tmp) / f"{record.record_id}.safetensors")
                truth.save(truth_path(path))
                t = time.perf_counter()
                out = run_attack(path, spec, "naive", Path(tmp) / "runs", device=str(device))
                result = json.loads(out.read_text())
                e2e.append({
                    "attack": result["attack"], "model": model, "seconds_total": time.perf_counter() - t,
                    "seconds_attack": result["seconds"], "iterations": result["iterations"],
                    "psnr": result["psnr"], "ssim": result["ssim"], "label_accuracy": result["label_accuracy"],
                })  # fmt: skip

    print(json.dumps({
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "per_iteration": rows, "restarts": restarts, "end_to_end": e2e,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
