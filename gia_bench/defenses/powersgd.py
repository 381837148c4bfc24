"""PowerSGD: rank-r gradient compression by one step of power iteration.

Vogels, Karimireddy & Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization", NeurIPS 2019 (arXiv 1905.13727), Algorithms 1 and 2. The
code follows PyTorch's ``powerSGD_hook`` (``torch.distributed.algorithms.ddp_comm_hooks``)
step by step and reproduces it to float rounding: same compression rule, same order of
the random Q draws, same orthogonalization. It differs where PyTorch's hook has no
answer for us: per-parameter state (keys instead of DDP bucket indices), degenerate
columns of a rank-deficient P orthogonalize to zero instead of noise or NaN (see
:func:`orthogonalize`), and error feedback uses this worker's own decompression (see
:class:`PowerSGD`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gia_bench.comm import Communicator
from gia_bench.defenses.base import (
    Compressor,
    check_messages,
    flatten,
    register,
    residual_vector,
    resolve_keys,
    unflatten,
    with_residual,
)
from gia_bench.defenses.lowrank import (
    GroupResidual,
    LowRankSettings,
    Plan,
    ShapeGroup,
    make_plan,
    orthogonalize,
    orthogonalize_blocks,
    setting_property,
    should_compress,
)
from gia_bench.errors import CompressorError

# the plan and factor helpers moved to lowrank.py; importing them from here keeps working
__all__ = [
    "GroupResidual", "LowRankSettings", "Plan", "PowerSGD", "ShapeGroup", "make_plan", "orthogonalize",
    "orthogonalize_blocks", "should_compress",
]

# PyTorch's hook draws each Q seed as ``rng.randint(1_000_000_000)`` from ``np.random.RandomState(seed)``.
_SEED_BOUND = 1_000_000_000


# -- the compressor ---------------------------------------------------------------------------------------


@register("powersgd")
class PowerSGD(Compressor):
    """PowerSGD (Vogels et al. 2019): each matrix gradient sent as rank-r factors P and Q.

    One step, for the gradients of one worker (PyTorch ``powerSGD_hook``'s steps):

    1. Views every gradient as a matrix ``M`` of ``shape[0] x rest`` and splits them in two
       groups: the ones worth compressing, ``(n + m) r min_compression_rate < n m``, and the
       rest (all 1-D tensors, small matrices). With error feedback, ``M += e`` (last residual).
    2. The rest: concatenated into one buffer, all-reduced (message ``"rest"``, fp32), / N.
    3. For each compressed ``M``: ``Q`` (``m x r``) is last step's aggregated Q (warm start)
       or drawn from N(0, 1) with the shared seed; then orthogonalized.
    4. ``P = M Q`` for every compressed tensor (batched by shape).
    5. All ``P`` concatenated and all-reduced (message ``"P"``): the sum over workers.
    6. ``P_hat = orthogonalize(P)``: identical on every worker.
    7. ``Q = M^T P_hat``.
    8. All ``Q`` concatenated and all-reduced (message ``"Q"``), / N.
    9. ``M_hat = P_hat Q^T`` is the aggregate. With error feedback the residual is
       ``e = M - P_hat Q_i^T`` with this worker's Q before the all-reduce (Algorithm 2 of
       the paper: the error of its own compression). At one worker this equals PyTorch's
       ``input - output``; with N workers PyTorch subtracts the aggregate instead, which
       has the same mean over workers but lets each worker's deviation from the mean
       accumulate in its residual. The rest is sent exactly and keeps no residual.

    For the first ``start_iter`` steps everything is all-reduced in fp32 (message
    ``"grads"``), as PyTorch's ``start_powerSGD_iter``; the default compresses from step 0.

    The receiver of one worker's messages at world size 1 has ``P`` (before
    orthogonalization, as sent) and ``Q``, so ``P_hat = orth(P)`` needs no public state;
    with N workers pass the aggregated P as ``public["P_sum"]``. :meth:`public_state` gives
    ``"Q_init"``: the orthogonalized Q every compressed tensor started the step from (known
    to the receiver from the shared seed or the previous round), in the Q message's layout.

    Args:
        rank: matrix_approximation_rank r of the factors (capped at min(n, m) per tensor).
        warm_start: reuse last step's Q (True) or draw a fresh one every step.
        error_feedback: add last step's compression residual to the gradient.
        min_compression_rate: compress a matrix only if it shrinks by more than this factor.
        start_iter: steps of plain fp32 all-reduce before compression starts.
        epsilon: added to column norms in Gram-Schmidt (PyTorch's orthogonalization_epsilon).
        seed: seeds the Q draws (numpy RandomState, as PyTorch's random_seed); same on all workers.
    """

    supports_simulate = True

    def __init__(
        self,
        rank: int = 2,
        warm_start: bool = True,
        error_feedback: bool = True,
        min_compression_rate: float = 2.0,
        start_iter: int = 0,
        epsilon: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.settings = LowRankSettings(
            rank, warm_start, error_feedback, min_compression_rate, start_iter, epsilon, seed, name=self._name()
        )
        self._init_state()

    def _init_state(self) -> None:
        """The per-run state (Q draws, warm-start Qs, residuals), empty."""
        self._rng = np.random.RandomState(self.seed)
        self._steps: dict[Hashable, int] = {}  # steps seen per key (for start_iter)
        self._q: dict[Hashable, torch.Tensor] = {}  # warm start: last aggregated Q per key (m x r)
        # error feedback: one residual per shape group (and one for the rest), keyed by the group's
        # parameter keys, so that step 1 adds it in one op; every key lives in exactly one entry
        self._residuals: dict[tuple[Hashable, ...], GroupResidual] = {}
        self._public: dict[str, torch.Tensor] = {}

    # the spec's parameters, read from the one validated settings object (canonical_spec reads these)
    rank = setting_property("rank")
    warm_start = setting_property("warm_start")
    error_feedback = setting_property("error_feedback")
    min_compression_rate = setting_property("min_compression_rate")
    start_iter = setting_property("start_iter")
    epsilon = setting_property("epsilon")
    seed = setting_property("seed")

    @classmethod
    def _name(cls) -> str:
        return getattr(cls, "registry_name", cls.__name__)

    def plan(self, shapes: Sequence[torch.Size]) -> Plan:
        return make_plan(tuple(torch.Size(s) for s in shapes), self.rank, self.min_compression_rate)

    # -- the exchanges (LQ-SGD overrides these three) ---------------------------------------------
    def _send_rest(
        self, rest: torch.Tensor, comm: Communicator, plan: Plan, keys: Sequence[Hashable]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean over workers of the uncompressed tensors, and what the receiver gets of ours (None: exact).

        May overwrite ``rest`` (then returns None: nothing to feed back).
        """
        comm.all_reduce(rest, "rest")
        return rest.div_(comm.world_size), None

    def _send_P(self, P: torch.Tensor, comm: Communicator, plan: Plan, keys: Sequence[Hashable]) -> torch.Tensor:
        """Sum over workers of the P factors (PyTorch skips the / N: P is orthogonalized next)."""
        return comm.all_reduce(P, "P")

    def _send_Q(
        self, Q: torch.Tensor, comm: Communicator, plan: Plan, keys: Sequence[Hashable]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over workers of the Q factors, and this worker's Q as the receiver has it."""
        if comm.world_size == 1:
            comm.all_reduce(Q, "Q")
            return Q, Q
        own = Q.clone()
        comm.all_reduce(Q, "Q")
        return Q.div_(comm.world_size), own

    # -- the worker's side --------------------------------------------------------------------------------
    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        keys = resolve_keys(grads, keys)
        if not grads:
            return []
        if self.start_iter and self._steps.get(keys[0], 0) < self.start_iter:
            return self._plain_step(grads, comm, keys)
        plan = self.plan([g.shape for g in grads])
        device, dtype = grads[0].device, grads[0].dtype
        out: list[torch.Tensor | None] = [None] * len(grads)

        # 1. M per shape group (a stacked copy: the caller's gradients are never modified), + residual
        Ms = [self._group_matrices(grads, keys, g) for g in plan.groups]

        # 2. the uncompressed rest: one flat buffer
        if plan.rest:
            rest_in = flatten([grads[i] for i in plan.rest]).to(dtype)
            if self.error_feedback:
                self._add_rest_error(rest_in, plan, keys)
            rest_out, rest_sent = self._send_rest(rest_in, comm, plan, keys)
            if self.error_feedback:
                rest_keys = tuple(keys[i] for i in plan.rest)
                if rest_sent is not None:
                    self._store_residual(rest_keys, tuple(plan.shapes[i] for i in plan.rest), rest_in - rest_sent)
                else:  # sent exactly: whatever residual was added has gone out
                    self._drop_residuals(rest_keys)
            for i, t in zip(plan.rest, unflatten(rest_out, [plan.shapes[i] for i in plan.rest])):
                out[i] = t
        if not plan.groups:
            self._public = {}
            self._count(keys)
            return out  # type: ignore[return-value]

        # 3. Q: warm start or a fresh draw, orthogonalized
        Qs = orthogonalize_blocks(self._start_qs(plan, keys, device, dtype), self.epsilon)
        self._public = {"Q_init": torch.cat([q.reshape(-1) for q in Qs])}

        # 4. P = M Q
        P = torch.empty(plan.p_numel, device=device, dtype=dtype)
        for g, M, Q in zip(plan.groups, Ms, Qs):
            torch.bmm(M, Q, out=P[g.p_offset : g.p_offset + g.p_numel].view(g.count, g.n, g.r))

        # 5. P summed over workers; every receiver knows the sum, and a multi-worker decode needs it
        P = self._send_P(P, comm, plan, keys)
        if comm.world_size > 1:
            self._public["P_sum"] = P.detach().clone()

        # 6. P_hat = orthogonalize(P), identical on every worker
        P_hats = orthogonalize_blocks([self._p_view(P, g) for g in plan.groups], self.epsilon)

        # 7. Q = M^T P_hat
        Q = torch.empty(plan.q_numel, device=device, dtype=dtype)
        for g, M, P_hat in zip(plan.groups, Ms, P_hats):
            torch.bmm(M.transpose(1, 2), P_hat, out=Q[g.q_offset : g.q_offset + g.q_numel].view(g.count, g.m, g.r))

        # 8. Q averaged over workers (own: this worker's Q as the receiver reconstructs it)
        Q, Q_own = self._send_Q(Q, comm, plan, keys)

        # 9. M_hat = P_hat Q^T; residual e = M - P_hat Q_own^T
        for g, M, P_hat in zip(plan.groups, Ms, P_hats):
            Q_g = self._q_view(Q, g)
            M_hat = torch.bmm(P_hat, Q_g.transpose(1, 2))
            if self.error_feedback:
                if Q_own is Q:
                    M.sub_(M_hat)
                else:
                    M.baddbmm_(P_hat, self._q_view(Q_own, g).transpose(1, 2), alpha=-1)
            for k, i in enumerate(g.indices):
                out[i] = M_hat[k].view(plan.shapes[i])
                if self.warm_start:
                    self._q[keys[i]] = Q_g[k]
            if self.error_feedback:
                self._store_residual(tuple(keys[i] for i in g.indices), tuple(plan.shapes[i] for i in g.indices), M)
        self._count(keys)
        return out  # type: ignore[return-value]

    def _plain_step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable]
    ) -> list[torch.Tensor]:
        """Warm-up before ``start_iter``: fp32 all-reduce of everything, no compression state touched."""
        flat = flatten(grads)
        comm.all_reduce(flat, "grads")
        flat.div_(comm.world_size)
        self._public = {}
        self._count(keys)
        return unflatten(flat, [g.shape for g in grads])

    def _count(self, keys: Sequence[Hashable]) -> None:
        for k in keys:
            self._steps[k] = self._steps.get(k, 0) + 1

    def _group_matrices(self, grads: Sequence[torch.Tensor], keys: Sequence[Hashable], g: ShapeGroup) -> torch.Tensor:
        views = [grads[i].reshape(g.n, g.m) for i in g.indices]
        if not self.error_feedback:
            # nothing writes into M then, so a single tensor can be a view
            return views[0].unsqueeze(0) if g.count == 1 else torch.stack(views)
        M = torch.stack(views)
        stored = self._residuals.get(tuple(keys[i] for i in g.indices))
        if stored is not None and stored.values.shape == M.shape:
            return M.add_(stored.values)  # last step's residual of this group, still stacked: one add
        # the keys were grouped differently last step (a restored checkpoint, another key order)
        residuals = self._residual_views()
        for k, i in enumerate(g.indices):
            e = residuals.get(keys[i])
            if e is not None and e.numel() == g.n * g.m:
                M[k].add_(e.view(g.n, g.m))
        return M

    def _add_rest_error(self, rest: torch.Tensor, plan: Plan, keys: Sequence[Hashable]) -> None:
        stored = self._residuals.get(tuple(keys[i] for i in plan.rest))
        if stored is not None and stored.values.shape == rest.shape:
            rest.add_(stored.values)  # last step's flat residual of the rest: one add
            return
        residuals = self._residual_views()
        errors = [residuals.get(keys[i]) for i in plan.rest]
        if all(e is None for e in errors):
            return
        parts = [
            e.reshape(-1) if e is not None and e.shape == plan.shapes[i] else rest.new_zeros(plan.shapes[i].numel())
            for e, i in zip(errors, plan.rest)
        ]
        rest.add_(torch.cat(parts))

    # -- the residual, stored once per group ---------------------------------------------------------
    def _residual_views(self) -> dict[Hashable, torch.Tensor]:
        """Every parameter's residual, as a view into its group's tensor (nothing is copied)."""
        return {k: v for r in self._residuals.values() for k, v in zip(r.keys, r.views())}

    def _drop_residuals(self, keys: Sequence[Hashable]) -> None:
        """Forget the residuals of ``keys``; other keys of the same entries keep theirs (as views)."""
        drop = set(keys)
        for group_keys in [t for t in self._residuals if drop.intersection(t)]:
            old = self._residuals.pop(group_keys)
            for key, shape, view in zip(old.keys, old.shapes, old.views()):
                if key not in drop:
                    self._residuals[(key,)] = GroupResidual((key,), (shape,), view)

    def _store_residual(self, keys: tuple[Hashable, ...], shapes: tuple[torch.Size, ...], values: torch.Tensor) -> None:
        """This step's residual of one group; replaces whatever entries held these keys before."""
        if keys not in self._residuals:
            self._drop_residuals(keys)
        self._residuals[keys] = GroupResidual(keys, shapes, values)

    def _start_qs(
        self, plan: Plan, keys: Sequence[Hashable], device: torch.device, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Step 3's Q per group (not yet orthogonalized)."""
        if self.warm_start and all(
            keys[i] in self._q and self._q[keys[i]].shape == (g.m, g.r) for g in plan.groups for i in g.indices
        ):
            return [torch.stack([self._q[keys[i]] for i in g.indices]) for g in plan.groups]
        # PyTorch: torch.manual_seed(rng.randint(1e9)), then one CPU randn per Q in message order.
        # A fresh generator seeded the same way gives the same stream without touching global state.
        gen = torch.Generator()
        gen.manual_seed(int(self._rng.randint(_SEED_BOUND)))
        return [
            torch.stack([torch.randn(g.m, g.r, generator=gen, dtype=dtype) for _ in g.indices]).to(device)
            for g in plan.groups
        ]

    @staticmethod
    def _p_view(P: torch.Tensor, g: ShapeGroup) -> torch.Tensor:
        return P[g.p_offset : g.p_offset + g.p_numel].view(g.count, g.n, g.r)

    @staticmethod
    def _q_view(Q: torch.Tensor, g: ShapeGroup) -> torch.Tensor:
        return Q[g.q_offset : g.q_offset + g.q_numel].view(g.count, g.m, g.r)

    def public_state(self) -> dict[str, torch.Tensor]:
        """``Q_init``: the (orthogonalized) Q the step started from (warm start: last step's
        aggregated Q); ``P_sum``: the P summed over workers (only with several workers)."""
        return dict(self._public)

    def private_state(self, keys: Sequence[Hashable], shapes: Sequence[torch.Size]) -> dict[str, torch.Tensor]:
        """``{"residual": e}``: the error feedback step 1 adds to ``M`` (and LQ-SGD to the quantized rest)."""
        if not self.error_feedback:
            return {}
        return residual_vector(self._residual_views(), keys, shapes)

    # -- the receiver's side ----------------------------------------------------------------------------
    def message_values(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        if "grads" in messages:  # a warm-up step (before start_iter)
            return {"grads": messages["grads"].to(torch.float32)}
        plan = self.plan(shapes)
        needed = (["P", "Q"] if plan.groups else []) + (["rest"] if plan.rest else [])
        check_messages(messages, needed, self._name())
        out = {}
        for tag, numel in (("P", plan.p_numel), ("Q", plan.q_numel), ("rest", plan.rest_numel)):
            if tag in messages:
                values = messages[tag].to(torch.float32).reshape(-1)
                if values.numel() != numel:
                    raise CompressorError(f"{self._name()}: message {tag!r} holds {values.numel()} values, shapes need {numel}")
                out[tag] = values
        return out

    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """``P_hat Q^T`` per compressed tensor, the rest as sent.

        ``P_hat = orth(P)`` from this worker's own P at world size 1; with several workers
        ``P_hat = orth(public["P_sum"])``, the summed P every receiver orthogonalized (records
        of a multi-worker step hold it), so the decode is exact for any world size: this
        worker's share ``P_hat Q_i^T`` of the aggregate ``mean_i P_hat Q_i^T``.
        """
        values = self.message_values(messages, shapes, public)
        shapes = [torch.Size(s) for s in shapes]
        if "grads" in values:
            return unflatten(values["grads"], shapes)
        plan = self.plan(shapes)
        out: list[torch.Tensor | None] = [None] * len(shapes)
        if plan.rest:
            for i, t in zip(plan.rest, unflatten(values["rest"], [shapes[i] for i in plan.rest])):
                out[i] = t
        if plan.groups:
            P = values["P"]
            if public is not None and "P_sum" in public:
                P = public["P_sum"].to(torch.float32).reshape(-1)
            P_hats = orthogonalize_blocks([self._p_view(P, g) for g in plan.groups], self.epsilon)
            for g, P_hat in zip(plan.groups, P_hats):
                M_hat = torch.bmm(P_hat, self._q_view(values["Q"], g).transpose(1, 2))
                for k, i in enumerate(g.indices):
                    out[i] = M_hat[k].reshape(shapes[i])
        return out  # type: ignore[return-value]

    # -- the compressor-aware attacker's side ---------------------------------------------------------
    def _simulate_quantize(self, x: torch.Tensor, tag: str, plan: Plan) -> torch.Tensor:
        """What the receiver sees of a sent factor (identity here; LQ-SGD quantizes, straight-through)."""
        return x

    def simulate(
        self,
        grads: Sequence[torch.Tensor],
        messages: Mapping[str, torch.Tensor],
        public: Mapping[str, torch.Tensor] | None = None,
        private: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Steps 1 and 3-7 for candidate ``grads`` with the observed step's Q: ``M = G + e``,
        ``P = M Q_init``, ``Q = M^T P_hat``; linear in the candidate, so differentiable.

        ``P_hat`` is the basis the receiver orthogonalized, read from the observation:
        ``orth(observed P)`` (``orth(public["P_sum"])`` with several workers), which is the
        worker's own basis at the true gradient, so the simulation is exact there. Taking
        ``orth(P)`` of the candidate's own P instead is as exact at the truth but puts
        Gram-Schmidt inside the attack's objective; on digits (LeNet, IG, 300 iterations,
        8 images) it cost the aware view 1.0-2.0 dB against the observed basis.

        ``e`` is the worker's residual from ``private`` (the oracle view); without it,
        zero (exact for a fresh compressor, as ``capture`` makes).
        """
        grads = with_residual(grads, private, self._name())
        if "grads" in messages:
            return {"grads": flatten(grads).to(torch.float32)}
        plan = self.plan([g.shape for g in grads])
        out: dict[str, torch.Tensor] = {}
        if plan.groups:
            if public is None or "Q_init" not in public:
                raise CompressorError(f"{self._name()}: simulate needs public['Q_init'] (the step's starting Q)")
            Q_init = public["Q_init"].reshape(-1)
            if Q_init.numel() != plan.q_numel:
                raise CompressorError(
                    f"{self._name()}: public Q_init holds {Q_init.numel()} values, shapes need {plan.q_numel}"
                )
            Ms = [torch.stack([grads[i].to(torch.float32).reshape(g.n, g.m) for i in g.indices]) for g in plan.groups]
            Q_init = Q_init.to(device=Ms[0].device, dtype=torch.float32)
            P = torch.cat([torch.bmm(M, self._q_view(Q_init, g)).reshape(-1) for g, M in zip(plan.groups, Ms)])
            P = self._simulate_quantize(P, "P", plan)
            if "P_sum" not in public:
                P_basis = self.message_values(messages, [g.shape for g in grads], public)["P"].to(P.device)
            else:
                P_basis = public["P_sum"].reshape(-1).to(device=P.device, dtype=torch.float32)
                if P_basis.numel() != plan.p_numel:
                    raise CompressorError(
                        f"{self._name()}: public P_sum holds {P_basis.numel()} values, shapes need {plan.p_numel}"
                    )
            P_hats = orthogonalize_blocks([self._p_view(P_basis, g) for g in plan.groups], self.epsilon)
            Q = torch.cat([torch.bmm(M.transpose(1, 2), P_hat).reshape(-1) for M, P_hat in zip(Ms, P_hats)])
            out["P"] = P
            out["Q"] = self._simulate_quantize(Q, "Q", plan)
        if plan.rest:
            rest = flatten([grads[i] for i in plan.rest]).to(torch.float32)
            out["rest"] = self._simulate_quantize(rest, "rest", plan)
        return out

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        _, mt_key, mt_pos, has_gauss, cached = self._rng.get_state()
        return {
            "rng_key": torch.from_numpy(mt_key.astype(np.int64)),
            "rng_pos": int(mt_pos),
            "rng_has_gauss": int(has_gauss),
            "rng_cached_gaussian": float(cached),
            "steps": dict(self._steps),
            "q": {k: v.detach().clone() for k, v in self._q.items()},
            # per-parameter tensors exist only here, in the checkpoint's format
            "residuals": {k: v.detach().clone() for k, v in self._residual_views().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"rng_key", "rng_pos", "rng_has_gauss", "rng_cached_gaussian", "steps", "q", "residuals"}
        self._load_common(state, expected)

    def _load_common(self, state: Mapping[str, Any], expected: set[str]) -> None:
        if set(state) != expected:
            raise CompressorError(
                f"{self._name()}: state keys {sorted(state)} do not match the expected {sorted(expected)}"
            )
        key = np.asarray(state["rng_key"].cpu().numpy(), dtype=np.uint32)
        self._rng.set_state(
            ("MT19937", key, int(state["rng_pos"]), int(state["rng_has_gauss"]), float(state["rng_cached_gaussian"]))
        )
        self._steps = dict(state["steps"])
        self._q = {k: v.clone() for k, v in state["q"].items()}
        # one entry per parameter until the next step stores them per shape group again
        self._residuals = {
            (k,): GroupResidual((k,), (v.shape,), v.clone()) for k, v in state["residuals"].items()
        }
