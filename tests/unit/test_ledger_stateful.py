"""A stateful property test of the ledger: spend, retry, replay, conflict, concurrent spend, crashes
before and after commit, and restarts, against an exact model of what must be charged.

Invariants after every step: 0 <= spent <= cap for every client, institution and data version;
nothing is left held; each client has been charged at least the loss of every release it holds
that it paid for, and the dataset at least the loss of every release anyone holds; the ledger
and its hash chain verify.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import BudgetExceededError, RequestConflictError
from engine.ledger import HOOK_POINTS, Ledger
from engine.loss import Accounting, PrivacyLoss
from engine.planner import Plan
from engine.query import Count, Query, Range
from engine.release import Release
from tests.conftest import write_database

CLIENTS = {"alice": "iom", "bob": "iom", "carol": None}
CAPS = {
    "client:alice": Fraction(1, 2),
    "client:bob": Fraction(2, 5),
    "client:carol": Fraction(3, 10),
}
INSTITUTION_CAP = Fraction(7, 10)
DATASET_CAP = Fraction(1)
LOSSES = ("0.05", "0.1", "0.2")
QUERIES = [
    Query(Count(), by=by, where=Range("yearOfRegistration", high=high))
    for by in ((), ("gender",))
    for high in (2005, 2010, 2015, 2020)
]

_engine: Engine | None = None
_data_dir: Path | None = None


def shared_engine() -> Engine:
    global _engine, _data_dir
    if _engine is None:
        _data_dir = Path(tempfile.mkdtemp(prefix="veil-stateful-"))
        rows = [{"gender": "Male", "yearOfRegistration": 2004}] * 30 + [
            {"gender": "Female", "yearOfRegistration": 2012}
        ] * 20
        path = write_database(_data_dir / "data.duckdb", rows, data_version="v1")
        _engine = Engine(DuckDBBackend(path), codebook=default_codebook())
    return _engine


def teardown_module() -> None:
    if _data_dir is not None:
        shutil.rmtree(_data_dir, ignore_errors=True)


@dataclass
class Model:
    """What the ledger must have done, derived independently of it."""

    spent: dict[str, Fraction] = field(default_factory=dict)  # per scope label
    best: dict[int, tuple[Fraction, bytes]] = field(default_factory=dict)  # query -> release
    rows: dict[tuple[str, str], tuple[int, Fraction]] = field(default_factory=dict)
    answered: dict[tuple[str, str], bytes] = field(default_factory=dict)  # stored per request
    received: dict[str, set[bytes]] = field(default_factory=dict)  # what each client holds
    loss_of: dict[bytes, Fraction] = field(default_factory=dict)
    payer: dict[bytes, str] = field(default_factory=dict)
    forfeited: set[tuple[str, str]] = field(default_factory=set)  # charged, nothing released

    def scopes(self, client: str) -> list[str]:
        institution = CLIENTS[client]
        return (
            [f"client:{client}"]
            + ([f"institution:{institution}"] if institution else [])
            + ["dataset:people"]
        )

    def cap(self, scope: str) -> Fraction:
        if scope.startswith("institution:"):
            return INSTITUTION_CAP
        if scope.startswith("dataset:"):
            return DATASET_CAP
        return CAPS[scope]

    def fits(self, client: str, loss: Fraction) -> bool:
        return all(
            self.spent.get(s, Fraction(0)) + loss <= self.cap(s) for s in self.scopes(client)
        )

    def spend(self, client: str, loss: Fraction) -> None:
        for scope in self.scopes(client):
            self.spent[scope] = self.spent.get(scope, Fraction(0)) + loss

    def charge(self, client: str, query: int, loss: Fraction, data: bytes) -> None:
        self.spend(client, loss)
        if query not in self.best or self.best[query][0] < loss:
            self.best[query] = (loss, data)
        self.loss_of[data] = loss
        self.payer[data] = client


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = shared_engine()
        self.dir = Path(tempfile.mkdtemp(prefix="veil-ledger-"))
        self.path = self.dir / "ledger.sqlite"
        self.ledger = self.open()
        for client, institution in CLIENTS.items():
            cap = CAPS[f"client:{client}"]
            self.ledger.register_client(client, role="researcher", institution=institution, cap=cap)
        self.ledger.set_institution_cap("iom", INSTITUTION_CAP)
        self.model = Model()
        self.counter = 0

    def open(self) -> Ledger:
        return Ledger.open(
            self.path,
            accounting=Accounting.PURE_DP,
            dataset_cap=DATASET_CAP,
            dataset="people",
            data_version="v1",
        )

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def new_request_id(self) -> str:
        self.counter += 1
        return f"r{self.counter}"

    def plan(self, query: int, loss: Fraction) -> Plan:
        return self.engine.plan(QUERIES[query], loss=PrivacyLoss(Accounting.PURE_DP, loss))

    # ---- a request, sequentially, against the exact model --------------------------------

    def ask(self, client: str, request_id: str, query: int, loss: Fraction) -> None:
        model = self.model
        key = (client, request_id)
        try:
            release = self.engine.release(
                QUERIES[query],
                loss=PrivacyLoss(Accounting.PURE_DP, loss),
                charger=self.ledger,
                client=client,
                request_id=request_id,
            )
        except RequestConflictError:
            assert key in model.rows
            assert model.rows[key] != (query, loss) or key in model.forfeited
            return
        except BudgetExceededError:
            assert key not in model.answered
            assert query not in model.best or model.best[query][0] < loss
            assert not model.fits(client, loss)
            return
        data = release.to_bytes()
        assert key not in model.forfeited
        assert model.rows.get(key, (query, loss)) == (query, loss)
        if key in model.answered:  # a retry: the stored bytes, free
            assert data == model.answered[key]
        elif query in model.best and model.best[query][0] >= loss:  # a replay: free
            assert data == model.best[query][1]
        else:  # a fresh release, charged exactly its loss
            assert model.fits(client, loss)
            assert data not in model.loss_of
            model.charge(client, query, loss, data)
        model.rows[key] = (query, loss)
        model.answered[key] = data
        model.received.setdefault(client, set()).add(data)

    @rule(
        client=st.sampled_from(sorted(CLIENTS)),
        query=st.integers(0, len(QUERIES) - 1),
        loss=st.sampled_from(LOSSES),
    )
    def spend(self, client: str, query: int, loss: str) -> None:
        self.ask(client, self.new_request_id(), query, Fraction(loss))

    # Which earlier request to reuse is drawn as a number, not from the model's state: the state
    # after a concurrent step depends on thread timing, and what is drawn must not.
    def earlier(self, pick: int) -> tuple[str, str] | None:
        keys = sorted(self.model.rows)
        return keys[pick % len(keys)] if keys else None

    @rule(pick=st.integers(0, 1000))
    def retry(self, pick: int) -> None:
        key = self.earlier(pick)
        if key is not None:
            self.ask(*key, *self.model.rows[key])

    @rule(pick=st.integers(0, 1000), query=st.integers(0, len(QUERIES) - 1))
    def reuse_request_id(self, pick: int, query: int) -> None:
        key = self.earlier(pick)
        if key is not None:
            self.ask(*key, query, self.model.rows[key][1])

    @rule(
        client=st.sampled_from(sorted(CLIENTS)),
        query=st.integers(0, len(QUERIES) - 1),
        loss=st.sampled_from(LOSSES),
        after=st.sampled_from(HOOK_POINTS),
    )
    def crash(self, client: str, query: int, loss: str, after: str) -> None:
        """The process dies at a point of the release sequence, before the hand-out."""
        amount, request_id = Fraction(loss), self.new_request_id()
        key = (client, request_id)
        plan = self.plan(query, amount)
        try:
            reservation = self.ledger.reserve(plan, client=client, request_id=request_id)
        except BudgetExceededError:
            assert not self.model.fits(client, amount)
            return
        self.model.rows[key] = (query, amount)
        if reservation.stored is not None:  # a replay: nothing to compute, nothing to lose
            stored = reservation.stored.to_bytes()
            assert stored == self.model.best[query][1]
            self.model.answered[key] = stored
        elif after != "after_reserve":
            answer = self.engine.answer(plan)
            if after == "after_commit":
                data = reservation.commit(answer).to_bytes()
                assert self.model.fits(client, amount)
                self.model.charge(client, query, amount, data)
                self.model.answered[key] = data  # stored, never handed out
        self.restart()

    @rule(
        client=st.sampled_from(sorted(CLIENTS)),
        query=st.integers(0, len(QUERIES) - 1),
        loss=st.sampled_from(LOSSES),
    )
    def stopped_by_the_limit(self, client: str, query: int, loss: str) -> None:
        """The server's time limit stops the query after its hold: charged, nothing released."""
        amount, request_id = Fraction(loss), self.new_request_id()
        try:
            reservation = self.ledger.reserve(
                self.plan(query, amount), client=client, request_id=request_id
            )
        except BudgetExceededError:
            assert not self.model.fits(client, amount)
            return
        key = (client, request_id)
        self.model.rows[key] = (query, amount)
        if reservation.stored is not None:  # a replay reads nothing: no limit to pass
            self.model.answered[key] = reservation.stored.to_bytes()
            self.model.received.setdefault(client, set()).add(self.model.answered[key])
            return
        reservation.forfeit("stopped_by_limit")
        assert self.model.fits(client, amount)
        self.model.spend(client, amount)
        self.model.forfeited.add(key)

    @rule()
    def restart(self) -> None:
        self.ledger.close()
        self.ledger = self.open()

    @rule(
        requests=st.lists(
            st.tuples(
                st.sampled_from(sorted(CLIENTS)),
                st.integers(0, len(QUERIES) - 1),
                st.sampled_from(LOSSES),
            ),
            min_size=2,
            max_size=6,
        )
    )
    def concurrent_spend(self, requests: list[tuple[str, int, str]]) -> None:
        barrier = threading.Barrier(len(requests))
        outcomes: list[tuple[str, str, int, Fraction, Release | None]] = []
        lock = threading.Lock()

        def run(client: str, query: int, loss: Fraction, request_id: str) -> None:
            barrier.wait()
            try:
                release: Release | None = self.engine.release(
                    QUERIES[query],
                    loss=PrivacyLoss(Accounting.PURE_DP, loss),
                    charger=self.ledger,
                    client=client,
                    request_id=request_id,
                )
            except BudgetExceededError:
                release = None
            with lock:
                outcomes.append((client, request_id, query, loss, release))

        threads = [
            threading.Thread(target=run, args=(c, q, Fraction(eps), self.new_request_id()))
            for c, q, eps in requests
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(outcomes) == len(requests)
        # The order the ledger serialised them in is the order of their charges.
        order = {c.request_id: i for i, c in enumerate(self.ledger.charges())}
        fresh: dict[int, set[Fraction]] = {}
        for client, request_id, query, loss, release in sorted(
            outcomes, key=lambda o: order.get(o[1], -1)
        ):
            if release is None:
                continue
            data = release.to_bytes()
            (row,) = [c for c in self.ledger.charges(client=client) if c.request_id == request_id]
            if row.kind == "charge":
                assert data not in self.model.loss_of
                assert loss not in fresh.setdefault(query, set()), "one query drawn twice"
                assert query not in self.model.best or self.model.best[query][0] < loss
                assert self.model.fits(client, loss)
                fresh[query].add(loss)
                self.model.charge(client, query, loss, data)
            else:
                assert row.amount == 0 and self.model.loss_of[data] >= loss
            self.model.rows[(client, request_id)] = (query, loss)
            self.model.answered[(client, request_id)] = data
            self.model.received.setdefault(client, set()).add(data)

    # ---- invariants ------------------------------------------------------------------------

    @invariant()
    def budgets_within_caps_and_exact(self) -> None:
        report = self.ledger.report()
        for scope in (*report.clients, *report.institutions, report.dataset):
            label = f"{scope.kind}:{scope.name}"
            assert scope.held == 0
            assert scope.spent >= 0
            assert scope.cap is not None and scope.spent <= scope.cap
            assert scope.spent == self.model.spent.get(label, Fraction(0)), label

    @invariant()
    def spent_covers_every_release_handed_out(self) -> None:
        held_by_anyone: set[bytes] = set()
        for client, received in self.model.received.items():
            paid = sum(
                (self.model.loss_of[d] for d in received if self.model.payer[d] == client),
                Fraction(0),
            )
            assert self.ledger.spent(client) >= paid
            held_by_anyone |= received
        total = sum((self.model.loss_of[d] for d in held_by_anyone), Fraction(0))
        assert self.ledger.budget("dataset", "people").spent >= total

    @invariant()
    def ledger_verifies(self) -> None:
        result = self.ledger.verify()
        assert result.ok, result.problems


SLOW = bool(os.environ.get("VEIL_SLOW"))
LedgerMachine.TestCase.settings = settings(
    max_examples=300 if SLOW else 25,
    stateful_step_count=40 if SLOW else 20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerStateful = LedgerMachine.TestCase
