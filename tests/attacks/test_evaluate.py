import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import gia_bench.records as records_module
from gia_bench.attacks import ATTACKS, create
from gia_bench.evaluate import (
    AttackOptions,
    AttackOutcome,
    ResultConflictError,
    evaluate,
    result_line,
    run_attack,
    run_attacks,
)
from gia_bench.cli import app
from gia_bench.errors import GiaBenchError
from gia_bench.events import Recorded
from gia_bench.records import truth_path
from gia_bench.receiver import load_record
from gia_bench.results import RESULT_SCHEMA, AttackResult

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
    assert out == tmp_path / "runs" / "none" / record.record_id / "dlg_iterations-5-naive" / "result.json"
    result = json.loads(out.read_text())
    assert result["schema"] == RESULT_SCHEMA == 3 and result["kind"] == "attack_result"
    assert result["defense"] == "none" and result["view"] == "naive"
    assert result["attack"] == create("dlg:iterations=5").spec
    assert result["bytes"] == record.meta.bytes_sent
    assert result["bytes_fp32"] == 4 * sum(s.numel() for s in record.param_shapes) == result["bytes"]
    assert result["batch_size"] == 2 and result["iterations"] == 5
    assert result["threat"]["labels"] == "inferred (mean-embedding-eb)"
    assert result["threat"]["observed"] == "decoded gradient" and result["threat"]["compressor_known"] is False
    assert result["labels_true"] == truth.labels.tolist()
    assert sorted(result["labels_inferred"]) == sorted(truth.labels.tolist())
    images = result["scores"]["images"]
    assert len(images) == 2 and all({"psnr", "ssim", "lpips", "st_lpips", "ms_ssim"} <= set(im) for im in images)
    assert 0.0 <= result["scores"]["label_accuracy"] <= 1.0
    assert (images[0]["lpips"] is None) == (result["scores"]["lpips_reason"] is not None)
    # the budget it ran with, and the published one it is compared with (DLG: 300 L-BFGS steps)
    assert result["budget"]["iterations"] == 5 and result["budget"]["published"]["iterations"] == 300
    assert AttackResult.read(out).budget.published == create("dlg").published_budget
    saved = load_file(str(out.parent / "reconstruction.safetensors"))
    assert saved["reconstruction"].shape == saved["original"].shape == (2, 3, 32, 32)
    # reordered: index i pairs with original i
    assert torch.allclose(saved["original"], truth.inputs.clamp(0, 1))
    assert (out.parent / "reconstruction.png").stat().st_size > 0


def test_runs_are_resumable(tmp_path):
    path, _, _ = _save(tmp_path)
    events = Recorded()
    out = run_attack(path, "dlg:iterations=2", "aware", tmp_path / "runs", events=events)
    label = f"{path.name} dlg-aware"
    # the plan, each iteration (nothing finished yet), the result, then the one attack counted
    assert events.calls[0] == ("start", 1, "attack", label) and events.calls[-1] == ("step", 1, label)
    assert [c for c in events.calls[1:-2]] == [("step", 0, label)] * (len(events.calls) - 3) and len(events.calls) > 3
    assert events.calls[-2][0] == "result" and events.calls[-2][2].endswith(f"-> {out}")
    stamp = out.stat().st_mtime_ns
    again = Recorded()
    assert run_attack(path, "dlg:iterations=2", "aware", tmp_path / "runs", events=again) == out
    assert again.calls[1][2].startswith("reused ")  # no iteration: the result was there
    assert out.stat().st_mtime_ns == stamp
    assert json.loads(out.read_text())["threat"]["observed"] == "messages"


def test_without_truth_no_metrics(tmp_path):
    path, _, _ = _save(tmp_path, truth=False)
    result = json.loads(run_attack(path, "dlg:iterations=2", "naive", tmp_path / "runs").read_text())
    assert result["scores"] is None and result["labels_true"] is None
    assert AttackResult.from_json(result).label_accuracy is None


