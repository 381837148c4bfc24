"""The Events protocol end to end: the library imports no rich, runs report in order, workers relay."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

from gia_bench.event_relay import EventWriter, dispatch, relay
from gia_bench.events import SILENT, Events, Recorded, Silent

ROOT = Path(__file__).resolve().parents[1]

#: Every module of the package except the CLI's. The optional extras are made missing first
#: (Flower imports httpx, which imports rich: that is Flower's import, not ours); a module that
#: cannot be imported without one is left out, as on an install without the extra.
IMPORT_ALL = """
import importlib, json, pkgutil, sys

OPTIONAL = {"flwr", "ray"}
for name in OPTIONAL:
    sys.modules[name] = None  # import flwr -> ImportError, as when the extra is not installed
import gia_bench


def walk(path, prefix):
    # pkgutil.walk_packages imports every package it descends into, gia_bench.cli among them:
    # the same walk by hand, leaving the CLI (and __main__, which runs it) out before importing
    for info in pkgutil.iter_modules(path, prefix):
        if info.name in ("gia_bench.cli", "gia_bench.__main__") or info.name.endswith(".__main__"):
            continue
        yield info
        if info.ispkg:
            yield from walk(importlib.import_module(info.name).__path__, info.name + ".")


imported, missing = [], []
for info in walk(gia_bench.__path__, "gia_bench."):
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in OPTIONAL:
            raise
        missing.append(info.name)
        continue
    imported.append(info.name)
print(json.dumps({"imported": imported, "missing": missing, "rich": sorted(m for m in sys.modules if m.split(".")[0] == "rich")}))
"""


def test_no_module_outside_the_cli_imports_rich():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.splitlines()[-1])
    # the walk reached the modules that used to import rich, and the package's corners
    for name in ("gia_bench.capture", "gia_bench.engines.progress", "gia_bench.train.progress", "gia_bench.audit",
                 "gia_bench.reports.terminal", "gia_bench.study", "gia_bench.evaluate", "gia_bench.event_relay"):
        assert name in report["imported"], name
    assert len(report["imported"]) > 60
    assert report["rich"] == [], report["rich"]


def test_no_source_file_outside_the_cli_names_rich_in_an_import():
    # the modules that need an optional extra too (the walk above leaves out what cannot be imported)
    import ast

    offenders = []
    for path in sorted((ROOT / "gia_bench").rglob("*.py")):
        if (ROOT / "gia_bench" / "cli") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "rich"]
    assert offenders == []


def test_the_cli_is_where_rich_is():
    # the other half of the property: the same walk would see rich if a module imported it
    code = "import sys, gia_bench.cli; print('rich' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.strip() == "True", res.stderr[-2000:]


def test_the_implementations_keep_the_protocol():
    for events in (SILENT, Recorded(), EventWriter("unused.jsonl")):
        assert isinstance(events, Events)


def test_run_capture_starts_then_steps_once_per_record_in_order(tmp_path):
    from gia_bench.capture import CaptureConfig, capture as run_capture

    cfg = CaptureConfig(dataset="digits", model="mlp:hidden=8", defense="none", batch_size=1, num=3, seed=0,
                        out=tmp_path / "r")
    events = Recorded()
    paths = run_capture(cfg, events=events)
    assert events.calls[0] == ("start", 3, "record", "capture digits / mlp:hidden=8 / none")
    assert [c[1] for c in events.calls if c[0] == "step"] == [1, 2, 3]
    # each record's result (its path) comes before the step that counts it
    results = [c for c in events.calls if c[0] == "result"]
    assert [r[2] for r in results] == [str(p) for p in paths]
    assert [c[0] for c in events.calls[1:]] == ["result", "step"] * 3
    again = Recorded()
    run_capture(cfg, events=again)  # resumed: every record is already there, and said so
    assert [c[0] for c in again.calls] == ["start"] + ["skip", "step"] * 3
    assert {c[2] for c in again.calls if c[0] == "skip"} == {"already there"}


def test_a_writer_pickles_to_its_path_and_its_lines_replay_in_order(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = pickle.loads(pickle.dumps(EventWriter(path)))  # what a spawned worker receives: the path alone
    writer.on_start(2, "step", "plan")
    writer.on_step(1, "epoch 1/1", {"loss": 0.5})
    writer.on_result("topk", "topk epoch 1/1: ...")
    writer.on_skip("x", "why")
    seen = Recorded()
    for line in path.read_text().splitlines():
        assert dispatch(line, seen)
    assert seen.calls == [("start", 2, "step", "plan"), ("step", 1, "epoch 1/1"), ("result", "topk", "topk epoch 1/1: ..."),
                          ("skip", "x", "why")]


def test_lines_that_are_not_events_are_dropped():
    seen = Recorded()
    for line in ('{"m": "__init__", "a": []}', '{"m": "on_start", "a": ["2", "step", ""]}',
                 '{"m": "on_start", "a": [true, "step", ""]}', '{"m": "on_skip", "a": ["x"]}', "not json", "[1]",
                 '{"m": "on_result", "a": ["a", 3]}'):
        assert not dispatch(line, seen), line
    assert seen.calls == []


def test_relay_replays_what_another_thread_writes_and_removes_its_file(tmp_path):
    path = tmp_path / "events.jsonl"
    seen = Recorded()
    with relay(seen, path) as writer:
        assert writer is not None and path.exists()

        def work() -> None:
            writer.on_start(50, "step")
            for i in range(1, 51):
                writer.on_step(i, f"s{i}")

        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert not path.exists()
    assert seen.calls[0] == ("start", 50, "step", "") and [c[1] for c in seen.calls[1:]] == list(range(1, 51))


def test_a_silent_relay_hands_out_no_writer(tmp_path):
    with relay(SILENT, tmp_path / "events.jsonl") as writer:
        assert writer is None
    assert not (tmp_path / "events.jsonl").exists()


def test_a_view_that_inherits_silent_no_ops_still_listens(tmp_path):
    # the CLI's views subclass Silent for the events they do not show; the relay must still feed them
    class Results(Silent):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def on_result(self, label: str, summary: str = "") -> None:
            self.seen.append(summary)

    view = Results()
    with relay(view, tmp_path / "events.jsonl") as writer:
        assert writer is not None
        writer.on_result("none", "epoch 1/2")
    assert view.seen == ["epoch 1/2"]
