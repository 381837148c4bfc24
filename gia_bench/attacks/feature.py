"""Feature inversion through the layers a compressor sends exactly (``feature``).

Low-rank and sparse compressors lose information in general but send some of the
gradient exactly, and a receiver that knows the compressor knows which part
(:mod:`gia_bench.attacks.exact`): PowerSGD/LQ-SGD at rank r >= B send a fully connected
layer's gradient (rank <= B) exactly or up to quantization, biases go uncompressed, Top-k
sends its kept entries as they are. From a fully connected layer's exact weight and bias
gradients the attacker gets the layer's *inputs* (:mod:`gia_bench.attacks.layer_inputs`:
the bias ratio at B = 1, a rank-B solve at the classifier for B > 1), then inverts the
network up to that layer::

    minimise_x  sum_layers mean_b [1 - cos(f(x_b), h_b) + ||f(x_b) - h_b|| / ||h_b||]  +  tv * TV(x)

over the known features (a masked match where Top-k left some out), with Adam, pixels
kept in the valid range, a cosine learning-rate decay, several restarts and each
restart's best iterate; the restart with the lowest feature distance wins (feature
inversion as in Mahendran & Vedaldi, CVPR 2015, with Inverting Gradients' cosine + TV).
Where the view has the *whole* gradient exactly (``none``), DLG's full-gradient match then
goes on from that image (``refine``): the features put it in the right basin, the gradient
finishes it; the lower gradient distance decides which image is kept.

Views: ``aware`` decides what is exact from the record's public structure and skips a
record where nothing qualifies (:class:`NoExactLayer`, with the reasons); ``naive`` takes
the decoded gradient for the worker's gradient, as the naive matching attacks do, so
every fully connected layer with a bias is used as if it were exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from gia_bench.attacks import labels as label_parts
from gia_bench.attacks.base import Attack, AttackError, Budget, Progress, Reconstruction, register
from gia_bench.attacks.exact import Exactness, ExactTensor, exact_tensors
from gia_bench.attacks.base import NotApplicable
from gia_bench.attacks.layer_inputs import LayerInputs, batch_inputs, single_input
from gia_bench.attacks.matching import attack_model, candidate_function
from gia_bench.attacks.objectives import OBJECTIVES
from gia_bench.attacks.priors import TotalVariation
from gia_bench.attacks.views import build_view
from gia_bench.errors import SpecError
from gia_bench.receiver import decode_record
from gia_bench.records import GradientRecord


class NoExactLayer(NotApplicable):
    """No fully connected layer's gradient reaches the receiver exactly: the record is skipped, with the reasons."""


@dataclasses.dataclass(frozen=True)
class _Target:
    """One layer whose inputs the inversion matches."""

    module: nn.Module
    inputs: LayerInputs
    nominal: float  # the gradients' nominal relative error (exact.py)

    def to_json(self) -> dict[str, object]:
        return {**self.inputs.to_json(), "nominal_error": self.nominal,
                "feature_error_estimate": self.inputs.error_estimate(self.nominal)}  # fmt: skip


