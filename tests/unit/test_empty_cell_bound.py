"""The bound on empty cells published by chance: cells x p0, from the plan alone.

p0 is recomputed here without engine.accuracy: the discrete Laplace tail a^t / (1 + a) with
a = exp(-1 / scale), and the discrete Gaussian tail summed term by term from its pmf.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.engine import Engine
from engine.loss import Accounting, PrivacyLoss
from engine.query import Count, Eq, FlagCounts, Mean, Proportion, Query, Sum
from engine.release import Release, ReleaseMetadata
from engine.settings import Settings
from server import convert

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "release-before-empty-bound.arrows"
WIDE = ("gender", "ageBroad", "citizenshipRegion")  # 4 x 10 x 8 = 320 cells
ROWS = [{"gender": "Female", "ageBroad": "9--17", "isSexualExploit": 1,
         "yearOfRegistration": 2010}] * 30


def laplace_tail(scale: float, t: int) -> float:
    a = math.exp(-1.0 / scale)
    return a**t / (1.0 + a)


def gaussian_tail(scale: float, t: int) -> float:
    bound = int(scale * 40) + 10
    weight = [math.exp(-(z * z) / (2 * scale * scale)) for z in range(-bound, bound + 1)]
    return sum(w for z, w in zip(range(-bound, bound + 1), weight, strict=True) if z >= t) / sum(
        weight
    )


def independent_p0(meta: ReleaseMetadata) -> float:
    tail = laplace_tail if meta.accounting == "pure_dp" else gaussian_tail
    return tail(meta.noise_scale, meta.tau)


CASES = [
    (Accounting.PURE_DP, "0.1", Query(Count(), by=WIDE)),
    (Accounting.PURE_DP, "0.5", Query(Count(), by=("gender", "ageBroad"))),
    (Accounting.PURE_DP, "2", Query(FlagCounts("meansOfControl"), by=("gender",))),
    (Accounting.PURE_DP, "0.3", Query(Proportion(Eq("isSexualExploit", 1)), by=("gender",))),
    (Accounting.PURE_DP, "0.4", Query(Mean("yearOfRegistration"), by=("ageBroad",))),
    (Accounting.ZCDP, "0.01", Query(Count(), by=WIDE)),
    (Accounting.ZCDP, "0.05", Query(Sum("yearOfRegistration"), by=("gender",))),
    (Accounting.ZCDP, "0.02", Query(Proportion(Eq("isSexualExploit", 1)), by=("ageBroad",))),
]


@pytest.mark.parametrize(("accounting", "amount", "query"), CASES)
def test_the_bound_is_cells_times_the_chance_an_empty_cell_passes(
    make_engine: Callable[..., Engine], accounting: Accounting, amount: str, query: Query
) -> None:
    engine = make_engine(ROWS, settings=Settings(accounting=accounting))
    loss = PrivacyLoss(accounting, PrivacyLoss.pure(amount).amount)
    meta = engine.answer(engine.plan(query, loss=loss)).metadata
    p0 = independent_p0(meta)
    assert 0 < p0 < 0.05  # below beta: a cell of 0 is further from tau than one of k - 1
    assert meta.empty_pass_probability == pytest.approx(p0, rel=1e-9, abs=0)
    assert meta.expected_empty_published_bound == pytest.approx(meta.cells * p0, rel=1e-9, abs=0)
    # Priced before paying: the dry run states the same two numbers.
    dry = engine.dry_run(query, loss=loss)
    assert (dry.empty_pass_probability, dry.expected_empty_published_bound) == (
        meta.empty_pass_probability, meta.expected_empty_published_bound
    )
    assert dry.cells == meta.cells and dry.tau == meta.tau


def test_the_example_from_the_researchers_journey(make_engine: Callable[..., Engine]) -> None:
    # count by gender, ageBroad, citizenshipRegion at epsilon 0.1: tau 33 over 320 cells.
    dry = make_engine([]).dry_run(Query(Count(), by=WIDE), loss=PrivacyLoss.pure("0.1"))
    assert (dry.cells, dry.tau) == (320, 33)
    assert dry.empty_pass_probability == pytest.approx(laplace_tail(10, 33), rel=1e-9, abs=0)
    assert dry.expected_empty_published_bound == pytest.approx(6.196, abs=1e-3)


def test_the_bound_reads_no_data(make_engine: Callable[..., Engine]) -> None:
    query, loss = Query(Count(), by=WIDE), PrivacyLoss.pure("0.1")
    empty, full = make_engine([]), make_engine(ROWS * 5)
    first = empty.answer(empty.plan(query, loss=loss)).metadata
    second = full.answer(full.plan(query, loss=loss)).metadata
    assert first.expected_empty_published_bound == second.expected_empty_published_bound
    assert first.empty_pass_probability == second.empty_pass_probability


def test_a_release_stored_before_the_bound_still_decodes_and_replays_byte_for_byte() -> None:
    data = FIXTURE.read_bytes()
    assert b"empty_pass_probability" not in data  # written by the code before this field
    stored = Release.from_bytes(data)
    assert stored.metadata.release_id == "rel_old" and stored.metadata.tau == 15
    assert stored.metadata.empty_pass_probability is None
    assert stored.metadata.expected_empty_published_bound is None
    assert stored.to_bytes() is data
    wire = convert.release_to_pb(stored)
    assert wire.arrow_ipc == data
    assert not wire.metadata.HasField("empty_pass_probability")
    assert not wire.metadata.HasField("expected_empty_published_bound")


def test_a_new_release_carries_the_bound_in_its_bytes_and_on_the_wire(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine(ROWS)
    answer = engine.answer(engine.plan(Query(Count(), by=WIDE), loss=PrivacyLoss.pure("0.1")))
    release = Release.from_answer(answer, release_id="r1", charge_id="c1", created_at="t")
    again = Release.from_bytes(release.to_bytes())
    assert again.metadata == release.metadata
    assert dataclasses.asdict(again.metadata)["expected_empty_published_bound"] > 6
    wire = convert.release_to_pb(release).metadata
    assert wire.empty_pass_probability == release.metadata.empty_pass_probability
    assert wire.expected_empty_published_bound == release.metadata.expected_empty_published_bound
    dry = convert.dry_run_to_pb(engine.dry_run(Query(Count(), by=WIDE), loss=PrivacyLoss.pure(
        "0.1")), already_released=False)
    assert dry.expected_empty_published_bound == wire.expected_empty_published_bound
    assert dry.empty_pass_probability == wire.empty_pass_probability


def test_a_dry_run_of_a_stored_release_states_that_release_s_own_empty_cells(
    tmp_path: Path,
) -> None:
    # A request would get the stored release back, so the dry run states its numbers as it was
    # made: none, for one made before they were recorded; a fresh query's are the plan's.
    from protos.veil.v1 import veil_pb2 as pb
    from server.app import build_engine, start
    from server.auth import Role
    from tests.conftest import write_database
    from tests.server_harness import MemoryAccounts, bearer, live_config, stubs

    config = live_config(tmp_path, write_database(tmp_path / "d.duckdb", ROWS))
    engine = build_engine(config)
    accounts = MemoryAccounts()
    token = accounts.add("alice", Role.RESEARCHER)
    old = Release.from_bytes(FIXTURE.read_bytes())
    minors = Query(Count(), by=("majorityStatus",), where=Eq("majorityStatus", "Minor"))
    stored = engine.plan(minors, loss=PrivacyLoss.pure(old.metadata.loss))
    accounts.releases_by_fingerprint[stored.fingerprint] = old
    fresh = Query(FlagCounts("meansOfControl"), by=("majorityStatus",),
                  where=Eq("majorityStatus", "Minor"))
    running = start(config, engine=engine, accounts=accounts)
    try:
        with stubs(running.port) as s:
            def dry(query: Query) -> pb.DryRunResponse:
                request = pb.DryRunRequest(query=convert.query_to_pb(query), loss=old.metadata.loss)
                return s.research.DryRun(request, metadata=bearer(token))

            replayed, priced = dry(minors), dry(fresh)
    finally:
        running.stop(0)
    assert replayed.already_released
    for name in ("empty_pass_probability", "expected_empty_published_bound", "unreachable_cells"):
        assert not replayed.HasField(name), name
    assert not priced.already_released
    assert (priced.cells, priced.unreachable_cells) == (72, 54)  # 18 flags x 3 statuses out
    assert priced.expected_empty_published_bound == pytest.approx(
        18 * priced.empty_pass_probability
    )
