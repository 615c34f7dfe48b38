"""Helpers for the server tests: a data file, an in-memory ledger, a server on port 0.

`MemoryAccounts` is a small, exact, in-memory stand-in for the ledger, used where a test needs
to inject a fault (a ledger that cannot write) or watch reservations; the integration tests
also run against the real ledger.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc

from engine.errors import BudgetExceededError, LedgerUnavailableError, RequestConflictError
from engine.ledger import Ledger
from engine.loss import format_amount, parse_amount
from engine.planner import Plan
from engine.release import Answer, Release, ReleaseMetadata, replays
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc
from server.accounts import LedgerAccounts
from server.app import Running, build_engine, start
from server.auth import ExpiredToken, Identity, RevokedToken, Role, hash_token, new_token
from server.config import ServerConfig, config_from_mapping
from server.convert import ROLE_TO_PB


@dataclass
class _Client:
    client_id: str
    role: Role
    institution: str
    cap: Fraction
    token_hash: str
    spent: Fraction = Fraction(0)
    reserved: Fraction = Fraction(0)
    revoked: bool = False


@dataclass
class MemoryReservation:
    owner: MemoryAccounts
    client: str
    request_id: str
    plan: Plan
    stored: Release | None = None
    done: bool = False

    def commit(self, answer: Answer) -> Release:
        return self.owner._commit(self, answer)

    def cancel(self) -> None:
        self.owner._cancel(self)

    def forfeit(self, reason: str) -> None:
        self.owner._cancel(self, spent=True)


@dataclass
class MemoryAccounts:
    """An in-memory ledger with the server's Accounts interface. `fail_writes` makes every
    reservation fail as a ledger that cannot write would."""

    records: dict[str, _Client] = field(default_factory=dict)
    releases_by_request: dict[tuple[str, str], Release] = field(default_factory=dict)
    releases_by_fingerprint: dict[str, Release] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    forfeited: set[tuple[str, str]] = field(default_factory=set)  # (client, request id)
    denied: list[dict[str, Any]] = field(default_factory=list)
    fail_writes: bool = False
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- setup --
    def add(self, client_id: str, role: Role, *, cap: str = "10", institution: str = "") -> str:
        token = new_token()
        self.records[client_id] = _Client(
            client_id, role, institution, Fraction(cap), hash_token(token)
        )
        return token

    @property
    def charger(self) -> MemoryAccounts:
        return self

    # -- Charger --
    def reserve(
        self, plan: Plan, *, client: str, request_id: str, data_version: str = ""
    ) -> MemoryReservation:
        with self.lock:
            if self.fail_writes:
                raise LedgerUnavailableError("the ledger cannot write: disk full")
            if (client, request_id) in self.forfeited:
                raise RequestConflictError(f"request {request_id!r} was charged and stopped")
            prior = self.releases_by_request.get((client, request_id))
            if prior is not None:
                if prior.metadata.fingerprint != plan.fingerprint:
                    raise RequestConflictError(f"request id {request_id!r} was used before")
                return MemoryReservation(self, client, request_id, plan, stored=prior, done=True)
            reused = self.stored_release_of(plan.fingerprint, plan.loss.amount)
            if reused is not None:
                return MemoryReservation(self, client, request_id, plan, stored=reused, done=True)
            record = self.records[client]
            amount = plan.loss.amount
            if record.spent + record.reserved + amount > record.cap:
                remaining = record.cap - record.spent - record.reserved
                raise BudgetExceededError(
                    f"client {client!r} has {format_amount(remaining)} left, "
                    f"the query costs {format_amount(amount)}",
                    scope=f"client:{client}",
                    remaining=format_amount(remaining),
                )
            record.reserved += amount
            self.log.append({"event": "reserve", "client": client, "request_id": request_id})
            return MemoryReservation(self, client, request_id, plan)

    def _commit(self, reservation: MemoryReservation, answer: Answer) -> Release:
        with self.lock:
            assert not reservation.done
            reservation.done = True
            record = self.records[reservation.client]
            amount = reservation.plan.loss.amount
            record.reserved -= amount
            record.spent += amount
            release = Release.from_answer(
                answer,
                release_id=uuid.uuid4().hex,
                charge_id=uuid.uuid4().hex,
                created_at="2024-01-01T00:00:00Z",
            )
            self.releases_by_request[(reservation.client, reservation.request_id)] = release
            self.releases_by_fingerprint[release.metadata.fingerprint] = release
            self.log.append(
                {
                    "event": "commit",
                    "client": reservation.client,
                    "request_id": reservation.request_id,
                }
            )
            return release

    def _cancel(self, reservation: MemoryReservation, *, spent: bool = False) -> None:
        with self.lock:
            if reservation.done:
                return
            reservation.done = True
            record = self.records[reservation.client]
            record.reserved -= reservation.plan.loss.amount
            if spent:
                record.spent += reservation.plan.loss.amount
                self.forfeited.add((reservation.client, reservation.request_id))
            self.log.append(
                {
                    "event": "forfeit" if spent else "cancel",
                    "client": reservation.client,
                    "request_id": reservation.request_id,
                }
            )

    # -- Accounts --
    def identify(self, token_hash: str) -> Identity | ExpiredToken | RevokedToken | None:
        for c in self.records.values():
            if c.token_hash == token_hash and not c.revoked:
                return Identity(c.client_id, c.role, c.institution)
        return None

    def record_denied(
        self, *, method: str, reason: str, client: str | None, peer: str, unrecorded: int = 0
    ) -> None:
        self.denied.append(
            {"method": method, "reason": reason, "client": client, "unrecorded": unrecorded}
        )

    def record_admin_refused(self, *, method: str, reason: str, by: Identity) -> None:
        self.denied.append(
            {"method": method, "reason": reason, "client": by.client_id, "unrecorded": 0}
        )

    def stored_release_of(self, fingerprint: str, loss: Fraction) -> Release | None:
        # The ledger's rule: the latest release of a query is its largest-loss one, replayed
        # to a request at no more loss than it was drawn at.
        stored = self.releases_by_fingerprint.get(fingerprint)
        if stored is None or not replays(parse_amount(stored.metadata.loss), loss):
            return None
        return stored

    def stored_release(self, fingerprint: str, loss: Fraction) -> ReleaseMetadata | None:
        stored = self.stored_release_of(fingerprint, loss)
        return None if stored is None else stored.metadata

    def earlier_release(self, identity: Identity, fingerprint: str) -> pb.EarlierRelease | None:
        return None  # one data version only: nothing was received on another

    def budget(self, identity: Identity) -> pb.Budget:
        c = self.records[identity.client_id]
        return pb.Budget(
            client_id=c.client_id,
            role=ROLE_TO_PB[c.role],
            institution=c.institution,
            cap=format_amount(c.cap),
            spent=format_amount(c.spent),
            reserved=format_amount(c.reserved),
            remaining=format_amount(c.cap - c.spent - c.reserved),
        )

    def received(self, identity: Identity, *, limit: int) -> list[pb.MyRelease]:
        return [
            pb.MyRelease(release_id=r.metadata.release_id, request_id=q,
                         fingerprint=r.metadata.fingerprint, charged=r.metadata.loss)
            for (c, q), r in self.releases_by_request.items()
            if c == identity.client_id
        ][-limit:]

    def received_release(self, identity: Identity, release_id: str) -> Release:
        from server.errors import NotFoundError

        for (c, _), r in self.releases_by_request.items():
            if c == identity.client_id and r.metadata.release_id == release_id:
                return r
        raise NotFoundError(f"client {identity.client_id!r} has received no release")

    def _info(self, c: _Client) -> pb.ClientInfo:
        return pb.ClientInfo(
            client_id=c.client_id,
            role=ROLE_TO_PB[c.role],
            institution=c.institution,
            cap=format_amount(c.cap),
            spent=format_amount(c.spent),
            remaining=format_amount(c.cap - c.spent),
            revoked=c.revoked,
        )

    def register(
        self,
        client: str,
        *,
        role: Role,
        institution: str,
        cap: Fraction | None,
        token: str,
        by: Identity,
    ) -> pb.ClientInfo:
        from engine.errors import ClientRegistryError

        if client in self.records:
            raise ClientRegistryError(f"client {client!r} is already registered")
        self.records[client] = _Client(
            client, role, institution, Fraction(1) if cap is None else cap, hash_token(token)
        )
        return self._info(self.records[client])

    def set_cap(self, client: str, cap: Fraction, *, by: Identity) -> pb.ClientInfo:
        self.records[client].cap = cap
        return self._info(self.records[client])

    def revoke(self, client: str, *, reason: str, by: Identity) -> pb.RevokeClientResponse:
        with self.lock:
            already = self.records[client].revoked
            self.records[client].revoked = True
        return pb.RevokeClientResponse(
            client=self._info(self.records[client]), already_revoked=already
        )

    def clients(self) -> list[pb.ClientInfo]:
        return [self._info(c) for c in self.records.values()]

    def rotate(self, client: str, *, token: str, by: Identity) -> pb.ClientInfo:
        self.records[client].token_hash = hash_token(token)
        return self._info(self.records[client])

    def report(self) -> pb.LedgerReportResponse:
        return pb.LedgerReportResponse()

    def releases(self, client: str | None, *, limit: int) -> list[pb.ReleaseSummary]:
        return [
            pb.ReleaseSummary(release_id=r.metadata.release_id, client_id=c, request_id=q)
            for (c, q), r in self.releases_by_request.items()
            if client is None or c == client
        ][:limit]

    def verify(self) -> pb.VerifyAuditLogResponse:
        return pb.VerifyAuditLogResponse(ok=True, entries=len(self.log))

    def close(self) -> None:
        self.closed = True

    def total_spent(self) -> Fraction:
        return sum((c.spent for c in self.records.values()), Fraction(0))

    def total_reserved(self) -> Fraction:
        return sum((c.reserved for c in self.records.values()), Fraction(0))


# ---- calling the server ------------------------------------------------------------------------


@dataclass
class Stubs:
    channel: grpc.Channel
    research: pb_grpc.ResearchStub
    admin: pb_grpc.AdminStub
    audit: pb_grpc.AuditStub


@contextmanager
def stubs(port: int, *, max_receive: int = 64 << 20) -> Iterator[Stubs]:
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", max_receive)]
    )
    try:
        yield Stubs(
            channel,
            pb_grpc.ResearchStub(channel),
            pb_grpc.AdminStub(channel),
            pb_grpc.AuditStub(channel),
        )
    finally:
        channel.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def count_query(*by: str, where: pb.Filter | None = None) -> pb.Query:
    query = pb.Query(measure=pb.Measure(count=pb.CountMeasure()), by=list(by))
    if where is not None:
        query.where.CopyFrom(where)
    return query


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ---- a real server over a real ledger ----------------------------------------------------------

ROWS: list[dict[str, Any]] = (
    [
        {
            "gender": "Female",
            "ageBroad": "18--20",
            "yearOfRegistration": 2015,
            "citizenship": "PH",
            "isForcedLabour": 1,
        }
    ]
    * 120
    + [
        {
            "gender": "Male",
            "ageBroad": "9--17",
            "yearOfRegistration": 2018,
            "citizenship": "US",
            "isForcedLabour": 0,
        }
    ]
    * 80
    + [{"gender": "Female", "yearOfRegistration": 2020}] * 40
)

CLIENTS = (
    # client, role, cap, institution
    ("alice", Role.RESEARCHER, "2", "iom"),
    ("bob", Role.RESEARCHER, "1", None),
    ("audra", Role.AUDITOR, "1", None),
    ("root", Role.ADMIN, "0", None),
)


@dataclass
class LiveServer:
    running: Running
    config: ServerConfig
    tokens: dict[str, str]
    root: Path

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def ledger(self) -> Ledger:
        accounts = self.running.accounts
        assert isinstance(accounts, LedgerAccounts)
        return accounts.ledger

    def auth(self, client: str) -> tuple[tuple[str, str], ...]:
        return bearer(self.tokens[client])

    def stop(self, grace: float = 0.0) -> bool:
        return self.running.stop(grace)


def live_config(root: Path, data: Path, **sections: Any) -> ServerConfig:
    raw: dict[str, Any] = {
        "data": str(data),
        "ledger": str(root / "ledger.sqlite"),
        "caps": {"dataset": "5", "client": "1"},
        "server": {"listen": "127.0.0.1:0", "grace_seconds": 1},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_mapping(raw)


def start_live(
    root: Path,
    *,
    data: Path | None = None,
    rows: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> LiveServer:
    """A server on port 0 with a fresh ledger and the CLIENTS registered."""
    from tests.conftest import write_database

    root.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = write_database(root / "data.duckdb", ROWS if rows is None else rows)
    config = live_config(root, data, **sections)
    engine = build_engine(config)
    accounts = LedgerAccounts.for_config(config, engine)
    tokens = {}
    for client, role, cap, institution in CLIENTS:
        token = new_token()
        accounts.ledger.register_client(
            client,
            role=role.value,
            cap=cap,
            institution=institution,
            token_hash=hash_token(token),
        )
        tokens[client] = token
    running = start(config, engine=engine, accounts=accounts)
    return LiveServer(running, config, tokens, root)


def charges_settled(ledger: Ledger) -> bool:
    """No charge is left held: every one is committed or cancelled."""
    return all(c.state in ("committed", "cancelled") for c in ledger.charges())


def committed_total(ledger: Ledger) -> Fraction:
    return sum((c.amount for c in ledger.charges() if c.state == "committed"), Fraction(0))


def build_slow_data(path: Path, *, rows: int = 2_000_000) -> Path:
    """A data file on which `slow_query()` keeps DuckDB busy for seconds (typed columns,
    generated by DuckDB itself so that building it takes a second or two)."""
    from engine import data_file as database
    from engine.codebook import default_codebook

    codebook = default_codebook()
    connection = database.create(path, codebook, overwrite=True)
    connection.execute("SET enable_progress_bar = false")
    base = min(rows, 1_000_000)
    connection.execute(
        "INSERT INTO records (gender, yearOfRegistration, ageBroad, citizenship, "
        "CountryOfExploitation, isForcedLabour, isSexualExploit) "
        "SELECT CASE WHEN i % 3 = 0 THEN 'Male' WHEN i % 3 = 1 THEN 'Female' END, "
        "2002 + (i * 7) % 20, CASE WHEN i % 5 = 0 THEN '9--17' ELSE '30--38' END, "
        "CASE WHEN i % 7 = 0 THEN 'US' ELSE 'PH' END, "
        "CASE WHEN i % 11 = 0 THEN 'US' ELSE 'TH' END, "
        "(i % 2)::UTINYINT, (i % 3 = 0)::UTINYINT FROM range(?) t(i)",
        [base],
    )
    total = base
    while total < rows:
        connection.execute("INSERT INTO records SELECT * FROM records")
        total *= 2
    database.finish(connection, codebook=codebook, data_version="slow-test-data")
    return path


def slow_query() -> pb.Query:
    """A proportion whose condition DuckDB evaluates slowly on every record: 20 branches of
    long IN lists, within the default filter limits (depth 3, 60 terms)."""
    import pycountry

    from engine.query import And, Eq, In, Not, Or, Proportion, Query, Range
    from server.convert import query_to_pb

    codes = sorted(c.alpha_2 for c in pycountry.countries)[:120]
    condition = Or(
        *[
            And(
                In("citizenship", codes[i : i + 60]),
                Not(Eq("yearOfRegistration", 2003 + i % 15)),
                In("CountryOfExploitation", codes[i + 30 : i + 90]),
            )
            for i in range(20)
        ]
    )
    where = Or(
        *[
            And(Eq("isForcedLabour", 1), Range("yearOfRegistration", 2002 + i, 2010 + i))
            for i in range(4)
        ]
    )
    return query_to_pb(
        Query(Proportion(condition), by=("gender", "ageBroad", "citizenshipRegion"), where=where)
    )
