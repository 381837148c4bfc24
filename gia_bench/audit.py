"""Audit a compressor: does it keep the interface, and where does it stand?

``gia-bench audit SPEC`` (SPEC: a built-in name, an entry-point name, or
``module:Class[:k=v,...]``) first checks the contract every compressor must keep
(:func:`check_compressor`), then runs the standard battery (the demo's images,
attacks and views, and a short training) on it next to ``none``, ``powersgd`` and
``lqsgd`` at matched bytes, and reports where it stands on the
privacy-bandwidth frontier.

The contract checks are what a receiver and a byte count rely on:

* ``step`` returns one tensor per gradient with the same shape and dtype, finite,
  also for all-zero gradients;
* the output is what the messages carry: ``decode(messages)`` of one worker
  reproduces ``step``'s output (with one worker they are the same thing), so no
  information reaches the receiver that the byte count does not pay for;
* something is sent whenever the output is not zero;
* ``state_dict`` / ``load_state_dict`` resume the same computation;
* the spec string round-trips.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses.base import Compressor
from gia_bench.errors import GiaBenchError


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    reason: str = ""


def _lenet_like_grads(gen: torch.Generator) -> list[torch.Tensor]:
    shapes = [(12, 3, 5, 5), (12,), (12, 12, 5, 5), (12,), (10, 768), (10,)]
    return [torch.randn(s, generator=gen) for s in shapes]


def _run(comp: Compressor, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], LocalCommunicator]:
    comm = LocalCommunicator(record=True)
    names = [f"p{i}" for i in range(len(grads))]
    return comp.step([g.clone() for g in grads], comm, keys=names), comm


def _check_outputs(grads, out) -> str:
    if not isinstance(out, (list, tuple)) or len(out) != len(grads):
        return f"step returned {type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}, expected a list of {len(grads)} tensors"
    for i, (g, o) in enumerate(zip(grads, out)):
        if not isinstance(o, torch.Tensor):
            return f"output {i} is {type(o).__name__}, not a tensor"
        if o.shape != g.shape:
            return f"output {i} has shape {tuple(o.shape)}, the gradient has {tuple(g.shape)}"
        if o.dtype != g.dtype:
            return f"output {i} has dtype {o.dtype}, the gradient has {g.dtype}"
        if not bool(torch.isfinite(o).all()):
            return f"output {i} has NaN or inf values"
    return ""


def check_compressor(factory: Callable[[], Compressor], seed: int = 0) -> list[CheckResult]:
    """Run the interface checks on fresh instances from ``factory``; one result per check."""
    results: list[CheckResult] = []
    gen = torch.Generator().manual_seed(seed)
    grads = _lenet_like_grads(gen)

    def check(name: str, fn: Callable[[], str]) -> bool:
        try:
            reason = fn()
        except GiaBenchError as exc:
            reason = str(exc)
        except Exception as exc:  # a third-party compressor may fail in any way; the audit reports it
            reason = f"raised {type(exc).__name__}: {exc}"
        results.append(CheckResult(name, not reason, reason))
        return not reason

    state: dict = {}

    def shapes() -> str:
        out, comm = _run(factory(), grads)
        state["out"], state["comm"] = out, comm
        return _check_outputs(grads, out)

    if not check("shapes, dtypes and finite values", shapes):
        return results

    def zeros() -> str:
        zero = [torch.zeros_like(g) for g in grads]
        out, _ = _run(factory(), zero)
        return _check_outputs(zero, out)

    check("all-zero gradients", zeros)

    def sends() -> str:
        out, comm = state["out"], state["comm"]
        if comm.bytes_sent == 0 and any(bool(o.abs().sum() > 0) for o in out):
            return "the output is non-zero but no message was sent (bytes would be under-counted)"
        return ""

    check("something is sent", sends)

    def carried() -> str:
        comp = factory()
        out, comm = _run(comp, grads)
        messages = messages_by_tag(comm.messages)
        decoded = comp.decode(messages, [g.shape for g in grads], comp.public_state())
        if len(decoded) != len(grads):
            return f"decode returned {len(decoded)} tensors for {len(grads)} gradients"
        for i, (d, o) in enumerate(zip(decoded, out)):
            if d.shape != o.shape:
                return f"decode of tensor {i} has shape {tuple(d.shape)}, step's output {tuple(o.shape)}"
            scale = float(o.abs().max()) or 1.0
            if float((d.float() - o.float()).abs().max()) > 1e-4 * scale + 1e-6:
                return (
                    f"decode(messages) differs from step's output for tensor {i}: the output carries"
                    " information that the messages (and the byte count) do not"
                )
        return ""

    check("output is what the messages carry", carried)

    def resumes() -> str:
        a = factory()
        _run(a, grads)
        saved = copy.deepcopy(a.state_dict())
        b = factory()
        b.load_state_dict(saved)
        more = [g * 0.5 + 0.1 for g in grads]
        out_a, _ = _run(a, more)
        out_b, _ = _run(b, more)
        for i, (x, y) in enumerate(zip(out_a, out_b)):
            if not torch.equal(x, y):
                return f"after load_state_dict the next step differs (tensor {i})"
        return ""

    check("state_dict resumes the same computation", resumes)

    def spec() -> str:
        from gia_bench.defenses import create

        comp = factory()
        again = create(comp.spec)
        if type(again) is not type(comp) or again.spec != comp.spec:
            return f"spec {comp.spec!r} does not rebuild the same compressor"
        return ""

    check("spec string round-trips", spec)
    return results


# -- the battery: where the compressor stands -------------------------------------------------------

AUDIT_FILE = "audit.json"


@dataclasses.dataclass(frozen=True)
class AuditOptions:
    """How much of the standard battery to run."""

    workers: int = 2
    quick: bool = False  # one image per data set, short attacks, no training (smoke test)
    train: bool = True
    lpips_weights: Path | None = None


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
    return raw


def run_audit(spec: str, out: Path, options: AuditOptions = AuditOptions(), console=None) -> AuditResult:
    """Check the contract of the compressor ``spec``; if it holds, run the battery and rank it."""
    import json

    from gia_bench.defenses import DEFENSES, create
    from gia_bench.reports import load_runs
    from gia_bench.reports.figures import frontier
    from gia_bench.reports.tables import build_report
    from gia_bench.study import StudyOptions, _write_text_atomic, parse_study, run_study

    out = Path(out)
    DEFENSES.kwargs_for(spec)  # unknown names / parameters are a user error, not a failed audit
    try:
        canonical = create(spec).spec
    except GiaBenchError:
        raise
    except Exception as exc:  # a third-party constructor may fail in any way
        result = AuditResult(spec, (CheckResult("construct", False, f"raised {type(exc).__name__}: {exc}"),))
        _write_text_atomic(out / AUDIT_FILE, json.dumps(result.to_json(), indent=2))
        return result
    checks = tuple(check_compressor(lambda: create(spec)))
    if not all(c.passed for c in checks):
        result = AuditResult(canonical, checks)
        _write_text_atomic(out / AUDIT_FILE, json.dumps(result.to_json(), indent=2))
        return result

    references = matched_references(lenet_bytes(create(spec)))
    raw = _audit_study(spec, references, options)
    config = parse_study(raw, "audit battery")
    st = run_study(config, out, StudyOptions(workers=options.workers, lpips_weights=options.lpips_weights), console)
    data = build_report(load_runs([p for p in (out / "runs", out / "train") if p.exists()], []), None)
    rows = data.summary
    by_defense: dict[str, list] = {}
    for row in rows:
        by_defense.setdefault(row.defense, []).append(row)
    specs = {create(s).spec for s in config.defenses}
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
    failures = tuple(CheckResult(f"battery {f['stage']}", False, f"{f['unit']}: {f['error']}") for f in st.failures)
    from gia_bench.reports import study_warnings

    result = AuditResult(canonical, checks + failures, standings, st.report, study_warnings(data))
    _write_text_atomic(out / AUDIT_FILE, json.dumps(result.to_json(), indent=2))
    return result
