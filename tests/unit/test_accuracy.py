"""The public arithmetic on the noise, checked against the exact distribution.

Above _EXACT_GAUSSIAN_UP_TO the discrete Gaussian's tail is not summed but bounded by an
integral; margins and intervals are only as safe as that bound. These tests sum the exact pmf
(which is cheap enough in a test up to a few thousand) and compare. They are deterministic.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from engine.accuracy import _EXACT_GAUSSIAN_UP_TO, NoiseDistribution, _gaussian_pmf
from engine.loss import Accounting
from engine.noise import calibrate
from engine.settings import Settings

# Just above the switch to the bound, a little further, and well above it.
LARGE_SCALES = [1000.5, 1001.0, 1500.0, 3000.0]


def exact_tail(scale: float, t: int) -> float:
    """P(Z >= t) for the discrete Gaussian of this scale, by summing its exact pmf."""
    support, pmf = _gaussian_pmf(scale)
    return float(pmf[support >= t].sum())


@pytest.mark.parametrize("scale", LARGE_SCALES)
def test_the_gaussian_tail_beyond_the_exact_range_is_an_upper_bound(scale: float) -> None:
    assert scale > _EXACT_GAUSSIAN_UP_TO  # these take the bound, not the sum
    distribution = NoiseDistribution(Accounting.ZCDP, scale)
    ts = {1, 2, 3, 10, round(scale / 10), round(scale / 2), round(scale), round(2 * scale),
          round(3 * scale), round(4 * scale), round(5 * scale)}
    for t in sorted(ts):
        exact = exact_tail(scale, t)
        bound = distribution.tail(t)
        assert bound >= exact, (scale, t, bound, exact)
        # An upper bound, but not a useless one: within a few percent of the truth out to
        # five standard deviations (the integral starts one unit early).
        assert bound <= exact * 1.05 + 1e-12, (scale, t, bound, exact)


@pytest.mark.parametrize("scale", LARGE_SCALES)
@pytest.mark.parametrize("beta", [0.05, 0.01, 1e-4])
def test_a_cell_below_k_is_published_with_probability_at_most_beta(
    scale: float, beta: float
) -> None:
    # tau = k + margin (engine/planner.py); a cell of k - 1 records is published when its
    # noisy count reaches tau, that is when its noise is at least margin + 1.
    k = 10
    margin = NoiseDistribution(Accounting.ZCDP, scale).suppression_margin(beta)
    tau = k + margin
    assert exact_tail(scale, tau - (k - 1)) <= beta, (scale, beta, margin)


def test_the_margin_of_a_calibrated_mechanism_beyond_the_exact_range_holds_beta() -> None:
    # The same path as the planner's: a zCDP budget so small that the scale exceeds 1000.
    settings = Settings(accounting=Accounting.ZCDP)
    budget = Fraction(1, 2 * 1001**2)  # rho = 1 / (2 scale^2) at sensitivity 1
    mechanism = calibrate(Accounting.ZCDP, sensitivity=1, budget=budget)
    assert mechanism.scale > _EXACT_GAUSSIAN_UP_TO
    tau = settings.k + mechanism.distribution.suppression_margin(settings.beta)
    published = exact_tail(mechanism.scale, tau - (settings.k - 1))
    assert published <= settings.beta
    # And the margin is not much more than needed: a margin 5% smaller would not hold beta.
    assert exact_tail(mechanism.scale, int(0.95 * (tau - settings.k)) + 1) > settings.beta


def test_the_exact_pmf_is_a_distribution_for_large_scales() -> None:
    # The reference the tests above lean on: symmetric, summing to one, with a support wide
    # enough that the mass it leaves out is nothing.
    for scale in LARGE_SCALES:
        support, pmf = _gaussian_pmf(scale)
        assert abs(float(pmf.sum()) - 1.0) < 1e-12
        assert np.array_equal(pmf, pmf[::-1]) and support[0] == -support[-1]
        assert support[-1] >= 40 * scale
