"""Helpers of the compressor battery that spawned processes import: test gradients and the gloo worker.

Kept at module level (and apart from the test module) because ``torch.multiprocessing.spawn``
pickles the worker function by name.
"""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

# A small model's gradient: conv weight, bias, a linear layer big enough for low-rank
# compressors to gain, its bias.
BATTERY_SHAPES: list[tuple[int, ...]] = [(16, 3, 5, 5), (16,), (10, 400), (10,)]


def battery_grads(seed: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Gradients of ``BATTERY_SHAPES`` with per-tensor scales spread over 3 decades, as real ones are."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for i, shape in enumerate(BATTERY_SHAPES):
        scale = 10.0 ** (-(i % 4))
        grads.append((torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype))
    return grads


def edge_grads(seed: int) -> list[torch.Tensor]:
    """Awkward tensors: 0-d, one entry, non-contiguous (a transposed matrix), a 1-D tensor."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn((), generator=gen),
        torch.randn(1, generator=gen),
        torch.randn(24, 9, generator=gen).t(),  # 9 x 24, not contiguous
        torch.randn(7, generator=gen),
    ]


def gloo_worker(rank: int, world_size: int, port: int, names: list[str], out_dir: str) -> None:
    """Run two steps of every compressor in ``names`` through a TorchCommunicator; save what happened.

    Saves ``rank{rank}.pt``: ``{name: {"inputs", "out", "messages"} per step, or "error"}``.
    """
    torch.set_num_threads(1)
    from gia_bench.comm import TorchCommunicator
    from gia_bench.defenses import create

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, dict] = {}
    try:
        for name in names:
            try:
                comp = create(name)
                steps = []
                for step in range(2):
                    grads = battery_grads(seed=1000 * step + rank)
                    comm = TorchCommunicator(record=True)
                    out = comp.step([g.clone() for g in grads], comm)
                    steps.append(
                        {
                            "inputs": grads,
                            "out": [o.detach().clone() for o in out],
                            "public": {k: v.detach().cpu().clone() for k, v in comp.public_state().items()},
                            "messages": [
                                {
                                    "tag": m.tag,
                                    "op": m.op,
                                    "nbytes": m.nbytes,
                                    "payload_nbytes": m.payload_nbytes,
                                    "tensor": m.tensor,
                                }
                                for m in comm.messages
                            ],
                        }
                    )
                results[name] = {"steps": steps}
            except Exception:  # reported by the test, per compressor
                results[name] = {"error": traceback.format_exc()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def assert_error_feedback_conserves(comp, grad_steps, rtol: float = 1e-5) -> dict:
    """Run ``comp`` (one worker) over the gradient lists in ``grad_steps`` and assert
    ``sum_t output_t + e_T == sum_t g_t`` per tensor (error feedback delays, never drops;
    a tensor without a residual is one the compressor sends exactly). Returns the residuals."""
    from gia_bench.comm import LocalCommunicator

    total_in: list[torch.Tensor] | None = None
    total_out: list[torch.Tensor] | None = None
    for grads in grad_steps:
        keys = list(range(len(grads)))
        out = comp.step([g.clone() for g in grads], LocalCommunicator(record=False), keys=keys)
        if total_in is None:
            total_in = [torch.zeros_like(g, dtype=torch.float64) for g in grads]
            total_out = [torch.zeros_like(g, dtype=torch.float64) for g in grads]
        for ti, to, g, o in zip(total_in, total_out, grads, out):
            ti += g.double()
            to += o.double()
    assert total_in is not None and total_out is not None, "no steps given"
    residuals = comp.state_dict()["residuals"]
    for i, (ti, to) in enumerate(zip(total_in, total_out)):
        e = residuals[i].double().reshape(ti.shape) if i in residuals else torch.zeros_like(ti)
        err = float(torch.linalg.vector_norm(to + e - ti))
        assert err <= rtol * float(torch.linalg.vector_norm(ti)), f"{comp.spec} tensor {i}: {err}"
    return residuals
