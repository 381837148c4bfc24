"""Label strategies: the batch's labels from the last layer's gradient, or optimised jointly.

Labels are always inferred from what the server observes, never read from the
truth. Select one with ``labels=`` in an attack spec; ``auto`` (the default) is
``idlg`` for one image and ``mean-embedding-eb`` for a batch (``bias-corrected`` where the
head has no bias or there are only 2 classes; :func:`resolve`).

* ``idlg`` (Zhao et al. 2020, sec. 3.1): for B = 1, softmax cross-entropy and
  non-negative features h into the last linear layer, dL/dW_c = (p_c - y_c) h, so
  only the true class's row is non-positive: label = argmin_c sum_j dL/dW_cj.
* ``yin`` (Yin et al. 2021, GradInversion sec. 3.2): the B classes whose weight
  rows have the most negative minimum; assumes B distinct labels.
* ``bias-corrected`` (Geng et al. 2021, "Towards general deep leakage", eq. 8;
  breaching's ``bias-corrected``): with mean-reduced CE, dL/db_c = mean_n p_nc - n_c / B,
  so n_c = B (p̂_c - dL/db_c), with p̂ the model's mean softmax on dummy inputs.
  Without a bias, dL/db_c is estimated as sum_j dL/dW_cj / Ō with Ō the mean
  feature sum on the same dummy inputs. Every class with a negative entry gets at
  least one image; the rest go by largest remaining count. Labels may repeat.
* ``ilrg`` (Ma et al., ICLR 2023, "Instance-wise Batch Label Restoration via
  Gradients in Federated Learning"): class-wise mean embeddings from the last layer,
  ĥ_c = dL/dW_c / dL/db_c, their posteriors p̂_c = softmax(W ĥ_c + b), then the counts k
  from the bias-gradient system  B dL/db_c = sum_j k_j p̂_jc - k_c,  sum_j k_j = B,
  solved by least squares (Moore-Penrose pseudoinverse) and rounded to integers.
* ``llg`` (Wainakh et al. 2022, "User-Level Label Leakage from Gradients in Federated
  Learning", LLG+): per-class sums of the last layer's weight gradient, corrected by an
  offset s_c and divided by the impact m of one instance, both estimated by simulating
  the model (the paper's auxiliary-data estimate, here on N(0, 1) dummy inputs as in the
  authors' dummy-data variant, since the attacker holds no data).
* ``mean-embedding``: ``bias-corrected``'s counts n_c = sum_n p_nc - B dL/db_c with the
  summed posteriors taken at the batch's mean embedding regressed from the last layer's own
  gradient (dL/dW_c ≈ dL/db_c mu, weighted by the counts, iterated), not at dummy inputs'.
* ``mean-embedding-eb``: ``mean-embedding`` with the regressed mean embedding shrunk towards
  the dummies' by an empirical-Bayes weight estimated from the record, and the counts
  rounded in the metric of their errors (a logit error moves class c's count by ~S_c).
  Both take their dummies as Gaussian noise of the spectrum 1/f^e whose mean embedding the
  gradient's regression favours (``spectrum=auto``), not white noise.
* ``joint`` (Zhu et al. 2019): no inference; the attack optimises soft labels.

Every strategy takes the observed gradient per parameter (:class:`LabelContext`), so it
can be fed the naive view (the decoded gradient) or another estimate of the gradient.
For a FedAvg record (K local steps, :mod:`gia_bench.fedavg`) the observed update is the
sum of K gradients; :func:`infer_labels` divides it by K so the strategies see one
average gradient (each example takes part equally often when K * local_batch is a
multiple of the batch; otherwise approximately).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from gia_bench.attacks.base import AttackError
from gia_bench.receiver import decode_record
from gia_bench.registry import Registry

LABELS: Registry[LabelStrategy] = Registry(
    "label strategy", entry_point_group="gia_bench.label_strategies", base=lambda: LabelStrategy
)
register = LABELS.register


@dataclasses.dataclass(frozen=True)
class Head:
    """The last linear layer (the classifier) and where its gradients sit in the record's parameter order."""

    module: nn.Linear
    weight_index: int
    bias_index: int | None


