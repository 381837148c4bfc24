"""Bytes per step and compress + decode time of every registered compressor.

On the gradients of torchvision's plain ``resnet18(num_classes=10)`` (11,181,642
parameters in 62 tensors) and of DLG's sigmoid LeNet, for a batch of 32x32 images:
one row per model x compressor at its default spec, plus ``lqsgd:bits=8`` and
``powersgd:rank=2`` when those are registered. Bytes are what a
:class:`~gia_bench.comm.LocalCommunicator` logs for one worker's first step (the
payload of every message); times are the median over ``--repeats`` steps after a
warm-up step, of ``step`` (with message recording, as ``capture`` does) and of
``decode`` of the recorded messages (recorded messages live on the CPU, so ``decode``
runs there even with ``--device cuda``, and ``step`` includes copying them). For LQ-SGD the row also holds PowerSGD's bytes at
the same rank and the ratio between them.

    .venv/bin/python benchmarks/compressors.py --quick --table

prints one JSON object on stdout (``--table``: a Markdown table on stderr too).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import DEFENSES, create
from gia_bench.models import ModelSpec, build_model

EXTRA_SPECS = ["lqsgd:bits=8", "powersgd:rank=2"]
# Reference figures (shared/ANCHORS.md): what the ResNet-18 rows must reproduce.
ANCHORS = {"resnet18": {"params": 11_181_642, "tensors": 62, "fp32_bytes": 44_726_568, "powersgd_rank2_bytes": 330_000}}


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    # torchvision draws initial weights from the global generator; fork it to leave it untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "resnet18": lambda: _seeded(0, lambda: torchvision.models.resnet18(num_classes=10)),
    "lenet": lambda: build_model(ModelSpec("lenet", (3, 32, 32), 10), seed=0),
}


def gradients(model_name: str, batch: int, device: torch.device) -> list[torch.Tensor]:
    """The cross-entropy gradient of a seeded model on a seeded batch of 32x32 RGB images."""
    model = MODELS[model_name]().to(device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    loss = F.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_step_bytes(spec: str, grads: list[torch.Tensor]) -> int:
    comm = LocalCommunicator(record=False)
    create(spec).step([g.clone() for g in grads], comm)
    return comm.bytes_sent


def measure(spec: str, grads: list[torch.Tensor], repeats: int, device: torch.device) -> dict:
    """Bytes of the first step, then median step / decode times over ``repeats`` further steps."""
    comp = create(spec)
    shapes = [g.shape for g in grads]
    comm = LocalCommunicator(record=True)
    comp.step([g.clone() for g in grads], comm)  # first step: the bytes, and the warm-up
    row = {
        "name": spec,
        "spec": comp.spec,
        "bytes": comm.bytes_sent,
        "messages": {m.tag: m.nbytes for m in comm.messages},
    }
    step_ms, decode_ms, later_bytes = [], [], []
    for _ in range(repeats):
        inputs = [g.clone() for g in grads]
        comm = LocalCommunicator(record=True)
        _sync(device)
        t0 = time.perf_counter()
        comp.step(inputs, comm)
        _sync(device)
        t1 = time.perf_counter()
        comp.decode(messages_by_tag(comm.messages), shapes, comp.public_state())
        _sync(device)
        t2 = time.perf_counter()
        step_ms.append(1e3 * (t1 - t0))
        decode_ms.append(1e3 * (t2 - t1))
        later_bytes.append(comm.bytes_sent)
    row["step_ms"] = round(statistics.median(step_ms), 2)
    row["decode_ms"] = round(statistics.median(decode_ms), 2)
    row["step_decode_ms"] = round(statistics.median(a + b for a, b in zip(step_ms, decode_ms)), 2)
    if any(b != row["bytes"] for b in later_bytes):  # adaptive compressors (skipped rounds, ...)
        row["later_bytes_min"], row["later_bytes_max"] = min(later_bytes), max(later_bytes)
    return row


def specs_to_run() -> list[str]:
    """Every registered compressor at its default spec, then the extra specs; duplicates dropped.

    An extra spec equal to a default one takes that row's place (it names the setting asked for).
    """
    names = DEFENSES.names()
    extras = [s for s in EXTRA_SPECS if s.split(":")[0] in names]
    label: dict[str, str] = {}  # canonical spec -> how the row names it
    for spec in names:
        label.setdefault(create(spec).spec, spec)
    for spec in extras:
        label[create(spec).spec] = spec
    specs = list(dict.fromkeys(label[create(spec).spec] for spec in names + extras))
    return specs


def run(models: list[str], repeats: int, batch: int, device: torch.device) -> dict:
    result: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "batch": batch,
        "models": {},
        "rows": [],
    }
    specs = specs_to_run()
    registered = set(DEFENSES.names())
    for model_name in models:
        grads = gradients(model_name, batch, device)
        fp32 = sum(g.numel() * 4 for g in grads)
        info = {"params": sum(g.numel() for g in grads), "tensors": len(grads), "fp32_bytes": fp32}
        if model_name in ANCHORS:
            info["anchors"] = ANCHORS[model_name]
        result["models"][model_name] = info
        powersgd_bytes: dict[int, int] = {}
        for spec in specs:
            row: dict = {"model": model_name}
            try:
                row.update(measure(spec, grads, repeats, device))
            except Exception as exc:  # one broken compressor must not hide the others' figures
                row.update({"name": spec, "error": f"{type(exc).__name__}: {exc}"})
                result["rows"].append(row)
                continue
            row["fraction_of_fp32"] = row["bytes"] / fp32
            row["times_smaller"] = round(fp32 / row["bytes"], 2) if row["bytes"] else None
            comp = create(spec)
            if comp.registry_name == "lqsgd" and "powersgd" in registered and hasattr(comp, "rank"):
                rank = int(comp.rank)
                if rank not in powersgd_bytes:
                    powersgd_bytes[rank] = first_step_bytes(f"powersgd:rank={rank}", grads)
                row["powersgd_bytes_same_rank"] = powersgd_bytes[rank]
                row["ratio_to_powersgd"] = row["bytes"] / powersgd_bytes[rank]
            result["rows"].append(row)
    return result


def markdown(result: dict) -> str:
    lines = [
        "| model | compressor | bytes/step | x smaller than fp32 | step ms | decode ms | vs PowerSGD same rank |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | `{r['name']}` | error: {r['error']} | | | | |")
            continue
        vs = f"{r['ratio_to_powersgd']:.3f}" if "ratio_to_powersgd" in r else ""
        lines.append(
            f"| {r['model']} | `{r['name']}` | {r['bytes']:,} | {r['times_smaller']} | "
            f"{r['step_ms']} | {r['decode_ms']} | {vs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, batch 2 (a fast smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per compressor (median), >= 1")
    parser.add_argument("--batch", type=int, default=8, help="images per batch, >= 2 (BatchNorm in train mode)")
    parser.add_argument("--models", default="resnet18,lenet", help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--device", default="cpu", help="torch device for gradients and compressors")
    parser.add_argument("--table", action="store_true", help="also print a Markdown table on stderr")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batch = 2, 2
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.batch < 2:
        parser.error(f"--batch must be >= 2 (ResNet-18's BatchNorm in train mode), got {args.batch}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; accepted: {', '.join(MODELS)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    result = run(models, args.repeats, args.batch, device)
    print(json.dumps(result, indent=1))
    if args.table:
        print(markdown(result), file=sys.stderr)


if __name__ == "__main__":
    main()
