"""The privacy-budget ledger: exact caps, charge before release, retries, replays, durability."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from engine.backend import Cancellation, DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import (
    BudgetExceededError,
    ClientRegistryError,
    InvalidLossError,
    LedgerIntegrityError,
    LedgerUnavailableError,
    QueryCancelledError,
    RequestConflictError,
    RevokedClientError,
    UnknownClientError,
    VeilError,
)
from engine.ledger import Ledger
from engine.ledger_cli import main as ledger_cli
from engine.ledger_format import ENTRY_FIELDS
from engine.loss import Accounting, PrivacyLoss, parse_amount
from engine.query import Count, Query, Range
from engine.release import Release
from tests.conftest import write_database

CODEBOOK = default_codebook()
# Distinctive true counts: the audit-log test looks for them and must not find them.
ROWS = [{"gender": "Male", "yearOfRegistration": 2010, "Datasource": "Hotline"}] * 4711 + [
    {"gender": "Female", "yearOfRegistration": 2015, "ageBroad": "18--20"}
] * 2903
EPS = PrivacyLoss.pure("0.1")
BY = ((), ("gender",), ("ageBroad",), ("Datasource",))


def distinct_query(i: int) -> Query:
    """Up to 80 queries with distinct canonical fingerprints."""
    return Query(Count(), by=BY[i // 20], where=Range("yearOfRegistration", high=2002 + i % 20))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_database(tmp_path_factory.mktemp("data") / "data.duckdb", ROWS, data_version="v1")
    return Engine(DuckDBBackend(path), codebook=CODEBOOK)


@pytest.fixture
def open_ledger(tmp_path: Path, engine: Engine) -> Iterator[Callable[..., Ledger]]:
    opened: list[Ledger] = []

    def build(**options: Any) -> Ledger:
        settings: dict[str, Any] = {
            "accounting": Accounting.PURE_DP,
            "dataset_cap": "10",
            "dataset": engine.dataset,
            "data_version": engine.data_version,
        }
        settings.update(options)
        ledger = Ledger.open(settings.pop("path", tmp_path / "ledger.sqlite"), **settings)
        opened.append(ledger)
        return ledger

    yield build
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(open_ledger: Callable[..., Ledger]) -> Ledger:
    ledger = open_ledger()
    ledger.register_client("alice", role="researcher", institution="iom", cap="1")
    ledger.register_client("bob", role="researcher", institution="iom", cap="1")
    ledger.register_client("carol", role="researcher", cap="1")
    return ledger


def release(
    engine: Engine,
    ledger: Ledger,
    client: str,
    request_id: str,
    query: Query | None = None,
    loss: PrivacyLoss = EPS,
) -> Release:
    return engine.release(
        query or distinct_query(0), loss=loss, charger=ledger, client=client, request_id=request_id
    )


def assert_verified(ledger: Ledger) -> None:
    result = ledger.verify()
    assert result.ok, result.problems


# ---- the race --------------------------------------------------------------------------------


@pytest.mark.parametrize("binding", ["client", "institution", "dataset"])
def test_race_64_threads_spend_exactly_the_cap(
    engine: Engine, open_ledger: Callable[..., Ledger], binding: str
) -> None:
    """64 threads released at once, 0.1 each against 1.0 left: exactly 10 charges, total 1.0."""
    ledger = open_ledger(dataset_cap="1" if binding == "dataset" else "100")
    if binding == "institution":
        ledger.set_institution_cap("iom", "1")
    clients = ["solo"] if binding == "client" else [f"c{i}" for i in range(64)]
    for client in clients:
        cap = "1" if binding == "client" else "10"
        ledger.register_client(client, role="researcher", institution="iom", cap=cap)

    barrier = threading.Barrier(64)
    released: list[Release] = []
    refused: list[BudgetExceededError] = []
    other: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        client = clients[i % len(clients)]
        barrier.wait()
        try:
            result = release(engine, ledger, client, f"race-{i}", distinct_query(i))
        except BudgetExceededError as exc:
            with lock:
                refused.append(exc)
        except BaseException as exc:
            with lock:
                other.append(exc)
        else:
            with lock:
                released.append(result)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert other == []
    assert len(released) == 10
    assert len(refused) == 54
    assert {e.scope for e in refused} == {binding}
    name = {"client": "solo", "institution": "iom", "dataset": engine.dataset}[binding]
    budget = ledger.budget(binding, name)
    assert budget.spent == Fraction(1)  # exactly, not 0.9999999999999999
    assert budget.held == 0
    charges = [c for c in ledger.charges() if c.state == "committed"]
    assert len(charges) == 10
    assert sum((c.amount for c in charges), Fraction(0)) == Fraction(1)
    assert sorted(r.metadata.charge_id for r in released) == sorted(c.charge_id for c in charges)
    assert_verified(ledger)


# ---- exact amounts and validation ------------------------------------------------------------


def test_amounts_are_exact_rationals(engine: Engine, ledger: Ledger) -> None:
    third = PrivacyLoss(Accounting.PURE_DP, Fraction(1, 3))
    for i in range(3):
        release(engine, ledger, "carol", f"third-{i}", distinct_query(i), third)
    assert ledger.spent("carol") == Fraction(1)
    assert ledger.remaining("carol") == 0
    with pytest.raises(BudgetExceededError) as refused:
        release(
            engine, ledger, "carol", "one-more", distinct_query(3), PrivacyLoss.pure("0.000001")
        )
    assert refused.value.scope == "client"
    assert refused.value.remaining == "0"
    assert "client budget of carol" in str(refused.value)
    tenth = [
        release(engine, ledger, "alice", f"tenth-{i}", distinct_query(10 + i)) for i in range(10)
    ]
    assert len(tenth) == 10
    assert ledger.spent("alice") == Fraction(1)
    assert ledger.budget("client", "alice").to_dict(Accounting.PURE_DP, 1e-6)["spent"] == "1"
    assert_verified(ledger)


@pytest.mark.parametrize(
    "amount", [float("nan"), float("inf"), -float("inf"), 0, -0.1, "0", "-1", 1e-30, 1e30, "abc"]
)
def test_invalid_losses_are_refused(amount: Any) -> None:
    with pytest.raises(InvalidLossError):
        PrivacyLoss.pure(amount)
    with pytest.raises(InvalidLossError):
        PrivacyLoss.zcdp(amount)


def test_ledger_refuses_out_of_range_and_foreign_losses(engine: Engine, ledger: Ledger) -> None:
    tiny = PrivacyLoss(Accounting.PURE_DP, Fraction(1, 10**9))
    plan = engine.plan(distinct_query(0), loss=EPS)
    with pytest.raises(InvalidLossError, match="between"):
        ledger.reserve(replace(plan, loss=tiny), client="alice", request_id="t")
    zcdp = replace(plan, loss=PrivacyLoss.zcdp("0.1"))
    with pytest.raises(InvalidLossError, match="pure_dp"):
        ledger.reserve(zcdp, client="alice", request_id="z")
    refusals = [e.entry for e in ledger.audit_log() if e.entry["event"] == "refused"]
    assert [e["outcome"] for e in refusals] == ["invalid_loss", "invalid_loss"]
    assert ledger.charges() == []


@pytest.mark.parametrize("cap", [float("nan"), float("inf"), -1, "-0.5", 1e-30, 1e30, True, "lots"])
def test_invalid_caps_are_refused(ledger: Ledger, cap: Any) -> None:
    with pytest.raises(VeilError):
        ledger.register_client("dave", role="researcher", cap=cap)
    with pytest.raises(VeilError):
        ledger.set_cap("alice", cap)
    with pytest.raises(VeilError):
        ledger.set_institution_cap("iom", cap)


def test_zero_cap_allows_only_free_replays(engine: Engine, ledger: Ledger) -> None:
    ledger.register_client("reader", role="auditor", cap=0)
    with pytest.raises(BudgetExceededError):
        release(engine, ledger, "reader", "r1")
    first = release(engine, ledger, "alice", "a1")
    assert release(engine, ledger, "reader", "r2").to_bytes() == first.to_bytes()
    assert ledger.spent("reader") == 0


def test_invalid_delta_and_accounting_change_are_refused(
    open_ledger: Callable[..., Ledger], tmp_path: Path
) -> None:
    with pytest.raises(InvalidLossError):
        open_ledger(path=tmp_path / "d.sqlite", delta=0)
    with pytest.raises(InvalidLossError):
        open_ledger(path=tmp_path / "d.sqlite", delta=1.5)
    open_ledger(path=tmp_path / "e.sqlite").close()
    with pytest.raises(VeilError, match="cannot change"):
        open_ledger(path=tmp_path / "e.sqlite", accounting=Accounting.ZCDP)


# ---- charge before release -------------------------------------------------------------------


def test_release_carries_its_charge(engine: Engine, ledger: Ledger) -> None:
    result = release(engine, ledger, "alice", "r1")
    (charge,) = ledger.charges()
    assert result.metadata.charge_id == charge.charge_id
    assert result.metadata.release_id == charge.release_id
    assert charge.state == "committed" and charge.amount == Fraction(1, 10)
    events = [e.entry["event"] for e in ledger.audit_log()]
    assert events[-2:] == ["reserve", "release"]
    stored = ledger.release(result.metadata.release_id)
    assert stored.to_bytes() == result.to_bytes()
    # What the caller holds is what the stored bytes say, table and metadata alike.
    assert stored.table.equals(result.table) and stored.metadata == result.metadata
    with pytest.raises(ValueError, match="charge id"):
        Release(result.table, replace(result.metadata, charge_id=""))


def test_failed_computation_cancels_the_reservation(engine: Engine, ledger: Ledger) -> None:
    cancelled = Cancellation()
    cancelled.set()
    with pytest.raises(QueryCancelledError):
        engine.release(
            distinct_query(0),
            loss=EPS,
            charger=ledger,
            client="alice",
            request_id="r1",
            cancel=cancelled,
        )
    assert ledger.spent("alice") == 0 and ledger.budget("client", "alice").held == 0
    (charge,) = ledger.charges()
    assert (charge.state, charge.reason) == ("cancelled", "cancelled")
    assert ledger.audit_log()[-1].entry["event"] == "cancel"
    # The request was never answered: its retry computes and is charged once.
    release(engine, ledger, "alice", "r1")
    assert ledger.spent("alice") == Fraction(1, 10)
    assert_verified(ledger)


def test_failure_inside_commit_releases_nothing(
    engine: Engine, open_ledger: Callable[..., Ledger]
) -> None:
    failing = {"after_compute"}

    def hooks(point: str) -> None:
        if point in failing:
            raise RuntimeError(f"injected failure at {point}")

    ledger = open_ledger(hooks=hooks)
    ledger.register_client("alice", role="researcher", cap="1")
    with pytest.raises(RuntimeError, match="after_compute"):
        release(engine, ledger, "alice", "r1")
    assert ledger.releases() == [] and ledger.spent("alice") == 0
    assert ledger.budget("client", "alice").held == 0
    # The commit settles its own hold, saying why, before the engine's cancel would.
    (charge,) = ledger.charges()
    assert (charge.state, charge.reason) == ("cancelled", "commit_failed")
    failing.clear()
    release(engine, ledger, "alice", "r1")
    assert ledger.spent("alice") == Fraction(1, 10)
    assert_verified(ledger)


def test_failure_after_commit_serves_the_stored_release_on_retry(
    engine: Engine, open_ledger: Callable[..., Ledger]
) -> None:
    failing = {"after_commit"}

    def hooks(point: str) -> None:
        if point in failing:
            raise RuntimeError(f"injected failure at {point}")

    ledger = open_ledger(hooks=hooks)
    ledger.register_client("alice", role="researcher", cap="1")
    with pytest.raises(RuntimeError, match="after_commit"):
        release(engine, ledger, "alice", "r1")
    (stored,) = ledger.releases()
    assert ledger.spent("alice") == Fraction(1, 10)
    failing.clear()
    retried = release(engine, ledger, "alice", "r1")
    assert retried.metadata.release_id == stored.release_id
    assert ledger.spent("alice") == Fraction(1, 10)
    assert_verified(ledger)


def test_reservation_refuses_an_answer_for_another_query(engine: Engine, ledger: Ledger) -> None:
    reservation = ledger.reserve(
        engine.plan(distinct_query(0), loss=EPS), client="alice", request_id="r1"
    )
    other = engine.answer(engine.plan(distinct_query(1), loss=EPS))
    with pytest.raises(VeilError, match="does not match"):
        reservation.commit(other)
    assert ledger.releases() == [] and ledger.budget("client", "alice").held == 0


def test_reservation_refuses_an_answer_made_at_another_loss(engine: Engine, ledger: Ledger) -> None:
    # The fingerprint names the query, not the loss: an answer computed with more loss (less
    # noise) than was reserved and charged must not be stored or sent under the smaller charge.
    plan = engine.plan(distinct_query(0), loss=EPS)
    louder = engine.answer(engine.plan(distinct_query(0), loss=PrivacyLoss.pure("0.2")))
    relabelled = engine.answer(plan)
    relabelled = replace(relabelled, metadata=replace(relabelled.metadata, loss="0.2"))
    for i, answer in enumerate((louder, relabelled)):
        assert answer.metadata.fingerprint == plan.fingerprint
        reservation = ledger.reserve(plan, client="alice", request_id=f"loss-{i}")
        with pytest.raises(VeilError, match="does not match"):
            reservation.commit(answer)
    assert ledger.releases() == []
    assert ledger.spent("alice") == 0 and ledger.budget("client", "alice").held == 0
    charges = ledger.charges()
    assert [(c.state, c.reason, c.release_id) for c in charges] == [
        ("cancelled", "commit_failed", None)
    ] * 2
    assert_verified(ledger)


# ---- retries and replays ---------------------------------------------------------------------


def test_retry_returns_the_stored_bytes_without_a_second_charge(
    engine: Engine, ledger: Ledger
) -> None:
    first = release(engine, ledger, "alice", "r1")
    for _ in range(3):
        assert release(engine, ledger, "alice", "r1").to_bytes() == first.to_bytes()
    assert ledger.spent("alice") == Fraction(1, 10)
    assert [c.kind for c in ledger.charges()] == ["charge"]
    assert [e.entry["event"] for e in ledger.audit_log()][-3:] == ["retry"] * 3


def test_same_request_id_with_another_query_or_loss_is_refused(
    engine: Engine, ledger: Ledger
) -> None:
    release(engine, ledger, "alice", "r1", distinct_query(0))
    with pytest.raises(RequestConflictError):
        release(engine, ledger, "alice", "r1", distinct_query(1))
    with pytest.raises(RequestConflictError):
        release(engine, ledger, "alice", "r1", distinct_query(0), PrivacyLoss.pure("0.2"))
    # Request ids belong to their client: bob may use "r1" too.
    release(engine, ledger, "bob", "r1", distinct_query(1))
    assert ledger.spent("alice") == Fraction(1, 10)
    outcomes = [e.entry["outcome"] for e in ledger.audit_log() if e.entry["event"] == "refused"]
    assert outcomes == ["request_conflict", "request_conflict"]


def test_concurrent_retries_of_one_request_share_one_charge(engine: Engine, ledger: Ledger) -> None:
    barrier = threading.Barrier(8)
    results: list[bytes] = []

    def run() -> None:
        barrier.wait()
        results.append(release(engine, ledger, "alice", "same").to_bytes())

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert ledger.spent("alice") == Fraction(1, 10)
    assert_verified(ledger)


def test_replay_is_free_to_any_client_and_recorded(engine: Engine, ledger: Ledger) -> None:
    first = release(engine, ledger, "alice", "a1")
    replayed = release(engine, ledger, "carol", "c1", loss=PrivacyLoss.pure("0.05"))
    assert replayed.to_bytes() == first.to_bytes()
    assert ledger.spent("carol") == 0
    (record,) = ledger.releases()
    assert record.replays == 1 and record.client == "alice"
    replay = ledger.charges(client="carol")[0]
    assert (replay.kind, replay.release_id) == ("replay", record.release_id)
    assert replay.amount == 0
    assert ledger.audit_log()[-1].entry["event"] == "replay"
    # A retry of the replaying request returns the same bytes again.
    again = release(engine, ledger, "carol", "c1", loss=PrivacyLoss.pure("0.05"))
    assert again.to_bytes() == first.to_bytes()
    assert_verified(ledger)


def test_the_replayed_release_is_the_largest_loss_of_the_query_on_its_version(
    engine: Engine, ledger: Ledger
) -> None:
    query = distinct_query(3)
    fingerprint = engine.plan(query, loss=EPS).fingerprint
    version = engine.data_version
    assert ledger.replayed_release(fingerprint, version, Fraction(1, 10)) is None
    # As text "1/7" sorts after "0.15"; as numbers it is the smaller.
    release(engine, ledger, "alice", "a1", query, loss=PrivacyLoss.pure(Fraction(1, 7)))
    release(engine, ledger, "bob", "b1", query, loss=PrivacyLoss.pure("0.15"))
    assert len(ledger.releases()) == 2
    release(engine, ledger, "carol", "c1", distinct_query(4), loss=PrivacyLoss.pure("0.5"))
    release(engine, ledger, "carol", "c2", query, loss=PrivacyLoss.pure("0.12"))  # a replay
    for asked in (Fraction(12, 100), Fraction(15, 100)):
        best = ledger.replayed_release(fingerprint, version, asked)
        assert best is not None and parse_amount(best.loss) == Fraction(15, 100)
    # Above the largest loss a request is drawn afresh, as the reservation does.
    assert ledger.replayed_release(fingerprint, version, Fraction(16, 100)) is None
    again = release(engine, ledger, "carol", "c3", query, loss=PrivacyLoss.pure("0.16"))
    assert parse_amount(again.metadata.loss) == Fraction(16, 100) and len(ledger.releases()) == 4
    assert ledger.replayed_release(fingerprint, "another-version", Fraction(1, 10)) is None


def test_a_release_made_under_another_suppression_rule_is_not_replayed(
    engine: Engine, ledger: Ledger
) -> None:
    from engine.settings import Settings

    stricter = Engine(engine.backend, codebook=CODEBOOK, settings=Settings(k=20))
    first = release(engine, ledger, "alice", "a1")
    # After the custodian raises k, the query is answered afresh under the new rule, and charged.
    raised = release(stricter, ledger, "bob", "b1")
    assert raised.metadata.tau > first.metadata.tau
    assert raised.to_bytes() != first.to_bytes() and ledger.spent("bob") == EPS.amount
    # Under the first rule, the first release is still the one replayed.
    again = release(engine, ledger, "carol", "c1")
    assert again.to_bytes() == first.to_bytes() and ledger.spent("carol") == 0
    assert_verified(ledger)


def test_received_lists_a_clients_releases_oldest_first(engine: Engine, ledger: Ledger) -> None:
    mine = [release(engine, ledger, "alice", f"a{i}", distinct_query(i)) for i in range(3)]
    replayed = release(engine, ledger, "alice", "a3", distinct_query(30))
    release(engine, ledger, "bob", "b1", distinct_query(30), loss=PrivacyLoss.pure("0.2"))
    release(engine, ledger, "alice", "a4", distinct_query(30), loss=PrivacyLoss.pure("0.15"))
    got = ledger.received("alice")
    assert [r.release_id for _, r in got] == [
        *(m.metadata.release_id for m in mine),
        replayed.metadata.release_id,
        ledger.releases(client="bob")[0].release_id,
    ]
    assert [c.kind for c, _ in got][-1] == "replay" and got[-1][0].amount == 0
    assert [r.release_id for _, r in ledger.received("alice", last=2)] == [
        r.release_id for _, r in got[-2:]
    ]
    first = mine[0].metadata.release_id
    assert [r.release_id for _, r in ledger.received("alice", release_id=first)] == [first]
    assert ledger.received("bob", release_id=first) == []


def test_a_more_accurate_request_is_charged_and_then_wins(engine: Engine, ledger: Ledger) -> None:
    coarse = release(engine, ledger, "alice", "a1")
    fine = release(engine, ledger, "bob", "b1", loss=PrivacyLoss.pure("0.2"))
    assert fine.to_bytes() != coarse.to_bytes()
    assert ledger.spent("bob") == Fraction(2, 10)
    later = release(engine, ledger, "carol", "c1")
    assert later.to_bytes() == fine.to_bytes()
    assert ledger.spent("carol") == 0


def test_concurrent_requests_for_a_new_query_draw_noise_once(
    engine: Engine, open_ledger: Callable[..., Ledger]
) -> None:
    ledger = open_ledger()
    for i in range(8):
        ledger.register_client(f"c{i}", role="researcher", cap="1")
    barrier = threading.Barrier(8)
    results: list[bytes] = []

    def run(i: int) -> None:
        barrier.wait()
        results.append(release(engine, ledger, f"c{i}", f"r{i}").to_bytes())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert len(ledger.releases()) == 1
    assert sum((c.amount for c in ledger.charges()), Fraction(0)) == Fraction(1, 10)
    assert_verified(ledger)


def test_every_data_version_of_the_dataset_pays_from_one_cap(
    engine: Engine, open_ledger: Callable[..., Ledger], tmp_path: Path
) -> None:
    """A new version of the same people (a corrected file) neither replays the old version's
    releases nor gets a fresh dataset cap: the people in it have already paid."""
    ledger = open_ledger(dataset_cap="0.25")
    ledger.register_client("alice", role="researcher", cap="1")
    ledger.register_client("bob", role="researcher", cap="1")
    v2 = Engine(
        DuckDBBackend(write_database(tmp_path / "v2.duckdb", ROWS[:100], data_version="v2")),
        codebook=CODEBOOK,
    )
    assert v2.dataset == engine.dataset
    first = release(engine, ledger, "alice", "a1")
    plan = v2.plan(distinct_query(0), loss=EPS)
    reservation = ledger.reserve(plan, client="alice", request_id="a2", data_version="v2")
    assert reservation.stored is None
    second = reservation.commit(v2.answer(plan))
    assert second.to_bytes() != first.to_bytes()
    assert second.metadata.data_version == "v2"
    assert ledger.spent("alice") == Fraction(2, 10)
    assert ledger.budget("dataset", engine.dataset).spent == Fraction(2, 10)
    # 0.05 of the dataset's 0.25 is left, whichever version is asked.
    for version, data in (("v2", v2), ("v1", engine)):
        with pytest.raises(BudgetExceededError) as refused:
            ledger.reserve(
                data.plan(distinct_query(1), loss=EPS), client="bob", request_id=f"b-{version}",
                data_version=version,
            )
        assert refused.value.scope == "dataset"
    assert ledger.client_budget("bob").remaining == Fraction(5, 100)
    # The committed answer must be for the reservation's data version.
    held = ledger.reserve(
        engine.plan(distinct_query(5), loss=PrivacyLoss.pure("0.05")), client="bob",
        request_id="x",
    )
    with pytest.raises(VeilError, match="does not match"):
        held.commit(v2.answer(v2.plan(distinct_query(5), loss=PrivacyLoss.pure("0.05"))))
    assert_verified(ledger)


def test_a_request_id_kept_into_a_new_data_version_is_refused(
    engine: Engine, open_ledger: Callable[..., Ledger], tmp_path: Path
) -> None:
    """A modeler who keeps one request id per table from cycle to cycle is not handed last
    cycle's release as if it were this one's: the id is refused, nothing is charged."""
    ledger = open_ledger()
    ledger.register_client("alice", role="researcher", cap="1")
    v2 = Engine(
        DuckDBBackend(write_database(tmp_path / "v2.duckdb", ROWS[:100], data_version="v2")),
        codebook=CODEBOOK,
    )
    first = release(engine, ledger, "alice", "table-1")
    # A retry on the same version is still the stored release, free.
    assert release(engine, ledger, "alice", "table-1").to_bytes() == first.to_bytes()
    with pytest.raises(RequestConflictError) as refused:
        release(v2, ledger, "alice", "table-1")
    assert "data version" in str(refused.value) and "new request id" in str(refused.value)
    assert ledger.spent("alice") == EPS.amount
    fresh = release(v2, ledger, "alice", "table-1-v2")
    assert fresh.metadata.data_version == "v2"
    # An attempt cancelled on the old version (a restart onto the new data) released nothing:
    # its retry under the same id is served on the new version.
    held = ledger.reserve(
        engine.plan(distinct_query(3), loss=EPS), client="alice", request_id="table-2"
    )
    held.cancel()
    retried = release(v2, ledger, "alice", "table-2", query=distinct_query(3))
    assert retried.metadata.data_version == "v2"
    assert_verified(ledger)


def test_a_ledger_keeps_one_datasets_budget(
    open_ledger: Callable[..., Ledger], tmp_path: Path
) -> None:
    """Data of another dataset is refused before anything is written."""
    ledger = open_ledger(path=tmp_path / "own.sqlite")
    assert ledger.dataset == "ctdc"
    head = ledger.head()
    ledger.close()
    with pytest.raises(VeilError, match=r"keeps the budget of dataset 'ctdc'.*'ics'"):
        open_ledger(path=tmp_path / "own.sqlite", dataset="ics")
    reopened = open_ledger(path=tmp_path / "own.sqlite", dataset=None)
    assert reopened.dataset == "ctdc"
    with pytest.raises(VeilError, match="needs the name of the dataset"):
        open_ledger(path=tmp_path / "unnamed.sqlite", dataset=None)
    assert reopened.head().partition(":")[0] == str(int(head.partition(":")[0]) + 1)  # opened
    with pytest.raises(VeilError, match="dataset"):
        open_ledger(path=tmp_path / "other.sqlite", dataset="bad name")


# ---- durability ------------------------------------------------------------------------------


def _trace_commits_and_syncs(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """In order: "COMMIT" for each transaction this thread commits, "sync" for each fsync of
    the write-ahead log (the only thing that makes a NORMAL-sync commit survive a power cut)."""
    events: list[str] = []
    ledger._conn().set_trace_callback(
        lambda statement: events.append(statement) if statement == "COMMIT" else None
    )
    fsync = os.fdatasync

    def traced(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == f"{ledger.path}-wal":
            events.append("sync")
        fsync(fd)

    monkeypatch.setattr(os, "fdatasync", traced)
    return events


def test_ledger_file_is_wal_and_every_write_is_synced(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = sqlite3.connect(ledger.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    events = _trace_commits_and_syncs(ledger, monkeypatch)
    ledger.set_cap("alice", "2")
    ledger.register_client("dave", role="researcher", cap="1")
    assert events == ["COMMIT", "sync"] * 2


def test_only_a_hold_is_left_unsynced(
    engine: Engine, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _trace_commits_and_syncs(ledger, monkeypatch)
    # A fresh release: the hold rides on the commit's sync, which makes both durable before
    # the release is returned.
    release(engine, ledger, "alice", "a1")
    assert events == ["COMMIT", "COMMIT", "sync"]
    # What is handed out straight from the reservation is synced before it leaves.
    for client, request, loss in [("bob", "b1", EPS), ("carol", "c1", PrivacyLoss.pure("2"))]:
        events.clear()
        with contextlib.suppress(BudgetExceededError):
            release(engine, ledger, client, request, loss=loss)
        assert events == ["COMMIT", "sync"]
    assert [e.entry["event"] for e in ledger.audit_log()[-2:]] == ["replay", "refused"]
    # A stored release read back (GetRelease) may have been committed by another thread whose
    # sync has not returned yet: it is synced before it is handed out.
    events.clear()
    (stored,) = ledger.releases()
    ledger.release(stored.release_id)
    assert events == ["sync"]
    # So is its metadata, for the auditors: it holds noisy statistics (suppressed cells).
    events.clear()
    assert ledger.release_metadata([stored.release_id])[stored.release_id].cells > 0
    assert events == ["sync"]


def test_a_ledger_opened_through_a_symlink_syncs_and_locks_the_file_itself(
    engine: Engine, open_ledger: Callable[..., Ledger], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SQLite writes its log beside the file a link points at; the sync and the one-writer lock
    # must find it there, or every charge goes out unsynced and a second writer gets in.
    real = tmp_path / "real" / "ledger.sqlite"
    real.parent.mkdir()
    link = tmp_path / "link.sqlite"
    link.symlink_to(real)
    ledger = open_ledger(path=link)
    assert ledger.path == real
    ledger.register_client("alice", role="researcher", cap="1")
    events = _trace_commits_and_syncs(ledger, monkeypatch)
    release(engine, ledger, "alice", "a1")
    assert events == ["COMMIT", "COMMIT", "sync"]
    with pytest.raises(LedgerUnavailableError, match="open for writing in another process"):
        open_ledger(path=real)


def test_a_write_ahead_log_deleted_under_the_ledger_stops_it(
    engine: Engine, open_ledger: Callable[..., Ledger]
) -> None:
    # SQLite keeps writing to the deleted file, which nothing can make durable: a charge must
    # not be handed out on it, nor any after it.
    ledger = open_ledger()
    ledger.register_client("alice", role="researcher", cap="1")
    release(engine, ledger, "alice", "a1")
    Path(f"{ledger.path}-wal").unlink()
    with pytest.raises(LedgerUnavailableError, match="could not be made durable"):
        release(engine, ledger, "alice", "a2")
    with pytest.raises(LedgerUnavailableError, match="restarted and the ledger reopened"):
        release(engine, ledger, "alice", "a3")


def test_totals_written_down_outside_the_ledger_are_not_served(
    engine: Engine, ledger: Ledger, open_ledger: Callable[..., Ledger]
) -> None:
    # Caps are enforced against the totals: a total set back to zero would let alice spend her
    # cap again. Opening compares them with the audit log's last movement of each scope.
    release(engine, ledger, "alice", "a1")
    path = ledger.path
    ledger.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE totals SET spent = '0' WHERE kind = 'client' AND name = 'alice'")
        conn.commit()
    with pytest.raises(LedgerIntegrityError, match="client:alice: the totals differ from what"):
        open_ledger(path=path)


def test_an_open_that_may_not_create_refuses_a_path_with_no_ledger(
    open_ledger: Callable[..., Ledger], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(LedgerUnavailableError, match="there is no ledger at"):
        open_ledger(path=missing, create=False)
    assert not missing.exists()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(LedgerUnavailableError, match="holds no ledger"):
        open_ledger(path=empty, create=False)
    open_ledger(path=tmp_path / "new.sqlite").close()
    open_ledger(path=tmp_path / "new.sqlite", create=False).close()  # an existing one opens


def test_a_data_version_served_from_another_load_is_refused(
    open_ledger: Callable[..., Ledger], tmp_path: Path
) -> None:
    # Releases are stored and replayed by data version: a corrected file loaded under the old
    # version's name would be answered with the old records' releases.
    path = tmp_path / "versions.sqlite"
    settings = {"k": "10", "beta": "0.05"}
    open_ledger(path=path, data_version="v1", load_id="load-a", settings=settings).close()
    open_ledger(path=path, data_version="v1", load_id="load-a").close()  # the same file again
    for other in ("load-b", None):  # a file without a load is another load, too
        with pytest.raises(VeilError, match="'v1' was served before from another load"):
            open_ledger(path=path, data_version="v1", load_id=other)
    reopened = open_ledger(path=path, data_version="v2", load_id="load-b")  # a version of its own
    opens = [e.entry for e in reopened.audit_log() if e.entry["event"] == "open"]
    assert [(e["data_version"], e["detail"]["load_id"]) for e in opens] == [
        ("v1", "load-a"), ("v1", "load-a"), ("v2", "load-b")
    ]
    assert opens[0]["detail"]["k"] == "10" and opens[0]["detail"]["beta"] == "0.05"
    assert_verified(reopened)


def test_the_head_kept_outside_the_ledger_is_one_already_on_disk(
    engine: Engine, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hold is committed without a sync of its own; a head read while one is in flight, kept
    # elsewhere, and then lost to a power cut would make the ledger look like a restored backup.
    events = _trace_commits_and_syncs(ledger, monkeypatch)
    head = ledger.durable_head()
    assert head == ledger.head() and events == ["sync"]


def test_a_failed_sync_stops_the_ledger_until_it_is_reopened(
    engine: Engine, open_ledger: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a write-back error Linux may drop the dirty pages and report the next fsync as a
    # success: a retry must not hand out the release whose charge may never reach the disk.
    ledger = open_ledger()
    ledger.register_client("alice", role="researcher", cap="1")
    fsync = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(LedgerUnavailableError, match="could not be made durable"):
        release(engine, ledger, "alice", "r1")
    monkeypatch.setattr(os, "fdatasync", fsync)  # the disk "recovers": the ledger does not
    for call in (
        lambda: release(engine, ledger, "alice", "r1"),
        lambda: ledger.releases(),
        lambda: ledger.spent("alice"),
        lambda: ledger.set_cap("alice", "2"),
    ):
        with pytest.raises(LedgerUnavailableError, match="restarted and the ledger reopened"):
            call()
    ledger.close()
    # Reopened, it reads what the file holds: here the charge did land, so the retry gets the
    # stored release at no second charge.
    reopened = open_ledger()
    (stored,) = reopened.releases()
    retried = release(engine, reopened, "alice", "r1")
    assert retried.metadata.release_id == stored.release_id
    assert reopened.spent("alice") == Fraction(1, 10)
    assert_verified(reopened)


def test_a_client_revoked_while_its_query_runs_receives_nothing(
    engine: Engine, open_ledger: Callable[..., Ledger]
) -> None:
    def hooks(point: str) -> None:
        if point == "after_reserve":
            ledger.revoke("alice", reason="left the project", actor="admin")

    ledger = open_ledger(hooks=hooks)
    ledger.register_client("alice", role="researcher", cap="1")
    with pytest.raises(RevokedClientError, match="revoked while its query ran"):
        release(engine, ledger, "alice", "r1")
    assert ledger.releases() == [] and ledger.spent("alice") == 0
    assert ledger.budget("client", "alice").held == 0
    (charge,) = ledger.charges()
    assert (charge.state, charge.reason) == ("cancelled", "client_revoked")
    assert_verified(ledger)


def test_a_ledger_opened_by_a_relative_path_stays_put(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ledger = Ledger.open(
        "relative.sqlite",
        accounting=Accounting.PURE_DP,
        dataset_cap="10",
        dataset=engine.dataset,
        data_version=engine.data_version,
    )
    try:
        ledger.register_client("alice", role="researcher", cap="1")
        release(engine, ledger, "alice", "a1")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        # A replay syncs the write-ahead log; a new thread opens its own connection.
        replay = threading.Thread(target=release, args=(engine, ledger, "alice", "a2"))
        replay.start()
        replay.join()
        assert [c.kind for c in ledger.charges()] == ["charge", "replay"]
        assert not list(elsewhere.iterdir())
    finally:
        ledger.close()


class _RollbackFails:
    """A ledger connection whose next ROLLBACK fails, as a disk error can make it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "ROLLBACK":
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_connection_that_cannot_roll_back_is_replaced(ledger: Ledger) -> None:
    stuck = _RollbackFails(ledger._conn())
    ledger._local.conn = stuck

    def fails(conn: sqlite3.Connection) -> None:
        raise RuntimeError("the work failed")

    with pytest.raises(RuntimeError):
        ledger._write("fail", fails, synced=False)
    # Its transaction (and SQLite's write lock) is gone with it, and the thread carries on, on
    # a new connection.
    assert ledger._conn() is not stuck
    ledger.set_cap("alice", "2")
    assert ledger.budget("client", "alice").cap == 2
    assert_verified(ledger)


