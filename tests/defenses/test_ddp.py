"""The DDP comm hook: every compressor through DDP on gloo with several buckets, PowerSGD == PyTorch's hook.

Workers are forked (2 processes, gloo, one thread each) with a 60 s process-group
timeout, so a collective mismatch or a hang fails the test instead of blocking.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# imported here, once: the forked workers inherit them instead of importing them each
import gia_bench.defenses  # noqa: F401
import gia_bench.defenses.ddp  # noqa: F401

WORLD = 2


def _entry(fn: Callable[[int, int], Any], rank: int, store: str, results: Any) -> None:
    torch.set_num_threads(1)  # one thread: also keeps OpenMP out of trouble after fork
    code = 0
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
        )
        buf = io.BytesIO()
        # bytes, not tensors: torch's queue pickler would share tensors by file descriptor,
        # which dies with this process
        torch.save(fn(rank, WORLD), buf)
        results.put((rank, "ok", buf.getvalue()))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        code = 1
    results.close()
    results.join_thread()  # flush the queue's feeder thread before the hard exit
    os._exit(code)  # skip pytest's atexit handlers inherited by the fork


def run_workers(fn: Callable[[int, int], Any], timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size)`` in 2 forked gloo workers; their return values by rank."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_entry, args=(fn, r, os.path.join(tmp, "store"), results)) for r in range(WORLD)]
        for p in procs:
            p.start()
        got: dict[int, Any] = {}
        try:
            for _ in range(WORLD):
                rank, status, value = results.get(timeout=timeout)
                if status != "ok":
                    pytest.fail(f"worker {rank} failed:\n{value}")
                got[rank] = torch.load(io.BytesIO(value), weights_only=True)
        except queue.Empty:
            pytest.fail(f"workers did not finish within {timeout} s")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [got[r] for r in range(WORLD)]


class SmallNet(nn.Module):
    """Conv + linear layers: matrices PowerSGD compresses, biases it sends whole, several buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _batch(rank: int, step: int, same_data: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + (0 if same_data else rank + 1))
    return torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SmallNet()


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _train(model: nn.Module, ddp: nn.Module, steps: int, rank: int, same_data: bool = False, start: int = 0) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(start, start + steps):
        x, y = _batch(rank, step, same_data)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


# -- every compressor, several buckets -------------------------------------------------------------


