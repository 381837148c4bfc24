"""The report's statistical rules (gia_bench.reports.stats) against their definitions."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from gia_bench.reports import stats


@pytest.mark.parametrize("n", [1, 2, 5, 7, 12, 30])
def test_sign_test_is_the_binomial_upper_tail(n: int) -> None:
    for k in range(n + 1):
        assert stats.sign_test_p(k, n) == pytest.approx(sps.binom.sf(k - 1, n, 0.5), rel=1e-12)
    assert stats.sign_test_p(0, n) == 1.0 and stats.sign_test_p(n, n) == pytest.approx(0.5**n)
    with pytest.raises(ValueError):
        stats.sign_test_p(n + 1, n)


@pytest.mark.parametrize("m", [1, 2, 4, 6, 13, 52])
def test_min_images_is_the_fewest_that_can_reject(m: int) -> None:
    level = 0.05 / m
    n = stats.min_images(m)
    assert 0.5**n < level <= 0.5 ** (n - 1)  # n of n is significant; n-1 of n-1 is not
    assert stats.min_images(1) == 5 and stats.min_images(4) == 7


def test_binomial_standard_error_and_seeds() -> None:
    assert stats.binomial_se(0.774, 359) == pytest.approx(math.sqrt(0.774 * 0.226 / 359))
    one = stats.accuracy_estimate([0.774], [359])
    assert (one.method, one.examples, one.runs) == ("binomial", 359, 1)
    seeds = stats.accuracy_estimate([0.90, 0.92, 0.94], [359, 359, 359])
    assert seeds.method == "seeds" and seeds.runs == 3
    assert seeds.mean == pytest.approx(0.92) and seeds.se == pytest.approx(0.02 / math.sqrt(3))
    unknown = stats.accuracy_estimate([0.8], [None])
    assert unknown.se is None and unknown.method == "unknown"


def test_not_different_is_a_two_sided_z_test() -> None:
    n = 359
    a, b = stats.accuracy_estimate([0.830], [n]), stats.accuracy_estimate([0.774], [n])
    # the demo's "signsgd beats SGD" gap: 5.6 points, inside 1.96 combined standard errors
    assert stats.not_different(a, b) is True
    assert stats.not_different(stats.accuracy_estimate([0.91], [n]), stats.accuracy_estimate([0.76], [n])) is False
    # exactly at the boundary counts as not different, just past it as different
    se = math.sqrt(2) * 0.01
    edge = stats.Z * se
    x = stats.Estimate(0.5, 0.01, 1, None, "binomial")
    assert stats.not_different(x, stats.Estimate(0.5 + edge * 0.999, 0.01, 1, None, "binomial")) is True
    assert stats.not_different(x, stats.Estimate(0.5 + edge * 1.001, 0.01, 1, None, "binomial")) is False
    assert stats.not_different(x, stats.Estimate(0.5, None, 1, None, "unknown")) is None


def test_floor_verdict() -> None:
    beat = (0.9, 30.0, 0.1, 12.0)
    lose = (0.05, 11.0, 0.1, 12.0)
    half = (0.9, 11.0, 0.1, 12.0)  # SSIM above its floor but PSNR below: does not beat it
    v = stats.floor_verdict([beat] * 6)
    assert (v.verdict, v.beats, v.n) == (stats.LEAKS, 6, 6) and v.p == pytest.approx(1 / 64)
    # two images can never reach p < 0.05: too few to tell, not "no leakage"
    assert stats.floor_verdict([beat] * 2).verdict == stats.TOO_FEW
    v = stats.floor_verdict([beat] * 3 + [lose] * 3 + [half] * 4)
    assert (v.verdict, v.beats, v.n) == (stats.FLOOR, 3, 10)
    # the Bonferroni level: 6 of 6 leaks for one attacker, not when picked from 4 (needs 7 images)
    assert stats.floor_verdict([beat] * 6, comparisons=4).verdict == stats.TOO_FEW
    assert stats.floor_verdict([beat] * 7, comparisons=4).verdict == stats.LEAKS
    # images without a stored original have no floor and are left out
    v = stats.floor_verdict([beat] * 5 + [(0.9, 30.0, None, None)] * 3)
    assert v.n == 5 and v.verdict == stats.LEAKS
    assert stats.floor_verdict([(0.9, 30.0, None, None)]).n == 0
