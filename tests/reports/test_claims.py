"""The LQ-SGD paper's claims table (gia_bench/reports/claims.py) on training runs and results built by hand."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from gia_bench.results import Budget

from gia_bench.metrics import BatchScores, ImageScores
from gia_bench.reports.claims import (
    Setting,
    claim_bytes_accuracy,
    claim_inversion,
    claim_rank_sweep,
    convergence_rows,
    curves,
    write_claims,
)
from gia_bench.reports.load import AttackResult, EpochPoint, RunSet, TrainRun

LQ1 = "lqsgd:rank=1,bits=8,alpha=10.0"
PS1 = "powersgd:rank=1,start_iter=0"


def _run(defense: str, seed: int, accs: list[float], per_epoch: int) -> TrainRun:
    history = tuple(EpochPoint(epoch=e + 1, step=10 * (e + 1), test_accuracy=a, test_examples=360,
                               bytes_sent_per_worker=per_epoch) for e, a in enumerate(accs))  # fmt: skip
    return TrainRun(path=Path(f"train/{defense}/s{seed}/metrics.json"), dataset="digits", model="convnet",
                    defense=defense, world_size=2, final_test_accuracy=accs[-1], bytes_per_step=per_epoch / 10,
                    bytes_sent_per_worker=per_epoch * len(accs), steps=10 * len(accs), seconds=1.0,
                    history=history, seed=seed)  # fmt: skip


def _trains() -> list[TrainRun]:
    runs = []
    for seed, wiggle in enumerate((-0.002, 0.002)):
        runs.append(_run("none", seed, [0.95 + wiggle, 0.99 + wiggle], 1000))
        runs.append(_run(PS1, seed, [0.90 + wiggle, 0.97 + wiggle], 100))
        runs.append(_run(LQ1, seed, [0.80 + wiggle, 0.975 + wiggle], 25))
        runs.append(_run("powersgd:rank=2", seed, [0.93, 0.98], 200))
        runs.append(_run("lqsgd:rank=2,bits=8", seed, [0.92, 0.90], 50))  # 8 points below PowerSGD r2
    return runs


def test_curves_average_over_seeds_with_standard_errors_and_cumulative_bytes():
    cs = curves(_trains())
    none = cs["none"]
    assert none.seeds == 2 and none.bytes_sent == (1000, 2000)
    m, se = none.final
    assert m == pytest.approx(99.0) and se == pytest.approx(statistics.stdev([98.8, 99.2]) / math.sqrt(2))
    assert cs[LQ1].epochs_to(98.0) is None and cs[PS1].epochs_to(96.0) == 2 and none.epochs_to(94.0) == 1


def test_claim_one_compares_bytes_with_powersgd_and_accuracy_with_sgd():
    claim = claim_bytes_accuracy(curves(_trains()))
    assert claim is not None
    assert "75.0 % fewer bytes" in claim.measured  # 25 vs 100 bytes per epoch
    assert "-1.5 ± 0.3 pts" in claim.measured and claim.verdict == "holds"  # 97.5 vs 99.0, se 0.2 each
    far = [_run("none", 0, [0.99], 100), _run(PS1, 0, [0.97], 100), _run(LQ1, 0, [0.90], 50)]
    verdict = claim_bytes_accuracy(curves(far)).verdict  # 50 % fewer bytes, 9 points below SGD
    assert verdict == "bytes do not hold; accuracy does not hold"


def test_rank_sweep_fails_where_lqsgd_falls_more_than_a_point_below_powersgd():
    claim = claim_rank_sweep(curves(_trains()))
    assert claim is not None and claim.verdict == "does not hold"
    assert "r1: 0.25x bytes" in claim.measured and "r2: 0.25x bytes, -8.0 pts" in claim.measured
    ok = [t for t in _trains() if not t.defense.startswith("lqsgd:rank=2")]
    ok += [_run("lqsgd:rank=2,bits=8", s, [0.9, 0.979], 50) for s in (0, 1)]
    assert claim_rank_sweep(curves(ok)).verdict == "holds"


def test_convergence_rows_give_epochs_to_within_one_point_of_sgds_final_accuracy():
    rows = {r[0]: r for r in convergence_rows(curves(_trains()))}
    assert rows["SGD (none)"][4] == "2" and rows["PowerSGD r1"][4] == "not in 2"
    assert rows["LQ-SGD r1"][4] == "not in 2"  # 97.5 < 99.0 - 1
    assert rows["PowerSGD r2"][4] == "2" and rows["LQ-SGD r1"][1] == "2"


def _result(defense: str, record: str, attack: str, ssim: float) -> AttackResult:
    scores = BatchScores(images=(ImageScores(0, 0, {"ssim": ssim, "psnr": 20.0}),), label_accuracy=1.0, lpips_reason=None)
    return AttackResult(path=Path(f"runs/{defense}/{record}/{attack}/result.json"), record_id=record, record="r",
                        dataset="digits", model="mlp", defense=defense, attack=attack, view="aware", threat={},
                        bytes=1, bytes_fp32=1, batch_size=1, labels_inferred=(0,), labels_true=(0,), seconds=1.0,
                        iterations=1, final_loss=0.0, scores=scores, budget=Budget(1, 1, None, None))  # fmt: skip


def test_inversion_claim_takes_the_strongest_attack_per_record_and_pairs_records():
    results = []
    for i in range(8):
        rec = f"r{i}"
        results += [_result("none", rec, "dlg", 0.9), _result("none", rec, "analytic", 0.99)]
        results += [_result(PS1, rec, "dlg", 0.5), _result(PS1, rec, "analytic", 0.6 + 0.01 * i)]
        results += [_result(LQ1, rec, "dlg", 0.3 + 0.01 * i), _result(LQ1, rec, "feature", 0.2)]
    claim = claim_inversion(results)
    assert claim is not None and claim.verdict == "holds"
    assert "SGD (none) 0.990" in claim.measured and "LQ-SGD 0.335" in claim.measured  # max per record, then mean
    assert "lower by +0.300 ± 0.000, 8 records" in claim.measured and "dlg/aware" in claim.measured
    # an LQ-SGD record as recoverable as PowerSGD's: the claim no longer holds
    same = [r for r in results if r.defense != LQ1] + [_result(LQ1, f"r{i}", "analytic", 0.6 + 0.01 * i) for i in range(8)]
    assert claim_inversion(same).verdict == "does not hold"


def test_write_claims_writes_the_table_and_both_figures(tmp_path):
    files = write_claims(RunSet(results=(), trains=tuple(_trains()), skipped=()), tmp_path)
    assert sorted(p.name for p in files) == ["claims-accuracy-vs-bytes.png", "claims-accuracy-vs-epoch.png", "claims.md"]
    md = (tmp_path / "claims.md").read_text()
    assert "| the paper's claim | gia-bench measured | verdict |" in md and "epochs to within 1 point" in md
    assert all(p.stat().st_size > 1000 for p in files)
    # no SGD run beside the compressors: nothing to claim, nothing written
    assert write_claims(RunSet((), tuple(t for t in _trains() if t.defense != "none"), ()), tmp_path / "x") == []


def test_setting_reads_family_and_rank_from_canonical_specs():
    assert Setting.of("lqsgd:rank=7,bits=8,alpha=10.0") == Setting("lqsgd", 7)
    assert Setting.of("none") == Setting("none", None) and Setting.of("powersgd:rank=2").label == "PowerSGD r2"


def test_inversion_claim_does_not_hold_where_every_defense_is_recovered_alike():
    """SSIM 0.99997 against 1.0 is the same image: a difference below SSIM_MATTERS is not 'lower'."""
    results = []
    for i in range(7):
        results += [_result("none", f"r{i}", "analytic", 1.0), _result(PS1, f"r{i}", "dlg", 1.0)]
        results += [_result(LQ1, f"r{i}", "dlg", 0.99997)]
    claim = claim_inversion(results)
    assert claim is not None and claim.verdict == "does not hold", claim
