"""Rank 0's events: sent only while the launcher listens, steps throttled, each epoch's line a result."""

from __future__ import annotations

from gia_bench.event_relay import dispatch
from gia_bench.events import Recorded
from gia_bench.train.progress import EVENTS_FILE, STEP_INTERVAL_S, Progress

ROW = {"epoch": 1, "train_loss": 0.5, "test_accuracy": 0.75, "bytes_sent_per_worker": 1234, "seconds": 2.0}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Loss:
    """A loss whose value is read only when it is sent (as a tensor's .item() syncs the device)."""

    reads = 0

    def __float__(self) -> float:
        Loss.reads += 1
        return 0.25


def _replayed(out) -> Recorded:
    seen = Recorded()
    for line in (out / EVENTS_FILE).read_text().splitlines():
        assert dispatch(line, seen)
    return seen


def test_nothing_is_sent_or_read_without_a_listener_or_off_rank_0(tmp_path):
    for rank0, listening in ((True, False), (False, True)):
        out = tmp_path / f"{rank0}-{listening}"
        out.mkdir()
        if listening:
            (out / EVENTS_FILE).write_text("")
        Loss.reads = 0
        p = Progress(rank0, 1, 4, 0, "topk", out=out)
        for _ in range(4):
            p.step(0, Loss())
        p.epoch_done(ROW)
        assert not p.enabled and Loss.reads == 0
        assert not (out / EVENTS_FILE).exists() or (out / EVENTS_FILE).read_text() == ""


def test_steps_are_throttled_but_every_epoch_end_is_sent(tmp_path):
    (tmp_path / EVENTS_FILE).write_text("")
    clock = Clock()
    Loss.reads = 0
    p = Progress(True, 2, 10, 0, "topk", out=tmp_path, clock=clock)
    for epoch in range(2):
        for _ in range(10):
            clock.now += STEP_INTERVAL_S / 4  # four steps per interval
            p.step(epoch, Loss())
        p.epoch_done({**ROW, "epoch": epoch + 1})
    seen = _replayed(tmp_path)
    assert seen.calls[0] == ("start", 20, "step", "topk 2 epochs of 10 steps")
    steps = [c for c in seen.calls[1:] if c[0] == "step"]
    done = [c[1] for c in steps]
    assert done[0] == 0 and done == sorted(done) and 10 in done and done[-1] == 20
    assert len(steps) < 1 + 20 // 2 and Loss.reads == len(steps) - 1  # throttled; the loss read only when sent
    assert [c[2] for c in steps if c[1] in (10, 20)] == ["topk epoch 1/2", "topk epoch 2/2"]
    results = [c for c in seen.calls if c[0] == "result"]
    assert [r[2][: len("topk epoch 1/2: loss 0.5000")] for r in results] == [
        "topk epoch 1/2: loss 0.5000", "topk epoch 2/2: loss 0.5000"]


def test_a_resumed_run_starts_counting_where_it_stopped(tmp_path):
    (tmp_path / EVENTS_FILE).write_text("")
    Progress(True, 3, 5, 2, "none", out=tmp_path)
    assert _replayed(tmp_path).calls == [("start", 15, "step", "none 3 epochs of 5 steps"), ("step", 10, "none epoch 3/3")]
