"""The engine's scheduling, file landing, progress and cancellation, on toy units (fast, no torch work)."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from gia_bench.cli.render import UnitsView
from gia_bench.engines import EngineError, Unit, UnitContext, run_units
from gia_bench.engines.scheduler import Scheduler
from gia_bench.events import SILENT, Recorded

from _engine_units import descendants, pid_alive

import _engine_units as U  # noqa: E402  (tests/engines is on sys.path: workers import it by name)


def _unit(key, fn="write", deps=(), outputs=None, **args):
    path = args.setdefault("path", f"{key}.txt")
    return Unit(kind=key.split("-")[0], key=key, fn=getattr(U, fn), args=args, outputs=outputs or (path,), deps=deps,
                label=(("name", key),))


def _ctx(root):
    return UnitContext(inputs=root, outputs=root)


def _quiet():
    return Console(file=io.StringIO(), force_terminal=False, width=200)


def test_dependencies_run_first_and_a_rerun_runs_only_what_is_missing(tmp_path):
    units = [
        _unit("c-3", read="b-2.txt", text="3", deps=("b-2",), path="c-3.txt"),
        _unit("a-1", text="1", path="a-1.txt"),
        _unit("b-2", read="a-1.txt", text="2", deps=("a-1",), path="b-2.txt"),
    ]
    result = run_units(units, tmp_path, _ctx(tmp_path), events=SILENT)
    assert (tmp_path / "c-3.txt").read_text() == "321"  # c read b, which read a: order kept
    assert result.failures == [] and dict(result.ran) == {"a": 1, "b": 1, "c": 1}
    (tmp_path / "c-3.txt").unlink()
    again = run_units(units, tmp_path, _ctx(tmp_path), events=SILENT)
    assert dict(again.ran) == {"c": 1}  # a and b were finished: only c runs
    assert not (tmp_path / ".staging").exists()


def test_a_failed_unit_leaves_nothing_and_its_dependents_are_skipped(tmp_path):
    units = [
        _unit("a-1", fn="fail", path="a/out.txt"),
        _unit("b-2", read="a/out.txt", text="x", deps=("a-1",), path="b.txt"),
        _unit("c-3", text="ok", path="c.txt"),
    ]
    events = Recorded()
    result = run_units(units, tmp_path, _ctx(tmp_path), events=events)
    assert [f["stage"] for f in result.failures] == ["a"]
    assert "failed on purpose" in result.failures[0]["error"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b.txt").exists()  # no partial file
    assert (tmp_path / "c.txt").read_text() == "ok"
    steps = [c[2] for c in events.calls if c[0] == "step"]
    assert "b skipped (a unit it needs failed): name=b-2" in steps and any(s.startswith("a FAILED") for s in steps)
    assert [c[1] for c in events.calls if c[0] == "skip"] == ["a name=a-1", "b name=b-2"]


def test_markers_land_last(tmp_path):
    # a staged unit's files move into the folder with its outputs (completion markers) last
    unit = _unit("a-1", text="1", path="z/done.json", extra="a/data.bin", outputs=("z/done.json",))
    run_units([unit], tmp_path, _ctx(tmp_path), events=SILENT)
    data, marker = tmp_path / "a" / "data.bin", tmp_path / "z" / "done.json"
    assert data.exists() and marker.exists()
    assert data.stat().st_mtime_ns <= marker.stat().st_mtime_ns


def test_bad_engine_options_are_one_line_errors(tmp_path):
    with pytest.raises(EngineError, match="--engine 'spark'"):
        run_units([], tmp_path, _ctx(tmp_path), engine="spark")
    with pytest.raises(EngineError, match="--workers must be >= 1"):
        run_units([], tmp_path, _ctx(tmp_path), workers=0)
    with pytest.raises(EngineError, match="--address needs --engine ray"):
        run_units([], tmp_path, _ctx(tmp_path), address="10.0.0.1:6379")
    with pytest.raises(EngineError, match="unknown unit"):
        Scheduler([_unit("a-1", deps=("nope",), text="")], tmp_path)


def test_plain_progress_lines_name_each_unit(tmp_path):
    units = [_unit(f"attack-{i}", text=str(i)) for i in range(3)]
    out = _quiet()
    run_units(units, tmp_path, _ctx(tmp_path), events=UnitsView(out))  # the CLI's view, in a log
    lines = out.file.getvalue().splitlines()
    assert lines[0] == "3 units: 3 attacks"
    assert lines[1].startswith("[1/3] attack done in ") and lines[1].split(": ", 1)[1].startswith("name=attack-0")
    assert "| ETA " in lines[1] and "ETA" not in lines[3]  # the last line has nothing left to estimate
    rerun = _quiet()
    run_units(units, tmp_path, _ctx(tmp_path), events=UnitsView(rerun))
    assert rerun.file.getvalue().splitlines() == ["3 units: 3 attacks (3 already done)"]


def test_terminal_progress_shows_per_kind_counts(tmp_path):
    units = [_unit("capture-0", text="0"), _unit("attack-1", text="1", deps=("capture-0",))]
    term = Console(file=io.StringIO(), force_terminal=True, width=160)
    with UnitsView(term) as view:
        run_units(units, tmp_path, _ctx(tmp_path), events=view)
    text = term.file.getvalue()
    assert "capture 1/1" in text and "attack 1/1" in text


def test_a_multi_cpu_unit_runs_in_a_worker_process_that_ends_with_the_run(tmp_path):
    unit = Unit(kind="train", key="t", fn=U.whoami, args={"path": "who.txt"}, outputs=("who.txt",), cpus=2)
    small = _unit("attack-1", text="1")
    result = run_units([unit, small], tmp_path, _ctx(tmp_path), workers=2, events=SILENT)
    assert result.failures == []
    pid, ppid = map(int, (tmp_path / "who.txt").read_text().split())
    assert pid != os.getpid()
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)  # the pool is shut down with the run


def test_ctrl_c_cancels_units_in_flight_and_removes_their_partial_files(tmp_path):
    slow = Unit(kind="train", key="slow", fn=U.slow, args={"workdir": "slow", "seconds": 120},
                outputs=("slow/done",), workdir="slow")
    boom = Unit(kind="attack", key="boom", fn=U.interrupt_when, args={"flag": "slow/started"},
                outputs=("never",))
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_units([slow, boom], tmp_path, _ctx(tmp_path), workers=2, events=SILENT)
    worker = int((tmp_path / "slow" / "started").read_text())
    assert time.monotonic() - start < 100
    assert not list(tmp_path.rglob("*.tmp"))  # the in-flight unit's temp file is gone
    assert not (tmp_path / "slow" / "done").exists()
    assert not pid_alive(worker) and worker not in descendants(os.getpid())


def _pair(matmul=0):
    """Two units that finish only if they run at the same time, in two slots."""
    return [Unit(kind="attack", key=k, fn=U.rendezvous, args={"path": f"{k}.txt", "me": k, "other": o, "matmul": matmul},
                 outputs=(f"{k}.txt",)) for k, o in (("a", "b"), ("b", "a"))]


def _who(root):
    return {k: tuple(map(int, (root / f"{k}.txt").read_text().split())) for k in ("a", "b")}


FRESH = """
import io, json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import torch
from multiprocessing import forkserver
from gia_bench.engines import UnitContext, run_units
from test_local import _pair

