"""The local_steps-aware objective: the attack simulates the client's K local steps on its candidates."""

from __future__ import annotations

import json

import torch

from gia_bench.evaluate import run_attack
from gia_bench.attacks.matching import CandidateGradients, attack_model, candidate_function
from gia_bench.attacks.objectives import SquaredL2
from gia_bench.attacks.views import build_view
from gia_bench.capture import capture_batch
from gia_bench.defenses import create as create_defense
from gia_bench.fedavg import CandidateUpdates, LocalTraining
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import truth_path
from gia_bench.receiver import decode_record

from conftest import dataset


def total_distance(objective, candidates: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """The objective over the whole observation (keys concatenated), as the attacks bind it."""
    return objective.bind_segments(targets)(candidates)


def _fedavg_record(defense: str = "none", steps: int = 3, batch: int = 2, local_batch: int | None = None):
    ds = dataset("digits")
    spec = ds.spec
    inputs, labels = ds.batch(list(range(batch)))
    ms = ModelSpec("lenet", spec.shape, spec.num_classes, "train")
    net = build_model(ms, seed=0)
    local = LocalTraining(steps, 0.1, local_batch)
    return capture_batch(net, ms, spec, inputs, labels, create_defense(defense), f"fedavg-{steps}", local=local)


def _distance(record, view, candidates, x, y):
    threat = build_view(record, view)
    return float(total_distance(SquaredL2(), threat.transform(candidates(x[None], y[None])), list(threat.targets)).detach())


def test_fedavg_objective_is_zero_at_the_truth_and_the_gradient_objective_is_not():
    record, truth = _fedavg_record(steps=3, local_batch=1)
    model = attack_model(record, "cpu")
    fn = candidate_function(model, record)
    assert isinstance(fn, CandidateUpdates)
    scale = float(sum(g.pow(2).sum() for g in decode_record(record)))
    assert _distance(record, "naive", fn, truth.inputs, truth.labels) <= 1e-10 * scale
    single = CandidateGradients(model, record.meta.param_names)
    assert _distance(record, "naive", single, truth.inputs, truth.labels) > 1e-3 * scale
    noise = torch.randn(truth.inputs.shape, generator=torch.Generator().manual_seed(0))
    assert _distance(record, "naive", fn, noise, truth.labels) > 1e-3 * scale
    # and it is differentiable in the candidate images
    x = truth.inputs.clone().add_(0.1 * noise).requires_grad_(True)
    threat = build_view(record, "naive")
    d = total_distance(SquaredL2(), threat.transform(fn(x[None], truth.labels[None])), list(threat.targets)).sum()
    (grad,) = torch.autograd.grad(d, x)
    assert float(grad.abs().sum()) > 0


def test_fedsgd_records_keep_the_gradient_objective():
    ds = dataset("digits")
    inputs, labels = ds.batch([0])
    ms = ModelSpec("lenet", ds.spec.shape, 10, "train")
    record, _ = capture_batch(build_model(ms, seed=0), ms, ds.spec, inputs, labels, create_defense("none"), "r")
    assert isinstance(candidate_function(attack_model(record, "cpu"), record), CandidateGradients)


def test_aware_view_of_a_compressed_fedavg_update_is_matched_at_the_truth():
    record, truth = _fedavg_record("topk:ratio=0.1", steps=2)
    fn = candidate_function(attack_model(record, "cpu"), record)
    threat = build_view(record, "aware")
    scale = float(sum(t.pow(2).sum() for t in threat.targets))
    assert _distance(record, "aware", fn, truth.inputs, truth.labels) <= 1e-10 * scale


def test_result_threat_says_what_the_attacker_assumed(tmp_path):
    record, truth = _fedavg_record(steps=2, batch=1)
    path = record.save(tmp_path / "r.safetensors")
    truth.save(truth_path(path))
    out = run_attack(path, "ig:iterations=2", "naive", tmp_path / "runs", seed=0)
    threat = json.loads(out.read_text())["threat"]
    assert threat["update"] == "FedAvg update after 2 local SGD steps, lr 0.1, local batch 1 of 1 (cyclic)"
