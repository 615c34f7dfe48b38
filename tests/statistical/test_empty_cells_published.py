"""Empty cells published by chance stay, on average, within the bound each release states.

Each case answers a table whose every cell is empty ANSWERS times, through the engine's own
noise and publication rule, and compares the mean number of published cells with the release's
`expected_empty_published_bound` (cells x p0). The cells of one answer are independent, each
published with probability at most p0, so the count per answer has variance at most
cells x p0 x (1 - p0), and the mean's standard error at most that over ANSWERS, square-rooted.

The check fails when the mean exceeds the bound by more than Z = 5 standard errors: a correct
bound fails it with probability below 3e-7 (normal approximation to a sum of over 10^5
Bernoulli draws). For counts, where every empty cell passes with probability exactly p0, the
mean must also lie within 5 standard errors below the bound, so a bound far too loose fails as
well. With 5 such checks in this file a run fails by chance with probability below 1.5e-6.
A bound computed at tau + 10 (too small) or tau - 5 (too loose) fails them (shown below). (At
tau + 5 a share's check had too little room: its empty cells pass both of its counts' thresholds
less often than the bound, which is only a ceiling for it, and the mean fell within 5 standard
errors of the smaller bound about one run in ten.)
"""

from __future__ import annotations

import math

import pytest

from engine.accuracy import NoiseDistribution
from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.loss import Accounting, PrivacyLoss
from engine.query import Count, Eq, Proportion, Query
from engine.release import ReleaseMetadata
from engine.settings import Settings
from tests.conftest import write_database

Z = 5.0
ANSWERS = 400
WIDE = ("gender", "ageBroad", "citizenshipRegion")  # 320 cells


def published_counts(engine: Engine, query: Query, loss: PrivacyLoss) -> tuple[
    ReleaseMetadata, list[int]
]:
    plan = engine.plan(query, loss=loss)
    answers = [engine.answer(plan) for _ in range(ANSWERS)]
    return answers[0].metadata, [a.metadata.cells - a.metadata.suppressed_cells for a in answers]


def standard_error(meta: ReleaseMetadata, p0: float) -> float:
    return math.sqrt(meta.cells * p0 * (1 - p0) / ANSWERS)


def within_bound(published: list[int], bound: float, se: float) -> bool:
    return sum(published) / len(published) <= bound + Z * se


def near_bound(published: list[int], bound: float, se: float) -> bool:
    return sum(published) / len(published) >= bound - Z * se


CASES = [
    # accounting, loss, query, whether the bound is exact (counts) or only a ceiling
    (Accounting.PURE_DP, "0.1", Query(Count(), by=WIDE), True),
    (Accounting.ZCDP, "0.002", Query(Count(), by=WIDE), True),
    (Accounting.PURE_DP, "0.1", Query(Proportion(Eq("isSexualExploit", 1)), by=WIDE), False),
]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[ReleaseMetadata,
                                                                         list[int]]]:
    out = {}
    for index, (accounting, amount, query, _) in enumerate(CASES):
        path = write_database(tmp_path_factory.mktemp("empty") / "data.duckdb", [])
        engine = Engine(DuckDBBackend(path), codebook=default_codebook(),
                        settings=Settings(accounting=accounting))
        loss = PrivacyLoss(accounting, PrivacyLoss.pure(amount).amount)
        out[index] = published_counts(engine, query, loss)
    return out


@pytest.mark.parametrize("index", range(len(CASES)))
def test_empty_cells_published_stay_within_the_stated_bound(
    samples: dict[int, tuple[ReleaseMetadata, list[int]]], index: int
) -> None:
    meta, published = samples[index]
    p0, bound = meta.empty_pass_probability, meta.expected_empty_published_bound
    assert p0 is not None and bound is not None
    assert bound > 2  # enough empty cells pass for the check to have power
    se = standard_error(meta, p0)
    assert within_bound(published, bound, se)
    if CASES[index][3]:
        assert near_bound(published, bound, se)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_a_bound_computed_at_another_tau_fails_the_same_checks(
    samples: dict[int, tuple[ReleaseMetadata, list[int]]], index: int
) -> None:
    meta, published = samples[index]
    distribution = NoiseDistribution(Accounting(meta.accounting), meta.noise_scale)
    p0 = distribution.tail(meta.tau)
    se = standard_error(meta, p0)
    assert not within_bound(published, meta.cells * distribution.tail(meta.tau + 10), se)
    if CASES[index][3]:
        assert not near_bound(published, meta.cells * distribution.tail(meta.tau - 5), se)


def test_the_checks_have_the_stated_width(
    samples: dict[int, tuple[ReleaseMetadata, list[int]]],
) -> None:
    # The tolerance is a small part of the bound, so the checks above are not vacuous.
    meta, _ = samples[0]
    assert meta.empty_pass_probability is not None
    assert meta.expected_empty_published_bound is not None
    se = standard_error(meta, meta.empty_pass_probability)
    assert Z * se < 0.15 * meta.expected_empty_published_bound

