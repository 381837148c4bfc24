"""A fully connected layer's inputs from its exact weight and bias gradients.

For ``z = W h + b`` and the mean cross-entropy over a batch of B examples,

    dL/dW = 1/B Delta^T H,    dL/db = 1/B Delta^T 1,

with ``H`` (B x d) the layer's inputs and ``Delta`` (B x K) the loss gradients at its outputs.

* B = 1: every row i gives ``h = dL/dW_i / dL/db_i`` (Phong et al. 2017); all rows
  together, in least squares: ``h = sum_i db_i dW_i / sum_i db_i^2``. Where only some
  entries are known (Top-k), feature j uses the rows whose ``dW_ij`` and ``db_i`` were both
  sent, and a feature no such row covers stays unknown.
* B > 1, the classifier layer (iLRG-style, Ma et al. ICLR 2023): ``Delta = softmax(W H + b) - Y``
  with labels Y from a label strategy. ``dL/dW = U S V^T`` has rank B, so ``H = A V_B^T`` for
  a B x B matrix A (H lies in the row space, Delta^T having full column rank); A solves the
  K (B + 1) equations ``Delta(A)^T A / B = U_B S_B`` and ``Delta(A)^T 1 / B = dL/db`` by
  Levenberg-Marquardt from the start ``Delta = 1/K - Y`` (an untrained network's posteriors)
  and a few seeded ones; the lowest residual wins. Repeated labels need nothing special:
  the rows of A follow the label list, whose order is arbitrary.

The residual of the fit is what the attacker can estimate of the features' error without
the truth: ~1e-7 when the gradients are exact, the quantization's share when they are not.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """Recovered inputs of one layer: ``H`` (B x d), which entries are known, and the fit's residual."""

    layer: str
    features: torch.Tensor  # (B, d) float64
    known: torch.Tensor | None  # (d,) bool: features recovered (None: all)
    residual: float  # relative residual of the gradient fit
    method: str
    #: s_1 / s_B of dL/dW: how much an error in the gradient can grow in the features (1 at B = 1)
    condition: float = 1.0

    def error_estimate(self, nominal: float) -> float:
        """What the attacker can say of the features' relative error without the truth: the larger of
        the fit's residual and the gradient's nominal error (a codec's), times the condition number.
        A first-order bound, not a measurement: LQ-SGD's decoded rank-1 matrix fits a ratio exactly
        (residual ~1e-8) although its factors carry the codec's 0.7 %."""
        return min(1.0, max(self.residual, nominal) * self.condition)

    def to_json(self) -> dict[str, object]:
        known = self.features.shape[1] if self.known is None else int(self.known.sum())
        return {"layer": self.layer, "features": int(self.features.shape[1]), "known": known,
                "fit_residual": self.residual, "condition": self.condition, "method": self.method}  # fmt: skip


def single_input(
    layer: str, dW: torch.Tensor, db: torch.Tensor, mask_W: torch.Tensor | None, mask_b: torch.Tensor | None,
    eps: float = 1e-6,
) -> LayerInputs | None:
    """B = 1: ``h`` from the bias ratio over every usable row (None: no usable row)."""
    dW, db = dW.double(), db.double()
    rows = db.abs() > eps * db.abs().max() if bool((db != 0).any()) else torch.zeros_like(db, dtype=torch.bool)
    if mask_b is not None:
        rows &= mask_b
    use = rows[:, None].expand_as(dW).clone()
    if mask_W is not None:
        use &= mask_W
    if not bool(use.any()):
        return None
    w = torch.where(use, db[:, None], torch.zeros_like(dW))  # db_i where (i, j) is usable
    den = w.pow(2).sum(0)
    known = den > 0
    h = torch.where(known, (w * dW).sum(0) / torch.where(known, den, torch.ones_like(den)), torch.zeros_like(den))
    fit = torch.where(use, dW - db[:, None] * h[None, :], torch.zeros_like(dW))
    scale = torch.where(use, dW, torch.zeros_like(dW)).norm().clamp_min(1e-300)
    residual = float(fit.norm() / scale)
    return LayerInputs(layer, h[None, :], None if bool(known.all()) else known, residual,
                       "bias ratio (least squares over rows)")  # fmt: skip


