"""``gia-bench federated`` with text: FedAvg of a language model, each client's update through a
compressor, captured as records whose truth holds token ids and masks, and attacked by ``tokens``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flower_grid import in_process  # noqa: E402,F401 (a fixture)
from typer.testing import CliRunner  # noqa: E402

from gia_bench.cli import app  # noqa: E402
from gia_bench.federated import FederatedConfig, round_examples, run_federated, simulation  # noqa: E402
from gia_bench.records import Truth, truth_path  # noqa: E402
from gia_bench.receiver import load_record  # noqa: E402
from gia_bench.text.data import split_rows  # noqa: E402


@pytest.mark.parametrize("defense", ["none", "powersgd:rank=1"])
def test_fedavg_of_a_text_model_is_captured_and_its_token_bag_leaks(tmp_path: Path, in_process, defense):  # noqa: F811
    cfg = FederatedConfig(
        dataset="pii:size=48,length=24", model="transformer:d=96,layers=3", defense=defense, clients=2, rounds=1,
        local_steps=2, local_lr=0.05, local_batch=2, batch_size=4, capture_rounds=(1,), out=tmp_path / "run", seed=5,
    )
    result = run_federated(cfg, engine=in_process)
    metrics = result.metrics
    assert metrics["totals"]["records"] == 2
    setup = simulation._setup(cfg)
    records = []
    for c in metrics["rounds"][0]["clients"]:
        record = load_record(c["record"])  # the full check: shapes, names, decode, FedAvg fields
        truth = Truth.load(truth_path(Path(c["record"])))
        assert record.meta.dataset.name.startswith("pii:") and record.meta.local_steps == 2
        # the truth is the client's private sentences: token ids, attention mask and PII fields
        idx = round_examples(setup.shards[c["client"]], cfg.batch_size, cfg.seed, 1, c["client"])
        x, y = setup.train.batch(idx)
        assert torch.equal(truth.inputs, x) and torch.equal(truth.labels, y)
        ids, mask, _ = split_rows(truth.inputs)
        assert ids.shape == mask.shape == (4, 24) and bool((mask.sum(1) > 3).all())
        records.append(c["record"])
    if defense == "none":
        assert all(c["bytes"] == metrics["fp32_bytes_per_client"] for c in metrics["rounds"][0]["clients"])
    else:
        assert all(0 < c["bytes"] < metrics["fp32_bytes_per_client"] / 50 for c in metrics["rounds"][0]["clients"])
    # a FedAvg update's embedding rows carry exactly the tokens of the client's local batches:
    # the unchanged CLI reads the bag from the records, through PowerSGD's factors too
    out = tmp_path / "runs"
    res = CliRunner().invoke(app, ["attack", *records, "--attack", "tokens", "--view", "aware", "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = sorted(out.rglob("result.json"))
    assert len(results) == 2
    for path in results:
        sentences = json.loads(path.read_text())["scores"]["images"]
        assert len(sentences) == 4 and min(s["token_f1"] for s in sentences) >= 0.99, (path, sentences)
