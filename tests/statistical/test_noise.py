"""Two-sided tests of the noise: they fail on too little noise and on too much.

Each check compares the sample variance of many draws with the distribution's exact variance,
and the share of draws inside the stated 95% interval with its exact probability. Tolerances are
z = 5.3 standard errors, so a correct mechanism fails a single check with probability below
1.2e-7; with 18 such checks in this file (9 draws, two checks each) the chance of a false
failure in a run is below 3e-6.
A mechanism whose scale is off by 20% in either direction fails them (shown below).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine import accuracy, noise
from engine.accuracy import NoiseDistribution, _gaussian_pmf
from engine.errors import QueryCancelledError
from engine.loss import Accounting
from engine.noise import PARALLEL_PART, Mechanism, NoiseAhead, _measurement, calibrate

Z = 5.3
DRAWS = 60_000


def exact_moments(distribution: NoiseDistribution) -> tuple[float, float]:
    """Variance and fourth central moment, computed from the exact pmf."""
    if distribution.accounting is Accounting.PURE_DP:
        bound = int(distribution.scale * 60) + 10
        support = np.arange(-bound, bound + 1).astype(float)
        pmf = np.exp(-np.abs(support) / distribution.scale)
        pmf /= pmf.sum()
    else:
        raw_support, pmf = _gaussian_pmf(distribution.scale)
        support = raw_support.astype(float)
    return float((pmf * support**2).sum()), float((pmf * support**4).sum())


def scale_is_right(mechanism: Mechanism, distribution: NoiseDistribution) -> bool:
    """Do draws from `mechanism` match `distribution` (the one the release path claims)?"""
    return draws_match(mechanism.release(np.zeros(DRAWS, dtype=np.int64)), distribution)


def draws_match(noise: np.ndarray, distribution: NoiseDistribution) -> bool:
    draws = noise.astype(float)
    variance, fourth = exact_moments(distribution)
    variance_se = math.sqrt((fourth - variance**2) / DRAWS)
    variance_ok = abs(draws.var() - variance) <= Z * variance_se
    q = distribution.quantile_abs(0.95)
    p = distribution.within(q)
    inside = float((np.abs(draws) <= q).mean())
    coverage_ok = abs(inside - p) <= Z * math.sqrt(p * (1 - p) / DRAWS)
    return variance_ok and coverage_ok


CASES = [
    (Accounting.PURE_DP, 1, Fraction(1, 2)),
    (Accounting.PURE_DP, 18, Fraction(3)),
    (Accounting.ZCDP, 1, Fraction(1, 8)),
    (Accounting.ZCDP, 1, Fraction(2)),
]


@pytest.mark.parametrize(("accounting", "sensitivity", "budget"), CASES)
def test_calibrated_noise_has_the_claimed_scale(
    accounting: Accounting, sensitivity: int, budget: Fraction
) -> None:
    mechanism = calibrate(accounting, sensitivity=sensitivity, budget=budget)
    assert scale_is_right(mechanism, mechanism.distribution)


@pytest.mark.parametrize(("accounting", "sensitivity", "budget"), [CASES[0], CASES[2]])
@pytest.mark.parametrize("factor", [0.8, 1.25])
def test_a_mechanism_with_the_wrong_scale_fails_the_same_check(
    accounting: Accounting, sensitivity: int, budget: Fraction, factor: float
) -> None:
    claimed = calibrate(accounting, sensitivity=sensitivity, budget=budget)
    wrong_scale = claimed.scale * factor
    broken = Mechanism(
        accounting, wrong_scale, sensitivity, claimed.loss, _measurement(accounting, wrong_scale)
    )
    assert not scale_is_right(broken, claimed.distribution)


def test_charged_loss_is_at_least_opendps_map() -> None:
    for accounting, sensitivity, budget in CASES:
        mechanism = calibrate(accounting, sensitivity=sensitivity, budget=budget)
        assert Fraction(mechanism.measurement.map(sensitivity)) == mechanism.loss <= budget


@pytest.fixture
def fresh_calibration() -> Iterator[None]:
    # calibrate is cached: mechanisms calibrated under a patched scale must not outlive the test.
    calibrate.cache_clear()
    yield
    calibrate.cache_clear()


@pytest.mark.usefixtures("fresh_calibration")
@pytest.mark.parametrize("accounting", list(Accounting))
@pytest.mark.parametrize("factor", [0.5, 0.75, 0.9, 1 - 1e-12])
def test_calibration_never_returns_a_mechanism_costing_more_than_its_budget(
    monkeypatch: pytest.MonkeyPatch, accounting: Accounting, factor: float
) -> None:
    # The analytic scale normally passes at once, so the check of OpenDP's map against the
    # budget is never seen to refuse: with a starting scale that is too small, calibration
    # must fail outright rather than hand out a mechanism that costs more than is charged.
    correct = accuracy.scale_for_share

    def too_small(accounting: Accounting, sensitivity: int, share: Fraction) -> float:
        return correct(accounting, sensitivity, share) * factor

    monkeypatch.setattr(noise, "scale_for_share", too_small)
    for sensitivity, budget in ((1, Fraction(1, 2)), (3, Fraction(2)), (1, Fraction(1, 8))):
        try:
            mechanism = calibrate(accounting, sensitivity=sensitivity, budget=budget)
        except ArithmeticError:
            continue
        assert mechanism.loss <= budget
        assert Fraction(mechanism.measurement.map(sensitivity)) <= budget


def test_noise_is_integer_valued() -> None:
    mechanism = calibrate(Accounting.PURE_DP, sensitivity=1, budget=Fraction(1))
    out = mechanism.release(np.arange(1000, dtype=np.int64))
    assert out.dtype == np.int64 and not np.array_equal(out, np.arange(1000))


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_a_vector_drawn_in_parts_has_the_same_distribution(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    # The same two-sided check, on one thread and on the path that splits a large vector into
    # parts drawn on several threads.
    monkeypatch.setattr(noise, "_threads", threads)
    monkeypatch.setattr(noise, "_pool", None)
    mechanism = calibrate(Accounting.PURE_DP, sensitivity=1, budget=Fraction(1, 2))
    assert threads * PARALLEL_PART <= DRAWS
    assert scale_is_right(mechanism, mechanism.distribution)


def test_parts_come_back_in_order_and_are_not_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(noise, "_threads", 4)
    monkeypatch.setattr(noise, "_pool", None)
    mechanism = calibrate(Accounting.PURE_DP, sensitivity=1, budget=Fraction(1))
    true = np.arange(4 * PARALLEL_PART, dtype=np.int64) * 1000
    noisy = mechanism.release(true)
    # Scale 1: a part out of place would be off by thousands; a P(|noise| >= 500) is ~e^-500.
    assert noisy.shape == true.shape and np.abs(noisy - true).max() < 500
    parts = np.split(noisy - true, 4)
    assert not any(np.array_equal(parts[0], other) for other in parts[1:])


def test_noise_drawn_ahead_is_fresh_additive_noise_of_each_mechanism() -> None:
    # The answer path draws its noise while the data is read, then adds it: the sums must carry
    # each mechanism's own distribution, in each mechanism's place, and no draw is served twice.
    mechanisms = [
        calibrate(Accounting.PURE_DP, sensitivity=1, budget=Fraction(1, 2)),
        calibrate(Accounting.ZCDP, sensitivity=1, budget=Fraction(2)),
    ]
    true = [np.arange(DRAWS, dtype=np.int64) * 7, np.full(DRAWS, 10**9, dtype=np.int64)]
    first = NoiseAhead(mechanisms, [DRAWS, DRAWS]).add_to(true)
    second = NoiseAhead(mechanisms, [DRAWS, DRAWS]).add_to(true)
    for mechanism, values, one, two in zip(mechanisms, true, first, second, strict=True):
        assert draws_match(one - values, mechanism.distribution)
        assert draws_match(two - values, mechanism.distribution)
        assert not np.array_equal(one, two)


def test_noise_drawn_ahead_in_chunks_draws_each_chunk_afresh() -> None:
    # A large answer's noise is drawn AHEAD_CHUNK values at a time; reusing one chunk's draws
    # for the next would give cells AHEAD_CHUNK apart the same noise, which no privacy map
    # covers (their difference would be exact). Three whole chunks and a part of one, for a
    # discrete Laplace and a discrete Gaussian of scale about 10.
    chunk = noise.AHEAD_CHUNK
    size = 3 * chunk + 1000
    mechanisms = [
        calibrate(Accounting.PURE_DP, sensitivity=1, budget=Fraction(1, 10)),
        calibrate(Accounting.ZCDP, sensitivity=1, budget=Fraction(1, 200)),
    ]
    drawn = NoiseAhead(mechanisms, [size, size]).add_to([np.zeros(size, dtype=np.int64)] * 2)
    for z in drawn:
        assert z.shape == (size,)
        chunks = [z[start : start + chunk] for start in range(0, size, chunk)]
        # Exact equality: at scale 10 no value has probability above 0.05, so two independent
        # runs of n values agree with probability below 0.05**n, 0.05**1000 for the shortest
        # comparison here: it never happens by chance.
        for i, one in enumerate(chunks):
            for other in chunks[i + 1 :]:
                assert not np.array_equal(one[: other.size], other[: one.size])
        # Correlation between whole chunks: for independent draws it has standard deviation
        # 1/sqrt(32768) = 0.0055, so 0.1 is 18 of them (a chance of about 1e-70 under the normal
        # approximation; the sixth-moment bound 15 / (n^3 * 0.1^6), which needs no normality,
        # is 4e-7 per pair). Reused noise has correlation 1.
        whole = chunks[:3]
        for i, one in enumerate(whole):
            for other in whole[i + 1 :]:
                assert abs(np.corrcoef(one, other)[0, 1]) < 0.1


class _Gated:
    """A stand-in mechanism whose first chunk waits for the test, counting the chunks drawn."""

    def __init__(self) -> None:
        self.chunks = 0
        self.started = threading.Event()
        self.gate = threading.Event()

    def noise(self, size: int) -> np.ndarray:
        self.chunks += 1
        self.started.set()
        self.gate.wait(10)
        return np.zeros(size, dtype=np.int64)


def test_discarded_noise_stops_within_a_chunk_and_is_never_handed_out() -> None:
    gated = _Gated()
    ahead = NoiseAhead([gated], [100 * noise.AHEAD_CHUNK])  # type: ignore[list-item]
    assert gated.started.wait(10)  # the draw is under way
    ahead.discard()
    gated.gate.set()
    with pytest.raises(QueryCancelledError):
        ahead.add_to([np.zeros(100 * noise.AHEAD_CHUNK, dtype=np.int64)])
    with pytest.raises(QueryCancelledError):
        ahead._future.result(timeout=10)
    assert gated.chunks <= 1  # not the hundred chunks the answer would have needed


def test_noise_drawn_ahead_is_added_once() -> None:
    mechanism = calibrate(Accounting.PURE_DP, sensitivity=1, budget=Fraction(1))
    ahead = NoiseAhead([mechanism], [8])
    ahead.add_to([np.zeros(8, dtype=np.int64)])
    with pytest.raises(RuntimeError, match="already"):
        ahead.add_to([np.zeros(8, dtype=np.int64)])


def test_noise_drawn_ahead_is_never_spread_over_more_values_than_it_was_drawn_for() -> None:
    # numpy would add one draw to every entry of a longer vector (broadcasting): correlated
    # noise, which no privacy map covers. A vector of another length is refused instead.
    mechanism = calibrate(Accounting.PURE_DP, sensitivity=1, budget=Fraction(1))
    with pytest.raises(ValueError, match="2 values for 1 draws"):
        NoiseAhead([mechanism], [1]).add_to([np.zeros(2, dtype=np.int64)])
    with pytest.raises(ValueError, match="one vector size per mechanism"):
        NoiseAhead([mechanism, mechanism], [1])


def test_a_failed_scan_discards_the_noise_drawn_for_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from engine.backend import DuckDBBackend
    from engine.codebook import default_codebook
    from engine.engine import Engine
    from engine.loss import PrivacyLoss
    from engine.query import Count, Query
    from tests.conftest import write_database

    class FailingBackend:
        def run(self, statement: object, *, cancel: object = None) -> dict[str, np.ndarray]:
            raise QueryCancelledError("the query was cancelled while it ran")

        def data_version(self) -> str:
            return "v1"

        def codebook(self) -> str | None:
            return None

        def dataset(self) -> str | None:
            return None

        def load_id(self) -> str | None:
            return None

    discarded: list[NoiseAhead] = []
    original = NoiseAhead.discard
    monkeypatch.setattr(
        NoiseAhead, "discard", lambda self: (discarded.append(self), original(self))
    )
    data = write_database(tmp_path / "d.duckdb", [])
    engine = Engine(DuckDBBackend(data), codebook=default_codebook())
    engine.backend = FailingBackend()  # type: ignore[assignment]
    plan = engine.plan(Query(Count(), by=("citizenship",)), loss=PrivacyLoss.pure("1"))
    with pytest.raises(QueryCancelledError):
        engine.answer(plan)
    assert len(discarded) == 1 and discarded[0]._stop.is_set()