@register("feature")
class FeatureInversion(Attack):
    """Recover a fully connected layer's inputs from its exactly sent gradient, then invert the network to them.

    Args:
        iterations: Adam steps per restart.
        restarts: independent starts (the image mean plus seeded noise); the lowest feature distance wins.
        lr: Adam's learning rate (cosine decay to zero over the iterations).
        tv: weight of the total-variation prior (model-input space).
        grad: weight of the view's own gradient match (cosine over the whole observation: the messages in
            the aware view, the decoded gradient in the naive one), added to the feature distance; 0: none.
            Default: 10 at B = 1 (LeNet, photos: +0.4 to +8 dB on ``none``, +1 dB through PowerSGD/LQ-SGD
            rank 1, at 4x the time), 0 at B > 1 (there it cost 3.7-8 dB on a batch through rank 4).
        max_error: largest nominal relative error of a "nearly exact" tensor (LQ-SGD's codec, fp16) still used.
        refine: L-BFGS steps of DLG's full-gradient match from the inversion's image, taken only where the
            view has every parameter's gradient whole and exact (``none``, fp16, a warm-up step; every record
            in the naive view); 0: none. The lower squared-L2 gradient distance decides between the two images.
        labels: label strategy (auto: idlg for B = 1, mean-embedding-eb otherwise); B > 1 needs them for the solve.
    """

    views = ("naive", "aware")

    def __init__(
        self,
        iterations: int = 1500,
        restarts: int = 2,
        lr: float = 0.1,
        tv: float = 0.2,
        grad: float | None = None,
        max_error: float = 0.05,
        labels: str = "auto",
        refine: int = 50,
    ):
        if iterations < 1 or restarts < 1 or refine < 0:
            raise SpecError("feature: iterations and restarts must be >= 1, refine >= 0")
        if not lr > 0 or tv < 0 or (grad is not None and grad < 0) or not 0 <= max_error < 1:
            raise SpecError("feature: lr must be > 0, tv >= 0, grad >= 0 and max_error in [0, 1)")
        if labels == "joint":
            raise SpecError("feature: labels=joint needs a matching attack; use auto, idlg, ilrg, mean-embedding-eb")
        if labels != "auto":
            label_parts.LABELS.get(labels)
        self.iterations, self.restarts, self.lr, self.tv, self.grad = iterations, restarts, lr, tv, grad
        self.max_error, self.labels, self.refine = max_error, labels, refine

    @property
    def budget(self) -> Budget:
        return Budget(iterations=self.iterations, restarts=self.restarts)

    # -- which layers, and their inputs ------------------------------------------------------------
    def exactness(self, record: GradientRecord, model: nn.Module, view: str) -> Exactness:
        """The aware view's public-structure decision; the naive view takes the decoded gradient as exact."""
        if view == "aware":
            return exact_tensors(record, model)
        names = record.meta.param_names
        found = {n: ExactTensor(n, i, None, 0.0, "naive: the decoded gradient taken as the gradient")
                 for i, n in enumerate(names)}  # fmt: skip
        return Exactness(found, {}, record.meta.defense)

    def layer_inputs(
        self,
        record: GradientRecord,
        model: nn.Module,
        view: str,
        labels: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[list[_Target], dict[str, str]]:
        """The fully connected layers whose inputs can be recovered, and why each other one cannot."""
        meta = record.meta
        names = list(meta.param_names)
        exact = self.exactness(record, model, view)
        grads = [g.to(torch.float64).cpu() for g in decode_record(record)]
        head = label_parts.find_head(model, names, meta.dataset.num_classes).module
        targets: list[_Target] = []
        skipped: dict[str, str] = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            w_name, b_name = f"{name}.weight", f"{name}.bias"
            if module.bias is None:
                skipped[name] = "no bias: no ratio to read the inputs from"
                continue
            parts = [exact.get(w_name), exact.get(b_name)]
            missing = [(n, exact.excluded.get(n, "not exact")) for n, p in zip((w_name, b_name), parts) if p is None]
            if missing:
                skipped[name] = "; ".join(f"{n}: {why}" for n, why in missing)
                continue
            ew, eb = parts
            assert ew is not None and eb is not None
            if max(ew.error, eb.error) > self.max_error:
                skipped[name] = f"nominal error {max(ew.error, eb.error):.3g} > max_error {self.max_error}"
                continue
            dW, db = grads[ew.index], grads[eb.index]
            if meta.batch_size == 1:
                found = single_input(name, dW, db, ew.mask, eb.mask)
                if found is None:
                    skipped[name] = "no row with both its weight and bias entries known"
                    continue
            elif module is not head:
                skipped[name] = f"B = {meta.batch_size}: inputs are solved for at the classifier only"
                continue
            elif ew.mask is not None or eb.mask is not None:
                skipped[name] = f"B = {meta.batch_size}: a masked (Top-k) batch solve is not implemented"
                continue
            else:
                found = batch_inputs(name, dW, db, module.weight.detach(), module.bias.detach(), labels, generator)
            targets.append(_Target(module, found, max(ew.error, eb.error)))
        return targets, skipped

    # -- the attack ---------------------------------------------------------------------------------------
    def run(
        self,
        record: GradientRecord,
        view: str,
        generator: torch.Generator,
        progress: Progress | None = None,
        device: torch.device | str = "cpu",
    ) -> Reconstruction:
        self.check_view(view)
        meta = record.meta
        device = torch.device(device)
        if not meta.is_fedsgd:
            raise NoExactLayer(
                f"record {record.record_id}: skipped by feature: a FedAvg update of {meta.local_steps} local steps"
                " is a sum of gradients at different weights; no layer's inputs can be read from it"
            )
        model = attack_model(record, device)
        strategy, labels = label_parts.infer_labels(record, model, self.labels, generator, device)
        assert labels is not None
        # the batch solve's starts draw on the CPU, seeded from the attack's generator
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        cpu_gen = torch.Generator().manual_seed(seed)
        targets, skipped = self.layer_inputs(record, model, view, labels, cpu_gen)
        if not targets:
            why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "the model has no fully connected layer"
            raise NoExactLayer(
                f"record {record.record_id}: skipped by feature ({view} view, defense {meta.defense!r}):"
                f" no fully connected layer's gradient reaches the receiver exactly ({why})"
            )
        x, distance, evaluations = self._invert(record, model, view, targets, labels, generator, progress, device)
        final, refined = distance, None
        exact = self.exactness(record, model, view)
        whole = all((e := exact.get(n)) is not None and e.mask is None and e.error <= self.max_error
                    for n in meta.param_names)  # fmt: skip
        if self.refine > 0 and whole:
            x, refined, spent = self._refine(record, model, view, x, labels, device)
            final, evaluations = float(refined["gradient_distance"]), evaluations + spent  # type: ignore[arg-type]
        used = [t.to_json() for t in targets]
        return Reconstruction(
            inputs=x.to(torch.float32).cpu(),
            labels=labels.to(torch.int64).cpu(),
            iterations=self.iterations,
            final_loss=final,  # the feature distance; the gradient distance where refined
            view=view,
            label_strategy=strategy,
            observed="decoded gradient" if view == "naive" else "messages",
            public_state_used=tuple(sorted(record.public)) if view == "aware" else (),
            update=meta.local_training().describe(meta.batch_size),
            extra={
                "layers_used": used,
                "layers_skipped": skipped,
                # what the attacker can say of its features without the truth: the fit's residual
                "feature_error_estimate": max(t.inputs.error_estimate(t.nominal) for t in targets),
                "feature_distance": distance,
                "refined": refined,  # None: the view has not the whole gradient exactly (or refine=0)
            },
            budget=Budget(self.iterations, self.restarts, evaluations),
        )

    def _invert(
        self,
        record: GradientRecord,
        model: nn.Module,
        view: str,
        targets: list[_Target],
        labels: torch.Tensor,
        generator: torch.Generator,
        progress: Progress | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, float, int]:
        """Adam on the images to match the targets' features; returns (B, C, H, W), its distance, evaluations."""
        meta = record.meta
        B, shape, R = meta.batch_size, meta.dataset.shape, self.restarts
        lo, hi = _box(record, device)
        prior = TotalVariation()
        weight = self.grad if self.grad is not None else (10.0 if B == 1 else 0.0)
        gradient_distance = _gradient_distance(record, model, view, labels, "cosine", device) if weight > 0 else None
        distance, hooks = _feature_distance(model, targets, B, shape, device)
        try:
            # starts: the data set mean (0 in model-input space) plus seeded noise
            x = (0.1 * torch.randn((R, B, *shape), generator=generator, device=device)).clamp(lo, hi)
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=self.lr)
            best_obj = torch.full((R,), math.inf, device=device)
            best_dist = torch.full((R,), math.inf, device=device)
            best_x = x.detach().clone()
            every = max(1, self.iterations // 200)
            for it in range(self.iterations + 1):
                dist = distance(x)
                obj = dist + self.tv * prior(x) if self.tv > 0 else dist
                if gradient_distance is not None:
                    obj = obj + weight * gradient_distance(x)
                with torch.no_grad():
                    better = obj.detach() < best_obj
                    best_obj = torch.where(better, obj.detach(), best_obj)
                    best_dist = torch.where(better, dist.detach(), best_dist)
                    best_x = torch.where(better.view(-1, 1, 1, 1, 1), x.detach(), best_x)
                if it == self.iterations:  # the last iterate is scored, not stepped from
                    break
                for group in opt.param_groups:
                    group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * it / self.iterations))
                # only the images are optimised: no gradient is accumulated in the model's weights
                (x.grad,) = torch.autograd.grad(obj.sum(), [x])
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                if progress is not None and (it + 1) % every == 0:
                    progress(it + 1, self.iterations, float(best_dist.min()))
        finally:
            for h in hooks:
                h.remove()
        winner = int(best_dist.argmin())
        return best_x[winner], float(best_dist[winner]), R * (self.iterations + 1)

    def _refine(
        self, record: GradientRecord, model: nn.Module, view: str, x: torch.Tensor, labels: torch.Tensor,
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, object], int]:  # fmt: skip
        """Where the view has the whole gradient exactly (``none``), DLG's match from the inversion's image.

        L-BFGS with a strong-Wolfe line search on the squared-L2 distance to the whole observation
        (Zhu et al. 2019, eq. 4), pixels boxed. The features pin the image down near the truth, where
        the full gradient's basin is; the iterate with the lowest distance wins, the starting image
        (the inversion's) included: by the attacker's own loss, never worse than not refining.
        """
        distance = _gradient_distance(record, model, view, labels, "l2", device)
        lo, hi = _box(record, device)
        z = x.unsqueeze(0).detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe")
        best: dict[str, object] = {"loss": math.inf, "x": z.detach().clone(), "start": None}
        evaluations = 0

        def closure() -> torch.Tensor:
            nonlocal evaluations
            d = distance(z).sum()
            value = float(d.detach())
            evaluations += 1
            if best["start"] is None:
                best["start"] = value
            if value < best["loss"]:  # type: ignore[operator]
                best.update(loss=value, x=z.detach().clone())
            (z.grad,) = torch.autograd.grad(d, [z])
            return d.detach()

        for _ in range(self.refine):
            opt.step(closure)
            with torch.no_grad():
                z.copy_(torch.maximum(torch.minimum(z, hi), lo))
        closure()  # the last iterate is scored too
        info = {"steps": self.refine, "loss": "l2", "gradient_distance_start": best["start"],
                "gradient_distance": best["loss"]}  # fmt: skip
        return best["x"][0], info, evaluations  # type: ignore[index]


