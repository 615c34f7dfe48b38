"""The transport floor and throughput under concurrent clients, against a server process.

The server runs as a custodian runs it (`veil serve`, its own process); each client is a thread
here with its own channel and its own researcher token, calling as fast as answers come back for
a fixed time. Two loads:

- fresh: small-table releases (a count by gender x ageBroad, or by gender x majorityStatus, over
  records registered from some year on), every call a new request id and a slightly larger loss
  than the client's last, so each is a fresh, charged release. Each client has a query of its
  own: the ledger lets only one release of a query be computed at a time (two fresh draws of one
  query side by side would hand out two independent noisy answers), so clients asking the very
  same query would queue on each other by design, not for lack of capacity.
- replay: the same queries, already released, asked again under new request ids: the ledger
  returns the stored release at no charge.

And, as the bound the machine sets, DuckDB alone in this process: as many threads, each running
the statement veil runs for its client's query, back to back. No release rate can pass it.
Between the two, to say where a fresh release's rate goes, veil's engine in this process with
the same threads and queries: without a ledger (plan, scan, noise and the answer's table), then
each a fresh release charged to a real ledger of its own (as the server's, WAL and synced), so
that what the ledger takes and what the server and its transport take can be read apart.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.data import Dataset
from benchmarks.serverproc import ServerProcess
from benchmarks.stats import median
from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.ledger import Ledger
from engine.loss import Accounting, PrivacyLoss, format_amount
from engine.query import Count, Query, Range
from engine.sql import build
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc
from server.convert import query_to_pb

# Epsilon 0.01 (and a millionth more per call): small enough for thousands of fresh releases
# under one ledger's cap of 100, large enough that the noise scale (100) is a realistic one.
BASE_LOSS = Fraction(1, 100)
STEP = Fraction(1, 1_000_000)
YEARS = 20  # yearOfRegistration runs 2002..2021 in the codebook


def client_query(index: int) -> Query:
    """A small table of its own for client `index` (40 or 16 cells)."""
    by = ("gender", "ageBroad") if (index // YEARS) % 2 == 0 else ("gender", "majorityStatus")
    return Query(Count(), by=by, where=Range("yearOfRegistration", low=2002 + index % YEARS))


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def floor(server: ServerProcess, token: str, *, calls: int) -> dict[str, Any]:
    """Sequential empty calls: the health check (no credential) and GetBudget (credential
    checked, one ledger read)."""
    out: dict[str, Any] = {}
    with server.channel() as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health ships no types
        research = pb_grpc.ResearchStub(channel)
        metadata = (("authorization", f"Bearer {token}"),)
        probes: dict[str, Callable[[], Any]] = {
            "health_check": lambda: health.Check(health_pb2.HealthCheckRequest(service="")),
            "get_budget": lambda: research.GetBudget(pb.GetBudgetRequest(), metadata=metadata),
        }
        for name, call in probes.items():
            for _ in range(min(20, calls)):
                call()
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            out[name] = {"calls": calls, "median": median(times), "p95": percentile(times, 0.95)}
    return out


class _Load:
    def __init__(self, server: ServerProcess, tokens: Sequence[str], counters: list[int]):
        self.server = server
        self.tokens = tokens
        self.counters = counters  # per client: fresh releases made so far
        self.queries = [query_to_pb(client_query(i)) for i in range(len(tokens))]

    def release(self, stub: pb_grpc.ResearchStub, index: int, loss: Fraction) -> None:
        request = pb.ReleaseRequest(
            request_id=uuid.uuid4().hex, query=self.queries[index], loss=format_amount(loss)
        )
        stub.Release(request, metadata=(("authorization", f"Bearer {self.tokens[index]}"),))

    def fresh_loss(self, index: int) -> Fraction:
        self.counters[index] += 1
        return BASE_LOSS + self.counters[index] * STEP

    def run(self, clients: int, seconds: float, *, replay: bool) -> dict[str, Any]:
        latencies: list[list[float]] = [[] for _ in range(clients)]
        errors: Counter[str] = Counter()
        lock = threading.Lock()
        stop_at: list[float] = [0.0]

        def go() -> None:  # run by the barrier once every client is connected
            stop_at[0] = time.perf_counter() + seconds

        ready = threading.Barrier(clients + 1, action=go)

        def client(index: int) -> None:
            with self.server.channel() as channel:
                stub = pb_grpc.ResearchStub(channel)
                if replay:  # make sure a release exists to be replayed
                    self.release(stub, index, self.fresh_loss(index))
                else:  # connect before the clock starts
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                ready.wait()
                while time.perf_counter() < stop_at[0]:
                    loss = BASE_LOSS if replay else self.fresh_loss(index)
                    start = time.perf_counter()
                    try:
                        self.release(stub, index, loss)
                    except grpc.RpcError as exc:
                        with lock:
                            errors[str(exc.code())] += 1
                        continue
                    latencies[index].append(time.perf_counter() - start)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        ready.wait()
        begin = stop_at[0] - seconds
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - begin
        done = [x for per in latencies for x in per]
        return {
            "clients": clients,
            "seconds": elapsed,
            "releases": len(done),
            "per_second": len(done) / elapsed if elapsed > 0 else 0.0,
            "latency_median": median(done) if done else None,
            "latency_p95": percentile(done, 0.95) if done else None,
            "errors": dict(errors),
        }


def _on_threads(clients: int, client: Callable[[int], None]) -> float:
    """Run `client(i)` on a thread of its own for each of `clients`; the seconds all took."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - begin


