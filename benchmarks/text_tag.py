"""Benchmark: ``tag`` (TAG) on ``minilm``, B = 1, eval mode: ROUGE-1 against the random-order token-bag floor.

The floor is the ``tokens`` attack's bag (aware view) in a seeded random order: what an attacker
has without any optimisation (ROUGE-1, a unigram score, gives it the same value in any order;
ROUGE-2 and ROUGE-L do not). Sentences the tests never use: ``pii`` with Faker seed 1000 and the
test split of ``topics``, batches drawn with seed 7. ``--defense`` and ``--view`` are repeatable.
Prints one JSON line per (data set, defense, view) and one JSON object at the end.

    PYTHONPATH=. python benchmarks/text_tag.py [--sentences 3] [--attack tag:iterations=200,restarts=2]
        [--defense none] [--view naive]
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
from gia_bench.text.attacks_tokens import bag_batch  # noqa: E402
from gia_bench.text.data import split_rows  # noqa: E402
from gia_bench.text.metrics import score_text  # noqa: E402


def shuffled_bag(bag_inputs: torch.Tensor, seed: int) -> torch.Tensor:
    """The bag laid out by ``tokens``, its tokens in a seeded random order (the floor)."""
    ids, mask, _ = split_rows(bag_inputs)
    tokens = ids[mask.bool()]
    order = torch.randperm(tokens.numel(), generator=torch.Generator().manual_seed(seed))
    return bag_batch(tokens[order], ids.shape[0], ids.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=3, help="per data set")
    parser.add_argument("--attack", default="tag")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--defense", action="append", default=None, help="repeatable; default none")
    parser.add_argument("--view", action="append", choices=("naive", "aware"), default=None, help="repeatable")
    args = parser.parse_args()
    defenses, views = args.defense or ["none"], args.view or ["naive"]
    attack, tokens = create_attack(args.attack), create_attack("tokens")
    rows = []
    for dataset, split in (("pii:seed=1000", "train"), ("topics", "test")):
        data = load_dataset(dataset, split=split)
        spec = ModelSpec(args.model, data.spec.shape, data.spec.num_classes, "eval")
        model = build_model(spec, seed=0)
        for defense in defenses:
            got = {v: {"rouge1": [], "rouge2": [], "rougeL": [], "token_f1": [], "floor_rouge1": [], "floor_rouge2": [],
                       "floor_rougeL": [], "beats_floor": [], "s": []} for v in views}
            for k, indices in enumerate(batch_indices(len(data), 1, args.sentences, seed=7)):
                x, y = data.batch(indices)
                record, truth = capture_batch(model, spec, data.spec, x, y, create_defense(defense), "b")
                bag = tokens.run(record, "aware", torch.Generator())
                floor = score_text(shuffled_bag(bag.inputs, k), truth.inputs).values
                for view in views:
                    start = time.perf_counter()
                    rec = attack.run(record, view, torch.Generator().manual_seed(k))
                    got[view]["s"].append(time.perf_counter() - start)
                    values = score_text(rec.inputs, truth.inputs).values
                    for key in ("rouge1", "rouge2", "rougeL", "token_f1"):
                        got[view][key] += values[key]
                    for key in ("rouge1", "rouge2", "rougeL"):
                        got[view][f"floor_{key}"] += floor[key]
                    # the report's test: word order beyond the bag, ROUGE-2 and ROUGE-L both above the floor's
                    got[view]["beats_floor"] += [int(a > fa and b > fb) for a, fa, b, fb in zip(
                        values["rouge2"], floor["rouge2"], values["rougeL"], floor["rougeL"])]
            for view, g in got.items():
                n = len(g["rouge1"])
                row = {"dataset": dataset, "split": split, "defense": defense, "view": view, "sentences": n,
                       **{f"{key}_mean": sum(g[key]) / n for key in ("rouge1", "rouge2", "rougeL", "token_f1",
                                                                     "floor_rouge1", "floor_rouge2", "floor_rougeL")},
                       "beat_the_floor": f"{sum(g['beats_floor'])}/{n}",
                       "rouge1": g["rouge1"], "floor_rouge1": g["floor_rouge1"],
                       "seconds_per_attack": sum(g["s"]) / n}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"attack": attack.spec, "model": args.model, "batch": 1, "mode": "eval",
                      "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
