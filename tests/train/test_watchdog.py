"""The workers' watchdog: a worker that hangs fails the run in one line naming its rank, with its stack saved.

Two gloo workers on the CPU, forked (``launch(fork=True)``), a tiny MLP. The hang is
injected by replacing the DDP comm hook in this process before the fork (the workers
inherit it): no option, environment variable or record can make a real run hang.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

import gia_bench.defenses.ddp as ddp_hooks
from gia_bench.errors import ConfigError
from gia_bench.train import TrainConfig, TrainError, launch
from gia_bench.train.loop import _raised_by_collective
from _fresh import ran_in_fresh_process
from gia_bench.train.watchdog import peer_lost_linger, stuck_after, watchdog_path

TIMEOUT = 5.0  # the collective timeout of these runs: the watchdog stops a stuck worker after 7.5 s
HANG_STEP = 1


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(
        out=out, dataset="digits:size=8,channels=1", model="mlp:hidden=32", defense="powersgd:rank=2",
        warmup_steps=0, nproc_per_node=2, epochs=1, batch_size=16, lr=0.1, max_steps_per_epoch=3,
        bucket_cap_mb=0.002, timeout_s=TIMEOUT,
    )
    base.update(kw)
    return TrainConfig(**base)


def _rank1_sleeps_in_its_comm_hook(state, bucket):  # noqa: ANN001  (DDP's hook signature)
    """The real hook, except that rank 1 sleeps inside it at step HANG_STEP (before its collectives)."""
    if os.environ["RANK"] == "1" and state.step == HANG_STEP and bucket.is_last():
        time.sleep(10 * TIMEOUT)
    return _real_hook(state, bucket)


_real_hook = ddp_hooks.compressor_hook


@pytest.mark.timeout(300)
def test_a_worker_hung_in_a_collective_fails_the_run_naming_it(tmp_path, monkeypatch, request):
    if ran_in_fresh_process(request):
        return
    monkeypatch.setattr(ddp_hooks, "compressor_hook", _rank1_sleeps_in_its_comm_hook)
    out = tmp_path / "hang"
    with pytest.raises(TrainError) as info:  # the hang guard is the test's timeout, not a wall-clock assert
        launch(_config(out), fork=True)
    msg = str(info.value)
    stack = watchdog_path(out, 1)
    assert msg == (
        f"worker rank 1 made no progress for 7.5 s (stuck in a collective, a step or a checkpoint write;"
        f" --collective-timeout 5) and was stopped; its stack: {stack}; no checkpoint was written yet"
    )
    # the stack file holds rank 1's Python stack at the moment it was stopped: inside the comm hook
    text = stack.read_text()
    assert text.startswith("gia-bench train: worker rank 1 made no progress for 7.5 s")
    assert "in _rank1_sleeps_in_its_comm_hook" in text and "in _train" in text and "in run_worker" in text
    # rank 0 waited in its collective: no watchdog fired there, and its file is gone
    assert not watchdog_path(out, 0).exists()


@pytest.mark.timeout(300)
def test_a_worker_hung_in_a_checkpoint_write_fails_the_run_naming_it(tmp_path, monkeypatch, request):
    if ran_in_fresh_process(request):
        return
    import gia_bench.train.checkpoint as checkpoint

    real_write = checkpoint.atomic_write

    def rank0_write_hangs(path, write):  # noqa: ANN001
        if os.environ.get("RANK") == "0":  # after every rank's state was gathered: rank 1 finishes
            time.sleep(10 * TIMEOUT)
        return real_write(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", rank0_write_hangs)
    out = tmp_path / "hang"
    with pytest.raises(TrainError) as info:
        launch(_config(out), fork=True)
    stack = watchdog_path(out, 0)
    assert str(info.value) == (
        f"worker rank 0 made no progress for 7.5 s (stuck in a collective, a step or a checkpoint write;"
        f" --collective-timeout 5) and was stopped; its stack: {stack}; no checkpoint was written yet"
    )
    text = stack.read_text()
    assert "in rank0_write_hangs" in text and "in save_checkpoint" in text
    assert not (out / "checkpoint.pt").exists() and not watchdog_path(out, 1).exists()


@pytest.mark.timeout(300)
def test_a_clean_run_leaves_no_watchdog_files_and_a_crash_none_either(tmp_path, monkeypatch):
    out = tmp_path / "ok"
    metrics = launch(_config(out), fork=True)
    assert metrics["totals"]["steps"] == 3
    assert not list(out.glob("watchdog-rank*"))
    # a worker that crashes (exit 17) is named as before, and its watchdog file does not linger
    from gia_bench.train import FAIL_ENV

    monkeypatch.setenv(FAIL_ENV, "1:1")
    with pytest.raises(TrainError, match=r"^worker rank 1 exited with code 17; no checkpoint was written yet$"):
        launch(_config(tmp_path / "crash"), fork=True)
    assert not list((tmp_path / "crash").glob("watchdog-rank*"))


def test_the_deadlines_bound_a_hang_by_twice_the_timeout():
    for timeout in (1.0, 5.0, 300.0):
        # a waiting peer's collective fails after `timeout`; it lingers past the stuck worker's deadline
        assert timeout + peer_lost_linger(timeout) > stuck_after(timeout) > timeout
        assert stuck_after(timeout) <= 2 * timeout


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_collective_timeout_is_validated(tmp_path, value):
    with pytest.raises(ConfigError, match=r"^--collective-timeout must be a finite number of seconds > 0"):
        _config(tmp_path, timeout_s=value).validate()


def test_collective_errors_are_told_from_a_models_own():
    import torch

    def raise_in_a_model():
        torch.nn.Linear(3, 2)(torch.zeros(1, 4))

    with pytest.raises(RuntimeError) as model_error:
        raise_in_a_model()
    assert not _raised_by_collective(model_error.value)
    import torch.distributed as dist

    assert _raised_by_collective(dist.DistBackendError("gloo: Timed out waiting 5000ms for recv operation"))


@pytest.mark.parametrize("flag", ["--collective-timeout", "--timeout"])
def test_cli_collective_timeout_flag_is_validated_in_one_line(tmp_path, capsys, flag):
    from gia_bench.cli import app

    args = ["train", "--out", str(tmp_path / "run"), "--dataset", "digits:size=8,channels=1", "--model", "mlp",
            flag, "0"]
    with pytest.raises(SystemExit) as info:
        app(args, prog_name="gia-bench")
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and "--collective-timeout must be a finite number of seconds > 0, got 0.0" in err
    assert not (tmp_path / "run").exists()  # refused before anything is written
