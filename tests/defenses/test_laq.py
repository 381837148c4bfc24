import math

import pytest
import torch

from _lockstep import run_workers

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create
from gia_bench.defenses.laq import LAQ, laq_dequantize, laq_quantize
from gia_bench.errors import CompressorError, SpecError
from gia_bench.receiver import decode_record, load_record

SHAPES = [(6, 5), (6,), (4, 6)]


def _grads(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * scale for s in SHAPES]


def _step(comp, grads):
    comm = LocalCommunicator()
    out = comp.step(grads, comm)
    return out, comm


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def test_quantizer_is_the_papers():
    """Codes and values equal the authors' ``quantd``: v2 - r + 2 d floor((g - v2 + r + d) / (2 d)), d = r/(2^b-1)."""
    gen = torch.Generator().manual_seed(0)
    g, last = torch.randn(500, generator=gen, dtype=torch.float64), torch.randn(500, generator=gen, dtype=torch.float64)
    for bits in (1, 3, 8):
        codes, radius = laq_quantize((g - last).float(), bits)
        r = float((g - last).abs().max())
        d = r / (2**bits - 1)
        ref = last - r + 2 * d * torch.floor((g - last + r + d) / (2 * d))
        ours = last + laq_dequantize(codes, radius, bits).double()
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        assert abs(float(radius) - r) <= 1e-6 * r
        assert torch.allclose(ours, ref, atol=1e-5 * r)
        # the quantization error is at most tau R per entry (Sun et al., below Eq. 4)
        assert float((ours - g).abs().max()) <= d * (1 + 1e-4)


def test_constant_gradient_skips_until_max_skip_then_a_big_change_sends():
    comp = create("laq:bits=4,max_skip=3")
    grads = _grads(0)
    pattern, nbytes = [], []
    for _ in range(9):
        out, comm = _step(comp, grads)
        pattern.append(comp.last_sent)
        nbytes.append(comm.bytes_sent)
    # first round sends; the innovation of a constant gradient is below the recent model changes,
    # so it stays silent until max_skip forces a send
    assert pattern == [True, False, False, False, True, False, False, False, True]
    n = sum(math.prod(s) for s in SHAPES)
    sent_bytes = 1 + math.ceil(4 * n / 8) + 4  # flag + 4-bit codes + fp32 radius
    assert nbytes == [sent_bytes if p else 1 for p in pattern]
    assert (comp.rounds_sent, comp.rounds_skipped) == (3, 6)
    _step(comp, [10 * g for g in grads])
    assert comp.last_sent, "a tenfold gradient is a large innovation: it must be sent"


def test_max_skip_zero_never_skips():
    comp = create("laq:bits=4,max_skip=0")
    for _ in range(4):
        _step(comp, _grads(0))
        assert comp.last_sent
    assert comp.rounds_skipped == 0


def test_skip_decisions_follow_the_rule():
    """Replay the rule (Eq. 7) outside the compressor on a drifting gradient sequence."""
    threshold, memory, bits = 0.8, 4, 3
    comp = create(f"laq:bits={bits},threshold={threshold},memory={memory},max_skip=50")
    gen = torch.Generator().manual_seed(1)
    base = _flat(_grads(2))
    history, eps_hat_sq = [], 0.0
    decisions = []
    for k in range(30):
        # slow drift with occasional jumps: both outcomes occur
        base = base + 0.02 * torch.randn(base.shape, generator=gen) + (1.5 * torch.randn(base.shape, generator=gen) if k % 7 == 6 else 0)
        grads = [t.clone() for t in torch.split(base, [math.prod(s) for s in SHAPES])]
        grads = [t.reshape(s) for t, s in zip(grads, SHAPES)]
        out, comm = _step(comp, grads)
        last = comp.public_state()["last"].double()
        codes, radius = laq_quantize((base - last.float()), bits)
        dq = laq_dequantize(codes, radius, bits).double()
        eps_sq = float(((last + dq) - base.double()).pow(2).sum())
        recent = history[-memory:]
        rhs = (threshold / len(recent) * sum(recent) if recent else 0.0) + 3 * (eps_sq + eps_hat_sq)
        lhs = float(dq.pow(2).sum())
        expected = k == 0 or lhs >= rhs
        if k > 0 and abs(lhs - rhs) > 1e-3 * rhs:  # away from a tie, float32 vs float64 cannot flip it
            assert comp.last_sent == expected, f"step {k}: lhs {lhs} rhs {rhs}"
        decisions.append(comp.last_sent)
        if comp.last_sent:
            eps_hat_sq = eps_sq
        history.append(float(_flat(out).double().pow(2).sum()))
    assert any(decisions[1:]) and not all(decisions[1:])