def find_head(model: nn.Module, param_names: tuple[str, ...] | list[str], num_classes: int) -> Head:
    """The last ``nn.Linear`` with ``num_classes`` outputs, and the indices of its weight and bias gradients."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = (name, module)
    if found is None:
        raise AttackError(f"model {type(model).__name__} has no final linear layer with {num_classes} outputs")
    name, module = found
    prefix = f"{name}." if name else ""
    names = list(param_names)
    bias_index = names.index(prefix + "bias") if module.bias is not None else None
    return Head(module, names.index(prefix + "weight"), bias_index)


@dataclasses.dataclass(frozen=True)
class LabelContext:
    """What a label strategy may use: the observed gradient and the model, nothing of the truth."""

    grads: list[torch.Tensor]  # observed (decoded) gradient, parameter order
    head: Head
    batch_size: int
    num_classes: int
    model: nn.Module  # stateless: forward passes do not change its buffers
    in_shape: tuple[int, int, int]
    generator: torch.Generator

    @property
    def weight_grad(self) -> torch.Tensor:
        return self.grads[self.head.weight_index]

    @property
    def bias_grad(self) -> torch.Tensor | None:
        return None if self.head.bias_index is None else self.grads[self.head.bias_index]


class LabelStrategy:
    """Infer the (B,) labels of a record, or return None when the attack should optimise them."""

    joint: ClassVar[bool] = False

    def infer(self, ctx: LabelContext) -> torch.Tensor | None:
        raise NotImplementedError


@register("idlg")
class IDLG(LabelStrategy):
    """iDLG (Zhao et al. 2020): argmin of the last layer's weight-gradient row sums; one image only."""

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        if ctx.batch_size != 1:
            raise AttackError(f"labels=idlg needs batch size 1, the record has {ctx.batch_size}; use bias-corrected")
        return ctx.weight_grad.sum(dim=-1).argmin().reshape(1).to(torch.int64).cpu()


@register("yin")
class Yin(LabelStrategy):
    """GradInversion (Yin et al. 2021): the B rows with the most negative minimum; distinct labels."""

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        if ctx.batch_size > ctx.num_classes:
            raise AttackError(f"labels=yin assumes distinct labels: batch {ctx.batch_size} > {ctx.num_classes} classes")
        order = ctx.weight_grad.min(dim=-1).values.argsort()
        return order[: ctx.batch_size].sort().values.to(torch.int64).cpu()


@register("bias-corrected")
class BiasCorrected(LabelStrategy):
    """Counts per class from the bias gradient, corrected by the model's mean softmax (Geng et al. 2021).

    Args:
        dummies: number of N(0, 1) dummy inputs used to estimate the mean softmax (and feature sum).
    """

    def __init__(self, dummies: int = 32):
        self.dummies = dummies

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        device = ctx.weight_grad.device
        features: list[torch.Tensor] = []
        hook = ctx.head.module.register_forward_hook(lambda m, args, out: features.append(args[0].detach()))
        try:
            x = torch.randn((self.dummies, *ctx.in_shape), generator=ctx.generator, device=device)
            with torch.no_grad():
                p_hat = torch.softmax(ctx.model(x), dim=-1).mean(dim=0)
        finally:
            hook.remove()
        bias = ctx.bias_grad
        if bias is None:
            mean_feature_sum = features[0].flatten(1).sum(dim=1).mean().clamp_min(1e-12)
            bias = ctx.weight_grad.sum(dim=-1) / mean_feature_sum
        counts = ctx.batch_size * (p_hat - bias)
        # dL/db_c < 0 only if some image has label c (p < 1): each such class gets one image first.
        assigned = torch.zeros(ctx.num_classes, device=device)
        labels: list[int] = []
        for c in torch.argsort(bias).tolist():
            if bias[c] < 0 and len(labels) < ctx.batch_size:
                labels.append(c)
                assigned[c] += 1
        while len(labels) < ctx.batch_size:
            c = int((counts - assigned).argmax())
            labels.append(c)
            assigned[c] += 1
        return torch.tensor(sorted(labels), dtype=torch.int64)


SPECTRA = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
"""Exponents of the dummies' amplitude spectrum 1/f^e that ``spectrum=auto`` chooses among (0: white)."""


def coloured_noise(
    n: int,
    shape: tuple[int, int, int],
    exponent: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    chroma: float = 0.3,
) -> torch.Tensor:
    """``n`` Gaussian images of ``shape`` whose amplitude spectrum falls as 1/f^``exponent``.

    Exponent 0 is white noise; natural photographs fall as about 1/f (Field 1987) and
    smaller or upsampled images faster. Colour images are one shared (luminance) field
    plus ``chroma`` times an independent field per channel, since a photograph's channels are
    strongly correlated. Each channel is standardised over the batch (zero mean, unit
    variance), as data sets normalise theirs, so only the spatial and colour structure differs
    from N(0, 1) dummies.
    """
    return colour(white_fields(n, shape, generator, device), exponent, chroma)