def test_abandoned_reservations_are_cancelled_on_open(
    engine: Engine, ledger: Ledger, open_ledger: Callable[..., Ledger]
) -> None:
    ledger.reserve(engine.plan(distinct_query(0), loss=EPS), client="alice", request_id="r1")
    assert ledger.budget("client", "alice").held == Fraction(1, 10)
    assert ledger.remaining("alice") == Fraction(9, 10)
    ledger.close()  # as if the process died: the hold is never settled
    reopened = open_ledger()
    (charge,) = reopened.charges()
    assert (charge.state, charge.reason) == ("cancelled", "abandoned")
    assert reopened.budget("client", "alice").held == 0
    assert [e.entry["event"] for e in reopened.audit_log()][-2:] == ["abandon", "open"]
    assert_verified(reopened)
    release(engine, reopened, "alice", "r1")
    assert reopened.spent("alice") == Fraction(1, 10)


def test_a_ledger_needs_a_file_of_its_own(engine: Engine, tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerUnavailableError, match="not a veil ledger"):
        Ledger.open(other, accounting="pure_dp", dataset_cap=1)
    assert isinstance(engine.backend, DuckDBBackend)
    with pytest.raises(LedgerUnavailableError, match="not a ledger database"):
        Ledger.open(engine.backend.path, accounting="pure_dp", dataset_cap=1)  # the data file
    with pytest.raises(LedgerUnavailableError, match="no ledger"):
        Ledger.open_readonly(tmp_path / "missing.sqlite")


