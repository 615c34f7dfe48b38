"""Side channels: does anything other than the noisy values tell two neighbouring datasets apart?

Two data files differ in one record, the target's: a man from Fiji registered in 2011. Without
him, Fiji has k - 1 = 9 records and his (citizenship, gender, year) cell none; with him, 10 and 1.
He also moves three large counts by one (1237 -> 1238 exploited in Qatar and in forced labour,
2109 -> 2110 in all), so that the server's log, the ledger's audit log and the auditor's tables
and report can be searched for true counts that could not be there by accident.

The same script of calls (releases of every measure, a retry, a replay to another client,
refusals of every kind, a cancelled call, calls stopped by the caller's deadline and by the
server's time limit, the auditor's reads) runs against a real server over each file, and what
clients, auditors and the log see is compared after the identifiers and times that change from
run to run are blanked:

- with the noisy values pinned to the same numbers in both worlds (the noise patched in this
  process only), nothing may differ: a difference would be a channel other than the noisy
  values. The control test shows the comparison finds one such channel (suppression decided on
  the true count);
- with real noise, every refusal, dry run and status must still be the same, a replay is the
  stored release byte for byte and free, and no true count of a planted cell appears in the
  log, the audit log, the auditor's tables or the report.

None of these tests is statistical. With the noise pinned every output is deterministic; with
real noise only outputs that do not depend on the noise are compared, and the searched-for
counts are looked for only after every decimal number, identifier, hash and time is blanked, so
no noisy number can match one. They fail by chance with probability 0.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from engine import backend as backend_module
from engine.audit_report import TABLE_NAMES, build_tables, render_html
from engine.backend import Cancellation
from engine.ledger import Ledger
from engine.noise import Mechanism, NoiseAhead
from engine.query import And, Count, Eq, FlagCounts, In, Mean, Not, Proportion, Query
from engine.release import Release
from engine.sql import Statement
from protos.veil.v1 import veil_pb2 as pb
from server.app import configure_logging
from server.convert import query_to_pb
from tests.attacks.conftest import FAST_LIMITS
from tests.conftest import write_database
from tests.server_harness import LiveServer, charges_settled, start_live, stubs

K = 10
TARGET = {
    "citizenship": "FJ",
    "gender": "Male",
    "yearOfRegistration": 2011,
    "ageBroad": "9--17",
    "CountryOfExploitation": "QA",
    "isForcedLabour": 1,
}
QATAR, PHILIPPINES = 1237, 863
TOTAL = QATAR + PHILIPPINES + K - 1
# True counts of the planted cells, in both worlds: none may appear outside a released value.
TRUE_COUNTS = (QATAR, QATAR + 1, TOTAL, TOTAL + 1, PHILIPPINES)
PIN = 1000  # every noisy count, when the noise is pinned: above every tau, so all is published


def _rows(*, with_target: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rows += [
        {"citizenship": "UA", "gender": "Female", "yearOfRegistration": 2015,
         "ageBroad": "18--20", "CountryOfExploitation": "QA", "isForcedLabour": 1}
    ] * QATAR
    rows += [
        {"citizenship": "PH", "gender": "Male", "yearOfRegistration": 2018,
         "ageBroad": "30--38", "CountryOfExploitation": "US", "isForcedLabour": 0}
    ] * PHILIPPINES
    # Fiji: k - 1 records without the target, k with him; none of them shares his cell.
    rows += [
        {"citizenship": "FJ", "gender": "Female", "yearOfRegistration": 2012,
         "CountryOfExploitation": "US", "isForcedLabour": 0}
    ] * (K - 1)
    if with_target:
        rows.append(dict(TARGET))
    return rows


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("neighbours")
    # One data version for both, as two loads given the same --data-version record.
    return {
        name: write_database(
            root / f"{name}.duckdb", _rows(with_target=name == "with"), data_version="neighbours"
        )
        for name in ("without", "with")
    }


# ---- the script ------------------------------------------------------------------------------

TARGET_FILTER = And(Eq("citizenship", "FJ"), Eq("gender", "Male"), Eq("yearOfRegistration", 2011))


def _q(query: Query) -> pb.Query:
    return query_to_pb(query)


def _count(*by: str, where: pb.Filter | None = None) -> pb.Query:
    query = pb.Query(measure=pb.Measure(count=pb.CountMeasure()), by=list(by))
    if where is not None:
        query.where.CopyFrom(where)
    return query


def _equals(variable: str, text: str) -> pb.Filter:
    return pb.Filter(equals=pb.Equals(variable=variable, value=pb.Value(text=text)))


def _deep(depth: int) -> pb.Filter:
    f = _equals("citizenship", "FJ")
    for _ in range(depth):
        f = pb.Filter(negation=pb.Negation(operand=f))
    return f


# request id, query, loss: every measure, over the target's cells.
RELEASES: list[tuple[str, pb.Query, str]] = [
    ("r-citizenship", _q(Query(Count(), by=("citizenship",))), "0.25"),  # Fiji: 9 or 10
    ("r-fiji", _q(Query(Count(), by=("gender", "yearOfRegistration"),
                        where=Eq("citizenship", "FJ"))), "0.25"),  # his cell: 0 or 1
    ("r-target", _q(Query(Count(), where=TARGET_FILTER)), "0.125"),  # one cell: 0 or 1
    # Without him no record passes this filter, and the statement returns no row at all.
    ("r-empty", _q(Query(Count(), by=("ageBroad",), where=TARGET_FILTER)), "0.125"),
    ("r-proportion", _q(Query(Proportion(Eq("isForcedLabour", 1)), by=("citizenship",),
                              where=In("citizenship", ["FJ", "UA", "PH"]))), "0.25"),
    ("r-mean", _q(Query(Mean("yearOfRegistration"), by=("gender",))), "0.25"),
    ("r-flags", _q(Query(FlagCounts("meansOfControl"), by=("gender",))), "0.25"),
]
SPENT = "1.5"  # the sum of the losses above: alice's cap of 2 leaves 0.5

# Refused before any data is read (the last reuses a request id for another query).
REFUSALS: list[tuple[str, pb.Query, str]] = [
    ("x-unknown-variable", _count("heightInCm"), "0.1"),
    ("x-unknown-value", _count(where=_equals("citizenship", "QQ")), "0.1"),
    ("x-contradiction", _q(Query(Count(), where=And(Eq("citizenship", "FJ"),
                                                    Not(Eq("citizenship", "FJ"))))), "0.1"),
    ("x-too-many-cells", _count("citizenship", "CountryOfExploitation", "yearOfRegistration"),
     "0.1"),
    ("x-too-deep", _count(where=_deep(20)), "0.1"),
    ("x-bad-loss", _count("gender"), "-1"),
    ("x-budget", _count("ageBroad", "gender"), "1"),
    ("r-citizenship", _count("gender"), "0.25"),
]


class Gate:
    """Holds a statement, when asked to, until its call's cancellation fires or `go` is set."""

    def __init__(self) -> None:
        self.hold = False
        self.entered = threading.Event()
        self.go = threading.Event()

    def close(self) -> None:
        self.entered.clear()
        self.go.clear()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    held = Gate()
    original = backend_module.DuckDBBackend.run

    def run(
        self: backend_module.DuckDBBackend, statement: Statement, *,
        cancel: Cancellation | None = None,
    ) -> dict[str, np.ndarray]:
        if held.hold and cancel is not None:
            held.entered.set()
            with cancel.calling(held.go.set):
                held.go.wait(10)
        return original(self, statement, cancel=cancel)

    monkeypatch.setattr(backend_module.DuckDBBackend, "run", run)
    return held


