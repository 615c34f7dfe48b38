"""Empirical privacy of count + suppression, on the release path's own mechanism and rule.

Two neighbouring datasets give one cell the true counts k and k - 1. We draw many releases of
each and compare the probability of every outcome (suppressed, or each published value; rare
values pooled into a tail event, which differential privacy covers like any event): each must
stay within e^epsilon of its neighbour's, plus a statistical tolerance of z = 5.3 standard
errors. With at most 40 events checked in both directions, a correct mechanism fails this test
by chance with probability below 1e-5. A variant that suppresses on the TRUE count, kept here
only to prove the test can fail, must fail it.

The same comparison is made for a proportion's cell, whose outcome is suppressed or its share
with its interval (a function of N' and C'), between neighbours that differ by one record
meeting the condition and by one record not meeting it. An event needs 400 of the 200,000
draws on both sides, so there are at most 500 of them; checked in both directions, a correct
release fails by chance with probability below 1e-4 per pair. A variant drawing N and the
cell's count apart, each at the whole loss (the loss spent twice), must fail it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable

import numpy as np
import pytest

from engine.codebook import default_codebook
from engine.loss import PrivacyLoss
from engine.planner import Plan, plan_query
from engine.query import Count, Eq, Proportion, Query
from engine.release import build_answer, publishable
from engine.settings import Settings

Z = 5.3
RELEASES = 200_000
SUPPRESSED = "suppressed"

Outcome = Hashable  # "suppressed", or what is published
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


# ---- a proportion's cell ----

PROPORTION = Query(Proportion(Eq("isSexualExploit", 1)), by=("citizenship",))  # 251 cells


def proportion_path(
    plan: Plan, meets: int, rest: int, *, loss_spent_twice: bool = False
) -> list[Outcome]:
    """Many independent releases of one cell with `meets` records meeting the condition and
    `rest` not, through the engine's mechanism, rule and intervals (every cell of a release
    alike, each with its own noise). `loss_spent_twice` is the broken variant: N and the cell's
    count each drawn with the whole loss's noise."""
    cells = plan.group_cells
    mechanism = plan.mechanisms[0]
    if loss_spent_twice:
        exact = np.repeat(np.array([meets, meets + rest], dtype=np.int64), cells)
    else:
        exact = np.repeat(np.array([meets, rest], dtype=np.int64), cells)
    outcomes: list[Outcome] = []
    while len(outcomes) < RELEASES:
        noisy = mechanism.release(exact)
        if loss_spent_twice:
            noisy[cells:] -= noisy[:cells]  # the rest as the noisy count minus the noisy N
        table = build_answer(plan, [noisy], data_version="t").table
        columns = [table[name].to_pylist() for name in ("value", "ci_low", "ci_high")]
        for suppressed, *published in zip(table["suppressed"].to_pylist(), *columns, strict=True):
            outcomes.append(SUPPRESSED if suppressed else tuple(published))
    return outcomes[:RELEASES]


@pytest.mark.parametrize("neighbour", ["one record meeting the condition", "one record not"])
def test_a_proportion_and_its_suppression_stay_within_epsilon(neighbour: str) -> None:
    plan = plan_query(PROPORTION, default_codebook(), Settings(), PrivacyLoss.pure("1"))
    # Near tau, so that suppression and publication are both common outcomes.
    meets, rest = plan.tau, 3
    smaller = (
        (meets - 1, rest) if neighbour == "one record meeting the condition" else (meets, rest - 1)
    )
    assert within_epsilon(proportion_path(plan, meets, rest), proportion_path(plan, *smaller), 1.0)


def test_spending_the_loss_on_n_and_the_count_apart_fails_the_same_test() -> None:
    plan = plan_query(PROPORTION, default_codebook(), Settings(), PrivacyLoss.pure("1"))
    meets, rest = plan.tau, 3
    assert not within_epsilon(
        proportion_path(plan, meets, rest, loss_spent_twice=True),
        proportion_path(plan, meets - 1, rest, loss_spent_twice=True),
        1.0,
    )