def test_one_writer_at_a_time_and_readers_alongside(
    engine: Engine, ledger: Ledger, open_ledger: Callable[..., Ledger]
) -> None:
    with pytest.raises(LedgerUnavailableError, match="another process"):
        open_ledger()
    release(engine, ledger, "alice", "r1")
    with Ledger.open_readonly(ledger.path) as reader:
        assert reader.spent("alice") == Fraction(1, 10)
        assert reader.verify().ok
        with pytest.raises(LedgerUnavailableError, match="read-only"):
            reader.reserve(engine.plan(distinct_query(1), loss=EPS), client="alice", request_id="x")
    ledger.close()
    with pytest.raises(LedgerUnavailableError, match="closed"):
        release(engine, ledger, "alice", "r2")


def test_a_full_disk_releases_nothing_and_service_resumes(engine: Engine, ledger: Ledger) -> None:
    big = Query(Count(), by=("citizenship", "gender"))  # a release of several pages
    conn = ledger._conn()  # the connection this thread writes through
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(LedgerUnavailableError, match=r"disk holding the ledger is full"):
        release(engine, ledger, "alice", "full", big)
    assert ledger.releases() == []
    assert ledger.spent("alice") == 0
    conn.execute("PRAGMA max_page_count = 1073741823")
    result = release(engine, ledger, "alice", "full", big)
    assert ledger.spent("alice") == Fraction(1, 10)
    assert ledger.budget("client", "alice").held == 0
    assert result.metadata.charge_id
    assert_verified(ledger)


