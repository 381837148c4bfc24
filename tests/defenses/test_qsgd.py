import math

import pytest
import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create
from gia_bench.defenses.codecs import unpack_bits
from gia_bench.defenses.qsgd import QSGD
from gia_bench.errors import SpecError


def _draws(comp: QSGD, v: torch.Tensor, n: int) -> torch.Tensor:
    comm = LocalCommunicator(record=False)
    return torch.stack([comp.step([v], comm)[0] for _ in range(n)]).double()


def _exact_variance(v: torch.Tensor, levels: int, bucket: int) -> torch.Tensor:
    """Per-entry variance of Q_s: (||b||/s)^2 p (1-p), p the fractional part of s|v_i|/||b||."""
    var = torch.empty_like(v, dtype=torch.float64)
    for start in range(0, v.numel(), bucket):
        b = v[start : start + bucket].double()
        norm = torch.linalg.vector_norm(b)
        r = b.abs() / norm * levels
        p = r - r.floor()
        var[start : start + bucket] = (norm / levels) ** 2 * p * (1 - p)
    return var


@pytest.mark.parametrize("levels,bucket,d", [(4, 64, 128), (16, 16, 48)])
def test_unbiased_and_variance_as_the_paper_says(gen, levels, bucket, d):
    v = torch.randn(d, generator=gen)
    draws = 1500
    q = _draws(QSGD(levels=levels, bucket=bucket, seed=1), v, draws)
    var = _exact_variance(v, levels, bucket)
    # unbiased: each entry's mean is within 5 standard errors (CLT) of the truth
    err = (q.mean(0) - v.double()).abs()
    assert (err <= 5 * (var / draws).sqrt() + 1e-6).all()
    # the empirical squared error matches the exact variance (its own spread: < 10% here)
    mse = ((q - v.double()) ** 2).sum(1).mean()
    assert abs(float(mse) / float(var.sum()) - 1) < 0.1
    # Lemma 3.1: E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2, per bucket of d entries
    for start in range(0, d, bucket):
        b = v[start : start + bucket].double()
        bound = min(bucket / levels**2, math.sqrt(bucket) / levels) * float(b.pow(2).sum())
        assert float(var[start : start + bucket].sum()) <= bound
        assert float(((q[:, start : start + bucket] - b) ** 2).sum(1).mean()) <= bound


def test_near_worst_case_stays_within_the_bound():
    # Equal entries 1/sqrt(d) with s = 1: every entry rounds up with p = 1/sqrt(d), so
    # E||Q(v) - v||^2 = d p (1 - p) = 7 for d = 64, against the bound sqrt(d)/s = 8.
    d = 64
    v = torch.full((d,), 1 / math.sqrt(d))
    q = _draws(QSGD(levels=1, bucket=d, seed=2), v, 1000)
    mse = float(((q - v.double()) ** 2).sum(1).mean())
    assert abs(mse - 7.0) < 0.5 and mse <= min(d, math.sqrt(d))


def test_messages_and_codes(gen):
    shapes = [(3, 200), (7,), (1000,)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    grads[1].zero_()  # an all-zero bucket next to non-zero ones
    for levels, bits in [(16, 5), (15, 4), (1, 1), (255, 8)]:
        comp = QSGD(levels=levels, bucket=128)
        comm = LocalCommunicator()
        out = comp.step(grads, comm)
        m = messages_by_tag(comm.messages)
        n = sum(g.numel() for g in grads)
        buckets = math.ceil(600 / 128) + 1 + math.ceil(1000 / 128)
        assert m["norms"].dtype == torch.float32 and m["norms"].numel() == buckets
        assert m["signs"].dtype == torch.uint8 and m["signs"].numel() == math.ceil(n / 8)
        assert m["levels"].dtype == torch.uint8 and m["levels"].numel() == math.ceil(n * bits / 8)
        lv = unpack_bits(m["levels"], bits, n)
        assert int(lv.min()) >= 0 and int(lv.max()) <= levels
        assert torch.count_nonzero(out[1]) == 0
        # every output entry is on the grid ||bucket|| * l / s with the input's sign
        first = grads[0].reshape(-1)[:128]
        grid = out[0].reshape(-1)[:128] / torch.linalg.vector_norm(first) * levels
        assert torch.allclose(grid, grid.round(), atol=1e-4)
        assert ((out[0] * grads[0]) >= 0).all()


def test_seed_and_rank_fix_the_draws(gen):
    v = [torch.randn(300, generator=gen)]
    a = QSGD(seed=3).step(v, LocalCommunicator())[0]
    b = QSGD(seed=3).step(v, LocalCommunicator())[0]
    c = QSGD(seed=4).step(v, LocalCommunicator())[0]
    rank1 = LocalCommunicator()
    rank1.rank = 1  # a second worker draws from seed + 1
    d = QSGD(seed=3).step(v, rank1)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(c, d)


def test_simulate_norms_are_exact_and_differentiable(gen):
    comp = QSGD()
    grads = [torch.randn(5, 300, generator=gen), torch.randn(10, generator=gen)]
    comm = LocalCommunicator()
    comp.step(grads, comm)
    msgs = messages_by_tag(comm.messages)
    shapes = [g.shape for g in grads]
    sim = comp.simulate(grads, msgs)
    obs = comp.message_values(msgs, shapes)
    assert torch.allclose(sim["norms"], obs["norms"], rtol=1e-6)
    # in the units of one entry (norm / sqrt(bucket)), so the few norms do not outweigh the values
    assert torch.allclose(obs["norms"] * comp.bucket**0.5, msgs["norms"], rtol=1e-6)
    assert torch.equal(obs["values"], torch.cat([d.reshape(-1) for d in comp.decode(msgs, shapes)]))
    cand = [torch.zeros(s, requires_grad=True) for s in shapes]
    loss = sum(((comp.simulate(cand, msgs)[k] - obs[k]) ** 2).sum() for k in obs)
    grads_c = torch.autograd.grad(loss, cand)
    assert all(torch.isfinite(g).all() for g in grads_c)


def test_bad_parameters():
    for spec in ["qsgd:levels=0", "qsgd:bucket=0"]:
        with pytest.raises(SpecError):
            create(spec)


def _reference_pack(codes: list[int], bits: int) -> torch.Tensor:
    """codecs' documented layout, bit by bit: code i at stream bits [i*b, (i+1)*b), LSB first."""
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return torch.tensor([sum(stream[8 * k + m] << m for m in range(8)) for k in range(len(stream) // 8)], dtype=torch.uint8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16])
def test_level_packing_follows_the_documented_layout(gen, bits):
    from gia_bench.defenses.codecs import pack_bits

    for n in [0, 1, 7, 8, 9, 61]:
        codes = torch.randint(0, 2**bits, (n,), generator=gen)
        packed = pack_bits(codes, bits)
        assert torch.equal(packed, _reference_pack(codes.tolist(), bits))
        assert torch.equal(unpack_bits(packed, bits, n), codes)
