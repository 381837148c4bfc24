"""The statistics behind the report's verdicts, each rule stated once so the report can quote it.

* **Accuracy ± standard error.** One training run: the binomial standard error
  ``sqrt(p (1 - p) / n)`` of a test accuracy ``p`` measured on ``n`` test examples.
  Several runs of the same setting (seeds): the mean and the standard error of the
  mean over runs, ``s / sqrt(k)`` (``s`` the sample standard deviation of ``k`` runs).
* **Two accuracies "not different".** ``|p1 - p2| <= 1.96 sqrt(se1^2 + se2^2)``: a
  two-sided z-test at the 5% level that treats the two estimates as independent (both
  runs are scored on the same test set, so a paired test on per-example predictions
  would be sharper; the trainer does not store those).
* **Leakage verdict against the floor.** For each image, the reconstruction *beats the
  floor* when its SSIM and its PSNR both exceed those of a flat image of that
  original's mean colour (:func:`gia_bench.metrics.mean_colour_floor`). Under "no
  leakage beyond the mean colour" an image beats its floor with probability at most
  1/2, so the number of images that beat it is tested with the one-sided exact sign
  test, ``p = P[Binomial(n, 1/2) >= k]``. The strongest attacker is picked after the
  fact out of ``m`` attacker settings, so the level is Bonferroni-corrected,
  ``alpha = 0.05 / m``. Verdicts: *leaks* when ``p < alpha``; *indistinguishable from
  the floor* when ``p >= alpha`` and ``n`` is large enough that all ``n`` images beating
  the floor would have been significant; otherwise *too few images to tell*.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

ALPHA = 0.05
Z = 1.959963984540054  # two-sided 5% normal quantile

ACCURACY_RULE = (
    "Accuracy ± standard error: binomial sqrt(p(1-p)/n) over the n test examples of one run, or the standard"
    " error of the mean over seeds when several runs share a setting. Two accuracies are not different when"
    " |p1 - p2| <= 1.96 sqrt(se1² + se2²) (two-sided z-test at 5%)."
)
FLOOR_RULE = (
    "Verdict against the floor: an image beats the floor when its reconstruction's SSIM and PSNR both exceed"
    " those of a flat image of that original's mean colour. A one-sided exact sign test on the number of images"
    " that beat it (p = P[Binomial(n, 1/2) >= k]), at level 0.05 / m (Bonferroni over the m attacker settings"
    " the strongest was picked from): leaks when p is below that level; indistinguishable from the floor when it"
    " is not although n images would have been enough; too few images to tell when even n of n could not reach"
    " the level."
)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """An accuracy and its standard error, and where the error comes from."""

    mean: float
    se: float | None  # None when neither test_examples nor several seeds are known
    runs: int
    examples: int | None  # test examples of one run (binomial error); None over seeds or unknown
    method: str  # "binomial", "seeds" or "unknown"


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` measured on ``n`` independent trials."""
    if n < 1:
        raise ValueError(f"n = {n}: need at least one trial")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def accuracy_estimate(accuracies: Sequence[float], examples: Sequence[int | None]) -> Estimate:
    """One run: binomial standard error; several (seeds): the standard error of the mean over runs."""
    if not accuracies:
        raise ValueError("no accuracies")
    if len(accuracies) == 1:
        n = examples[0] if examples else None
        if n:
            return Estimate(accuracies[0], binomial_se(accuracies[0], n), 1, n, "binomial")
        return Estimate(accuracies[0], None, 1, None, "unknown")
    mean = statistics.fmean(accuracies)
    return Estimate(mean, statistics.stdev(accuracies) / math.sqrt(len(accuracies)), len(accuracies), None, "seeds")


def not_different(a: Estimate, b: Estimate) -> bool | None:
    """True when the two accuracies are within noise of each other; None when an error is unknown."""
    if a.se is None or b.se is None:
        return None
    return abs(a.mean - b.mean) <= Z * math.sqrt(a.se**2 + b.se**2)


def sign_test_p(k: int, n: int) -> float:
    """One-sided exact sign test: ``P[Binomial(n, 1/2) >= k]``."""
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} outside [0, n = {n}]")
    return math.fsum(math.comb(n, i) for i in range(k, n + 1)) / 2.0**n


def min_images(comparisons: int = 1, alpha: float = ALPHA) -> int:
    """The fewest images for which all of them beating the floor is significant at ``alpha / comparisons``."""
    level = alpha / max(comparisons, 1)
    return max(1, math.floor(math.log2(1.0 / level)) + 1)


LEAKS = "leaks"
FLOOR = "indistinguishable from the floor"
TOO_FEW = "too few images to tell"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The strongest attacker's images against their mean-colour floors."""

    verdict: str  # LEAKS, FLOOR or TOO_FEW
    beats: int  # images that beat their floor (SSIM and PSNR)
    n: int  # images with a floor
    p: float  # one-sided sign-test p-value
    level: float  # alpha / comparisons
    comparisons: int

    def text(self) -> str:
        if self.n == 0:
            return "no floor (originals not stored)"
        return f"{self.verdict} ({self.beats}/{self.n} beat the floor, p={self.p:.2g})"


def floor_verdict(
    pairs: Sequence[tuple[float, float, float | None, float | None]], comparisons: int = 1, alpha: float = ALPHA
) -> Verdict:
    """Verdict from per-image ``(ssim, psnr, floor_ssim, floor_psnr)``; images without a floor are left out."""
    scored = [(s, p, fs, fp) for s, p, fs, fp in pairs if fs is not None and fp is not None]
    n = len(scored)
    level = alpha / max(comparisons, 1)
    if n == 0:
        return Verdict(TOO_FEW, 0, 0, 1.0, level, comparisons)
    beats = sum(1 for s, p, fs, fp in scored if s > fs and p > fp)
    pval = sign_test_p(beats, n)
    if pval < level:
        verdict = LEAKS
    elif n >= min_images(comparisons, alpha):
        verdict = FLOOR
    else:
        verdict = TOO_FEW
    return Verdict(verdict, beats, n, pval, level, comparisons)