@pytest.fixture
def pinned_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every noisy value is PIN, whatever the true value: the released values carry nothing."""

    def add_to(self: NoiseAhead, exact: list[np.ndarray]) -> list[np.ndarray]:
        return [np.full(len(v), PIN, dtype=np.int64) for v in exact]

    def release(self: Mechanism, values: np.ndarray) -> np.ndarray:
        return np.full(values.size, PIN, dtype=np.int64)

    monkeypatch.setattr(NoiseAhead, "add_to", add_to)
    monkeypatch.setattr(Mechanism, "release", release)


# ---- what is seen, with what changes from run to run blanked --------------------------------

_BLANKS = [
    (re.compile(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+"), "<image>"),
    (re.compile(r"\b(rel|chg)_[0-9a-f]{32}\b"), "<id>"),
    # Each data file's load is named at random (the audit entry of each open records it).
    (re.compile(r'"load_id": ?"[0-9a-f]{32}"'), '"load_id": "<id>"'),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<hash>"),
    (re.compile(r"\b[0-9a-f]{12,}&hellip;"), "<hash>"),  # a hash shortened for the report
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?"), "<time>"),
    # How many calls overlapped at most follows the machine's load, not the records: under
    # load two of the script's calls may overlap in one world only.
    (re.compile(r'"(ms|port|most_calls_at_once)": ?[0-9.]+'), r'"\1": <n>'),
    (re.compile(r"listening on port \d+"), "listening on port <n>"),
]


def blank(text: str) -> str:
    for pattern, replacement in _BLANKS:
        text = pattern.sub(replacement, text)
    return text


def _table(data: bytes) -> Any:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pylist()


def _seen(message: Message) -> Any:
    """A response as a client sees it, Arrow payloads decoded."""
    seen: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=True)
    if isinstance(message, pb.ReleaseResponse):
        seen["arrow_ipc"] = {
            "table": _table(message.arrow_ipc),
            "metadata": asdict(Release.from_bytes(message.arrow_ipc).metadata),
        }
    if isinstance(message, pb.GetAuditTablesResponse):
        seen["tables"] = {t.name: _table(t.arrow_ipc) for t in message.tables}
    return seen


def _failure(error: Any) -> dict[str, Any]:
    """A refusal as a client sees it: code, details and trailing metadata."""
    trailers = []
    for key, value in error.trailing_metadata() or ():
        shown = base64.b64encode(value).decode() if isinstance(value, bytes) else value
        trailers.append([key, shown])
    return {
        "code": error.code().name,
        "details": error.details(),
        "trailers": trailers,
    }


@dataclass
class World:
    """Everything the script saw of one server: calls, log, audit log, auditor's outputs."""

    calls: list[tuple[str, str]] = field(default_factory=list)  # label, blanked JSON
    responses: dict[str, Message] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # blanked lines
    audit_log: list[str] = field(default_factory=list)  # blanked entries
    tables: dict[str, str] = field(default_factory=dict)  # blanked CSV-like text
    report: str = ""
    raw_text: str = ""  # log, audit log, tables and report, unblanked (ids and times kept)

    def record(self, label: str, outcome: Any) -> None:
        self.calls.append((label, blank(json.dumps(outcome, sort_keys=True, default=str))))

    def call(self, label: str, method: Callable[..., Message], request: Message,
             auth: tuple[tuple[str, str], ...], *, code_only: bool = False,
             **kwargs: Any) -> Message | None:
        try:
            response = method(request, metadata=auth, **kwargs)
        except grpc.RpcError as exc:
            self.record(label, {"code": exc.code().name} if code_only else _failure(exc))
            return None
        self.responses[label] = response
        self.record(label, _seen(response))
        return response

    def seen(self, label: str) -> str:
        return dict(self.calls)[label]


