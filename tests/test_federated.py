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

from flwr.app import Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flower_grid import InProcessGrid, in_process  # noqa: E402,F401 (in_process: a fixture)
from typer.testing import CliRunner  # noqa: E402

from gia_bench.federated import simulation  # noqa: E402
from gia_bench.cli import app  # noqa: E402
from gia_bench.comm import LocalCommunicator  # noqa: E402
from gia_bench.defenses import create as create_defense  # noqa: E402
from gia_bench.fedavg import local_update  # noqa: E402
from gia_bench.events import Recorded  # noqa: E402
from gia_bench.federated import (  # noqa: E402
    STATE_KEY,
    FederatedConfig,
    round_examples,
    run_federated,
    shard_indices,
    train_locally,
)
from gia_bench.errors import CompressorError  # noqa: E402
from gia_bench.federated.flower import _load_state, _save_state  # noqa: E402
from gia_bench.models import build_model  # noqa: E402
from gia_bench.records import Truth, truth_path  # noqa: E402
from gia_bench.receiver import decode_record, load_record, record_model


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
    events = Recorded()
    result = run_federated(cfg, events=events, engine=in_process)
    metrics = json.loads((cfg.out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] == [c[1] for c in events.calls if c[0] == "step"]
    assert events.calls[0] == ("start", 2, "round", f"{defense} on 2 clients, 2 rounds")
    results = [c for c in events.calls if c[0] == "result"]
    assert [r[1] for r in results] == ["round 1", "round 2"] and results[1][2].startswith("round 2/2: test accuracy")
    assert metrics["initial"]["test_examples"] == metrics["rounds"][0]["test_examples"] > 0

    setup = simulation._setup(cfg)
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
            record = load_record(c["record"])  # validates: shapes, names, decode, FedAvg fields
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
            u = local_update(record_model(record), x, y, steps=3, lr=0.1, local_batch=4)
            # ... is what the client's own loop (which also trains BatchNorm statistics) computed
            u_live, _ = train_locally(record_model(record), x, y, cfg.local)
            for a, b in zip(u, u_live):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            # what the defense sends for that update, with the state the client kept from round 1
            compressor = create_defense(defense)
            if row["round"] == 2:
                compressor.load_state_dict(_load_state(kept[c["client"]]))
            comm = LocalCommunicator(record=True)
            compressor.step(u_live, comm, keys=names)
            kept[c["client"]] = _save_state(compressor.state_dict())
            assert c["bytes"] == comm.bytes_sent  # bytes per client: exactly the defense's messages
            expected = compressor.decode({m.tag: m.tensor for m in comm.messages}, shapes, compressor.public_state())
            for got, want in zip(decode_record(record), expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for context in in_process.grids[0].contexts.values():
        assert STATE_KEY in context.state.config_records  # the compressor state stays on the client
    if defense == "none":
        assert all(c["bytes"] == 4 * n_params for r in metrics["rounds"] for c in r["clients"])
    else:
        assert all(0 < c["bytes"] < 4 * n_params for r in metrics["rounds"] for c in r["clients"])
    # every record of the run is attackable by the unchanged CLI
    if defense == "none":
        return  # one CLI attack (on the compressed records) keeps the default run short
    # a captured record is attackable by the unchanged CLI, and scored against its truth file
    one = metrics["rounds"][1]["clients"][1]["record"]
    res = CliRunner().invoke(app, ["attack", one, "--attack", "dlg:iterations=2", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    (result,) = (tmp_path / "runs").rglob("result.json")
    assert len(json.loads(result.read_text())["scores"]["images"]) == cfg.batch_size



@pytest.mark.slow
def test_cli_on_flowers_simulation_engine(tmp_path):
    """`gia-bench federated` on Flower's own simulation engine (Ray): 2 clients x 2 rounds, records of round 2."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "gia_bench", "federated", "--dataset", "digits", "--model", "convnet:width=4",
        "--clients", "2", "--rounds", "2", "--local-steps", "2", "--local-batch", "4", "--batch-size", "8",
        "--defense", "topk:ratio=0.1", "--capture-rounds", "2", "--num-cpus", "2", "--out", str(out),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert [c["client"] for c in metrics["rounds"][1]["clients"]] == [0, 1]
    assert all(c["record"] is None for c in metrics["rounds"][0]["clients"])
    for c in metrics["rounds"][1]["clients"]:
        record = load_record(c["record"])
        assert record.meta.bytes_sent == c["bytes"] and record.meta.local_steps == 2
        assert Truth.load(truth_path(Path(c["record"]))).inputs.shape[0] == 8
    print(f"flower simulation: {seconds:.1f} s wall, {metrics['totals']['simulation_seconds']:.1f} s in run_simulation")


def _user_client_app(mods):
    """A user's own ClientApp: 2 SGD steps of lr 0.5 on its fixed examples; replies with weights and num-examples."""
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.clientapp import ClientApp

    from gia_bench.models import ModelSpec

    spec = ModelSpec("mlp:hidden=8", (1, 4, 4), 3)
    client_app = ClientApp(mods=mods)

    @client_app.train()
    def train(msg, ctx):
        model = build_model(spec, seed=None)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        gen = torch.Generator().manual_seed(int(ctx.node_config["partition-id"]))
        x, y = torch.randn(6, 1, 4, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for k in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[3 * k : 3 * k + 3]), y[3 * k : 3 * k + 3]).backward()
            opt.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": 6})})
        return Message(content, reply_to=msg)

    return client_app, spec


def _fedavg_rounds(strategy, client_app, spec, monkeypatch, rounds=2):
    from flwr.app import ArrayRecord, ConfigRecord

    for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, key, value)
    grid = InProcessGrid(client_app, 2)
    result = strategy.start(
        grid, ArrayRecord(build_model(spec, seed=0).state_dict()), num_rounds=rounds,
        train_config=ConfigRecord({"local-lr": 0.5}),
    )
    return result.arrays.to_torch_state_dict()


def test_mod_and_wrapper_in_a_users_app(tmp_path, monkeypatch):
    """With `none`, mod + wrapper are transparent (same global model as plain FedAvg); with `topk`
    the bytes drop and the records hold what the mod sent; another defense is refused."""
    from flwr.serverapp.strategy import FedAvg

    from gia_bench.data import DatasetSpec
    from gia_bench.federated import CaptureStrategy, DefenseMod

    dataset_spec = DatasetSpec("user-data", (1, 4, 4), 3, (0.0,), (1.0,))
    plain_app, spec = _user_client_app([])
    plain = _fedavg_rounds(FedAvg(fraction_evaluate=0.0), plain_app, spec, monkeypatch)
    names = tuple(n for n, _ in build_model(spec, seed=0).named_parameters())
    n_params = sum(p.numel() for p in build_model(spec, seed=0).parameters())
    for defense in ("none", "topk:ratio=0.25"):
        # local_lr from the train config, local steps and batch given to the mod
        mod = DefenseMod(defense, local_steps=2, local_batch=3, param_names=names)
        app_, _ = _user_client_app([mod])
        wrapped = CaptureStrategy(
            FedAvg(fraction_evaluate=0.0), defense, spec, dataset_spec, out=tmp_path / defense, capture_rounds={2}
        )
        got = _fedavg_rounds(wrapped, app_, spec, monkeypatch)
        assert [u.round for u in wrapped.updates] == [1, 1, 2, 2]
        records = sorted((tmp_path / defense).glob("*.safetensors"))
        assert [r.name for r in records] == ["r002-c000.safetensors", "r002-c001.safetensors"]
        for path, upd in zip(records, wrapped.updates[2:]):
            record = load_record(path)
            assert record.meta.bytes_sent == upd.bytes and upd.buffer_bytes == 0
            assert (record.meta.local_steps, record.meta.local_lr, record.meta.local_batch) == (2, 0.5, 3)
        if defense == "none":
            assert all(u.bytes == 4 * n_params for u in wrapped.updates)
            for k in plain:
                torch.testing.assert_close(got[k], plain[k], rtol=1e-5, atol=1e-6)
        else:
            assert all(0 < u.bytes < 4 * n_params for u in wrapped.updates)
            assert any(not torch.allclose(got[k], plain[k]) for k in plain)
    # a client whose mod uses another defense than the server's is refused, naming both
    other, _ = _user_client_app([DefenseMod("fp16", local_steps=2, local_batch=3, param_names=names)])
    strict = CaptureStrategy(FedAvg(fraction_evaluate=0.0), "none", spec, dataset_spec)
    with pytest.raises(CompressorError, match="fp16"):
        _fedavg_rounds(strict, other, spec, monkeypatch, rounds=1)


@pytest.mark.parametrize("defense", ["topk:ratio=0.05", "powersgd:rank=1"])
def test_error_feedback_residual_goes_to_the_truth_file_and_makes_oracle_exact(tmp_path, in_process, defense):
    """A client's private error-feedback residual e reaches the truth file (never the record), so the
    oracle view of a round-2 record reproduces what the client sent from its true update, and the
    aware view (e assumed zero) does not: the two views differ on federated records."""
    from safetensors import safe_open

    from gia_bench.attacks.views import build_view

    cfg = _config(tmp_path, defense)
    result = run_federated(cfg, engine=in_process)
    setup = simulation._setup(cfg)
    names = [n for n, _ in build_model(setup.model_spec, seed=cfg.seed).named_parameters()]
    first = {c["client"]: Path(c["record"]) for c in result.metrics["rounds"][0]["clients"]}
    for c in result.metrics["rounds"][1]["clients"]:
        path, client = Path(c["record"]), c["client"]
        with safe_open(str(path), "pt") as f:  # the record itself holds what a server sees, nothing private
            assert not [k for k in f.keys() if not k.startswith(("msg/", "weight/", "public/"))]
        record = load_record(path)
        assert record.private == {}
        # round 1: a fresh compressor has nothing private; round 2: its residual e is in the truth file
        assert Truth.load(truth_path(first[client])).private == {}
        truth = Truth.load(truth_path(path))
        assert sorted(truth.private) == ["residual"]
        # ... and it is the residual round 1 left: replay the client's round-1 step
        r1 = load_record(first[client])
        x1, y1 = setup.examples(1, client)
        u1, _ = train_locally(record_model(r1), x1, y1, cfg.local)
        replay = create_defense(defense)
        replay.step(u1, LocalCommunicator(record=True), keys=names)
        (e,) = replay.private_state(names, [u.shape for u in u1]).values()
        torch.testing.assert_close(truth.private["residual"], e, rtol=1e-5, atol=1e-7)
        assert float(e.abs().max()) > 0
        # the client's true round-2 update through each view, against what the record observed
        u2, _ = train_locally(record_model(record), truth.inputs, truth.labels, cfg.local)
        candidate = [u[None] for u in u2]
        oracle = build_view(record.with_private(truth), "oracle")
        aware = build_view(record, "aware")
        assert oracle.private_state_used == ("residual",) and aware.private_state_used == ()
        scale = float(oracle.target.abs().max())
        gap_oracle = float((oracle.rows(candidate)[0] - oracle.target).abs().max())
        gap_aware = float((aware.rows(candidate)[0] - aware.target).abs().max())
        assert gap_oracle <= 1e-4 * scale, (gap_oracle, scale)  # exact up to float rounding
        assert gap_aware > 1e-2 * scale, (gap_aware, scale)  # e assumed zero misses the residual
        # the truth file itself holds a non-zero residual, and the two views simulate different messages
        assert float(truth.private["residual"].abs().max()) > 0
        apart = float((oracle.rows(candidate)[0] - aware.rows(candidate)[0]).abs().max())
        assert apart > 1e-2 * scale, (apart, scale)


FED_PLUGIN = '''
import torch
from gia_bench.defenses.base import Compressor, check_messages, flatten, unflatten


class Halver(Compressor):
    """fp32 all-reduce of half the update (the receiver doubles it).

    Args:
        scale: factor applied before sending.
    """

    def __init__(self, scale: float = 0.5):
        self.scale = scale

    def step(self, grads, comm, keys=None):
        flat = flatten(grads) * self.scale
        comm.all_reduce(flat, "half")
        return unflatten(flat / self.scale / comm.world_size, [g.shape for g in grads])

    def decode(self, messages, shapes, public=None):
        check_messages(messages, ["half"], "Halver")
        return unflatten(messages["half"].to(torch.float32) / self.scale, shapes)
'''


@pytest.fixture
def fed_plugin(tmp_path, monkeypatch):
    import importlib
    import sys

    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "fedplug.py").write_text(FED_PLUGIN, encoding="utf-8")
    importlib.invalidate_caches()
    monkeypatch.syspath_prepend(str(folder))
    yield "fedplug:Halver"
    sys.modules.pop("fedplug", None)


def test_plugin_defense_needs_trust_and_plugin_gives_it(tmp_path, in_process, fed_plugin):
    from gia_bench.errors import SpecError

    with pytest.raises(SpecError, match=f"--plugin {fed_plugin}"):
        run_federated(_config(tmp_path, fed_plugin, rounds=1, capture_rounds=(1,)), engine=in_process)
    cfg = _config(tmp_path, fed_plugin, rounds=1, capture_rounds=(1,), plugins=(fed_plugin,))
    result = run_federated(cfg, engine=in_process)
    assert result.metrics["defense"] == f"{fed_plugin}:scale=0.5"
    assert result.metrics["config"]["plugins"] == [fed_plugin]
    from gia_bench.errors import RecordError
    from gia_bench.registry import trusted

    assert result.records
    for path in result.records:
        with pytest.raises(RecordError, match="not trusted"):
            load_record(path)  # the record names the plug-in; trust ended with the run
        with trusted([fed_plugin]):
            assert load_record(path).meta.defense == f"{fed_plugin}:scale=0.5"


def test_cli_federated_plugin_flag_reaches_the_run(tmp_path, in_process, fed_plugin, monkeypatch, capsys):
    """`federated --plugin module:Class` trusts it for the run (here a model spec names nothing; the defense does)."""
    seen = []

    def engine(server_app, client_app, n, backend_config):
        from gia_bench.registry import is_trusted

        seen.append(is_trusted(fed_plugin))
        in_process(server_app, client_app, n, backend_config)

    monkeypatch.setattr(simulation, "flower_simulation", engine)
    out = tmp_path / "run"
    args = [
        "federated", "--dataset", "digits", "--model", "convnet:width=4", "--clients", "2", "--rounds", "1",
        "--local-steps", "2", "--local-batch", "4", "--batch-size", "8", "--out", str(out), "--plugin", fed_plugin,
    ]
    res = CliRunner().invoke(app, args + ["--defense", "none"])
    assert res.exit_code == 0, res.output
    assert seen == [True]
    assert json.loads((out / "metrics.json").read_text())["config"]["plugins"] == [fed_plugin]
    with pytest.raises(SystemExit) as info:
        app(args[:-2] + ["--defense", "none", "--plugin", "not a class"], prog_name="gia-bench")
    assert info.value.code == 2 and "expected module:Class" in capsys.readouterr().err
