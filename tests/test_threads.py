"""The one thread policy (gia_bench.threads) and the entry points that follow it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gia_bench import threads
from gia_bench.threads import choose_threads, explicit_threads

NO_ENV: dict[str, str] = {}


def test_an_idle_machine_runs_as_torch_would():
    assert choose_threads(cores=2, busy=0.0, ceiling=2, environ=NO_ENV) == 2
    assert choose_threads(cores=16, busy=0.3, ceiling=8, environ=NO_ENV) == 8  # never above torch's default


def test_a_busy_machine_gets_one_thread_per_free_core():
    # the user's machine: 2 cores at load 4.3 (torch's 2 threads took 27x the time of 1)
    assert choose_threads(cores=2, busy=4.3, ceiling=2, environ=NO_ENV) == 1
    assert choose_threads(cores=2, busy=1.0, ceiling=2, environ=NO_ENV) == 1  # one core taken: one left
    assert choose_threads(cores=16, busy=5.6, ceiling=16, environ=NO_ENV) == 10
    assert choose_threads(cores=16, busy=5.4, ceiling=16, environ=NO_ENV) == 11


def test_the_free_cores_are_shared_among_the_caller_s_processes():
    assert choose_threads(2, cores=2, busy=0.0, ceiling=2, environ=NO_ENV) == 1
    assert choose_threads(4, cores=16, busy=0.0, ceiling=16, environ=NO_ENV) == 4
    assert choose_threads(4, cores=16, busy=8.0, ceiling=16, environ=NO_ENV) == 2
    assert choose_threads(3, cores=2, busy=0.0, ceiling=2, environ=NO_ENV) == 1  # at least one each


def test_an_explicit_setting_wins():
    assert choose_threads(cores=2, busy=9.0, ceiling=2, environ={"OMP_NUM_THREADS": "3"}) == 3
    assert choose_threads(requested=5, cores=2, busy=0.0, environ={"OMP_NUM_THREADS": "3"}) == 5
    # OpenMP ignores what is not a positive integer; so does the policy
    for bad in ("", "0", "-2", "two", "2,1"):
        assert explicit_threads({"OMP_NUM_THREADS": bad}) is None
        assert choose_threads(cores=2, busy=0.0, ceiling=2, environ={"OMP_NUM_THREADS": bad}) == 2


def test_busy_cores_sees_a_job_that_just_started(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))  # the average lags a minute behind
    monkeypatch.setattr(threads, "_runnable_now", lambda: 4.0)
    assert threads.busy_cores() == 4.0
    monkeypatch.setattr(threads, "_runnable_now", lambda: None)  # no /proc: the load average alone
    assert threads.busy_cores() == 0.2


def test_available_cores_is_the_affinity_set():
    if hasattr(os, "sched_getaffinity"):
        assert threads.available_cores() == len(os.sched_getaffinity(0))
    assert threads.available_cores() >= 1


@pytest.fixture
def busy_two_cores(monkeypatch):
    """This machine as 2 cores at load 4.3, with no OMP_NUM_THREADS; torch's threads restored after."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 4.3)
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_apply_threads_sets_torch_and_respects_omp_num_threads(busy_two_cores, monkeypatch):
    torch.set_num_threads(2)
    assert threads.apply_threads() == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.apply_threads() == 2 and torch.get_num_threads() == 2


def test_study_units_follow_the_policy(busy_two_cores, monkeypatch):
    from gia_bench.engines.local import default_threads

    torch.set_num_threads(2)
    assert default_threads(1) == 1  # busy: one thread even for a lone unit (torch's default was 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
    assert default_threads(1) == 2 and default_threads(2) == 1


def test_the_trainer_s_default_follows_the_policy(busy_two_cores, tmp_path, monkeypatch):
    from gia_bench.train import TrainConfig

    torch.set_num_threads(2)
    assert TrainConfig(out=tmp_path).threads_per_worker == 1
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
    assert TrainConfig(out=tmp_path).threads_per_worker == 2
    assert TrainConfig(out=tmp_path, nproc_per_node=2).threads_per_worker == 1
    assert TrainConfig(out=tmp_path, threads_per_worker=3).threads_per_worker == 3  # --threads-per-worker
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    config = TrainConfig(out=tmp_path)
    assert config.threads_per_worker == 4
    # resolved once: the workers read the number, not the policy, from the config file
    assert TrainConfig.from_json(config.to_json()).threads_per_worker == 4


def test_cli_commands_apply_the_policy(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gia_bench.cli import app

    calls: list[str] = []
    monkeypatch.setattr(threads, "apply_threads", lambda *a, **k: calls.append("applied") or 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = CliRunner()
    runner.invoke(app, ["report", str(empty), "--out", str(tmp_path / "o")])
    runner.invoke(app, ["attack", str(empty), "--out", str(tmp_path / "runs")])
    assert calls == ["applied", "applied"]


def test_a_forked_trainer_on_two_threads_does_not_hang(tmp_path):
    """libgomp's pool does not survive a fork: launch(fork=True) stops it first (else the child hangs)."""
    script = textwrap.dedent(
        f"""
        import torch
        from gia_bench.events import Recorded
        from gia_bench.train import TrainConfig, launch

        torch.set_num_threads(2)
        a = torch.randn(256, 256)
        for _ in range(3):
            a @ a  # the parent's OpenMP pool now has 2 threads
        events = Recorded()
        launch(TrainConfig(out={str(tmp_path / 'run')!r}, model="mlp", defense="topk:ratio=0.1", epochs=1,
                           batch_size=16, max_steps_per_epoch=2, threads_per_worker=2, timeout_s=60), fork=True,
               events=events)
        for call in events.calls:
            print(*call, sep="|")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    # rank 0's events reached the launching process from the forked worker
    calls = [line.split("|") for line in proc.stdout.splitlines()]
    assert calls[0] == ["start", "2", "step", "topk:ratio=0.1 1 epochs of 2 steps"], proc.stdout
    assert any(c[0] == "result" and c[2].startswith("topk:ratio=0.1 epoch 1/1: loss") for c in calls), proc.stdout
