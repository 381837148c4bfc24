"""Reading training runs: a lone worker's bytes per step is its messages' size, not the 0 it sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gia_bench.reports import parse_train


def _metrics(tmp_path: Path, world_size: int, sent: int, payload, steps: int = 10) -> Path:
    data = {
        "schema": 1, "kind": "train", "dataset": "digits", "model": "mlp", "defense": "topk:ratio=0.01",
        "world_size": world_size,
        "epochs": [{"epoch": 1, "test_accuracy": 0.5, "steps": steps, "bytes_sent_per_worker": sent,
                    "payload_bytes_per_worker": payload}],
        "totals": {"final_test_accuracy": 0.5, "bytes_sent_per_worker": sent, "payload_bytes_per_worker": payload,
                   "bytes_per_step": sent / steps, "steps": steps, "seconds": 1.0},
    }
    path = tmp_path / f"w{world_size}-{sent}-{payload}.json"
    path.write_text(json.dumps(data))
    return path


def test_one_worker_is_placed_by_its_messages_size(tmp_path):
    run = parse_train(_metrics(tmp_path, 1, 0, 5000))
    assert run.bytes_per_step == 500.0 and run.history[0].bytes_sent_per_worker == 5000  # claims' curves too


@pytest.mark.parametrize("world_size,sent,payload,want", [
    (2, 8000, 5000, 800.0),  # peers: what was sent
    (1, 0, 0, 0.0),  # nothing to place it by
    (1, 0, float("inf"), 0.0),  # not a size
    (1, 0, float("nan"), 0.0),
])
def test_bytes_sent_stand_otherwise(tmp_path, world_size, sent, payload, want):
    run = parse_train(_metrics(tmp_path, world_size, sent, payload))
    assert run.bytes_per_step == want and run.history[0].bytes_sent_per_worker == sent