def raw_load(data: Dataset, clients: int, seconds: float) -> dict[str, Any]:
    """DuckDB alone, in this process: `clients` threads, each running the statement veil runs
    for its client's query, for `seconds`. The most releases per second the scans would allow
    on this machine, with no privacy work at all."""
    backend = DuckDBBackend(data.path)
    try:
        engine = Engine(backend, codebook=default_codebook())
        statements = [
            build(engine.plan(client_query(i), loss=PrivacyLoss.pure(BASE_LOSS)))
            for i in range(clients)
        ]
        done = [0] * clients
        stop_at = time.perf_counter() + seconds

        def client(index: int) -> None:
            while time.perf_counter() < stop_at:
                backend.run(statements[index])
                done[index] += 1

        elapsed = _on_threads(clients, client)
    finally:
        backend.close()
    return {"clients": clients, "seconds": elapsed, "statements": sum(done),
            "per_second": sum(done) / elapsed}


def engine_load(
    data: Dataset, clients: int, seconds: float, *, ledger: Path | None
) -> dict[str, Any]:
    """veil's engine in this process: `clients` threads, each making fresh releases of its
    client's query for `seconds`. With `ledger` (a path for a new ledger file), each is charged
    to it and stored, as the server's are; without, each is the engine's answer alone."""
    backend = DuckDBBackend(data.path)
    charger: Ledger | None = None
    try:
        engine = Engine(backend, codebook=default_codebook())
        if ledger is not None:
            for leftover in (ledger, Path(f"{ledger}-wal"), Path(f"{ledger}-shm")):
                leftover.unlink(missing_ok=True)  # an earlier run's, whose clients exist
            charger = Ledger.open(
                ledger,
                accounting=Accounting.PURE_DP,
                dataset_cap=Fraction(100),
                dataset=engine.dataset,
                data_version=engine.data_version,
            )
            for index in range(clients):
                charger.register_client(f"researcher-{index}", role="researcher",
                                        cap=Fraction(100))
        done = [0] * clients
        stop_at = time.perf_counter() + seconds

        def client(index: int) -> None:
            query = client_query(index)
            while time.perf_counter() < stop_at:
                loss = PrivacyLoss.pure(BASE_LOSS + (done[index] + 1) * STEP)
                if charger is None:
                    engine.answer(engine.plan(query, loss=loss))
                else:
                    engine.release(query, loss=loss, charger=charger,
                                   client=f"researcher-{index}", request_id=uuid.uuid4().hex)
                done[index] += 1

        elapsed = _on_threads(clients, client)
        # What the ledger recorded as spent: each fresh release's loss, so a run that did not
        # go through it shows (0 with no ledger).
        charged = sum(
            (charger.spent(f"researcher-{index}") for index in range(clients)), Fraction(0)
        ) if charger is not None else Fraction(0)
    finally:
        if charger is not None:
            charger.close()
        backend.close()
    return {"clients": clients, "seconds": elapsed, "releases": sum(done),
            "per_second": sum(done) / elapsed, "charged": format_amount(charged)}


def measure(
    data: Dataset, work: str, *, concurrency: Sequence[int], seconds: float, floor_calls: int
) -> dict[str, Any]:
    duckdb_alone = [raw_load(data, clients, seconds) for clients in concurrency]
    scratch = Path(work) / f"throughput-{data.rows}"
    scratch.mkdir(parents=True, exist_ok=True)
    engine_alone = [engine_load(data, clients, seconds, ledger=None) for clients in concurrency]
    engine_ledger = [
        engine_load(data, clients, seconds, ledger=scratch / f"engine-{clients}-ledger.sqlite")
        for clients in concurrency
    ]
    server = ServerProcess(data=data.path, work=scratch, name="throughput")
    try:
        tokens = server.register_researchers(max(concurrency))
        load = _Load(server, tokens, [0] * len(tokens))
        result: dict[str, Any] = {
            "rows": data.rows,
            "startup_seconds": server.startup_seconds,
            "floor": floor(server, tokens[0], calls=floor_calls),
            "fresh": [],
            "replay": [],
            "duckdb_alone": duckdb_alone,
            "engine_alone": engine_alone,
            "engine_ledger": engine_ledger,
        }
        for clients in concurrency:
            result["fresh"].append(load.run(clients, seconds, replay=False))
        for clients in concurrency:
            result["replay"].append(load.run(clients, seconds, replay=True))
        result["server_memory"] = server.memory()
        return result
    finally:
        server.stop()
