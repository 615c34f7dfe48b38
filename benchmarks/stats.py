"""Medians, spreads and pair-by-pair ratios of timed runs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def iqr(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles (inclusive method; both equal the value for one run)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def paired_ratios(
    numerators: Sequence[float], denominators: Sequence[float]
) -> list[float]:
    """Ratio of the i-th run of one system to the i-th run of another: runs i were made one
    right after the other, so a slow moment of the machine weighs on both."""
    return [a / b for a, b in zip(numerators, denominators, strict=False) if b > 0]


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    ratios = paired_ratios(numerators, denominators)
    return median(ratios) if ratios else None
