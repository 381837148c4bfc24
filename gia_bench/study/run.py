"""Running a study: pin it to its folder, run its units on an engine, report; and its status.

A unit of work is finished when its output file exists (outputs are written atomically),
so a rerun skips it: studies resume after Ctrl-C or a crash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from gia_bench.budget import DEFAULT_MAX_MEMORY
from gia_bench.errors import ConfigError
from gia_bench.events import SILENT, Events
from gia_bench.study.plan import attack_jobs, capture_jobs, expected_records, plan_units, train_attack_jobs, train_jobs
from gia_bench.study.schema import StudyConfig, load_study, resolve_study

STUDY_FILE = "study.toml"
FAILURES_FILE = "failures.json"


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """How to run a study (the CLI's flags).

    ``engine``: ``local`` (this machine: the driver plus ``workers - 1`` warm worker
    processes) or ``ray`` (every unit a Ray task; ``address`` of a running cluster, or a
    local Ray when None). ``plugins``: ``module:Class`` names the user trusted
    (``--plugin``); they reach every unit through its context.
    """

    workers: int = 1
    device: str = "cpu"
    lpips_net: str = "alex"
    lpips_weights: Path | None = None
    report: bool = True
    engine: str = "local"
    address: str | None = None
    plugins: tuple[str, ...] = ()  # module:Class names the user trusts (--plugin), for every unit
    max_memory: int = DEFAULT_MAX_MEMORY  # bytes one attack may use (--max-memory; gia_bench.budget)


@dataclasses.dataclass(frozen=True)
class StudyStatus:
    """Done / total per stage, and the failures recorded so far.

    ``ran``: units this run executed, per kind (empty for ``study show``): a resumed run
    executes only what was missing.
    """

    captures: tuple[int, int]
    attacks: tuple[int, int]
    trains: tuple[int, int]
    failures: tuple[dict[str, str], ...]
    report: Path | None
    ran: Mapping[str, int] = dataclasses.field(default_factory=dict)


def _write_text_atomic(path: Path, text: str) -> None:
    from gia_bench.io import atomic_write_text

    atomic_write_text(path, text)


def prepare(source: Path | str, out: Path) -> StudyConfig:
    """Validate the study file and pin it to ``out``; a folder holds one study (a rerun resumes it).

    ``out`` is new, empty, or a study folder (it holds ``study.toml``); a folder holding anything
    else is refused, so a study never writes among the user's own files.
    """
    source = resolve_study(source)  # a built-in study's name reads its file
    source_text = source.read_text(encoding="utf-8") if source.exists() else None
    config = load_study(source)
    out = Path(out)
    pinned = out / STUDY_FILE
    # the pinned study.toml marks a study folder (prepare writes it before any unit runs); any
    # other folder with files in it is the user's, and a study would write beside them
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a study folder; choose a new or empty folder")
    if out.is_dir() and not pinned.exists() and any(out.iterdir()):
        raise ConfigError(
            f"--out {out}: is not empty and not a study folder (no {STUDY_FILE}); choose a new or empty folder"
        )
    if pinned.exists() and pinned.resolve() != Path(source).resolve():
        previous = load_study(pinned)
        if previous != config:
            raise ConfigError(
                f"--out {out}: holds another study ({pinned} differs from {source}); choose another folder"
            )
    elif not pinned.exists():
        _write_text_atomic(pinned, source_text or "")
    return config


def run_study(
    config: StudyConfig, out: Path, options: StudyOptions = StudyOptions(), events: Events = SILENT
) -> StudyStatus:
    """Capture, attack, train and report; finished units are skipped, so this resumes.

    The units run on ``options.engine`` (see :mod:`gia_bench.engines`). Ctrl-C cancels
    the units in flight (their partial files are removed) and re-raises
    KeyboardInterrupt; everything finished stays on disk.
    ``options.plugins`` are trusted for every unit (worker processes inherit them).
    ``events`` hears the plan and each unit (:mod:`gia_bench.engines.progress`).
    """
    from gia_bench.registry import trusted

    with trusted(options.plugins):
        return _run_study(config, out, options, events)


def _run_study(config: StudyConfig, out: Path, options: StudyOptions, events: Events) -> StudyStatus:
    import json

    from gia_bench.engines import UnitContext, run_units
    from gia_bench.engines.local import default_threads

    out = Path(out)
    if options.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {options.workers}")
    from gia_bench.budget import check_study

    check_study(config, options.max_memory, out / STUDY_FILE)
    units = plan_units(config, out, options)
    ctx = UnitContext(
        inputs=out, outputs=out, device=options.device, threads=default_threads(options.workers),
        lpips_net=options.lpips_net, lpips_weights=options.lpips_weights, plugins=tuple(options.plugins),
    )
    result = run_units(units, out, ctx, engine=options.engine, workers=options.workers, address=options.address,
                       events=events)
    failures = result.failures
    _write_text_atomic(out / FAILURES_FILE, json.dumps(failures, indent=2))
    report = None
    if options.report:
        from gia_bench.reports import ReportOptions, make_report

        runs = tuple(p for p in (out / "runs", out / "train") if p.exists())
        if runs:
            make_report(
                ReportOptions(
                    runs=runs, out=out / "report", lpips_net=options.lpips_net, lpips_weights=options.lpips_weights
                )
            )
            report = out / "report"
    st = status(out, config, failures=failures, report=report)
    return dataclasses.replace(st, ran=dict(result.ran))


def status(out: Path, config: StudyConfig | None = None, failures: list[dict[str, str]] | None = None,
           report: Path | None = None) -> StudyStatus:
    """What is done and what is left in a study folder (``gia-bench study show``)."""
    import json

    from gia_bench.attack_skips import settled

    out = Path(out)
    if config is None:
        if not (out / STUDY_FILE).exists():
            raise ConfigError(f"{out}: not a study folder (no {STUDY_FILE})")
        config = load_study(out / STUDY_FILE)
    caps = capture_jobs(config, out)
    records = {job: expected_records(job) for job in caps}
    caps_done = sum(all(p.exists() for p in paths) for paths in records.values())
    trains = train_jobs(config, out)
    jobs = attack_jobs(config, out, records) + train_attack_jobs(config, out, trains)
    attacks_done = sum(settled(j.result, j.record, j.attack, j.view, j.seed) for j in jobs)  # refusals included
    if failures is None:
        try:
            failures = json.loads((out / FAILURES_FILE).read_text())
        except (OSError, ValueError):
            failures = []
    if report is None and (out / "report" / "report.html").exists():
        report = out / "report"
    return StudyStatus(
        captures=(caps_done, len(caps)),
        attacks=(attacks_done, len(jobs)),
        trains=(sum(t.done for t in trains), len(trains)),
        failures=tuple(failures),
        report=report,
    )
