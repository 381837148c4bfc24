"""The DDP trainer: metrics and bytes, captures, a killed worker, resume == uninterrupted run.

Two gloo workers on the CPU, a tiny MLP on 8x8 digits, a few steps per epoch. The
default tests fork the workers (``launch(fork=True)``: same worker code, no fresh
interpreter importing torch); the slow one goes through ``gia-bench train`` and
``python -m gia_bench.train`` subprocesses as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gia_bench.comm import LocalCommunicator
from gia_bench.defenses import create
from gia_bench.errors import ConfigError
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import find_records
from gia_bench.train import FAIL_ENV, TrainConfig, TrainError, launch, load_checkpoint
from gia_bench.receiver import load_record

DATASET = "digits:size=8,channels=1"
MODEL = "mlp:hidden=32"
STEPS = 4  # per epoch


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(
        out=out, dataset=DATASET, model=MODEL, defense="powersgd:rank=2", warmup_steps=2, nproc_per_node=2,
        epochs=2, batch_size=16, lr=0.1, max_steps_per_epoch=STEPS, bucket_cap_mb=0.002, timeout_s=60,
    )
    base.update(kw)
    return TrainConfig(**base)


def _shapes() -> list[torch.Size]:
    with torch.device("meta"):
        model = build_model(ModelSpec(MODEL, (1, 8, 8), 10), seed=None, device=None)
    return [p.shape for p in model.parameters()]


def test_metrics_bytes_capture_kill_and_resume(tmp_path, monkeypatch):
    # A: two epochs straight, capturing rank 0's gradient every 3 steps
    a = launch(_config(tmp_path / "a", capture_every=3), fork=True)
    assert a["schema"] == 1 and a["kind"] == "train" and a["world_size"] == 2
    assert a["defense"] == create("powersgd:rank=2,start_iter=2").spec
    assert [e["epoch"] for e in a["epochs"]] == [1, 2]
    assert all(0.0 <= e["test_accuracy"] <= 1.0 and e["train_loss"] > 0 for e in a["epochs"])
    # bytes: 2 warm-up steps of fp32 all-reduce, then PowerSGD's P, Q and rest; with 2 workers
    # a ring all-reduce sends as many bytes as the buffer holds
    shapes = _shapes()
    n_params = sum(s.numel() for s in shapes)
    comm = LocalCommunicator(record=False)
    create("powersgd:rank=2").step([torch.randn(s) for s in shapes], comm)
    expected = 2 * 4 * n_params + (2 * STEPS - 2) * comm.bytes_sent
    assert a["totals"]["bytes_sent_per_worker"] == expected
    assert sum(e["bytes_sent_per_worker"] for e in a["epochs"]) == expected
    assert a["totals"]["steps"] == 2 * STEPS and a["totals"]["bytes_per_step"] == expected / (2 * STEPS)
    records = find_records(tmp_path / "a" / "records")
    assert [load_record(p).meta.step for p in records] == [0, 3, 6]
    rec = load_record(records[-1])
    assert rec.meta.defense == a["defense"] and set(rec.messages) == {"P", "Q", "rest"}
    # the one-worker record's first message (P) is what rank 0 put on the wire in that step
    wire = {m["tag"]: m for m in rec.meta.extra["wire_messages"]}
    assert wire["P"]["shape"] == list(rec.messages["P"].shape) and rec.meta.extra["wire_bytes"] == comm.bytes_sent

    # B: same run, rank 1 dies at the first step of epoch 2
    monkeypatch.setenv(FAIL_ENV, f"1:{STEPS}")
    with pytest.raises(TrainError) as info:
        launch(_config(tmp_path / "b"), fork=True)
    msg = str(info.value)
    assert "worker rank 1 exited with code 17" in msg and "(epoch 1) is intact" in msg and "\n" not in msg
    ck = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ck["epoch"] == 1 and ck["step"] == STEPS
    monkeypatch.delenv(FAIL_ENV)

    # B resumed: bit-identical to A
    with pytest.raises(ConfigError, match="--resume"):
        launch(_config(tmp_path / "b"), fork=True)
    b = launch(_config(tmp_path / "b", resume=True), fork=True)
    ck_a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    ck_b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for name, t in ck_a["model"].items():
        assert torch.equal(t, ck_b["model"][name]), name
    for r in range(2):  # error feedback and warm-start Q of both workers too
        qa, qb = ck_a["ranks"][r]["hook"]["compressor"]["q"], ck_b["ranks"][r]["hook"]["compressor"]["q"]
        assert qa.keys() == qb.keys() and all(torch.equal(qa[k], qb[k]) for k in qa)
    assert [e["train_loss"] for e in b["epochs"]] == [e["train_loss"] for e in a["epochs"]]
    assert b["totals"]["bytes_sent_per_worker"] == expected


def test_evaluation_split_across_ranks_equals_rank0_alone(tmp_path):
    # a BatchNorm model: after each rank's own last forward its running statistics differ,
    # so the split evaluation must score rank 0's model (buffers broadcast), exactly
    model, dataset = "convnet:width=4", "digits:size=16,channels=1"
    run = launch(
        _config(tmp_path / "bn", dataset=dataset, model=model, defense="none", warmup_steps=None, epochs=1), fork=True
    )
    from gia_bench.data import load_dataset

    test = load_dataset(dataset, split="test")
    net = build_model(ModelSpec(model, (1, 16, 16), 10, "train"), seed=None, device=None)
    net.load_state_dict(load_checkpoint(tmp_path / "bn" / "checkpoint.pt")["model"])
    net.eval()
    with torch.no_grad():
        x, y = test.batch(range(len(test)))
        alone = int((net(x).argmax(1) == y).sum()) / len(test)
    assert run["epochs"][0]["test_accuracy"] == alone
    assert run["epochs"][0]["test_examples"] == len(test)


def test_config_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--warmup-steps"):
        _config(tmp_path, defense="topk", warmup_steps=3).validate()
    with pytest.raises(ConfigError, match="--collective"):
        _config(tmp_path, defense="powersgd", warmup_steps=None, collective="alltoall").validate()
    with pytest.raises(ConfigError, match="--nnodes"):
        _config(tmp_path, nnodes="2").validate()
    with pytest.raises(ConfigError, match="--batch-size"):
        _config(tmp_path, batch_size=0).validate()
    assert _config(tmp_path, defense="lqsgd:rank=2", collective="alltoall").defense_spec() == (
        "lqsgd:rank=2,start_iter=2,collective=alltoall"
    )


@pytest.mark.slow
def test_cli_train_killed_worker_one_line_error(tmp_path):
    out = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).with_name("gia-bench")), "train", "--out", str(out), "--dataset", DATASET, "--model", MODEL,
        "--defense", "lqsgd:rank=2", "--nproc-per-node", "2", "--epochs", "2", "--batch-size", "16",
        "--max-steps-per-epoch", str(STEPS), "--timeout", "60",
    ]
    env = dict(os.environ, **{FAIL_ENV: f"1:{STEPS + 1}"})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"worker rank 1 exited with code 17; last checkpoint {out / 'checkpoint.pt'} (epoch 1) is intact" in (
        proc.stderr.replace("\n", "")
    )
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1
