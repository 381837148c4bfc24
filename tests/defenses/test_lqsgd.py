"""LQ-SGD: PowerSGD with log-quantized factors; codec, bytes, error feedback, collectives."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _mp import assert_error_feedback_conserves

from gia_bench.comm import LocalCommunicator, TorchCommunicator, messages_by_tag
from gia_bench.defenses import create
from gia_bench.defenses.codecs import (
    log_dequantize,
    log_dequantize_segments,
    log_quantize,
    log_quantize_segments,
    packed_nbytes,
    segment_ids,
)
from gia_bench.defenses.lqsgd import LQSGD
from gia_bench.defenses.powersgd import PowerSGD, make_plan
from gia_bench.errors import SpecError

SHAPES = [
    torch.Size(s)
    for s in [(16, 8, 3, 3), (16,), (32, 16, 3, 3), (16, 8, 3, 3), (10, 64), (10,), (4, 3), (64, 40), (32, 16, 3, 3)]
]
REST = (1, 5, 6)  # uncompressed at rank 2: 1-D tensors and the 4x3 matrix


def _grads(gen: torch.Generator, shapes=SHAPES) -> list[torch.Tensor]:
    # layers of very different magnitudes, as in a real network
    return [torch.randn(s, generator=gen) * 10.0 ** (i % 4 - 2) for i, s in enumerate(shapes)]


def _lenet_grads(seed: int = 0, batch: int = 4) -> list[torch.Tensor]:
    from gia_bench.models import LeNet  # torchvision: kept out of the spawned workers' imports

    gen = torch.Generator().manual_seed(seed)
    model = LeNet()
    x = torch.rand(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_segment_codec_equals_the_per_tensor_codec(gen):
    sizes = [50, 1, 7, 200]
    x = torch.cat([torch.randn(n, generator=gen) * 10.0 ** -k for k, n in enumerate(sizes)])
    x[51:58] = 0.0  # an all-zero segment
    seg = segment_ids(sizes)
    codes, scales = log_quantize_segments(x, seg, len(sizes), 6, 10.0)
    values = log_dequantize_segments(codes, scales[seg], 6, 10.0)
    for k, part in enumerate(torch.split(x, sizes)):
        ref_codes, ref_scale = log_quantize(part, 6, 10.0)
        mask = seg == k
        assert torch.equal(codes[mask], ref_codes) and torch.equal(scales[k : k + 1], ref_scale)
        assert torch.equal(values[mask], log_dequantize(ref_codes, ref_scale, 6, 10.0))


def test_bits16_is_within_1e3_of_powersgd():
    grads = _lenet_grads()
    psgd, lq = PowerSGD(rank=2), LQSGD(rank=2, bits=16)
    for step in range(3):
        g = [t * (1 + step) for t in grads]
        a = _flat(psgd.step(g, LocalCommunicator(record=False)))
        b = _flat(lq.step(g, LocalCommunicator(record=False)))
        assert ((b - a).norm() / a.norm()).item() < 1e-3
    # and 8 bits is visibly coarser (the comparison can fail)
    c = _flat(LQSGD(rank=2, bits=8).step(grads, LocalCommunicator(record=False)))
    a = _flat(PowerSGD(rank=2).step(grads, LocalCommunicator(record=False)))
    assert ((c - a).norm() / a.norm()).item() > 1e-3


def test_lenet_bytes_are_counted_and_under_27_percent_of_powersgd():
    grads = _lenet_grads()
    shapes = [g.shape for g in grads]
    c_ps, c_lq = LocalCommunicator(), LocalCommunicator()
    PowerSGD(rank=2).step(grads, c_ps)
    LQSGD(rank=2, bits=8).step(grads, c_lq)
    plan = make_plan(tuple(shapes), 2, 2.0)
    expected = {
        "P.codes": packed_nbytes(plan.p_numel, 8),
        "P.scales": 4 * len(plan.compressed),
        "Q.codes": packed_nbytes(plan.q_numel, 8),
        "Q.scales": 4 * len(plan.compressed),
        "rest.codes": packed_nbytes(plan.rest_numel, 8),
        "rest.scales": 4 * len(plan.rest),
    }
    got = {m.tag: m.nbytes for m in c_lq.messages}
    assert got == expected
    assert all(m.tensor.dtype == (torch.uint8 if m.tag.endswith("codes") else torch.float32) for m in c_lq.messages)
    assert c_lq.bytes_sent <= 0.27 * c_ps.bytes_sent
    # without the rest quantized the saving stops short
    c_nr = LocalCommunicator()
    LQSGD(rank=2, bits=8, quantize_rest=False).step(grads, c_nr)
    assert c_nr.bytes_sent > c_lq.bytes_sent
    # 6 bits packs 4 codes in 3 bytes
    c6 = LocalCommunicator()
    LQSGD(rank=2, bits=6).step(grads, c6)
    assert {m.tag: m.nbytes for m in c6.messages}["Q.codes"] == packed_nbytes(plan.q_numel, 6)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_zero_and_constant_gradients(rounding):
    comp = LQSGD(rank=2, rounding=rounding)
    for _ in range(2):
        out = comp.step([torch.zeros(s) for s in SHAPES], LocalCommunicator(record=False))
        assert all(torch.isfinite(o).all() and not o.any() for o in out)
    comp = LQSGD(rank=2, bits=8, rounding=rounding, error_feedback=False)
    grads = [torch.full(s, -0.5) for s in SHAPES]
    out = comp.step(grads, LocalCommunicator(record=False))
    for g, o in zip(grads, out):
        assert torch.isfinite(o).all()
        # a constant is rank one and its own scale: only P's and Q's rounding remains
        torch.testing.assert_close(o, g, rtol=0.02, atol=0)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_error_feedback_conserves_the_gradient_sum(gen, rounding):
    comp = LQSGD(rank=2, bits=4, rounding=rounding)
    residual = assert_error_feedback_conserves(comp, [_grads(gen) for _ in range(5)])
    assert sorted(residual) == list(range(len(SHAPES)))  # the quantized rest has a residual too
    assert all(residual[i].abs().max() > 0 for i in REST)


def test_state_dict_round_trip_resumes_bit_identically(gen):
    keys = [f"layer{i}" for i in range(len(SHAPES))]
    comp = LQSGD(rank=2, bits=6, rounding="stochastic", warm_start=False)
    for _ in range(2):
        comp.step(_grads(gen), LocalCommunicator(record=False), keys=keys)
    buf = io.BytesIO()
    torch.save(comp.state_dict(), buf)
    buf.seek(0)
    resumed = LQSGD(rank=2, bits=6, rounding="stochastic", warm_start=False)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        grads = _grads(gen)
        a = comp.step(grads, LocalCommunicator(record=False), keys=keys)
        b = resumed.step(grads, LocalCommunicator(record=False), keys=keys)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_stochastic_rounding_differs_from_nearest_and_is_seeded(gen):
    grads = _grads(gen)
    a = _flat(LQSGD(rank=2, bits=4, rounding="stochastic", seed=1).step(grads, LocalCommunicator(record=False)))
    b = _flat(LQSGD(rank=2, bits=4, rounding="stochastic", seed=1).step(grads, LocalCommunicator(record=False)))
    c = _flat(LQSGD(rank=2, bits=4, rounding="nearest", seed=1).step(grads, LocalCommunicator(record=False)))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("quantize_rest", [True, False])
def test_decode_and_simulate_agree_with_the_step(gen, quantize_rest):
    comp = LQSGD(rank=2, bits=8, quantize_rest=quantize_rest)
    grads = _grads(gen)
    comm = LocalCommunicator()
    out = comp.step(grads, comm)
    messages, public = messages_by_tag(comm.messages), comp.public_state()
    for o, d in zip(out, comp.decode(messages, SHAPES, public)):
        torch.testing.assert_close(d, o, rtol=1e-5, atol=1e-6 * o.abs().max().item())
    observed = comp.message_values(messages, SHAPES, public)
    leaf = [g.clone().requires_grad_(True) for g in grads]
    simulated = comp.simulate(leaf, messages, public)
    assert set(simulated) == set(observed) == {"P", "Q", "rest"}
    for tag in observed:
        torch.testing.assert_close(simulated[tag], observed[tag], rtol=1e-5, atol=1e-6 * observed[tag].abs().max().item())
    sum(((simulated[t] - 1) ** 2).sum() for t in simulated).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in leaf)


def test_collective_rule_and_spec():
    comp = create("lqsgd:rank=2,bits=8,alpha=10,rounding=stochastic,collective=auto")
    assert comp.bits == 8 and comp.rounding == "stochastic"
    assert create(comp.spec).spec == comp.spec
    assert [comp.collective_for(n) for n in (1, 4, 7, 8, 16)] == ["allgather"] * 3 + ["alltoall"] * 2
    assert LQSGD(bits=4).collective_for(15) == "allgather" and LQSGD(bits=4).collective_for(16) == "alltoall"
    assert LQSGD(collective="alltoall").collective_for(2) == "alltoall"
    for bad in ("lqsgd:bits=1", "lqsgd:bits=17", "lqsgd:alpha=0", "lqsgd:rounding=up", "lqsgd:collective=ring"):
        with pytest.raises(SpecError):
            create(bad)


def test_alltoall_with_one_worker_decodes_from_the_padded_layout(gen):
    comp = LQSGD(rank=2, bits=6, collective="alltoall")
    grads = _grads(gen)
    comm = LocalCommunicator()
    out = comp.step(grads, comm)
    messages = messages_by_tag(comm.messages)
    assert {"P.reduced.codes", "Q.reduced.scales"} <= set(messages)
    decoded = comp.decode(messages, SHAPES, comp.public_state())
    # the worker's own messages decode to its gradient before the chunk re-quantization
    for o, d in zip(out, decoded):
        assert (d - o).norm() <= 0.05 * o.norm()


# -- two processes over gloo -----------------------------------------------------------------------------


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for collective in ("allgather", "alltoall"):
            gen = torch.Generator().manual_seed(100 + rank)  # each worker its own data
            comp = LQSGD(rank=2, bits=4, collective=collective, rounding="stochastic")
            comm = TorchCommunicator()
            sum_in = [torch.zeros(s) for s in SHAPES]
            sum_out = [torch.zeros(s) for s in SHAPES]
            messages = []
            for _ in range(4):
                grads = _grads(gen)
                out = comp.step(grads, comm)
                for a, b, g, o in zip(sum_in, sum_out, grads, out):
                    a.add_(g)
                    b.add_(o)
                messages.append([m.info() for m in comm.reset()])
            results[collective] = {
                "sum_in": sum_in,
                "sum_out": sum_out,
                "last_out": out,
                "error": comp.state_dict()["residuals"],
                "messages": messages,
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("lqsgd2")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker, args=(2, str(out / "store"), str(out)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("collective", ["allgather", "alltoall"])
def test_two_workers_agree_bit_for_bit(two_workers, collective):
    r0, r1 = two_workers[0][collective], two_workers[1][collective]
    for a, b in zip(r0["last_out"] + r0["sum_out"], r1["last_out"] + r1["sum_out"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("collective", ["allgather", "alltoall"])
def test_two_workers_error_feedback_is_exact(two_workers, collective):
    """2 x (sum of aggregates) + both residuals == sum of both workers' gradients."""
    r0, r1 = two_workers[0][collective], two_workers[1][collective]
    for i in range(len(SHAPES)):
        total_in = r0["sum_in"][i] + r1["sum_in"][i]
        lhs = 2 * r0["sum_out"][i] + r0["error"][i] + r1["error"][i]
        torch.testing.assert_close(lhs, total_in, rtol=1e-5, atol=1e-5 * total_in.abs().max().item())


