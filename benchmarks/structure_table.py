"""The README's structure-aware table: naive/aware matching, ``feature`` and ``analytic`` per defense.

Records are captured with :func:`gia_bench.capture.capture` (``gia-bench capture``) on the
embedded ``photos`` and attacked with :func:`gia_bench.evaluate.evaluate` (``gia-bench
attack``), the same calls a user makes; the truth file beside each record scores it.
Per cell (model x defense x batch size): ``--records`` records (B = 1: that many images;
B = 4: that many batches), each attacked by

* ``ig`` in the naive and the aware view at a modest budget (``--ig``),
* ``feature`` (aware view, ``--feature``) and ``analytic`` (aware view, defaults).

An attack that refuses a record (no exact layer, no fully connected first layer, no aware
view) is reported as ``skip: reason``. Models run in the order given, LeNet first, so that
a run cut short has the small models' rows; every finished cell is appended to ``--jsonl``
at once. At the end one JSON object goes to stdout and the markdown table to ``--markdown``.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/structure_table.py \\
        --jsonl runs/structure.jsonl --markdown runs/structure.md > runs/structure.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gia_bench.attacks import AttackError
from gia_bench.capture import CaptureConfig, capture
from gia_bench.errors import GiaBenchError
from gia_bench.evaluate import evaluate

MODELS = ("lenet", "mlp", "convnet:width=16", "resnet18")
#: the defenses some layer gets through exactly first, so that a run cut short has those rows
DEFENSES = (
    "none", "powersgd:rank=4", "lqsgd:rank=4", "powersgd:rank=1", "lqsgd:rank=1", "topk:ratio=0.1",
    "topk:ratio=0.01", "qsgd", "signsgd", "rcfed", "mixedprec", "tq",
)  # fmt: skip
BATCH_SIZES = (1, 4)
#: modest, stated budgets: the whole table in about an hour on one busy core
IG = "ig:iterations=100,restarts=1"
FEATURE = "feature:iterations=300,restarts=1"
ANALYTIC = "analytic"
#: the deep models cost 10-30x LeNet per step (ConvNet B = 4: 130 s for IG's 200 steps on a busy core):
#: half (ConvNet) and a fifth (ResNet-18) of the budget there, stated in the table
DEEP = {
    "convnet:width=16": ("ig:iterations=50,restarts=1", "feature:iterations=150,restarts=1,refine=20"),
    "resnet18": ("ig:iterations=20,restarts=1", "feature:iterations=60,restarts=1,refine=10"),
}
COLUMNS = (("ig", "naive"), ("ig", "aware"), ("feature", "aware"), ("analytic", "aware"))


def attack_cell(record: Path, spec: str, view: str, out: Path, seed: int) -> dict:
    """Mean/min PSNR of one attack on one record, or the attack's own reason for refusing it."""
    try:
        result = evaluate(record, spec, view, out, seed=seed).result
    except (AttackError, GiaBenchError) as exc:
        return {"skip": str(exc).splitlines()[0]}
    psnr = [float(im.psnr) for im in result.scores.images]
    return {"psnr": psnr, "seconds": round(result.seconds, 2)}


