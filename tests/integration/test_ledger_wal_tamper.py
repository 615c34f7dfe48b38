"""A write-ahead log cut short or replaced under a running ledger stops it.

SQLite trusts its log while a connection is open: it reads the frames its shared index lists
from wherever the file now ends or whatever file now has the name, and the last connection's
close copies them into the ledger file. Truncated under a live server (`truncate -s 40000
ledger.sqlite-wal`), two more releases were charged into the cut file and the close copied its
hole into the ledger, which then no longer opened: every budget's history was lost.

Here the ledger is a real file. What is expected to survive a damaged log is the ledger file as
of its last checkpoint (each test closes the ledger once, which checkpoints it): the releases
charged after that were only in the log, which is set aside, not copied in. Nothing is charged
or handed out once the damage is seen, and the ledger opens and verifies afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import LedgerUnavailableError
from engine.ledger import Ledger
from engine.loss import Accounting, PrivacyLoss
from engine.query import Count, Query, Range
from tests.conftest import write_database

ROWS = [{"gender": "Male", "yearOfRegistration": 2010}] * 40 + [
    {"gender": "Female", "yearOfRegistration": 2015, "ageBroad": "18--20"}
] * 30
EPS = PrivacyLoss.pure("0.01")
BY: tuple[tuple[str, ...], ...] = ((), ("gender",), ("ageBroad",))
STOPPED = "nothing more is released until the ledger is restored and reopened"


def query(i: int) -> Query:
    """Up to 60 queries with distinct fingerprints (each one a fresh, charged release)."""
    return Query(Count(), by=BY[i // 20 % 3], where=Range("yearOfRegistration", high=2002 + i % 20))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_database(tmp_path_factory.mktemp("data") / "data.duckdb", ROWS, data_version="v1")
    return Engine(DuckDBBackend(path), codebook=default_codebook())


def open_ledger(path: Path, engine: Engine, *, create: bool = True) -> Ledger:
    return Ledger.open(
        path,
        accounting=Accounting.PURE_DP,
        dataset_cap="100",
        dataset=engine.dataset,
        data_version=engine.data_version,
        create=create,
    )


def spend(engine: Engine, ledger: Ledger, request_id: str, i: int) -> None:
    engine.release(query(i), loss=EPS, charger=ledger, client="alice", request_id=request_id)


def wal(path: Path) -> Path:
    return Path(f"{path}-wal")


@pytest.fixture
def checkpointed(engine: Engine, tmp_path: Path) -> Iterator[Ledger]:
    """A ledger whose file holds r1 and r2 (closed once: checkpointed), and whose log holds
    r3 and r4 (charged after it was opened again)."""
    path = tmp_path / "ledger.sqlite"
    ledger = open_ledger(path, engine)
    ledger.register_client("alice", role="researcher", cap="50")
    spend(engine, ledger, "r1", 1)
    spend(engine, ledger, "r2", 2)
    ledger.close()
    assert not wal(path).exists()  # checkpointed into the ledger file, the log removed
    ledger = open_ledger(path, engine)
    try:
        spend(engine, ledger, "r3", 3)
        spend(engine, ledger, "r4", 4)
        yield ledger
    finally:
        ledger.close()


def assert_only_the_checkpoint_survived(engine: Engine, path: Path) -> None:
    """The damaged log was set aside and never copied in: the ledger file is whole, holds the
    state of its last checkpoint (r1, r2) and nothing charged after the damage was seen."""
    assert not wal(path).exists()
    assert list(path.parent.glob(f"{path.name}-wal.damaged-*"))
    uri = f"file:{path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    ledger = open_ledger(path, engine, create=False)
    try:
        result = ledger.verify()
        assert result.ok, result.problems
        # r3 and r4 were handed out, but were only in the log: restoring the ledger from a
        # backup (the head file refuses to serve it until then) is the custodian's to do.
        assert sorted(c.request_id for c in ledger.charges()) == ["r1", "r2"]
        assert ledger.spent("alice") == 2 * EPS.amount
        # It charges again once reopened.
        spend(engine, ledger, "r9", 9)
        assert ledger.spent("alice") == 3 * EPS.amount
    finally:
        ledger.close()


def test_a_log_cut_under_the_ledger_stops_it_before_the_next_release(
    engine: Engine, checkpointed: Ledger
) -> None:
    path = checkpointed.path
    size = wal(path).stat().st_size
    os.truncate(wal(path), min(40000, size // 2))
    with pytest.raises(LedgerUnavailableError, match=f"write-ahead log .* cut short.*{STOPPED}"):
        spend(engine, checkpointed, "r5", 5)
    with pytest.raises(LedgerUnavailableError, match=STOPPED):
        spend(engine, checkpointed, "r6", 6)
    with pytest.raises(LedgerUnavailableError, match=STOPPED):
        checkpointed.spent("alice")
    checkpointed.close()
    assert_only_the_checkpoint_survived(engine, path)


@pytest.mark.parametrize("how", ["renamed over it", "copied over it"])
def test_a_log_replaced_under_the_ledger_stops_it(
    engine: Engine, checkpointed: Ledger, tmp_path: Path, how: str
) -> None:
    # Another ledger's log, of the same page size: left in place, the next open would replay
    # its frames into this ledger's file.
    other = open_ledger(tmp_path / "other" / "ledger.sqlite", engine)
    other.register_client("alice", role="researcher", cap="50")
    spend(engine, other, "o1", 1)
    foreign = tmp_path / "foreign-wal"
    shutil.copyfile(wal(other.path), foreign)
    other.close()
    path = checkpointed.path
    size = wal(path).stat().st_size
    if os.path.getsize(foreign) < size:  # only its contents differ, not its length
        with foreign.open("ab") as out:
            out.truncate(size + 4096)
    if how == "renamed over it":
        os.replace(foreign, wal(path))
        said = "replaced by another file"
    else:
        shutil.copyfile(foreign, wal(path))  # the same file, written over
        said = "overwritten"
    with pytest.raises(LedgerUnavailableError, match=f"write-ahead log .* {said}.*{STOPPED}"):
        spend(engine, checkpointed, "r5", 5)
    with pytest.raises(LedgerUnavailableError, match=STOPPED):
        spend(engine, checkpointed, "r6", 6)
    checkpointed.close()
    assert_only_the_checkpoint_survived(engine, path)


def test_a_log_cut_before_the_ledger_closes_is_not_copied_in(
    engine: Engine, checkpointed: Ledger
) -> None:
    # A server stopped after the log was cut: its close must not copy the hole into the file.
    path = checkpointed.path
    os.truncate(wal(path), min(40000, wal(path).stat().st_size // 2))
    checkpointed.close()
    assert_only_the_checkpoint_survived(engine, path)


def test_the_ledgers_own_checkpoints_are_not_taken_for_damage(
    engine: Engine, tmp_path: Path
) -> None:
    # SQLite copies the log into the file once it passes 1000 pages (the default autocheckpoint,
    # which the ledger keeps), then writes it again from its start, under a new header, without
    # shrinking it. Enough releases to go round it more than once.
    path = tmp_path / "ledger.sqlite"
    ledger = open_ledger(path, engine)
    try:
        ledger.register_client("alice", role="researcher", cap="50")
        headers = {wal(path).read_bytes()[:32]}
        largest = 0
        n = 0
        while len(headers) < 3:
            assert n < 2000, "the log never started again"
            # Fresh releases for the first 60, then replays of them (written to the log too).
            spend(engine, ledger, f"r{n}", n % 60)
            headers.add(wal(path).read_bytes()[:32])
            largest = max(largest, wal(path).stat().st_size)
            n += 1
        assert wal(path).stat().st_size == largest  # never shrunk
        assert ledger.spent("alice") == 60 * EPS.amount
        result = ledger.verify()
        assert result.ok, result.problems
    finally:
        ledger.close()
    ledger = open_ledger(path, engine, create=False)
    try:
        assert ledger.verify().ok
        assert len(ledger.charges()) == n  # the replays are on record too, at no charge
        assert ledger.spent("alice") == 60 * EPS.amount
    finally:
        ledger.close()
