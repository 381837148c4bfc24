"""A small synthetic FIXTURE of attack results and training runs, for testing the reporter only.

The images are seeded noise-and-gradient patterns and the "reconstructions" are the
originals plus noise whose level depends on the defense; the SSIM/PSNR numbers are
computed from them with gia_bench.metrics, the byte counts and accuracies are made
up. None of this is a benchmark result.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gia_bench.attacks import create as create_attack
from gia_bench.metrics import score_batch
from gia_bench.results import RESULT_SCHEMA

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


def originals(gen: torch.Generator, batch: int = BATCH, shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    """A batch of smooth colour images in [0, 1] (so the flat-colour floor is meaningful)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, shape[1]), torch.linspace(0, 1, shape[2]), indexing="ij")
    imgs = []
    for _ in range(batch):
        a = torch.rand(shape[0], 3, generator=gen)
        img = a[:, 0, None, None] * xx + a[:, 1, None, None] * yy + 0.3 * a[:, 2, None, None]
        img = img + 0.05 * torch.randn(shape, generator=gen)
        imgs.append(img.clamp(0, 1))
    return torch.stack(imgs)


def _shown(attack: str, defense: str) -> dict:
    """How the attack runner says reports show the specs (gia_bench.evaluate._shown)."""
    from gia_bench.evaluate import _shown as shown

    return shown(attack, defense)


def _budget(attack: str) -> dict:
    """The ``budget`` the attack runner records: the attack's own and its published one (as evaluate does)."""
    built = create_attack(attack)
    return dataclasses.replace(built.budget, published=built.published_budget, published_known=True).to_json()


def write_result(
    folder: Path,
    gen: torch.Generator,
    orig: torch.Tensor,
    labels: torch.Tensor,
    level: float,
    *,
    record_id: str,
    record: str,
    dataset: str,
    model: str,
    defense: str,
    attack: str,
    view: str,
    nbytes: int,
    bytes_fp32: int,
    seconds: float = 1.0,
    iterations: int = 0,
    final_loss: float = 0.01,
    wrong_label: bool = False,
    save_images: bool = True,
    extra: dict | None = None,
) -> Path:
    """One result.json (+ reconstruction.safetensors): ``orig`` plus noise of ``level``, scored for real."""
    batch = orig.shape[0]
    perm = torch.randperm(batch, generator=gen)
    rec = (orig[perm] + level * torch.randn(orig.shape, generator=gen)).clamp(0, 1)
    inferred = labels[perm].clone()
    if wrong_label:
        inferred[0] = 9  # one label wrong
    scores = score_batch(rec, orig, inferred, labels, compute_lpips=False)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": RESULT_SCHEMA,
        "kind": "attack_result",
        "record_id": record_id,
        "record": record,
        "dataset": dataset,
        "model": model,
        "defense": defense,
        "attack": attack,
        "view": view,
        "threat": {"weights": "white-box", "compressor": view != "naive", "labels": "inferred (iDLG)"},
        "bytes": nbytes,
        "bytes_fp32": bytes_fp32,
        "batch_size": batch,
        "labels_inferred": inferred.tolist(),
        "labels_true": labels.tolist(),
        "seconds": seconds,
        "iterations": iterations,
        "final_loss": final_loss,
        "scores": scores.to_json(),
        "budget": _budget(attack),
        "shown": _shown(attack, defense),
        **(extra or {}),
    }
    if data["schema"] < 3:  # an older file: scores under "metrics" and as flat lists, no published budget
        old = data.pop("scores")
        data.update(metrics=old, ssim=[im["ssim"] for im in old["images"]], psnr=[im["psnr"] for im in old["images"]],
                    lpips=[im["lpips"] for im in old["images"]], label_accuracy=old["label_accuracy"],
                    lpips_reason=old["lpips_reason"])  # fmt: skip
        if "budget" not in (extra or {}):
            del data["budget"]
    (folder / "result.json").write_text(json.dumps(data))
    if save_images:
        paired = rec[list(scores.matching)]
        tensors = {"reconstruction": paired.contiguous(), "original": orig.contiguous()}
        save_file(tensors, str(folder / "reconstruction.safetensors"))
    return folder / "result.json"