def _settle(live: LiveServer) -> None:
    """Wait until no charge is held: a stopped call's work has finished on the server."""
    end = time.monotonic() + 10
    while not charges_settled(live.ledger):
        assert time.monotonic() < end, "a stopped call left its charge held"
        time.sleep(0.01)


def _script(live: LiveServer, world: World, held: Gate) -> None:
    alice, bob = live.auth("alice"), live.auth("bob")
    audra, root = live.auth("audra"), live.auth("root")
    with stubs(live.port) as s:
        r = s.research
        world.call("codebook", r.GetCodebook, pb.GetCodebookRequest(), alice)
        for phase in ("before", "after"):
            if phase == "after":
                for rid, query, loss in RELEASES:
                    world.call(f"release {rid}", r.Release,
                               pb.ReleaseRequest(request_id=rid, query=query, loss=loss), alice)
            for rid, query, loss in RELEASES:
                world.call(f"dry run {rid} {phase}", r.DryRun,
                           pb.DryRunRequest(query=query, loss=loss), bob)
                world.call(f"dry run {rid} half-width {phase}", r.DryRun,
                           pb.DryRunRequest(query=query, half_width=3, assumed_count=K - 1), bob)
        # A retry and a replay to another client: the stored release, free.
        rid, query, loss = RELEASES[0]
        world.call("retry", r.Release,
                   pb.ReleaseRequest(request_id=rid, query=query, loss=loss), alice)
        world.call("replay", r.Release,
                   pb.ReleaseRequest(request_id="b-1", query=query, loss="0.125"), bob)
        first = world.responses[f"release {rid}"]
        assert isinstance(first, pb.ReleaseResponse)
        release_id = first.metadata.release_id
        world.call("get release", r.GetRelease, pb.GetReleaseRequest(release_id=release_id), bob)
        world.call("get release unknown", r.GetRelease,
                   pb.GetReleaseRequest(release_id="rel_" + "0" * 32), bob)
        for rid, query, loss in REFUSALS:
            world.call(f"refused {rid}", r.Release,
                       pb.ReleaseRequest(request_id=rid, query=query, loss=loss), alice)
            world.call(f"refused dry run {rid}", r.DryRun,
                       pb.DryRunRequest(query=query, loss=loss), alice)

        # Stopped while the statement runs: by the caller and by its deadline, which no longer
        # stop it (it is charged and stored, so that stopping it is no free probe of how long
        # it takes), and by the server's time limit, which does, and is charged (forfeited,
        # nothing released) for the same reason.
        held.hold = True
        stopped = pb.ReleaseRequest(request_id="s-1", query=_count("ageBroad"), loss="0.125")
        held.close()
        future: Any = r.Release.future(stopped, metadata=bob)
        assert held.entered.wait(10)
        future.cancel()
        world.record("cancelled", {"code": future.code().name})
        held.go.set()  # the statement ends after its caller has gone
        _settle(live)
        held.close()
        late = pb.ReleaseRequest(request_id="s-2", query=_count("majorityStatus"), loss="0.125")
        # The code only: whether the client's gRPC ("Deadline Exceeded") or the server's
        # sentence reports the passed deadline first is a race between them, in either world.
        world.call("caller's deadline", r.Release, late, bob, code_only=True, timeout=0.3)
        held.go.set()
        _settle(live)
        held.close()
        world.call("server's limit", r.Release,
                   pb.ReleaseRequest(request_id="s-3", query=_count("gender"), loss="0.125"), bob)
        _settle(live)
        held.hold = False
        # What the caller left behind was charged and stored: its retry gets it, free.
        world.call("retry after cancel", r.Release, stopped, bob, code_only=True)
        world.call("retry after deadline", r.Release, late, bob, code_only=True)

        world.call("budget", r.GetBudget, pb.GetBudgetRequest(), alice)
        world.call("my releases", r.ListMyReleases, pb.ListMyReleasesRequest(), alice)
        world.call("releases", s.audit.ListReleases, pb.ListReleasesRequest(), audra)
        world.call("ledger report", s.audit.GetLedgerReport, pb.LedgerReportRequest(), audra)
        world.call("verify", s.audit.VerifyAuditLog, pb.VerifyAuditLogRequest(), audra)
        world.call("audit tables", s.audit.GetAuditTables, pb.GetAuditTablesRequest(), audra)
        world.call("clients", s.admin.ListClients, pb.ListClientsRequest(), root)


