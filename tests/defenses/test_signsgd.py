import math

import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses.signsgd import SignSGD


def _grads(gen):
    return [torch.randn(4, 3, 3, generator=gen), torch.randn(5, generator=gen) * 1e-3, torch.randn(20, 6, generator=gen)]


def test_scaled_sign(gen):
    grads = _grads(gen)
    grads[1][2] = 0.0  # zero is sent with the + sign
    comm = LocalCommunicator()
    out = SignSGD(error_feedback=False).step(grads, comm)
    for g, o in zip(grads, out):
        scale = g.abs().mean()
        expected = torch.where(g < 0, -scale, scale)
        assert torch.equal(o, expected)
    m = messages_by_tag(comm.messages)
    n = sum(g.numel() for g in grads)
    assert m["signs"].dtype == torch.uint8 and m["signs"].numel() == math.ceil(n / 8)
    assert m["scales"].dtype == torch.float32 and m["scales"].numel() == len(grads)
    assert comm.bytes_sent == math.ceil(n / 8) + 4 * len(grads)


def test_matches_ef_signsgd_algorithm_1(gen):
    """Karimireddy et al. 2019, Alg. 1: p = g + e; delta = ||p||_1/d sign(p); e = p - delta."""
    comp = SignSGD()
    errors = None
    for _ in range(5):
        grads = _grads(gen)
        out = comp.step(grads, LocalCommunicator())
        errors = errors or [torch.zeros_like(g) for g in grads]
        for i, (g, o) in enumerate(zip(grads, out)):
            p = g + errors[i]
            delta = p.abs().sum() / p.numel() * torch.where(p < 0, -1.0, 1.0)
            errors[i] = p - delta
            assert torch.allclose(o, delta, rtol=1e-6, atol=1e-7)
    for i, e in comp.state_dict()["residuals"].items():
        assert torch.allclose(e.reshape(errors[i].shape), errors[i], rtol=1e-5, atol=1e-6)


def test_without_error_feedback_each_step_stands_alone(gen):
    comp = SignSGD(error_feedback=False)
    grads = _grads(gen)
    comp.step(_grads(gen), LocalCommunicator())
    again = SignSGD(error_feedback=False).step(grads, LocalCommunicator())
    assert all(torch.equal(a, b) for a, b in zip(comp.step(grads, LocalCommunicator()), again))
    assert comp.state_dict()["residuals"] == {}


def test_simulate_scale_exact_sign_straight_through(gen):
    comp = SignSGD()
    grads = _grads(gen)
    comm = LocalCommunicator()
    comp.step(grads, comm)
    msgs = messages_by_tag(comm.messages)
    shapes = [g.shape for g in grads]
    obs = comp.message_values(msgs, shapes)["values"]
    assert torch.equal(comp.simulate(grads, msgs)["values"], obs)
    cand = [g.clone().requires_grad_(True) for g in grads]
    comp.simulate(cand, msgs)["values"].pow(2).sum().backward()
    assert all(torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0 for c in cand)