def test_two_workers_bytes_are_as_counted(two_workers):
    plan = make_plan(tuple(SHAPES), 2, 2.0)
    n_values = {"P": plan.p_numel, "Q": plan.q_numel, "rest": plan.rest_numel}
    n_scales = {"P": len(plan.compressed), "Q": len(plan.compressed), "rest": len(plan.rest)}
    for rank in range(2):
        gather = two_workers[rank]["allgather"]["messages"][-1]
        # all-gather on 2 workers: each forwards its buffer once ((N-1) x payload)
        assert {m["tag"]: m["nbytes"] for m in gather} == {
            **{f"{t}.codes": packed_nbytes(n, 4) for t, n in n_values.items()},
            **{f"{t}.scales": 4 * n_scales[t] for t in n_values},
        }
        a2a = {m["tag"]: m for m in two_workers[rank]["alltoall"]["messages"][-1]}
        for tag, n in n_values.items():
            chunk = max(8, -(-n // 16) * 8)
            # all-to-all of 2 chunks: half the padded stream leaves the worker
            assert a2a[f"{tag}.codes"]["payload_nbytes"] == 2 * chunk * 4 // 8
            assert a2a[f"{tag}.codes"]["nbytes"] == chunk * 4 // 8
            assert a2a[f"{tag}.reduced.codes"]["nbytes"] == chunk * 4 // 8
            assert a2a[f"{tag}.scales"]["nbytes"] == a2a[f"{tag}.reduced.scales"]["nbytes"] == 4 * n_scales[tag]
