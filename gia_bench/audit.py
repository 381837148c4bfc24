"""Audit a compressor: does it keep the contract, and where does it stand?

``gia-bench audit SPEC`` (SPEC: a built-in name, an entry-point name, or
``module:Class[:k=v,...]``) first runs the contract battery of :mod:`gia_bench.contract`
on it (the same checks pytest runs on every built-in compressor), then runs the
standard battery (the demo's images, attacks and views, and a short training) on it
next to ``none``, ``powersgd`` and ``lqsgd`` at matched bytes, and reports where it
stands on the privacy-bandwidth frontier.

The audit trusts the class it is given (the user named it on the command line): its
``module:Class`` spec resolves, and its spec stays ``module:Class`` even when it
subclasses a built-in, so the records the battery captures say what made them.

Trust is not belief: a plug-in is imported only in other processes. The contract battery
runs it in a worker (:mod:`gia_bench.audit_worker`) and judges its answers here, and the
standard battery runs as a study in a child process whose outcome comes back as JSON and
records; so a module that patches the checks, the byte counts or the ranking at import
patches them only where nothing is judged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gia_bench.comm import LocalCommunicator
from gia_bench.contract import CheckResult, Subject, check_compressor
from gia_bench.defenses.base import Compressor
from gia_bench.errors import GiaBenchError
from gia_bench.event_relay import relay
from gia_bench.events import SILENT, Events
from gia_bench.registry import trust_suspended

__all__ = ["AUDIT_FILE", "AuditOptions", "AuditResult", "CheckResult", "Standing", "check_compressor", "run_audit"]


def _lenet_like_grads(gen: torch.Generator) -> list[torch.Tensor]:
    shapes = [(12, 3, 5, 5), (12,), (12, 12, 5, 5), (12,), (10, 768), (10,)]
    return [torch.randn(s, generator=gen) for s in shapes]


def _run(comp: Compressor, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], LocalCommunicator]:
    comm = LocalCommunicator(record=True)
    names = [f"p{i}" for i in range(len(grads))]
    return comp.step([g.clone() for g in grads], comm, keys=names), comm


# -- the battery: where the compressor stands -------------------------------------------------------

AUDIT_FILE = "audit.json"


@dataclasses.dataclass(frozen=True)
class AuditOptions:
    """How much of the standard battery to run."""

    workers: int = 2
    quick: bool = False  # one image per data set, short attacks, no training (smoke test)
    train: bool = True
    lpips_weights: Path | None = None
    timeout_s: float = 120.0  # the most a plug-in may take to answer one request of the contract battery


@dataclasses.dataclass(frozen=True)
class Standing:
    """One defense of the audit, over every attack and view of the battery."""

    defense: str
    bytes: float
    test_accuracy: float | None
    worst_ssim: float | None  # highest SSIM of any image, attack and view: the most leakage
    worst_psnr: float | None
    worst_lpips: float | None  # lowest LPIPS: the most leakage
    on_frontier: bool  # not dominated in (bytes, worst SSIM) by another defense of the audit
    audited: bool


@dataclasses.dataclass(frozen=True)
class AuditResult:
    spec: str
    checks: tuple[CheckResult, ...]
    standings: tuple[Standing, ...] = ()
    report: Path | None = None
    warnings: tuple[str, ...] = ()  # why the battery cannot support its ranking (reports.study_warnings)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_json(self) -> dict:
        return {
            "schema": 1,
            "kind": "audit",
            "spec": self.spec,
            "passed": self.passed,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "standings": [dataclasses.asdict(s) for s in self.standings],
            "report": None if self.report is None else str(self.report),
            "warnings": list(self.warnings),
        }


def lenet_bytes(comp: Compressor) -> int:
    """Bytes ``comp`` sends for one step of the DLG LeNet's gradient (the battery's model)."""
    gen = torch.Generator().manual_seed(0)
    _, comm = _run(comp, _lenet_like_grads(gen))
    return comm.bytes_sent


def matched_references(target_bytes: int) -> list[str]:
    """``powersgd`` and ``lqsgd`` settings whose LeNet bytes are closest to ``target_bytes`` (log scale)."""
    import math

    from gia_bench.defenses import create

    def closest(candidates: list[str]) -> str:
        return min(candidates, key=lambda s: abs(math.log(max(lenet_bytes(create(s)), 1) / max(target_bytes, 1))))

    return [
        closest([f"powersgd:rank={r}" for r in (1, 2, 4, 8)]),
        closest([f"lqsgd:rank={r},bits={b}" for r in (1, 2, 4, 8, 16) for b in (4, 8)]),
    ]


def _audit_study(spec: str, references: list[str], options: AuditOptions) -> dict:
    from gia_bench.study import DEMO_STUDY, tomllib

    raw = tomllib.loads(DEMO_STUDY.read_text(encoding="utf-8"))
    raw["name"] = "audit"
    raw["defenses"] = list(dict.fromkeys([spec, "none", *references]))
    if options.quick:
        raw["images"] = 1
        raw["datasets"] = raw["datasets"][:1]
        raw["attacks"] = ["dlg:iterations=2", "ig:iterations=20"]
    if options.quick or not options.train:
        raw.pop("train", None)
    elif "train" in raw:
        # the audit trains the defenses it ranks (accuracy column), without the demo's training-run section
        for key in ("defenses", "attack_defenses", "attack_steps", "attacks"):
            raw["train"].pop(key, None)
    return raw


def _run_battery(raw: dict, out: Path, options: AuditOptions, events: Events) -> dict:
    """The standard battery as a study in a child process (it runs the plug-in); its outcome, as JSON.

    The child's study events come back through a file (:mod:`gia_bench.event_relay`) and are
    replayed on ``events`` here.
    """
    with tempfile.TemporaryDirectory(prefix="gia-bench-audit-") as tmp, relay(events, Path(tmp) / "events.jsonl") as w:
        job, outcome = Path(tmp) / "job.json", Path(tmp) / "outcome.json"
        job.write_text(json.dumps({
            "study": raw, "out": str(out), "workers": options.workers, "outcome": str(outcome),
            "events": None if w is None else w.path,
            "lpips_weights": None if options.lpips_weights is None else str(options.lpips_weights),
        }), encoding="utf-8")
        env = dict(os.environ)
        # the child imports what this process would, from where it would (the plug-in's folder included)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), *(p for p in sys.path if p)])
        proc = subprocess.Popen([sys.executable, "-m", "gia_bench.audit_worker", "--battery", str(job)], env=env)
        try:
            proc.wait()
        except KeyboardInterrupt:
            # the child got the same Ctrl-C: let it cancel its units and keep what finished, briefly
            # (units are written by rename: stopping one mid-way loses only that unit), so that the
            # whole command stops within seconds
            for stop, grace in ((None, 2.5), (proc.terminate, 1.0), (proc.kill, None)):
                if stop is not None:
                    stop()
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise
        if proc.returncode != 0 or not outcome.is_file():
            # never a silent pass: a plug-in that exits the battery's process (even with code 0) fails the audit
            raise GiaBenchError(
                f"the audit's battery stopped (exit code {proc.returncode}) before it finished; see its errors above"
            )
        return json.loads(outcome.read_text(encoding="utf-8"))


def run_audit(spec: str, out: Path, options: AuditOptions = AuditOptions(), events: Events = SILENT) -> AuditResult:
    """Check the contract of the compressor ``spec``; if it holds, run the battery and rank it.

    ``events`` hears the battery's study (its plan and each unit), relayed from its child process.
    """
    from gia_bench.io import atomic_write_text

    out = Path(out)
    # unknown names / parameters, or a class that is not a Compressor, are a user error, not a failed audit
    subject = Subject.from_spec(spec, timeout_s=options.timeout_s)
    try:
        if subject.remote is not None:
            canonical, error = subject.remote.canonical, subject.remote.construct_error
        else:
            try:
                canonical, error = subject.build().spec, None
            except GiaBenchError:
                raise
            except Exception as exc:  # a third-party constructor may fail in any way
                canonical, error = None, f"raised {type(exc).__name__}: {exc}"
        if error is not None or canonical is None:
            result = AuditResult(spec, (CheckResult("construct", False, error or "the constructor failed"),))
            atomic_write_text(out / AUDIT_FILE, json.dumps(result.to_json(), indent=2))
            return result
        checks = tuple(check_compressor(subject))
        if not all(c.passed for c in checks):
            result = AuditResult(canonical, checks)
            atomic_write_text(out / AUDIT_FILE, json.dumps(result.to_json(), indent=2))
            return result
        try:
            target = lenet_bytes(subject.build())
        except Exception as exc:  # a plug-in that kept the contract may still fail on the battery's model
            kind = getattr(exc, "remote_type", type(exc).__name__)
            reason = f"one step on the LeNet gradient raised {kind}: {exc}"
            result = AuditResult(canonical, checks + (CheckResult("battery bytes", False, reason),))
            atomic_write_text(out / AUDIT_FILE, json.dumps(result.to_json(), indent=2))
            return result
        references = matched_references(target)
    finally:
        subject.close()
    raw = _audit_study(spec, references, options)
    battery = _run_battery(raw, out, options, events)
    with trust_suspended():  # the plug-in's records are read and ranked here without importing it
        return _rank(spec, canonical, checks, raw, battery, out)


def _rank(spec: str, canonical: str, checks: tuple[CheckResult, ...], raw: dict, battery: dict, out: Path) -> AuditResult:
    """Standings of every defense of the battery from its results, the audited one marked; writes audit.json."""
    from gia_bench.defenses import create
    from gia_bench.io import atomic_write_text
    from gia_bench.reports import load_runs, study_warnings
    from gia_bench.reports.figures import frontier
    from gia_bench.reports.tables import build_report

    data = build_report(load_runs([p for p in (out / "runs", out / "train") if p.exists()], []), None)
    rows = data.summary
    by_defense: dict[str, list] = {}
    for row in rows:
        by_defense.setdefault(row.defense, []).append(row)
    # the built-in references resolve here; the audited plug-in's spec is what its worker said
    specs = {canonical} | {create(d).spec for d in raw["defenses"] if d != spec}
    entries = []
    for defense, group in sorted(by_defense.items(), key=lambda kv: -kv[1][0].bytes_per_step):
        if defense not in specs:
            continue
        ssims = [r.ssim.worst for r in group if r.ssim is not None]
        psnrs = [r.psnr.worst for r in group if r.psnr is not None]
        lpipss = [r.lpips.worst for r in group if r.lpips is not None]
        acc = next((r.test_accuracy for r in group if r.test_accuracy is not None), None)
        entries.append((defense, group[0].bytes_per_step, acc, max(ssims, default=None), max(psnrs, default=None),
                        min(lpipss, default=None)))
    points = [(e[1], e[3] if e[3] is not None else float("inf")) for e in entries]
    keep = set(frontier(points))
    standings = tuple(
        Standing(d, b, a, s, p, lp, i in keep, d == canonical) for i, (d, b, a, s, p, lp) in enumerate(entries)
    )
    failures = tuple(
        CheckResult(f"battery {f['stage']}", False, f"{f['unit']}: {f['error']}") for f in battery["failures"]
    )
    report = None if battery["report"] is None else Path(battery["report"])
    result = AuditResult(canonical, checks + failures, standings, report, study_warnings(data))
    atomic_write_text(out / AUDIT_FILE, json.dumps(result.to_json(), indent=2))
    return result
