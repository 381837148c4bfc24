"""Codecs: bit packing format, log and uniform quantizers, rounding."""

from __future__ import annotations

import math

import pytest
import torch

from gia_bench.defenses.codecs import (
    empirical_entropy_bits,
    log_dequantize,
    log_levels,
    log_max_relative_error,
    log_quantize,
    log_roundtrip_ste,
    pack_bits,
    packed_nbytes,
    round_codes,
    uniform_dequantize,
    uniform_quantize,
    unpack_bits,
)


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """The documented format, bit by bit: code i fills stream bits [i*b, (i+1)*b), LSB first."""
    out = bytearray(packed_nbytes(len(codes), bits))
    for i, c in enumerate(codes):
        for t in range(bits):
            if (c >> t) & 1:
                pos = i * bits + t
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_round_trip_and_format(bits, gen):
    for n in (0, 1, 7, 8, 13, int(torch.randint(20, 300, (1,), generator=gen))):
        codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.int64)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, n), codes)
        if n <= 13:
            assert bytes(packed.tolist()) == _reference_pack(codes.tolist(), bits)


def test_unpack_rejects_a_wrong_length():
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 6, 5)  # 5 codes of 6 bits need 4 bytes


@pytest.mark.parametrize("bits, alpha", [(2, 1.0), (4, 10.0), (6, 3.0), (8, 10.0), (8, 300.0), (12, 30.0)])
def test_log_codec_error_is_within_the_stated_bound(bits, alpha, gen):
    x = torch.randn(20_000, generator=gen) * torch.logspace(-4, 0, 20_000)
    codes, scale = log_quantize(x, bits, alpha)
    assert codes.min() >= 0 and codes.max() < 2**bits
    err = (log_dequantize(codes, scale, bits, alpha) - x).abs().max() / scale
    bound = log_max_relative_error(bits, alpha)
    assert err <= bound * (1 + 1e-5) + 1e-6
    # the bound is tight: the worst case near |x| = s comes within a factor 2 of it
    top = torch.linspace(0.5, 1.0, 20_001) * scale
    c2, s2 = log_quantize(top, bits, alpha)
    assert (log_dequantize(c2, s2, bits, alpha) - top).abs().max() / s2 > 0.5 * bound


def test_log_codec_keeps_signs_and_zero(gen):
    x = torch.tensor([0.0, -1.0, 1.0, -0.25, 0.25, -0.0])
    codes, scale = log_quantize(x, 8, 10.0)
    y = log_dequantize(codes, scale, 8, 10.0)
    assert y[0] == 0 and y[5] == 0
    assert torch.equal(torch.sign(y[1:5]), torch.sign(x[1:5]))
    torch.testing.assert_close(y[1:3], x[1:3])  # |x| = s is a level


@pytest.mark.parametrize("bits", [2, 8])
def test_log_codec_zero_and_constant_tensors(bits):
    codes, scale = log_quantize(torch.zeros(10), bits, 10.0)
    assert scale.item() == 0 and not codes.any()
    assert not log_dequantize(codes, scale, bits, 10.0).any()
    c = torch.full((10,), -3.5)
    codes, scale = log_quantize(c, bits, 10.0)
    torch.testing.assert_close(log_dequantize(codes, scale, bits, 10.0), c, rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        log_levels(1)


def test_stochastic_log_rounding_is_unbiased_in_u(gen):
    bits, alpha, n, reps = 4, 10.0, 500, 400
    x = torch.rand(n, generator=gen) * 2 - 1
    x[0] = 1.0  # fixes the scale at 1 in every draw
    levels = log_levels(bits)
    u = torch.log1p(alpha * x.abs()) / math.log1p(alpha)
    mean_u = torch.zeros(n, dtype=torch.float64)
    for _ in range(reps):
        codes, _ = log_quantize(x, bits, alpha, stochastic=True, generator=gen)
        mean_u += (codes & levels).to(torch.float64) / levels / reps
    # each draw is within one level of u; the mean's standard error is <= 0.5 / L / sqrt(reps)
    assert (mean_u - u).abs().max() < 5 * 0.5 / levels / math.sqrt(reps)
    # nearest rounding is biased for the same values (so the test can fail)
    near = (log_quantize(x, bits, alpha)[0] & levels).to(torch.float64) / levels
    assert (near - u).abs().mean() > 3 * (mean_u - u).abs().mean()


def test_round_codes(gen):
    v = torch.tensor([0.2, 0.5, 1.7, 2.5])
    assert torch.equal(round_codes(v, False, None), torch.round(v))
    draws = torch.stack([round_codes(v, True, gen) for _ in range(4000)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    torch.testing.assert_close(draws.mean(0), v, atol=0.04, rtol=0)


def test_log_roundtrip_ste_passes_gradients_straight_through(gen):
    x = torch.randn(50, generator=gen, requires_grad=True)
    y = log_roundtrip_ste(x, 4, 10.0)
    codes, scale = log_quantize(x, 4, 10.0)
    torch.testing.assert_close(y.detach(), log_dequantize(codes, scale, 4, 10.0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(50))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_uniform_quantizer_error_and_unbiasedness(bits, gen):
    x = torch.randn(5_000, generator=gen)
    codes, scale = uniform_quantize(x, bits)
    top = 2**bits - 1
    assert codes.min() >= 0 and codes.max() <= top
    # nearest: within half a step (2s / top / 2)
    assert (uniform_dequantize(codes, scale, bits) - x).abs().max() <= scale / top * (1 + 1e-5)
    mean = torch.zeros_like(x)
    for _ in range(200):
        c, s = uniform_quantize(x, bits, stochastic=True, generator=gen)
        mean += uniform_dequantize(c, s, bits) / 200
    # stochastic: unbiased; per-value standard error <= step / 2 / sqrt(200)
    assert (mean - x).abs().max() < 5 * (2 * scale / top) / 2 / math.sqrt(200)
    zc, zs = uniform_quantize(torch.zeros(4), bits)
    assert not uniform_dequantize(zc, zs, bits).any()


def test_empirical_entropy():
    assert empirical_entropy_bits(torch.tensor([0, 1, 2, 3] * 5)) == pytest.approx(2.0)
    assert empirical_entropy_bits(torch.zeros(7, dtype=torch.int64)) == 0.0
    assert empirical_entropy_bits(torch.zeros(0, dtype=torch.int64)) == 0.0
