"""Exact checks of the release paths most tests leave aside: zCDP accounting, bounded sums and
means, proportions, and codebooks whose privacy unit is a person with several rows.

Every check here is deterministic: sensitivities are measured on constructed worst-case
neighbours, charges are read from OpenDP's own maps, the discrete Gaussian's Renyi divergence is
summed from its pmf, and the release is recomputed with its noisy values pinned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from opendp.combinators import make_zCDP_to_approxDP

from engine.codebook import Codebook, default_codebook
from engine.engine import Engine
from engine.loss import Accounting, PrivacyLoss, epsilon_equivalent
from engine.noise import NoiseAhead, calibrate
from engine.planner import Plan, plan_query
from engine.query import Count, Eq, FlagCounts, Mean, Proportion, Query, Sum
from engine.settings import Settings

LOW, HIGH = -5, 40  # the summed variable's codebook range, on both sides of zero
# A sum subtracts from each clamped value the point of the range nearest zero (0 here); a mean
# its middle, (LOW + HIGH) // 2 = 17. A record then moves the sum by at most 40, or 23.
SUM_REACH = {"sum": max(0 - LOW, HIGH - 0), "mean": max(17 - LOW, HIGH - 17)}


def person_codebook(rows_per_person: int) -> Codebook:
    """A codebook whose privacy unit is a person, with a range below and above zero."""
    return Codebook.from_mapping(
        {
            "name": "people",
            "version": "1",
            "privacy_unit": {"id_column": "personId", "max_rows_per_person": rows_per_person},
            "variables": [
                {"name": "personId", "type": "integer", "range": [1, 1000]},
                {"name": "age", "type": "integer", "range": [LOW, HIGH]},
                {
                    "name": "g",
                    "type": "category",
                    "categories": [{"code": "A"}, {"code": "B"}, {"code": "C"}],
                },
                {"name": "f1", "type": "flag"},
                {"name": "f2", "type": "flag"},
                {"name": "f3", "type": "flag"},
            ],
            "flag_sets": [{"name": "fs", "flags": ["f1", "f2", "f3"]}],
        }
    )


QUERIES = {
    "count": Query(Count(), by=("g",)),
    "flags": Query(FlagCounts("fs"), by=("g",)),
    "proportion": Query(Proportion(Eq("f1", 1)), by=("g",)),
    "sum": Query(Sum("age"), by=("g",)),
    "mean": Query(Mean("age"), by=("g",)),
}
LOSSES = {Accounting.PURE_DP: PrivacyLoss.pure("0.7"), Accounting.ZCDP: PrivacyLoss.zcdp("0.3")}


def expected_sensitivity(query: str, component: str, rows_per_person: int) -> int:
    """From first principles: the most one person moves the component's vector, in L1 and in
    L2 (all of a person's kept rows may land in one cell, where L1 and L2 coincide)."""
    per_row = SUM_REACH[query] if component == "sum" else 1
    return rows_per_person * per_row


BASE = (
    [{"personId": i, "g": "A", "age": 3, "f1": 1, "f2": 0, "f3": 1} for i in range(1, 6)]
    + [{"personId": 7, "g": "B", "age": None, "f1": 0, "f2": 1, "f3": 0}] * 4
    + [{"personId": None, "g": "C", "age": 20, "f1": None, "f2": 1, "f3": 1}] * 3
)


def worst_person(rows_per_person: int, age: int) -> list[dict[str, Any]]:
    # More rows than the cap, all in one cell, every flag set, the summed value at a bound.
    return [{"personId": 999, "g": "A", "age": age, "f1": 1, "f2": 1, "f3": 1}] * (
        2 * rows_per_person + 1
    )


def test_a_proportion_with_a_filter_binds_each_value_where_it_is_written(
    make_engine: Callable[..., Engine],
) -> None:
    # The condition's text appears twice, then WHERE; f2 = 0 differs from f1 = 1, so a value
    # bound out of text order changes the counts, or fails.
    rows = (
        [{"personId": i, "g": "A", "f1": 1, "f2": 0} for i in range(1, 6)]
        + [{"personId": i, "g": "A", "f1": 0, "f2": 0} for i in range(6, 9)]
        + [{"personId": i, "g": "B", "f1": None, "f2": 0} for i in range(9, 13)]
        + [{"personId": i, "g": "B", "f1": 1, "f2": 0} for i in range(13, 15)]
        + [{"personId": i, "g": "B", "f1": 1, "f2": 1} for i in range(15, 21)]
    )
    engine = make_engine(rows, codebook=person_codebook(1))
    query = Query(Proportion(Eq("f1", 1)), by=("g",), where=Eq("f2", 0))
    (split,) = engine._true_components(engine.plan(query, loss=LOSSES[Accounting.PURE_DP]))
    # Cells A, B, C, missing: N, then the rest (a missing f1 is in the rest).
    assert split.tolist() == [5, 2, 0, 0, 3, 4, 0, 0]


@pytest.mark.parametrize("rows_per_person", [1, 3])
def test_a_worst_case_person_moves_each_component_by_exactly_its_sensitivity(
    make_engine: Callable[..., Engine], rows_per_person: int
) -> None:
    codebook = person_codebook(rows_per_person)
    without = make_engine(BASE, codebook=codebook)
    withs = [
        make_engine(BASE + worst_person(rows_per_person, age), codebook=codebook)
        for age in (LOW, HIGH)
    ]
    for name, query in QUERIES.items():
        plan = without.plan(query, loss=LOSSES[Accounting.PURE_DP])
        before = without._true_components(plan)
        reached = dict.fromkeys((c.name for c in plan.components), 0)
        for with_person in withs:
            after = with_person._true_components(plan)
            for component, a, b in zip(plan.components, before, after, strict=True):
                moved = np.abs(a - b)
                l1, l2 = int(moved.sum()), math.sqrt(int((moved**2).sum()))
                assert component.sensitivity == expected_sensitivity(
                    name, component.name, rows_per_person
                )
                assert l1 <= component.sensitivity and l2 <= component.sensitivity, (name, l1)
                reached[component.name] = max(reached[component.name], l1)
        # The bound is reached, so the noise is not calibrated for a larger shift than exists
        # (the proportion's numerator reads f1, which the worst person has).
        assert reached == {c.name: c.sensitivity for c in plan.components}, name


@pytest.mark.parametrize("accounting", list(Accounting))
@pytest.mark.parametrize("rows_per_person", [1, 3])
@pytest.mark.parametrize("name", list(QUERIES))
def test_the_charge_is_opendps_map_at_the_first_principles_sensitivity(
    accounting: Accounting, rows_per_person: int, name: str
) -> None:
    loss = LOSSES[accounting]
    p = _plan(QUERIES[name], person_codebook(rows_per_person), accounting, loss)
    share = loss.amount / len(p.components)
    for component, mechanism in zip(p.components, p.mechanisms, strict=True):
        sensitivity = expected_sensitivity(name, component.name, rows_per_person)
        measurement = mechanism.measurement
        if accounting is Accounting.ZCDP:
            # Discrete Gaussian on an L2 sensitivity, loss in rho = sensitivity^2 / (2 scale^2).
            assert "ZeroConcentratedDivergence" in str(measurement.output_measure)
            assert "L2Distance" in str(measurement.input_metric)
            analytic = sensitivity**2 / (2 * mechanism.scale**2)
        else:
            assert "MaxDivergence" in str(measurement.output_measure)
            assert "L1Distance" in str(measurement.input_metric)
            analytic = sensitivity / mechanism.scale
        stated = Fraction(measurement.map(sensitivity))
        assert stated == mechanism.loss <= share
        assert float(stated) == pytest.approx(analytic, rel=1e-9)
        # Calibrated for this sensitivity and no more: the share is spent, not wasted.
        assert stated >= share * (1 - Fraction(1, 10**9))
    assert p.measured_loss <= loss.amount


def _plan(query: Query, codebook: Codebook, accounting: Accounting, loss: PrivacyLoss) -> Plan:
    return plan_query(query, codebook, Settings(accounting=accounting), loss)


def renyi_divergence(scale: float, shift: int, alpha: float) -> float:
    """D_alpha(P || P shifted by `shift`), P(z) proportional to exp(-z^2 / 2 scale^2) on the
    integers (OpenDP's discrete Gaussian), summed in log space over all but a negligible tail."""
    bound = math.ceil(40 * scale) + 10 + abs(shift)
    z = np.arange(-bound, bound + 1, dtype=float)
    log_weight = -(z**2) / (2 * scale * scale)
    log_p = log_weight - np.logaddexp.reduce(log_weight)
    log_q = -((z - shift) ** 2) / (2 * scale * scale) - np.logaddexp.reduce(log_weight)
    return float(np.logaddexp.reduce(alpha * log_p + (1 - alpha) * log_q)) / (alpha - 1)


@pytest.mark.parametrize("name", ["count", "sum", "proportion"])
def test_the_discrete_gaussians_renyi_divergence_is_within_each_share(name: str) -> None:
    # zCDP from first principles: D_alpha <= alpha * rho at the component's sensitivity, for
    # every alpha. One more unit of shift than the planner allows for breaks it.
    loss = LOSSES[Accounting.ZCDP]
    p = _plan(QUERIES[name], person_codebook(3), Accounting.ZCDP, loss)
    share = float(loss.amount) / len(p.components)
    for component, mechanism in zip(p.components, p.mechanisms, strict=True):
        for alpha in (1.5, 2.0, 4.0):
            divergence = renyi_divergence(mechanism.scale, component.sensitivity, alpha)
            assert divergence <= alpha * share * (1 + 1e-9), (component.name, alpha)
        assert renyi_divergence(mechanism.scale, component.sensitivity + 1, 2.0) > 2.0 * share


@pytest.mark.parametrize("delta", [1e-3, 1e-6, 1e-9])
@pytest.mark.parametrize("rho", ["0.01", "0.1", "1", "5"])
def test_the_reported_epsilon_is_never_below_opendps_own_conversion(rho: str, delta: float) -> None:
    # The budget report gives zCDP spending as (epsilon, delta) at the custodian's delta; it may
    # be looser than OpenDP's optimal conversion, never tighter.
    amount = Fraction(rho)
    mechanism = calibrate(Accounting.ZCDP, sensitivity=1, budget=amount)
    profile = make_zCDP_to_approxDP(mechanism.measurement).map(1)
    reported = epsilon_equivalent(Accounting.ZCDP, amount, delta)
    assert reported >= profile.epsilon(delta)
    assert reported == pytest.approx(
        float(amount) + 2 * math.sqrt(float(amount) * -math.log(delta))
    )


# ---- nothing but the noisy values shapes a release ----

TWO_WORLDS = (
    # Different true counts, sums and shares in every cell, including below and above k.
    [{"personId": i, "g": "A", "age": 3, "f1": 1, "f2": 0, "f3": 1} for i in range(1, 40)]
    + [{"personId": None, "g": "B", "age": 40, "f1": 0, "f2": 1, "f3": 1}] * 2,
    [{"personId": None, "g": "A", "age": -5, "f1": 0, "f2": 1, "f3": 0}] * 3
    + [{"personId": i, "g": "B", "age": 12, "f1": 1, "f2": 1, "f3": 1} for i in range(1, 60)]
    + [{"personId": 500, "g": "C", "age": None, "f1": 1, "f2": 0, "f3": 0}] * 5,
)


def pinned(plan: Plan) -> list[np.ndarray]:
    """Noisy vectors that do not depend on the data: counts alternate tau, tau - 1, tau + 7, and
    the rest of a split count -8, 5, 0 (so that some cells fail on N' + C' alone)."""
    cells = plan.group_cells
    out = []
    for position, component in enumerate(plan.components):
        turn = (np.arange(cells) + position) % 3
        if component.thresholded:
            blocks = [plan.tau + np.array([0, -1, 7])[turn], np.array([-8, 5, 0])[turn]]
            out.append(np.concatenate(blocks[: component.blocks]).astype(np.int64))
        else:
            out.append(np.arange(cells, dtype=np.int64) * 31 - 40)
    return out


def built_from(plan: Plan, noisy: list[np.ndarray]) -> list[np.ndarray]:
    """The noisy counts each published value is built from: a split count's N' and N' + C'."""
    counts = []
    for vector, component in zip(noisy, plan.components, strict=True):
        if component.thresholded:
            blocks = vector.reshape(component.blocks, plan.group_cells)
            counts.extend([blocks[0], blocks.sum(axis=0)] if component.blocks == 2 else blocks)
    return counts


@pytest.mark.parametrize("accounting", list(Accounting))
def test_with_the_noisy_values_pinned_two_different_datasets_release_the_same(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch, accounting: Accounting
) -> None:
    plans: list[Plan] = []

    def add_pinned(self: NoiseAhead, exact: list[np.ndarray]) -> list[np.ndarray]:
        self.discard()
        return pinned(plans[-1])

    codebook = person_codebook(2)
    settings = Settings(accounting=accounting)
    engines = [make_engine(rows, codebook=codebook, settings=settings) for rows in TWO_WORLDS]
    monkeypatch.setattr(NoiseAhead, "add_to", add_pinned)
    for name in ("flags", "proportion", "sum", "mean"):
        plan = engines[0].plan(QUERIES[name], loss=LOSSES[accounting])
        plans.append(plan)
        truths = [e._true_components(plan) for e in engines]
        assert any(not np.array_equal(a, b) for a, b in zip(*truths, strict=True))
        answers = [e.answer(plan) for e in engines]
        assert answers[0].table.equals(answers[1].table), name
        assert answers[0].metadata == answers[1].metadata, name
        # Suppression read the pinned noisy counts: a cell is published exactly when every
        # count it is built from reaches tau, whatever its true count.
        counts = built_from(plan, pinned(plan))
        if name == "flags":
            expected = np.concatenate(counts) >= plan.tau
        else:
            expected = np.logical_and.reduce([c >= plan.tau for c in counts])
        published = ~np.asarray(answers[0].table["suppressed"])
        assert published.tolist() == expected.tolist(), name
        assert 0 < int(expected.sum()) < len(expected), name


def test_the_pinned_comparison_finds_a_release_that_reads_the_data(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Control: noise pinned but added to the true values (the ordinary path with fixed noise)
    # must tell the two worlds apart, or the comparison above could not fail.
    def add_to_truth(self: NoiseAhead, exact: list[np.ndarray]) -> list[np.ndarray]:
        self.discard()
        return [e + z for e, z in zip(exact, pinned(plan), strict=True)]

    codebook = person_codebook(2)
    engines = [make_engine(rows, codebook=codebook) for rows in TWO_WORLDS]
    plan = engines[0].plan(QUERIES["mean"], loss=LOSSES[Accounting.PURE_DP])
    monkeypatch.setattr(NoiseAhead, "add_to", add_to_truth)
    answers = [e.answer(plan) for e in engines]
    assert not answers[0].table.equals(answers[1].table)


def test_zcdp_releases_name_their_mechanism_and_both_scales() -> None:
    p = _plan(QUERIES["mean"], person_codebook(1), Accounting.ZCDP, LOSSES[Accounting.ZCDP])
    sum_mechanism, count_mechanism = p.mechanisms
    assert count_mechanism is p.count_mechanism
    assert sum_mechanism.distribution.mechanism == "discrete_gaussian"
    # Same share, sensitivities 23 and 1: the sum's noise is exactly 23 times the count's.
    assert sum_mechanism.scale == pytest.approx(23 * count_mechanism.scale, rel=1e-9)


def test_the_record_level_codebook_uses_one_row_per_person() -> None:
    p = _plan(
        Query(Mean("yearOfRegistration")),
        default_codebook(),
        Accounting.ZCDP,
        LOSSES[Accounting.ZCDP],
    )
    assert [c.sensitivity for c in p.components] == [2021 - 2011, 1]  # from the middle, 2011