def test_decode_is_what_the_receiver_has():
    comp = create("laq:bits=4,max_skip=5")
    grads = _grads(3)
    out0, comm0 = _step(comp, grads)
    pub0 = comp.public_state()
    assert torch.count_nonzero(pub0["last"]) == 0  # nothing sent before the first round
    shapes = [g.shape for g in grads]
    dec0 = comp.decode(messages_by_tag(comm0.messages), shapes, pub0)
    assert all(torch.equal(d, o) for d, o in zip(dec0, out0))
    assert comp.message_values(messages_by_tag(comm0.messages), shapes, pub0)["grads"].shape == _flat(grads).shape

    out1, comm1 = _step(comp, [g * 1.001 for g in grads])
    assert not comp.last_sent and [m.tag for m in comm1.messages] == ["flag"]
    msgs, pub1 = messages_by_tag(comm1.messages), comp.public_state()
    # a skipped round: the receiver has the stale gradient, exactly the one it had
    dec1 = comp.decode(msgs, shapes, pub1)
    assert all(torch.equal(d, o) for d, o in zip(dec1, dec0))
    assert all(torch.equal(d, o) for d, o in zip(dec1, out1))
    with pytest.raises(CompressorError, match="skipped"):
        comp.message_values(msgs, shapes, pub1)
    with pytest.raises(CompressorError, match="public"):
        comp.decode(messages_by_tag(comm0.messages), shapes, None)


def test_simulate_reproduces_the_sent_innovation():
    comp = create("laq:bits=6")
    _step(comp, _grads(4))
    grads = _grads(5)
    _, comm = _step(comp, grads)
    msgs, pub = messages_by_tag(comm.messages), comp.public_state()
    assert comp.last_sent
    observed = comp.message_values(msgs, [g.shape for g in grads], pub)["grads"]
    simulated = comp.simulate(grads, msgs, pub)["grads"]
    assert torch.allclose(simulated, observed, atol=1e-6)


@pytest.mark.parametrize(
    "spec", ["laq:bits=0", "laq:bits=17", "laq:threshold=-1", "laq:memory=0", "laq:max_skip=-1"]
)
def test_bad_parameters(spec):
    with pytest.raises(SpecError):
        create(spec)


# -- two workers in lockstep (threads), so the all-gather logic runs in-process --------------------

def test_two_workers_one_silent_one_sending():
    comps = [create("laq:bits=5,max_skip=10") for _ in range(2)]
    shapes = [torch.Size(s) for s in SHAPES]
    first = [_grads(10), _grads(11)]
    run_workers(comps, first)
    # worker 0 repeats its gradient (silent), worker 1 changes a lot (sends)
    second = [first[0], [g * 5 for g in first[1]]]
    results = run_workers(comps, second)
    assert comps[0].last_sent is False and comps[1].last_sent is True
    outs = [r[0] for r in results]
    assert all(torch.equal(a, b) for a, b in zip(*outs)), "both workers must hold the same aggregate"
    decoded = [comps[0].decode(msgs, shapes, pub) for _, msgs, pub, _ in results]
    for o, d0, d1 in zip(outs[0], *decoded):
        assert torch.allclose(o, (d0 + d1) / 2, atol=1e-6)
    # the silent worker still takes part in the codes all-gather (with zeros): counted
    silent = {m.tag: m.nbytes for m in results[0][3].messages}
    n = sum(s.numel() for s in shapes)
    assert silent == {"flag": 1, "codes": math.ceil(5 * n / 8), "radius": 4}
    assert torch.count_nonzero(results[0][1]["codes"]) == 0


def test_records_show_sent_and_skipped_rounds(tmp_path):
    from gia_bench.capture import capture_batch
    from gia_bench.data import DatasetSpec
    from gia_bench.models import ModelSpec, build_model

    ds = DatasetSpec("toy", (3, 32, 32), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ms = ModelSpec("lenet", ds.shape, ds.num_classes)
    model = build_model(ms, seed=0)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 7])
    comp = create("laq:bits=4")
    paths = []
    for step in range(2):  # the same batch twice: the second round has nothing new to say
        record, _ = capture_batch(model, ms, ds, x, y, comp, f"laq-{step}", step=step)
        paths.append(record.save(tmp_path / f"laq-{step}.safetensors"))
    sent, skipped = (load_record(p) for p in paths)
    assert LAQ.sent(sent.messages) and not LAQ.sent(skipped.messages)
    assert skipped.meta.bytes_sent == 1 and list(skipped.messages) == ["flag"]
    # what the receiver has after the skipped round is the gradient it decoded from the sent one
    assert all(torch.equal(a, b) for a, b in zip(decode_record(skipped), decode_record(sent)))