def batch_inputs(
    layer: str,
    dW: torch.Tensor,
    db: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    starts: int = 8,
    steps: int = 200,
) -> LayerInputs:
    """B > 1 at the classifier: solve ``dL/dW = Delta^T H / B`` with ``Delta = softmax(W H + b) - Y``."""
    G, g = dW.double().cpu(), db.double().cpu()
    W, b = weight.double().cpu(), bias.double().cpu()
    B, K = int(labels.numel()), int(G.shape[0])
    Y = F.one_hot(labels.cpu().to(torch.int64), K).double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    T = U[:, :B] * S[:B]  # K x B: G's rank-B part in the basis V_B
    V = Vh[:B].T  # d x B
    WV = W @ V  # K x B
    t_scale, g_scale = T.norm().clamp_min(1e-300), g.norm().clamp_min(1e-300)

    def residual(a: torch.Tensor) -> torch.Tensor:
        A = a.reshape(B, B)
        D = torch.softmax(A @ WV.T + b, dim=1) - Y
        return torch.cat([((D.T @ A) / B - T).reshape(-1) / t_scale, (D.sum(0) / B - g) / g_scale])

    def from_delta(D: torch.Tensor) -> torch.Tensor:
        return (B * torch.linalg.lstsq(D.T, T).solution).reshape(-1)

    inits = [from_delta(torch.full((B, K), 1.0 / K, dtype=torch.float64) - Y)]
    for _ in range(starts - 1):
        p = torch.softmax(torch.randn(B, K, generator=generator, dtype=torch.float64), dim=1)
        inits.append(from_delta(p - Y))
    best, best_r = inits[0], float("inf")
    for a in inits:
        a, r = _levenberg_marquardt(residual, a, steps)
        if r < best_r:
            best, best_r = a, r
    H = best.reshape(B, B) @ V.T
    # the relative residual of dL/dW itself (the bias part says how well Delta fits)
    D = torch.softmax(H @ W.T + b, dim=1) - Y
    fit = float((D.T @ H / B - G).norm() / G.norm().clamp_min(1e-300))
    condition = float(S[0] / S[B - 1].clamp_min(1e-300))
    return LayerInputs(layer, H, None, max(fit, float(((D.sum(0) / B - g).norm() / g_scale))),
                       "rank-B solve of dW = Delta^T H / B (iLRG-style)", condition)  # fmt: skip