def write_train_metrics(
    folder: Path,
    *,
    dataset: str,
    model: str,
    defense: str,
    accuracies: list[float],
    steps_per_epoch: int,
    bytes_per_step: int,
    test_examples: int | None,
    seed: int | None = None,
) -> Path:
    """A training run's metrics.json with one history entry per accuracy (``test_examples`` when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    epochs = []
    for n, acc in enumerate(accuracies):
        e = {"epoch": n + 1, "train_loss": 1.0 / (n + 1), "test_accuracy": acc, "steps": steps_per_epoch,
             "bytes_sent_per_worker": bytes_per_step * steps_per_epoch, "seconds": 3.0}  # fmt: skip
        if test_examples is not None:
            e["test_examples"] = test_examples
        epochs.append(e)
    steps = steps_per_epoch * len(accuracies)
    data = {
        "schema": 1,
        "kind": "train",
        "dataset": dataset,
        "model": model,
        "defense": defense,
        "world_size": 2,
        "epochs": epochs,
        "totals": {
            "final_test_accuracy": accuracies[-1],
            "bytes_sent_per_worker": bytes_per_step * steps,
            "bytes_per_step": float(bytes_per_step),
            "steps": steps,
            "seconds": 3.0 * len(accuracies),
        },
    }
    if seed is not None:
        data["config"] = {"seed": seed}
    (folder / "metrics.json").write_text(json.dumps(data))
    return folder / "metrics.json"


def write_fixture(root: Path, seed: int = 0) -> dict[str, list[Path]]:
    """Write results under ``root/runs`` and training runs under ``root/train``; return what was written."""
    gen = torch.Generator().manual_seed(seed)
    orig = originals(gen)
    labels = torch.tensor([3, 1, 4, 1])
    written: dict[str, list[Path]] = {"results": [], "train": [], "malformed": []}
    for d_i, (defense, (nbytes, noise, acc)) in enumerate(DEFENSES.items()):
        for a_i, attack in enumerate(ATTACKS):
            for view in VIEWS:
                # the aware view and the second attack do a little better, as they would
                level = noise * (0.7 if view == "aware" else 1.0) * (0.8 if a_i == 1 else 1.0)
                written["results"].append(
                    write_result(
                        root / "runs" / f"d{d_i}" / "rec0" / f"a{a_i}-{view}", gen, orig, labels, level,
                        record_id=f"rec0-d{d_i}", record=str(root / "records" / f"rec0-d{d_i}.safetensors"),
                        dataset=DATASET, model=MODEL, defense=defense, attack=attack, view=view, nbytes=nbytes,
                        bytes_fp32=BYTES_FP32, seconds=1.5 + a_i, iterations=300 if a_i == 0 else 1000,
                        final_loss=0.01 * (d_i + 1), wrong_label=defense.startswith("topk") and view == "naive",
                        # one result has lost its image file: its grid cell is left blank with a note
                        save_images=not (defense == "qsgd:levels=16" and attack == ATTACKS[1] and view == "aware"),
                    )  # fmt: skip
                )
        if acc is not None:
            # an older metrics.json: no test_examples, so no standard error
            written["train"].append(
                write_train_metrics(
                    root / "train" / f"d{d_i}", dataset=DATASET, model="convnet", defense=defense, accuracies=[acc],
                    steps_per_epoch=100, bytes_per_step=nbytes, test_examples=None,
                )  # fmt: skip
            )
    bad = root / "runs" / "bad"
    for name, text in (
        ("truncated", '{"schema": 1, "kind": "attack_result", "record_id": "x"'),
        ("wrongkind", json.dumps({"schema": 1, "kind": "record"})),
        ("nofield", json.dumps({"schema": 1, "kind": "attack_result", "record_id": "x", "view": "naive"})),
        ("badview", json.dumps({"schema": 1, "kind": "attack_result", "view": "psychic"})),
    ):
        (bad / name).mkdir(parents=True)
        (bad / name / "result.json").write_text(text)
        written["malformed"].append(bad / name / "result.json")
    return written


# -- leakage along a training run (issue 12's results, before the trainer writes them) -----------------

TRAIN_DATASET = "digits"
TRAIN_MODEL = "convnet:width=8"
TRAIN_STEPS = (0, 50, 200)
TRAIN_VIEWS = ("naive", "aware", "oracle")
TRAIN_ATTACK = "ig:iterations=4800,restarts=1,tv=0.0001"
TRAIN_IMAGES = 6
TEST_EXAMPLES = 359
STEPS_PER_EPOCH = 45
# defense -> (bytes per step, noise at step 0 / growth per 100 steps, accuracy history per epoch)
TRAIN_DEFENSES = {
    "none": (40_000, 0.02, 0.01, [0.62, 0.81, 0.88, 0.90, 0.91]),
    "lqsgd:rank=1,bits=8": (2_100, 0.06, 0.05, [0.55, 0.78, 0.86, 0.89, 0.90]),
    "signsgd": (1_300, 0.35, 0.0, [0.40, 0.60, 0.70, 0.74, 0.76]),
}


def write_train_fixture(root: Path, seed: int = 1) -> dict[str, list[Path]]:
    """Training runs (metrics.json with test_examples) and results captured inside them at TRAIN_STEPS.

    Each result's record lies in its run's folder (``<run>/records/``), ``source`` is
    "train" and ``step`` the optimizer step; views are naive, aware and oracle, and the
    results carry a ``budget`` object (schema 2).
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(TRAIN_IMAGES) % 10
    written: dict[str, list[Path]] = {"results": [], "train": []}
    for d_i, (defense, (nbytes, noise, growth, accs)) in enumerate(TRAIN_DEFENSES.items()):
        run = root / "trainruns" / f"d{d_i}"
        written["train"].append(
            write_train_metrics(
                run, dataset=TRAIN_DATASET, model=TRAIN_MODEL, defense=defense, accuracies=accs,
                steps_per_epoch=STEPS_PER_EPOCH, bytes_per_step=nbytes, test_examples=TEST_EXAMPLES,
            )  # fmt: skip
        )
        for step in TRAIN_STEPS:
            orig = originals(gen, TRAIN_IMAGES, (1, 16, 16))
            for view in TRAIN_VIEWS:
                level = (noise + growth * step / 100) * {"naive": 1.0, "aware": 0.8, "oracle": 0.6}[view]
                written["results"].append(
                    write_result(
                        root / "runs-train" / f"d{d_i}" / f"step{step}" / view, gen, orig, labels, level,
                        record_id=f"d{d_i}-step{step}", record=str(run / "records" / f"step-{step}.safetensors"),
                        dataset=TRAIN_DATASET, model=TRAIN_MODEL, defense=defense, attack=TRAIN_ATTACK, view=view,
                        nbytes=nbytes, bytes_fp32=40_000, iterations=4800,
                        extra={"schema": 2, "step": step, "source": "train", "seed": 0,
                               "budget": {"iterations": 4800, "restarts": 1, "evaluations": 4800, "preset": "paper"}},
                    )  # fmt: skip
                )
    return written


