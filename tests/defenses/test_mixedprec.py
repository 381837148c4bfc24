import math

import pytest
import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create
from gia_bench.defenses.codecs import log_max_relative_error
from gia_bench.errors import CompressorError, SpecError
from gia_bench.receiver import decode_record, load_record

NAMES = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"]
SHAPES = [(8, 3, 3, 3), (8,), (8, 8, 3, 3), (8,), (10, 72), (10,)]


def _grads(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * 10.0 ** (-i % 3) for i, s in enumerate(SHAPES)]


def _step(comp, grads, keys=None):
    comm = LocalCommunicator()
    out = comp.step(grads, comm, keys=keys)
    return out, comm


def test_rules_pick_bits_by_name_position_and_range():
    comp = create("mixedprec:bits_per_layer=conv1.*@2/-1@32/4@6/2-3@3/*@8")
    assert comp.assign_bits(NAMES) == [2, 2, 3, 3, 6, 32]
    # first match wins; with integer keys only positions (and '*') can match
    comp = create("mixedprec:bits_per_layer=0-1@4/*.bias@5/*@8")
    assert comp.assign_bits(NAMES) == [4, 4, 8, 5, 8, 5]
    assert comp.assign_bits(list(range(6))) == [4, 4, 8, 8, 8, 8]


def test_colon_is_accepted_and_the_spec_is_canonical():
    comp = create("mixedprec:bits_per_layer=0:2/*:8,mode=log")
    assert comp.bits_per_layer == "0@2/*@8"
    again = create(comp.spec)
    assert again.spec == comp.spec and again.assign_bits(NAMES) == [2, 8, 8, 8, 8, 8]


@pytest.mark.parametrize(
    "spec",
    [
        "mixedprec:bits_per_layer=conv1",  # no @bits
        "mixedprec:bits_per_layer=@4",  # no selector
        "mixedprec:bits_per_layer=*@x",
        "mixedprec:bits_per_layer=*@0",
        "mixedprec:bits_per_layer=*@17",
        "mixedprec:bits_per_layer=*@1,mode=log",  # log needs a sign bit and a magnitude bit
        "mixedprec:mode=cubic",
    ],
)
def test_bad_specs_are_spec_errors(spec):
    with pytest.raises(SpecError):
        create(spec)


def test_unmatched_tensor_is_an_error_naming_it():
    comp = create("mixedprec:bits_per_layer=conv*@4")
    with pytest.raises(CompressorError, match="fc.weight"):
        _step(comp, _grads(0), NAMES)


def test_bytes_are_the_packed_codes_scales_and_fp32_layers():
    comp = create("mixedprec:bits_per_layer=conv1.*@3/fc.*@32/*@5,stochastic=false")
    grads = _grads(1)
    out, comm = _step(comp, grads, NAMES)
    bits = [3, 3, 5, 5, 32, 32]
    sizes = [math.prod(s) for s in SHAPES]
    code_bytes = sum(math.ceil(n * b / 8) for n, b in zip(sizes, bits) if b < 32)
    by_tag = {m.tag: m for m in comm.messages}
    assert by_tag["codes"].nbytes == code_bytes
    assert by_tag["scales"].nbytes == 4 * 4
    assert by_tag["fp32"].nbytes == 4 * (sizes[4] + sizes[5])
    assert comm.bytes_sent == code_bytes + 16 + 4 * (sizes[4] + sizes[5])
    # fp32 layers pass through exactly; public state carries the assignment the receiver uses
    assert torch.equal(out[4], grads[4]) and torch.equal(out[5], grads[5])
    assert comp.public_state()["bits"].tolist() == bits
    decoded = comp.decode(messages_by_tag(comm.messages), [g.shape for g in grads], comp.public_state())
    assert all(torch.equal(d, o) for d, o in zip(decoded, out))


def test_name_rules_need_the_public_assignment():
    comp = create("mixedprec:bits_per_layer=conv1.*@3/*@5")
    grads = _grads(2)
    _, comm = _step(comp, grads, NAMES)
    with pytest.raises(CompressorError, match="public"):
        comp.decode(messages_by_tag(comm.messages), [g.shape for g in grads], None)
    # position-only rules decode without it
    comp = create("mixedprec:bits_per_layer=0-1@3/*@5")
    out, comm = _step(comp, grads, NAMES)
    decoded = comp.decode(messages_by_tag(comm.messages), [g.shape for g in grads], None)
    assert all(torch.equal(d, o) for d, o in zip(decoded, out))


