import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import gia_bench.records as records_module
from gia_bench.attacks import ATTACKS, create, run_attack
from gia_bench.cli import app
from gia_bench.errors import GiaBenchError
from gia_bench.records import truth_path

from conftest import make_record, pick

# Paths the attack must not open; an audit hook sees every Python-level open().
_FORBIDDEN: set[str] = set()
_OPENED: list[str] = []


def _audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        path = str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()).resolve())
        if path in _FORBIDDEN:
            _OPENED.append(path)


sys.addaudithook(_audit)


def _save(tmp_path, model="lenet", indices=(5,), defense="none", truth=True, **kw):
    record, t = make_record(model, "photos", indices, defense=defense, **kw)
    path = record.save(tmp_path / f"{record.record_id}.safetensors")
    if truth:
        t.save(truth_path(path))
    return path, record, t


def test_result_json_and_files(tmp_path):
    path, record, truth = _save(tmp_path, indices=pick("photos", (3, 6)), pixel_space=True)
    out = run_attack(path, "dlg:iterations=5", "naive", tmp_path / "runs", seed=0)
    assert out == tmp_path / "runs" / record.record_id / "dlg_iterations-5-naive" / "result.json"
    result = json.loads(out.read_text())
    assert result["schema"] == 1 and result["kind"] == "attack_result"
    assert result["defense"] == "none" and result["view"] == "naive"
    assert result["attack"] == create("dlg:iterations=5").spec
    assert result["bytes"] == record.meta.bytes_sent
    assert result["bytes_fp32"] == 4 * sum(s.numel() for s in record.param_shapes) == result["bytes"]
    assert result["batch_size"] == 2 and result["iterations"] == 5
    assert result["threat"]["labels"] == "inferred (bias-corrected)"
    assert result["threat"]["observed"] == "decoded gradient" and result["threat"]["compressor_known"] is False
    assert result["labels_true"] == truth.labels.tolist()
    assert sorted(result["labels_inferred"]) == sorted(truth.labels.tolist())
    assert len(result["psnr"]) == len(result["ssim"]) == len(result["lpips"]) == 2
    assert result["metrics"]["images"][0]["psnr"] == result["psnr"][0]
    assert 0.0 <= result["label_accuracy"] <= 1.0
    assert (result["lpips"][0] is None) == (result["lpips_reason"] is not None)
    saved = load_file(str(out.parent / "reconstruction.safetensors"))
    assert saved["reconstruction"].shape == saved["original"].shape == (2, 3, 32, 32)
    # reordered: index i pairs with original i
    assert torch.allclose(saved["original"], truth.inputs.clamp(0, 1))
    assert (out.parent / "reconstruction.png").stat().st_size > 0


def test_runs_are_resumable(tmp_path):
    path, _, _ = _save(tmp_path)
    out = run_attack(path, "dlg:iterations=2", "aware", tmp_path / "runs")
    stamp = out.stat().st_mtime_ns
    assert run_attack(path, "dlg:iterations=2", "aware", tmp_path / "runs") == out
    assert out.stat().st_mtime_ns == stamp
    assert json.loads(out.read_text())["threat"]["observed"] == "messages"


def test_without_truth_no_metrics(tmp_path):
    path, _, _ = _save(tmp_path, truth=False)
    result = json.loads(run_attack(path, "dlg:iterations=2", "naive", tmp_path / "runs").read_text())
    assert result["metrics"] is None and result["psnr"] is None and result["labels_true"] is None
    assert result["label_accuracy"] is None


def test_attacks_never_open_the_truth_file(tmp_path, monkeypatch):
    path, _, _ = _save(tmp_path)
    tpath = str(truth_path(path).resolve())
    events: list[str] = []

    real_safe_open = safetensors.safe_open

    def watched_safe_open(name, *args, **kwargs):
        if str(Path(name).resolve()) == tpath:
            events.append("truth opened")
        return real_safe_open(name, *args, **kwargs)

    monkeypatch.setattr(records_module, "safe_open", watched_safe_open)
    for name in ("dlg", "ig"):
        cls = ATTACKS.get(name)
        monkeypatch.setattr(cls, "run", lambda self, *a, _run=cls.run, **k: _guard(_run, self, a, k))

    def _guard(run, self, args, kwargs):
        _FORBIDDEN.add(tpath)
        events.append("attack start")
        try:
            return run(self, *args, **kwargs)
        finally:
            _FORBIDDEN.discard(tpath)
            events.append("attack end")

    _OPENED.clear()
    run_attack(path, "dlg:iterations=2", "naive", tmp_path / "runs")
    run_attack(path, "ig:iterations=2", "aware", tmp_path / "runs")
    assert _OPENED == []
    # the runner reads the truth only after each attack has returned, to score
    assert events == ["attack start", "attack end", "truth opened"] * 2


def test_bad_inputs_raise_clear_errors(tmp_path):
    path, _, _ = _save(tmp_path, model="lenet")
    with pytest.raises(GiaBenchError, match="no 'aware' view"):
        run_attack(path, "analytic", "aware", tmp_path / "runs")
    with pytest.raises(GiaBenchError, match="unknown attack 'nope'"):
        run_attack(path, "nope", "naive", tmp_path / "runs")
    with pytest.raises(GiaBenchError, match="unknown parameter 'iters'"):
        run_attack(path, "ig:iters=3", "naive", tmp_path / "runs")
    with pytest.raises(GiaBenchError, match="unknown objective"):
        run_attack(path, "ig:loss=huber", "naive", tmp_path / "runs")
    with pytest.raises(GiaBenchError, match="fully connected"):
        run_attack(path, "analytic", "naive", tmp_path / "runs")


def test_cli_attack(tmp_path):
    path, record, _ = _save(tmp_path)
    runner = CliRunner()
    res = runner.invoke(
        app, ["attack", str(tmp_path), "--attack", "dlg:iterations=2", "--view", "naive", "--view", "aware",
              "--out", str(tmp_path / "runs")],
    )
    assert res.exit_code == 0, res.output
    for view in ("naive", "aware"):
        assert (tmp_path / "runs" / record.record_id / f"dlg_iterations-2-{view}" / "result.json").exists()
    bad = runner.invoke(app, ["attack", str(path), "--view", "blind"])
    assert isinstance(bad.exception, GiaBenchError) and "--view 'blind'" in str(bad.exception)
    # through the real entry point: one red line naming the defense, exit code 2
    script = Path(sys.executable).with_name("gia-bench")
    proc = subprocess.run(
        [str(script), "attack", str(path), "--attack", "analytic", "--view", "aware", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "no 'aware' view" in proc.stderr and "Traceback" not in proc.stderr
