"""Statistical checks of the release paths most tests leave aside: zCDP accounting, bounded sums
and means, proportions, and a privacy unit of several rows.

How often each fails by chance, for a correct engine:
- interval coverage: each check holds 10,000 independent cell intervals, each covering its true
  value with probability at least 0.95, and fails when fewer than 93.5% cover. By Bernstein's
  inequality that happens with probability below 6e-10 per check, so below 4e-9 for the six;
- suppression under zCDP: the share of 50,000 releases that publish a cell below k may exceed
  beta by z = 5.3 standard errors (normal approximation): below 1e-7;
- a person of three rows: at most 2 x 22 events compared at z = 5.3: below 3e-6. Its broken
  variant (a cap one row too loose) is missed when its largest statistic stays under 5.3; over
  40 runs that statistic averaged 11.2 with a standard deviation of 0.9, so below 1e-6.
Each check is also run on a broken variant (intervals from a third of the scale, tau from a halved
scale, noise one unit of sensitivity short) and must fail there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest

from engine.codebook import Codebook, default_codebook
from engine.loss import Accounting, PrivacyLoss
from engine.noise import Mechanism
from engine.planner import Plan, plan_query
from engine.query import Count, Eq, Mean, Proportion, Query, Sum
from engine.release import build_answer, publishable
from engine.settings import Settings

CELLS_PER_CHECK = 10_000
COVERAGE_FLOOR = 0.935
Z = 5.3
CODEBOOK = default_codebook()
LOSSES = {Accounting.PURE_DP: PrivacyLoss.pure("1"), Accounting.ZCDP: PrivacyLoss.zcdp("0.1")}
BY = ("citizenship",)  # 251 cells a release; 40 releases make one check
LOW, HIGH = 2002, 2021  # yearOfRegistration's codebook range


def make_plan(query: Query, accounting: Accounting, codebook: Codebook = CODEBOOK) -> Plan:
    return plan_query(query, codebook, Settings(accounting=accounting), LOSSES[accounting])


def truths(measure: str, cells: int, shift: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """True component vectors over `cells`, and each cell's true value.

    Counts are far above tau, so every cell is published and the coverage measured is the
    unconditional one the intervals claim. Sums and shares sweep their whole range, bounds
    included, where the clipping of the intervals matters.
    """
    index = np.arange(cells)
    count = 150 + (index * 37) % 1000
    share = np.array([0.0, 1.0, 0.5, 0.03, 0.97, 0.21])[index % 6]
    if measure == "proportion":
        numerator = np.maximum(np.rint(share * count).astype(np.int64), 150)
        numerator = np.minimum(numerator, count)
        return [np.concatenate([numerator, count - numerator])], numerator / count
    above_low = np.rint(share * (HIGH - LOW) * count).astype(np.int64)  # sum of x - LOW
    value = LOW + above_low / count if measure == "mean" else above_low + LOW * count
    # The plan sums x - shift.
    return [above_low + (LOW - shift) * count, count], value


QUERIES = {
    "sum": Query(Sum("yearOfRegistration"), by=BY),
    "mean": Query(Mean("yearOfRegistration"), by=BY),
    "proportion": Query(Proportion(Eq("isSexualExploit", 1)), by=BY),
}


def coverage(claimed: Plan, actual: Plan, measure: str) -> float:
    """The share of cell intervals that cover the truth, noise drawn by `actual`'s mechanisms
    and the release built by `claimed`'s (the same plan, unless a variant is being tested)."""
    cells = claimed.group_cells
    rounds = math.ceil(CELLS_PER_CHECK / cells)
    exact, value = truths(measure, cells, claimed.components[0].shift)
    noise = [
        m.noise(size * rounds).reshape(rounds, size)
        for m, size in zip(actual.mechanisms, actual.vector_sizes, strict=True)
    ]
    covered = 0
    for r in range(rounds):
        noisy = [e + z[r] for e, z in zip(exact, noise, strict=True)]
        table = build_answer(claimed, noisy, data_version="t").table
        assert not any(table["suppressed"].to_pylist())  # unconditional coverage, as claimed
        low, high = _column(table, "ci_low"), _column(table, "ci_high")
        covered += int(((low <= value + 1e-9) & (value - 1e-9 <= high)).sum())
    return covered / (rounds * cells)


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=float)


def halved(plan: Plan, by: int = 2) -> Plan:
    """The same plan claiming 1/`by` of each mechanism's scale (its draws are not used)."""
    return dataclasses.replace(
        plan, mechanisms=tuple(dataclasses.replace(m, scale=m.scale / by) for m in plan.mechanisms)
    )