def run_world(root: Path, data: Path, held: Gate) -> World:
    world = World()
    stream = io.StringIO()
    handler = configure_logging("info", stream=stream)
    try:
        live = start_live(
            root, data=data, caps={"dataset": "10", "client": "1"},
            limits={**FAST_LIMITS, "max_query_seconds": 1},
        )
        try:
            _script(live, world, held)
        finally:
            live.stop()
    finally:
        handler.close()
        for name in ("veil", "grpc"):  # give the loggers back to pytest
            logging.getLogger(name).handlers = []
            logging.getLogger(name).propagate = True
    log = stream.getvalue().splitlines()
    with Ledger.open_readonly(live.config.ledger) as ledger:
        entries = [json.dumps(e.entry, sort_keys=True) for e in ledger.audit_log()]
        tables = build_tables(ledger, names=TABLE_NAMES)
    report = render_html(tables)
    csv = {name: json.dumps(table.to_pylist(), sort_keys=True, default=str)
           for name, table in tables.tables.items()}
    csv["summary"] = json.dumps(tables.summary, sort_keys=True, default=str)
    # Lines of concurrent calls may interleave in either order: compared as a multiset.
    world.log = sorted(blank(line) for line in log)
    world.audit_log = [blank(e) for e in entries]
    world.tables = {name: blank(text) for name, text in csv.items()}
    world.report = blank(report)
    world.raw_text = "\n".join([*log, *entries, *csv.values(), report])
    # The ledger's path is named in the report: blanked, as the worlds live in two directories.
    world.tables = {n: t.replace(str(root), "<root>") for n, t in world.tables.items()}
    world.report = world.report.replace(str(root), "<root>")
    return world