torch.set_num_threads(2)
x = torch.ones(1000, 1000)
(x @ x).sum(), torch.zeros(1 << 20).exp().sum()  # this process's OpenMP thread pool now exists
root = Path(sys.argv[1])
result = run_units(_pair(matmul=600), root, UnitContext(inputs=root, outputs=root, threads=2), workers=2)
print(json.dumps({"failures": result.failures, "driver": os.getpid(), "forkserver": forkserver._forkserver._forkserver_pid}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the driver forks its workers on Linux")
def test_workers_are_forked_from_the_driver_and_run_beside_it_on_several_threads(tmp_path):
    # A fresh process (as `gia-bench study run`) whose torch has already run on 2 threads:
    # the worker is a fork of the driver (no forkserver, no second import of torch), runs a
    # unit at the same time as the driver, and its own 2-thread OpenMP regions do not hang
    # (they did before the driver stopped its OpenMP pool ahead of the fork).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path), str(Path(__file__).parent)],
                         capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.splitlines()[-1])
    assert report["failures"] == [] and report["forkserver"] is None
    who = _who(tmp_path)
    driver = report["driver"]
    assert sorted(p == driver for p, _, _ in who.values()) == [False, True]  # one unit each
    worker = next(w for w in who.values() if w[0] != driver)
    assert worker[1] == driver and worker[2] == 2  # forked by the driver itself; ran on 2 threads


def test_without_a_safe_fork_the_workers_come_from_the_forkserver(tmp_path, monkeypatch):
    from gia_bench.engines import local

    monkeypatch.setattr(local, "fork_safe", lambda: False)  # as with Ray's threads in this process
    result = run_units(_pair(), tmp_path, _ctx(tmp_path), workers=2, events=SILENT)
    assert result.failures == []
    who = _who(tmp_path)
    assert sorted(p == os.getpid() for p, _, _ in who.values()) == [False, True]
    worker = next(w for w in who.values() if w[0] != os.getpid())
    assert worker[1] != os.getpid()  # the forkserver's child
