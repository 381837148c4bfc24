"""``contract.check_bytes`` fails every way a compressor can misstate what it sent, and passes the built-ins.

Each liar below runs an honest built-in's step and then falsifies one thing the byte count
rests on (the log of its communicator, or what it sends); ``check_bytes`` must name that
thing. The built-ins' totals are held to their wire formats, written out independently of
their code, in ``tests/defenses/test_all_compressors.py`` (``_wire_bytes.EXPECTED_BYTES``).
"""

from __future__ import annotations

import pytest
import torch

from gia_bench.contract import Subject, check_bytes
from gia_bench.defenses.signsgd import SignSGD
from gia_bench.defenses.topk import TopK


class HalfCounted(TopK):
    """Sends top-k's messages but logs half their bytes."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        for m in comm.messages:
            m.nbytes //= 2
            m.payload_nbytes //= 2
        return out


class WireOnlyUndercount(TopK):
    """Logs the payload right but the bytes on the wire low."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        comm.messages[0].nbytes -= 1
        return out


class WrongDtypeLogged(TopK):
    """Logs its fp32 values as fp16 (the log would price them at 2 bytes each)."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        comm.messages[0].dtype = torch.float16
        return out


class UnrecordedTensor(SignSGD):
    """Drops the tensor from the log: nothing shows what was sent."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        comm.messages[0].tensor = None
        return out


class RepeatedTag(SignSGD):
    """Sends a second message under a tag already used (a receiver keyed by tag sees one)."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        comm.all_gather(torch.zeros(4, dtype=torch.uint8), comm.messages[0].tag)
        return out


class SendsNothing(TopK):
    """Returns the gradient without a collective: it could not reach another worker."""

    def step(self, grads, comm, keys=None):
        return [g.clone() for g in grads]


class SendsEmpty(TopK):
    """Sends one empty tensor (0 bytes) and returns the whole gradient."""

    def step(self, grads, comm, keys=None):
        comm.all_gather(torch.zeros(0), "nothing")
        return [g.clone() for g in grads]


@pytest.mark.parametrize(
    "liar, words",
    [
        (HalfCounted, "counted"),
        (WireOnlyUndercount, "counted"),
        (WrongDtypeLogged, "is logged as torch.float16"),
        (UnrecordedTensor, "not recorded as a CPU tensor"),
        (RepeatedTag, "tags repeat"),
        (SendsNothing, "sent nothing"),
        (SendsEmpty, "no byte was sent"),
    ],
)
def test_a_compressor_misstating_its_bytes_fails_check_bytes(liar, words):
    reason = check_bytes(Subject(liar, {}, liar.__name__))
    assert words in reason, reason


@pytest.mark.parametrize("honest", [TopK, SignSGD])
def test_the_liars_honest_parents_pass_check_bytes(honest):
    # the control: each liar fails for its lie, not for what it inherits (every registered
    # compressor passes the whole battery in tests/defenses/test_all_compressors.py)
    assert check_bytes(Subject(honest, {}, honest.__name__)) == ""
