"""The contract every registered compressor must keep, checked on its default spec.

Parametrized over ``DEFENSES.names()`` at collection time, so a compressor added to
``gia_bench/defenses/`` (or by an entry point) is audited by the same battery. Nothing is
skipped per compressor: one that cannot keep the contract fails here.

Conventions the battery relies on (from ``gia_bench/defenses/base.py``):

* ``step`` returns the mean over workers; with one worker, ``decode`` of the recorded
  messages equals the output;
* a compressor whose ``state_dict()`` holds ``"residuals"`` (error feedback, keyed like the
  ``keys`` of ``step``; a tensor without one is sent exactly) keeps
  ``sum(outputs) + residual == sum(inputs)`` with one worker;
* a compressor with the class attribute ``adds_noise = True`` turns zero into noise, so
  only its finiteness is checked on an all-zero gradient.
"""

from __future__ import annotations

import copy
import io
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
from _mp import BATTERY_SHAPES, assert_error_feedback_conserves, battery_grads, edge_grads, gloo_worker

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import DEFENSES, create
from gia_bench.registry import describe_params, summary

NAMES = DEFENSES.names()


def _numels(shapes) -> list[int]:
    return [math.prod(s) for s in shapes]


# Bytes one worker sends, from what each compressor puts on the wire (default specs),
# written out here independently of the compressors' own code.
EXPECTED_BYTES = {
    "none": lambda shapes: 4 * sum(_numels(shapes)),
    "fp16": lambda shapes: 2 * sum(_numels(shapes)),
    "noise": lambda shapes: 4 * sum(_numels(shapes)),
    # ratio 0.01: k = max(1, ceil(n / 100)) fp32 values + as many int32 indices
    "topk": lambda shapes: sum(8 * max(1, -(-n // 100)) for n in _numels(shapes)),
    # one fp32 norm per 512-entry bucket of each tensor, 1 sign bit and 5 level bits (s = 16) per entry
    "qsgd": lambda shapes: 4 * sum(-(-n // 512) for n in _numels(shapes))
    + -(-sum(_numels(shapes)) // 8)
    + -(-5 * sum(_numels(shapes)) // 8),
    # 1 sign bit per entry, one fp32 scale per tensor
    "signsgd": lambda shapes: -(-sum(_numels(shapes)) // 8) + 4 * len(shapes),
}

# Compressors whose aggregate is the mean of what each worker's messages decode to.
MEAN_OF_DECODED = {"none", "noise", "topk", "qsgd", "signsgd"}
# fp16 divides by the world size before sending (as PyTorch's fp16_compress_hook, to keep the
# fp16 sum in range), so a worker's message decodes to g / N and the aggregate is their sum.
SUM_OF_DECODED = {"fp16"}

# Compressors with error feedback that this battery checks even if their state is named differently.
ERROR_FEEDBACK = {"topk", "signsgd"}


def _shapes(grads):
    return [g.shape for g in grads]


def _step(comp, grads, keys=None):
    comm = LocalCommunicator(record=True)
    out = comp.step([g.clone() for g in grads], comm, keys=keys)
    return out, comm


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    a, b = a.to(torch.float64), b.to(torch.float64)
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    return bool(((a - b).abs() <= rtol * scale + 1e-12).all())


def _all_close(decoded, out, rtol: float = 1e-5) -> bool:
    """Every tensor within ``rtol`` of the largest entry of the whole gradient.

    Compressors that quantize the concatenated buffer (one scale for all tensors) and
    GPUs (fused multiply-adds) move a decoded entry by an ulp of that global scale.
    """
    if len(decoded) != len(out):
        return False
    if not out:
        return True
    flat_d = torch.cat([d.detach().cpu().reshape(-1) for d in decoded])
    flat_o = torch.cat([o.detach().cpu().reshape(-1) for o in out])
    return _close(flat_d, flat_o, rtol)


@pytest.mark.parametrize("name", NAMES)
def test_spec_round_trips_and_is_documented(name):
    comp = create(name)
    again = create(comp.spec)
    assert type(again) is type(comp) and again.spec == comp.spec
    cls = DEFENSES.get(name)
    assert summary(cls), f"{name}: class docstring needs a one-line summary"
    for p in describe_params(cls):
        assert p.help, f"{name}: parameter {p.name!r} is not described in the docstring's Args: section"


@pytest.mark.parametrize("name", NAMES)
def test_bytes_are_the_recorded_message_tensors(name):
    grads = battery_grads(0)
    _, comm = _step(create(name), grads)
    assert comm.messages, f"{name} sent nothing"
    tags = [m.tag for m in comm.messages]
    assert len(tags) == len(set(tags)), f"{name}: message tags repeat: {tags}"
    total = 0
    for m in comm.messages:
        t = m.tensor
        assert t is not None and t.device.type == "cpu"
        assert m.dtype == t.dtype and m.shape == tuple(t.shape)
        assert m.payload_nbytes == m.nbytes == t.numel() * t.element_size()
        total += t.numel() * t.element_size()
    assert comm.bytes_sent == total
    if name in EXPECTED_BYTES:
        assert comm.bytes_sent == EXPECTED_BYTES[name](BATTERY_SHAPES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_matches_input_shapes_and_is_finite(name, dtype):
    grads = battery_grads(1, dtype=dtype)
    out, _ = _step(create(name), grads)
    assert len(out) == len(grads)
    for o, g in zip(out, grads):
        assert o.shape == g.shape and o.dtype == g.dtype and o.device == g.device
        assert torch.isfinite(o).all()


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_give_zero(name):
    comp = create(name)
    grads = [torch.zeros(s) for s in BATTERY_SHAPES]
    for _ in range(2):  # the second step also runs on the (zero) state the first left
        out, comm = _step(comp, grads)
        for o in out:
            assert torch.isfinite(o).all()
            if not getattr(type(comp), "adds_noise", False):
                assert torch.count_nonzero(o) == 0, f"{name}: all-zero gradient gave a non-zero output"
        decoded = comp.decode(messages_by_tag(comm.messages), _shapes(grads), comp.public_state())
        assert all(torch.isfinite(d).all() for d in decoded)


@pytest.mark.parametrize("name", NAMES)
def test_awkward_tensors(name):
    """0-d, one-entry and non-contiguous gradients: right shapes, finite, decodable."""
    comp = create(name)
    for seed in range(2):
        grads = edge_grads(seed)
        out, comm = _step(comp, grads)
        assert [o.shape for o in out] == _shapes(grads)
        assert all(torch.isfinite(o).all() for o in out)
        decoded = comp.decode(messages_by_tag(comm.messages), _shapes(grads), comp.public_state())
        assert _all_close(decoded, out), f"{name}: decode differs from the output on awkward tensors"


@pytest.mark.parametrize("name", NAMES)
def test_empty_gradient_list(name):
    comm = LocalCommunicator()
    assert create(name).step([], comm) == []
    assert comm.bytes_sent == 0


@pytest.mark.parametrize("name", NAMES)
def test_decode_is_what_the_worker_aggregated(name):
    comp = create(name)
    for seed in range(3):  # later steps carry error feedback / warm starts
        grads = battery_grads(seed)
        out, comm = _step(comp, grads)
        decoded = comp.decode(messages_by_tag(comm.messages), _shapes(grads), comp.public_state())
        assert len(decoded) == len(out)
        assert all(d.shape == o.shape and d.dtype == torch.float32 for d, o in zip(decoded, out))
        assert _all_close(decoded, out), f"{name} step {seed}: decode(messages) != step output"


@pytest.mark.parametrize("name", NAMES)
def test_simulate_matches_message_values_layout(name):
    comp = create(name)
    if not comp.supports_simulate:
        pytest.fail(f"{name} cannot be attacked compressor-aware: implement simulate/message_values")
    grads = battery_grads(2)
    _, comm = _step(comp, grads)
    messages = messages_by_tag(comm.messages)
    observed = comp.message_values(messages, _shapes(grads), comp.public_state())
    candidate = [(g + 0.01).requires_grad_(True) for g in grads]
    simulated = comp.simulate(candidate, messages, comp.public_state())
    assert set(simulated) == set(observed) and simulated
    loss = sum(((simulated[k] - observed[k].to(simulated[k].dtype)) ** 2).sum() for k in simulated)
    assert all(simulated[k].shape == observed[k].shape for k in simulated)
    assert torch.isfinite(loss)
    if comp.differentiable_simulate:
        back = torch.autograd.grad(loss, candidate, allow_unused=True)
        assert any(b is not None and b.abs().sum() > 0 for b in back), f"{name}: simulate carries no gradient"
        assert all(b is None or torch.isfinite(b).all() for b in back)


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resumes_bit_identically(name):
    comp = create(name)
    keys = [f"layer{i}" for i in range(len(BATTERY_SHAPES))]  # names, as the DDP hook passes them
    for seed in range(2):
        _step(comp, battery_grads(seed), keys)
    state = _save_load(copy.deepcopy(comp.state_dict()))
    later = [battery_grads(seed) for seed in range(2, 5)]
    ref = [_step(comp, g, keys) for g in later]
    resumed = create(name)
    resumed.load_state_dict(state)
    for grads, (ref_out, ref_comm) in zip(later, ref):
        out, comm = _step(resumed, grads, keys)
        assert all(torch.equal(a, b) for a, b in zip(out, ref_out)), f"{name}: resumed outputs differ"
        assert [m.tag for m in comm.messages] == [m.tag for m in ref_comm.messages]
        assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(comm.messages, ref_comm.messages))


def _has_residuals(name: str) -> bool:
    comp = create(name)
    try:
        _step(comp, battery_grads(0))
    except Exception:  # a broken step fails the other tests; collection must go on
        return False
    return isinstance(comp.state_dict().get("residuals"), dict)


@pytest.mark.parametrize("name", [n for n in NAMES if n in ERROR_FEEDBACK or _has_residuals(n)])
def test_error_feedback_loses_nothing(name):
    """sum_t output_t + e_T == sum_t g_t (one worker): error feedback delays, never drops."""
    assert_error_feedback_conserves(create(name), [battery_grads(seed) for seed in range(6)])


# -- two real processes over gloo ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    """One spawn of 2 gloo workers runs every compressor; returns ``[rank0, rank1]`` results."""
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(gloo_worker, args=(2, _free_port(), NAMES, str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _ring_bytes(op: str, payload: int, n: int) -> int:
    """Bytes per worker of the bandwidth-optimal ring collectives (comm.py's accounting)."""
    return {
        "all_reduce": math.ceil(2 * (n - 1) * payload / n),
        "all_gather": (n - 1) * payload,
        "all_to_all": math.ceil((n - 1) * payload / n),
    }[op]


@pytest.mark.parametrize("name", NAMES)
def test_two_gloo_workers_agree(name, gloo_results):
    runs = [r[name] for r in gloo_results]
    for rank, run in enumerate(runs):
        assert "error" not in run, f"{name} failed on rank {rank}:\n{run.get('error')}"
    for step, (s0, s1) in enumerate(zip(runs[0]["steps"], runs[1]["steps"])):
        # replicas stay in sync only if every rank computes exactly the same aggregate
        for a, b in zip(s0["out"], s1["out"]):
            assert torch.equal(a, b), f"{name} step {step}: ranks disagree"
        for s in (s0, s1):
            assert s["messages"]
            for m in s["messages"]:
                t = m["tensor"]
                assert m["payload_nbytes"] == t.numel() * t.element_size()
                assert m["nbytes"] == _ring_bytes(m["op"], m["payload_nbytes"], 2)
        if name == "none":
            for o, g0, g1 in zip(s0["out"], s0["inputs"], s1["inputs"]):
                assert torch.allclose(o, (g0 + g1) / 2, rtol=1e-6, atol=1e-7)
        if name in MEAN_OF_DECODED | SUM_OF_DECODED:
            comp = create(name)
            decoded = [
                comp.decode({m["tag"]: m["tensor"] for m in s["messages"]}, [g.shape for g in s["inputs"]], s["public"])
                for s in (s0, s1)
            ]
            workers = 1 if name in SUM_OF_DECODED else 2
            # an fp16 all-reduce rounds its sum to fp16 (11 significant bits)
            rtol = 1e-3 if any(m["tensor"].dtype == torch.float16 for m in s0["messages"]) else 1e-5
            mean = [(d0 + d1) / workers for d0, d1 in zip(*decoded)]
            assert _all_close(mean, s0["out"], rtol), f"{name} step {step}: aggregate is not the decoded messages' mean"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_gradients_stay_on_device(name):
    comp = create(name)
    for seed in range(2):
        grads = battery_grads(seed, device="cuda")
        out, comm = _step(comp, grads)
        assert all(o.device == g.device and o.dtype == g.dtype for o, g in zip(out, grads))
        assert all(m.tensor.device.type == "cpu" for m in comm.messages)
        if name in EXPECTED_BYTES:
            assert comm.bytes_sent == EXPECTED_BYTES[name](BATTERY_SHAPES)
        decoded = comp.decode(messages_by_tag(comm.messages), _shapes(grads), comp.public_state())
        assert _all_close(decoded, out), f"{name}: decode differs from the CUDA output"
