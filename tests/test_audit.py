import json
import sys
from pathlib import Path

import pytest
import torch

from gia_bench.audit import AuditOptions, check_compressor, run_audit
from gia_bench.contract import CHECK_NAMES, Subject, failures
from gia_bench.defenses import create

sys.path.insert(0, str(Path(__file__).parent))  # toy_compressors, audit_plugins: a third party's modules


@pytest.fixture(autouse=True)
def _trust_third_party_compressors():
    """The user trusts the third party's classes (``--plugin``; ``gia-bench audit X`` trusts X itself)."""
    import importlib
    import inspect

    from gia_bench.registry import trusted

    names = []
    for module in ("toy_compressors", "audit_plugins"):
        mod = importlib.import_module(module)
        names += [f"{module}:{n}" for n, c in vars(mod).items() if inspect.isclass(c) and c.__module__ == module]
    with trusted(names):
        yield


def test_wrong_shapes_fail_with_reason():
    results = check_compressor("toy_compressors:WrongShapes")
    assert not results[0].passed and "shape" in results[0].reason


def test_output_not_carried_by_messages_fails():
    results = {c.name: c for c in check_compressor("toy_compressors:Smuggler")}
    assert not results["output is what the messages carry"].passed
    assert "information" in results["output is what the messages carry"].reason


def test_every_check_reports_once():
    results = check_compressor("audit_plugins:Honest", multiprocess=False)
    assert [r.name for r in results] == [n for n in CHECK_NAMES if n != "two gloo workers agree"]
    assert failures(results) == []


# Each cheat breaks one rule of the contract, and the battery names that rule (and only that one).
CHEATS = {
    "InstanceMemo": ("decode needs only the messages", "fresh instance"),
    # keeps every gradient in a module-level table: only another process (the receiver) lacks it
    "GlobalMemo": ("two gloo workers agree", "in another process"),
    "PublicSmuggler": ("public state is known to the receiver", "not counted"),
    "InPlace": ("inputs untouched", "in place"),
    "ReturnsInputs": ("output does not alias the input", "shares memory"),
    "Jitter": ("deterministic", "not deterministic"),
}


@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_cheating_plugin_fails_with_its_own_reason(cheat):
    check, phrase = CHEATS[cheat]
    results = check_compressor(f"audit_plugins:{cheat}")
    failed = failures(results)
    assert [c.name for c in failed] == [check], [(c.name, c.reason) for c in failed]
    assert phrase in failed[0].reason


def test_cheats_pass_on_the_honest_base():
    """Each cheat above differs from this one in the rule it breaks, so the battery's verdict is the cheat's."""
    assert failures(check_compressor("audit_plugins:Honest", multiprocess=False)) == []


def test_nondeterminism_does_not_blame_the_state_dict():
    results = {c.name: c for c in check_compressor("audit_plugins:Jitter")}
    resume = results["state_dict resumes bit-identically"]
    assert resume.skipped and not resume.passed and "deterministic" in resume.reason


@pytest.mark.parametrize("name", ["Mine", "Warmer"])
def test_subclass_of_a_builtin_passes_and_keeps_its_spec(name):
    comp = create(f"audit_plugins:{name}")
    assert comp.spec.startswith(f"audit_plugins:{name}:")  # not the built-in's name
    again = create(comp.spec)
    assert type(again) is type(comp) and again.spec == comp.spec
    results = check_compressor(Subject.from_spec(f"audit_plugins:{name}"), multiprocess=name == "Mine")
    assert failures(results) == [], [(c.name, c.reason) for c in failures(results)]
    assert all(c.passed for c in results)


def test_subclass_records_name_the_subclass():
    from gia_bench.capture import capture_batch
    from gia_bench.models import ModelSpec, build_model

    spec = ModelSpec("lenet", (3, 32, 32), 10, "train")
    model = build_model(spec, seed=0)
    gen = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(1, 3, 32, 32, generator=gen), torch.tensor([3])
    comp = create("audit_plugins:Mine:ratio=0.05")
    record, _ = capture_batch(model, spec, None, inputs, labels, comp, "r0")
    assert record.meta.defense == "audit_plugins:Mine:ratio=0.05,error_feedback=true"
    builtin, _ = capture_batch(model, spec, None, inputs, labels, create("topk:ratio=0.05"), "r1")
    assert builtin.meta.defense == "topk:ratio=0.05,error_feedback=true"


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


def test_cheating_plugin_fails_audit_cli(tmp_path):
    from typer.testing import CliRunner

    from gia_bench.cli import app

    res = CliRunner().invoke(app, ["audit", "audit_plugins:InstanceMemo", "--out", str(tmp_path), "--quick"])
    assert res.exit_code == 1
    assert "audit failed:" in res.output and "fresh instance" in res.output
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["passed"] is False and saved["spec"] == "audit_plugins:InstanceMemo:scale=0.5"
    assert saved["standings"] == []  # no battery runs for a compressor that breaks the contract


def test_a_class_that_is_not_a_compressor_is_a_user_error(tmp_path, capsys):
    from gia_bench.cli import app

    with pytest.raises(SystemExit) as info:
        app(["audit", "collections:OrderedDict", "--out", str(tmp_path), "--quick"], prog_name="gia-bench")
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Compressor subclass" in err and "Traceback" not in err
    assert not (tmp_path / "audit.json").exists()
