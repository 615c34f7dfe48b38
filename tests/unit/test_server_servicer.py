"""The servicer's own machinery: parsing untrusted bytes, watching calls, refusing late commits."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import QueryCancelledError
from engine.loss import PrivacyLoss
from engine.query import Count, Query
from engine.release import Release
from protos.veil.v1 import veil_pb2 as pb
from server.accounts import Accounts
from server.auth import Identity, Role
from server.calls import CallWatch, InFlight, WatchedCharger
from server.errors import MalformedRequestError
from server.servicer import (
    AdminServicer,
    ResearchServicer,
    Services,
    parse,
)
from tests.conftest import write_database
from tests.server_harness import MemoryAccounts, count_query


def test_parse_refuses_garbage_and_unknown_fields() -> None:
    good = pb.ReleaseRequest(request_id="r", loss="1").SerializeToString()
    assert parse(good, pb.ReleaseRequest).request_id == "r"
    with pytest.raises(MalformedRequestError, match=r"not a valid veil\.v1\.ReleaseRequest"):
        parse(b"\xff\xff\xff", pb.ReleaseRequest)
    with pytest.raises(MalformedRequestError, match="does not define"):
        parse(good + b"\xf8\x06\x01", pb.ReleaseRequest)
    with pytest.raises(MalformedRequestError):
        parse(b"\x0a\x02\xff\xfe", pb.ReleaseRequest)  # a string field that is not UTF-8


class FakeContext:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.callbacks: list[object] = []

    def time_remaining(self) -> float | None:
        return self.remaining

    def add_callback(self, callback: object) -> bool:
        self.callbacks.append(callback)
        return True


def test_watch_fires_on_deadline_limit_cancel_and_stop() -> None:
    in_flight = InFlight()
    with in_flight.watch(FakeContext(0.05), limit=10) as watch:  # type: ignore[arg-type]
        assert watch.event.wait(1) and watch.reason == "deadline"
        assert isinstance(watch.error(10), Exception) and "deadline" in str(watch.error(10))
    with in_flight.watch(FakeContext(None), limit=0.05) as watch:  # type: ignore[arg-type]
        assert watch.event.wait(1) and watch.reason == "limit"
        assert "limit of 0.05 s" in str(watch.error(0.05))
    context = FakeContext(5.0)
    with in_flight.watch(context, limit=10) as watch:  # type: ignore[arg-type]
        context.callbacks[0]()  # type: ignore[operator]
        assert watch.reason == "cancelled"
    with in_flight.watch(FakeContext(5.0), limit=10) as watch:  # type: ignore[arg-type]
        in_flight.cancel_all()
        assert watch.reason == "shutdown"


def test_a_watch_begun_after_the_stop_is_cancelled_at_once() -> None:
    in_flight = InFlight()
    in_flight.cancel_all()  # no call running: nothing to fire now, but the server is stopping
    with in_flight.watch(FakeContext(5.0), limit=10) as watch:  # type: ignore[arg-type]
        assert watch.event.is_set() and watch.reason == "shutdown"
        assert "stopping" in str(watch.error(10))


def test_a_call_whose_watch_has_fired_reserves_nothing(tmp_path: Path) -> None:
    data = write_database(tmp_path / "d.duckdb", [{"gender": "Female"}] * 20)
    engine = Engine(DuckDBBackend(data), codebook=default_codebook())
    accounts = MemoryAccounts()
    accounts.add("alice", Role.RESEARCHER)
    watch = CallWatch()
    watch.fire("deadline")
    plan = engine.plan(Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.5"))
    with pytest.raises(QueryCancelledError, match="before its charge was reserved"):
        WatchedCharger(accounts, watch).reserve(
            plan, client="alice", request_id="r-1", data_version=engine.data_version
        )
    # The ledger was not asked at all: no hold made and then given back.
    assert accounts.log == []
    assert accounts.total_spent() == 0 and accounts.total_reserved() == 0
    assert not watch.holding


def _services(engine: Engine, accounts: Accounts, **limits: Any) -> Services:
    settings: dict[str, Any] = {
        "max_query_seconds": 10,
        "max_request_bytes": 1 << 20,
        "max_response_bytes": 1 << 20,
        "max_list_releases": 1000,
    }
    settings.update(limits)
    return Services(engine, accounts, **settings)


def test_a_dry_run_of_a_released_query_states_the_stored_releases_empty_cells(
    tmp_path: Path,
) -> None:
    """Released at 0.5 and dry-run at 0.1: the dry run prices the stored release, and states
    its empty-cell figures as the stored release records them, not as a fresh plan gives them
    (a release made before they were recorded states none)."""
    data = write_database(tmp_path / "d.duckdb", [{"gender": "Female"}] * 20)
    engine = Engine(DuckDBBackend(data), codebook=default_codebook())
    accounts = MemoryAccounts()
    accounts.add("alice", Role.RESEARCHER)
    research = ResearchServicer(_services(engine, accounts))
    released = engine.release(
        Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.5"), charger=accounts,
        client="alice", request_id="r-1",
    )
    made = released.metadata
    assert made.empty_pass_probability is not None and made.unreachable_cells is not None
    request = pb.DryRunRequest(query=count_query("gender"), loss="0.1")
    fresh = research.DryRun(pb.DryRunRequest(query=count_query("ageBroad"), loss="0.5"), None)
    assert not fresh.already_released and fresh.HasField("empty_pass_probability")

    honest = research.DryRun(request, None)
    assert honest.already_released and honest.loss == "0.5"
    # Above the stored release's loss a release would be drawn afresh, and the dry run says so.
    above = research.DryRun(pb.DryRunRequest(query=count_query("gender"), loss="0.6"), None)
    assert not above.already_released and above.loss == "0.6"
    assert honest.empty_pass_probability == made.empty_pass_probability
    assert honest.expected_empty_published_bound == made.expected_empty_published_bound
    assert honest.unreachable_cells == made.unreachable_cells

    # A stored release whose figures differ from what the plan now gives: its own are stated.
    stored = replace(
        made,
        empty_pass_probability=0.0123,
        expected_empty_published_bound=0.0456,
        unreachable_cells=1,
    )
    assert (stored.empty_pass_probability, stored.expected_empty_published_bound) != (
        honest.empty_pass_probability,
        honest.expected_empty_published_bound,
    ) and stored.unreachable_cells != honest.unreachable_cells
    accounts.stored_release = lambda fingerprint, loss: stored  # type: ignore[method-assign]
    dry = research.DryRun(request, None)
    assert dry.already_released and dry.loss == "0.5"
    assert dry.empty_pass_probability == 0.0123
    assert dry.expected_empty_published_bound == 0.0456
    assert dry.unreachable_cells == 1

    # One made before they were recorded states none.
    old = replace(
        made,
        empty_pass_probability=None,
        expected_empty_published_bound=None,
        unreachable_cells=None,
    )
    accounts.stored_release = lambda fingerprint, loss: old  # type: ignore[method-assign]
    dry = research.DryRun(request, None)
    assert dry.already_released and dry.loss == "0.5"
    assert not dry.HasField("empty_pass_probability")
    assert not dry.HasField("expected_empty_published_bound")
    assert not dry.HasField("unreachable_cells")


def test_in_flight_waits_for_calls() -> None:
    in_flight = InFlight()
    with in_flight.call():
        assert not in_flight.wait_idle(0.01)
    assert in_flight.wait_idle(0.01)


def _release_stopped_after_the_scan(tmp_path: Path, reason: str) -> tuple[MemoryAccounts, Any]:
    """Release with `reason` firing once DuckDB has answered, before the commit."""
    data = write_database(tmp_path / "d.duckdb", [{"gender": "Female"}] * 20)
    engine = Engine(DuckDBBackend(data), codebook=default_codebook())
    accounts = MemoryAccounts()
    accounts.add("alice", Role.RESEARCHER)
    watch = CallWatch()

    class SlowBackend:
        def __init__(self, inner: DuckDBBackend) -> None:
            self.inner = inner

        def run(self, statement, *, cancel=None):  # type: ignore[no-untyped-def]
            result = self.inner.run(statement, cancel=cancel)
            watch.fire(reason)  # after DuckDB, before the commit
            return result

        def data_version(self) -> str:
            return self.inner.data_version()

        def codebook(self) -> str | None:
            return self.inner.codebook()

        def dataset(self) -> str | None:
            return self.inner.dataset()

        def load_id(self) -> str | None:
            return self.inner.load_id()

    engine.backend = SlowBackend(engine.backend)  # type: ignore[assignment]
    try:
        outcome: Any = engine.release(
            Query(Count(), by=("gender",)),
            loss=PrivacyLoss.pure("0.5"),
            charger=WatchedCharger(accounts, watch),
            client="alice",
            request_id="r-1",
            cancel=watch.event,
        )
    except QueryCancelledError as exc:
        outcome = exc
    return accounts, (outcome, watch)


def test_a_stop_after_the_scan_refuses_the_commit_and_gives_the_hold_back(
    tmp_path: Path,
) -> None:
    # When the server stops is the custodian's doing, not the records': nothing to charge.
    accounts, (outcome, watch) = _release_stopped_after_the_scan(tmp_path, "shutdown")
    assert isinstance(outcome, QueryCancelledError) and watch.reason == "shutdown"
    assert [e["event"] for e in accounts.log] == ["reserve", "cancel"]
    assert accounts.total_spent() == 0 and accounts.total_reserved() == 0
    assert accounts.releases_by_request == {}
    assert "nothing was charged" in str(watch.error(60))


def test_the_limit_after_the_scan_forfeits_the_hold(tmp_path: Path) -> None:
    # Whether a query ran past the limit depends on the records and is seen by the caller: a
    # free stop could be asked again and again. Charged, nothing released, the id spent.
    accounts, (outcome, watch) = _release_stopped_after_the_scan(tmp_path, "limit")
    assert isinstance(outcome, QueryCancelledError) and watch.reason == "limit"
    assert [e["event"] for e in accounts.log] == ["reserve", "forfeit"]
    assert accounts.total_spent() == Fraction(1, 2) and accounts.total_reserved() == 0
    assert accounts.releases_by_request == {} and accounts.forfeited == {("alice", "r-1")}
    assert "it was charged, and nothing was released" in str(watch.error(60))


@pytest.mark.parametrize("reason", ["deadline", "cancelled"])
def test_a_caller_who_leaves_once_the_data_is_read_is_charged_and_the_release_kept(
    tmp_path: Path, reason: str
) -> None:
    # Leaving free would tell the caller, at no cost, whether the query ended in time.
    accounts, (outcome, watch) = _release_stopped_after_the_scan(tmp_path, reason)
    assert isinstance(outcome, Release), outcome
    assert watch.caller_gone == reason and not watch.event.is_set()
    assert [e["event"] for e in accounts.log] == ["reserve", "commit"]
    assert accounts.total_spent() == Fraction(1, 2) and accounts.total_reserved() == 0
    assert list(accounts.releases_by_request) == [("alice", "r-1")]


def test_a_caller_who_leaves_while_the_charge_is_reserved_reads_nothing_and_pays_nothing(
    tmp_path: Path,
) -> None:
    data = write_database(tmp_path / "d.duckdb", [{"gender": "Female"}] * 20)
    engine = Engine(DuckDBBackend(data), codebook=default_codebook())
    accounts = MemoryAccounts()
    accounts.add("alice", Role.RESEARCHER)
    watch = CallWatch()
    reserve = accounts.reserve

    def leaving(*args: Any, **kwargs: Any) -> Any:
        held = reserve(*args, **kwargs)
        watch.fire("deadline")  # the deadline passes while the ledger holds the charge
        return held

    accounts.reserve = leaving  # type: ignore[method-assign]
    scans: list[object] = []
    run = engine.backend.run
    engine.backend.run = lambda *a, **k: scans.append(a) or run(*a, **k)  # type: ignore[method-assign]
    with pytest.raises(QueryCancelledError):
        engine.release(
            Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.5"),
            charger=WatchedCharger(accounts, watch), client="alice", request_id="r-1",
            cancel=watch.event,
        )
    assert scans == [] and watch.reason == "deadline"
    assert [e["event"] for e in accounts.log] == ["reserve", "cancel"]
    assert accounts.total_spent() == 0 and accounts.total_reserved() == 0


def test_the_servers_limit_still_stops_a_call_whose_caller_left_while_it_held_a_charge() -> None:
    in_flight = InFlight()
    with in_flight.watch(FakeContext(0.05), limit=0.3) as watch:  # type: ignore[arg-type]
        assert watch.hold()
        assert watch.event.wait(5) and watch.reason == "limit"
        assert watch.caller_gone == "deadline"  # came first, and did not stop it


def test_the_watchdog_leaves_ended_calls_alone() -> None:
    in_flight = InFlight()
    with in_flight.watch(FakeContext(None), limit=0.05) as ended:  # type: ignore[arg-type]
        pass
    with in_flight.watch(FakeContext(None), limit=0.1) as running:  # type: ignore[arg-type]
        # The ended call's limit came due first; only the running call's fires.
        assert running.event.wait(5) and running.reason == "limit"
    assert not ended.event.is_set() and ended.reason == ""


def test_ended_calls_leave_the_watchdog() -> None:
    in_flight = InFlight()
    with in_flight.watch(FakeContext(None), limit=0.5) as running:  # type: ignore[arg-type]
        for _ in range(5000):
            with in_flight.watch(FakeContext(None), limit=60):  # type: ignore[arg-type]
                pass
        # Ended calls do not wait out their 60 s limits in the watchdog's heap.
        assert len(in_flight._watchdog._due) <= 128
        assert running.event.wait(5) and running.reason == "limit"


def test_a_failing_interrupt_does_not_end_the_watchdog() -> None:
    in_flight = InFlight()

    def broken() -> None:
        raise RuntimeError("the statement's cursor is gone")

    watching = in_flight.watch(FakeContext(None), limit=0.05)  # type: ignore[arg-type]
    with watching as first, first.event.calling(broken):
        assert first.event.wait(5)
    with in_flight.watch(FakeContext(None), limit=0.05) as second:  # type: ignore[arg-type]
        assert second.event.wait(5) and second.reason == "limit"  # limits still fire


def test_a_call_that_ended_before_it_was_watched_is_cancelled_at_once() -> None:
    class EndedContext(FakeContext):
        def add_callback(self, callback: object) -> bool:
            return False  # what gRPC answers once the call has ended

    with InFlight().watch(EndedContext(5.0), limit=10) as watch:  # type: ignore[arg-type]
        assert watch.event.is_set() and watch.reason == "cancelled"


def test_only_the_revocation_that_revoked_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two administrators revoke one client at once: one revoked it, the other is told it was
    already revoked; a later revocation too. The real ledger decides: its read of the client is
    slowed, so the second revocation arrives while the first is still deciding."""
    from engine import ledger as ledger_module
    from server.accounts import LedgerAccounts
    from server.app import build_engine
    from tests.server_harness import live_config

    config = live_config(tmp_path, write_database(tmp_path / "d.duckdb", [{"gender": "Female"}]))
    engine = build_engine(config)
    accounts = LedgerAccounts.for_config(config, engine)
    accounts.ledger.register_client("alice", role="researcher", cap="1")
    read_client = ledger_module._client_row

    def slow_read(conn: Any, client_id: str) -> Any:
        time.sleep(0.2)
        return read_client(conn, client_id)

    monkeypatch.setattr(ledger_module, "_client_row", slow_read)
    admin = AdminServicer(_services(engine, accounts))
    monkeypatch.setattr("server.servicer.current_identity", lambda: Identity("root", Role.ADMIN))
    request = pb.RevokeClientRequest(client_id="alice", reason="left the project")
    start = threading.Barrier(2)
    answers: list[pb.RevokeClientResponse] = []

    def revoke() -> None:
        start.wait()
        answers.append(admin.RevokeClient(request, None))

    threads = [threading.Thread(target=revoke) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(a.already_revoked for a in answers) == [False, True]
    assert all(a.client.revoked for a in answers)
    assert admin.RevokeClient(request, None).already_revoked
    revocations = [e for e in accounts.ledger.audit_log() if e.entry["event"] == "revoke"]
    assert len(revocations) == 1  # the one that said so is the one on the record
    accounts.close()
