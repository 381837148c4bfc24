"""FedAvg records: local_update against a plain SGD loop, differentiability, capture round trip, validation."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from gia_bench.capture import CaptureConfig, capture, compute_gradient
from gia_bench.cli import app
from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create as create_defense
from gia_bench.errors import RecordError, SpecError
from gia_bench.fedavg import LocalTraining, local_update, step_indices
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import GradientRecord, Truth, truth_path
from gia_bench.receiver import decode_record, load_record, record_model

SMALL = {"dataset": "digits", "model": "lenet", "batch_size": 4, "num": 2, "seed": 0}


def _reference_update(model, x, y, steps, lr, b):
    """A hand-written FedAvg client: torch.optim.SGD on a copy, then (w_0 - w_K) / lr."""
    net = copy.deepcopy(model)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    n = x.shape[0]
    for k in range(steps):
        idx = [(k * b + j) % n for j in range(b)]
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return [(p0.detach() - p1.detach()) / lr for p0, p1 in zip(model.parameters(), net.parameters())]


def test_step_indices_are_cyclic_in_record_order():
    assert [step_indices(k, 3, 4) for k in range(3)] == [[0, 1, 2], [3, 0, 1], [2, 3, 0]]
    assert step_indices(5, 4, 4) == [0, 1, 2, 3]


def test_one_full_batch_step_is_exactly_the_gradient():
    spec = ModelSpec("lenet", (3, 32, 32), 10)
    model = build_model(spec, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32, generator=g), torch.tensor([1, 4, 1])
    for got, want in zip(local_update(model, x, y, 1, 0.3, 3), compute_gradient(model, x, y)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("model_spec, steps, b", [("lenet", 3, 2), ("convnet:width=4", 2, 3), ("mlp:hidden=16", 5, 1)])
def test_local_update_matches_a_plain_sgd_loop_and_leaves_the_model_alone(model_spec, steps, b):
    spec = ModelSpec(model_spec, (1, 16, 16), 10, "train")
    model = build_model(spec, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(4, 1, 16, 16, generator=g), torch.tensor([0, 3, 3, 9])
    lr = 0.05
    got = local_update(model, x, y, steps, lr, b)
    # the reference runs on a copy whose train-mode BatchNorm statistics move, as a real client's do
    want = _reference_update(model, x, y, steps, lr, b)
    for a, w in zip(got, want):
        assert torch.allclose(a, w, rtol=1e-4, atol=1e-5), (a - w).abs().max()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # weights and BN stats unchanged
    # the K steps are not K copies of the first gradient (the weights moved between steps)
    first = compute_gradient(model, x[:b], y[:b])
    assert any(not torch.allclose(a, steps * f, atol=1e-4) for a, f in zip(got, first))


def test_local_update_is_differentiable_in_the_images():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Sigmoid(), torch.nn.Linear(5, 3)).double()
    y = torch.tensor([0, 2, 2])
    v = [torch.randn_like(p) for p in model.parameters()]

    def f(x):
        u = local_update(model, x, y, 3, 0.7, 2, create_graph=True)
        return sum((a * b).sum() for a, b in zip(u, v))

    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)
    # without create_graph the update is detached
    assert not any(t.requires_grad for t in local_update(model, x, y, 2, 0.7, 2))


def test_local_training_validation():
    for bad, fragment in [
        (LocalTraining(0), "--local-steps must be an integer in [1, 10000]"),
        (LocalTraining(2, float("nan")), "--local-lr must be a finite number > 0"),
        (LocalTraining(2, -0.1), "--local-lr"),
        (LocalTraining(2, 0.1, 5), "--local-batch must be an integer in [1, --batch-size 4]"),
        (LocalTraining(1, 0.1, 2), "capture --batch-size 2 instead"),
    ]:
        with pytest.raises(SpecError, match=None) as exc:
            bad.check(4)
        assert fragment in str(exc.value)
    assert LocalTraining(1, 0.1, 4).is_fedsgd(4) and LocalTraining(1, 5.0).meta_fields(4) == {}
    assert LocalTraining(3, 0.1).meta_fields(4) == {"local_steps": 3, "local_lr": 0.1, "local_batch": 4}


# -- records ---------------------------------------------------------------------------------------


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_k1_defaults_keep_todays_fedsgd_bytes(tmp_path):
    capture(CaptureConfig(defense="none", out=tmp_path / "a", **{**SMALL, "num": 1}))
    capture(CaptureConfig(defense="none", out=tmp_path / "b", local_steps=1, local_lr=0.7, local_batch=4, **{**SMALL, "num": 1}))
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    path = tmp_path / "a" / "digits-lenet-0000.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["gia_bench"])
    assert not {"local_steps", "local_lr", "local_batch"} & set(meta)
    assert load_record(path).meta.is_fedsgd


def _simulated(record: GradientRecord, truth: Truth) -> list[torch.Tensor]:
    """The attacker's simulation at the true data: the record's model, its public (K, lr, b)."""
    meta = record.meta
    return local_update(
        record_model(record), truth.inputs, truth.labels, meta.local_steps, meta.local_lr, meta.local_batch
    )


def test_k2_fedavg_record_round_trips_and_simulates_to_the_recorded_update(tmp_path):
    paths = capture(CaptureConfig(defense="none", out=tmp_path, local_steps=2, local_lr=0.5, local_batch=3, **SMALL))
    for path in paths:
        record, truth = load_record(path), Truth.load(truth_path(path))
        meta = record.meta
        assert (meta.local_steps, meta.local_lr, meta.local_batch) == (2, 0.5, 3) and not meta.is_fedsgd
        assert record.meta == load_record(record.save(tmp_path / "copy.safetensors")).meta
        decoded, simulated = decode_record(record), _simulated(record, truth)
        assert all(torch.equal(a, b) for a, b in zip(decoded, simulated))
        # and it is the update, not the gradient of the first mini-batch
        first = compute_gradient(record_model(record), truth.inputs[:3], truth.labels[:3])
        assert not torch.allclose(decoded[-1], first[-1])
    # resumable: the same FedAvg capture again keeps the files; another K in the same folder is refused
    before = _hashes(tmp_path)
    capture(CaptureConfig(defense="none", out=tmp_path, local_steps=2, local_lr=0.5, local_batch=3, **SMALL))
    assert _hashes(tmp_path) == before
    with pytest.raises(RecordError, match="local_steps"):
        capture(CaptureConfig(defense="none", out=tmp_path, local_steps=3, local_lr=0.5, local_batch=3, **SMALL))


@pytest.mark.parametrize("defense", ["topk:ratio=0.05", "lqsgd:rank=1"])
def test_compressed_fedavg_record_decodes_to_the_compressed_update(tmp_path, defense):
    (path,) = capture(CaptureConfig(defense=defense, out=tmp_path, local_steps=3, local_lr=0.2, **{**SMALL, "num": 1}))
    record, truth = load_record(path), Truth.load(truth_path(path))
    u = _simulated(record, truth)
    comm = LocalCommunicator(record=True)
    create_defense(defense).step(u, comm, keys=list(record.meta.param_names))
    fresh = create_defense(defense).decode(messages_by_tag(comm.messages), record.param_shapes, record.public)
    for a, b in zip(decode_record(record), fresh):
        assert torch.equal(a, b)


def _rewrite_meta(path, **changes):
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = dict(fh.metadata())
    meta = json.loads(metadata["gia_bench"])
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    metadata["gia_bench"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"local_steps": 0}, "local_steps 0 is outside [1, 10000]"),
        ({"local_steps": 10_001}, "local_steps 10001 is outside"),
        ({"local_steps": 2.5}, "local_steps must be an integer"),
        ({"local_steps": "2"}, "local_steps must be an integer"),
        ({"local_batch": 5}, "local_batch 5 is outside [1, batch_size 4]"),
        ({"local_batch": 0}, "local_batch 0 is outside"),
        ({"local_lr": 0}, "local_lr 0.0 must be finite and > 0"),
        ({"local_lr": float("inf")}, "local_lr inf must be finite"),
        ({"local_lr": "0.1"}, "local_lr must be a number"),
        ({"local_lr": None}, "present without ['local_lr']"),
    ],
)
def test_bad_fedavg_metadata_is_refused(tmp_path, changes, fragment):
    (path,) = capture(CaptureConfig(defense="none", out=tmp_path, local_steps=2, local_lr=0.5, **{**SMALL, "num": 1}))
    _rewrite_meta(path, **changes)
    with pytest.raises(RecordError) as exc:
        load_record(path)
    assert str(path) in str(exc.value) and fragment in str(exc.value), str(exc.value)


def _cli(args):
    with pytest.raises(SystemExit) as exc:
        app(args, prog_name="gia-bench")
    return int(exc.value.code or 0)


def test_cli_capture_fedavg(tmp_path, capsys):
    out = tmp_path / "rec"
    code = _cli(["capture", "--batch-size", "4", "--num", "1", "--out", str(out),
                 "--local-steps", "2", "--local-lr", "0.25", "--local-batch", "2"])
    assert code == 0, capsys.readouterr()
    record = load_record(out / "digits-lenet-0000.safetensors")
    assert (record.meta.local_steps, record.meta.local_lr, record.meta.local_batch) == (2, 0.25, 2)
    capsys.readouterr()
    for args, fragment in [
        (["--local-steps", "0"], "--local-steps must be an integer in [1, 10000]"),
        (["--local-steps", "2", "--local-batch", "9"], "--local-batch must be an integer in [1, --batch-size 4]"),
        (["--local-steps", "2", "--local-lr", "-1"], "--local-lr must be a finite number > 0"),
    ]:
        code = _cli(["capture", "--batch-size", "4", "--num", "1", "--out", str(tmp_path / "x"), *args])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
