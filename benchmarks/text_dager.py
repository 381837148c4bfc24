"""Benchmark: ``dager``, eval mode: ROUGE-1, token F1, exact-sequence rate and seconds per attack.

``--defense`` (repeatable, default ``none``) and ``--view`` (repeatable: ``naive``, ``aware``;
default ``naive``): every defense x view on the same batches (one capture per defense).

``--model minilm`` (encoder, B in {1, 2}) or ``--model smollm2`` (decoder, greedy; B in {1, 4}:
``--sizes 1,4``; the seconds are the attack's alone, the model load once per process is not counted).

Sentences the tests never use: ``pii`` with Faker seed 1000 and the test split of ``topics``
(tests use ``pii`` seed 0); batches drawn with seed 7. Prints one JSON object.

    PYTHONPATH=. python benchmarks/text_dager.py [--model minilm] [--batches 5] [--sizes 1,2] \
        [--defense powersgd:rank=1 --defense lqsgd:rank=1] [--view naive --view aware]
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
from gia_bench.text.metrics import score_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--defense", action="append", default=None, help="repeatable; default none")
    parser.add_argument("--view", action="append", choices=("naive", "aware"), default=None, help="repeatable")
    args = parser.parse_args()
    defenses, views = args.defense or ["none"], args.view or ["naive"]
    attack = create_attack("dager")
    rows = []
    suffix = ",tokenizer=smollm2" if args.model == "smollm2" else ""
    for dataset, split in ((f"pii:seed=1000{suffix}", "train"), ("topics" + suffix.replace(",", ":"), "test")):
        data = load_dataset(dataset, split=split)
        spec = ModelSpec(args.model, data.spec.shape, data.spec.num_classes, "eval")
        model = build_model(spec, seed=0)
        for batch in (int(s) for s in args.sizes.split(",")):
            for defense in defenses:
                scores: dict[str, dict[str, list[float]]] = {v: {"rouge1": [], "token_f1": [], "exact": [], "s": []}
                                                         for v in views}
                for indices in batch_indices(len(data), batch, args.batches, seed=7):
                    x, y = data.batch(indices)
                    record, truth = capture_batch(model, spec, data.spec, x, y, create_defense(defense), "b")
                    for view in views:
                        start = time.perf_counter()
                        rec = attack.run(record, view, torch.Generator())
                        scores[view]["s"].append(time.perf_counter() - start)
                        values = score_text(rec.inputs, truth.inputs).values
                        for key in ("rouge1", "token_f1", "exact"):
                            scores[view][key] += values[key]
                for view, got in scores.items():
                    n = len(got["rouge1"])
                    rows.append({"dataset": dataset, "split": split, "batch": batch, "defense": defense, "view": view,
                                 "sentences": n, "rouge1_mean": sum(got["rouge1"]) / n,
                                 "token_f1_mean": sum(got["token_f1"]) / n, "token_f1_min": min(got["token_f1"]),
                                 "exact_rate": sum(got["exact"]) / n,
                                 "seconds_per_attack": sum(got["s"]) / len(got["s"])})
                    print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"attack": "dager", "model": args.model, "threads": torch.get_num_threads(), "mode": "eval", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
