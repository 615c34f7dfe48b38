"""veil's engine in-process, on three paths, and OpenDP's bare sampler as a reference.

- veil_answer:  `Engine.plan` then `Engine.answer`: validation, SQL, densifying, noise,
                suppression and the Arrow table, with no ledger.
- veil_release: `Engine.release` through a real `Ledger` (SQLite, WAL, full sync) in a scratch
                directory: reserve, answer, commit. Every run is a fresh release: a new request
                id and a slightly larger loss than any earlier release of the query, so the
                ledger never finds a stored release to return. Each run also says where its
                time went, timed at the engine's two seams (its backend and its charger): the
                scan, the ledger's reservation and its commit; the rest is the plan, the noise
                not yet drawn when the scan ends, suppression and the answer's table.
- veil_replay:  `Engine.release` of a query already released, under a new request id: the
                ledger returns the stored release at no charge.
- opendp_sampler (reference): OpenDP's vector measurement alone, called on a numpy vector as
                long as the release (every component), on one core: what one core needs to
                draw a release's noise. (The engine may spread large vectors over several
                cores; this reference does not.)
"""

from __future__ import annotations

import time
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import Dataset
from benchmarks.systems import Options, System
from benchmarks.workload import WorkloadQuery
from engine.backend import Cancellation, DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.ledger import Ledger
from engine.loss import Accounting, PrivacyLoss, format_amount
from engine.planner import Plan
from engine.release import Answer, Release, Reservation
from engine.sql import Statement

CLIENT = "bench"
LEDGER_CAP = Fraction(100)  # the largest cap a ledger accepts
STEP = Fraction(1, 10_000)  # each fresh release asks for a little more than the last


class TimedBackend:
    """DuckDB behind the engine's backend seam, noting how long its last statement took."""

    def __init__(self, inner: DuckDBBackend) -> None:
        self.inner = inner
        self.last_seconds = 0.0

    def run(
        self, statement: Statement, *, cancel: Cancellation | None = None
    ) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            return self.inner.run(statement, cancel=cancel)
        finally:
            self.last_seconds = time.perf_counter() - start

    def data_version(self) -> str:
        return self.inner.data_version()

    def codebook(self) -> str | None:
        return self.inner.codebook()

    def dataset(self) -> str | None:
        return self.inner.dataset()

    def load_id(self) -> str | None:
        return self.inner.load_id()