def _every_compressor(rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gia_bench.defenses import DEFENSES
    from gia_bench.defenses.ddp import make_hook

    out: dict[str, Any] = {}
    for name in DEFENSES.names():
        model = _model()
        before = _flat_params(model)
        # ~2 KB buckets: the 4 layers' 8 tensors land in several buckets after DDP's rebuild
        ddp = DDP(model, bucket_cap_mb=0.002)
        state, hook = make_hook(name, ddp)
        buckets: set[int] = set()

        def counting_hook(s, bucket):  # no annotations: DDP rejects string ones (postponed evaluation)
            buckets.add(bucket.index())
            return hook(s, bucket)

        ddp.register_comm_hook(state, counting_hook)
        _train(model, ddp, steps=3, rank=rank)
        out[name] = {
            "before": before,
            "after": _flat_params(model),
            "bytes": state.bytes_sent,
            "steps": state.step,
            "buckets": len(buckets),
        }
    return out


def test_every_compressor_trains_through_the_hook_with_several_buckets():
    from gia_bench.defenses import DEFENSES

    ranks = run_workers(_every_compressor)
    assert set(ranks[0]) == set(DEFENSES.names())
    for name, r0 in ranks[0].items():
        r1 = ranks[1][name]
        assert r0["buckets"] >= 3, f"{name}: only {r0['buckets']} buckets"
        assert r0["steps"] == 3
        assert torch.isfinite(r0["after"]).all(), name
        assert not torch.equal(r0["after"], r0["before"]), f"{name}: weights did not move"
        # every rank applies the same aggregate, so the replicas stay identical
        assert torch.equal(r0["after"], r1["after"]), f"{name}: replicas diverged"
        assert r0["bytes"] > 0 and r0["bytes"] == r1["bytes"], name


# -- PowerSGD through our hook == PyTorch's powerSGD_hook ---------------------------------------------


def _powersgd_vs_pytorch(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gia_bench.defenses.ddp import make_hook

    out = {}
    # With error feedback our residual is this worker's own compression error and PyTorch's is
    # "input - aggregate"; they coincide when every worker has the same gradient, so that case
    # uses the same data on both ranks, and the different-data case turns error feedback off.
    for ef, same_data in ((False, False), (True, True)):
        ours_model = _model()
        ours = DDP(ours_model, bucket_cap_mb=100)  # one bucket: PyTorch's hook is only safe there on gloo
        state, hook = make_hook(
            f"powersgd:rank=2,start_iter=2,warm_start=true,error_feedback={str(ef).lower()},seed=0",
            ours,
            bucket_order=True,  # PyTorch draws the Qs in bucket order
        )
        ours.register_comm_hook(state, hook)
        _train(ours_model, ours, steps=7, rank=rank, same_data=same_data)

        ref_model = _model()
        ref = DDP(ref_model, bucket_cap_mb=100)
        ref_state = ps.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=2,
            start_powerSGD_iter=2,
            min_compression_rate=2,
            use_error_feedback=ef,
            warm_start=True,
            random_seed=0,
        )
        ref.register_comm_hook(ref_state, ps.powerSGD_hook)
        _train(ref_model, ref, steps=7, rank=rank, same_data=same_data)
        out[f"ef={ef}"] = {
            "diff": float((_flat_params(ours_model) - _flat_params(ref_model)).abs().max()),
            "moved": float((_flat_params(ours_model) - _flat_params(_model())).abs().max()),
            "bytes": state.bytes_sent,
        }
    return out


def test_powersgd_through_the_hook_matches_pytorch_powerSGD_hook():
    ranks = run_workers(_powersgd_vs_pytorch)
    n_params = sum(p.numel() for p in _model().parameters())
    for case, r in ranks[0].items():
        assert r["moved"] > 1e-2, case
        assert r["diff"] <= 1e-5, f"{case}: max |ours - PyTorch| = {r['diff']:.3g}"
        # 2 warm-up steps in fp32, then 5 compressed ones: far fewer bytes than 7 fp32 steps
        assert 2 * 4 * n_params < r["bytes"] < 3 * 4 * n_params, case


# -- hook state: checkpoint and restore ------------------------------------------------------------------


def _state_round_trip(rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gia_bench.defenses.ddp import make_hook

    out = {}
    for spec in ("powersgd:rank=2", "qsgd"):  # warm start + error feedback; random dithering
        # uninterrupted: 5 steps
        model = _model()
        ddp = DDP(model, bucket_cap_mb=0.002)
        state, hook = make_hook(spec, ddp)
        ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        saved = None
        for step in range(5):
            if step == 3:
                buf = io.BytesIO()
                torch.save({"hook": state.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
                saved = buf.getvalue()
            x, y = _batch(rank, step)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        # restored at step 3 into a fresh model, DDP (new bucket layout) and hook
        ck = torch.load(io.BytesIO(saved), weights_only=True)
        model2 = _model()
        model2.load_state_dict(ck["model"])
        ddp2 = DDP(model2, bucket_cap_mb=0.002)
        state2, hook2 = make_hook(spec, ddp2)
        state2.load_state_dict(ck["hook"])
        ddp2.register_comm_hook(state2, hook2)
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
        opt2.load_state_dict(ck["opt"])
        for step in range(3, 5):
            x, y = _batch(rank, step)
            opt2.zero_grad()
            F.cross_entropy(ddp2(x), y).backward()
            opt2.step()
        out[spec] = (_flat_params(model), _flat_params(model2), state.step, state2.step, state.bytes_sent, state2.bytes_sent)
    return out


def test_hook_state_restores_bit_identically_into_a_new_bucket_layout():
    ranks = run_workers(_state_round_trip)
    for spec, (a, b, step_a, step_b, bytes_a, bytes_b) in ranks[0].items():
        assert torch.equal(a, b), f"{spec}: restored run differs by {float((a - b).abs().max()):.3g}"
        assert step_a == step_b == 5 and bytes_a == bytes_b, spec


def test_hook_state_refuses_state_of_another_defense():
    def fn(rank: int, world: int) -> str:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from gia_bench.defenses.ddp import make_hook
        from gia_bench.errors import CompressorError

        ddp = DDP(_model())
        a, _ = make_hook("powersgd:rank=2", ddp)
        b, _ = make_hook("powersgd:rank=1", ddp)
        try:
            b.load_state_dict(a.state_dict())
        except CompressorError as exc:
            return str(exc)
        return "no error"

    msg = run_workers(fn)[0]
    assert "powersgd:rank=2" in msg and "powersgd:rank=1" in msg