def both(tmp_path: Path, worlds: dict[str, Path], held: Gate) -> tuple[World, World]:
    return (run_world(tmp_path / "without", worlds["without"], held),
            run_world(tmp_path / "with", worlds["with"], held))


def differences(a: World, b: World) -> list[str]:
    """Where two worlds differ, by label, for the assertion message."""
    out = [f"call {la}" for (la, sa), (lb, sb) in zip(a.calls, b.calls, strict=True)
           if la != lb or sa != sb]
    if a.log != b.log:
        out.append("server log")
    if a.audit_log != b.audit_log:
        out.append("audit log")
    out += [f"audit table {n}" for n in a.tables if a.tables[n] != b.tables.get(n)]
    if a.report != b.report:
        out.append("audit report")
    return out


# ---- the tests ------------------------------------------------------------------------------


@pytest.mark.usefixtures("pinned_noise")
def test_with_the_noisy_values_pinned_nothing_tells_the_worlds_apart(
    tmp_path: Path, worlds: dict[str, Path], gate: Gate
) -> None:
    without, with_target = both(tmp_path, worlds, gate)
    assert len(without.calls) == len(with_target.calls) > 60
    assert differences(without, with_target) == []
    # The script did what it says: releases charged, the calls the caller stopped too (and
    # their retries free), and the one the server's limit stopped.
    budget = with_target.responses["budget"]
    assert isinstance(budget, pb.Budget) and budget.spent == SPENT
    assert json.loads(without.seen("cancelled"))["code"] == "CANCELLED"
    assert json.loads(without.seen("caller's deadline"))["code"] == "DEADLINE_EXCEEDED"
    limit = json.loads(without.seen("server's limit"))
    assert limit["code"] == "DEADLINE_EXCEEDED" and "server's limit" in limit["details"]
    assert "it was charged, and nothing was released" in limit["details"]
    for world in (without, with_target):
        for retry in ("retry after cancel", "retry after deadline"):
            response = world.responses[retry]
            assert isinstance(response, pb.ReleaseResponse) and response.charged == "0"


@pytest.mark.usefixtures("pinned_noise", "suppress_on_true_count")
def test_the_comparison_finds_suppression_on_the_true_count(
    tmp_path: Path, worlds: dict[str, Path], gate: Gate
) -> None:
    # Control: a server that suppresses Fiji's 9 and publishes its 10 is told apart by the
    # release's suppressed flags, wherever the release is sent.
    without, with_target = both(tmp_path, worlds, gate)
    found = differences(without, with_target)
    assert {"call release r-citizenship", "call retry", "call replay",
            "call get release"} <= set(found)


def test_refusals_dry_runs_and_stops_are_the_same_in_both_worlds(
    tmp_path: Path, worlds: dict[str, Path], gate: Gate
) -> None:
    without, with_target = both(tmp_path, worlds, gate)
    independent = [
        label for label, _ in without.calls
        if label.startswith(("codebook", "dry run", "refused", "get release unknown"))
        or label in ("cancelled", "caller's deadline", "server's limit", "budget", "clients")
    ]
    assert len(independent) > 40
    for label in independent:
        assert without.seen(label) == with_target.seen(label), label
    refusals = {label: json.loads(without.seen(label)) for label in independent
                if label.startswith("refused ") and not label.startswith("refused dry run")}
    assert {r["code"] for r in refusals.values()} == {
        "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"
    }
    # Nothing refused was charged: alice paid for her releases only; bob for the two calls he
    # stopped once their statements had begun, and for the one the server's limit stopped.
    for world in (without, with_target):
        budget = world.responses["budget"]
        assert isinstance(budget, pb.Budget) and budget.spent == SPENT
        clients = world.responses["clients"]
        assert isinstance(clients, pb.ListClientsResponse)
        assert {c.client_id: c.spent for c in clients.clients}["bob"] == "0.375"


