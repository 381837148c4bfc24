"""One result schema (gia_bench.results): round trip, older files, reuse across schemas, no registry in reports."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gia_bench.metrics import METRICS, score_batch
from gia_bench.results import RESULT_SCHEMA, AttackResult, Budget, MalformedFile

ROOT = Path(__file__).parents[1]


def _result(tmp_path: Path, *, exact: bool = False) -> AttackResult:
    """A result as the attack runner builds it: real scores, a budget with the published one."""
    gen = torch.Generator().manual_seed(0)
    orig = torch.rand(3, 3, 16, 16, generator=gen)
    rec = orig.clone() if exact else (orig + 0.1 * torch.randn(orig.shape, generator=gen)).clamp(0, 1)
    labels = torch.tensor([1, 2, 3])
    scores = score_batch(rec.flip(0), orig, labels.flip(0), labels, compute_lpips=False)
    published = Budget(300, 1, None, "paper", source="Zhu et al. 2019: 300 L-BFGS steps")
    return AttackResult(
        path=tmp_path / "result.json", record_id="r0", record="r0.safetensors", dataset="photos", model="lenet",
        defense="topk:ratio=0.1", attack="dlg:iterations=30", view="aware", threat={"model": "white-box"},
        bytes=1000, bytes_fp32=62000, batch_size=3, labels_inferred=(1, 2, 3), labels_true=(1, 2, 3),
        seconds=1.5, iterations=30, final_loss=0.01, scores=scores,
        budget=Budget(30, 1, 41, None, published=published, published_known=True), step=5, source="train",
        seed=2, record_sha256="ab" * 32, device="cpu", extra={"backoffs": 0},
        shown={"attack": "dlg:iterations=30", "defense": "topk"},
    )  # fmt: skip


@pytest.mark.parametrize("exact", [False, True])
def test_to_json_from_json_round_trip(tmp_path: Path, exact: bool) -> None:
    result = _result(tmp_path, exact=exact)
    result.write(result.path)
    back = AttackResult.read(result.path)
    assert back == result
    assert back.budget.published == result.budget.published and back.budget.published.source.startswith("Zhu")
    assert back.content == result.content and back.identity == result.identity
    # the file keys every image's scores by the METRICS name, and nothing else
    data = json.loads(result.path.read_text())
    assert data["schema"] == RESULT_SCHEMA
    for im in data["scores"]["images"]:
        assert set(im) - {"index", "matched"} == {n for n, m in METRICS.items() if m.modality == "image"}
    if exact:  # identical images: PSNR inf goes through JSON (as Infinity) and back
        assert all(im.psnr == math.inf for im in back.scores.images)


def test_an_unknown_metric_is_ignored_and_a_registered_one_read_generically(tmp_path: Path) -> None:
    data = _result(tmp_path).to_json()
    for im in data["scores"]["images"]:
        im["not_a_metric"] = 1.0
    back = AttackResult.from_json(json.loads(json.dumps(data)))
    assert all("not_a_metric" not in im.values for im in back.scores.images)
    assert [im.value("ms_ssim") for im in back.scores.images] == [im["ms_ssim"] for im in data["scores"]["images"]]
    data["scores"]["images"][0]["st_lpips"] = math.inf
    with pytest.raises(MalformedFile, match="st_lpips inf, not a finite number"):
        AttackResult.from_json(data)


def test_old_result_files_are_read(tmp_path: Path) -> None:
    """Schema 1 (scores under 'metrics' and as flat lists, budget from the spec) and the oldest (flat lists only)."""
    new = _result(tmp_path).to_json()
    scores = new["scores"]
    old = {k: v for k, v in new.items() if k not in ("scores", "budget", "seed", "step", "source", "device")}
    old.update(schema=1, attack="dlg:iterations=30,restarts=2", metrics=scores,
               ssim=[im["ssim"] for im in scores["images"]], psnr=[im["psnr"] for im in scores["images"]],
               lpips=[None] * 3, label_accuracy=scores["label_accuracy"], lpips_reason=scores["lpips_reason"])  # fmt: skip
    r1 = AttackResult.from_json(json.loads(json.dumps(old)))
    assert r1.schema == 1 and r1.scores == AttackResult.from_json(new).scores  # every metric the file has
    assert r1.budget == Budget(30, 2, from_spec=True) and not r1.budget.published_known and r1.budget.published is None
    assert (r1.seed, r1.step, r1.source) == (None, 0, "capture")
    assert r1.identity.schema == 1 != AttackResult.from_json(new).identity.schema  # counted apart from schema 3
    oldest = {k: v for k, v in old.items() if k != "metrics"}
    r0 = AttackResult.from_json(oldest)
    assert [im.ssim for im in r0.scores.images] == old["ssim"] and all(im.value("ms_ssim") is None for im in r0.scores.images)
    # a schema-1 file carrying a budget keeps it, but cannot have recorded a published one
    with_budget = AttackResult.from_json({**old, "budget": new["budget"]})
    assert with_budget.budget.iterations == 30 and not with_budget.budget.from_spec
    assert with_budget.budget.published is None and not with_budget.budget.published_known
    with pytest.raises(MalformedFile, match="schema 4 is not supported"):
        AttackResult.from_json({**new, "schema": 4})


def test_reports_import_no_attack_or_defense_registry(tmp_path: Path) -> None:
    """Importing gia_bench.reports, and loading results with it, brings in no attack or defense module."""
    _result(tmp_path).write(tmp_path / "runs" / "result.json")
    code = (
        "import sys\n"
        "import gia_bench.reports\n"
        "from pathlib import Path\n"
        f"runs = gia_bench.reports.load_runs([Path({str(tmp_path / 'runs')!r})])\n"
        "assert len(runs.results) == 1 and runs.results[0].budget.published.iterations == 300, runs\n"
        "from gia_bench.reports.tables import defense_names, short_spec\n"
        "r = runs.results[0]\n"
        "assert defense_names(runs)[r.defense] and short_spec(r.attack, 'attack') == r.shown['attack'], r.shown\n"
        "print(sorted(m for m in sys.modules if m.startswith(('gia_bench.attacks', 'gia_bench.defenses'))))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # positive control: the attack runner does import the registry, and the check would see it
    control = subprocess.run([sys.executable, "-c", "import sys, gia_bench.evaluate; print('gia_bench.attacks' in sys.modules)"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert control.stdout.strip() == "True", control.stderr


def test_an_older_result_in_the_folder_is_recomputed_not_reused(tmp_path: Path) -> None:
    """The schema is part of the identity: a schema-1 result of the same record, spec and seed is replaced."""
    from gia_bench.capture import CaptureConfig, capture
    from gia_bench.evaluate import evaluate

    (a,) = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 0, tmp_path / "records"))
    first = evaluate(a, "dlg:iterations=1", "naive", tmp_path / "runs")
    data = json.loads(first.path.read_text())
    data["schema"] = 1
    first.path.write_text(json.dumps(data))
    again = evaluate(a, "dlg:iterations=1", "naive", tmp_path / "runs")
    assert not again.reused and json.loads(again.path.read_text())["schema"] == RESULT_SCHEMA
    assert evaluate(a, "dlg:iterations=1", "naive", tmp_path / "runs").reused
    assert again.result == AttackResult.read(again.path)
    assert dataclasses.replace(again.result, seconds=0.0, device="") == dataclasses.replace(
        first.result, seconds=0.0, device=""
    )  # the same measurement: only the wall time may differ


def test_the_report_says_when_an_old_result_did_not_record_the_published_budget(tmp_path: Path) -> None:
    from gia_bench.reports import build_report, load_runs, markdown

    new = _result(tmp_path).to_json()
    old = {**{k: v for k, v in new.items() if k != "scores"}, "schema": 1, "metrics": new["scores"]}
    for name, data in (("new", new), ("old", old)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(data))
        md = markdown(build_report(load_runs([tmp_path / name]), None), [], tmp_path, name)
        budgets = next(line for line in md.splitlines() if line.startswith("| <code>dlg:iterations=30"))
        assert budgets.endswith("| not recorded |") == (name == "old"), budgets
        assert ("300 it × 1" in budgets) == (name == "new"), budgets


def test_no_reports_module_imports_an_attack_or_defense_module() -> None:
    """Statically too: no import of gia_bench.attacks / gia_bench.defenses anywhere under reports/ (lazy ones included)."""
    import ast

    found = []
    for path in sorted((ROOT / "gia_bench" / "reports").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])  # fmt: skip
            found += [f"{path.name}: {n}" for n in names if n.startswith(("gia_bench.attacks", "gia_bench.defenses"))]
    assert found == []
