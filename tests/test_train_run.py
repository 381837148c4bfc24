"""Records along a training run and the default learning rate.

A 2-worker gloo run captures both ranks' messages at chosen steps: the records hold what
was sent (and the public ``P_sum``), so the workers' decodes average to the aggregate the
optimizer applied; on such a mid-training record the oracle view (residual from the truth
file) is exact at the true batch and the aware view (residual assumed zero) is not.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from gia_bench.attacks.views import build_view
from gia_bench.capture import compute_gradient
from gia_bench.errors import ConfigError
from gia_bench.records import Truth, truth_path
from gia_bench.train import (
    TrainConfig,
    default_lr,
    default_warmup,
    launch,
    lr_at,
    parse_capture_steps,
)
from gia_bench.train.records import record_path
from gia_bench.receiver import decode_record, load_record, record_model

DATASET = "digits:size=8,channels=1"
MODEL = "mlp:hidden=32"
STEPS = 4  # per epoch


def test_default_lr_rule_scales_with_the_global_batch(tmp_path):
    assert default_lr(256) == pytest.approx(0.1) and default_lr(64) == pytest.approx(0.025)
    assert default_lr(1024) == pytest.approx(4 * default_lr(256))
    config = TrainConfig(out=tmp_path, batch_size=32)
    assert config.lr is None
    assert config.peak_lr(1) == pytest.approx(0.0125) and config.peak_lr(4) == pytest.approx(0.05)
    assert TrainConfig(out=tmp_path, batch_size=32, lr=0.3).peak_lr(4) == 0.3  # a given lr is kept
    # linear warm-up to the peak, then cosine decay to 0
    total, warm = 400, default_warmup(400)
    assert warm == 20  # 5 % of a long run
    # a short run still warms up over 10 steps (or its first epoch, or all of it, when shorter):
    # 2 steps of warm-up in 3 epochs of 11 diverged uncompressed SGD (benchmarks/lqsgd_convergence.py)
    assert default_warmup(33, 11) == 10 and default_warmup(24, 4) == 4 and default_warmup(3) == 3
    assert default_warmup(100) == 10 and default_warmup(1, 1) == 1
    lrs = [lr_at(0.2, "cosine", s, total, 5) for s in range(total)]
    assert lrs[:5] == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 1e-3
    assert lr_at(0.2, "constant", 50, total, warm) == 0.2
    assert lr_at(0.2, "cosine", 0, total, 0) == 0.2  # no warm-up
    with pytest.raises(ConfigError, match="--lr-warmup-steps"):
        TrainConfig(out=tmp_path, lr_warmup_steps=-1).validate()


def test_capture_steps_parse_and_plan(tmp_path):
    assert parse_capture_steps("0, 50,end") == (0, 50, "end")
    with pytest.raises(ConfigError, match="--capture-steps"):
        parse_capture_steps("0,last")
    config = TrainConfig(out=tmp_path, capture_steps=(5, "end", 0))
    assert config.capture_plan(8) == (0, 5, 7)
    with pytest.raises(ConfigError, match="only 8 optimizer steps"):
        TrainConfig(out=tmp_path, capture_steps=(8,)).capture_plan(8)


@pytest.mark.parametrize("defense", ["powersgd:rank=2", "lqsgd:rank=2,bits=8"])
def test_two_worker_records_decode_to_the_applied_aggregate(tmp_path, defense):
    # momentum and weight decay 0: the update of step s is exactly lr_s x the aggregate
    out = tmp_path / "run"
    metrics = launch(
        TrainConfig(
            out=out, dataset=DATASET, model=MODEL, defense=defense, nproc_per_node=2, epochs=2, batch_size=16,
            momentum=0.0, weight_decay=0.0, max_steps_per_epoch=STEPS, timeout_s=60,
            capture_steps=(0, 5, 6, "end"), capture_ranks=(0, 1),
        ),
        fork=True,
    )
    assert metrics["lr"]["rule"] == "0.1 x global batch / 256" and metrics["global_batch"] == 32
    assert metrics["lr"]["peak"] == pytest.approx(0.1 * 32 / 256)
    assert sorted(metrics["records"], key=int) == ["0", "5", "6", "7"]
    assert all(e["test_examples"] == 359 for e in metrics["epochs"])
    recs = {(s, r): load_record(record_path(out / "records", s, r)) for s in (5, 6) for r in (0, 1)}
    r5 = recs[5, 0]
    assert r5.meta.step == 5 and r5.meta.extra["source"] == "train" and r5.meta.extra["world_size"] == 2
    assert "P_sum" in r5.public and "Q_init" in r5.public
    shares = [decode_record(recs[5, r]) for r in (0, 1)]
    lr = r5.meta.extra["lr"]
    for name, a, b in zip(r5.meta.param_names, *shares):
        applied = (r5.weights[name] - recs[6, 0].weights[name]) / lr
        torch.testing.assert_close((a + b) / 2, applied, rtol=1e-3, atol=1e-5)

    # mid-training: the oracle simulation is exact at the true batch, the aware one is not
    truth = Truth.load(truth_path(r5.path))
    assert float(truth.private["residual"].abs().sum()) > 0
    grads = [g.unsqueeze(0) for g in compute_gradient(record_model(r5), truth.inputs, truth.labels)]

    def distance(view) -> float:
        cand = view.transform(grads)
        num = sum(float((c[0] - t).pow(2).sum()) for c, t in zip(cand, view.targets))
        return num / sum(float(t.pow(2).sum()) for t in view.targets)

    exact = distance(build_view(r5.with_private(truth), "oracle"))
    assumed = distance(build_view(r5, "aware"))
    assert exact < 1e-8 and assumed > 1e3 * max(exact, 1e-12)


def test_attack_result_names_the_step_and_source(tmp_path):
    from gia_bench.evaluate import run_attack

    out = tmp_path / "run"
    launch(
        TrainConfig(
            out=out, dataset=DATASET, model=MODEL, defense="topk:ratio=0.2", nproc_per_node=2, epochs=1,
            batch_size=4, max_steps_per_epoch=STEPS, timeout_s=60, capture_steps=(2,),
        ),
        fork=True,
    )
    results = {}
    for view in ("aware", "oracle"):
        path = run_attack(record_path(out / "records", 2), "dlg:iterations=2", view, tmp_path / "att")
        results[view] = json.loads(path.read_text())
    for view, result in results.items():
        assert result["step"] == 2 and result["source"] == "train" and result["view"] == view
        assert all(math.isfinite(im["psnr"]) for im in result["scores"]["images"])
    assert results["oracle"]["threat"]["upper_bound"] is True
    assert "assumed zero" in results["aware"]["threat"]["residual"]