def _levenberg_marquardt(fn, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Minimise ||fn(x)||^2 (few unknowns): damped Gauss-Newton with the Jacobian from autograd."""
    lam = 1e-3
    r = fn(x)
    cost = float(r.pow(2).sum())
    for _ in range(steps):
        J = torch.func.jacfwd(fn)(x)  # few unknowns, many residuals: forward mode
        JtJ, Jtr = J.T @ J, J.T @ r
        improved = False
        for _ in range(10):
            step = torch.linalg.solve(JtJ + lam * torch.diag(JtJ.diagonal().clamp_min(1e-12)), Jtr)
            cand = x - step
            rc = fn(cand)
            cc = float(rc.pow(2).sum())
            if cc < cost:
                x, r, cost, lam, improved = cand, rc, cc, max(lam / 3, 1e-12), True
                break
            lam *= 4
        if not improved or cost < 1e-30:
            break
    return x, cost**0.5


def relu_chain(model: nn.Module) -> list[str] | None:
    """Names of the Linear layers of a plain ``Linear, ReLU, ..., Linear`` stack (``mlp``), else None.

    Only there does a layer's output gradient follow from the next one's by
    ``D_k = (D_{k+1} W_{k+1}) * [H_{k+1} > 0]`` with nothing unknown in between.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    leaves = [(n, m) for n, m in leaves if not isinstance(m, (nn.Flatten, nn.Identity))]
    if not leaves or not all(isinstance(m, nn.Linear) for _, m in leaves[::2]):
        return None
    if len(leaves) % 2 == 0 or not all(isinstance(m, nn.ReLU) for _, m in leaves[1::2]):
        return None
    return [n for n, _ in leaves[::2]]


def chain_inputs(
    model: nn.Module,
    names: list[str],
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor,
    generator: torch.Generator,
    active_tol: float = 1e-3,
) -> tuple[torch.Tensor, float]:
    """B > 1 through a ReLU stack: the classifier's inputs by the rank-B solve, then each earlier layer's
    inputs from its exact gradient ``dW_k = D_k^T H_k / B`` once ``D_k`` is known from the layer above.

    ``grads`` maps every layer of ``names`` (first to last) to its (dW, db). Returns the first layer's
    inputs (B x d), refined on the first layer's own equations, and that fit's relative residual.
    """
    modules = dict(model.named_modules())
    B = int(labels.numel())
    head = modules[names[-1]]
    dW, db = grads[names[-1]]
    top = batch_inputs(names[-1], dW, db, head.weight.detach(), head.bias.detach(), labels, generator)
    H = top.features
    K = head.out_features
    Y = F.one_hot(labels.cpu().to(torch.int64), K).double()
    D = torch.softmax(H @ head.weight.detach().double().cpu().T + head.bias.detach().double().cpu(), dim=1) - Y
    for below, above in zip(reversed(names[:-1]), reversed(names[1:])):
        W_above = modules[above].weight.detach().double().cpu()
        # the ReLU between them passes the gradient where its output is positive; a solved H carries
        # the solve's rounding (~1e-6 relative) where the truth is exactly 0, so "positive" is above that
        active = H > active_tol * H.abs().amax(dim=1, keepdim=True)
        D = (D @ W_above) * active
        G = grads[below][0].double().cpu()
        H = torch.linalg.lstsq(D.T, B * G).solution  # (B, d): dW = D^T H / B
    # Refine on the first layer's own equations: its inputs X = A V^T (V: dW_1's top-B right singular
    # vectors) give every later quantity by a forward pass (pre-activations for the ReLU masks,
    # posteriors for Delta), so dW_1 = D_1(X)^T X / B and db_1 = D_1(X)^T 1 / B are (B + 1) n equations
    # in the B^2 unknowns of A: Levenberg-Marquardt from the chain's answer, whose masks were thresholds
    # on a solved H (mlp, B = 4, PowerSGD rank 4: 36-75 dB before, 138-147 dB after, 3 batches). With one
    # label for the whole batch the classifier's solve is ill-conditioned (near-identical Delta rows)
    # and the start can be too far off: 29-56 dB on such a batch.
    G1, g1 = (v.double().cpu() for v in grads[names[0]])
    params = [(modules[n].weight.detach().double().cpu(), modules[n].bias.detach().double().cpu()) for n in names]
    Vh1 = torch.linalg.svd(G1, full_matrices=False).Vh
    V1 = Vh1[:B].T
    T1 = G1 @ V1
    t_scale, g_scale = T1.norm().clamp_min(1e-300), g1.norm().clamp_min(1e-300)

    def first_layer_residual(a: torch.Tensor) -> torch.Tensor:
        X = a.reshape(B, B) @ V1.T
        acts, masks = X, []
        for W, b in params[:-1]:
            z = acts @ W.T + b
            masks.append((z > 0).to(z.dtype))
            acts = z * masks[-1]
        D = torch.softmax(acts @ params[-1][0].T + params[-1][1], dim=1) - Y
        for (W, _), mask in zip(reversed(params[1:]), reversed(masks)):
            D = (D @ W) * mask
        return torch.cat([((D.T @ X / B) @ V1 - T1).reshape(-1) / t_scale, (D.sum(0) / B - g1) / g_scale])

    a, cost = _levenberg_marquardt(first_layer_residual, (H @ V1).reshape(-1), steps=50)
    return a.reshape(B, B) @ V1.T, cost
