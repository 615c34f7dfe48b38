"""The backend's cancellation: what watches it is called once, when it is set."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import pytest

from engine.backend import Cancellation, DuckDBBackend, _interrupt
from engine.errors import LoadError, QueryCancelledError
from engine.sql import Statement
from tests.conftest import write_database


def test_cancellation_calls_what_watches_it_once() -> None:
    cancel = Cancellation()
    calls: list[str] = []
    with cancel.calling(lambda: calls.append("before")):
        pass  # left before the set: never called
    with cancel.calling(lambda: calls.append("a")), cancel.calling(lambda: calls.append("b")):
        cancel.set()
        cancel.set()  # a second set calls nothing again
    assert sorted(calls) == ["a", "b"] and cancel.is_set() and cancel.wait(0)
    with cancel.calling(lambda: calls.append("late")):  # already set: called at once
        assert calls[-1] == "late"
    assert len(calls) == 3


def test_a_set_cancellation_interrupts_a_running_statement(tmp_path: Path) -> None:
    backend = DuckDBBackend(write_database(tmp_path / "d.duckdb", [{"gender": "Female"}]))
    cancel = Cancellation()
    # A statement that runs for minutes unless interrupted (no table data in it).
    endless = Statement("SELECT count(*) AS c0 FROM range(1000000000000) t(i) WHERE i % 7 = 3", ())
    timer = threading.Timer(0.2, cancel.set)
    timer.start()
    try:
        with pytest.raises(QueryCancelledError, match="while it ran"):
            backend.run(endless, cancel=cancel)
        with pytest.raises(QueryCancelledError, match="before it ran"):
            backend.run(endless, cancel=cancel)
    finally:
        timer.cancel()
        backend.close()


def test_an_interrupt_that_comes_as_the_statement_ends_is_harmless(tmp_path: Path) -> None:
    backend = DuckDBBackend(write_database(tmp_path / "d.duckdb", [{"gender": "Female"}]))
    cursor = backend._connection.cursor()
    cursor.close()
    try:
        _interrupt(cursor)  # the cursor is closed: nothing to stop, and nothing raised
    finally:
        backend.close()


def test_a_missing_or_foreign_data_file_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="there is no data file"):
        DuckDBBackend(tmp_path / "absent.duckdb")
    csv = tmp_path / "records.csv"
    csv.write_text("gender\nMale\n")
    with pytest.raises(LoadError, match="not a data file written by"):
        DuckDBBackend(csv)
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()  # a DuckDB file without veil's metadata
    with pytest.raises(LoadError, match="not a data file written by"):
        DuckDBBackend(other)
