"""PowerSGD against PyTorch's own ``powerSGD_hook``, and the compressor's invariants."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ref

from _mp import assert_error_feedback_conserves

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create
from gia_bench.defenses.lowrank import LowRankSettings, LQSGDSettings
from gia_bench.defenses.powersgd import PowerSGD, make_plan, orthogonalize
from gia_bench.errors import SpecError

# Interleaved shapes: two conv shapes that repeat (batched groups), 1-D tensors, a matrix too
# small to compress, a linear layer whose rank is capped by min(n, m).
SHAPES = [
    torch.Size(s)
    for s in [(16, 8, 3, 3), (16,), (32, 16, 3, 3), (16, 8, 3, 3), (10, 64), (10,), (4, 3), (64, 40), (32, 16, 3, 3)]
]


def _grads(gen: torch.Generator, shapes=SHAPES, scale: float = 1.0) -> list[torch.Tensor]:
    return [scale * torch.randn(s, generator=gen) for s in shapes]


class _Bucket:
    """The part of ``dist.GradBucket`` that ``powerSGD_hook`` uses (GradBucket has no Python constructor):
    one flat buffer and per-parameter views into it, one bucket per step."""

    def __init__(self, grads: list[torch.Tensor]) -> None:
        self._buffer = torch.cat([g.reshape(-1) for g in grads])
        self._views, offset = [], 0
        for g in grads:
            self._views.append(self._buffer[offset : offset + g.numel()].view(g.shape))
            offset += g.numel()

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return self._views

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


@pytest.fixture(scope="module")
def gloo_world_1(tmp_path_factory):
    """A single-process gloo group, as powerSGD_hook needs one for its all-reduces."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "rank, warm_start, error_feedback, start_iter",
    [(2, True, True, 0), (1, False, True, 0), (4, True, False, 0), (3, False, False, 0), (2, True, True, 2)],
)
def test_equals_pytorch_powersgd_hook(gloo_world_1, rank, warm_start, error_feedback, start_iter):
    state = ref.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=rank,
        start_powerSGD_iter=max(start_iter, 2),  # PyTorch refuses < 2 with EF / warm start (a DDP matter)
        min_compression_rate=2,
        use_error_feedback=error_feedback,
        warm_start=warm_start,
        orthogonalization_epsilon=0,
        random_seed=0,
    )
    state.start_powerSGD_iter = start_iter  # the hook itself has no such limit
    ours = PowerSGD(rank=rank, warm_start=warm_start, error_feedback=error_feedback, start_iter=start_iter, seed=0)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = _grads(gen)
        expected = ref.powerSGD_hook(state, _Bucket([g.clone() for g in grads])).wait()
        comm = LocalCommunicator()
        got = torch.cat([t.reshape(-1) for t in ours.step(grads, comm)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        if step >= start_iter and warm_start:  # PyTorch clears q_memory without warm start
            # the aggregated Q is laid out as PyTorch's q_memory (grouped by shape, first appearance)
            sent = messages_by_tag(comm.messages)
            q_ref = state.q_memory_dict[0]
            torch.testing.assert_close(sent["Q"], q_ref, rtol=1e-5, atol=1e-5 * q_ref.abs().max().item())
        if step < start_iter:
            assert [m.tag for m in comm.messages] == ["grads"]


def test_plan_follows_pytorch_compression_rule():
    plan = make_plan(tuple(SHAPES), 2, 2.0)
    # (4, 3): (4+3)*2*2 = 28 >= 12 -> not compressed; 1-D never
    assert plan.rest == (1, 5, 6)
    assert [g.indices for g in plan.groups] == [(0, 3), (2, 8), (4,), (7,)]
    assert plan.p_numel == 2 * 16 * 2 + 2 * 32 * 2 + 10 * 2 + 64 * 2
    assert plan.q_numel == 2 * 72 * 2 + 2 * 144 * 2 + 64 * 2 + 40 * 2


def test_resnet18_bytes_match_pytorch_figure():
    """torchvision resnet18(num_classes=10) at rank 2: 330,000 bytes = 291,560 (P+Q) + 38,440 (rest)."""
    import torchvision

    with torch.device("meta"):
        shapes = [p.shape for p in torchvision.models.resnet18(num_classes=10).parameters()]
    grads = [torch.zeros(s) for s in shapes]
    comm = LocalCommunicator(record=False)
    PowerSGD(rank=2).step(grads, comm)
    by_tag = {m.tag: m.nbytes for m in comm.messages}
    assert by_tag["P"] + by_tag["Q"] == 291_560
    assert by_tag["rest"] == 38_440
    assert comm.bytes_sent == 330_000


def test_error_feedback_conserves_the_gradient_sum(gen):
    residual = assert_error_feedback_conserves(PowerSGD(rank=1), [_grads(gen) for _ in range(6)])
    # the rest is sent exactly: no residual kept for it
    assert set(residual) == {i for i in range(len(SHAPES)) if i not in (1, 5, 6)}
    # and the compression really lost something each step (the test could fail)
    assert residual[0].abs().max() > 1e-3


def test_state_dict_round_trip_resumes_bit_identically(gen):
    comp = PowerSGD(rank=2, warm_start=False)  # Q re-drawn each step: the numpy RNG state must resume too
    for _ in range(3):
        comp.step(_grads(gen), LocalCommunicator(record=False), keys=[f"p{i}" for i in range(len(SHAPES))])
    buf = io.BytesIO()
    torch.save(comp.state_dict(), buf)
    buf.seek(0)
    resumed = PowerSGD(rank=2, warm_start=False)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        grads = _grads(gen)
        keys = [f"p{i}" for i in range(len(SHAPES))]
        a = comp.step(grads, LocalCommunicator(record=False), keys=keys)
        b = resumed.step(grads, LocalCommunicator(record=False), keys=keys)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("rank", [2, 4])
def test_zero_gradients_give_zeros_without_nan(rank):
    comp = PowerSGD(rank=rank)
    for _ in range(2):
        out = comp.step([torch.zeros(s) for s in SHAPES], LocalCommunicator(record=False))
        for o in out:
            assert torch.isfinite(o).all() and not o.any()


def test_constant_gradient_is_rank_one_and_recovered_exactly():
    comp = PowerSGD(rank=2, warm_start=False, error_feedback=False)
    grads = [torch.full(s, 0.25) for s in SHAPES]
    out = comp.step(grads, LocalCommunicator(record=False))
    for g, o in zip(grads, out):
        torch.testing.assert_close(o, g, rtol=1e-5, atol=1e-6)


def test_decode_and_simulate_agree_with_the_step(gen):
    comp = PowerSGD(rank=2)
    grads = _grads(gen)
    comm = LocalCommunicator()
    out = comp.step(grads, comm)
    messages, public = messages_by_tag(comm.messages), comp.public_state()
    decoded = comp.decode(messages, SHAPES, public)
    for o, d in zip(out, decoded):
        torch.testing.assert_close(d, o, rtol=1e-5, atol=1e-6)
    # the aware attacker's simulate reproduces the observed messages from the true gradient ...
    observed = comp.message_values(messages, SHAPES, public)
    leaf = [g.clone().requires_grad_(True) for g in grads]
    simulated = comp.simulate(leaf, messages, public)
    assert set(simulated) == set(observed) == {"P", "Q", "rest"}
    for tag in observed:
        torch.testing.assert_close(simulated[tag], observed[tag], rtol=1e-5, atol=1e-5)
    # ... and is differentiable in it
    loss = sum(((simulated[t] - observed[t] - 1) ** 2).sum() for t in observed)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in leaf)
    assert leaf[0].grad.abs().sum() > 0


def test_simulate_is_linear_in_the_candidate_with_the_observed_basis(gen):
    """Q is M^T orth(observed P), not M^T orth(P of the candidate): linear in the candidate, no
    Gram-Schmidt inside the attack's objective, and exact at the true gradient (above)."""
    comp = PowerSGD(rank=2)
    grads = _grads(gen)
    comm = LocalCommunicator()
    comp.step(grads, comm)
    messages, public = messages_by_tag(comm.messages), comp.public_state()
    a, b = _grads(gen), _grads(gen)
    mixed = [2.0 * x - 0.5 * y for x, y in zip(a, b)]
    sa, sb, sm = (comp.simulate(g, messages, public) for g in (a, b, mixed))
    for tag in ("P", "Q", "rest"):
        torch.testing.assert_close(sm[tag], 2.0 * sa[tag] - 0.5 * sb[tag], rtol=1e-4, atol=1e-5)


def test_start_iter_sends_plain_gradients_first(gen):
    comp = PowerSGD(rank=2, start_iter=2)
    tags = []
    for _ in range(3):
        grads = _grads(gen)
        comm = LocalCommunicator()
        out = comp.step(grads, comm)
        tags.append([m.tag for m in comm.messages])
        if tags[-1] == ["grads"]:
            assert all(torch.equal(o, g) for o, g in zip(out, grads))
            assert comp.decode(messages_by_tag(comm.messages), SHAPES)[0].equal(grads[0])
    assert tags == [["grads"], ["grads"], ["rest", "P", "Q"]]


def test_orthogonalize_matches_qr_up_to_column_signs(gen):
    a = torch.randn(3, 20, 2, generator=gen, dtype=torch.float64)
    q = orthogonalize(a)
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    ref_q = torch.linalg.qr(a).Q
    torch.testing.assert_close(q.abs(), ref_q.abs())


def test_spec_round_trip_and_bad_values():
    comp = create("powersgd:rank=4,warm_start=false,min_compression_rate=1.5")
    assert comp.rank == 4 and comp.warm_start is False and comp.min_compression_rate == 1.5
    assert create(comp.spec).spec == comp.spec
    for bad in ("powersgd:rank=0", "powersgd:start_iter=-1", "powersgd:min_compression_rate=0"):
        with pytest.raises(SpecError):
            create(bad)


def test_one_settings_object_serves_powersgd_and_lqsgd():
    """Both compressors validate through LowRankSettings (LQ-SGD's settings extend it), the
    spec's attributes read from it, and the canonical specs (result identity) are unchanged."""
    p, q = create("powersgd:rank=1"), create("lqsgd:rank=1,bits=8")
    assert type(p.settings) is LowRankSettings and type(q.settings) is LQSGDSettings
    assert isinstance(q.settings, LowRankSettings)
    assert p.settings == LowRankSettings(rank=1) and q.settings == LQSGDSettings(rank=1, bits=8)
    assert p.spec == "powersgd:rank=1,warm_start=true,error_feedback=true,min_compression_rate=2.0,start_iter=0,epsilon=0.0,seed=0"
    assert q.spec == (
        "lqsgd:rank=1,bits=8,alpha=10.0,rounding=nearest,quantize_rest=true,collective=auto,warm_start=true,"
        "error_feedback=true,min_compression_rate=2.0,start_iter=0,epsilon=0.0,seed=0"
    )
    # a PowerSGD parameter is checked by the one dataclass for both, and the message names the compressor
    for name in ("powersgd", "lqsgd"):
        with pytest.raises(SpecError, match=f"^{name} start_iter must be >= 0"):
            create(f"{name}:start_iter=-1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.settings.rank = 3  # type: ignore[misc]


def _reachable_tensors(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor object reachable from ``obj`` through attributes, dataclass fields and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.Generator)):
        children = list(vars(obj).values())
    else:
        return []
    return [t for c in children for t in _reachable_tensors(c, seen)]


@pytest.mark.parametrize("spec", ["powersgd:rank=2,warm_start=false", "lqsgd:rank=2,bits=4,warm_start=false"])
def test_residual_is_stored_once_per_shape_group(gen, spec):
    """Issue 15.6: one residual tensor per shape group (and one for a quantized rest), no per-parameter
    copies or views beside it, also after a key reorder and after a checkpoint round trip; per-parameter
    tensors appear only in ``state_dict`` (the checkpoint format), and a restored compressor sends the
    same next message."""
    keys = [f"p{i}" for i in range(len(SHAPES))]
    comp = create(spec)
    plan = comp.plan(SHAPES)
    quantized_rest = spec.startswith("lqsgd")

    def check(c):
        # warm_start=false: besides the residuals it holds only the public state (and LQ-SGD integer segment ids)
        public = c.public_state().values()
        held = [t for t in _reachable_tensors(c) if t.is_floating_point() and not any(t is v for v in public)]
        storages = [t.untyped_storage().data_ptr() for t in held]
        assert len(storages) == len(set(storages)), "two tensor objects hold the same residual"
        want = sorted([(g.count, g.n, g.m) for g in plan.groups] + ([(plan.rest_numel,)] if quantized_rest else []))
        assert sorted(tuple(t.shape) for t in held) == want

    for step in range(4):
        order = list(range(len(SHAPES)))[:: (-1 if step == 2 else 1)]  # step 2: another key order
        grads = _grads(gen)
        comp.step([grads[i] for i in order], LocalCommunicator(record=False), keys=[keys[i] for i in order])
        check(comp)
    state = comp.state_dict()
    compressed = {keys[i] for g in plan.groups for i in g.indices}
    assert set(state["residuals"]) == compressed | ({keys[i] for i in plan.rest} if quantized_rest else set())
    assert all(state["residuals"][keys[i]].shape == SHAPES[i] for i in range(len(SHAPES)) if keys[i] in state["residuals"])
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = create(spec)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(resumed.private_state(keys, SHAPES)["residual"], comp.private_state(keys, SHAPES)["residual"])
    grads = _grads(gen)
    sent = []
    for c in (comp, resumed):
        comm = LocalCommunicator()
        c.step(grads, comm, keys=keys)
        sent.append(messages_by_tag(comm.messages))
        check(c)
    assert sent[0].keys() == sent[1].keys() and all(torch.equal(sent[0][t], sent[1][t]) for t in sent[0])
