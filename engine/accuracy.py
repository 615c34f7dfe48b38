"""Public arithmetic on the noise distributions: intervals, suppression margins, cost for accuracy.

Everything here is a function of the mechanism's scale and of public assumptions only; nothing
reads data. The distributions are the ones OpenDP samples from for integer inputs: the discrete
Laplace, P(z) proportional to exp(-|z|/scale), and the discrete Gaussian, P(z) proportional to
exp(-z^2 / (2 scale^2)).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from engine.loss import Accounting
from engine.query import Count, FlagCounts, Measure


@dataclass(frozen=True)
class NoiseDistribution:
    accounting: Accounting
    scale: float

    @property
    def mechanism(self) -> str:
        return "discrete_laplace" if self.accounting is Accounting.PURE_DP else "discrete_gaussian"

    def tail(self, t: int) -> float:
        """P(Z >= t)."""
        if t <= 0:
            return 1.0 - self.tail(1 - t)
        if self.accounting is Accounting.PURE_DP:
            a = math.exp(-1.0 / self.scale)
            return a**t / (1.0 + a)
        if self.scale > _EXACT_GAUSSIAN_UP_TO:
            # The pmf would be too long to sum. exp(-x^2 / 2s^2) decreases for x >= 0, so the sum
            # over z >= t is at most the integral from t - 1; the normaliser is s sqrt(2 pi) to
            # within exp(-2 pi^2 s^2). An upper bound keeps margins and intervals conservative.
            return min(1.0, 0.5 * math.erfc((t - 1) / (self.scale * math.sqrt(2))) * (1 + 1e-9))
        support, pmf = _gaussian_pmf(self.scale)
        return float(pmf[support >= t].sum())

    def within(self, q: int) -> float:
        """P(|Z| <= q)."""
        return 1.0 - 2.0 * self.tail(q + 1)

    def quantile_abs(self, level: float) -> int:
        """The smallest integer q with P(|Z| <= q) >= level."""
        return _smallest(lambda q: self.within(q) >= level)

    def suppression_margin(self, beta: float) -> int:
        """The smallest margin m >= 0 with P(Z >= m + 1) <= beta.

        With tau = k + m, a cell whose true count is at most k - 1 reaches tau only when its noise
        is at least m + 1, so it is published with probability at most beta.
        """
        return _smallest(lambda m: self.tail(m + 1) <= beta)

    def publish_probability(self, true_count: int, tau: int) -> float:
        """P(true_count + Z >= tau): the chance a cell with this count is published."""
        return self.tail(tau - true_count)


@dataclass(frozen=True)
class EmptyCellBound:
    """How many published cells may be empty ones that passed by chance, from the plan alone.

    `pass_probability` is p0 = P(Z >= tau), the chance that a cell whose true count is 0 passes
    the publication rule (for a proportion, P(N' >= tau | N = 0), which bounds its rule).
    `expected_published` is cells x p0: the number of empty cells is not public, so every cell
    is counted as if empty, which bounds the expected number of empty cells published.
    """

    pass_probability: float
    expected_published: float


def empty_cell_bound(distribution: NoiseDistribution, *, tau: int, cells: int) -> EmptyCellBound:
    """The bound for `cells` cells, each published when its count's noisy value reaches tau."""
    p0 = distribution.publish_probability(0, tau)
    return EmptyCellBound(pass_probability=p0, expected_published=cells * p0)


_EXACT_GAUSSIAN_UP_TO = 1000.0


def _smallest(holds: Callable[[int], bool]) -> int:
    """The smallest integer n >= 0 for which a monotone predicate holds (it must hold somewhere).

    Galloping then bisection: a few dozen evaluations whatever the noise scale.
    """
    if holds(0):
        return 0
    low, high = 0, 1  # holds(low) is false
    while not holds(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if holds(middle) else (middle, high)
    return high


@functools.lru_cache(maxsize=64)
def _gaussian_pmf(scale: float) -> tuple[np.ndarray, np.ndarray]:
    bound = math.ceil(scale * 40) + 10
    support = np.arange(-bound, bound + 1)
    weights = np.exp(-(support.astype(float) ** 2) / (2 * scale * scale))
    return support, weights / weights.sum()


def bonferroni_level(confidence: float, parts: int) -> float:
    """The per-part level whose union bound gives `confidence` jointly."""
    return 1.0 - (1.0 - confidence) / parts


def count_interval_level(measure: Measure, confidence: float) -> float:
    """The level each count's interval in a release of `measure` is taken at. A count's takes
    the whole confidence; a share's two counts, and a sum's or mean's sum and count, share it
    by the union bound."""
    if isinstance(measure, (Count, FlagCounts)):
        return confidence
    return bonferroni_level(confidence, 2)


def scale_for_share(accounting: Accounting, sensitivity: int, share: Fraction) -> float:
    """The noise scale at which one component of sensitivity `sensitivity` costs `share`."""
    if accounting is Accounting.PURE_DP:
        return sensitivity / float(share)
    return sensitivity / math.sqrt(2 * float(share))


def share_for_scale(accounting: Accounting, sensitivity: int, scale: float) -> float:
    if accounting is Accounting.PURE_DP:
        return sensitivity / scale
    return sensitivity**2 / (2 * scale * scale)


def round_up_amount(value: float, digits: int = 3) -> Fraction:
    """Round a positive amount up to `digits` significant decimal digits, as an exact rational."""
    exponent = math.floor(math.log10(value)) - digits + 1
    unit = Fraction(10) ** exponent
    return math.ceil(Fraction(value) / unit) * unit
