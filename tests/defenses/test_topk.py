import pytest
import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create
from gia_bench.defenses.topk import TopK, topk_count
from gia_bench.errors import CompressorError, SpecError


def _grads(gen, shapes=((8, 3, 3, 3), (8,), (5, 40))):
    return [torch.randn(s, generator=gen) for s in shapes]


def test_count_rounds_up_without_float_noise():
    assert topk_count(100, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floating point
    assert topk_count(450, 0.01) == 5  # ceil(4.5)
    assert topk_count(5, 0.01) == 1  # at least one entry
    assert topk_count(3, 1.0) == 3
    assert topk_count(0, 0.5) == 0


def test_keeps_exactly_the_k_largest_magnitudes(gen):
    comp = TopK(ratio=0.05, error_feedback=False)
    grads = _grads(gen)
    comm = LocalCommunicator()
    out = comp.step(grads, comm)
    for g, o in zip(grads, out):
        k = topk_count(g.numel(), 0.05)
        kept = o != 0
        assert int(kept.sum()) == k
        assert torch.equal(o[kept], g[kept])  # values sent unchanged (fp32)
        if k < g.numel():
            assert g[kept].abs().min() >= g[~kept].abs().max()
    msgs = messages_by_tag(comm.messages)
    assert msgs["values"].dtype == torch.float32 and msgs["indices"].dtype == torch.int32
    assert comm.bytes_sent == 8 * sum(topk_count(g.numel(), 0.05) for g in grads)


def test_error_feedback_selects_from_gradient_plus_residual(gen):
    comp = TopK(ratio=0.1)
    g1, g2 = _grads(gen), _grads(gen)
    out1 = comp.step(g1, LocalCommunicator())
    residual = comp.state_dict()["residuals"]
    for i, (g, o) in enumerate(zip(g1, out1)):
        assert torch.equal(residual[i], (g - o).reshape(-1))  # exact: kept entries zeroed
    out2 = comp.step(g2, LocalCommunicator())
    ref = TopK(ratio=0.1, error_feedback=False)
    expected = ref.step([a + b.reshape(a.shape) for a, b in zip(g2, residual.values())], LocalCommunicator())
    assert all(torch.equal(a, b) for a, b in zip(out2, expected))


def test_without_error_feedback_no_state(gen):
    comp = TopK(ratio=0.1, error_feedback=False)
    comp.step(_grads(gen), LocalCommunicator())
    assert comp.state_dict() == {"residuals": {}}


def test_simulate_reads_the_candidate_at_the_observed_mask(gen):
    comp = TopK(ratio=0.05)
    grads = _grads(gen)
    comm = LocalCommunicator()
    comp.step(grads, comm)
    msgs = messages_by_tag(comm.messages)
    shapes = [g.shape for g in grads]
    # the true gradient reproduces the observation exactly (no residual at the first step)
    assert torch.equal(comp.simulate(grads, msgs)["values"], comp.message_values(msgs, shapes)["values"])
    cand = [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]
    comp.simulate(cand, msgs)["values"].sum().backward()
    decoded = comp.decode(msgs, shapes)
    for c, d in zip(cand, decoded):
        assert torch.equal(c.grad != 0, d != 0)  # gradient reaches exactly the observed positions


def test_bad_inputs_raise_our_errors(gen):
    with pytest.raises(SpecError, match="ratio"):
        create("topk:ratio=0")
    with pytest.raises(SpecError, match="ratio"):
        create("topk:ratio=1.5")
    comp = TopK(ratio=0.1)
    comm = LocalCommunicator()
    comp.step(_grads(gen), comm)
    with pytest.raises(CompressorError):
        comp.decode(messages_by_tag(comm.messages), [torch.Size([3, 3])])
    with pytest.raises(CompressorError, match="residual"):
        comp.step([torch.randn(4)], LocalCommunicator(), keys=[0])  # key 0 held an 8x3x3x3 residual