@pytest.mark.parametrize("accounting", list(Accounting))
@pytest.mark.parametrize("measure", list(QUERIES))
def test_intervals_cover_the_true_value_at_the_stated_level(
    accounting: Accounting, measure: str
) -> None:
    plan = make_plan(QUERIES[measure], accounting)
    assert plan.settings.confidence == 0.95
    assert coverage(plan, plan, measure) >= COVERAGE_FLOOR
    # The same check, on noise three times as wide as the release's intervals assume, must
    # fail: it covers 53-81% of the time. (At twice the width, union-bounded intervals, a
    # pure-DP mean's or share's, still cover about 93-94%: too close to the floor to fail
    # every time.)
    assert coverage(halved(plan, by=3), plan, measure) < COVERAGE_FLOOR


def test_zcdp_suppression_publishes_a_share_below_k_at_most_beta_of_the_time() -> None:
    # A proportion whose numerator is k - 1 in a large cell: it may be published only when the
    # numerator's noisy count reaches tau (the denominator's, far above tau, always does).
    plan = make_plan(QUERIES["proportion"], Accounting.ZCDP)
    settings = plan.settings
    draws = 50_000
    noise = plan.mechanisms[0].noise(draws)
    bound = settings.beta + Z * math.sqrt(settings.beta * (1 - settings.beta) / draws)

    def published_share(tau: int) -> float:
        return float(publishable(settings.k - 1 + noise, tau).mean())

    assert published_share(plan.tau) <= bound
    # tau set from half the noise's scale lets too many small numerators through.
    broken_tau = settings.k + halved(plan).count_mechanism.distribution.suppression_margin(
        settings.beta
    )
    assert broken_tau < plan.tau and published_share(broken_tau) > bound


# ---- a person of several rows ----

SUPPRESSED = -1  # the outcome "suppressed"; every published count is at least tau > 0


def person_codebook(rows_per_person: int) -> Codebook:
    return Codebook.from_mapping(
        {
            "name": "people",
            "version": "1",
            "privacy_unit": {"id_column": "personId", "max_rows_per_person": rows_per_person},
            "variables": [
                {"name": "personId", "type": "integer", "range": [1, 1000]},
                {"name": "g", "type": "category", "categories": [{"code": "A"}]},
            ],
        }
    )


def outcomes(plan: Plan, true_count: int, draws: int) -> np.ndarray:
    """Independent releases of one cell: its noisy count, or SUPPRESSED."""
    noisy = true_count + plan.count_mechanism.noise(draws)
    return np.where(publishable(noisy, plan.tau), noisy, SUPPRESSED)


def within_epsilon(left: np.ndarray, right: np.ndarray, epsilon: float) -> bool:
    """Is every event's probability within e^epsilon of its neighbour's (plus z standard
    errors)? Events: suppressed, each common published value, the rest pooled, and each upper
    tail from a common value (where a shifted count differs most)."""
    draws = len(left)
    values, counts = np.unique(np.concatenate([left, right]), return_counts=True)
    common = [v for v, c in zip(values, counts, strict=True) if c >= 800 and v != SUPPRESSED]
    events: list[Callable[[np.ndarray], np.ndarray]] = [lambda o: o == SUPPRESSED]
    events += [lambda o, v=v: o == v for v in common[:10]]
    events.append(lambda o: (o != SUPPRESSED) & ~np.isin(o, common[:10]))
    events += [lambda o, v=v: o >= v for v in common[:10]]
    bound = math.exp(epsilon)
    for event in events:
        p = [float(event(o).mean()) for o in (left, right)]
        for a, b in ((0, 1), (1, 0)):
            se = math.sqrt((p[a] * (1 - p[a]) + bound**2 * p[b] * (1 - p[b])) / draws)
            if p[a] - bound * p[b] > Z * se:
                return False
    return True


def test_a_person_of_several_rows_is_protected_at_the_charged_epsilon() -> None:
    # Three rows a person, all in one cell: with and without the person the cell holds k and
    # k - 3 records. A cap one row too loose (a person moving the count by 4 while the noise
    # is calibrated for 3) must fail the same comparison.
    plan = make_plan(Query(Count(), by=("g",)), Accounting.PURE_DP, person_codebook(3))
    assert plan.count_mechanism.sensitivity == 3
    epsilon = float(plan.loss.amount)
    k, draws = plan.settings.k, 80_000
    with_person = outcomes(plan, k, draws)
    assert within_epsilon(with_person, outcomes(plan, k - 3, draws), epsilon)
    assert not within_epsilon(with_person, outcomes(plan, k - 4, draws), epsilon)


def test_the_broken_variants_are_what_they_claim() -> None:
    # The variants above differ from the release path only where they say they do.
    plan = make_plan(QUERIES["mean"], Accounting.ZCDP)
    variant = halved(plan)
    assert all(
        isinstance(m, Mechanism) and m.scale == pytest.approx(o.scale / 2)
        for m, o in zip(variant.mechanisms, plan.mechanisms, strict=True)
    )
    assert variant.tau == plan.tau and variant.fingerprint == plan.fingerprint
