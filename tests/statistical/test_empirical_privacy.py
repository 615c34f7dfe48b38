"""Empirical privacy of count + suppression, on the release path's own mechanism and rule.

Two neighbouring datasets give one cell the true counts k and k - 1. We draw many releases of
each and compare the probability of every outcome (suppressed, or each published value; rare
values pooled into a tail event, which differential privacy covers like any event): each must
stay within e^epsilon of its neighbour's, plus a statistical tolerance of z = 5.3 standard
errors. With at most 40 events checked in both directions, a correct mechanism fails this test
by chance with probability below 1e-5. A variant that suppresses on the TRUE count, kept here
only to prove the test can fail, must fail it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from engine.codebook import default_codebook
from engine.loss import PrivacyLoss
from engine.planner import Plan, plan_query
from engine.query import Count, Query
from engine.release import publishable
from engine.settings import Settings

Z = 5.3
RELEASES = 200_000
SUPPRESSED = "suppressed"

Outcome = str | int
Releaser = Callable[[Plan, int], list[Outcome]]


def release_path(plan: Plan, true_count: int) -> list[Outcome]:
    """Many independent releases of one cell, through the engine's mechanism and rule."""
    noisy = plan.count_mechanism.release(np.full(RELEASES, true_count, dtype=np.int64))
    published = publishable(noisy, plan.tau)
    return [
        int(v) if p else SUPPRESSED for v, p in zip(noisy.tolist(), published.tolist(), strict=True)
    ]


def suppress_on_true_count(plan: Plan, true_count: int) -> list[Outcome]:
    """The broken design: noise added, but the suppression decision reads the true count."""
    noisy = plan.count_mechanism.release(np.full(RELEASES, true_count, dtype=np.int64))
    keep = true_count >= plan.settings.k
    return [int(v) if keep else SUPPRESSED for v in noisy.tolist()]


def within_epsilon(left: list[Outcome], right: list[Outcome], epsilon: float) -> bool:
    counts = [Counter(left), Counter(right)]
    events: list[set[Outcome]] = [{SUPPRESSED}]
    values = sorted(v for v in set(counts[0]) | set(counts[1]) if v != SUPPRESSED)
    tail: set[Outcome] = set()
    for value in values:  # common values on their own, rare ones pooled from the top down
        if min(counts[0][value], counts[1][value]) >= 400:
            events.append({value})
        else:
            tail.add(value)
    if tail:
        events.append(tail)
    bound = math.exp(epsilon)
    for event in events:
        p = [sum(c[o] for o in event) / RELEASES for c in counts]
        for a, b in ((0, 1), (1, 0)):
            se = math.sqrt(p[a] * (1 - p[a]) / RELEASES + bound**2 * p[b] * (1 - p[b]) / RELEASES)
            if p[a] - bound * p[b] > Z * se:
                return False
    return True


@pytest.mark.parametrize("epsilon", ["0.5", "1"])
def test_count_and_suppression_stay_within_epsilon(epsilon: str) -> None:
    settings = Settings()
    plan = plan_query(Query(Count()), default_codebook(), settings, PrivacyLoss.pure(epsilon))
    k = settings.k
    assert within_epsilon(release_path(plan, k), release_path(plan, k - 1), float(epsilon))


def test_suppressing_on_the_true_count_fails_the_same_test() -> None:
    settings = Settings()
    plan = plan_query(Query(Count()), default_codebook(), settings, PrivacyLoss.pure("1"))
    k = settings.k
    assert not within_epsilon(
        suppress_on_true_count(plan, k), suppress_on_true_count(plan, k - 1), 1.0
    )


def test_a_cell_below_k_is_published_at_most_beta_of_the_time() -> None:
    # P(published | true count k - 1) <= beta by construction of tau; the sample share must not
    # exceed beta by more than z standard errors (false failure below 1e-7).
    settings = Settings()
    plan = plan_query(Query(Count()), default_codebook(), settings, PrivacyLoss.pure("1"))
    outcomes = release_path(plan, settings.k - 1)
    share = sum(o != SUPPRESSED for o in outcomes) / RELEASES
    assert share <= settings.beta + Z * math.sqrt(settings.beta * (1 - settings.beta) / RELEASES)
