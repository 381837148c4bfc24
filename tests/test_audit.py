import json
import sys
from pathlib import Path

import pytest

from gia_bench.audit import AuditOptions, check_compressor, run_audit
from gia_bench.defenses import DEFENSES, create

sys.path.insert(0, str(Path(__file__).parent))  # toy_compressors, as a third party's module


@pytest.fixture(autouse=True)
def _trust_toy_compressors():
    """The user trusts the third party's classes (``--plugin``; ``gia-bench audit X`` trusts X itself)."""
    import inspect

    import toy_compressors

    from gia_bench.registry import trusted

    names = [f"toy_compressors:{n}" for n, c in vars(toy_compressors).items()
             if inspect.isclass(c) and c.__module__ == "toy_compressors"]
    with trusted(names):
        yield


@pytest.mark.parametrize("name", DEFENSES.names())
def test_builtin_compressors_keep_the_contract(name):
    failed = [c for c in check_compressor(lambda: create(name)) if not c.passed]
    assert failed == []


def test_wrong_shapes_fail_with_reason():
    results = check_compressor(lambda: create("toy_compressors:WrongShapes"))
    assert not results[0].passed and "shape" in results[0].reason


def test_output_not_carried_by_messages_fails():
    results = {c.name: c for c in check_compressor(lambda: create("toy_compressors:Smuggler"))}
    assert not results["output is what the messages carry"].passed
    assert "information" in results["output is what the messages carry"].reason


def test_third_party_compressor_passes_quick_audit(tmp_path):
    result = run_audit("toy_compressors:HalfSum:scale=0.25", tmp_path, AuditOptions(workers=1, quick=True))
    assert result.passed, [c for c in result.checks if not c.passed]
    audited = [s for s in result.standings if s.audited]
    assert len(audited) == 1 and audited[0].worst_ssim is not None
    names = {s.defense.split(":")[0] for s in result.standings}
    assert {"none", "powersgd", "lqsgd"} <= names
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["passed"] is True and len(saved["standings"]) == len(result.standings)
    # --quick (1 image, 2 and 20 iterations) cannot support a ranking, and says so with the report's rule
    assert any(w.startswith("Too few images") for w in result.warnings)
    assert any(w.startswith("Attack budget far below") for w in result.warnings)
    assert saved["warnings"] == list(result.warnings)


def test_broken_compressor_fails_audit_cli(tmp_path):
    from typer.testing import CliRunner

    from gia_bench.cli import app

    res = CliRunner().invoke(app, ["audit", "toy_compressors:WrongShapes", "--out", str(tmp_path), "--quick"])
    assert res.exit_code == 1
    assert "shape" in res.output
    assert json.loads((tmp_path / "audit.json").read_text())["passed"] is False
