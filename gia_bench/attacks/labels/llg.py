"""LLG+ (Wainakh et al. 2022): label counts from the weight gradient's row sums, offset and impact simulated."""

from __future__ import annotations

import torch

from gia_bench.attacks.base import AttackError
from gia_bench.attacks.labels.base import LabelContext, LabelStrategy, head_inputs, register


@register("llg")
class LLG(LabelStrategy):
    """LLG+ (Wainakh et al. 2022, "User-Level Label Leakage from Gradients in FL", sec. 4).

    With non-negative features h entering the last layer, the sum of row c of the weight
    gradient, g_c = sum_j dL/dW_cj = 1/B sum_n (p_nc - y_nc) |h_n|_1, is negative for
    (almost) every class in the batch (the paper's property 1) and falls by about the same
    *impact* m for every image of class c, over a class-specific *offset* s_c (property 2)::

        g_c ≈ s_c + k_c m

    LLG+ estimates m and s_c by simulating the model on batches of one known class:
    m = mean over classes i of g_i / B for a batch of B images of class i, times (1 + 1/C)
    (the authors' code); s_c = mean g_c over batches of the other classes. The paper does so
    on auxiliary data; this attacker holds none and uses N(0, 1) dummy inputs (the authors'
    dummy-data variant). Plain LLG's impact from the observed gradient, (sum of the
    negative g_c) / B, fails when most classes are in the batch (their sum nears 0), the
    common case with 10 classes. Labels do not change a batch's forward pass, so every
    simulated batch is one forward pass and its row sums follow in closed form.
    Prediction (the paper's Algorithm 1): subtract s; every class with a negative g_c gets
    one image and m is subtracted from it; then the class with the smallest g_c gets the
    next image, m subtracted, until B images are labelled.

    Uses only the weight gradient (a head without bias too). The dummies' feature norms
    stand in for the real ones': without BatchNorm they can differ (then prefer
    ``bias-corrected`` or ``ilrg``).

    Args:
        dummies: dummy inputs per simulated batch (0: the record's batch size).
        repeats: simulated batches averaged (the authors average 10).
    """

    def __init__(self, dummies: int = 0, repeats: int = 10):
        if dummies < 0 or repeats < 1:
            raise AttackError(f"labels=llg needs dummies >= 0 and repeats >= 1, got {dummies}, {repeats}")
        self.dummies, self.repeats = dummies, repeats

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        device = ctx.weight_grad.device
        C, B = ctx.num_classes, ctx.batch_size
        n = self.dummies or B
        impacts, offsets = [], []
        for _ in range(self.repeats):
            x = torch.randn((n, *ctx.in_shape), generator=ctx.generator, device=device)
            h, p = head_inputs(ctx, x)
            sizes, p = h.sum(dim=1).double().cpu(), p.double().cpu()  # |h_n|_1: features are non-negative
            offsets.append((p * sizes[:, None]).sum(dim=0) / n)  # g_c of a batch without class c
            impacts.append(((p - 1.0) * sizes[:, None]).sum(dim=0).mean() / (n * n))  # g_i / n, a batch of class i
        m = float(torch.stack(impacts).mean()) * (1 + 1 / C)
        observed = ctx.weight_grad.detach().double().sum(dim=-1).cpu()
        g = observed - torch.stack(offsets).mean(dim=0)
        labels: list[int] = []
        for c in torch.nonzero(observed < 0).flatten().tolist()[:B]:
            labels.append(c)
            g[c] -= m
        while len(labels) < B:
            c = int(torch.argmin(g))
            labels.append(c)
            g[c] -= m
        return torch.tensor(sorted(labels), dtype=torch.int64)