def fill_ledger(ledger: Ledger) -> None:
    """Cap the ledger file at its current size, then use up its free space."""
    conn = ledger._conn()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(LedgerUnavailableError, match="full"):
        for i in range(100_000):
            ledger.audit("filler", None, outcome="filler", detail={"n": str(i)})


def test_a_full_disk_at_reservation_or_at_cancel(engine: Engine, ledger: Ledger) -> None:
    conn = ledger._conn()
    fill_ledger(ledger)
    with pytest.raises(LedgerUnavailableError, match="cannot reserve the charge: the disk"):
        release(engine, ledger, "alice", "r1")
    assert ledger.charges() == [] and ledger.spent("alice") == 0
    conn.execute("PRAGMA max_page_count = 1073741823")

    # Held, then the disk fills: the commit and its cancel both fail. The hold stays counted
    # against the caps (the safe side) until a later transaction can write the cancel.
    plan = engine.plan(distinct_query(1), loss=EPS)
    reservation = ledger.reserve(plan, client="alice", request_id="r2")
    answer = engine.answer(plan)
    fill_ledger(ledger)
    with pytest.raises(LedgerUnavailableError, match="full"):
        reservation.commit(answer)
    assert ledger.releases() == []
    assert ledger.budget("client", "alice").held == Fraction(1, 10)
    conn.execute("PRAGMA max_page_count = 1073741823")
    release(engine, ledger, "alice", "r2", distinct_query(1))
    assert ledger.budget("client", "alice").held == 0
    assert ledger.spent("alice") == Fraction(1, 10)
    cancelled = [c for c in ledger.charges() if c.state == "cancelled"]
    assert [c.reason for c in cancelled] == ["commit_failed"]
    assert_verified(ledger)