class TimedCharger:
    """The ledger behind the engine's charger seam, timing one release's reservation and its
    commit (which stores the release, turns the hold into a charge and syncs the ledger)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.reserve_seconds = 0.0
        self.commit_seconds = 0.0

    def reserve(
        self, plan: Plan, *, client: str, request_id: str, data_version: str
    ) -> Reservation:
        start = time.perf_counter()
        held = self.ledger.reserve(
            plan, client=client, request_id=request_id, data_version=data_version
        )
        self.reserve_seconds = time.perf_counter() - start
        return _TimedReservation(held, self)


class _TimedReservation:
    def __init__(self, held: Reservation, charger: TimedCharger) -> None:
        self._held = held
        self._charger = charger

    @property
    def stored(self) -> Release | None:
        return self._held.stored

    def commit(self, answer: Answer) -> Release:
        start = time.perf_counter()
        try:
            return self._held.commit(answer)
        finally:
            self._charger.commit_seconds = time.perf_counter() - start

    def cancel(self) -> None:
        self._held.cancel()

    def forfeit(self, reason: str) -> None:
        self._held.forfeit(reason)


class Shared:
    """One engine per data file and one ledger at a time, shared by the engine's paths."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.epsilon = Fraction(str(options.epsilon))
        self.engine: Engine | None = None
        self.backend: TimedBackend | None = None
        self.data: Dataset | None = None
        self.ledger: Ledger | None = None
        self.spent = Fraction(0)
        self.fresh = 0  # fresh releases made so far, for increasing losses
        self.ledgers = 0

    def open(self, data: Dataset) -> Engine:
        if self.data != data:
            self.close()
            self.backend = TimedBackend(DuckDBBackend(data.path))
            self.engine = Engine(self.backend, codebook=default_codebook())
            self.data = data
        assert self.engine is not None
        return self.engine

    def plan(self, query: WorkloadQuery) -> Plan:
        assert self.engine is not None
        return self.engine.plan(query.veil_query(), loss=PrivacyLoss.pure(self.epsilon))

    def next_fresh_loss(self) -> PrivacyLoss:
        self.fresh += 1
        return PrivacyLoss.pure(self.epsilon + self.fresh * STEP)

    def ensure_budget(self, releases: int) -> Ledger:
        """A ledger with room for `releases` more fresh releases (a new one when needed)."""
        need = releases * (self.epsilon + (self.fresh + releases) * STEP)
        if need >= LEDGER_CAP:
            raise ValueError(
                f"{releases} releases at epsilon {self.epsilon} exceed what one ledger may "
                f"charge ({LEDGER_CAP}); lower --repeats or --epsilon"
            )
        if self.ledger is None or self.spent + need >= LEDGER_CAP:
            self._close_ledger()
            assert self.engine is not None
            self.ledgers += 1
            path = Path(self.options.work) / f"engine-ledger-{self.ledgers}.sqlite"
            self.ledger = Ledger.open(
                path,
                accounting=Accounting.PURE_DP,
                dataset_cap=LEDGER_CAP,
                dataset=self.engine.dataset,
                data_version=self.engine.data_version,
            )
            self.ledger.register_client(CLIENT, role="researcher", cap=LEDGER_CAP)
            self.spent = Fraction(0)
        return self.ledger

    def _close_ledger(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    def close(self) -> None:
        self._close_ledger()
        if self.backend is not None:
            self.backend.inner.close()
        self.engine = None
        self.backend = None
        self.data = None


class _Path:
    slow = False
    reference = False

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._cells: int | None = None

    def open(self, data: Dataset) -> None:
        self.shared.open(data)

    def prepare(self, query: WorkloadQuery) -> None:
        pass

    def cells(self, query: WorkloadQuery) -> int | None:
        return self._cells

    def close(self) -> None:
        self.shared.close()


class VeilAnswer(_Path):
    name = "veil_answer"
    label = "veil engine: plan + answer (no ledger)"

    def run(self, query: WorkloadQuery) -> float:
        engine = self.shared.engine
        assert engine is not None
        typed = query.veil_query()
        loss = PrivacyLoss.pure(self.shared.epsilon)
        start = time.perf_counter()
        answer = engine.answer(engine.plan(typed, loss=loss))
        elapsed = time.perf_counter() - start
        self._cells = answer.table.num_rows
        return elapsed


class VeilRelease(_Path):
    name = "veil_release"
    label = "veil engine: charged release (ledger, fresh noise)"

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self._phases: list[dict[str, float]] = []

    def prepare(self, query: WorkloadQuery) -> None:
        self.shared.ensure_budget(self.shared.options.repeats + 3)
        self._phases = []

    def run(self, query: WorkloadQuery) -> float:
        engine, backend = self.shared.engine, self.shared.backend
        ledger = self.shared.ledger
        assert engine is not None and backend is not None and ledger is not None
        typed = query.veil_query()
        loss = self.shared.next_fresh_loss()
        request = uuid.uuid4().hex
        charger = TimedCharger(ledger)
        start = time.perf_counter()
        release = engine.release(
            typed, loss=loss, charger=charger, client=CLIENT, request_id=request
        )
        elapsed = time.perf_counter() - start
        if release.metadata.loss != format_amount(loss.amount):
            raise RuntimeError("a fresh release was expected, the ledger returned a stored one")
        self.shared.spent += loss.amount
        self._cells = release.table.num_rows
        self._phases.append({
            "total": elapsed,
            "scan": backend.last_seconds,
            "reserve": charger.reserve_seconds,
            "commit": charger.commit_seconds,
        })
        return elapsed

    def phases(self) -> list[dict[str, float]]:
        return list(self._phases)


class VeilReplay(_Path):
    name = "veil_replay"
    label = "veil engine: release replayed from the ledger (no charge)"

    def prepare(self, query: WorkloadQuery) -> None:
        engine = self.shared.engine
        ledger = self.shared.ensure_budget(self.shared.options.repeats + 3)
        assert engine is not None
        loss = PrivacyLoss.pure(self.shared.epsilon)
        engine.release(
            query.veil_query(), loss=loss, charger=ledger, client=CLIENT,
            request_id=uuid.uuid4().hex,
        )
        self.shared.spent += loss.amount

    def run(self, query: WorkloadQuery) -> float:
        engine = self.shared.engine
        ledger = self.shared.ledger
        assert engine is not None and ledger is not None
        typed = query.veil_query()
        loss = PrivacyLoss.pure(self.shared.epsilon)
        spent = ledger.spent(CLIENT)
        start = time.perf_counter()
        release = engine.release(
            typed, loss=loss, charger=ledger, client=CLIENT, request_id=uuid.uuid4().hex
        )
        elapsed = time.perf_counter() - start
        if ledger.spent(CLIENT) != spent:  # outside the timing
            raise RuntimeError("a replay was expected, the ledger charged a fresh release")
        self._cells = release.table.num_rows
        return elapsed


class Sampler(_Path):
    name = "opendp_sampler"
    label = "reference: OpenDP's vector sampler alone, one core"
    reference = True

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self._work: list[tuple[Any, np.ndarray]] = []

    def prepare(self, query: WorkloadQuery) -> None:
        plan = self.shared.plan(query)
        self._work = [
            (m.measurement, np.zeros(size, dtype=np.int64))
            for m, size in zip(plan.mechanisms, plan.vector_sizes, strict=True)
        ]
        self._cells = sum(plan.vector_sizes)

    def run(self, query: WorkloadQuery) -> float:
        start = time.perf_counter()
        for measurement, vector in self._work:
            measurement(vector)
        return time.perf_counter() - start


def systems(options: Options) -> list[System]:
    shared = Shared(options)
    return [
        VeilAnswer(shared),
        VeilRelease(shared),
        VeilReplay(shared),
        Sampler(shared),
    ]
