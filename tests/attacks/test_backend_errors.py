"""A DuckDB error quotes the data: it must reach neither the caller, nor the logs, nor the audit.

DuckDB 2's messages name the values they failed on: a conversion quotes the text it could not
convert ("Could not convert string '2011-Male' to INT32"), an overflow its operands ("Overflow
in multiplication of INT16 (2011 * 1000)!"), and `error()` whatever it is given. No statement
the engine writes fails on the data the codebook admits (the file is checked against it when
the engine opens it), so these errors are brought about here by replacing the engine's statement
with one that fails on the records, in this test process only: what is attacked is what the
server does with a backend error once it happens, whichever statement raised it.

The data hold a target whose values (a man registered in 2011) and whose presence (1237
records of Ukraine, 1238 in all) are in the failing statements' messages. Through a real server
on port 0, each failing release must:
- reach the caller as INTERNAL with a reference and nothing else (no trailer, no DuckDB text);
- leave nothing of the message in the server's log, the audit log, the auditor's tables and
  report, or standard error;
- charge nothing (its hold is given back), and leave its request id free: the same request,
  once the statement is the engine's again, is released and charged once.

The control maps DuckDB's errors to INVALID_ARGUMENT, whose messages are shown, and checks the
same search finds the target's values in what the caller receives. Deterministic: it fails by
chance with probability 0.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import grpc
import pytest

from engine import engine as engine_module
from engine.audit_report import TABLE_NAMES, build_tables, render_html
from engine.ledger import Ledger
from engine.planner import Plan
from engine.query import Count, Eq, Query
from engine.sql import Statement
from protos.veil.v1 import veil_pb2 as pb
from server import errors as server_errors
from server.app import configure_logging
from server.convert import query_to_pb
from tests.attacks.conftest import FAST_LIMITS
from tests.server_harness import LiveServer, start_live, stubs

TARGET = {"citizenship": "FJ", "gender": "Male", "yearOfRegistration": 2011, "ageBroad": "9--17"}
ROWS = [{"citizenship": "UA", "gender": "Female", "yearOfRegistration": 2015}] * 1237 + [TARGET]

# Statements that fail on the records, and what of the records their messages quote.
FAILING = {
    "invalid-input": (
        "SELECT error('records ' || count(*)::VARCHAR) AS c0 FROM records",
        "records 1238",
    ),
    "conversion": (
        "SELECT (yearOfRegistration::VARCHAR || '-' || gender::VARCHAR)::INTEGER AS c0 "
        "FROM records WHERE citizenship = 'FJ'",
        "2011-Male",
    ),
    "overflow": (
        "SELECT max(yearOfRegistration) * 1000::SMALLINT AS c0 FROM records "
        "WHERE citizenship = 'FJ'",
        "2011 * 1000",
    ),
}
DUCKDB_WORDING = re.compile(r"Conversion Error|Invalid Input Error|Out of Range Error|LINE 1")
REFERENCE = re.compile(r"^internal error \(reference [0-9a-f]{12}\); nothing was charged$")
QUERY = query_to_pb(Query(Count(), by=("gender",), where=Eq("ageBroad", "9--17")))


class Statements:
    """Which statement the engine runs: its own, or one of FAILING."""

    def __init__(self) -> None:
        self.failing: str | None = None


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> Statements:
    chosen = Statements()
    own = engine_module.build

    def build(plan: Plan) -> Statement:
        if chosen.failing is None:
            return own(plan)
        return Statement(FAILING[chosen.failing][0], ())

    monkeypatch.setattr(engine_module, "build", build)
    return chosen


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = configure_logging("debug", stream=stream)
    try:
        yield stream
    finally:
        handler.close()
        for name in ("veil", "grpc"):  # give the loggers back to pytest
            logging.getLogger(name).handlers = []
            logging.getLogger(name).propagate = True


@pytest.fixture
def live(tmp_path: Path, log: io.StringIO) -> Iterator[LiveServer]:
    server = start_live(tmp_path, rows=ROWS, limits=FAST_LIMITS)
    try:
        yield server
    finally:
        server.stop()


def _failure(error: grpc.RpcError) -> dict[str, Any]:
    return {
        "code": error.code().name,
        "details": error.details(),
        "trailers": [(k, v if isinstance(v, str) else v.hex())
                     for k, v in error.trailing_metadata() or ()],
    }


def attack(live: LiveServer, statements: Statements) -> dict[str, dict[str, Any]]:
    """Ask for a release under each failing statement; what the caller saw of each."""
    seen = {}
    with stubs(live.port) as s:
        for name in FAILING:
            statements.failing = name
            request = pb.ReleaseRequest(request_id=f"r-{name}", query=QUERY, loss="0.1")
            try:
                s.research.Release(request, metadata=live.auth("alice"))
            except grpc.RpcError as exc:
                seen[name] = _failure(exc)
            else:
                seen[name] = {"code": "OK"}
    statements.failing = None
    return seen


def exposures(texts: dict[str, str]) -> list[str]:
    """Where a failing statement's message, or DuckDB's wording, shows up."""
    found = []
    for where, text in texts.items():
        for name, (_, quoted) in FAILING.items():
            if quoted in text:
                found.append(f"{where} quotes the {name} error's data ({quoted!r})")
        if DUCKDB_WORDING.search(text):
            found.append(f"{where} holds DuckDB's wording")
    return found


def test_a_backend_error_reaches_nobody_and_costs_nothing(
    live: LiveServer, statements: Statements, log: io.StringIO,
    capfd: pytest.CaptureFixture[str],
) -> None:
    seen = attack(live, statements)
    for name, failure in seen.items():
        assert failure["code"] == "INTERNAL", (name, failure)
        assert REFERENCE.match(failure["details"]), failure
        assert failure["trailers"] == [], failure
    with stubs(live.port) as s:
        budget = s.research.GetBudget(pb.GetBudgetRequest(), metadata=live.auth("alice"))
        assert budget.spent == "0" and budget.reserved == "0"
        # The request ids were not spent: the same request, on the engine's own statement,
        # is released and charged once, and its retry is free.
        for name in FAILING:
            request = pb.ReleaseRequest(request_id=f"r-{name}", query=QUERY, loss="0.1")
            response = s.research.Release(request, metadata=live.auth("alice"))
            again = s.research.Release(request, metadata=live.auth("alice"))
            assert again.arrow_ipc == response.arrow_ipc and again.charged == "0"
        budget = s.research.GetBudget(pb.GetBudgetRequest(), metadata=live.auth("alice"))
        # One draw of the query: the second and third request ids replay it.
        assert budget.spent == "0.1"
    live.stop()
    with Ledger.open_readonly(live.config.ledger) as ledger:
        entries = [json.dumps(e.entry, sort_keys=True) for e in ledger.audit_log()]
        tables = build_tables(ledger, names=TABLE_NAMES)
        cancelled = [c for c in ledger.charges() if c.state == "cancelled"]
    report = render_html(tables)
    table_text = json.dumps({n: t.to_pylist() for n, t in tables.tables.items()}, default=str)
    out, err = capfd.readouterr()
    texts = {
        "the caller's status": json.dumps(seen),
        "the server log": log.getvalue(),
        "the audit log": "\n".join(entries),
        "the audit tables": table_text,
        "the audit report": report,
        "standard output and error": out + err,
    }
    assert exposures(texts) == []
    # The search looked where the errors were recorded: each is in the log, by type only, and
    # each hold was given back.
    faults = [json.loads(line) for line in log.getvalue().splitlines()
              if '"internal_error"' in line]
    assert {f["error_type"] for f in faults} >= {
        "InvalidInputException", "ConversionException", "OutOfRangeException"
    }
    assert len(cancelled) == len(FAILING)


@pytest.fixture
def backend_errors_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """DuckDB's errors mapped to a code whose message is sent, as a rejection's is."""
    monkeypatch.setattr(
        server_errors, "_TABLE", [(duckdb.Error, grpc.StatusCode.INVALID_ARGUMENT),
                                  *server_errors._TABLE]
    )


@pytest.mark.usefixtures("backend_errors_shown")
def test_the_search_finds_a_backend_error_that_is_shown(
    live: LiveServer, statements: Statements
) -> None:
    seen = attack(live, statements)
    found = exposures({"the caller's status": json.dumps(seen)})
    assert len([f for f in found if "quotes" in f]) == len(FAILING), found
