"""Limits through a real channel: message size, cells, concurrency, rate, deadlines.

The slow query (see `tests.server_harness.slow_query`) keeps DuckDB busy for seconds on eight
million records; the server's time limit must interrupt it, release its reservation and charge
nothing, while a caller's deadline, once the charge is held, must not stop it free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from fractions import Fraction
from pathlib import Path

import grpc
import pytest

from client.errors import QueryTimeout, from_rpc_error
from engine.backend import Cancellation, DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import QueryCancelledError
from engine.loss import PrivacyLoss
from engine.sql import build
from protos.veil.v1 import veil_pb2 as pb
from server.convert import query_from_pb
from tests.server_harness import (
    LiveServer,
    build_slow_data,
    charges_settled,
    count_query,
    slow_query,
    start_live,
    stubs,
)


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_slow_data(tmp_path_factory.mktemp("slow") / "slow.duckdb", rows=8_000_000)
    # The query must still be running after 1.5 s when nothing stops it; otherwise the
    # deadline tests below would prove nothing.
    engine = Engine(DuckDBBackend(path), codebook=default_codebook())
    try:
        plan = engine.plan(query_from_pb(slow_query(), engine.settings), loss=PrivacyLoss.pure("1"))
        cancel = Cancellation()
        timer = threading.Timer(1.5, cancel.set)
        timer.start()
        with pytest.raises(QueryCancelledError):
            engine.backend.run(build(plan), cancel=cancel)
    finally:
        assert isinstance(engine.backend, DuckDBBackend)
        engine.backend.close()
    return path


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = start_live(tmp_path, limits={"max_request_bytes": 65536})
    yield server
    server.stop()


def wait_idle(server: LiveServer, within: float) -> float:
    """Seconds until no call is running on the server (fails after `within`)."""
    start = time.monotonic()
    assert server.running.services.in_flight.wait_idle(within), "calls still running"
    return time.monotonic() - start


def test_oversized_request(live: LiveServer) -> None:
    big = pb.ReleaseRequest(
        request_id="big",
        loss="0.5",
        query=count_query(
            "gender",
            where=pb.Filter(
                in_set=pb.InSet(variable="citizenship", values=[pb.Value(text="PH")] * 30_000)
            ),
        ),
    )
    assert big.ByteSize() > 65536
    with stubs(live.port) as s:
        with pytest.raises(grpc.RpcError) as error:
            s.research.Release(big, metadata=live.auth("alice"), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.research.GetCodebook(pb.GetCodebookRequest(), metadata=live.auth("alice"))
    assert live.ledger.charges() == []


def test_too_many_cells_is_rejected_fast_and_uncharged(live: LiveServer) -> None:
    huge = count_query("citizenship", "CountryOfExploitation", "ageBroad")
    entries = len(live.ledger.audit_log())
    with stubs(live.port) as s:
        s.research.GetCodebook(pb.GetCodebookRequest(), metadata=live.auth("alice"))  # warm up
        for method, request in (
            (s.research.Release, pb.ReleaseRequest(request_id="huge", query=huge, loss="1")),
            (s.research.DryRun, pb.DryRunRequest(query=huge, loss="1")),
        ):
            start = time.perf_counter()
            with pytest.raises(grpc.RpcError) as error:
                method(request, metadata=live.auth("alice"), timeout=10)
            elapsed = time.perf_counter() - start
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cells, more than the maximum of 100000" in (error.value.details() or "")
            assert elapsed < 0.5, elapsed
    # Rejected from the codebook alone: no charge, no reservation, not even a refusal entry.
    assert live.ledger.charges() == []
    assert len(live.ledger.audit_log()) == entries


def test_rate_limit_per_client(tmp_path: Path) -> None:
    server = start_live(tmp_path, limits={"rate_per_second": 0.1, "rate_burst": 3})
    try:
        with stubs(server.port) as s:
            codes = []
            for _ in range(5):
                try:
                    s.research.GetBudget(pb.GetBudgetRequest(), metadata=server.auth("alice"))
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
                    limited = error
            assert codes[:3] == [grpc.StatusCode.OK] * 3
            assert codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
            assert "rate limit" in (limited.details() or "")
            assert float(dict(limited.trailing_metadata() or ())["retry-after"]) > 0
            # Another client has a bucket of its own.
            budget = s.research.GetBudget(pb.GetBudgetRequest(), metadata=server.auth("bob"))
            assert budget.client_id == "bob"
    finally:
        server.stop()


def test_listings_return_at_most_the_servers_maximum(tmp_path: Path) -> None:
    server = start_live(tmp_path, limits={"max_list_releases": 2})
    try:
        with stubs(server.port) as s:
            for i, by in enumerate(("gender", "ageBroad", "citizenship")):
                s.research.Release(
                    pb.ReleaseRequest(request_id=f"r-{i}", query=count_query(by), loss="0.5"),
                    metadata=server.auth("alice"),
                    timeout=30,
                )
            assert len(server.ledger.releases()) == 3
            for limit in (1000, 0, 3):  # 0 asks for the default (100)
                mine = s.research.ListMyReleases(
                    pb.ListMyReleasesRequest(limit=limit), metadata=server.auth("alice")
                )
                assert len(mine.releases) == 2, limit
                listed = s.audit.ListReleases(
                    pb.ListReleasesRequest(limit=limit), metadata=server.auth("audra")
                )
                assert len(listed.releases) == 2, limit
            # Below the maximum, the caller's limit holds.
            assert len(s.research.ListMyReleases(
                pb.ListMyReleasesRequest(limit=1), metadata=server.auth("alice")
            ).releases) == 1
            assert len(s.audit.ListReleases(
                pb.ListReleasesRequest(limit=1), metadata=server.auth("audra")
            ).releases) == 1
    finally:
        server.stop()


def interrupted_scans(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each of the server's DuckDB statements from now on was interrupted (True) or
    ran to its end (False): observed, not timed, so a loaded machine cannot fail the tests."""
    backend = server.running.services.engine.backend
    outcomes: list[bool] = []
    run = backend.run

    def watched(*args: object, **kwargs: object) -> object:
        try:
            result = run(*args, **kwargs)  # type: ignore[arg-type]
        except QueryCancelledError:
            outcomes.append(True)
            raise
        outcomes.append(False)
        return result

    monkeypatch.setattr(backend, "run", watched)
    return outcomes


