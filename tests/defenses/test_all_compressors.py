"""The contract every registered compressor must keep, checked on its default spec.

The battery itself lives in :mod:`gia_bench.contract` (``gia-bench audit`` runs the same
checks on a third party's compressor); this file runs every check on every name of
``DEFENSES.names()`` (parametrised at collection time, so a compressor added to
``gia_bench/defenses/`` or by an entry point is checked too) and adds what only the
built-ins promise: byte counts written out independently of their code, and the
aggregate as the mean of the decoded messages. Nothing is skipped per compressor: one
that cannot keep the contract fails here.

Conventions the battery relies on (from ``gia_bench/defenses/base.py``):

* ``step`` returns the mean over workers; with one worker, ``decode`` of the recorded
  messages equals the output;
* a compressor whose ``state_dict()`` holds ``"residuals"`` (error feedback, keyed like the
  ``keys`` of ``step``; a tensor without one is sent exactly) keeps
  ``sum(outputs) + residual == sum(inputs)`` with one worker;
* a compressor with the class attribute ``adds_noise = True`` turns zero into noise, so
  only its finiteness is checked on an all-zero gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from gia_bench import contract
from gia_bench.contract import BATTERY_SHAPES, CHECKS, NotApplicable, Subject, all_close, battery_grads
from gia_bench.defenses import DEFENSES, create

NAMES = DEFENSES.names()


def _numels(shapes) -> list[int]:
    return [math.prod(s) for s in shapes]


# Bytes one worker sends, from what each compressor puts on the wire (default specs),
# written out here independently of the compressors' own code.
EXPECTED_BYTES = {
    "none": lambda shapes: 4 * sum(_numels(shapes)),
    "fp16": lambda shapes: 2 * sum(_numels(shapes)),
    "noise": lambda shapes: 4 * sum(_numels(shapes)),
    # ratio 0.01: k = max(1, ceil(n / 100)) fp32 values + as many int32 indices
    "topk": lambda shapes: sum(8 * max(1, -(-n // 100)) for n in _numels(shapes)),
    # one fp32 norm per 512-entry bucket of each tensor, 1 sign bit and 5 level bits (s = 16) per entry
    "qsgd": lambda shapes: 4 * sum(-(-n // 512) for n in _numels(shapes))
    + -(-sum(_numels(shapes)) // 8)
    + -(-5 * sum(_numels(shapes)) // 8),
    # 1 sign bit per entry, one fp32 scale per tensor
    "signsgd": lambda shapes: -(-sum(_numels(shapes)) // 8) + 4 * len(shapes),
}

# Compressors whose aggregate is the mean of what each worker's messages decode to.
MEAN_OF_DECODED = {"none", "noise", "topk", "qsgd", "signsgd"}
# fp16 divides by the world size before sending (as PyTorch's fp16_compress_hook, to keep the
# fp16 sum in range), so a worker's message decodes to g / N and the aggregate is their sum.
SUM_OF_DECODED = {"fp16"}

# Compressors with error feedback that this battery checks even if their state is named differently.
ERROR_FEEDBACK = {"topk", "signsgd"}


def _shapes(grads):
    return [g.shape for g in grads]


def _step(comp, grads, keys=None):
    return contract._step(comp, grads, keys)


@pytest.mark.parametrize("check", CHECKS, ids=[c.name.replace(" ", "-") for c in CHECKS])
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, check):
    """Every check of the battery on every registered compressor (the audit's checks, exactly)."""
    try:
        reason = check.run(Subject.from_spec(name))
    except NotApplicable as exc:
        if check.name == "error feedback loses nothing" and name in ERROR_FEEDBACK:
            pytest.fail(f"{name} has error feedback, but the battery found none: {exc}")
        pytest.skip(str(exc))
    assert reason == "", f"{name}: {reason}"


@pytest.mark.parametrize("name", sorted(EXPECTED_BYTES))
def test_bytes_match_the_wire_format(name):
    _, comm = _step(create(name), battery_grads(0))
    assert comm.bytes_sent == EXPECTED_BYTES[name](BATTERY_SHAPES)


# -- two real processes over gloo ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gloo_results():
    """One spawn of 2 gloo workers runs every compressor; returns ``[rank0, rank1]`` results."""
    return contract.gloo_runs({name: DEFENSES.kwargs_for(name) for name in NAMES})


@pytest.mark.parametrize("name", NAMES)
def test_two_gloo_workers_agree(name, gloo_results):
    runs = [r[name] for r in gloo_results]
    reason = contract.check_gloo_run(runs, lambda: create(name))
    assert reason == "", f"{name}: {reason}"
    for step, (s0, s1) in enumerate(zip(runs[0]["steps"], runs[1]["steps"])):
        if name == "none":
            for o, g0, g1 in zip(s0["out"], s0["inputs"], s1["inputs"]):
                assert torch.allclose(o, (g0 + g1) / 2, rtol=1e-6, atol=1e-7)
        if name in MEAN_OF_DECODED | SUM_OF_DECODED:
            comp = create(name)
            decoded = [
                comp.decode({m["tag"]: m["tensor"] for m in s["messages"]}, [g.shape for g in s["inputs"]], s["public"])
                for s in (s0, s1)
            ]
            workers = 1 if name in SUM_OF_DECODED else 2
            # an fp16 all-reduce rounds its sum to fp16 (11 significant bits)
            rtol = 1e-3 if any(m["tensor"].dtype == torch.float16 for m in s0["messages"]) else 1e-5
            mean = [(d0 + d1) / workers for d0, d1 in zip(*decoded)]
            assert all_close(mean, s0["out"], rtol), f"{name} step {step}: aggregate is not the decoded messages' mean"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(EXPECTED_BYTES))
def test_cuda_bytes_match_the_wire_format(name):
    """The battery's CUDA check covers devices, dtypes and decode; here the byte counts on CUDA."""
    comp = create(name)
    for seed in range(2):
        _, comm = _step(comp, battery_grads(seed, device="cuda"))
        assert comm.bytes_sent == EXPECTED_BYTES[name](BATTERY_SHAPES)
