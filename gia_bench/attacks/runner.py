"""Run one attack on one saved record and write its result (the library side of ``gia-bench attack``).

Layout, for each record and each (attack, view)::

    OUT/<record-id>/<attack-dir>/result.json              (schema below, written last, atomically)
    OUT/<record-id>/<attack-dir>/reconstruction.png       reconstructions (top row), originals under them
    OUT/<record-id>/<attack-dir>/reconstruction.safetensors   "reconstruction" (B,C,H,W in [0,1]), "original"

``<attack-dir>`` is ``<slug>-<view>``: the attack's registry name when it runs with its
defaults (``dlg-naive``), else the name plus ``_key-value`` for every parameter that
differs from the default (``ig_iterations-2000-aware``); see :attr:`Attack.slug`.

The attack runs first and never sees the truth; only afterwards, if a truth file lies
beside the record, is it opened to score the reconstruction with
:func:`gia_bench.metrics.score_batch` (Hungarian pairing). The saved reconstruction and
``labels_inferred`` are then reordered so that index i pairs with original i.
A result that exists already is kept (runs are resumable).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from gia_bench.attacks.base import Attack, Progress, Reconstruction, create
from gia_bench.attacks.views import RESIDUAL
from gia_bench.errors import GiaBenchError
from gia_bench.records import GradientRecord, Truth, truth_path

RESULT_SCHEMA = 1


def attack_dirname(attack: Attack, view: str) -> str:
    """``<slug>-<view>``, e.g. ``dlg-naive`` or ``ig_iterations-2000-aware``."""
    return f"{attack.slug}-{view}"


def result_dir(out_root: Path, record_id: str, attack: Attack, view: str) -> Path:
    """Where ``run_attack`` writes the result of ``attack`` in ``view`` on record ``record_id``."""
    return Path(out_root) / _safe_name(record_id) / attack_dirname(attack, view)


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GiaBenchError(f"--device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GiaBenchError(f"--device {device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise GiaBenchError(f"--device {device!r}: only cpu and cuda are supported")
    return dev


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip(".") or "record"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tile(images01: torch.Tensor, scale: int) -> np.ndarray:
    """(B, C, H, W) in [0, 1] -> one uint8 row of tiles, 2 px gaps, each upscaled by ``scale``."""
    b, c, h, w = images01.shape
    gap = 2
    row = np.full((h * scale, b * (w * scale + gap) - gap, 3), 255, dtype=np.uint8)
    for i in range(b):
        img = images01[i].detach().cpu().float()
        img = img.expand(3, h, w) if c == 1 else img[:3]
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
        x0 = i * (w * scale + gap)
        row[:, x0 : x0 + w * scale] = arr
    return row


def save_grid(path: Path, reconstruction01: torch.Tensor, original01: torch.Tensor | None) -> None:
    """Reconstructions in the top row, the originals (when known) under them, as a PNG."""
    h = reconstruction01.shape[-2]
    scale = max(1, math.ceil(64 / h))
    rows = [_tile(reconstruction01, scale)]
    if original01 is not None:
        rows += [np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8), _tile(original01, scale)]
    grid = np.concatenate(rows, axis=0)
    _atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def _scores(record: GradientRecord, rec: Reconstruction, truth: Truth, lpips_net: str, lpips_weights: Path | None):
    from gia_bench.metrics import get_lpips, score_batch

    spec = record.meta.dataset
    rec01 = spec.denormalize(rec.inputs).clamp(0, 1)
    orig01 = spec.denormalize(truth.inputs.to(torch.float32)).clamp(0, 1)
    scores = score_batch(rec01, orig01, rec.labels, truth.labels, lpips=get_lpips(lpips_net, lpips_weights))
    return scores, rec01, orig01


def run_attack(
    record_path: Path,
    attack_spec: str,
    view: str,
    out_root: Path,
    seed: int = 0,
    device: str = "cpu",
    lpips_net: str = "alex",
    lpips_weights: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Attack the record at ``record_path``, score it if a truth file is beside it, write the result.

    Returns the path of ``result.json``; if it exists already nothing is recomputed.
    """
    record_path = Path(record_path)
    attack = create(attack_spec)
    attack.check_view(view)
    dev = resolve_device(device)
    record = GradientRecord.load(record_path)
    out_dir = result_dir(out_root, record.record_id, attack, view)
    result_path = out_dir / "result.json"
    if result_path.exists():
        return result_path

    tpath = truth_path(record_path)
    if view == "oracle":
        # the evaluation side, not the attack, reads the worker's private residual: an upper bound
        if not tpath.exists():
            raise GiaBenchError(f"--view oracle: {record_path} has no truth file {tpath.name} to read the residual from")
        record = record.with_private(Truth.load(tpath))

    generator = torch.Generator(device=dev)
    generator.manual_seed(seed)
    start = time.perf_counter()
    rec = attack.run(record, view, generator, progress, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start

    # The attack has returned: only now may the truth be read, to score.
    truth = Truth.load(tpath) if tpath.exists() else None
    metrics: dict[str, Any] | None = None
    spec = record.meta.dataset
    labels = rec.labels
    original01 = None
    reconstruction01 = spec.denormalize(rec.inputs).clamp(0, 1)
    if truth is not None:
        scores, reconstruction01, original01 = _scores(record, rec, truth, lpips_net, lpips_weights)
        order = list(scores.matching)
        reconstruction01, labels = reconstruction01[order], labels[order]
        metrics = scores.to_json()

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"reconstruction": reconstruction01.contiguous()}
    if original01 is not None:
        tensors["original"] = original01.contiguous()
    _atomic_write(out_dir / "reconstruction.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    save_grid(out_dir / "reconstruction.png", reconstruction01, original01)

    images = metrics["images"] if metrics else None
    result = {
        "schema": RESULT_SCHEMA,
        "kind": "attack_result",
        "record_id": record.record_id,
        "record": str(record_path),
        "dataset": spec.name,
        "model": record.meta.model.spec,
        "defense": record.meta.defense,
        "attack": attack.spec,
        "view": view,
        "threat": {
            "model": "white-box",
            "batch_size_known": True,
            "labels": f"inferred ({rec.label_strategy})",
            "compressor_known": view in ("aware", "oracle"),
            "public_state_used": list(rec.public_state_used),
            "observed": rec.observed,
            **({"update": rec.update} if rec.update else {}),
            "residual": RESIDUAL.get(view, "not modelled"),
            "upper_bound": view == "oracle",
        },
        "step": record.meta.step,
        "source": record.meta.extra.get("source", "capture"),
        "bytes": record.meta.bytes_sent,
        "bytes_fp32": sum(int(s.numel()) * 4 for s in record.param_shapes),
        "batch_size": record.meta.batch_size,
        "labels_inferred": [int(v) for v in labels],
        "labels_true": [int(v) for v in truth.labels] if truth is not None else None,
        "seconds": seconds,
        "iterations": rec.iterations,
        "final_loss": rec.final_loss,
        "seed": seed,
        "device": str(dev),
        "metrics": metrics,
        "ssim": [im["ssim"] for im in images] if images else None,
        "psnr": [im["psnr"] for im in images] if images else None,
        "lpips": [im["lpips"] for im in images] if images else None,
        "label_accuracy": metrics["label_accuracy"] if metrics else None,
        "lpips_reason": metrics["lpips_reason"] if metrics else None,
        "extra": rec.extra,
    }
    text = json.dumps(result, indent=2)
    _atomic_write(result_path, lambda tmp: tmp.write_text(text + "\n"))
    return result_path
