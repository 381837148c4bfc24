"""A small synthetic FIXTURE of attack results and training runs, for testing the reporter only.

The images are seeded noise-and-gradient patterns and the "reconstructions" are the
originals plus noise whose level depends on the defense; the SSIM/PSNR numbers are
computed from them with gia_bench.metrics, the byte counts and accuracies are made
up. None of this is a benchmark result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gia_bench.metrics import score_batch

DATASET = "photos"
MODEL = "lenet"
# defense -> (bytes sent, reconstruction noise level, training accuracy or None)
DEFENSES = {
    "none": (62_000, 0.02, 0.71),
    "topk:ratio=0.01,error_feedback=true": (1_300, 0.25, 0.64),
    "qsgd:levels=16": (9_000, 0.08, None),
}
BYTES_FP32 = 62_000
ATTACKS = ("dlg:iterations=300", "ig:iterations=1000,tv=0.0001")
VIEWS = ("naive", "aware")
BATCH = 4
SHAPE = (3, 16, 16)


def originals(gen: torch.Generator) -> torch.Tensor:
    """A batch of smooth colour images in [0, 1] (so the flat-colour floor is meaningful)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SHAPE[1]), torch.linspace(0, 1, SHAPE[2]), indexing="ij")
    imgs = []
    for _ in range(BATCH):
        a = torch.rand(SHAPE[0], 3, generator=gen)
        img = a[:, 0, None, None] * xx + a[:, 1, None, None] * yy + 0.3 * a[:, 2, None, None]
        img = img + 0.05 * torch.randn(SHAPE, generator=gen)
        imgs.append(img.clamp(0, 1))
    return torch.stack(imgs)


def write_fixture(root: Path, seed: int = 0) -> dict[str, list[Path]]:
    """Write results under ``root/runs`` and training runs under ``root/train``; return what was written."""
    gen = torch.Generator().manual_seed(seed)
    orig = originals(gen)
    labels = torch.tensor([3, 1, 4, 1])
    written: dict[str, list[Path]] = {"results": [], "train": [], "malformed": []}
    for d_i, (defense, (nbytes, noise, acc)) in enumerate(DEFENSES.items()):
        for a_i, attack in enumerate(ATTACKS):
            for v_i, view in enumerate(VIEWS):
                # the aware view and the second attack do a little better, as they would
                level = noise * (0.7 if view == "aware" else 1.0) * (0.8 if a_i == 1 else 1.0)
                perm = torch.randperm(BATCH, generator=gen)
                rec = (orig[perm] + level * torch.randn(orig.shape, generator=gen)).clamp(0, 1)
                inferred = labels[perm].clone()
                if defense.startswith("topk") and view == "naive":
                    inferred[0] = 9  # one label wrong
                scores = score_batch(rec, orig, inferred, labels, compute_lpips=False)
                folder = root / "runs" / f"d{d_i}" / "rec0" / f"a{a_i}-{view}"
                folder.mkdir(parents=True, exist_ok=True)
                data = {
                    "schema": 1,
                    "kind": "attack_result",
                    "record_id": f"rec0-d{d_i}",
                    "record": str(root / "records" / f"rec0-d{d_i}.safetensors"),
                    "dataset": DATASET,
                    "model": MODEL,
                    "defense": defense,
                    "attack": attack,
                    "view": view,
                    "threat": {"weights": "white-box", "compressor": view == "aware", "labels": "inferred (iDLG)"},
                    "bytes": nbytes,
                    "bytes_fp32": BYTES_FP32,
                    "batch_size": BATCH,
                    "labels_inferred": inferred.tolist(),
                    "labels_true": labels.tolist(),
                    "seconds": 1.5 + a_i,
                    "iterations": 300 if a_i == 0 else 1000,
                    "final_loss": 0.01 * (d_i + 1),
                    "metrics": scores.to_json(),
                    "ssim": [im.ssim for im in scores.images],
                    "psnr": [im.psnr for im in scores.images],
                    "lpips": [im.lpips for im in scores.images],
                    "label_accuracy": scores.label_accuracy,
                    "lpips_reason": scores.lpips_reason,
                }
                (folder / "result.json").write_text(json.dumps(data))
                paired = rec[list(scores.matching)]
                tensors = {"reconstruction": paired.contiguous(), "original": orig.contiguous()}
                # one result has lost its image file: its grid cell is left blank with a note
                if not (defense == "qsgd:levels=16" and attack == ATTACKS[1] and view == "aware"):
                    save_file(tensors, str(folder / "reconstruction.safetensors"))
                written["results"].append(folder / "result.json")
        if acc is not None:
            tdir = root / "train" / f"d{d_i}"
            tdir.mkdir(parents=True)
            steps = 100
            train = {
                "schema": 1,
                "kind": "train",
                "dataset": DATASET,
                "model": "convnet",
                "defense": defense,
                "world_size": 2,
                "epochs": [
                    {"epoch": 1, "train_loss": 1.0, "test_accuracy": acc, "bytes_sent_per_worker": nbytes * steps, "seconds": 3.0}
                ],
                "totals": {
                    "final_test_accuracy": acc,
                    "bytes_sent_per_worker": nbytes * steps,
                    "bytes_per_step": float(nbytes),
                    "steps": steps,
                    "seconds": 3.0,
                },
            }
            (tdir / "metrics.json").write_text(json.dumps(train))
            written["train"].append(tdir / "metrics.json")
    bad = root / "runs" / "bad"
    for name, text in (
        ("truncated", '{"schema": 1, "kind": "attack_result", "record_id": "x"'),
        ("wrongkind", json.dumps({"schema": 1, "kind": "record"})),
        ("nofield", json.dumps({"schema": 1, "kind": "attack_result", "record_id": "x", "view": "naive"})),
        ("badview", json.dumps({"schema": 1, "kind": "attack_result", "view": "oracle"})),
    ):
        (bad / name).mkdir(parents=True)
        (bad / name / "result.json").write_text(text)
        written["malformed"].append(bad / name / "result.json")
    return written
