"""Benchmark: ``dager``, eval mode, ``none``: ROUGE-1, exact-sequence rate and seconds per attack.

``--model minilm`` (encoder, B in {1, 2}) or ``--model smollm2`` (decoder, greedy; B in {1, 4}:
``--sizes 1,4``; the seconds are the attack's alone, the model load once per process is not counted).

Sentences the tests never use: ``pii`` with Faker seed 1000 and the test split of ``topics``
(tests use ``pii`` seed 0); batches drawn with seed 7. Prints one JSON object.

    PYTHONPATH=. python benchmarks/text_dager.py [--model minilm] [--batches 5] [--sizes 1,2]
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
    args = parser.parse_args()
    attack = create_attack("dager")
    rows = []
    suffix = ",tokenizer=smollm2" if args.model == "smollm2" else ""
    for dataset, split in ((f"pii:seed=1000{suffix}", "train"), ("topics" + suffix.replace(",", ":"), "test")):
        data = load_dataset(dataset, split=split)
        spec = ModelSpec(args.model, data.spec.shape, data.spec.num_classes, "eval")
        model = build_model(spec, seed=0)
        for batch in (int(s) for s in args.sizes.split(",")):
            rouge1, exact, seconds = [], [], []
            for indices in batch_indices(len(data), batch, args.batches, seed=7):
                x, y = data.batch(indices)
                record, truth = capture_batch(model, spec, data.spec, x, y, create_defense("none"), "b")
                start = time.perf_counter()
                rec = attack.run(record, "naive", torch.Generator())
                seconds.append(time.perf_counter() - start)
                values = score_text(rec.inputs, truth.inputs).values
                rouge1 += values["rouge1"]
                exact += values["exact"]
            rows.append({"dataset": dataset, "split": split, "batch": batch, "sentences": len(rouge1),
                         "rouge1_mean": sum(rouge1) / len(rouge1), "exact_rate": sum(exact) / len(exact),
                         "seconds_per_attack": sum(seconds) / len(seconds)})
    print(json.dumps({"attack": "dager", "model": args.model, "threads": torch.get_num_threads(), "mode": "eval", "defense": "none", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