# -- a demo-like study: the demo's 13 defenses x 2 attacks x 2 views on 2 datasets, 2 images each -------

DEMO_DEFENSES = {  # defense -> (bytes per step on the DLG LeNet, noise level, accuracy)
    "none": (247_000, 0.03, 0.774),
    "topk:ratio=0.1": (49_400, 0.10, 0.766),
    "topk:ratio=0.01": (4_940, 0.30, 0.744),
    "qsgd:levels=16": (31_000, 0.06, 0.774),
    "qsgd:levels=2": (15_600, 0.20, 0.757),
    "signsgd": (7_800, 0.35, 0.774),
    "signsgd:error_feedback=false": (7_800, 0.40, 0.830),
    "powersgd:rank=1,warm_start=true": (3_100, 0.25, 0.774),
    "powersgd:rank=4,warm_start=true": (12_300, 0.15, 0.780),
    "lqsgd:rank=1,bits=8": (900, 0.26, 0.760),
    "lqsgd:rank=4,bits=4": (1_700, 0.22, 0.713),
    "rcfed:bits=4,rate=2.0": (14_100, 0.12, 0.771),
    "mixedprec:bits_per_layer=0-1@2/*@8": (62_000, 0.09, 0.769),
}
DEMO_ATTACKS = ("dlg:iterations=30,line_search=true", "ig:iterations=300,lr=0.1,tv=0.01")


def write_demo_like(root: Path, seed: int = 2, train_section: bool = True) -> dict[str, list[Path]]:
    """Results shaped like ``gia-bench demo``'s (made-up numbers), for layout tests and page measurements.

    Two datasets x 13 defenses (the demo's specs, long ones included) x 2 attacks x 2
    views, 2 images each, budgets as the attack runner records them (with the published one);
    training runs on digits with 359 test images; with ``train_section`` also a
    training-run section (:func:`write_train_fixture`).
    """
    gen = torch.Generator().manual_seed(seed)
    written: dict[str, list[Path]] = {"results": [], "train": []}
    for dataset, shape in (("digits", (1, 16, 16)), ("faces", (1, 25, 25))):
        orig = originals(gen, 2, shape)
        labels = torch.tensor([3, 7])
        for d_i, (defense, (nbytes, noise, acc)) in enumerate(DEMO_DEFENSES.items()):
            for a_i, attack in enumerate(DEMO_ATTACKS):
                for view in VIEWS:
                    level = noise * (0.8 if view == "aware" else 1.0) * (0.9 if a_i else 1.0)
                    written["results"].append(
                        write_result(
                            root / "runs" / dataset / f"d{d_i}" / f"a{a_i}-{view}", gen, orig, labels, level,
                            record_id=f"{dataset}-lenet-b1-s0-d{d_i}", record=str(root / "records" / f"{dataset}-d{d_i}"),
                            dataset=dataset, model="lenet", defense=defense, attack=attack, view=view, nbytes=nbytes,
                            bytes_fp32=247_000, iterations=30 if a_i == 0 else 300,
                        )  # fmt: skip
                    )
            if dataset == "digits":
                written["train"].append(
                    write_train_metrics(
                        root / "train" / f"d{d_i}", dataset="digits", model="lenet", defense=defense,
                        accuracies=[acc * 0.6, acc * 0.8, acc * 0.95, acc], steps_per_epoch=23, bytes_per_step=nbytes,
                        test_examples=359,
                    )  # fmt: skip
                )
    if train_section:
        more = write_train_fixture(root)
        written["results"] += more["results"]
        written["train"] += more["train"]
    return written