def test_attacks_never_open_the_truth_file(tmp_path, monkeypatch):
    path, _, _ = _save(tmp_path)
    tpath = str(truth_path(path).resolve())
    events: list[str] = []

    real_read = records_module.read_file_bytes

    def watched_read(name, *args, **kwargs):
        if str(Path(name).resolve()) == tpath:
            events.append("truth opened")
        return real_read(name, *args, **kwargs)

    monkeypatch.setattr(records_module, "read_file_bytes", watched_read)
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
    with pytest.raises(GiaBenchError, match="no 'oracle' view"):
        run_attack(path, "analytic", "oracle", tmp_path / "runs")
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
        assert (tmp_path / "runs" / "none" / record.record_id / f"dlg_iterations-2-{view}" / "result.json").exists()
    bad = runner.invoke(app, ["attack", str(path), "--view", "blind"])
    assert isinstance(bad.exception, GiaBenchError) and "--view 'blind'" in str(bad.exception)
    # through the real entry point: one red line naming the defense, exit code 2
    script = Path(sys.executable).with_name("gia-bench")
    proc = subprocess.run(
        [str(script), "attack", str(path), "--attack", "analytic", "--view", "oracle", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "no 'oracle' view" in proc.stderr and "Traceback" not in proc.stderr


# -- results are keyed by content (record sha256, canonical attack, view, seed, schema) -------------


def _cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res


def test_two_defenses_into_one_out_give_two_results(tmp_path):
    from gia_bench.capture import CaptureConfig, capture

    a = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 0, tmp_path / "A"))[0]
    b = capture(CaptureConfig("digits", "lenet", "topk:ratio=0.05", 1, 1, 0, tmp_path / "B"))[0]
    assert a.name == b.name  # the same record id: only the content tells them apart
    out = tmp_path / "runs"
    for folder in ("A", "B"):
        res = _cli("attack", tmp_path / folder, "--attack", "dlg:iterations=1", "--out", out)
        assert res.exit_code == 0, res.output
        assert "reused" not in res.output.split("result(s)")[0]
    results = sorted(out.rglob("result.json"))
    assert len(results) == 2
    by_defense = {json.loads(p.read_text())["defense"].split(":")[0]: json.loads(p.read_text()) for p in results}
    rb = load_record(b)
    assert by_defense["topk"]["bytes"] == rb.meta.bytes_sent < by_defense["none"]["bytes"]
    assert by_defense["topk"]["record_sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()
    assert by_defense["none"]["record_sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert by_defense["topk"]["record"] == str(b) and by_defense["topk"]["schema"] == RESULT_SCHEMA
    # the same command again reuses B's result, and says so
    res = _cli("attack", tmp_path / "B", "--attack", "dlg:iterations=1", "--out", out)
    assert res.exit_code == 0 and "reused" in res.output and "1 reused" in res.output, res.output


def test_same_id_other_record_is_refused_and_a_changed_record_recomputed(tmp_path):
    from gia_bench.capture import CaptureConfig, capture

    a = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 0, tmp_path / "A"))[0]
    c = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 1, tmp_path / "C"))[0]  # another seed: same id and defense
    out = tmp_path / "runs"
    first = evaluate(a, "dlg:iterations=1", "naive", out)
    assert not first.reused and evaluate(a, "dlg:iterations=1", "naive", out).reused
    with pytest.raises(ResultConflictError) as info:
        evaluate(c, "dlg:iterations=1", "naive", out)
    assert str(a) in str(info.value) and str(c) in str(info.value)
    assert json.loads(first.path.read_text())["record"] == str(a)  # nothing overwritten
    # the record at A's path changes (captured again with another seed): its stale result is recomputed
    a.write_bytes(c.read_bytes())
    again = evaluate(a, "dlg:iterations=1", "naive", out)
    assert not again.reused and again.path == first.path
    assert again.result.record_sha256 == hashlib.sha256(c.read_bytes()).hexdigest() != first.result.record_sha256
    # another seed is another result, in its own folder
    seeded = evaluate(a, "dlg:iterations=1", "naive", out, seed=3)
    assert not seeded.reused and seeded.path != first.path and seeded.result.seed == 3


