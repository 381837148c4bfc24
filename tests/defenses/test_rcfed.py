import math

import numpy as np
import pytest
import torch

from _lockstep import run_workers

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create
from gia_bench.defenses.codecs import empirical_entropy_bits
from gia_bench.defenses.rcfed import design_quantizer, entropy_decode, entropy_encode
from gia_bench.errors import SpecError

SHAPES = [(16, 3, 5, 5), (16,), (10, 400), (10,)]


def _grads(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * 10.0 ** (-i) + 0.1 * 10.0 ** (-i) for i, s in enumerate(SHAPES)]


def _step(comp, grads):
    comm = LocalCommunicator()
    return comp.step(grads, comm), comm


@pytest.mark.parametrize("k,skew", [(16, 0.5), (256, 0.05), (4, 3.0)])
def test_entropy_coder_inverts_exactly_near_the_entropy(k, skew):
    rng = np.random.default_rng(k)
    p = np.exp(-skew * np.arange(k))
    p[1::3] = 0  # symbols that never occur get zero counts
    symbols = rng.choice(k, size=20_000, p=p / p.sum())
    counts = np.bincount(symbols, minlength=k)
    stream = entropy_encode(symbols, counts)
    assert stream.dtype == np.uint8 and stream.size % 4 == 0
    assert np.array_equal(entropy_decode(stream, counts, symbols.size), symbols)
    floor = empirical_entropy_bits(torch.from_numpy(symbols)) * symbols.size / 8
    assert floor <= stream.size <= 1.01 * floor + 8


def test_lloyd_max_when_the_rate_does_not_bind():
    # Max (1960), Gaussian: 2 levels +-0.7979 (MSE 0.3634); 4 levels +-0.4528, +-1.510 (MSE 0.1175)
    d1 = design_quantizer(1, 1.0)
    assert d1.lam == 0 and np.allclose(d1.levels, [-0.7979, 0.7979], atol=1e-4)
    assert abs(d1.distortion - (1 - 2 / math.pi)) < 1e-9
    d2 = design_quantizer(2, 2.0)
    assert d2.lam == 0 and np.allclose(sorted(d2.levels), [-1.510, -0.4528, 0.4528, 1.510], atol=1e-3)
    assert abs(d2.distortion - 0.1175) < 2e-4


def test_design_meets_the_rate_and_trades_distortion_for_it():
    rates = [1.0, 1.5, 2.0, 3.0]
    designs = [design_quantizer(4, r) for r in rates]
    for r, d in zip(rates, designs):
        assert d.entropy <= r + 1e-9 and d.entropy >= r - 0.05
    mses = [d.distortion for d in designs]
    assert all(a > b for a, b in zip(mses, mses[1:]))
    # ECSQ sits within the 0.255-bit high-rate gap of the Gaussian rate-distortion bound D = 2^(-2R)
    d3 = designs[-1]
    assert 2 ** (-2 * 3.0) < d3.distortion < 2 ** (-2 * (3.0 - 0.3))
    # Monte Carlo on N(0, 1): the measured MSE and entropy are the design's
    comp = create("rcfed:bits=4,rate=2")
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    codes = comp._quantize(z, torch.tensor([0.0, 1.0]))
    mse = float((comp._reconstruct(codes, torch.tensor([0.0, 1.0])) - z).pow(2).mean())
    assert abs(mse - designs[2].distortion) < 0.01 * designs[2].distortion + 1e-3
    assert abs(empirical_entropy_bits(codes) - designs[2].entropy) < 0.02


def test_bytes_are_the_coded_stream_plus_side_information():
    comp = create("rcfed:bits=4,rate=2")
    grads = _grads(0)
    out, comm = _step(comp, grads)
    msgs = messages_by_tag(comm.messages)
    n = sum(g.numel() for g in grads)
    # the stream is exactly the range coder's output for the codes and counts that were sent
    codes = torch.cat([comp._quantize(g.reshape(-1), s) for g, s in zip(grads, msgs["stats"])])
    counts = torch.bincount(codes, minlength=16)
    assert torch.equal(msgs["counts"], counts.to(torch.int32))
    stream = entropy_encode(codes.numpy(), counts.numpy())
    assert int(msgs["length"]) == stream.size and np.array_equal(msgs["stream"].numpy(), stream)
    assert comm.bytes_sent == stream.size + 8 * len(grads) + 4 * 16 + 8
    assert comp.last_coded_rate == pytest.approx(8 * stream.size / n)
    # the entropy coder carries exactly the encoded codes, and decode is the step's output
    assert torch.equal(comp.decode_codes(msgs, n), codes)
    decoded = comp.decode(msgs, [g.shape for g in grads])
    assert all(torch.equal(d, o) for d, o in zip(decoded, out))
    # Gaussian-like gradients: close to the target rate, well under the 4 bits of fixed-length codes
    assert 1.7 < comp.last_coded_rate < 2.1


def test_higher_rate_more_bytes_less_error():
    grads = _grads(1)
    results = []
    for rate in (1.0, 2.0, 3.0):
        out, comm = _step(create(f"rcfed:bits=4,rate={rate}"), grads)
        err = sum(float((o - g).pow(2).sum()) / float(g.pow(2).sum()) for o, g in zip(out, grads))
        results.append((comm.bytes_sent, err))
    assert results[0][0] < results[1][0] < results[2][0]
    assert results[0][1] > results[1][1] > results[2][1]


def test_constant_tensors_are_exact():
    grads = [torch.full((5, 4), 0.25), torch.zeros(3), torch.tensor(-2.0)]
    out, _ = _step(create("rcfed"), grads)
    assert all(torch.equal(o, g) for o, g in zip(out, grads))


def test_simulate_is_the_workers_map():
    comp = create("rcfed:bits=3,rate=1.5")
    grads = _grads(2)
    out, comm = _step(comp, grads)
    msgs = messages_by_tag(comm.messages)
    sim = comp.simulate([g.requires_grad_(True) for g in grads], msgs)["grads"]
    assert torch.allclose(sim.detach(), comp.message_values(msgs, [g.shape for g in grads])["grads"], atol=1e-6)


@pytest.mark.parametrize("spec", ["rcfed:bits=0", "rcfed:bits=9", "rcfed:rate=0", "rcfed:rate=-1"])
def test_bad_parameters(spec):
    with pytest.raises(SpecError):
        create(spec)


def test_two_workers_pad_streams_to_the_longest_and_count_it():
    comps = [create("rcfed:bits=4,rate=2") for _ in range(2)]
    # worker 1's gradient is mostly one value: a much shorter stream
    grads = [_grads(3), [torch.where(g.abs() > 2 * g.std(), g, torch.zeros_like(g)) for g in _grads(4)]]
    (out0, _, _, comm0), (out1, _, _, comm1) = run_workers(comps, grads)
    assert all(torch.equal(a, b) for a, b in zip(out0, out1))
    msgs = [messages_by_tag(c.messages) for c in (comm0, comm1)]
    lengths = [int(m["length"]) for m in msgs]
    assert lengths[1] < lengths[0] // 2
    # both send the longest stream (padding counted), and each decodes from its own length
    assert msgs[0]["stream"].numel() == msgs[1]["stream"].numel() == max(lengths)
    assert {m.tag: m.nbytes for m in comm1.messages}["stream"] == max(lengths)
    shapes = [g.shape for g in grads[0]]
    decoded = [comps[0].decode(m, shapes) for m in msgs]
    for o, d0, d1 in zip(out0, *decoded):
        assert torch.allclose(o, (d0 + d1) / 2, atol=1e-7)