def white_fields(
    n: int, shape: tuple[int, int, int], generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The N(0, 1) fields that :func:`colour` turns into ``n`` images of ``shape``: one per
    channel for gray images, a luminance field plus one per channel for colour ones."""
    c, h, w = shape
    return torch.randn((n, c if c == 1 else c + 1, h, w), generator=generator, device=device)


def colour(white: torch.Tensor, exponent: float, chroma: float = 0.3) -> torch.Tensor:
    """:func:`coloured_noise` from its white fields ``white`` (n, 1 or 1 + channels, h, w).

    The same fields coloured with different exponents give dummies that differ only by the
    spectrum (common random numbers), so ``spectrum=auto`` compares exponents, not draws.
    """
    h, w = white.shape[-2:]
    if exponent != 0:
        freq = torch.fft.fftfreq(h, device=white.device)[:, None] ** 2 + torch.fft.fftfreq(w, device=white.device) ** 2
        f = freq.sqrt()
        f[0, 0] = 1.0 / max(h, w)  # the mean: as strong as the lowest frequency
        white = torch.fft.ifft2(torch.fft.fft2(white) / f**exponent).real
    x = white if white.shape[1] == 1 else white[:, :1] + chroma * white[:, 1:]
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)


def _head_inputs(ctx: LabelContext, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features entering the head, softmax outputs) of the model on inputs ``x``, without gradients."""
    features: list[torch.Tensor] = []
    hook = ctx.head.module.register_forward_hook(lambda m, args, out: features.append(args[0].detach()))
    try:
        with torch.no_grad():
            probs = torch.softmax(ctx.model(x), dim=-1)
    finally:
        hook.remove()
    return features[0].flatten(1), probs


def round_counts(counts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Non-negative integer counts summing to ``batch_size`` nearest to real-valued ``counts``.

    Largest-remainder rounding of the clipped counts (the authors of iLRG round, then move
    the surplus or deficit by the rounding residuals; this is the same idea, optimal in L1).
    """
    c = counts.detach().double().clamp_min(0).cpu()
    base = c.floor()
    missing = batch_size - int(base.sum())
    if missing > 0:
        base[torch.argsort(c - base, descending=True)[:missing]] += 1
    while missing < 0:  # clipped counts summing to more than B: take from the largest remainders' opposites
        i = int(torch.argmin(torch.where(base > 0, c - base, torch.full_like(c, np.inf))))
        base[i] -= 1
        missing += 1
    return base.to(torch.int64)


def counts_to_labels(counts: torch.Tensor) -> torch.Tensor:
    """Sorted labels from per-class counts."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.cpu().to(torch.int64))


@register("ilrg")
class ILRG(LabelStrategy):
    """iLRG (Ma et al., ICLR 2023): instance-wise label counts from the last layer's gradients.

    With mean-reduced cross-entropy and a last layer z = W h + b, for every class c::

        dL/dW_c = 1/B sum_n (p_nc - y_nc) h_n,    dL/db_c = 1/B sum_n (p_nc - y_nc)

    1. the class-wise embedding ĥ_c = (dL/dW_c) / (dL/db_c), a weighted mean of the
       embeddings dominated by class c's images (the authors' ``get_emb``);
    2. its posterior p̂_c = softmax(W ĥ_c + b), taken as the mean posterior of class c's
       images (valid for untrained models: small logits, near-linear softmax);
    3. the counts k solve  B dL/db_c = sum_j k_j p̂_jc - k_c  (c = 1..C) with  sum_j k_j = B,
       in least squares with the Moore-Penrose pseudoinverse (the authors' ``iLRG``);
    4. negative counts are clipped and the rest rounded to integers summing to B.

    One safeguard the paper does not have (``min_signal``): ĥ_c is a ratio whose
    denominator B dL/db_c = sum_n p_nc - k_c vanishes when a class's count is close to its
    summed posterior (frequent with few classes: 10 classes, batch 32). Such a ratio is
    noise, and its posterior (weighted by k_c in step 3) spoils every equation. Classes
    with |B dL/db_c| < ``min_signal`` (in images) take the mean posterior of the others
    instead; ``min_signal=0`` is the authors' method. Measured on untrained ConvNets
    (digits, batch 32): 0.83 label-count accuracy without, 0.95 with ``min_signal=1``.

    Needs the head's bias. The paper reports > 96% count accuracy on untrained models
    (many classes), lower on trained ones (the posterior estimate of step 2 degrades).

    Args:
        min_signal: |B dL/db_c| below which class c's embedding is not trusted (0: never).
    """

    def __init__(self, min_signal: float = 1.0):
        if not min_signal >= 0:
            raise AttackError(f"labels=ilrg needs min_signal >= 0, got {min_signal}")
        self.min_signal = min_signal

    def infer(self, ctx: LabelContext) -> torch.Tensor:
        if ctx.bias_grad is None:
            raise AttackError("labels=ilrg needs the last layer's bias gradient; this model's head has no bias")
        dw = ctx.weight_grad.detach().double().cpu()
        db = ctx.bias_grad.detach().double().cpu()
        head = ctx.head.module
        weight, bias = head.weight.detach().double().cpu(), head.bias.detach().double().cpu()
        C, B = ctx.num_classes, ctx.batch_size
        # 1. class-wise embeddings (a zero bias gradient gives no ratio; step 2 replaces it)
        safe = torch.where(db != 0, db, torch.ones_like(db))
        emb = dw / safe[:, None]
        # 2. their posteriors: row c is p̂_c
        probs = torch.softmax(emb @ weight.T + bias, dim=-1)
        reliable = ((B * db).abs() >= self.min_signal) & (db != 0)
        if bool(reliable.any()) and not bool(reliable.all()):
            probs[~reliable] = probs[reliable].mean(dim=0)
        # 3. B db_c = sum_j k_j P[j, c] - k_c and sum_j k_j = B, i.e. (P^T - I) k = B db
        A = torch.cat([torch.ones(1, C, dtype=torch.float64), probs.T - torch.eye(C, dtype=torch.float64)])
        rhs = torch.cat([torch.tensor([float(B)], dtype=torch.float64), B * db])
        k = torch.linalg.pinv(A) @ rhs
        # 4. integers
        return counts_to_labels(round_counts(k, B))


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
            h, p = _head_inputs(ctx, x)
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
            return _head_inputs(ctx, colour(white, exponent))[0].double().cpu()

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


@register("joint")
class Joint(LabelStrategy):
    """DLG (Zhu et al. 2019): soft labels optimised together with the images (argmax reported)."""

    joint = True

    def infer(self, ctx: LabelContext) -> None:
        return None


def resolve(name: str, batch_size: int, num_classes: int = 10, bias: bool = True) -> tuple[str, LabelStrategy]:
    """The label strategy for ``labels=name``.

    ``auto`` is ``idlg`` for one image; for a batch ``mean-embedding-eb`` where the head has a
    bias and there are more than 2 classes (label-count accuracy 0.99-1.00 against
    ``bias-corrected``'s 0.90-1.00 on untrained ConvNets and ResNet-18, README), otherwise
    ``bias-corrected`` (no bias gradient to count from; with 2 classes the regression has one
    equation and ``bias-corrected`` counts better).
    """
    if name == "auto":
        if batch_size == 1:
            name = "idlg"
        else:
            name = "mean-embedding-eb" if bias and num_classes > 2 else "bias-corrected"
    return name, LABELS.create(name)


def infer_labels(
    record,
    model: nn.Module,
    strategy: str,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    grads: list[torch.Tensor] | None = None,
) -> tuple[str, torch.Tensor | None]:
    """Labels of ``record`` (a GradientRecord): (strategy used, labels or None for joint).

    ``grads``: the threat view's estimate of the worker's gradient (``ThreatView.gradient``);
    by default the decoded gradient. ``model`` must be stateless (see
    :func:`gia_bench.attacks.matching.attack_model`).
    """
    meta = record.meta
    head = find_head(model, meta.param_names, meta.dataset.num_classes)
    name, part = resolve(strategy, meta.batch_size, meta.dataset.num_classes, head.bias_index is not None)
    # a FedAvg update is the sum of K local gradients: the strategies expect one gradient
    source = decode_record(record) if grads is None or len(grads) == 0 else grads
    grads = [g.to(device, torch.float32) / meta.local_steps for g in source]
    ctx = LabelContext(grads, head, meta.batch_size, meta.dataset.num_classes, model, meta.dataset.shape, generator)
    labels = part.infer(ctx)
    return name, None if labels is None else labels.to(torch.int64).cpu()
