"""Few-bit records (issue 29): captured, checked and attacked in both views, by the Python API,
``gia-bench attack`` and ``gia-bench study run`` (the path ``gia-bench demo`` takes).

The record check builds the model under ``torch.device("meta")``; the few-bit tables are
cached, so a process whose first few-bit model is built there (any fresh ``attack``)
must still get tables with data. Each test starts from a cold table cache, or a fresh
process, so that it is the meta build that fills the cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gia_bench import fewbit
from gia_bench.capture import CaptureConfig, capture, compute_gradient
from gia_bench.evaluate import run_attack
from gia_bench.models import build_model
from gia_bench.receiver import decode_record, load_record, record_model
from gia_bench.records import ModelSpec, Truth, truth_path

REPO = Path(__file__).parents[1]
ATTACK = "dlg:iterations=2"  # the record's path through the attack is what is tested, not its quality


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "gia_bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_tables_first_built_under_the_meta_device_have_data():
    fewbit.table.cache_clear()
    spec = ModelSpec("lenet", (3, 32, 32), 10, "train", 2)
    with torch.device("meta"):
        build_model(spec, seed=None, device=None)  # as check_record does, first in the process
    t = fewbit.table("sigmoid", 2)
    assert t.boundaries.device.type == "cpu" and t.values.device.type == "cpu"
    model = build_model(spec, seed=0)  # the attacker's model, from the same cache: was "Cannot copy out of meta"
    acts = [m for m in model.modules() if isinstance(m, fewbit.FewBitActivation)]
    assert len(acts) == 3 and all(torch.equal(a.values, t.values) for a in acts)
    assert torch.isfinite(model(torch.zeros(1, 3, 32, 32))).all()


def test_few_bit_record_is_rebuilt_exactly_and_attacked_in_both_views(tmp_path):
    (path,) = capture(CaptureConfig("digits", "lenet", "topk:ratio=0.1", 1, 1, 0, tmp_path / "rec", fewbit_backward=2))
    fewbit.table.cache_clear()
    record = load_record(path)  # the meta-device check runs first, on a cold cache
    model = record_model(record)
    assert sum(isinstance(m, fewbit.FewBitActivation) and m.bits == 2 for m in model.modules()) == 3
    # the attacker's model gives the worker's few-bit gradient on the true batch, not the exact one
    truth = Truth.load(truth_path(path))
    grads = compute_gradient(model, truth.inputs, truth.labels)
    exact = build_model(dataclasses.replace(record.meta.model, fewbit_backward=0), seed=None)
    exact.load_state_dict(record.weights)
    exact_grads = compute_gradient(exact, truth.inputs, truth.labels)
    # top-k sends some entries of the worker's gradient: the rebuilt few-bit model gives them, the exact one not
    sent = torch.cat([c.reshape(-1) for c in decode_record(record)])
    kept = sent != 0
    few = torch.cat([g.reshape(-1) for g in grads])[kept]
    exact_kept = torch.cat([e.reshape(-1) for e in exact_grads])[kept]
    assert int(kept.sum()) > 100
    torch.testing.assert_close(sent[kept], few, rtol=1e-5, atol=1e-6)
    assert float((exact_kept - sent[kept]).abs().max()) > 100 * float((few - sent[kept]).abs().max()) + 1e-4
    for view in ("naive", "aware"):
        result = json.loads(run_attack(path, ATTACK, view, tmp_path / "runs").read_text())
        assert result["view"] == view and result["iterations"] == 2 and result["record_id"] == record.meta.record_id
        assert result["scores"]["label_accuracy"] is not None


def test_cli_captures_and_attacks_a_few_bit_record_in_both_views(tmp_path):
    # a fresh process, as the user ran it: the record check is the first to build the few-bit model
    cap = _cli("capture", "--dataset", "digits", "--model", "lenet", "--defense", "none", "--fewbit-backward", "2",
               "--num", "1", "--out", "fb", cwd=tmp_path)  # fmt: skip
    assert cap.returncode == 0, cap.stderr
    res = _cli("attack", "fb", "--attack", ATTACK, "--view", "naive", "--view", "aware", "--out", "r", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "meta" not in res.stderr
    results = sorted((tmp_path / "r").glob("none/*/*/result.json"))
    assert [json.loads(p.read_text())["view"] for p in results] == ["aware", "naive"]


STUDY = """
name = "fewbit"
datasets = ["digits"]
models = ["lenet"]
images = 1
defenses = ["topk:ratio=0.1"]
attacks = ["dlg:iterations=2"]
views = ["naive", "aware"]
fewbit_backward = 2
"""


def test_study_run_captures_and_attacks_few_bit_records(tmp_path):
    """``study run`` (and ``demo``, which runs its study file through the same path) with ``fewbit_backward``.

    Then the results are removed and the study resumed in a new process: the captures are
    on disk, so no capture warms the few-bit tables before the attacks' record checks.
    """
    from gia_bench.records import read_meta

    study = tmp_path / "fewbit.toml"
    study.write_text(STUDY)
    out = tmp_path / "out"
    for run in ("fresh", "resumed"):
        if run == "resumed":
            for p in out.glob("runs/*/*/*/*/result.json"):
                p.unlink()
        proc = _cli("study", "run", str(study), "--out", "out", cwd=tmp_path)
        assert proc.returncode == 0, (run, proc.stderr)
        results = sorted(out.glob("runs/*/*/*/*/result.json"))
        assert sorted(json.loads(p.read_text())["view"] for p in results) == ["aware", "naive"], run
        assert json.loads((out / "failures.json").read_text()) == [], run
    records = [p for p in out.glob("records/*/*/*.safetensors") if not p.name.endswith(".truth.safetensors")]
    assert [read_meta(p).model.fewbit_backward for p in records] == [2]
