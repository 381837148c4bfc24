"""Counts from the bias gradient with the summed posteriors taken at the batch's mean embedding,
regressed from the last layer's gradient (``mean-embedding``), or shrunk towards the dummies' (``mean-embedding-eb``)."""

from __future__ import annotations

from typing import Literal

import torch

from gia_bench.attacks.base import AttackError
from gia_bench.attacks.labels.base import (
    LabelContext,
    LabelStrategy,
    counts_to_labels,
    head_inputs,
    register,
    round_counts,
)
from gia_bench.attacks.labels.dummies import SPECTRA, colour, white_fields


@register("mean-embedding")
class MeanEmbedding(LabelStrategy):
    """Counts from the bias gradient, the summed posteriors from the gradient's own mean embedding.

    With mean-reduced cross-entropy and a last layer z = W h + b, the counts are exactly
    (Geng et al. 2021, eq. 8)::

        k_c = S_c - B dL/db_c,        S_c = sum_n p_nc  (the batch's summed posteriors)

    so every count error is an error in S. ``bias-corrected`` and ``llg`` take S from N(0, 1)
    dummy inputs, whose mean embedding is not the batch's; on an untrained BatchNorm ConvNet
    (10 classes, batch 32) that misses S by up to 2.5 images, because the logits' shared
    per-class offsets W_c . mean(h) (std ~1) dwarf their spread within a batch (~0.35).
    This strategy takes the batch's mean embedding mu = mean_n h_n from the gradient instead.
    Writing h_n = mu + delta_n and D_c for the mean delta of class c's images::

        B dL/dW_c = sum_n (p_nc - y_nc) h_n = B dL/db_c mu - k_c D_c + sum_n p_nc delta_n

    1. mu by weighted least squares over the classes (the rows are proportional to the bias
       gradient up to the class deviations): mu = sum_c w_c db_c dW_c / sum_c w_c db_c^2,
       with w_c = 1 / (k_c + ``floor``) as D_c, a mean of k_c deviations, scales with
       1/sqrt(k_c) (an absent class's row is S_c mu up to second order, the best equation);
       the first pass uses w_c = 1 (iLRG's ĥ_c = dW_c / db_c of Ma et al. 2023, pooled over
       classes instead of taken per class, where a vanishing db_c makes it noise);
    2. S from embeddings mu + delta_n, the deviations delta_n those of ``repeats`` batches of
       B dummies (the spread within a batch makes S a softmax average, not the softmax of
       the mean): S_c = B mean_n softmax(W (mu + delta_n) + b)_c. The dummies are Gaussian
       noise with an amplitude spectrum 1/f^e (:func:`coloured_noise`); ``spectrum=auto``
       takes the e of :data:`SPECTRA` whose dummies' mean embedding lies nearest step 1's
       first pass (:meth:`dummy_embeddings`), so smooth data (photographs, upsampled digits)
       gets smooth dummies: white noise's embedding is not a photograph's, whose max-pooled
       features over correlated pixels are smaller;
    3. k = S - B dL/db, clipped at 0, gives step 1's weights; repeat 1-3 ``iterations`` times
       (a fixed point; it settles in a few);
    4. largest-remainder rounding to non-negative integers summing to B.

    The last layer's gradient leaves mu ambiguous along the class deviations (for any mu some
    D_c fit the equations); step 1's weighting is the least-deviation choice, not an
    identification, so it is good when the classes' mean embeddings differ little and
    there are many classes (equations). Measured (benchmarks/labels.py, README), batch 32,
    untrained, 10 classes: label-count accuracy 0.984 on ConvNet and 1.000 on ResNet-18
    (digits; the dummies' estimate 0.938 / 1.000), 0.96-0.97 on ConvNets on photos, whose
    classes (patches of one photo each) differ more (0.90 from dummies). With 2 classes the
    regression has one equation (it is iLRG's ratio) and ``bias-corrected`` is better (faces:
    0.93 against 0.85). Trained models, whose posteriors differ image by image far more than
    dummies' do, are outside what step 2 models. Needs the head's bias; assumes no sign of the features. The
    attacker uses no data: the dummies only supply the spread of embeddings around the mean.

    Args:
        repeats: dummy batches of the record's batch size whose deviations are pooled.
        iterations: fixed-point passes of steps 1-3.
        floor: added to the counts in the weights w_c = 1 / (k_c + floor).
        spectrum: the dummies' spectral exponent e (0: white; 1: natural photographs'), or
            ``auto`` to choose it per record from the gradient.
    """

    def __init__(
        self,
        repeats: int = 4,
        iterations: int = 20,
        floor: float = 0.5,
        spectrum: float | Literal["auto"] = "auto",
    ):
        if repeats < 1 or iterations < 1 or not floor > 0:
            raise AttackError(
                f"labels=mean-embedding needs repeats >= 1, iterations >= 1 and floor > 0, "
                f"got {repeats}, {iterations}, {floor}"
            )
        if spectrum != "auto" and not 0 <= spectrum <= 8:
            raise AttackError(f"labels=mean-embedding needs spectrum=auto or an exponent in [0, 8], got {spectrum}")
        self.repeats, self.iterations, self.floor, self.spectrum = repeats, iterations, floor, spectrum

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        counts = self.counts(ctx)
        return counts_to_labels(round_counts(counts, ctx.batch_size))

    def dummy_embeddings(self, ctx: LabelContext, dw: torch.Tensor, db: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        """(spectrum exponent, ``repeats`` dummy batches' head inputs, each (B, d) float64 on the CPU).

        With ``spectrum=auto`` one batch per exponent of :data:`SPECTRA` is drawn and the exponent
        whose batch's mean embedding lies nearest the unweighted regression (step 1's first pass)
        is kept, distance measured in the regression's own noise per coordinate
        (:func:`_regression_noise`). All exponents colour the same white fields, so they are
        compared on one draw; that batch is reused as the first of the chosen exponent's.
        """
        B, device = ctx.batch_size, ctx.weight_grad.device

        def embed(exponent: float, white: torch.Tensor | None = None) -> torch.Tensor:
            # batches of B: in train mode BatchNorm normalises over the batch, as it did the record's
            if white is None:
                white = white_fields(B, ctx.in_shape, ctx.generator, device)
            return head_inputs(ctx, colour(white, exponent))[0].double().cpu()

        if self.spectrum != "auto":
            return float(self.spectrum), [embed(float(self.spectrum)) for _ in range(self.repeats)]
        a = db / (db * db).sum().clamp_min(1e-300)
        regressed = a @ dw
        noise = _regression_noise(dw, db, a, regressed)
        noise = noise.clamp_min(float(noise.mean()) * 1e-3 + 1e-300)  # coordinates dead in the whole batch
        white = white_fields(B, ctx.in_shape, ctx.generator, device)
        first = {e: embed(e, white) for e in SPECTRA}
        best = min(SPECTRA, key=lambda e: float(((regressed - first[e].mean(dim=0)) ** 2 / noise).mean()))
        return best, [first[best]] + [embed(best) for _ in range(self.repeats - 1)]

    def counts(self, ctx: LabelContext) -> torch.Tensor:
        """Real-valued counts k = S - B dL/db (before rounding), float64."""
        if ctx.bias_grad is None:
            raise AttackError("labels=mean-embedding needs the last layer's bias gradient; this model's head has no bias")
        B = ctx.batch_size
        dw = ctx.weight_grad.detach().double().cpu().flatten(1)
        db = ctx.bias_grad.detach().double().cpu()
        head = ctx.head.module
        weight, bias = head.weight.detach().double().cpu(), head.bias.detach().double().cpu()
        _, embeddings = self.dummy_embeddings(ctx, dw, db)
        means = [h.mean(dim=0) for h in embeddings]
        delta = torch.cat([h - m for h, m in zip(embeddings, means)])
        dummy_mean = torch.stack(means).mean(dim=0)

        def mean_embedding(w: torch.Tensor) -> torch.Tensor:
            a = w * db / (w * db * db).sum().clamp_min(1e-300)  # the regression's weight on each class's row
            return self._combine(dw, db, a, a @ dw, dummy_mean)

        def summed_posteriors(mu: torch.Tensor) -> torch.Tensor:
            return B * torch.softmax((delta + mu) @ weight.T + bias, dim=-1).mean(dim=0)

        # 1.-3. from equal weights, then the fixed point of the count-weighted regression
        mu = mean_embedding(torch.ones_like(db))
        counts = summed_posteriors(mu) - B * db
        for _ in range(self.iterations):
            mu = mean_embedding(1.0 / (counts.clamp_min(0) + self.floor))
            new = summed_posteriors(mu) - B * db
            if float((new - counts).abs().max()) < 1e-6:
                counts = new
                break
            counts = new
        return counts

    def _combine(
        self, dw: torch.Tensor, db: torch.Tensor, a: torch.Tensor, regressed: torch.Tensor, dummy_mean: torch.Tensor
    ) -> torch.Tensor:
        """The mean embedding used for S (``regressed = a @ dw``): here step 1's regression as it is."""
        return regressed


def _regression_noise(dw: torch.Tensor, db: torch.Tensor, a: torch.Tensor, regressed: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the variance of the regressed mean embedding ``regressed = a @ dw``.

    From its residuals across classes r_cf = dW_cf - dL/db_c mu_f^reg (sandwich estimate,
    C / (C - 1) for the fitted mean): s_f^2 = C / (C - 1) sum_c a_c^2 r_cf^2; the 1/B of dW and
    db cancels in r a.
    """
    C = db.numel()
    residual = dw - db[:, None] * regressed[None, :]
    return (a[:, None] ** 2 * residual**2).sum(dim=0) * C / max(C - 1, 1)


def posterior_rounding(
    counts: torch.Tensor, summed_posteriors: torch.Tensor, batch_size: int, minimum: torch.Tensor | None = None
) -> torch.Tensor:
    """Non-negative integer counts summing to ``batch_size`` nearest to ``counts`` in the metric of their errors.

    The counts k = S - B dL/db are exact up to the estimate of the summed posteriors S
    (Geng et al. 2021, eq. 8). An error t in the batch's mean logits moves S by B J t, with
    J = diag(p̄) - p̄ p̄^T the softmax Jacobian, so class c's count error is about
    S_c (t_c - p̄ . t): it scales with S_c. For a logit error of the same size in every class
    the most likely integer vector minimises sum_c ((k_c - counts_c) / S_c)^2, not the
    unweighted distance that :func:`round_counts` minimises. The objective is separable and
    convex, so greedy marginal allocation (one image at a time to the class whose term falls
    most) finds its minimum under sum k = B, k >= 0 exactly; started from ``minimum`` (per class,
    integers) it finds it under k >= minimum. If the minimum sums to more than B, the first B
    classes with a minimum, by index, keep theirs.
    """
    x = counts.detach().double().cpu()
    scale = summed_posteriors.detach().double().cpu().clamp_min(1e-6) ** 2
    k = torch.zeros_like(x) if minimum is None else minimum.detach().double().cpu().clamp_min(0).round()
    excess = int(k.sum()) - batch_size
    for c in reversed(range(len(k))):
        if excess <= 0:
            break
        drop = min(excess, int(k[c]))
        k[c] -= drop
        excess -= drop
    for _ in range(batch_size - int(k.sum())):
        gain = ((k - x) ** 2 - (k + 1 - x) ** 2) / scale
        k[int(gain.argmax())] += 1
    return k.to(torch.int64)


@register("mean-embedding-eb")
class MeanEmbeddingEB(MeanEmbedding):
    """``mean-embedding`` with the regressed mean embedding shrunk towards the dummies' (empirical Bayes).

    ``mean-embedding``'s step 1 regresses mu coordinate by coordinate from
    B dL/dW_c = B dL/db_c mu - k_c D_c + ...; its error is the weighted class deviations
    -sum_c a_c k_c D_c / B (a_c = w_c db_c / sum_j w_j db_j^2), large when the classes' mean
    embeddings differ (photos: patches of one photograph per class). The dummies' mean
    embedding mu_0 (``bias-corrected``'s estimate) errs independently of it. This strategy
    combines the two as a James-Stein / empirical-Bayes estimate (Efron & Morris 1973) over
    the d coordinates f of the embedding, with mu_f ~ N(mu_0f, tau^2) a priori and the
    regression mu_f^reg ~ N(mu_f, s_f^2):

    1. s_f^2, the regression's variance per coordinate, from its residuals across classes
       r_cf = B dW_cf - B db_c mu_f^reg (sandwich estimate, C / (C - 1) for the fitted mean):
       s_f^2 = C / (C - 1) sum_c a_c^2 r_cf^2;
    2. tau^2 = max(0, mean_f (mu_f^reg - mu_0f)^2 - mean_f s_f^2) (method of moments);
    3. mu = mu_0 + lambda (mu^reg - mu_0), lambda = tau^2 / (tau^2 + mean_f s_f^2):
       all coordinates matter alike, as the head's random rows W_c weigh them alike;
    4. ``mean-embedding``'s steps 2-3 with this mu (the fixed point over the weights w_c);
    5. rounding in the metric of the count errors (:func:`posterior_rounding`): an error in
       the mean logits moves class c's count in proportion to its summed posterior S_c; a
       class with a negative bias gradient keeps at least one image (B dL/db_c = S_c - k_c < 0
       needs k_c > S_c > 0), as in ``bias-corrected``.

    lambda is estimated from each record: where the dummies' mean is the better estimate the
    result leans on it, where the regression is (many classes, small class deviations) on the
    regression. Since photos' classes sit far apart and the last layer's gradient leaves the
    batch's mean embedding unidentified up to a shift against the class means, the estimate
    leans on the dummies there, which is why their spectrum (``spectrum=auto``) matters.
    Designed on seeds 1 and 100 of ``benchmarks/labels.py`` (ConvNet widths 16 and 64, digits
    and photos), not on its evaluation seed 0. Measured there (README, batch 32, untrained,
    10 classes): 0.997 on digits ConvNet, 1.000 on digits and photos ResNet-18, 0.991 / 0.997
    on photos ConvNet widths 64 / 16 (white dummies: 0.988, 1.000, 0.966 / 0.966). Same
    arguments as ``mean-embedding``; :func:`resolve` makes it the default for a batch.
    """

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        counts = self.counts(ctx)
        db = ctx.bias_grad.detach().double().cpu()
        summed = counts + ctx.batch_size * db  # S = k + B dL/db
        # B dL/db_c = S_c - k_c < 0 needs k_c > S_c > 0: such a class has at least one image
        return counts_to_labels(posterior_rounding(counts, summed, ctx.batch_size, minimum=(db < 0).double()))

    def _combine(
        self, dw: torch.Tensor, db: torch.Tensor, a: torch.Tensor, regressed: torch.Tensor, dummy_mean: torch.Tensor
    ) -> torch.Tensor:
        noise = _regression_noise(dw, db, a, regressed)  # 1.
        # 2. the prior's variance, by moments over the coordinates
        tau2 = ((regressed - dummy_mean) ** 2 - noise).mean().clamp_min(0.0)
        # 3. shrink
        lam = tau2 / (tau2 + noise.mean()).clamp_min(1e-300)
        return dummy_mean + lam * (regressed - dummy_mean)
