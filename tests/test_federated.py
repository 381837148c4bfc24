"""gia-bench on Flower: the client mod, the strategy wrapper and ``gia-bench federated``.

The default run drives the real ClientApp, DefenseMod, CaptureStrategy, Flower's FedAvg and
``Strategy.start`` through an in-process Grid (no Ray); the slow test runs the same
command on Flower's simulation engine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from gia_bench import federated  # noqa: E402
from gia_bench.cli import app  # noqa: E402
from gia_bench.comm import LocalCommunicator  # noqa: E402
from gia_bench.defenses import create as create_defense  # noqa: E402
from gia_bench.fedavg import local_update  # noqa: E402
from gia_bench.federated import (  # noqa: E402
    STATE_KEY,
    FederatedConfig,
    _load_state,
    round_examples,
    run_federated,
    shard_indices,
    train_locally,
)
from gia_bench.models import build_model  # noqa: E402
from gia_bench.records import GradientRecord, Truth, truth_path  # noqa: E402


class InProcessGrid(Grid):
    """A Grid that hands each message straight to the ClientApp, with one persistent Context per node."""

    def __init__(self, client_app, n: int) -> None:
        self.app = client_app
        self.contexts = {
            i + 1: Context(
                run_id=1, node_id=i + 1, node_config={"partition-id": i, "num-partitions": n},
                state=RecordDict(), run_config={},
            )
            for i in range(n)
        }

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


@pytest.fixture
def in_process(monkeypatch):
    """An Engine running the apps in this process; keeps the grid so tests can read the clients' contexts."""
    for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, key, value)
    grids: list[InProcessGrid] = []

    def engine(server_app, client_app, n, backend_config) -> None:
        assert backend_config["client_resources"]["num_cpus"] > 0
        grid = InProcessGrid(client_app, n)
        grids.append(grid)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))

    engine.grids = grids
    return engine


def _config(tmp_path: Path, defense: str, **kw) -> FederatedConfig:
    base = dict(
        dataset="digits", model="convnet:width=4", defense=defense, clients=2, rounds=2, local_steps=3,
        local_lr=0.1, local_batch=4, batch_size=8, capture_rounds=(1, 2), out=tmp_path / "run", seed=3,
    )
    base.update(kw)
    return FederatedConfig(**base)


@pytest.mark.parametrize("defense", ["none", "topk:ratio=0.1"])
def test_two_clients_two_rounds(tmp_path, in_process, defense):
    cfg = _config(tmp_path, defense)
    rows = []
    result = run_federated(cfg, on_round=rows.append, engine=in_process)
    metrics = json.loads((cfg.out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] == [r["round"] for r in rows]
    assert metrics["initial"]["test_examples"] == metrics["rounds"][0]["test_examples"] > 0

    setup = federated._setup(cfg)
    model0 = build_model(setup.model_spec, seed=cfg.seed)
    names = [n for n, _ in model0.named_parameters()]
    shapes = [p.shape for p in model0.parameters()]
    n_params = sum(math.prod(s) for s in shapes)
    assert metrics["fp32_bytes_per_client"] == 4 * n_params

    # replay round 1 (every client starts from the seeded model) and round 2 (from the
    # record's weights, with the compressor state the client kept after round 1)
    kept: dict[int, bytes] = {}
    for row in metrics["rounds"]:
        assert row["clients_sampled"] == 2 and [c["client"] for c in row["clients"]] == [0, 1]
        for c in row["clients"]:
            record = GradientRecord.load(c["record"])  # validates: shapes, names, decode, FedAvg fields
            truth = Truth.load(truth_path(Path(c["record"])))
            meta = record.meta
            assert (meta.local_steps, meta.local_lr, meta.local_batch, meta.batch_size) == (3, 0.1, 4, 8)
            assert meta.step == row["round"] - 1 and meta.extra["source"] == "federated"
            assert meta.bytes_sent == c["bytes"] == sum(m["nbytes"] for m in meta.messages)
            # the truth is the client's private examples of that round, drawn from its own shard
            shard = shard_indices(len(setup.train), cfg.clients, cfg.seed)[c["client"]]
            idx = round_examples(shard, cfg.batch_size, cfg.seed, row["round"], c["client"])
            x, y = setup.train.batch(idx)
            assert torch.equal(truth.inputs, x) and torch.equal(truth.labels, y)
            if row["round"] == 1:
                for k, v in model0.state_dict().items():
                    assert torch.equal(record.weights[k], v)
            # the update of the record format (gia_bench.fedavg), from the record's weights ...
            u = local_update(record.build_model(), x, y, steps=3, lr=0.1, local_batch=4)
            # ... is what the client's own loop (which also trains BatchNorm statistics) computed
            u_live, _ = train_locally(record.build_model(), x, y, cfg.local)
            for a, b in zip(u, u_live):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            # what the defense sends for that update, with the state the client kept from round 1
            compressor = create_defense(defense)
            if row["round"] == 2:
                compressor.load_state_dict(_load_state(kept[c["client"]]))
            comm = LocalCommunicator(record=True)
            compressor.step(u_live, comm, keys=names)
            kept[c["client"]] = federated._save_state(compressor.state_dict())
            assert c["bytes"] == comm.bytes_sent  # bytes per client: exactly the defense's messages
            expected = compressor.decode({m.tag: m.tensor for m in comm.messages}, shapes, compressor.public_state())
            for got, want in zip(record.decode(), expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for context in in_process.grids[0].contexts.values():
        assert STATE_KEY in context.state.config_records  # the compressor state stays on the client
    if defense == "none":
        assert all(c["bytes"] == 4 * n_params for r in metrics["rounds"] for c in r["clients"])
    else:
        assert all(0 < c["bytes"] < 4 * n_params for r in metrics["rounds"] for c in r["clients"])
    # every record of the run is attackable by the unchanged CLI
    # a captured record is attackable by the unchanged CLI, and scored against its truth file
    one = metrics["rounds"][1]["clients"][1]["record"]
    res = CliRunner().invoke(app, ["attack", one, "--attack", "dlg:iterations=2", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    (result,) = (tmp_path / "runs").rglob("result.json")
    assert len(json.loads(result.read_text())["psnr"]) == cfg.batch_size