def test_a_forfeited_charge_is_spent_with_nothing_released(engine: Engine, ledger: Ledger) -> None:
    """A query stopped after its hold (by the server's time limit) is charged, durably, with no
    release; its request id stays taken, so whether it ran past the limit is never seen free."""
    plan = engine.plan(distinct_query(0), loss=EPS)
    reservation = ledger.reserve(plan, client="alice", request_id="r1")
    reservation.forfeit("stopped_by_limit")
    reservation.forfeit("stopped_by_limit")  # settled once
    reservation.cancel()  # a forfeit is not given back
    assert reservation.state == "forfeited"
    assert ledger.spent("alice") == EPS.amount and ledger.budget("client", "alice").held == 0
    assert ledger.budget("institution", "iom").used == EPS.amount
    assert ledger.releases() == []
    (charge,) = ledger.charges()
    assert (charge.state, charge.release_id, charge.reason) == (
        "committed",
        None,
        "stopped_by_limit",
    )
    entry = ledger.audit_log()[-1].entry
    assert (entry["event"], entry["charge"], entry["outcome"]) == (
        "forfeit",
        "0.1",
        "stopped_by_limit",
    )
    assert ledger.received("alice") == []
    with pytest.raises(RequestConflictError, match="stopped by the server's time limit"):
        release(engine, ledger, "alice", "r1")
    refused = ledger.audit_log()[-1].entry
    assert (refused["event"], refused["outcome"]) == ("refused", "request_forfeited")
    assert ledger.spent("alice") == EPS.amount
    release(engine, ledger, "alice", "r2")  # under a new id, it is drawn and charged
    assert ledger.spent("alice") == 2 * EPS.amount
    assert_verified(ledger)


