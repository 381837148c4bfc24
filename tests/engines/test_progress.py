"""The progress reporter's plan line and ETA: by kind, and none until every kind has a price."""

import io

import pytest
from rich.console import Console

from gia_bench.engines.progress import LineReporter, RichReporter, count_of, plan_text
from gia_bench.engines.units import Outcome, Unit


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _unit(kind: str, i: int) -> Unit:
    return Unit(kind=kind, key=f"{kind}-{i}", fn=print, args={}, outputs=(f"{kind}-{i}",),
                label=(("defense", "powersgd:rank=2"), ("n", str(i))))


def _ran(reporter, kind: str, i: int, seconds: float, error: str | None = None) -> None:
    unit = _unit(kind, i)
    reporter.started(unit)
    reporter.finished(unit, Outcome(unit.key, error, seconds))


def _log() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=80)


def test_counts_are_named_per_kind():
    assert plan_text({"capture": 18, "attack": 156, "train": 9}) == "18 captures, 156 attacks, 9 trainings"
    assert plan_text({"capture": 1, "attack": 0, "train": 1}) == "1 capture, 1 training"
    assert count_of("audit", 2) == "2 audits"


def test_the_first_line_says_how_many_units_of_each_kind():
    console = _log()
    LineReporter(console, {"capture": 18, "attack": 156, "train": 9}, {})
    assert console.file.getvalue().splitlines() == ["183 units: 18 captures, 156 attacks, 9 trainings"]
    again = _log()
    LineReporter(again, {"capture": 2, "attack": 4}, {"capture": 2, "attack": 1})
    assert again.file.getvalue().splitlines() == ["6 units: 2 captures, 4 attacks (3 already done)"]


def test_no_eta_until_every_kind_with_units_left_has_finished_one():
    clock = Clock()
    r = LineReporter(_log(), {"capture": 2, "attack": 10, "train": 2}, {}, clock=clock)
    assert r.eta() is None and r.eta_text() == "ETA once a capture and an attack and a training have run"
    clock.now += 2
    _ran(r, "capture", 0, 2.0)
    _ran(r, "attack", 0, 1.0)
    clock.now += 1
    assert r.eta() is None and r.eta_text() == "ETA once a training has run"
    clock.now += 60
    _ran(r, "train", 0, 60.0)
    assert r.eta() is not None


def test_a_kind_with_nothing_left_needs_no_price():
    clock = Clock()
    # every capture was done by an earlier run: only attacks are left, and one attack prices them
    r = LineReporter(_log(), {"capture": 3, "attack": 4}, {"capture": 3}, clock=clock)
    clock.now += 5
    _ran(r, "attack", 0, 5.0)
    assert r.eta() == pytest.approx(3 * 5.0)


def test_the_eta_prices_each_kind_at_its_own_mean_time():
    clock = Clock()
    r = LineReporter(_log(), {"attack": 11, "train": 3}, {}, clock=clock)
    # one at a time: 1 attack of 1 s, 1 training of 100 s, in 101 s of wall time
    clock.now += 1
    _ran(r, "attack", 0, 1.0)
    clock.now += 100
    _ran(r, "train", 0, 100.0)
    # left: 10 attacks at 1 s + 2 trainings at 100 s = 210 s (a rate per unit would say 12 x 50.5 = 606 s)
    assert r.eta() == pytest.approx(210.0)
    # the mean of a kind, not its last unit
    clock.now += 3
    _ran(r, "attack", 1, 3.0)
    assert r.eta() == pytest.approx((9 * 2.0 + 2 * 100.0) * 104 / 104)


def test_units_side_by_side_shorten_the_eta_by_the_run_s_pace():
    clock = Clock()
    r = LineReporter(_log(), {"attack": 6}, {}, clock=clock)
    # two workers: two 10 s attacks finished in 10 s of wall time
    clock.now += 10
    _ran(r, "attack", 0, 10.0)
    _ran(r, "attack", 1, 10.0)
    assert r.eta() == pytest.approx(4 * 10.0 * 10 / 20)


def test_cached_and_skipped_units_are_not_prices():
    clock = Clock()
    r = LineReporter(_log(), {"capture": 2, "attack": 4}, {}, clock=clock)
    r.finished(_unit("capture", 0), None, how="cached")
    r.finished(_unit("attack", 0), None, how="skipped")
    assert r.eta_text() == "ETA once a capture and an attack have run"
    clock.now += 4
    _ran(r, "capture", 1, 1.0)
    _ran(r, "attack", 1, 3.0)
    # 2 attacks left at 3 s; 4 s of wall for 4 s of unit time
    assert r.eta() == pytest.approx(6.0)


def test_log_lines_carry_the_eta_or_what_it_waits_for():
    clock = Clock()
    console = _log()
    r = LineReporter(console, {"attack": 2, "train": 1}, {}, clock=clock)
    clock.now += 2
    _ran(r, "attack", 0, 2.0)
    clock.now += 30
    _ran(r, "train", 0, 30.0)
    _ran(r, "attack", 1, 2.0)
    lines = console.file.getvalue().splitlines()
    assert lines[1].startswith("[1/3] attack done in 2.0 s: defense=powersgd:rank=2 n=0 | ETA once a training has run")
    assert lines[2].endswith("| ETA 2s")  # one attack left at 2 s, 32 s of wall for 32 s of unit time
    assert "ETA" not in lines[3]  # nothing left


def test_the_terminal_bar_shows_the_plan_and_the_kind_weighted_eta():
    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    clock = Clock()
    with RichReporter(console, {"attack": 2, "train": 1}, {}, clock=clock) as r:
        clock.now += 2
        _ran(r, "attack", 0, 2.0)
        r.progress.refresh()
        waiting = console.file.getvalue()
        clock.now += 30
        _ran(r, "train", 0, 30.0)
        r.progress.refresh()
    text = console.file.getvalue()
    assert "3 units: 2 attacks, 1 training" in text
    assert "ETA once a training has run" in waiting
    assert "ETA 2s" in text[len(waiting):]
