"""The progress reporter's plan line, events and ETA: by kind, and none until every kind has a price."""

import pytest

from gia_bench.engines.progress import Reporter, count_of, plan_text
from gia_bench.engines.units import Outcome, Unit
from gia_bench.events import Recorded


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


def _reporter(kinds: dict[str, int], cached: dict[str, int], clock=None) -> Reporter:
    return Reporter(Recorded(), kinds, cached, **({} if clock is None else {"clock": clock}))


def test_counts_are_named_per_kind():
    assert plan_text({"capture": 18, "attack": 156, "train": 9}) == "18 captures, 156 attacks, 9 trainings"
    assert plan_text({"capture": 1, "attack": 0, "train": 1}) == "1 capture, 1 training"
    assert count_of("audit", 2) == "2 audits"


def test_the_plan_says_how_many_units_of_each_kind():
    assert _reporter({"capture": 18, "attack": 156, "train": 9}, {}).events.calls == [
        ("start", 183, "unit", "183 units: 18 captures, 156 attacks, 9 trainings")
    ]
    again = _reporter({"capture": 2, "attack": 4}, {"capture": 2, "attack": 1})
    assert again.events.calls == [("start", 6, "unit", "6 units: 2 captures, 4 attacks (3 already done)")]


def test_each_unit_is_a_start_step_then_its_result_or_skip_and_a_step_with_the_count():
    events = Recorded()
    r = Reporter(events, {"capture": 1, "attack": 2}, {}, clock=Clock())
    _ran(r, "capture", 0, 1.0)
    _ran(r, "attack", 0, 2.0, error="Boom: no\nmore")
    r.finished(_unit("attack", 1), None, how="skipped")
    assert events.calls == [
        ("start", 3, "unit", "3 units: 1 capture, 2 attacks"),
        ("step", 0, ""),  # started: nothing finished yet, the unit is in flight
        ("result", "capture defense=powersgd:rank=2 n=0", "done in 1.0 s"),
        ("step", 1, "capture done in 1.0 s: defense=powersgd:rank=2 n=0"),
        ("step", 1, ""),
        ("skip", "attack defense=powersgd:rank=2 n=0", "Boom: no"),
        ("step", 2, "attack FAILED after 2.0 s (Boom: no): defense=powersgd:rank=2 n=0"),
        ("skip", "attack defense=powersgd:rank=2 n=1", "a unit it needs failed"),
        ("step", 3, "attack skipped (a unit it needs failed): defense=powersgd:rank=2 n=1"),
    ]


def test_step_fields_name_the_units_in_flight_and_the_counts():
    seen = []

    class Fields(Recorded):
        def on_step(self, done, label="", fields=None):
            seen.append(dict(fields))

    r = Reporter(Fields(), {"attack": 2}, {})
    a, b = _unit("attack", 0), _unit("attack", 1)
    r.started(a)
    r.started(b)
    r.finished(a, Outcome(a.key, None, 1.0))
    assert seen[1]["running"] == ("attack defense=powersgd:rank=2 n=0", "attack defense=powersgd:rank=2 n=1")
    assert seen[2]["running"] == ("attack defense=powersgd:rank=2 n=1",)
    assert seen[2]["counts"] == "attack 1/2" and seen[2]["failed"] == 0 and seen[2]["eta"].startswith("ETA ")


def test_no_eta_until_every_kind_with_units_left_has_finished_one():
    clock = Clock()
    r = _reporter({"capture": 2, "attack": 10, "train": 2}, {}, clock)
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
    r = _reporter({"capture": 3, "attack": 4}, {"capture": 3}, clock)
    clock.now += 5
    _ran(r, "attack", 0, 5.0)
    assert r.eta() == pytest.approx(3 * 5.0)


def test_the_eta_prices_each_kind_at_its_own_mean_time():
    clock = Clock()
    r = _reporter({"attack": 11, "train": 3}, {}, clock)
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
    r = _reporter({"attack": 6}, {}, clock)
    # two workers: two 10 s attacks finished in 10 s of wall time
    clock.now += 10
    _ran(r, "attack", 0, 10.0)
    _ran(r, "attack", 1, 10.0)
    assert r.eta() == pytest.approx(4 * 10.0 * 10 / 20)


def test_cached_and_skipped_units_are_not_prices():
    clock = Clock()
    r = _reporter({"capture": 2, "attack": 4}, {}, clock)
    r.finished(_unit("capture", 0), None, how="cached")
    r.finished(_unit("attack", 0), None, how="skipped")
    assert r.eta_text() == "ETA once a capture and an attack have run"
    clock.now += 4
    _ran(r, "capture", 1, 1.0)
    _ran(r, "attack", 1, 3.0)
    # 2 attacks left at 3 s; 4 s of wall for 4 s of unit time
    assert r.eta() == pytest.approx(6.0)
