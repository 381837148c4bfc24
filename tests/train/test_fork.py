"""Forked workers never finalize what they inherited: two ``launch(fork=True)`` in one process, gc in the workers.

The hang this guards against: a garbage collection inside a forked worker freed a
TCPStore left over from an earlier launch in the same process, and its destructor
joined a thread that does not exist after ``fork`` (``python -m pytest`` stuck at 96%).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.distributed.launcher.api as elastic_api
from torch.distributed import FileStore, TCPStore

from gia_bench.train import TrainConfig, launch
from _fresh import ran_in_fresh_process

_launch = sys.modules["gia_bench.train.launch"]  # the module (the package exports the function by that name)


def _config(out: Path) -> TrainConfig:
    return TrainConfig(
        out=out, dataset="digits:size=8,channels=1", model="mlp:hidden=32", defense="powersgd:rank=2",
        warmup_steps=0, nproc_per_node=2, epochs=1, batch_size=16, lr=0.1, max_steps_per_epoch=2,
        bucket_cap_mb=0.002, timeout_s=30,
    )


class _Garbage:
    """A reference cycle owning a live TCPStore (its libuv thread running), as a finished rendezvous leaves one.

    Its finalizer writes ``PID`` into ``log``: which process freed it.
    """

    def __init__(self, log: Path) -> None:
        self.log = log
        self.store = TCPStore("127.0.0.1", 0, world_size=1, is_master=True, use_libuv=True, wait_for_workers=False)
        self.cycle = self

    def __del__(self) -> None:
        with self.log.open("a") as fh:
            fh.write(f"{os.getpid()}\n")


@pytest.mark.timeout(300)
def test_two_forked_launches_with_a_collection_in_every_worker(tmp_path, monkeypatch, request):
    if ran_in_fresh_process(request):
        return
    log = tmp_path / "freed"
    log.touch()
    real_worker, real_elastic_launch = _launch.run_worker, elastic_api.elastic_launch

    def worker(config: TrainConfig) -> None:
        gc.collect()  # what hung: a collection in the forked worker, before and during training
        real_worker(config)

    def elastic_launch_leaving_garbage(*args, **kwargs):
        # garbage made during the launch, after the launcher's own collection, as the agent's
        # rendezvous may leave: only the workers' frozen collector keeps them from finalizing it
        _Garbage(log)
        return real_elastic_launch(*args, **kwargs)

    monkeypatch.setattr(_launch, "run_worker", worker)
    monkeypatch.setattr(elastic_api, "elastic_launch", elastic_launch_leaving_garbage)
    was_enabled = gc.isenabled()
    gc.disable()  # so that no automatic collection in this process frees the garbage before a fork
    try:
        _Garbage(log)  # garbage left before the launch: the launcher collects it, here
        a = launch(_config(tmp_path / "a"), fork=True)
        _Garbage(log)
        b = launch(_config(tmp_path / "b"), fork=True)
    finally:
        if was_enabled:
            gc.enable()
    assert a["totals"]["steps"] == b["totals"]["steps"] == 2
    assert a["epochs"][0]["train_loss"] == b["epochs"][0]["train_loss"]  # same seed, same run
    # no worker finalized anything; the launcher freed what was garbage before each launch
    # (the first launch's two and the one made inside the first launch)
    assert log.read_text().split() == [str(os.getpid())] * 3
    gc.collect()
    assert log.read_text().split() == [str(os.getpid())] * 4


def test_a_process_holding_a_process_group_spawns_instead_of_forking(tmp_path, monkeypatch):
    for name in ("ray", "grpc", "flwr"):  # whatever other tests imported: only the process group counts here
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert not dist.is_initialized() and not _launch._fork_unsafe()
    dist.init_process_group("gloo", store=FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert _launch._fork_unsafe()
    finally:
        dist.destroy_process_group()
    assert not _launch._fork_unsafe()