def test_nearest_uniform_error_is_half_a_step_per_layer():
    comp = create("mixedprec:bits_per_layer=0-1@2/2-3@4/*@8,stochastic=false")
    grads = _grads(3)
    out, _ = _step(comp, grads, NAMES)
    for g, o, b in zip(grads, out, [2, 2, 4, 4, 8, 8]):
        s = float(g.abs().max())
        half_step = s / (2**b - 1)  # levels 2s/(2^b - 1) apart on [-s, s]
        assert float((o - g).abs().max()) <= half_step * (1 + 1e-5)
    # fewer bits, larger error: the first layers are the blurriest
    rel = [float((o - g).norm() / g.norm()) for g, o in zip(grads, out)]
    assert rel[0] > 2 * rel[2] and rel[2] > 2 * rel[4]


def test_log_mode_error_within_the_codec_bound():
    comp = create("mixedprec:bits_per_layer=0@3/*@6,mode=log,stochastic=false,alpha=10")
    grads = _grads(4)
    out, _ = _step(comp, grads)
    for g, o, b in zip(grads, out, [3, 6, 6, 6, 6, 6]):
        bound = log_max_relative_error(b, 10.0) * float(g.abs().max())
        assert float((o - g).abs().max()) <= bound * (1 + 1e-5)


def test_stochastic_uniform_is_unbiased_with_the_exact_variance():
    comp = create("mixedprec:bits_per_layer=0@2/*@3,stochastic=true,seed=5")
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(40, generator=gen), torch.randn(24, generator=gen)]
    draws = 2000
    outs = [torch.stack(o).double() for o in zip(*(_step(comp, grads)[0] for _ in range(draws)))]
    for g, q, b in zip(grads, outs, [2, 3]):
        s = float(g.abs().max())
        step = 2 * s / (2**b - 1)
        frac = ((g.double() / s + 1) / 2 * (2**b - 1)) % 1
        var = step**2 * frac * (1 - frac)  # a two-point draw on the neighbouring levels
        err = (q.mean(0) - g.double()).abs()
        assert (err <= 5 * (var / draws).sqrt() + 1e-6).all()
        assert abs(float(q.var(0).sum()) / float(var.sum()) - 1) < 0.1


def test_same_seed_same_draws_and_state_resumes():
    a = create("mixedprec:seed=3")
    b = create("mixedprec:seed=3")
    grads = _grads(5)
    first = _step(a, grads)[0]
    assert all(torch.equal(x, y) for x, y in zip(first, _step(b, grads)[0]))
    state = a.state_dict()
    ref = _step(a, grads)[0]
    c = create("mixedprec:seed=3")
    c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(ref, _step(c, grads)[0]))


def test_record_with_name_rules_round_trips(tmp_path):
    from gia_bench.capture import capture_batch, compute_gradient
    from gia_bench.data import DatasetSpec
    from gia_bench.models import ModelSpec, build_model

    ds = DatasetSpec("toy", (3, 32, 32), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ms = ModelSpec("lenet", ds.shape, ds.num_classes)
    model = build_model(ms, seed=0)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    comp = create("mixedprec:bits_per_layer=body.0.*@2/fc.*@32/*@6,stochastic=false")
    record, _ = capture_batch(model, ms, ds, x, torch.tensor([3, 7]), comp, "mp-0")
    back = load_record(record.save(tmp_path / "mp-0.safetensors"))
    assert back.public["bits"].tolist() == [2, 2, 6, 6, 6, 6, 32, 32]
    grads = compute_gradient(model, x, torch.tensor([3, 7]))
    for g, d, b in zip(grads, decode_record(back), back.public["bits"].tolist()):
        if b == 32:
            assert torch.equal(d, g)  # fp32 layers are sent as they are
        else:
            assert float((d - g).abs().max()) <= float(g.abs().max()) / (2**b - 1) * (1 + 1e-5)