def _box(record: GradientRecord, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid pixel range [0, 1] in model-input space, shaped (1, 1, C, 1, 1)."""
    spec = record.meta.dataset
    mean = torch.tensor(spec.mean, device=device).reshape(1, 1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).reshape(1, 1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def _gradient_distance(
    record: GradientRecord, model: nn.Module, view: str, labels: torch.Tensor, loss: str, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The view's own gradient distance (one over the whole observation) of images (R, B, C, H, W), (R,)."""
    threat = build_view(record, view, device)
    candidates = candidate_function(model, record)
    bound = OBJECTIVES.create(loss).bind_segments(threat.segments)
    y = labels.to(device)
    B = record.meta.batch_size
    return lambda x: bound(threat.candidate_segments(candidates(x, y.expand(x.shape[0], B))))


def _feature_distance(
    model: nn.Module, targets: list[_Target], B: int, shape: tuple[int, ...], device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.utils.hooks.RemovableHandle]]:
    """Feature distance per restart, (R,), of images (R, B, C, H, W), and the hooks to remove after.

    Per layer: mean over the batch of 1 - cos + relative L2 (on the known entries), averaged over layers.
    """
    goals = [(t.inputs.features.to(device, torch.float32), t.inputs.known) for t in targets]
    goals = [(h if k is None else h[:, k.to(device)], None if k is None else k.to(device)) for h, k in goals]
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        t.module.register_forward_hook(lambda m, i, o, j=j: seen.__setitem__(j, i[0].flatten(1)))
        for j, t in enumerate(targets)
    ]
    # train-mode BatchNorm mixes the examples of one forward pass: one pass per restart there
    train_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())

    def distance(x: torch.Tensor) -> torch.Tensor:
        if train_bn:
            passes = []
            for r in range(x.shape[0]):
                model(x[r])
                passes.append([seen[j] for j in range(len(goals))])
            per_layer = [torch.stack([p[j] for p in passes]) for j in range(len(goals))]
        else:
            model(x.reshape(-1, *shape))
            per_layer = [seen[j].reshape(x.shape[0], B, -1) for j in range(len(goals))]
        total = x.new_zeros(x.shape[0])
        for f, (h, known) in zip(per_layer, goals):
            if known is not None:
                f = f[..., known]
            cos = torch.nn.functional.cosine_similarity(f, h.expand_as(f), dim=-1, eps=1e-12)
            rel = (f - h).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)
            total = total + (1 - cos + rel).mean(dim=-1)
        return total / len(goals)

    return distance, hooks
