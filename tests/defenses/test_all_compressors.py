"""The contract every registered compressor must keep, checked on its default spec.

The battery itself lives in :mod:`gia_bench.contract` (``gia-bench audit`` runs the same
checks on a third party's compressor); this file runs every check on every name of
``DEFENSES.names()`` (parametrised at collection time, so a compressor added to
``gia_bench/defenses/`` or by an entry point is checked too) and adds what only the
built-ins promise: byte counts written out independently of their code (``_wire_bytes.py``), and the
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

import pytest
import torch

from _wire_bytes import EXPECTED_BYTES, wire_bytes_error

from gia_bench import contract
from gia_bench.comm import Communicator
from gia_bench.contract import CHECKS, NotApplicable, Subject, all_close, battery_grads
from gia_bench.defenses import DEFENSES, create
from gia_bench.defenses.signsgd import SignSGD
from gia_bench.defenses.topk import TopK

NAMES = DEFENSES.names()


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
    return contract.run_step(comp, grads, keys)


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


def test_every_built_in_compressor_has_its_wire_format_written_out():
    built_in = {n for n in NAMES if DEFENSES.get(n).__module__.startswith("gia_bench.defenses.")}
    assert built_in == set(EXPECTED_BYTES)


@pytest.mark.parametrize("name", sorted(EXPECTED_BYTES))
def test_bytes_match_the_wire_format(name):
    """Bytes sent equal the wire format's, written out in tests/defenses/_wire_bytes.py (two gradients:
    Threshold quantization and RC-FED send data-dependent amounts)."""
    for seed in range(2):
        grads = battery_grads(seed)
        _, comm = _step(create(name), grads)
        assert wire_bytes_error(name, comm.bytes_sent, grads) == ""


# -- compressors that misreport their bytes are caught ----------------------------------------------


class _Int64Indices:
    """A communicator seen through a compressor that widens its int32 messages to int64 on the wire."""

    def __init__(self, comm: Communicator) -> None:
        self.comm, self.world_size, self.rank = comm, comm.world_size, comm.rank

    def all_gather(self, tensor, tag):
        wide = tensor.to(torch.int64) if tensor.dtype == torch.int32 else tensor
        return [t.to(tensor.dtype) for t in self.comm.all_gather(wide, tag)]


class WideTopK(TopK):
    """Counts every byte it sends, but sends 8-byte indices where the format has int32."""

    def step(self, grads, comm, keys=None):
        return super().step(grads, _Int64Indices(comm), keys)


class PaddedSignSGD(SignSGD):
    """Counts every byte it sends, but sends 16 bytes more than its format."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        comm.all_gather(torch.zeros(16, dtype=torch.uint8, device=grads[0].device), "pad")
        return out


class UnderCountingTopK(TopK):
    """Sends top-k's messages but logs half their bytes."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        for m in comm.messages:
            m.nbytes //= 2
            m.payload_nbytes //= 2
        return out


@pytest.mark.parametrize("liar, name", [(WideTopK, "topk"), (PaddedSignSGD, "signsgd"), (UnderCountingTopK, "topk")])
def test_a_compressor_misreporting_its_bytes_is_caught(liar, name):
    grads = battery_grads(0)
    _, honest = _step(create(name), grads)
    _, comm = _step(liar(), grads)
    assert wire_bytes_error(name, honest.bytes_sent, grads) == ""
    assert "its wire format sends" in wire_bytes_error(name, comm.bytes_sent, grads)


def test_the_battery_catches_bytes_logged_below_the_tensors():
    assert contract.check_bytes(Subject(UnderCountingTopK, {}, "under")) != ""
    assert contract.check_bytes(Subject(TopK, {}, "topk")) == ""


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
        grads = battery_grads(seed, device="cuda")
        _, comm = _step(comp, grads)
        assert wire_bytes_error(name, comm.bytes_sent, grads) == ""