def test_a_replay_is_the_stored_release_byte_for_byte_and_free(
    tmp_path: Path, worlds: dict[str, Path], gate: Gate
) -> None:
    without, with_target = both(tmp_path, worlds, gate)
    for world in (without, with_target):
        first = world.responses["release r-citizenship"]
        retry, replay = world.responses["retry"], world.responses["replay"]
        fetched = world.responses["get release"]
        assert isinstance(first, pb.ReleaseResponse) and isinstance(retry, pb.ReleaseResponse)
        assert isinstance(replay, pb.ReleaseResponse) and isinstance(fetched, pb.ReleaseResponse)
        assert first.charged == "0.25"
        assert retry.arrow_ipc == replay.arrow_ipc == fetched.arrow_ipc == first.arrow_ipc
        assert retry.charged == replay.charged == "0"
        # Every listing counts the suppressed cells the release itself shows suppressed.
        shown = sum(row["suppressed"] for row in _table(first.arrow_ipc))
        assert first.metadata.suppressed_cells == shown
        listed = world.responses["releases"]
        assert isinstance(listed, pb.ListReleasesResponse)
        summary = next(x for x in listed.releases
                       if x.release_id == first.metadata.release_id)
        assert summary.suppressed_cells == shown


def test_no_true_count_reaches_the_logs_or_the_auditor(
    tmp_path: Path, worlds: dict[str, Path], gate: Gate
) -> None:
    without, with_target = both(tmp_path, worlds, gate)
    counts = re.compile(r"\b(" + "|".join(str(n) for n in TRUE_COUNTS) + r")\b")
    decimals = re.compile(r"\d+\.\d+(e[-+]?\d+)?")
    for world in (without, with_target):
        assert world.log and world.audit_log and world.tables and world.report
        text = decimals.sub("<decimal>", blank(world.raw_text))
        assert counts.findall(text) == []
        # The releases went out: the search looked where the counts would have been.
        assert any('"release"' in entry for entry in world.audit_log)
        assert world.seen("release r-citizenship").count('"citizenship"') > 200


# ---- the data version ------------------------------------------------------------------------

EXCERPT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ctdc_global_2020_excerpt.csv"


@pytest.mark.skipif(not EXCERPT.is_file(), reason="the CTDC excerpt is not present")
def test_the_data_version_a_client_sees_does_not_tell_the_worlds_apart(tmp_path: Path) -> None:
    from engine.codebook import default_codebook
    from engine.loader import load

    # The two worlds as custodians hold them: a CSV with the target's record, and one without.
    lines = EXCERPT.read_bytes().splitlines(keepends=True)
    sources = {"with": tmp_path / "with.csv", "without": tmp_path / "without.csv"}
    sources["with"].write_bytes(b"".join(lines))
    sources["without"].write_bytes(b"".join(lines[:-1]))
    seen = {}
    for name, source in sources.items():
        data = tmp_path / f"{name}.duckdb"
        load(source, data, codebook=default_codebook())
        live = start_live(tmp_path / name, data=data)
        try:
            with stubs(live.port) as s:
                seen[name] = s.research.GetCodebook(
                    pb.GetCodebookRequest(), metadata=live.auth("alice")
                ).deployment.data_version
        finally:
            live.stop()
    # An attacker who holds both candidate files computes what each would be called: the
    # version a client is told must not be computable from the records alone.
    for name, source in sources.items():
        content = source.read_bytes()
        digests = [hashlib.new(h, content).hexdigest()[:8] for h in ("sha256", "sha1", "md5")]
        assert not any(d in version for d in digests for version in seen.values()), name