def test_a_forfeit_the_disk_cannot_take_stays_held_then_is_spent(
    engine: Engine, ledger: Ledger
) -> None:
    conn = ledger._conn()
    reservation = ledger.reserve(engine.plan(distinct_query(0), loss=EPS), client="alice",
                                 request_id="r1")
    fill_ledger(ledger)
    with pytest.raises(LedgerUnavailableError, match="full"):
        reservation.forfeit("stopped_by_limit")
    assert ledger.budget("client", "alice").held == EPS.amount  # still counted
    conn.execute("PRAGMA max_page_count = 1073741823")
    release(engine, ledger, "alice", "r2", distinct_query(1))
    (forfeited,) = [c for c in ledger.charges() if c.request_id == "r1"]
    assert (forfeited.state, forfeited.release_id) == ("committed", None)
    assert ledger.spent("alice") == 2 * EPS.amount and ledger.budget("client", "alice").held == 0
    assert_verified(ledger)


def test_a_locked_ledger_is_reported_unavailable(engine: Engine, tmp_path: Path) -> None:
    ledger = Ledger.open(
        tmp_path / "l.sqlite",
        accounting="pure_dp",
        dataset_cap=1,
        dataset="ctdc",
        data_version="v1",
        busy_timeout=0.2,
    )
    ledger.register_client("alice", role="researcher", cap="1")
    other = sqlite3.connect(ledger.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerUnavailableError, match="locked"):
            release(engine, ledger, "alice", "r1")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ledger.releases() == []
    release(engine, ledger, "alice", "r1")
    ledger.close()