def test_a_deadline_that_passes_once_the_data_is_read_does_not_stop_the_query(
    tmp_path: Path, slow_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping a query free would tell its caller, at no cost, whether it ended before the
    deadline, and so something of how many records it reads: once the charge is held, the
    query runs to its end, is charged and stored, and a retry under its request id gets it."""
    server = start_live(tmp_path, data=slow_data)
    scans = interrupted_scans(server, monkeypatch)
    try:
        request = pb.ReleaseRequest(request_id="slow-1", query=slow_query(), loss="0.5")
        with stubs(server.port) as s:
            with pytest.raises(grpc.RpcError) as error:
                s.research.Release(request, metadata=server.auth("alice"), timeout=0.2)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            lost = from_rpc_error(error.value, request_id="slow-1")
            assert lost.request_id == "slow-1" and "retry with request_id='slow-1'" in str(lost)
            # The scan takes more than 1.5 s (see the fixture): it ran to its end all the same.
            wait_idle(server, 60)
            assert scans == [False]
        ledger = server.ledger
        assert ledger.spent("alice") == Fraction(1, 2) and charges_settled(ledger)
        assert [c.state for c in ledger.charges()] == ["committed"]
        (stored,) = ledger.releases()
        with stubs(server.port) as s:
            retry = s.research.Release(request, metadata=server.auth("alice"), timeout=60)
        assert retry.charged == "0" and retry.metadata.release_id == stored.release_id
        assert scans == [False] and ledger.spent("alice") == Fraction(1, 2)
    finally:
        server.stop()


def test_server_limit_on_query_time_forfeits_the_charge(tmp_path: Path, slow_data: Path) -> None:
    """The limit stops a query that read data: charged, nothing released, the id spent."""
    server = start_live(tmp_path, data=slow_data, limits={"max_query_seconds": 0.3})
    try:
        request = pb.ReleaseRequest(request_id="slow-2", query=slow_query(), loss="0.5")
        with stubs(server.port) as s:
            with pytest.raises(grpc.RpcError) as error:
                s.research.Release(request, metadata=server.auth("alice"), timeout=30)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            details = error.value.details() or ""
            assert "server's limit of 0.3 s" in details and "it was charged" in details
            assert dict(error.value.trailing_metadata() or ())["veil-request-spent"] == "1"
            # The client offers no request id to retry under, and no advice to: it is spent.
            lost = from_rpc_error(error.value, request_id="slow-2")
            assert isinstance(lost, QueryTimeout) and lost.request_id is None
            assert "retry with" not in str(lost) and "new request id" in str(lost)
            assert "--request-id" not in (lost.shell_message or "")
            ledger = server.ledger
            assert ledger.spent("alice") == Fraction(1, 2) and charges_settled(ledger)
            assert ledger.releases() == []
            (charge,) = ledger.charges()
            assert (charge.state, charge.release_id, charge.reason) == (
                "committed", None, "stopped_by_limit"
            )
            # Its retry is refused, saying why, and charges nothing more.
            with pytest.raises(grpc.RpcError) as retry:
                s.research.Release(request, metadata=server.auth("alice"), timeout=30)
            assert "stopped by the server's time limit" in (retry.value.details() or "")
            assert ledger.spent("alice") == Fraction(1, 2)
            assert ledger.verify().ok
    finally:
        server.stop()


def test_flood_beyond_the_concurrency_cap(tmp_path: Path, slow_data: Path) -> None:
    server = start_live(
        tmp_path,
        data=slow_data,
        limits={"max_concurrent_calls": 2, "workers": 2, "rate_burst": 100},
    )
    try:
        query = slow_query()
        requests = [
            pb.ReleaseRequest(request_id=f"flood-{i}", query=query, loss="0.5") for i in range(12)
        ]
        start = threading.Barrier(12)
        with stubs(server.port) as s:

            def call(request: pb.ReleaseRequest) -> grpc.StatusCode:
                start.wait()
                try:
                    s.research.Release(request, metadata=server.auth("alice"), timeout=1.0)
                except grpc.RpcError as error:
                    return error.code()  # type: ignore[no-any-return]
                return grpc.StatusCode.OK

            with futures.ThreadPoolExecutor(12) as pool:
                codes = list(pool.map(call, requests))
            exhausted = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
            # Refused at once by the cap; the two admitted ran out of time on the slow query.
            assert exhausted >= 8, codes
            assert set(codes) <= {
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            }
            assert server.running.services.in_flight.peak <= 2
            wait_idle(server, 60)
            # The server keeps serving once the flood has passed.
            assert s.research.GetCodebook(pb.GetCodebookRequest(), metadata=server.auth("bob"))
        # The admitted calls' query ran to its end after their deadlines and was charged once
        # (the others admitted got it back as a replay); nothing refused was charged.
        ledger = server.ledger
        committed = [c for c in ledger.charges() if c.state == "committed"]
        assert 1 <= len(committed) <= 12 - exhausted and charges_settled(ledger)
        assert ledger.spent("alice") == Fraction(1, 2)
    finally:
        server.stop()


def test_one_client_cannot_hold_every_worker(tmp_path: Path, slow_data: Path) -> None:
    server = start_live(
        tmp_path,
        data=slow_data,
        limits={"calls_per_client": 2, "max_query_seconds": 0.8, "rate_burst": 100},
    )
    try:
        query = slow_query()
        start = threading.Barrier(6)
        with stubs(server.port) as s:

            def call(i: int) -> tuple[grpc.StatusCode, str]:
                request = pb.ReleaseRequest(request_id=f"hold-{i}", query=query, loss="0.5")
                start.wait()
                try:
                    s.research.Release(request, metadata=server.auth("alice"), timeout=10)
                except grpc.RpcError as error:
                    return error.code(), error.details() or ""
                return grpc.StatusCode.OK, ""

            with futures.ThreadPoolExecutor(6) as pool:
                running = [pool.submit(call, i) for i in range(6)]
                # While alice's calls run, another client is served.
                time.sleep(0.2)
                assert s.research.GetBudget(
                    pb.GetBudgetRequest(), metadata=server.auth("bob"), timeout=5
                ).client_id == "bob"
                outcomes = [r.result() for r in running]
            # Once they end, the client's calls are counted out: it may call again.
            assert s.research.GetBudget(pb.GetBudgetRequest(), metadata=server.auth("alice"))
        refused = [d for code, d in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        # Two ran (and met the server's time limit on the slow query); the other four were
        # refused before they began, saying why and when to try again.
        assert len(refused) == 4, outcomes
        assert all("already has 2 calls running" in d for d in refused), refused
        assert sum(code == grpc.StatusCode.DEADLINE_EXCEEDED for code, _ in outcomes) == 2, outcomes
        # The limit forfeits a held charge: the first call's, and the second's if it was held
        # before the limit came (it waits for the first, which draws the same query).
        ledger = server.ledger
        forfeited = [c for c in ledger.charges() if c.state == "committed"]
        assert 1 <= len(forfeited) <= 2 and all(c.release_id is None for c in forfeited)
        assert ledger.spent("alice") == Fraction(len(forfeited), 2) and charges_settled(ledger)
    finally:
        server.stop()


def test_calls_that_never_send_their_request_cannot_hold_the_workers(tmp_path: Path) -> None:
    """gRPC gives a call its worker when its headers arrive. Calls that then never send their
    message must not lock every client out: without a credential they are refused at once, from
    the headers alone; with one, they count against the client's calls and are cancelled when
    `request_seconds` passes; a health check gets the same bound."""
    live = start_live(
        tmp_path,
        limits={"workers": 4, "max_concurrent_calls": 4, "calls_per_client": 4,
                "request_seconds": 1.0},
    )
    stop = threading.Event()

    def never_sent() -> Iterator[bytes]:
        stop.wait()
        yield from ()

    channel = grpc.insecure_channel(f"127.0.0.1:{live.port}")
    try:
        def hold(method: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[grpc.Future]:
            call = channel.stream_unary(method)
            return [call.future(never_sent(), metadata=metadata) for _ in range(4)]

        def codebook_now() -> None:  # a legitimate call, as soon as the server can take it
            with stubs(live.port) as s:
                s.research.GetCodebook(pb.GetCodebookRequest(), metadata=live.auth("bob"),
                                       timeout=5)

        anonymous = hold("/veil.v1.Research/GetCodebook")
        assert {f.exception(timeout=5).code() for f in anonymous} == {  # type: ignore[union-attr]
            grpc.StatusCode.UNAUTHENTICATED
        }
        started = time.monotonic()
        codebook_now()
        assert time.monotonic() - started < 0.9  # not after request_seconds: refused at once

        for method, metadata in [
            ("/veil.v1.Research/GetCodebook", live.auth("alice")),
            ("/grpc.health.v1.Health/Check", ()),
        ]:
            held = hold(method, metadata)
            time.sleep(0.3)
            with stubs(live.port) as s, pytest.raises(grpc.RpcError) as refused:
                s.research.GetCodebook(pb.GetCodebookRequest(), metadata=live.auth("bob"),
                                       timeout=0.3)
            # Every worker held, for now.
            assert refused.value.code() in (
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED
            )
            codes = {f.exception(timeout=5).code() for f in held}  # type: ignore[union-attr]
            assert codes == {grpc.StatusCode.CANCELLED}, method
            codebook_now()
    finally:
        stop.set()
        channel.close()
        live.stop()
