"""Multi-worker PowerSGD / LQ-SGD: the public ``P_sum`` makes one worker's decode exact.

With several workers, ``P_hat = orth(sum of the workers' P)``; a receiver that knows the sum
(every worker does) decodes each worker's share ``P_hat Q_i^T`` exactly, and the shares
average to the aggregate the step applied. The oracle simulation (residual and ``P_sum``
known) reproduces the worker's messages.
"""

from __future__ import annotations

import pytest
import torch
from _lockstep import run_workers

from gia_bench.defenses import create


@pytest.mark.parametrize("defense", ["powersgd:rank=2", "lqsgd:rank=2,bits=8", "powersgd:rank=1,warm_start=false"])
def test_two_worker_decode_is_exact_and_oracle_simulates_rank0(defense):
    """Each worker's decode (with the public P_sum) is its share; their mean is the aggregate applied."""
    torch.manual_seed(0)
    shapes = [(16, 12), (12,), (8, 3, 3, 3)]
    comps = [create(defense) for _ in range(2)]
    for _ in range(3):  # a few steps: residuals and warm-start Q
        run_workers(comps, [[torch.randn(s) for s in shapes] for _ in range(2)])
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
    private = [c.private_state(list(range(len(shapes))), [torch.Size(s) for s in shapes]) for c in comps]
    results = run_workers(comps, grads)
    sizes = [torch.Size(s) for s in shapes]
    decoded = [comps[0].decode(msgs, sizes, public) for _, msgs, public, _ in results]
    assert "P_sum" in results[0][2]
    for r in range(2):
        for mean, a, b in zip(results[r][0], decoded[0], decoded[1]):
            torch.testing.assert_close((a + b) / 2, mean, rtol=1e-5, atol=1e-6)
    # the oracle simulation of rank 0 reproduces its messages exactly
    _, msgs, public, _ = results[0]
    sim = comps[0].simulate(grads[0], msgs, public, private=private[0])
    values = comps[0].message_values(msgs, sizes, public)
    for key in values:
        torch.testing.assert_close(sim[key], values[key], rtol=1e-5, atol=1e-6)
