"""Threshold quantization (QCMD/QRDA adagrad's compressor): error bounds, bytes, unbiasedness, workers."""

from __future__ import annotations

import pytest
import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create
from gia_bench.errors import CompressorError, SpecError

from _lockstep import run_workers


def _grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 5, generator=g), torch.randn(7, generator=g), torch.zeros(3), torch.randn(40, 30, generator=g)]


@pytest.mark.parametrize("threshold,bits", [(0.0, 2), (0.1, 4), (0.3, 8)])
def test_drops_below_threshold_and_bounds_the_error_of_kept_entries(threshold, bits):
    comp = create(f"tq:threshold={threshold},bits={bits},rounding=nearest")
    grads = _grads()
    comm = LocalCommunicator()
    out = comp.step(grads, comm)
    levels = 2 ** (bits - 1) - 1
    for g, o in zip(grads, out):
        s = g.abs().max()
        if s == 0:
            assert not o.any()
            continue
        small = g.abs() < threshold * s
        assert not o[small].any()  # dropped entries are zero
        err = (o - g)[~small].abs().max()
        assert err <= (1 - threshold) * s / (2 * levels) * (1 + 1e-5)
        if threshold > 0:  # the lowest level is tau * s > 0: a kept entry keeps its sign
            assert torch.equal(torch.sign(o[~small]), torch.sign(g[~small]))
    # what the receiver decodes from the messages is what the worker applied
    decoded = comp.decode(messages_by_tag(comm.messages), [g.shape for g in grads])
    for o, d in zip(out, decoded):
        torch.testing.assert_close(o, d, rtol=0, atol=0)


def test_bytes_are_the_messages_and_the_cheaper_position_format():
    grads = _grads()
    n = sum(g.numel() for g in grads)
    for threshold, tag in [(0.9, "indices"), (0.05, "mask")]:
        comp = create(f"tq:threshold={threshold},bits=4,rounding=nearest")
        comm = LocalCommunicator()
        out = comp.step(grads, comm)
        kept = int(sum((o != 0).sum() for o in out))
        tags = {m.tag for m in comm.messages}
        assert tags == {"scales", "count", tag, "codes"}
        assert comm.bytes_sent == sum(m.nbytes for m in comm.messages) == comp.expected_nbytes(
            [g.shape for g in grads], kept
        )
        assert comm.bytes_sent < 4 * n


def test_stochastic_rounding_is_unbiased_on_kept_entries():
    g = [torch.linspace(0.2, 1.0, 50)]  # all above the threshold: all kept
    comp = create("tq:threshold=0.1,bits=2,rounding=stochastic,seed=3")
    mean = torch.stack([comp.step(g, LocalCommunicator(record=False))[0] for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, g[0], rtol=0, atol=0.02)


def test_two_workers_average_what_each_receiver_decodes():
    comps = [create("tq:threshold=0.2,bits=4,rounding=nearest") for _ in range(2)]
    per_worker = [_grads(1), _grads(2)]
    results = run_workers(comps, per_worker)
    shapes = [g.shape for g in per_worker[0]]
    for rank in range(2):
        out = results[rank][0]
        expected = [
            (a + b) / 2
            for a, b in zip(*[create("tq:threshold=0.2,bits=4,rounding=nearest").step(g, LocalCommunicator()) for g in per_worker])
        ]
        for o, e in zip(out, expected):
            torch.testing.assert_close(o, e, rtol=1e-6, atol=1e-6)
        assert len(out) == len(shapes)


def test_each_workers_padded_messages_decode_to_its_own_part():
    # indices / codes travel padded to the longest worker's; 'count' cuts them back
    spec = "tq:threshold=0.6,bits=4,rounding=nearest"
    per_worker = [_grads(1), [g * (1 + 3 * (g.abs() > 1.5)) for g in _grads(2)]]
    results = run_workers([create(spec) for _ in range(2)], per_worker)
    shapes = [g.shape for g in per_worker[0]]
    for rank in range(2):
        msgs = results[rank][1]
        alone_comm = LocalCommunicator()
        alone = create(spec).step(per_worker[rank], alone_comm)
        for d, a in zip(create(spec).decode(msgs, shapes), alone):
            torch.testing.assert_close(d, a, rtol=0, atol=0)


def test_simulate_matches_message_values_at_the_true_gradient():
    comp = create("tq:threshold=0.2,bits=8,rounding=nearest")
    grads = [g.requires_grad_() for g in _grads()]
    comm = LocalCommunicator()
    comp.step([g.detach() for g in grads], comm)
    msgs = messages_by_tag(comm.messages)
    shapes = [g.shape for g in grads]
    observed = comp.message_values(msgs, shapes)
    sim = comp.simulate(grads, msgs)
    assert observed.keys() == sim.keys()
    torch.testing.assert_close(sim["scales"], observed["scales"])
    bound = (1 - 0.2) * float(observed["scales"].max()) / (2 * 127)  # the nearest-rounding error of a kept entry
    assert (sim["values"] - observed["values"]).abs().max() <= bound * (1 + 1e-5)
    (sim["values"].sum() + sim["scales"].sum()).backward()
    assert grads[0].grad is not None


def test_bad_specs_and_messages():
    with pytest.raises(SpecError):
        create("tq:threshold=1.0")
    with pytest.raises(SpecError):
        create("tq:bits=1")
    comp = create("tq:threshold=0.9,bits=4")
    comm = LocalCommunicator()
    grads = _grads()
    comp.step(grads, comm)
    msgs = messages_by_tag(comm.messages)
    bad = dict(msgs, indices=torch.full_like(msgs["indices"], 10**6))
    with pytest.raises(CompressorError, match="out of range"):
        comp.decode(bad, [g.shape for g in grads])
    with pytest.raises(CompressorError, match="scales"):
        comp.decode(dict(msgs, scales=msgs["scales"][:2]), [g.shape for g in grads])
