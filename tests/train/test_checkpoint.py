"""--resume validates checkpoint.pt field by field before any worker starts (one line, exit 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gia_bench.errors import CheckpointError
from gia_bench.train import TrainConfig, launch
from gia_bench.train.checkpoint import check_resume, load_checkpoint, reference_model, size_bound

DATASET = "digits:size=8,channels=1"
MODEL = "mlp:hidden=32"


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(
        out=out, dataset=DATASET, model=MODEL, defense="topk:ratio=0.1", warmup_steps=None, nproc_per_node=2,
        epochs=2, batch_size=16, lr=0.1, momentum=0.9, max_steps_per_epoch=2, bucket_cap_mb=0.002, timeout_s=60,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """A real checkpoint: one epoch of two workers with Top-k (error feedback) and momentum."""
    out = tmp_path_factory.mktemp("good")
    launch(_config(out, epochs=1), fork=True)
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture
def no_workers(monkeypatch):
    """Any worker start fails the test: the checks must run before."""
    import torch.distributed.launcher.api as api

    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(api, "elastic_launch", refuse)


def _resume(tmp_path: Path, payload, **kw) -> str:
    out = tmp_path / "run"
    out.mkdir()
    torch.save(payload, out / "checkpoint.pt")
    with pytest.raises(CheckpointError) as info:
        launch(_config(out, resume=True, **kw), fork=True)
    msg = str(info.value)
    assert str(out / "checkpoint.pt") in msg and "\n" not in msg, msg
    return msg


def _with(good: dict, mutate) -> dict:
    ck = {k: v for k, v in good.items()}
    ck["model"] = dict(good["model"])
    ck["ranks"] = [
        {"hook": {**r["hook"], "compressor": {k: dict(v) if isinstance(v, dict) else v for k, v in r["hook"]["compressor"].items()}},
         "rng": dict(r["rng"])}
        for r in good["ranks"]
    ]
    ck["optimizer"] = {"state": {k: dict(v) for k, v in good["optimizer"]["state"].items()},
                       "param_groups": [dict(g) for g in good["optimizer"]["param_groups"]]}
    mutate(ck)
    return ck


def test_a_real_checkpoint_passes(good, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save(good, out / "checkpoint.pt")
    ck = check_resume(_config(out, resume=True))
    assert ck is not None and ck["epoch"] == 1 and ck["world_size"] == 2
    assert (out / "checkpoint.pt").stat().st_size < size_bound(reference_model(_config(out)), 2)


def _first_weight(ck) -> str:
    return next(iter(ck["model"]))


CASES = {
    "no epoch": (lambda ck: ck.pop("epoch"), "'epoch' is missing"),
    "epoch -5": (lambda ck: ck.update(epoch=-5), "'epoch' is -5"),
    "epoch beyond --epochs": (lambda ck: ck.update(epoch=7, epochs=[{}] * 7), "'epoch' is 7"),
    "epoch a string": (lambda ck: ck.update(epoch="1"), "not an integer"),
    "world size": (lambda ck: ck.update(world_size=3), "saved with 3 workers, this run has 2"),
    "wrong format": (lambda ck: ck.update(format="other"), "not a gia-bench training checkpoint"),
    "weight shape": (lambda ck: ck["model"].update({_first_weight(ck): torch.zeros(3, 3)}), "has shape (3, 3)"),
    "weight dtype": (
        lambda ck: ck["model"].update({_first_weight(ck): ck["model"][_first_weight(ck)].to(torch.int32)}),
        "dtype torch.int32",
    ),
    "missing weight": (lambda ck: ck["model"].pop(_first_weight(ck)), "missing ["),
    "non-finite weight": (
        lambda ck: ck["model"].update({_first_weight(ck): torch.full_like(ck["model"][_first_weight(ck)], float("nan"))}),
        "non-finite",
    ),
    "non-finite residual": (
        lambda ck: ck["ranks"][1]["hook"]["compressor"]["residuals"].update(
            {k: torch.full_like(v, float("inf")) for k, v in ck["ranks"][1]["hook"]["compressor"]["residuals"].items()}
        ),
        "rank 1's compressor state",
    ),
    "residual size": (
        lambda ck: ck["ranks"][0]["hook"]["compressor"]["residuals"].update(
            {k: torch.zeros(5) for k in ck["ranks"][0]["hook"]["compressor"]["residuals"]}
        ),
        "rank 0's residual",
    ),
    "one rank missing": (lambda ck: ck["ranks"].pop(), "one entry per worker"),
    "rng": (lambda ck: ck["ranks"][0]["rng"].update(cpu=torch.zeros(3)), "generator state"),
    "optimizer buffer": (
        lambda ck: ck["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(2)),
        "optimizer momentum_buffer of parameter 0",
    ),
    "optimizer groups": (lambda ck: ck["optimizer"]["param_groups"][0].update(params=[0]), "groups do not cover"),
    "defense": (lambda ck: ck.update(defense="none"), "was trained with 'none'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_one_line_before_any_worker(good, tmp_path, no_workers, case):
    mutate, fragment = CASES[case]
    msg = _resume(tmp_path, _with(good, mutate))
    assert fragment in msg, msg


def test_a_list_is_not_a_checkpoint(tmp_path, no_workers):
    assert "holds a list" in _resume(tmp_path, [1, 2, 3])


def test_wrong_world_size_of_this_run(good, tmp_path, no_workers):
    msg = _resume(tmp_path, good, nproc_per_node=3)
    assert "saved with 2 workers, this run has 3" in msg


class _Evil:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_never_run(good, tmp_path, no_workers):
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    msg = _resume(tmp_path, {**good, "epochs": [evil]})
    assert "weights_only" in msg or "Unsupported" in msg or "not a gia-bench training checkpoint" in msg
    assert not (tmp_path / "pwned").exists()


def test_fifo_garbage_and_oversized_files(good, tmp_path, no_workers):
    out = tmp_path / "fifo"
    out.mkdir()
    os.mkfifo(out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        launch(_config(out, resume=True), fork=True)
    out = tmp_path / "junk"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a torch.save archive"):
        launch(_config(out, resume=True), fork=True)
    out = tmp_path / "huge"
    out.mkdir()
    with (out / "checkpoint.pt").open("wb") as fh:  # sparse: no disk, the size is what matters
        fh.truncate(size_bound(reference_model(_config(out)), 2) + 1)
    with pytest.raises(CheckpointError, match="more than a checkpoint of 'mlp:hidden=32' can hold"):
        launch(_config(out, resume=True), fork=True)


def test_load_checkpoint_refuses_what_is_not_ours(tmp_path):
    path = tmp_path / "c.pt"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_cli_resume_with_a_bad_checkpoint_exits_2_in_one_line(good, tmp_path, capsys):
    from gia_bench.cli import app

    out = tmp_path / "run"
    out.mkdir()
    torch.save({**good, "epoch": -5}, out / "checkpoint.pt")
    args = [
        "train", "--out", str(out), "--dataset", DATASET, "--model", MODEL, "--defense", "topk:ratio=0.1",
        "--nproc-per-node", "2", "--epochs", "2", "--batch-size", "16", "--max-steps-per-epoch", "2", "--resume",
    ]
    with pytest.raises(SystemExit) as info:
        app(args, prog_name="gia-bench")
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and "'epoch' is -5" in err
    assert str(out / "checkpoint.pt") in err.replace("\n", "")
