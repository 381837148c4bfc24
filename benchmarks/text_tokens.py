"""Benchmark: the ``tokens`` attack (naive and aware) on ``minilm`` through every compressor.

Sentences and seeds the tests never use: ``pii`` with Faker seed 1000 (tests use seed 0)
and the test split of ``topics`` (tests use its train split), batches drawn with seed 7.
Prints one JSON object: per (dataset, compressor, mode, B, view) the mean and minimum token
F1 over the batches, and the seconds taken.

    PYTHONPATH=. python benchmarks/text_tokens.py [--batches 4] [--sizes 1,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from gia_bench.attacks import create as create_attack  # noqa: E402
from gia_bench.capture import batch_indices, capture_batch  # noqa: E402
from gia_bench.data import load_dataset  # noqa: E402
from gia_bench.defenses import create as create_defense  # noqa: E402
from gia_bench.models import ModelSpec, build_model  # noqa: E402
from gia_bench.text.metrics import token_f1  # noqa: E402

DEFENSES = ("none", "topk:ratio=0.01", "qsgd", "signsgd", "powersgd:rank=1", "powersgd:rank=4", "lqsgd:rank=1")
DATASETS = (("pii:seed=1000", "train"), ("topics", "test"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=4, help="batches per (dataset, compressor, mode, B)")
    parser.add_argument("--sizes", default="1,4,8", help="batch sizes")
    parser.add_argument("--defenses", default=";".join(DEFENSES), help="';'-separated compressor specs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    defenses = [d for d in args.defenses.split(";") if d]
    attack = create_attack("tokens")
    rows = []
    start = time.perf_counter()
    for dataset, split in DATASETS:
        data = load_dataset(dataset, split=split)
        for mode in ("eval", "train"):
            spec = ModelSpec("minilm", data.spec.shape, data.spec.num_classes, mode)
            model = build_model(spec, seed=0)
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            for batch in sizes:
                for defense in defenses:
                    scores: dict[str, list[float]] = {"naive": [], "aware": []}
                    for i, indices in enumerate(batch_indices(len(data), batch, args.batches, seed=7)):
                        model.load_state_dict(initial)
                        inputs, labels = data.batch(indices)
                        torch.manual_seed(i)  # dropout masks in train mode
                        record, truth = capture_batch(model, spec, data.spec, inputs, labels,
                                                      create_defense(defense), f"bench-{i}")
                        for view in scores:
                            rec = attack.run(record, view, torch.Generator().manual_seed(0))
                            scores[view].append(token_f1(rec.inputs, truth.inputs))
                    for view, values in scores.items():
                        rows.append({"dataset": dataset, "split": split, "defense": defense, "mode": mode,
                                     "batch": batch, "view": view, "token_f1_mean": sum(values) / len(values),
                                     "token_f1_min": min(values), "batches": len(values)})
    print(json.dumps({"attack": "tokens", "model": "minilm", "rows": rows,
                      "seconds": round(time.perf_counter() - start, 1)}, indent=1))


if __name__ == "__main__":
    main()
