"""FedAvg client updates: K local SGD steps, expressed as the update the client sends.

A FedAvg client (McMahan et al. 2017, Algorithm 1, ``ClientUpdate``) starts from the
server's weights w_0 and takes K plain SGD steps on its private examples::

    w_{k+1} = w_k - lr * g_k,    g_k = grad_w L(f_{w_k}(x_{S_k}), y_{S_k})    (mean cross-entropy)

and sends w_K. gia-bench records the update as

    u = (w_0 - w_K) / lr = sum_{k<K} g_k,

so for K = 1 the record holds exactly the FedSGD gradient g_0 and every compressor,
decode and naive attack works unchanged; the compressor is applied to u. Local step k
(0-based) uses the examples ``S_k = [(k*b + j) % N for j in range(b)]`` of the record's
batch (N examples, in record order) taken cyclically, b = ``local_batch``: deterministic,
so an attacker who knows (K, lr, b), which are public record metadata, can simulate the
client on candidate data. That is Inverting Gradients' multi-step setting (Geiping et al.
2020, sec. 5 "Federated averaging", eq. 6: match the parameter update of the simulated
local steps, differentiating through them).

u is computed as the running sum of the g_k, not as (w_0 - w_K) / lr: the two agree up to
rounding, and the sum makes K = 1 exactly the gradient (so FedSGD records keep their bytes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gia_bench.errors import SpecError

#: Upper bound on ``local_steps`` (and ``local_batch``) a record may declare: an attacker
#: differentiates through every step, so a larger K is a mistake, not a threat model.
MAX_LOCAL_STEPS = 10_000
MAX_LOCAL_BATCH = 1_000_000


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """What a FedAvg client does before it sends: K local steps of SGD with ``lr`` on ``batch`` examples.

    ``batch`` None means the client's whole batch (full-batch local steps). ``steps == 1``
    with the whole batch is FedSGD: the record is a plain gradient record.
    """

    steps: int = 1
    lr: float = 0.1
    batch: int | None = None

    def check(self, batch_size: int, where: str = "") -> None:
        """Raise :class:`SpecError` unless the setting is valid for a client with ``batch_size`` examples."""
        at = f"{where}: " if where else ""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_LOCAL_STEPS:
            raise SpecError(f"{at}--local-steps must be an integer in [1, {MAX_LOCAL_STEPS}], got {self.steps!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not (math.isfinite(self.lr) and self.lr > 0):
            raise SpecError(f"{at}--local-lr must be a finite number > 0, got {self.lr!r}")
        if self.batch is not None:
            if isinstance(self.batch, bool) or not isinstance(self.batch, int) or not 1 <= self.batch <= batch_size:
                raise SpecError(
                    f"{at}--local-batch must be an integer in [1, --batch-size {batch_size}], got {self.batch!r}"
                )
            if self.steps == 1 and self.batch != batch_size:
                raise SpecError(
                    f"{at}--local-batch {self.batch} with --local-steps 1 would send the gradient of"
                    f" {self.batch} of the {batch_size} examples; capture --batch-size {self.batch} instead"
                )

    def local_batch(self, batch_size: int) -> int:
        return batch_size if self.batch is None else self.batch

    def is_fedsgd(self, batch_size: int) -> bool:
        """True when the update is the plain gradient of the whole batch (K = 1, full batch)."""
        return self.steps == 1 and self.local_batch(batch_size) == batch_size

    def meta_fields(self, batch_size: int) -> dict[str, Any]:
        """The record metadata for this setting: empty for FedSGD (records keep today's bytes)."""
        if self.is_fedsgd(batch_size):
            return {}
        return {"local_steps": self.steps, "local_lr": float(self.lr), "local_batch": self.local_batch(batch_size)}

    def describe(self, batch_size: int) -> str:
        """One line for a threat description: what the client (and so the attacker) did."""
        if self.is_fedsgd(batch_size):
            return "FedSGD gradient (1 step, whole batch)"
        return (
            f"FedAvg update after {self.steps} local SGD steps, lr {self.lr:g},"
            f" local batch {self.local_batch(batch_size)} of {batch_size} (cyclic)"
        )


def step_indices(step: int, local_batch: int, n: int) -> list[int]:
    """The examples local step ``step`` (0-based) uses: ``[(step*b + j) % n for j < b]``."""
    return [(step * local_batch + j) % n for j in range(local_batch)]


def local_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    local_batch: int,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """u = (w_0 - w_K) / lr after ``steps`` local SGD steps from the model's weights; one tensor per parameter.

    ``images`` (N, C, H, W); ``labels`` (N,) class indices or (N, classes) probabilities
    (soft labels, as DLG's joint optimisation uses). Parameters come in
    ``model.named_parameters()`` order. The model is called functionally
    (``torch.func.functional_call``) with copies of its buffers: neither its weights
    nor its BatchNorm statistics change. With ``create_graph=True`` the result is
    differentiable w.r.t. ``images`` (and soft ``labels``) through every step, as the
    multi-step attack needs; otherwise it is detached.
    """
    n = int(images.shape[0])
    if steps < 1 or local_batch < 1 or local_batch > n:
        raise SpecError(f"local_update: need steps >= 1 and 1 <= local_batch <= {n}, got {steps}, {local_batch}")
    names = [name for name, _ in model.named_parameters()]
    weights = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    # copies: a train-mode BatchNorm updates its running statistics in place on every forward
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    total: list[torch.Tensor] | None = None
    for k in range(steps):
        idx = step_indices(k, local_batch, n)
        index = torch.tensor(idx, device=images.device)
        x, y = images.index_select(0, index), labels.index_select(0, index)
        loss = F.cross_entropy(functional_call(model, (weights, buffers), (x,)), y)
        grads = torch.autograd.grad(loss, [weights[name] for name in names], create_graph=create_graph)
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads)]
        if k + 1 < steps:
            if create_graph:
                weights = {name: weights[name] - lr * g for name, g in zip(names, grads)}
            else:
                weights = {name: (weights[name] - lr * g).detach().requires_grad_(True) for name, g in zip(names, grads)}
    assert total is not None
    return list(total) if create_graph else [t.detach() for t in total]


class CandidateUpdates:
    """Per-restart FedAvg updates of candidate data, differentiable in the inputs.

    The multi-step counterpart of :class:`gia_bench.attacks.matching.CandidateGradients`:
    ``__call__(x, y)`` with x (R, B, C, H, W) and y (R, B) class indices or (R, B, K)
    probabilities returns one (R, *param.shape) tensor per parameter, in record order:
    the simulated update u of each restart's candidate batch (Geiping et al. 2020, eq. 6).
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str], local: LocalTraining, batch_size: int):
        order = [name for name, _ in model.named_parameters()]
        if list(param_names) != order:
            raise SpecError("CandidateUpdates: param_names must be the model's parameters in named_parameters() order")
        self.model = model
        self.steps, self.lr = local.steps, float(local.lr)
        self.local_batch = local.local_batch(batch_size)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        per_restart = [
            local_update(self.model, x[r], y[r], self.steps, self.lr, self.local_batch, create_graph=True)
            for r in range(x.shape[0])
        ]
        return [torch.stack(us) for us in zip(*per_restart)]
