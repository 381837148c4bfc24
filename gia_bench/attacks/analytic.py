"""Analytic input recovery from a fully connected first layer (Phong et al. 2017)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gia_bench.attacks import labels as label_parts
from gia_bench.attacks.base import Attack, AttackError, Budget, NotApplicable, Progress, Reconstruction, register
from gia_bench.attacks.exact import exact_tensors
from gia_bench.attacks.layer_inputs import chain_inputs, relu_chain, single_input
from gia_bench.attacks.matching import attack_model
from gia_bench.errors import SpecError
from gia_bench.receiver import decode_record
from gia_bench.records import GradientRecord

COMBINES = ("lstsq", "best")


def first_linear(model: nn.Module, in_features: int) -> str:
    """Name of the first parameterised module if it is a Linear layer reading the whole (flattened) input."""
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            if isinstance(module, nn.Linear) and module.in_features == in_features and module.bias is not None:
                return name
            raise NotApplicable(
                f"the analytic attack needs a model whose first layer is a fully connected layer with a bias"
                f" over the whole input (e.g. mlp); the first layer here is {type(module).__name__} {name!r}"
            )
    raise NotApplicable("the analytic attack found no parameterised layer in the model")


@register("analytic")
class Analytic(Attack):
    """Exact input recovery from the first fully connected layer's gradient (Phong et al. 2017, sec. 3.1).

    For y = W x + b and one image, dL/dW_i = dL/db_i * x for every row i, so
    x = dL/dW_i / dL/db_i wherever dL/db_i != 0. ``combine=lstsq`` fits x to all rows with
    |dL/db_i| > eps * max|dL/db| (x = sum_i db_i dW_i / sum_i db_i^2), ``best`` uses the row with
    the largest |dL/db_i|. For a batch (mean loss) each row gives sum_n d_ni x_n / sum_n d_ni, a mix
    of the images active at unit i; rows whose unit only one image activates (ReLU) give that image
    exactly. The best-effort batch answer keeps the B candidates that the most other rows agree with
    (duplicates within ``tol``), then fills up with the candidates farthest from those kept.
    The naive view reads the decoded gradient as the gradient: compression degrades it. The aware
    view uses only what the compressor sends exactly (:mod:`gia_bench.attacks.exact`): the first
    layer must qualify (PowerSGD/LQ-SGD at rank >= B, uncompressed, Top-k's kept entries); at B = 1
    each pixel comes from the rows whose weight and bias entries were both sent (pixels no such row
    covers stay at the data set mean), and at B > 1 through a plain ReLU stack (``mlp``) whose layers
    all qualify, the classifier's inputs are solved for (rank-B solve, labels from the strategy) and
    each earlier layer's inputs follow by least squares from its exact gradient, down to the images.

    Args:
        combine: lstsq (all good rows, least squares) or best (single row with the largest |db|); B = 1.
        eps: rows with |dL/db_i| <= eps * max|dL/db| are ignored.
        tol: relative distance under which two row candidates count as the same image (B > 1).
        labels: label strategy: auto (idlg for B = 1, mean-embedding-eb otherwise, see labels.resolve), idlg, bias-corrected, yin.
    """

    views = ("naive", "aware")

    def __init__(self, combine: str = "lstsq", eps: float = 1e-6, tol: float = 1e-3, labels: str = "auto"):
        if combine not in COMBINES:
            raise SpecError(f"analytic: combine {combine!r} is not one of {', '.join(COMBINES)}")
        if not 0 <= eps < 1 or tol <= 0:
            raise SpecError("analytic: eps must be in [0, 1) and tol > 0")
        if labels == "joint":
            raise SpecError("analytic: labels=joint needs an optimising attack; use auto, idlg, bias-corrected or yin")
        if labels != "auto":
            label_parts.LABELS.get(labels)
        self.combine, self.eps, self.tol, self.labels = combine, eps, tol, labels

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
        shape, batch = meta.dataset.shape, meta.batch_size
        model = attack_model(record, device)
        layer = first_linear(model, math.prod(shape))
        names = list(meta.param_names)
        grads = [g.to(device, torch.float64) for g in decode_record(record)]
        dW, db = grads[names.index(f"{layer}.weight")], grads[names.index(f"{layer}.bias")]
        if view == "aware":
            return self._aware(record, model, layer, grads, generator, progress)
        good = db.abs() > self.eps * db.abs().max()
        if not bool(good.any()):
            raise NotApplicable(f"record {record.record_id}: the first layer's bias gradient is zero; nothing to invert")

        if batch == 1:
            if self.combine == "best":
                i = int(db.abs().argmax())
                x = (dW[i] / db[i]).unsqueeze(0)
            else:
                d = db[good]
                x = ((d.unsqueeze(1) * dW[good]).sum(0) / d.pow(2).sum()).unsqueeze(0)
        else:
            x = self._batch(dW[good] / db[good].unsqueeze(1), batch)
        # How well the recovered images explain dL/dW (0: exactly): dW ~ A X, A by least squares.
        A = torch.linalg.lstsq(x.T, dW.T).solution
        residual = float((dW - (x.T @ A).T).pow(2).sum() / dW.pow(2).sum().clamp_min(1e-300))

        strategy_name, labels = label_parts.infer_labels(record, model, self.labels, generator, device)
        if labels is None:
            raise AttackError("analytic: labels=joint needs an optimising attack; use idlg or bias-corrected")
        if progress is not None:
            progress(1, 1, residual)
        return Reconstruction(
            inputs=x.reshape(batch, *shape).to(torch.float32).cpu(),
            labels=labels.to(torch.int64).cpu(),
            iterations=0,
            final_loss=residual,
            view=view,
            label_strategy=strategy_name,
            observed="decoded gradient",
            public_state_used=tuple(sorted(record.public)),
            # the first layer sees the raw inputs at every local step, so a FedAvg update's rows are
            # (sum_k delta_k) x^T too: the same inversion holds for any number of local steps
            update=meta.local_training().describe(batch),
            extra={"layer": layer, "rows_used": int(good.sum())},
            budget=Budget(iterations=0, restarts=1, evaluations=0),
        )

    def _batch(self, candidates: torch.Tensor, batch: int) -> torch.Tensor:
        """Pick ``batch`` images among per-row candidates: most-agreed-upon first, then farthest."""
        return self._clusters(candidates, batch)[0]

    def _in_span(self, x: torch.Tensor, kept: torch.Tensor) -> bool:
        """Whether ``x`` is (within ``tol``) a combination of the images kept: a row that mixes images
        already found, which several rows can agree on when the images' gradients are alike."""
        if kept.shape[0] == 0:
            return False
        coef = torch.linalg.lstsq(kept.T, x.unsqueeze(1)).solution
        return float((kept.T @ coef).squeeze(1).sub(x).norm() / x.norm().clamp_min(1e-30)) < self.tol

    def _clusters(self, candidates: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
        """:meth:`_batch`'s pick, and how many of the picks at least two rows agree on (pure rows: a unit
        only one image activates gives that image exactly, and mixtures rarely coincide across rows)."""
        scale = candidates.norm(dim=1, keepdim=True).clamp_min(1e-30)
        dist = torch.cdist(candidates, candidates) / torch.minimum(scale, scale.T)
        support = (dist < self.tol).sum(dim=1)
        chosen: list[int] = []
        for i in torch.argsort(support, descending=True, stable=True).tolist():
            if len(chosen) == batch or support[i] < 2:
                break
            if all(dist[i, j] >= self.tol for j in chosen) and not self._in_span(candidates[i], candidates[chosen]):
                chosen.append(i)
        agreed = len(chosen)
        while len(chosen) < min(batch, candidates.shape[0]):
            if chosen:
                i = int(dist[:, chosen].min(dim=1).values.argmax())
            else:
                i = 0
            chosen.append(i)
        while len(chosen) < batch:  # fewer usable rows than images: repeat the last one
            chosen.append(chosen[-1])
        return candidates[chosen], agreed

    def _batch_aware(self, model: nn.Module, chain: list[str], layer_grads: dict, labels: torch.Tensor,
                     generator: torch.Generator, dW: torch.Tensor, db: torch.Tensor,
                     pure_rows: bool = True) -> tuple[torch.Tensor, float, str]:
        """A batch through an exact ReLU stack: the classifier solve, or the first layer's pure rows.

        The rank-B solve at the classifier needs one image per label: with a label inferred twice it
        cannot tell those images apart (it returns mixtures). The first layer's rows whose unit only
        one image activates give each image exactly (x = dW_i / db_i), with no labels: when B of them
        are each agreed on by two rows or more, they are taken. Decided from the messages, the
        inferred labels and the codec's public nominal error only (``pure_rows`` False: the rows are
        known only to a codec error above ``tol``, so rows of one image need not coincide)."""
        good = db.abs() > self.eps * db.abs().max()
        rows, agreed = self._clusters((dW[good] / db[good].unsqueeze(1)).to(torch.float64), labels.numel())
        repeated = pure_rows and labels.unique().numel() < labels.numel()
        solved: tuple[torch.Tensor, float] | None = None
        if not (repeated and agreed == labels.numel()):
            try:
                solved = chain_inputs(model, chain, layer_grads, labels, generator)
            except AttackError:
                if agreed < labels.numel() or not pure_rows:
                    raise
        if solved is not None:
            return solved[0], solved[1], "rank-B solve at the classifier, least squares down the ReLU stack"
        A = torch.linalg.lstsq(rows.T, dW.to(torch.float64).T).solution  # how well they explain dL/dW
        residual = float((dW - (rows.T @ A).T).pow(2).sum() / dW.pow(2).sum().clamp_min(1e-300))
        return rows, residual, "first-layer rows one image activates (a label inferred twice)"

    def _aware(
        self,
        record: GradientRecord,
        model: nn.Module,
        layer: str,
        grads: list[torch.Tensor],
        generator: torch.Generator,
        progress: Progress | None,
    ) -> Reconstruction:
        """The aware view: only the rows (entries) the compressor sends exactly."""
        meta = record.meta
        shape, batch = meta.dataset.shape, meta.batch_size
        names = list(meta.param_names)
        exact = exact_tensors(record, model)
        parts = [exact.get(f"{layer}.{p}") for p in ("weight", "bias")]
        if parts[0] is None or parts[1] is None:
            why = "; ".join(f"{layer}.{p}: {exact.excluded.get(f'{layer}.{p}', 'not exact')}"
                            for p, e in zip(("weight", "bias"), parts) if e is None)  # fmt: skip
            raise NotApplicable(
                f"record {record.record_id}: analytic (aware): the first layer is not sent exactly ({why})"
            )
        ew, eb = parts
        strategy_name, labels = label_parts.infer_labels(record, model, self.labels, generator, grads[0].device)
        if labels is None:
            raise AttackError("analytic: labels=joint needs an optimising attack; use idlg or bias-corrected")
        dW, db = grads[ew.index].cpu(), grads[eb.index].cpu()
        extra: dict[str, object] = {"layer": layer, "exact": {"weight": ew.reason, "bias": eb.reason}}
        if batch == 1:
            found = single_input(layer, dW, db, ew.mask, eb.mask, self.eps)
            if found is None:
                raise NotApplicable(f"record {record.record_id}: analytic (aware): no row of {layer!r} has its"
                                  " weight and bias entries both sent exactly")  # fmt: skip
            usable = db.abs() > self.eps * db.abs().max()
            if eb.mask is not None:
                usable &= eb.mask.reshape(-1)
            x, residual = found.features, found.residual
            known = x.shape[1] if found.known is None else int(found.known.sum())
            extra.update(rows_used=int(usable.sum()), rows=int(db.numel()), pixels_known=known,
                         method="bias ratio over the exact rows")  # fmt: skip
            if int(usable.sum()) < db.numel():  # a subset (Top-k's kept biases): which ones
                extra["row_indices"] = usable.nonzero().flatten().tolist()
        else:
            chain = relu_chain(model)
            if chain is None or chain[0] != layer:
                raise NotApplicable(f"record {record.record_id}: analytic (aware) at B = {batch} needs a plain"
                                  " Linear/ReLU stack (mlp) to solve through")  # fmt: skip
            layer_grads = {}
            for name in chain:
                pair = [exact.get(f"{name}.{p}") for p in ("weight", "bias")]
                if any(e is None or e.mask is not None for e in pair):
                    why = "; ".join(exact.excluded.get(f"{name}.{p}", "masked (Top-k)") for p in ("weight", "bias"))
                    raise NotApplicable(f"record {record.record_id}: analytic (aware) at B = {batch}: layer"
                                      f" {name!r} is not sent whole and exactly ({why})")  # fmt: skip
                layer_grads[name] = (grads[pair[0].index].cpu(), grads[pair[1].index].cpu())  # type: ignore[union-attr]
            cpu_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator,
                                                                      device=generator.device)))  # fmt: skip
            extra.update(rows_used=int(db.numel()), rows=int(db.numel()), layers=chain)
            nominal = max(ew.error, eb.error)  # a codec's error (LQ-SGD) blurs rows that should coincide
            x, residual, extra["method"] = self._batch_aware(model, chain, layer_grads, labels, cpu_gen, dW, db,
                                                             pure_rows=nominal < self.tol)  # fmt: skip
        if progress is not None:
            progress(1, 1, residual)
        return Reconstruction(
            inputs=x.reshape(batch, *shape).to(torch.float32).cpu(),
            labels=labels.to(torch.int64).cpu(),
            iterations=0,
            final_loss=residual,
            view="aware",
            label_strategy=strategy_name,
            observed="messages",
            public_state_used=tuple(sorted(record.public)),
            update=meta.local_training().describe(batch),
            extra=extra,
            budget=Budget(iterations=0, restarts=1, evaluations=0),
        )
