"""The gradient-matching engine behind DLG and Inverting Gradients.

Dummy inputs x (and, for ``labels=joint``, soft-label logits) are optimised so
that the gradient they produce matches the observation, as the threat view
defines it (:mod:`gia_bench.attacks.views`)::

    minimise_x  sum_k  D(view(grad_theta L(f_theta(x), y))_k, observed_k)  +  tv * prior(x)

with D an objective (:mod:`~gia_bench.attacks.objectives`), the prior from
:mod:`~gia_bench.attacks.priors` and the optimiser from
:mod:`~gia_bench.attacks.optimizers`. DLG (``dlg``) and Inverting Gradients
(``ig``) are this engine with different defaults; every part is a spec value.

Speed: R restarts are stacked in one tensor (R, B, C, H, W), scored together and
updated by one optimiser step: an element-wise optimiser (Adam) updates every
restart exactly as if it ran apart, and one backward pass serves them all.
Their per-restart parameter gradients come from one ``torch.func.vmap`` of
``torch.func.grad`` over a functional call of the model on CUDA (one batched
kernel per layer; 2-3x faster than one pass per restart on an H100 for ConvNet and
ResNet-18, benchmarks/attacks.py); on the CPU, where it gained nothing (0.98-1.07x
on 2 threads, slower on a loaded machine), and for train-mode
BatchNorm, whose vmap'd double backward is inexact, from one autograd pass
per restart. L-BFGS couples coordinates, so its restarts run one after another.
Gradients are concatenated once into a flat row per restart; no per-parameter
Python arithmetic in the loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gia_bench.attacks import labels as label_parts
from gia_bench.attacks.base import Attack, AttackError, Progress, Reconstruction
from gia_bench.attacks.objectives import OBJECTIVES, total_distance
from gia_bench.attacks.optimizers import OPTIMIZERS
from gia_bench.attacks.priors import PRIORS
from gia_bench.attacks.views import build_view
from gia_bench.errors import SpecError
from gia_bench.fedavg import CandidateUpdates
from gia_bench.records import GradientRecord

INITS = ("randn", "rand")


def attack_model(record: GradientRecord, device: torch.device | str) -> nn.Module:
    """The recorded model, made stateless: forward passes never change its buffers.

    In train mode BatchNorm normalises with batch statistics and only *updates* its
    running statistics, which do not affect the gradient; dropping them
    (``replace_all_batch_norm_modules_``) keeps the maths and lets vmap batch restarts.
    In eval mode the running statistics are used and kept.
    """
    if record.meta.loss != "cross_entropy":
        raise AttackError(f"record {record.record_id}: loss {record.meta.loss!r} is not supported (cross_entropy only)")
    model = record.build_model(device)
    if record.meta.model.mode == "train":
        torch.func.replace_all_batch_norm_modules_(model)
    return model


class CandidateGradients:
    """Per-restart parameter gradients of the mean cross-entropy, differentiable in the inputs.

    ``__call__(x, y)`` with x (R, B, C, H, W) and y (R, B) class indices or (R, B, K)
    probabilities returns one (R, *param.shape) tensor per parameter, in record order.
    """

    def __init__(self, model: nn.Module, param_names: tuple[str, ...], route: str = "auto"):
        if route == "auto":
            device = next(model.parameters()).device
            # vmap's double backward through train-mode BatchNorm is off by ~1e-4 (relative, in
            # float64, against finite differences); the per-restart passes are exact there.
            train_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
            route = "vmap" if device.type == "cuda" and not train_bn else "loop"
        if route not in ("vmap", "loop"):
            raise ValueError(f"route must be auto, vmap or loop, got {route!r}")
        self.route = route
        self.model = model
        self.names = list(param_names)
        named = dict(model.named_parameters())
        self.plist = [named[n] for n in self.names]
        self.params = {n: p.detach() for n, p in named.items()}
        self.buffers = {n: b for n, b in model.named_buffers()}

        def loss_of(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, (params, self.buffers), (x,)), y)

        self._batched = vmap(grad(loss_of), in_dims=(None, 0, 0))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[0] > 1 and self.route == "vmap":
            out = self._batched(self.params, x, y)
            return [out[n] for n in self.names]
        # create_graph keeps the parameter gradients differentiable in x (the double backward).
        per_restart = [
            torch.autograd.grad(F.cross_entropy(self.model(x[r]), y[r]), self.plist, create_graph=True)
            for r in range(x.shape[0])
        ]
        if len(per_restart) == 1:
            return [g.unsqueeze(0) for g in per_restart[0]]
        return [torch.stack(gs) for gs in zip(*per_restart)]


def candidate_function(model: nn.Module, record: GradientRecord):
    """What the matching loop compares with the observation, ``(x, y) -> [(R, *shape)]`` per parameter.

    A FedSGD record: the candidate's gradient. A FedAvg record (``local_steps`` > 1): the
    update its K local SGD steps would send, simulated with the record's public lr and
    local batch (Inverting Gradients' multi-step setting, :mod:`gia_bench.fedavg`).
    """
    meta = record.meta
    if meta.is_fedsgd:
        return CandidateGradients(model, meta.param_names)
    return CandidateUpdates(model, meta.param_names, meta.local_training(), meta.batch_size)


class GradientMatching(Attack):
    """Shared engine; see :class:`~gia_bench.attacks.dlg.DLG` and :class:`~gia_bench.attacks.inverting.InvertingGradients`."""

    def __init__(
        self,
        iterations: int,
        lr: float,
        loss: str,
        optimizer: str,
        labels: str,
        prior: str,
        tv: float,
        restarts: int,
        signed: bool,
        boxed: bool,
        decay: bool,
        init: str,
        max_iter: int,
        history_size: int,
        line_search: bool,
    ):
        if iterations < 1 or restarts < 1 or max_iter < 1 or history_size < 1:
            raise SpecError(f"{self.registry_name}: iterations, restarts, max_iter and history_size must be >= 1")
        if not lr > 0 or tv < 0:
            raise SpecError(f"{self.registry_name}: lr must be > 0 and tv >= 0")
        if init not in INITS:
            raise SpecError(f"{self.registry_name}: init {init!r} is not one of {', '.join(INITS)}")
        OBJECTIVES.get(loss)
        OPTIMIZERS.get(optimizer)
        PRIORS.get(prior)
        if labels != "auto":
            label_parts.LABELS.get(labels)
        self.iterations, self.lr, self.loss, self.optimizer = iterations, lr, loss, optimizer
        self.labels, self.prior, self.tv, self.restarts = labels, prior, tv, restarts
        self.signed, self.boxed, self.decay, self.init = signed, boxed, decay, init
        self.max_iter, self.history_size, self.line_search = max_iter, history_size, line_search

    def run(
        self,
        record: GradientRecord,
        view: str,
        generator: torch.Generator,
        progress: Progress | None = None,
        device: torch.device | str = "cpu",
    ) -> Reconstruction:
        self.check_view(view)
        device = torch.device(device)
        meta = record.meta
        batch, num_classes = meta.batch_size, meta.dataset.num_classes
        shape = meta.dataset.shape
        threat = build_view(record, view, device)
        model = attack_model(record, device)

        # Labels come from the observed (decoded) last-layer gradient, never from the truth.
        strategy_name, inferred = label_parts.infer_labels(record, model, self.labels, generator, device)

        objective = OBJECTIVES.create(self.loss)
        prior = PRIORS.create(self.prior)
        part = OPTIMIZERS.create(self.optimizer)
        grads_of = candidate_function(model, record)

        mean = torch.tensor(meta.dataset.mean, device=device).reshape(1, 1, -1, 1, 1)
        std = torch.tensor(meta.dataset.std, device=device).reshape(1, 1, -1, 1, 1)
        lo, hi = (0 - mean) / std, (1 - mean) / std
        R = self.restarts
        if self.init == "randn":
            x_all = torch.randn((R, batch, *shape), generator=generator, device=device)
        else:
            x_all = lo + (hi - lo) * torch.rand((R, batch, *shape), generator=generator, device=device)
        y_all = torch.randn((R, batch, num_classes), generator=generator, device=device) if inferred is None else None

        def distance(x: torch.Tensor, y_logits: torch.Tensor | None) -> torch.Tensor:
            if y_logits is None:
                assert inferred is not None
                y = inferred.to(device).expand(x.shape[0], batch)
            else:
                y = torch.softmax(y_logits, dim=-1)
            return total_distance(objective, threat.transform(grads_of(x, y)), list(threat.targets))

        groups = [list(range(R))] if part.elementwise else [[r] for r in range(R)]
        total_steps = self.iterations * len(groups)
        done = 0
        final_x, final_y, final_d = [], [], []
        steps_taken = 0
        for group in groups:
            x = x_all[group].clone().requires_grad_(True)
            y_logits = None if y_all is None else y_all[group].clone().requires_grad_(True)
            tensors = [x] if y_logits is None else [x, y_logits]
            opt = part.build(tensors, self.lr, self.max_iter, self.history_size, self.line_search)
            milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1) if self.decay else None

            def closure() -> torch.Tensor:
                loss = distance(x, y_logits)
                if self.tv > 0:
                    loss = loss + self.tv * prior(x)
                loss = loss.sum()
                gs = torch.autograd.grad(loss, tensors)
                for t, g in zip(tensors, gs):
                    t.grad = g.sign() if self.signed else g
                return loss.detach()

            report_every = max(1, self.iterations // 200)
            last_start = math.nan
            # the last iterate known to be finite: L-BFGS can diverge to NaN on hard targets,
            # and then the best answer is where it was before
            good_x = x.detach().clone()
            good_y = None if y_logits is None else y_logits.detach().clone()
            for it in range(self.iterations):
                if part.needs_closure:
                    loss = opt.step(closure)
                    # L-BFGS returns the loss it started from; the same start twice means the
                    # step left x unchanged (converged: max |grad| <= tolerance), as will every later one.
                    start = float(loss)
                    if start == last_start:
                        done += self.iterations - it
                        break
                    last_start = start
                else:
                    loss = closure()
                    opt.step()
                if sched is not None:
                    sched.step()
                if self.boxed:
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                done += 1
                steps_taken = max(steps_taken, it + 1)
                if (it + 1) % report_every == 0 or it + 1 == self.iterations:
                    value = float(loss)  # one device sync per report, not per step
                    if progress is not None:
                        progress(done, total_steps, value)
                    finite = math.isfinite(value) and bool(torch.isfinite(x).all())
                    if y_logits is not None:
                        finite = finite and bool(torch.isfinite(y_logits).all())
                    if not finite:
                        with torch.no_grad():
                            x.copy_(good_x)
                            if y_logits is not None:
                                y_logits.copy_(good_y)
                        break
                    good_x = x.detach().clone()
                    good_y = None if y_logits is None else y_logits.detach().clone()
            final_x.append(x.detach())
            final_y.append(None if y_logits is None else y_logits.detach())
            # Restarts are scored by the matching loss alone (Geiping et al.: scoring_choice="loss").
            final_d.append(distance(x.detach(), final_y[-1]).detach())

        scores = torch.cat(final_d)
        scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
        best = int(scores.argmin())
        xs = torch.cat(final_x)
        if inferred is None:
            labels = torch.cat(final_y)[best].argmax(dim=-1).cpu()
        else:
            labels = inferred.cpu()
        return Reconstruction(
            inputs=xs[best].cpu().to(torch.float32),
            labels=labels.to(torch.int64),
            iterations=steps_taken,
            final_loss=float(scores[best]),
            view=view,
            label_strategy=strategy_name,
            observed=threat.observed,
            public_state_used=threat.public_state_used,
            update=meta.local_training().describe(meta.batch_size),
            extra={"restart_losses": [float(s) for s in scores], "best_restart": best},
        )
