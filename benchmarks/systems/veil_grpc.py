"""veil end to end: the real gRPC server started in-process on port 0, called over loopback.

The server is built the way `veil serve` builds it (engine, durable ledger, auth interceptor,
limits, health service, JSON call log to a file); the caller is a researcher with a bearer token.
A run is what a researcher's client does: build the protobuf query, call Release, and decode the
Arrow IPC stream into a table.

- veil_grpc:        a fresh release (new request id, a slightly larger loss than any earlier
                    release of the query, so the ledger never replays).
- veil_grpc_replay: a release of a query already released: the stored release comes back.
- grpc_floor (reference): an empty call, the health check, on the same channel: the transport's
                    own cost.

The server's per-client rate limit is raised for the benchmark (the default, 10 calls per
second, is a policy, not a cost). Calls go through the generated stubs (`protos/`), which is what
any client sends; the researcher's client package (`client/`) is not used yet, and going through
it changes only `LiveServer.release`.
"""

from __future__ import annotations

import time
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.data import Dataset
from benchmarks.systems import Options, System
from benchmarks.workload import WorkloadQuery
from engine.loss import format_amount
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc
from server.accounts import LedgerAccounts
from server.app import Running, build_engine, configure_logging, start
from server.auth import hash_token, new_token
from server.config import config_from_mapping
from server.convert import query_to_pb

CLIENT = "bench-researcher"
LEDGER_CAP = Fraction(100)
STEP = Fraction(1, 10_000)
MAX_MESSAGE = 64 << 20


def server_config(data: Path, ledger: Path, log: Path, *, listen: str = "127.0.0.1:0") -> Any:
    """The benchmark's deployment: defaults, except caps at their maximum and no rate limit."""
    return config_from_mapping(
        {
            "data": str(data),
            "ledger": str(ledger),
            "caps": {"dataset": str(LEDGER_CAP), "client": str(LEDGER_CAP)},
            "server": {"listen": listen, "grace_seconds": 1},
            "limits": {
                "rate_per_second": 1_000_000.0,
                "rate_burst": 1_000_000,
                "max_concurrent_calls": 64,
            },
            "log": {"level": "info", "file": str(log)},
        }
    )


class LiveServer:
    """One in-process server with one researcher, restarted on a new ledger when its budget
    runs low."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.epsilon = Fraction(str(options.epsilon))
        self.data: Dataset | None = None
        self.running: Running | None = None
        self.channel: grpc.Channel | None = None
        self.research: pb_grpc.ResearchStub | None = None
        self.health: health_pb2_grpc.HealthStub | None = None
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.spent = Fraction(0)
        self.fresh = 0
        self.starts = 0

    def open(self, data: Dataset) -> None:
        if self.data != data:
            self.close()
            self.data = data
            self._start()

    def _start(self) -> None:
        assert self.data is not None
        self.starts += 1
        work = Path(self.options.work)
        config = server_config(
            self.data.path, work / f"grpc-ledger-{self.starts}.sqlite", work / "grpc-server.log"
        )
        configure_logging(config.log_level, config.log_file)
        engine = build_engine(config)
        accounts = LedgerAccounts.for_config(config, engine)
        token = new_token()
        accounts.ledger.register_client(
            CLIENT, role="researcher", cap=LEDGER_CAP, token_hash=hash_token(token)
        )
        self.running = start(config, engine=engine, accounts=accounts)
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.running.port}",
            options=[("grpc.max_receive_message_length", MAX_MESSAGE)],
        )
        self.research = pb_grpc.ResearchStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.spent = Fraction(0)

    def ensure_budget(self, releases: int) -> None:
        need = releases * (self.epsilon + (self.fresh + releases) * STEP)
        if need >= LEDGER_CAP:
            raise ValueError(
                f"{releases} releases at epsilon {self.epsilon} exceed what one ledger may "
                f"charge ({LEDGER_CAP}); lower --repeats or --epsilon"
            )
        if self.spent + need >= LEDGER_CAP:
            self._stop()
            self._start()

    def release(self, query: WorkloadQuery, loss: Fraction) -> tuple[pa.Table, Any]:
        """One Release call as a client makes it: build, call, decode; the table and the
        response (for its charge and release id)."""
        assert self.research is not None
        request = pb.ReleaseRequest(
            request_id=uuid.uuid4().hex,
            query=query_to_pb(query.veil_query()),
            loss=format_amount(loss),
        )
        response = self.research.Release(request, metadata=self.metadata)
        return pa.ipc.open_stream(pa.py_buffer(response.arrow_ipc)).read_all(), response

    def _stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.running is not None:
            self.running.stop(0)
            self.running = None

    def close(self) -> None:
        self._stop()
        self.data = None


class _Call:
    slow = False
    reference = False

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self._cells: int | None = None

    def open(self, data: Dataset) -> None:
        self.server.open(data)

    def prepare(self, query: WorkloadQuery) -> None:
        pass

    def cells(self, query: WorkloadQuery) -> int | None:
        return self._cells

    def close(self) -> None:
        self.server.close()


class VeilGrpc(_Call):
    name = "veil_grpc"
    label = "veil end to end over gRPC: fresh release"

    def prepare(self, query: WorkloadQuery) -> None:
        self.server.ensure_budget(self.server.options.repeats + 3)

    def run(self, query: WorkloadQuery) -> float:
        self.server.fresh += 1
        loss = self.server.epsilon + self.server.fresh * STEP
        start = time.perf_counter()
        table, response = self.server.release(query, loss)
        elapsed = time.perf_counter() - start
        if response.charged != format_amount(loss):
            raise RuntimeError("a fresh release was expected, the server returned a stored one")
        self.server.spent += loss
        self._cells = table.num_rows
        return elapsed


class VeilGrpcReplay(_Call):
    name = "veil_grpc_replay"
    label = "veil end to end over gRPC: stored release replayed"

    def prepare(self, query: WorkloadQuery) -> None:
        self.server.ensure_budget(self.server.options.repeats + 3)
        self.server.release(query, self.server.epsilon)
        self.server.spent += self.server.epsilon

    def run(self, query: WorkloadQuery) -> float:
        start = time.perf_counter()
        table, response = self.server.release(query, self.server.epsilon)
        elapsed = time.perf_counter() - start
        if response.charged != "0":
            raise RuntimeError("a replay was expected, the server made a fresh release")
        self._cells = table.num_rows
        return elapsed


class Floor(_Call):
    name = "grpc_floor"
    label = "reference: an empty gRPC call (health check) to the same server"
    reference = True

    def run(self, query: WorkloadQuery) -> float:
        assert self.server.health is not None
        request = health_pb2.HealthCheckRequest(service="")
        start = time.perf_counter()
        self.server.health.Check(request)
        return time.perf_counter() - start


def systems(options: Options) -> list[System]:
    server = LiveServer(options)
    return [VeilGrpc(server), VeilGrpcReplay(server), Floor(server)]