def test_attack_dir_skips_non_record_files(tmp_path):
    path, record, _ = _save(tmp_path)
    (tmp_path / "notes.safetensors").write_text("hello\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "junk.safetensors").write_bytes(bytes(range(256)) * 4)
    res = CliRunner().invoke(app, ["attack", str(tmp_path), "--attack", "dlg:iterations=1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    skipped = [line for line in res.output.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2, res.output
    assert any("notes.safetensors" in s and "text file" in s and "truncated" not in s for s in skipped)
    assert len(list((tmp_path / "r").rglob("result.json"))) == 1
    # named directly, a non-record is an error (exit 2), not a skip
    bad = CliRunner().invoke(app, ["attack", str(tmp_path / "notes.safetensors"), "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 or isinstance(bad.exception, GiaBenchError)


def test_run_attacks_is_the_grid_in_one_call(tmp_path):
    p1, r1, _ = _save(tmp_path / "a", indices=(5,))
    p2, r2, _ = _save(tmp_path / "b", indices=(6,), defense="fp16")
    options = AttackOptions(out=tmp_path / "runs", seed=0)
    events = Recorded()
    results = run_attacks([p1, p2], ["dlg:iterations=1"], ["naive", "aware"], options, events=events)
    assert [(r.record, r.view) for r in results] == [(p1, "naive"), (p1, "aware"), (p2, "naive"), (p2, "aware")]
    assert not any(r.reused for r in results)
    assert all(isinstance(r, AttackOutcome) and r.path.exists() and r.mean("psnr") is not None for r in results)
    # the plan first; each result as it finishes, in order, then the count of attacks done
    assert events.calls[0] == ("start", 4, "attack", "4 attacks on 2 records")
    assert [c[2] for c in events.calls if c[0] == "result"] == [result_line(r) for r in results]
    finished = [c for c in events.calls if c[0] == "step" and c[1] > 0 and c[2]]
    done = [c[1] for c in events.calls if c[0] == "step"]
    assert done == sorted(done) and done[-1] == 4 and [c[2] for c in finished][-1] == f"{p2.name} dlg-aware"
    assert result_line(results[1]).startswith(f"{results[1].record_id} [none] dlg (aware): 1 it")
    again = run_attacks([p1, p2], ["dlg:iterations=1"], ["naive", "aware"], options)
    assert all(r.reused for r in again) and [r.path for r in again] == [r.path for r in results]
    with pytest.raises(GiaBenchError, match="--lpips-net 'squeeze'"):
        run_attacks([p1], ["dlg"], ["naive"], dataclasses.replace(options, lpips_net="squeeze"))


def test_lpips_net_is_checked_in_one_place_for_every_command(tmp_path):
    path, _, _ = _save(tmp_path)
    for args in (["attack", str(path)], ["report", str(tmp_path), "--out", str(tmp_path / "o")]):
        res = CliRunner().invoke(app, [*args, "--lpips-net", "squeeze"])
        assert isinstance(res.exception, GiaBenchError) and "--lpips-net 'squeeze'" in str(res.exception)
    cli_source = "".join(p.read_text() for p in (Path(__file__).parents[2] / "gia_bench" / "cli").glob("*.py"))
    assert "def report_cmd" in cli_source
    assert cli_source.count('("alex", "vgg")') == 0 and "def check_lpips_net" not in cli_source


def test_no_attack_module_scores_or_reads_the_truth():
    """Attacks reconstruct from the record alone: nothing under gia_bench/attacks imports metrics or the truth."""
    import ast

    import gia_bench.attacks

    forbidden_modules = {"gia_bench.metrics", "gia_bench.evaluate"}
    forbidden_names = {"Truth", "truth_path", "TRUTH_SUFFIX", "score_batch", "get_lpips"}
    folder = Path(gia_bench.attacks.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert len(files) >= 5
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = {base} | {f"{base}.{a.name}" for a in node.names}
                assert not {a.name for a in node.names} & forbidden_names, f"{file.name} imports the truth"
            elif isinstance(node, (ast.Name, ast.Attribute)):
                ident = node.id if isinstance(node, ast.Name) else node.attr
                assert ident not in forbidden_names, f"{file.name} uses {ident}"
                continue
            else:
                continue
            assert not any(n == m or n.startswith(m + ".") for n in names for m in forbidden_modules), (
                f"{file.name} imports {names & forbidden_modules or names}"
            )


# -- a result is reused only when the record it names backs its claim (issue 30) --------------------

SPEC = "dlg:iterations=1"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _forge(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def _psnrs(data: dict) -> list[float]:
    return [im["psnr"] for im in data["scores"]["images"]]


def _forged_scores(path: Path) -> dict:
    scores = json.loads(path.read_text())["scores"]
    scores["images"][0]["psnr"] = 99.0
    return scores


def test_a_result_claiming_another_records_content_is_recomputed_not_reused(tmp_path):
    from gia_bench.capture import CaptureConfig, capture

    a, b = capture(CaptureConfig("digits", "lenet", "none", 1, 2, 0, tmp_path / "A"))  # two records, two ids
    out = tmp_path / "runs"
    first = evaluate(b, SPEC, "naive", out)
    honest = _psnrs(first.result.to_json())
    # 1. names B's file but claims A's sha256; 2. claims B's sha256 but names A's file, which hashes
    # to A's: neither is B's result, whatever its fields say; both are recomputed in place
    for forged in ({"record_sha256": _sha(a)}, {"record": str(a)}):
        _forge(first.path, scores=_forged_scores(first.path), **forged)
        res = _cli("attack", b, "--attack", SPEC, "--out", out)
        assert res.exit_code == 0 and "0 reused" in res.output, (forged, res.output)
        data = json.loads(first.path.read_text())
        assert data["record_sha256"] == _sha(b) and data["record"] == str(b), forged
        assert _psnrs(data) == honest != [99.0]
    # the honest result is reused again (nothing rewritten)
    stamp = first.path.stat().st_mtime_ns
    assert evaluate(b, SPEC, "naive", out).reused and first.path.stat().st_mtime_ns == stamp


def test_a_moved_record_folder_keeps_its_results(tmp_path):
    """The record a result names is gone (the folder moved): the content key alone decides, and it matches."""
    from gia_bench.capture import CaptureConfig, capture

    a = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 0, tmp_path / "A"))[0]
    out = tmp_path / "runs"
    first = evaluate(a, SPEC, "naive", out)
    stamp = first.path.stat().st_mtime_ns
    (tmp_path / "A").rename(tmp_path / "B")
    again = evaluate(tmp_path / "B" / a.name, SPEC, "naive", out)
    assert again.reused and again.path == first.path and first.path.stat().st_mtime_ns == stamp


def test_result_is_current_keys_on_content_and_the_canonical_spec(tmp_path):
    from gia_bench.capture import CaptureConfig, capture
    from gia_bench.evaluate import result_is_current

    a = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 0, tmp_path / "A"))[0]
    c = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 1, tmp_path / "C"))[0]  # same id, another seed
    result = evaluate(a, SPEC, "naive", tmp_path / "runs").path
    assert result_is_current(result, a, SPEC, "naive", 0)
    assert result_is_current(result, a, create(SPEC).spec, "naive", 0)  # every default spelled out: one identity
    assert not result_is_current(result, a, SPEC, "naive", 1)
    assert not result_is_current(result, a, SPEC, "aware", 0)
    assert not result_is_current(result, a, "dlg:iterations=2", "naive", 0)
    assert not result_is_current(result.parent / "nothing.json", a, SPEC, "naive", 0)
    a.write_bytes(c.read_bytes())  # the record is replaced: its result is stale
    assert not result_is_current(result, a, SPEC, "naive", 0)
