"""The audit judges a plug-in from a process the plug-in never ran in.

A module that patches :mod:`gia_bench.contract` at import, exits, or hangs must fail its
audit, not pass it; the audit's own process never imports it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gia_bench.audit import AuditOptions, run_audit
from gia_bench.contract import CHECK_NAMES, Subject, check_compressor, failures
from gia_bench.registry import trusted

ROOT = Path(__file__).resolve().parents[1]

# At import it makes every check of gia_bench.contract pass, then offers a compressor that sends
# 4 bytes (the gradient's sum) and returns the whole gradient: the cheat the contract exists to catch.
PATCHER = '''
import dataclasses

import torch

import gia_bench.audit as audit
import gia_bench.contract as contract
from gia_bench.defenses.base import Compressor, check_messages, flatten, unflatten


def _pass(*args, **kwargs):
    return ""


for _name in dir(contract):
    if _name.startswith("check_") and _name not in ("check_compressor", "check_gloo_run"):
        setattr(contract, _name, _pass)
contract.check_gloo_run = _pass
contract.CHECKS = tuple(dataclasses.replace(c, run=_pass) for c in contract.CHECKS)
contract.GLOO_CHECK = dataclasses.replace(contract.GLOO_CHECK, run=_pass)
contract.run_check = lambda check, subject: contract.CheckResult(check.name, True)
contract.check_compressor = lambda subject, multiprocess=True: [contract.CheckResult(n, True) for n in contract.CHECK_NAMES]
audit.check_compressor = contract.check_compressor


class Sum(Compressor):
    """Sends the gradient's sum (4 bytes) and returns the whole gradient.

    Args:
        scale: unused.
    """

    supports_simulate = True

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def step(self, grads, comm, keys=None):
        if not grads:
            return []
        comm.all_reduce(flatten(grads).sum().reshape(1), "sum")
        return [g.clone() for g in grads]

    def decode(self, messages, shapes, public=None):
        return [torch.zeros(s) for s in shapes]

    def message_values(self, messages, shapes, public=None):
        return {"sum": messages["sum"].to(torch.float32)}

    def simulate(self, grads, messages, public=None):
        return {"sum": flatten(grads).to(torch.float32).sum().reshape(1)}
'''

MISBEHAVING = '''
import sys
import time

import torch
from gia_bench.defenses.base import Compressor, flatten, unflatten

print("misbehaving_plugin: imported")  # on the worker's stdout: must not corrupt its answers


class Honest(Compressor):
    """fp32 all-reduce of the gradient.

    Args:
        scale: unused.
    """

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def step(self, grads, comm, keys=None):
        flat = flatten(grads).clone()
        comm.all_reduce(flat, "g")
        return unflatten(flat / comm.world_size, [g.shape for g in grads])

    def decode(self, messages, shapes, public=None):
        return unflatten(messages["g"].to(torch.float32), shapes)

    supports_simulate = True

    def message_values(self, messages, shapes, public=None):
        return {"g": messages["g"].to(torch.float32)}

    def simulate(self, grads, messages, public=None):
        return {"g": flatten(grads).to(torch.float32)}


class Exits(Honest):
    """Calls sys.exit(0) in step (a CI gate on the audit must not read that as a pass)."""

    def step(self, grads, comm, keys=None):
        print("Exits: leaving")
        sys.stdout.flush()
        sys.exit(0)


class Hangs(Honest):
    """Never returns from step."""

    def step(self, grads, comm, keys=None):
        time.sleep(3600)
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "patcher_plugin.py").write_text(textwrap.dedent(PATCHER), encoding="utf-8")
    (folder / "misbehaving_plugin.py").write_text(textwrap.dedent(MISBEHAVING), encoding="utf-8")
    importlib.invalidate_caches()
    monkeypatch.syspath_prepend(str(folder))
    with trusted(["patcher_plugin:Sum", "misbehaving_plugin:Honest", "misbehaving_plugin:Exits", "misbehaving_plugin:Hangs"]):
        yield folder


def test_the_patch_would_pass_an_in_process_battery(plugins):
    """Guard of the next test: imported where the checks run, the patch makes the cheat pass them all."""
    code = (
        "import patcher_plugin\n"
        "from gia_bench.contract import Subject, check_compressor\n"
        "from gia_bench.registry import trusted\n"
        "with trusted(['patcher_plugin:Sum']):\n"
        "    results = check_compressor(Subject.from_spec('patcher_plugin:Sum', remote=False))\n"
        "print(len(results), all(r.passed for r in results))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(len(CHECK_NAMES)), "True"]


def test_a_plugin_that_patches_the_checks_fails_its_audit(plugins, tmp_path):
    result = run_audit("patcher_plugin:Sum", tmp_path, AuditOptions(workers=1, quick=True))
    assert not result.passed
    failed = {c.name: c.reason for c in failures(result.checks)}
    assert "information" in failed["output is what the messages carry"], failed
    assert result.standings == ()  # never ranked
    assert json.loads((tmp_path / "audit.json").read_text())["passed"] is False
    assert "patcher_plugin" not in sys.modules  # the audit's own process never imported it


def test_a_plugin_calling_sys_exit_fails_its_audit_cli(plugins, tmp_path):
    from typer.testing import CliRunner

    from gia_bench.cli import app

    res = CliRunner().invoke(app, ["audit", "misbehaving_plugin:Exits", "--out", str(tmp_path), "--quick"])
    assert res.exit_code == 1, res.output
    assert "audit failed:" in res.output and "sys.exit(0)" in res.output
    assert json.loads((tmp_path / "audit.json").read_text())["passed"] is False


def test_a_hung_plugin_fails_with_one_line_and_is_stopped(plugins):
    subject = Subject.from_spec("misbehaving_plugin:Hangs", timeout_s=3)
    try:
        results = check_compressor(subject, multiprocess=False)
    finally:
        subject.close()
    failed = failures(results)
    assert [c.name for c in failed] == ["shapes, dtypes and finite values"], [(c.name, c.reason) for c in failed]
    assert "did not answer within 3 s" in failed[0].reason and "\n" not in failed[0].reason
    # every later check is skipped: the worker is gone, and stopped
    assert all(r.skipped for r in results[1:] if not r.passed)
    assert subject.remote.session.proc.poll() is not None


def test_builtins_still_run_in_process():
    subject = Subject.from_spec("topk:ratio=0.1")
    assert subject.remote is None and subject.cls is not None


def test_a_plugin_killing_its_process_at_import_is_one_line(plugins, tmp_path, capsys):
    """os._exit at import: the worker dies before answering; the audit says so in one line, exit 2."""
    from gia_bench.cli import app

    (plugins / "vanishing_plugin.py").write_text("import os\nos._exit(0)\n", encoding="utf-8")
    importlib.invalidate_caches()
    with pytest.raises(SystemExit) as info:
        app(["audit", "vanishing_plugin:Comp", "--out", str(tmp_path), "--quick"], prog_name="gia-bench")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2 and len(lines) == 1, err
    assert "exited (code 0)" in lines[0] and "vanishing_plugin:Comp" in lines[0]


@pytest.mark.slow  # the default run stays under 15 min on 2 cores; run with -m slow
def test_a_passing_plugin_is_ranked_without_being_imported_here(plugins, tmp_path):
    """Contract in the worker, battery in a child, ranking here from its records: this process never runs it."""
    result = run_audit("misbehaving_plugin:Honest", tmp_path, AuditOptions(workers=1, quick=True))
    assert result.passed, [(c.name, c.reason) for c in result.checks if not c.passed]
    audited = [s for s in result.standings if s.audited]
    assert len(audited) == 1 and audited[0].defense == "misbehaving_plugin:Honest:scale=1.0"
    assert audited[0].worst_ssim is not None
    assert "misbehaving_plugin" not in sys.modules
