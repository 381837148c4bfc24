"""The CLI's views of a run's events: the log lines (same text as before the Events protocol) and the bars."""

import io

from rich.console import Console

from gia_bench.cli.render import AttackView, TrainView, UnitsView
from gia_bench.engines.progress import Reporter
from gia_bench.engines.units import Outcome, Unit
from gia_bench.train.progress import epoch_line

LONG = "powersgd:rank=2,start_iter=10,min_compression_rate=2.0,use_error_feedback=true,warm_start=true"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _unit(kind: str, i: int) -> Unit:
    return Unit(kind=kind, key=f"{kind}-{i}", fn="x:y", args={}, outputs=(f"{kind}-{i}",),
                label=(("defense", "powersgd:rank=2"), ("n", str(i))))


def _ran(reporter, kind: str, i: int, seconds: float, error: str | None = None) -> None:
    unit = _unit(kind, i)
    reporter.started(unit)
    reporter.finished(unit, Outcome(unit.key, error, seconds))


def _log() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=80)


def test_a_log_gets_the_plan_then_one_line_per_finished_unit_with_the_eta():
    clock = Clock()
    console = _log()
    r = Reporter(UnitsView(console), {"attack": 2, "train": 1}, {}, clock=clock)
    clock.now += 2
    _ran(r, "attack", 0, 2.0)
    clock.now += 30
    _ran(r, "train", 0, 30.0)
    _ran(r, "attack", 1, 2.0, error="RuntimeError: out of memory\nTraceback ...")
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "3 units: 2 attacks, 1 training"
    assert lines[1] == "[1/3] attack done in 2.0 s: defense=powersgd:rank=2 n=0 | ETA once a training has run"
    assert lines[2].endswith("| ETA 2s")  # one attack left at 2 s, 32 s of wall for 32 s of unit time
    assert lines[3] == "[3/3] attack FAILED after 2.0 s (RuntimeError: out of memory): defense=powersgd:rank=2 n=1"
    assert len(lines) == 4  # starts print nothing in a log; the failure is said once, in its own line


def test_counts_are_right_aligned_to_the_total():
    console = _log()
    r = Reporter(UnitsView(console), {"attack": 12}, {"attack": 2})
    r.finished(_unit("attack", 3), None, how="cached")
    assert console.file.getvalue().splitlines() == [
        "12 units: 12 attacks (2 already done)", "[ 3/12] attack already done: defense=powersgd:rank=2 n=3 | ETA once an attack has run",
    ]


def test_the_terminal_bar_shows_the_plan_the_units_in_flight_and_the_kind_weighted_eta():
    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    clock = Clock()
    with UnitsView(console) as view:
        r = Reporter(view, {"attack": 2, "train": 1}, {}, clock=clock)
        clock.now += 2
        _ran(r, "attack", 0, 2.0)
        r.started(_unit("train", 0))
        assert len(view.lines) == 1  # the training in flight has its line
        view.progress.refresh()
        waiting = console.file.getvalue()
        clock.now += 30
        r.finished(_unit("train", 0), Outcome("train-0", None, 30.0))
        assert view.lines == {}
        view.progress.refresh()
    text = console.file.getvalue()
    assert "3 units: 2 attacks, 1 training" in text
    assert "ETA once a training has run" in waiting and "defense=powersgd:rank=2 n=0" in waiting
    assert "ETA 2s" in text[len(waiting):]


def test_epoch_lines_name_their_defense_and_stay_whole():
    console = _log()
    row = {"epoch": 1, "train_loss": 0.5, "test_accuracy": 0.75, "bytes_sent_per_worker": 9_876_543, "seconds": 3.0}
    with TrainView(console) as view:
        view.on_start(20, "step")
        view.on_step(1, f"{LONG} epoch 1/2", {"loss": 0.7})
        view.on_result(LONG, epoch_line(LONG, row, 2))
        assert view.progress is None  # not a terminal: no bar
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{LONG} epoch 1/2: loss 0.5000")
    assert lines[0].endswith("9,876,543 bytes/worker this epoch  3.0 s")


def test_attack_results_print_as_they_are_and_skips_go_to_stderr():
    out, err = _log(), _log()
    with AttackView(out, err) as view:
        view.on_skip("x.safetensors", "x.safetensors: not a record [bad header]")
        view.on_start(1, "attack", "1 attacks on 1 records")
        view.on_step(0, "r.safetensors dlg-naive", {"iteration": 3, "iterations": 10, "loss": 0.25})
        view.on_result("r.safetensors dlg-naive", "r-0 [topk] dlg (naive): 10 it, 0.1 s -> runs/x/result.json")
        view.on_step(1, "r.safetensors dlg-naive")
        assert view.task is None and view.results == 1
    # (a finished transient bar leaves an empty line off a terminal, as it always did)
    assert [line for line in out.file.getvalue().splitlines() if line] == ["r-0 [topk] dlg (naive): 10 it, 0.1 s -> runs/x/result.json"]
    assert err.file.getvalue().splitlines() == ["skipped x.safetensors: not a record [bad header]"]