def run_cell(model: str, defense: str, batch: int, args: argparse.Namespace, work: Path) -> dict:
    ig, feature = DEEP.get(model, (args.ig, args.feature))
    rec_dir = work / "records" / f"{model}-{defense}-{batch}".replace(":", "_")
    # B = 1: --records images; B > 1: enough batches for --records images (one batch of 4 for 2)
    paths = capture(CaptureConfig("photos", model, defense, batch, -(-args.records // batch), args.seed, rec_dir))
    cell: dict = {"model": model, "defense": defense, "batch_size": batch, "budgets": {"ig": ig, "feature": feature}}
    for (name, view), spec in zip(COLUMNS, (ig, ig, feature, ANALYTIC)):
        # one results folder per cell: records of B = 1 and B = 4 share ids ("photos-lenet-0000")
        runs = [attack_cell(p, spec, view, work / "runs" / rec_dir.name, args.seed) for p in paths]
        done = [r for r in runs if "psnr" in r]
        key = f"{name} {view}"
        if not done:
            cell[key] = {"skip": runs[0]["skip"]}
            continue
        psnr = [p for r in done for p in r["psnr"]]
        cell[key] = {"mean_psnr": _value(sum(psnr) / len(psnr)), "min_psnr": _value(min(psnr)),
                     "images": len(psnr), "seconds": round(sum(r["seconds"] for r in done), 1)}  # fmt: skip
        if len(done) < len(runs):
            cell[key]["skipped_records"] = len(runs) - len(done)
    return cell


def _value(psnr: float) -> float | str:
    """PSNR to one decimal; an exact reconstruction (infinite PSNR) as "inf", which JSON can carry."""
    return round(psnr, 1) if math.isfinite(psnr) else "inf"


def _cell_text(entry: dict) -> str:
    mean, low = (v if isinstance(v, str) else f"{v:.1f}" for v in (entry["mean_psnr"], entry["min_psnr"]))
    return f"{mean} ({low})"


def markdown(cells: list[dict]) -> str:
    """One row per (model, B, defense): mean PSNR (min) per attack, ``skip`` where it refused."""
    head = "| model | B | defense | " + " | ".join(f"{a} ({v})" for a, v in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    notes: dict[str, int] = {}
    for c in cells:
        row = [c["model"], str(c["batch_size"]), f"`{c['defense']}`"]
        for a, v in COLUMNS:
            entry = c[f"{a} {v}"]
            if "skip" in entry:
                reason = entry["skip"]
                n = notes.setdefault(_short(reason), len(notes) + 1)
                row.append(f"skip [{n}]")
            else:
                row.append(_cell_text(entry))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"[{n}] {reason}" for reason, n in notes.items()]
    budgets: dict[str, list[str]] = {}
    for c in cells:
        key = f"`{c['budgets']['ig']}` (naive, aware), `{c['budgets']['feature']}`"
        if c["model"] not in budgets.setdefault(key, []):
            budgets[key].append(c["model"])
    lines += ["", "Budgets: " + "; ".join(f"{', '.join(m)}: {b}" for b, m in budgets.items()) + "."]
    return "\n".join(lines) + "\n"


def _short(reason: str) -> str:
    """A skip reason without the record id, so equal reasons share one footnote."""
    if reason.startswith("record "):
        reason = reason.split(": ", 1)[-1]
    reason = re.sub(r" \(aware view, defense '[^']*'\)", "", reason)
    if re.search(r"defense '[\w-]+' sends no tensor exactly", reason):  # every quantizer: one note per attack
        reason = reason.split(":")[0] + ": the defense sends no tensor exactly (quantized, noisy or coded)"
    return reason if len(reason) <= 240 else reason[:237] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    parser.add_argument("--records", type=int, default=2,
                        help="images per cell (B = 1: records; B > 1: batches for as many images)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="capture and attack seed")
    parser.add_argument("--ig", default=IG, help="matching attack (naive and aware)")
    parser.add_argument("--feature", default=FEATURE)
    parser.add_argument("--jsonl", type=Path, help="append each finished cell here as it finishes")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here")
    parser.add_argument("--work", type=Path, help="records and results (default: a temporary folder)")
    parser.add_argument("--render", type=Path, nargs="+", help="only print the markdown of these --jsonl files' cells")
    args = parser.parse_args()
    if args.render:  # runs split over several processes (models), or cut short: the cells that finished
        print(markdown([json.loads(line) for path in args.render for line in path.read_text().splitlines()]), end="")
        return
    start = time.perf_counter()
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for model in args.models:
            for batch in args.batch_sizes:
                for defense in args.defenses:
                    t0 = time.perf_counter()
                    cell = run_cell(model, defense, batch, args, work)
                    cell["seconds"] = round(time.perf_counter() - t0, 1)
                    cells.append(cell)
                    print(json.dumps(cell), file=sys.stderr, flush=True)
                    if args.jsonl:
                        with args.jsonl.open("a") as f:
                            f.write(json.dumps(cell) + "\n")
    table = markdown(cells)
    if args.markdown:
        args.markdown.write_text(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "benchmark": "structure_table", "dataset": "photos", "seed": args.seed, "records_per_cell": args.records,
        "commit": commit, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "seconds": round(time.perf_counter() - start, 1),
        "cells": cells, "markdown": table,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