def test_opening_or_verifying_a_locked_ledger_is_not_worded_as_a_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The custodian opening a ledger, or an auditor verifying one, asked for no release: the
    refusal says what could not be done, not that nothing was released."""
    path = tmp_path / "l.sqlite"
    settings: dict[str, Any] = {"accounting": "pure_dp", "dataset_cap": 1, "dataset": "ctdc",
                                "data_version": "v1", "busy_timeout": 0.2}
    Ledger.open(path, **settings).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerUnavailableError, match="cannot open the ledger") as opening:
            Ledger.open(path, **settings)
        assert "locked" in str(opening.value) and "released" not in str(opening.value)
    finally:
        other.execute("ROLLBACK")
        other.close()

    def locked(*args: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr("engine.ledger_verify.verify", locked)
    with (
        Ledger.open_readonly(path, busy_timeout=0.2) as readonly,
        pytest.raises(LedgerUnavailableError, match="cannot verify") as verifying,
    ):
        readonly.verify()
    assert "released" not in str(verifying.value)


# ---- clients, caps and reports ---------------------------------------------------------------


def test_client_registry(engine: Engine, ledger: Ledger) -> None:
    with pytest.raises(ClientRegistryError, match="already"):
        ledger.register_client("alice", role="researcher", cap="1")
    with pytest.raises(ClientRegistryError, match="role"):
        ledger.register_client("eve", role="superuser", cap="1")
    with pytest.raises(VeilError):
        ledger.register_client("bad id; drop", role="researcher", cap="1")
    with pytest.raises(ClientRegistryError, match="token hash"):
        ledger.register_client("eve", role="researcher", cap="1", token_hash="plain")
    digest = "a" * 64
    ledger.register_client("eve", role="admin", cap=0, token_hash=digest)
    found = ledger.client_for_token_hash(digest)
    assert found is not None and found.client_id == "eve" and found.role == "admin"
    with pytest.raises(ClientRegistryError, match="another client"):
        ledger.set_token_hash("alice", digest)
    assert [c.client_id for c in ledger.list_clients()] == ["alice", "bob", "carol", "eve"]

    with pytest.raises(UnknownClientError):
        release(engine, ledger, "mallory", "m1")
    release(engine, ledger, "alice", "a1")
    with pytest.raises(ClientRegistryError, match="already spent"):
        ledger.set_cap("alice", "0.05")
    assert ledger.set_cap("alice", "1.5").cap == Fraction(3, 2)
    assert ledger.set_cap("alice", "0.1").cap == Fraction(1, 10)
    with pytest.raises(BudgetExceededError):
        release(engine, ledger, "alice", "a2", distinct_query(1))
    ledger.revoke("bob", reason="left the project")
    with pytest.raises(UnknownClientError, match="revoked"):
        release(engine, ledger, "bob", "b1")
    assert ledger.remaining("bob") == 0
    outcomes = [e.entry["outcome"] for e in ledger.audit_log() if e.entry["event"] == "refused"]
    assert outcomes == ["unknown_client", "budget_exceeded", "revoked_client"]
    assert_verified(ledger)


@pytest.mark.parametrize("spelling", ["IOM", "I0M", "Iom", "i.o.m", "i-o-m", "I/O/M", "iom@"])
def test_an_institution_spelt_differently_is_refused(ledger: Ledger, spelling: str) -> None:
    """Caps are kept under the exact name: a client registered as `IOM` beside `iom`'s would
    escape iom's cap, and a cap set on `IOM` would bind none of iom's clients."""
    ledger.set_institution_cap("iom", "0.5")
    with pytest.raises(ClientRegistryError, match=f"{re.escape(repr(spelling))} is 'iom' spelt"):
        ledger.register_client("dave", role="researcher", institution=spelling, cap="1")
    with pytest.raises(ClientRegistryError, match="spelt differently"):
        ledger.set_institution_cap(spelling, "1")
    assert [c.client_id for c in ledger.list_clients()] == ["alice", "bob", "carol"]
    # The exact name, and names that differ in more than spelling, are taken as they are.
    ledger.register_client("dave", role="researcher", institution="iom", cap="1")
    ledger.register_client("erin", role="researcher", institution="ilo", cap="1")
    ledger.set_institution_cap("unhcr", "1")
    ledger.set_institution_cap("UCL", "1")
    ledger.set_institution_cap("UCI", "1")  # two universities, not one misspelt
    assert ledger.client("dave").institution == "iom"


def test_institution_cap_binds_across_its_clients(engine: Engine, ledger: Ledger) -> None:
    ledger.set_institution_cap("iom", "0.15")
    release(engine, ledger, "alice", "a1", distinct_query(0))
    with pytest.raises(BudgetExceededError) as refused:
        release(engine, ledger, "bob", "b1", distinct_query(1))
    assert refused.value.scope == "institution" and refused.value.remaining == "0.05"
    release(engine, ledger, "carol", "c1", distinct_query(1))  # not in the institution
    with pytest.raises(ClientRegistryError):
        ledger.set_institution_cap("iom", "0.05")
    ledger.set_institution_cap("iom", None)
    release(engine, ledger, "bob", "b1", distinct_query(1))  # a replay now: free
    release(engine, ledger, "bob", "b2", distinct_query(2))
    assert ledger.remaining("bob") == Fraction(9, 10)
    assert_verified(ledger)


def test_dataset_default_cap_changes_on_open_are_audited(
    engine: Engine, ledger: Ledger, open_ledger: Callable[..., Ledger]
) -> None:
    release(engine, ledger, "alice", "a1")
    ledger.close()
    with pytest.raises(ClientRegistryError, match="already spent"):
        open_ledger(dataset_cap="0.05")
    reopened = open_ledger(dataset_cap="20", actor="local:veil-serve")
    assert reopened.budget("dataset", engine.dataset).cap == 20
    with pytest.raises(VeilError, match="keeps the budget of dataset ctdc, not v1"):
        reopened.budget("dataset", "v1")
    events = [e.entry for e in reopened.audit_log() if e.entry["event"] == "set_dataset_cap"]
    assert events[-1]["detail"] == {"before": "10", "after": "20", "actor": "local:veil-serve"}
    reopened.close()
    again = open_ledger(dataset_cap="30", delta=1e-7)  # who opened it is not known: null
    changes = [
        e.entry for e in again.audit_log() if e.entry["event"] in {"set_delta", "set_dataset_cap"}
    ]
    assert [(e["event"], e["detail"]["actor"]) for e in changes[-2:]] == [
        ("set_delta", None),
        ("set_dataset_cap", None),
    ]
    assert_verified(again)


def test_a_token_expires_at_its_time_and_the_audit_records_when(ledger: Ledger) -> None:
    at = datetime(2030, 1, 1, 12, tzinfo=UTC)
    dan = ledger.register_client(
        "dan", role="researcher", cap="1", token_hash="d" * 64, token_expires_at=at
    )
    assert dan.token_expires_at == "2030-01-01T12:00:00.000000Z"
    assert not dan.token_expired(at - timedelta(microseconds=1))
    assert dan.token_expired(at)
    assert not ledger.client("alice").token_expired(at)  # no expiry: never
    later = ledger.set_token_hash(
        "dan", "e" * 64, expires_at=datetime(2031, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    )
    assert later.token_expires_at == "2030-12-31T22:00:00.000000Z"  # kept in UTC
    assert ledger.set_token_hash("dan", "f" * 64).token_expires_at is None
    entries = [e.entry for e in ledger.audit_log() if e.entry["client"] == "dan"]
    assert [e["detail"]["token_expires_at"] for e in entries] == [
        "2030-01-01T12:00:00.000000Z",
        "2030-12-31T22:00:00.000000Z",
        None,
    ]
    with pytest.raises(VeilError, match="time zone"):
        ledger.set_token_hash("dan", "g" * 64, expires_at=datetime(2030, 1, 1))
    assert_verified(ledger)


def test_local_actor_names_cannot_be_registered_as_clients(ledger: Ledger) -> None:
    with pytest.raises(ClientRegistryError, match="reserved for local actors"):
        ledger.register_client("local:veil-serve", role="admin", cap="0")
    ledger.register_client("locally", role="researcher", cap="1")  # only the prefix is kept


def test_admin_actions_record_who_acted(engine: Engine, ledger: Ledger) -> None:
    first = int(ledger.head().partition(":")[0])
    ledger.register_client("dan", role="researcher", cap="1", actor="root")
    ledger.set_cap("dan", "2", actor="root")
    ledger.set_cap("dan", "3", actor="root")
    ledger.set_token_hash("dan", "b" * 64, actor="root")
    ledger.set_institution_cap("iom", "5", actor="root")
    ledger.set_dataset_cap("20", actor="root")
    ledger.revoke("dan", reason="left the project", actor="root")
    ledger.set_cap("alice", "3")  # no actor given: recorded as null
    with pytest.raises(VeilError, match="acting client"):
        ledger.set_cap("alice", "3", actor="root; drop")
    entries = [e.entry for e in ledger.audit_log(since=first)]
    assert [(e["event"], e["detail"]["actor"]) for e in entries] == [
        ("register_client", "root"),
        ("set_cap", "root"),
        ("set_cap", "root"),
        ("set_token", "root"),
        ("set_institution_cap", "root"),
        ("set_dataset_cap", "root"),
        ("revoke", "root"),
        ("set_cap", None),
    ]
    assert entries[0]["detail"] == {
        "role": "researcher",
        "institution": None,
        "token": "none",
        "token_digest": None,
        "token_expires_at": None,
        "actor": "root",
    }
    assert entries[-2]["detail"] == {"reason": "left the project", "actor": "root"}
    assert_verified(ledger)


def test_revoking_a_revoked_client_writes_nothing(ledger: Ledger) -> None:
    ledger.register_client("erin", role="researcher", cap="1")
    assert ledger.revoke("erin", reason="left the project", actor="root")
    first = ledger.client("erin")
    head = ledger.head()
    assert not ledger.revoke("erin", reason="a second time", actor="root")
    assert ledger.head() == head  # no audit entry: nothing changed
    again = ledger.client("erin")
    assert again == first and again.revoked_at is not None and not again.active


def test_report_per_client_institution_and_dataset(engine: Engine, ledger: Ledger) -> None:
    ledger.set_institution_cap("iom", "1.5")
    release(engine, ledger, "alice", "a1", distinct_query(0))
    release(engine, ledger, "bob", "b1", distinct_query(1), PrivacyLoss.pure("0.25"))
    release(engine, ledger, "carol", "c1", distinct_query(0))  # replay
    report = ledger.report().to_dict()
    clients = {c["name"]: c for c in report["clients"]}
    assert clients["alice"]["spent"] == "0.1" and clients["alice"]["remaining"] == "0.9"
    assert clients["bob"]["spent"] == "0.25" and clients["bob"]["remaining_float"] == 0.75
    assert clients["carol"]["spent"] == "0"
    (iom,) = report["institutions"]
    assert (iom["cap"], iom["spent"], iom["remaining"]) == ("1.5", "0.35", "1.15")
    dataset = report["dataset"]
    assert (dataset["name"], dataset["spent"], dataset["remaining"]) == ("ctdc", "0.35", "9.65")
    assert report["audit_head"] == ledger.head()
    assert ledger.remaining("alice") == Fraction(9, 10)
    releases = ledger.releases()
    assert [(r.client, r.loss, r.replays) for r in releases] == [
        ("alice", Fraction(1, 10), 1),
        ("bob", Fraction(1, 4), 0),
    ]
    # One client's three budgets, read together; its remaining is the least of them.
    ledger.set_institution_cap("iom", "1.2")
    alice = ledger.client_budget("alice")
    assert [(s.kind, s.name, s.spent) for s in alice.scopes] == [
        ("client", "alice", Fraction(1, 10)),
        ("institution", "iom", Fraction(35, 100)),
        ("dataset", "ctdc", Fraction(35, 100)),
    ]
    assert alice.remaining == Fraction(85, 100) == ledger.remaining("alice")
    assert ledger.client_budget("carol").scope("institution") is None
    ledger.revoke("bob")
    assert ledger.client_budget("bob").remaining == 0


def test_zcdp_report_gives_the_epsilon_delta_equivalent(
    engine: Engine, open_ledger: Callable[..., Ledger], tmp_path: Path
) -> None:
    from engine.settings import Settings

    zengine = Engine(
        engine.backend, codebook=CODEBOOK, settings=Settings(accounting=Accounting.ZCDP)
    )
    ledger = open_ledger(path=tmp_path / "z.sqlite", accounting=Accounting.ZCDP, delta=1e-7)
    ledger.register_client("alice", role="researcher", cap="0.5")
    zengine.release(
        distinct_query(0),
        loss=PrivacyLoss.zcdp("0.02"),
        charger=ledger,
        client="alice",
        request_id="r1",
    )
    report = ledger.report().to_dict()
    alice = report["clients"][0]
    assert report["accounting"] == "zcdp" and report["delta"] == 1e-7
    assert alice["spent"] == "0.02"
    assert alice["spent_epsilon"] == pytest.approx(0.02 + 2 * math.sqrt(0.02 * math.log(1e7)))
    assert alice["cap_epsilon"] == pytest.approx(0.5 + 2 * math.sqrt(0.5 * math.log(1e7)))
    with pytest.raises(InvalidLossError, match="zcdp"):
        release(engine, ledger, "alice", "r2")


# ---- the audit log ---------------------------------------------------------------------------


def test_audit_entries_have_fixed_fields_and_no_true_values(engine: Engine, ledger: Ledger) -> None:
    release(engine, ledger, "alice", "a1", Query(Count(), by=("gender",)))
    release(engine, ledger, "carol", "c1", Query(Count(), by=("gender",)))
    with pytest.raises(BudgetExceededError):
        release(engine, ledger, "bob", "b1", distinct_query(1), PrivacyLoss.pure("5"))
    seq = ledger.audit(
        "authentication_failed", "unknown", outcome="refused", detail={"reason": "unknown token"}
    )
    assert ledger.audit_log()[-1].seq == seq
    with pytest.raises(VeilError, match="written by the ledger"):
        ledger.audit("release", "alice", outcome="forged")
    conn = sqlite3.connect(ledger.path)
    texts = [row[0] for row in conn.execute("SELECT entry FROM audit")]
    conn.close()
    for text in texts:
        entry = json.loads(text)
        assert tuple(sorted(entry)) == tuple(sorted(ENTRY_FIELDS))
        # 4711 and 2903 are the true counts of the data; no entry may carry them.
        assert not re.search(r"(?<![0-9a-f])(4711|2903)(?![0-9a-f])", text), text
    release_entry = next(json.loads(t) for t in texts if '"event":"release"' in t)
    stored = ledger.releases()[0]
    assert release_entry["release_sha256"] == stored.sha256
    assert release_entry["budget"][0]["scope"] == "client:alice"
    assert release_entry["budget"][0]["before"] == {"spent": "0", "held": "0.1"}
    assert release_entry["budget"][0]["after"] == {"spent": "0.1", "held": "0"}


def test_cli_verify_and_report(
    engine: Engine, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    release(engine, ledger, "alice", "a1")
    path = str(ledger.path)
    assert ledger_cli(["ledger", "verify", path]) == 0
    assert "ledger verified" in capsys.readouterr().out
    assert ledger_cli(["ledger", "verify", path, "--expect-head", ledger.head()]) == 0
    capsys.readouterr()
    assert ledger_cli(["ledger", "report", path, "--json", "--releases"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["clients"][0]["spent"] == "0.1" and len(data["releases"]) == 1
    assert ledger_cli(["ledger", "report", path, "--releases"]) == 0
    text = capsys.readouterr().out
    assert "alice" in text and "releases (1)" in text
    assert "where yearOfRegistration = 2002" in text  # read as the client writes it, not JSON
    assert ledger_cli(["ledger", "verify", str(ledger.path.with_name("none.sqlite"))]) == 2
    assert "no ledger" in capsys.readouterr().err


def test_cli_report_marks_revoked_clients(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger.revoke("bob", reason="left the project", actor="admin")
    revoked_at = ledger.client("bob").revoked_at
    path = str(ledger.path)
    assert ledger_cli(["ledger", "report", path]) == 0
    text = capsys.readouterr().out
    clients = text.split("\nclients\n")[1].split("\n\n")[0].splitlines()
    assert clients[0].split()[-1] == "status"
    rows = {line.split()[0]: line.split() for line in clients[1:]}
    assert rows["bob"][-1] == f"revoked {revoked_at}".split()[-1] and "revoked" in rows["bob"]
    assert rows["alice"][-1] == "active" and rows["carol"][-1] == "active"
    institutions = text.split("\ninstitutions\n")[1].split("\n\n")[0]
    assert "status" not in institutions and "revoked" not in institutions
    assert ledger_cli(["ledger", "report", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    status = {c["name"]: (c["status"], c["revoked_at"]) for c in data["clients"]}
    assert status == {
        "alice": ("active", None), "bob": ("revoked", revoked_at), "carol": ("active", None)
    }
    assert "status" not in data["dataset"]


def _query_plans(path: Path, statements: list[str]) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [
            " ".join(
                str(row[-1])
                for row in conn.execute("EXPLAIN QUERY PLAN " + text, ("x",) * text.count("?"))
            )
            for text in statements
        ]


def test_every_reservation_reads_the_charges_through_an_index(
    engine: Engine, open_ledger: Callable[..., Ledger]
) -> None:
    """A reservation looks its request id up among all attempts; read by a scan, that lookup
    would grow with the ledger. A ledger made before the index existed gets it on opening."""
    ledger = open_ledger()
    ledger.register_client("alice", role="researcher", cap="1")
    statements: list[str] = []
    ledger._conn().set_trace_callback(statements.append)
    release(engine, ledger, "alice", "r1")
    ledger._conn().set_trace_callback(None)
    path = ledger.path
    ledger.close()
    reads = [t for t in statements if "FROM charges WHERE" in t and t.startswith("SELECT")]
    assert reads, statements
    plans = _query_plans(path, reads)
    assert all("SCAN charges" not in plan for plan in plans), plans
    assert any("charges_by_request" in plan for plan in plans), plans

    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX charges_by_request")
    assert any("SCAN charges" in plan for plan in _query_plans(path, reads))  # the cost without it
    open_ledger().close()
    assert all("SCAN charges" not in plan for plan in _query_plans(path, reads))


def test_a_writer_that_waits_too_long_in_this_process_is_refused_cleanly(
    engine: Engine, open_ledger: Callable[..., Ledger]
) -> None:
    ledger = open_ledger(busy_timeout=0.05)
    ledger.register_client("alice", role="researcher", cap="1")
    # Another thread of this process is writing and does not finish.
    refused = pytest.raises(LedgerUnavailableError, match=r"locked for more than 0\.05 s")
    with ledger._write_lock, refused:
        release(engine, ledger, "alice", "r1")
    assert ledger.spent("alice") == 0 and ledger.charges() == []
    release(engine, ledger, "alice", "r1")  # once the writer is done, the request goes through
    assert ledger.spent("alice") == Fraction(1, 10)


def test_of_two_revocations_at_once_exactly_one_revoked(ledger: Ledger) -> None:
    ledger.register_client("fay", role="researcher", cap="1")
    start = threading.Barrier(4)
    answers: list[bool] = []

    def revoke() -> None:
        start.wait()
        answers.append(ledger.revoke("fay", reason="left the project", actor="root"))

    threads = [threading.Thread(target=revoke) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(answers) == [False, False, False, True]
    assert sum(e.entry["event"] == "revoke" for e in ledger.audit_log()) == 1


def test_a_revoked_client_gets_no_new_token_even_racing_its_revocation(ledger: Ledger) -> None:
    """The check is made in the write itself: a rotation checked before a revocation landed and
    written after it would give a revoked client a token, and call the rotation a success."""
    ledger.register_client("erin", role="researcher", cap="1", token_hash="a" * 64)
    ledger.revoke("erin", reason="left the project", actor="root")
    head = ledger.head()
    with pytest.raises(ClientRegistryError, match="erin is revoked"):
        ledger.set_token_hash("erin", "b" * 64, actor="root")
    assert ledger.client("erin").token_hash == "a" * 64 and ledger.head() == head


def test_a_cap_is_not_lowered_below_what_is_spent_and_held(engine: Engine, ledger: Ledger) -> None:
    # A reservation in flight holds budget: a cap under spent + held is refused even though it
    # is above what is spent alone.
    release(engine, ledger, "alice", "a1")  # spent 0.1
    reservation = ledger.reserve(
        engine.plan(distinct_query(1), loss=EPS), client="alice", request_id="a2"
    )  # held 0.1
    budget = ledger.budget("client", "alice")
    assert (budget.spent, budget.held) == (Fraction(1, 10), Fraction(1, 10))
    with pytest.raises(ClientRegistryError, match="already spent or held"):
        ledger.set_cap("alice", "0.15")
    assert ledger.client("alice").cap == 1
    # The hold is still good, and a cap of exactly spent + held is allowed.
    reservation.commit(engine.answer(engine.plan(distinct_query(1), loss=EPS)))
    assert ledger.set_cap("alice", "0.2").cap == Fraction(1, 5)
    assert_verified(ledger)


def test_a_reservation_cancelled_behind_its_holder_cannot_be_committed(
    engine: Engine, ledger: Ledger
) -> None:
    plan = engine.plan(distinct_query(0), loss=EPS)
    reservation = ledger.reserve(plan, client="alice", request_id="r1")
    assert reservation.charge_id is not None
    # As a second handle or an open would:
    ledger._settle(reservation.charge_id, "cancelled", spent=False)
    with pytest.raises(LedgerUnavailableError, match="is cancelled, not held"):
        reservation.commit(engine.answer(plan))
    assert ledger.releases() == []
    assert ledger.spent("alice") == 0 and ledger.budget("client", "alice").held == 0
    (charge,) = ledger.charges()
    assert charge.state == "cancelled" and charge.release_id is None
    assert [e.entry["event"] for e in ledger.audit_log()][-2:] == ["reserve", "cancel"]
    assert_verified(ledger)
