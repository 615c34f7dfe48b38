"""The auditor's tables and report, built from a short session on a live server and its ledger:
from the ledger file (read-only, while the server runs), and over the Audit service."""

from __future__ import annotations

import base64
import csv
import re
import shutil
import sqlite3
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine.audit_report import TABLE_NAMES, AuditTables, build_tables, describe_query, render_html
from engine.ledger import Ledger
from engine.loss import parse_amount
from protos.veil.v1 import veil_pb2 as pb
from tests.server_harness import LiveServer, bearer, count_query, start_live, stubs


def _eq(variable: str, value: str | int) -> pb.Filter:
    v = pb.Value(integer=value) if isinstance(value, int) else pb.Value(text=value)
    return pb.Filter(equals=pb.Equals(variable=variable, value=v))


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """alice: three releases, one asked again (a replay), one asked again at a larger loss (a
    second draw), then one past her cap; bob: one release; a bad token; an auditor looks."""
    live = start_live(tmp_path_factory.mktemp("audit-session"))
    with stubs(live.port) as s:
        def release(client: str, rid: str, query: pb.Query, loss: str) -> None:
            s.research.Release(
                pb.ReleaseRequest(request_id=rid, query=query, loss=loss),
                metadata=live.auth(client),
            )

        release("alice", "a1", count_query("gender"), "0.5")
        release("alice", "a2", count_query("gender", "ageBroad"), "0.25")
        release("alice", "a3", count_query("gender"), "0.5")  # replay, free
        release("alice", "a4", count_query("gender"), "0.75")  # a second, independent draw
        release("bob", "b1", count_query("citizenship", where=_eq("gender", "Female")), "0.5")
        with pytest.raises(grpc.RpcError) as refused:
            release("alice", "a5", count_query("yearOfRegistration"), "1")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError):
            s.research.GetBudget(pb.GetBudgetRequest(), metadata=bearer("veil_not-a-token"))
        s.admin.SetBudget(
            pb.SetBudgetRequest(client_id="bob", budget="1.5"), metadata=live.auth("root")
        )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def tables(session: LiveServer) -> AuditTables:
    with Ledger.open_readonly(session.config.ledger) as ledger:  # while the server holds it
        return build_tables(ledger)


def test_administration_shows_each_change_and_who_made_it(tables: AuditTables) -> None:
    rows = tables["administration"].to_pylist()
    registered = [r["client"] for r in rows if r["event"] == "register_client"]
    assert registered == ["alice", "bob", "audra", "root"]
    (raised,) = [r for r in rows if r["event"] == "set_cap"]
    assert (raised["client"], raised["scope"], raised["cap_before"], raised["cap"]) == (
        "bob", "client:bob", "1", "1.5"
    )
    assert raised["actor"] == "root"
    assert "Administration" in render_html(tables) and ">root<" in render_html(tables)


def test_budgets_per_client_institution_and_dataset(tables: AuditTables) -> None:
    rows = {(r["kind"], r["name"]): r for r in tables["budgets"].to_pylist()}
    assert rows[("client", "alice")]["spent"] == "1.5"
    assert rows[("client", "alice")]["releases"] == 3
    assert rows[("client", "bob")]["spent"] == "0.5"
    assert rows[("institution", "iom")]["spent"] == "1.5"
    (dataset,) = [r for (kind, _), r in rows.items() if kind == "dataset"]
    assert dataset["spent"] == "2" and dataset["cap"] == "5"
    assert dataset["guess_bound"] == pytest.approx(1 / (1 + 2.718281828459045**-2))
    assert rows[("client", "alice")]["used_share"] == pytest.approx(0.75)


def test_spending_is_cumulative_per_scope_in_time_order(tables: AuditTables) -> None:
    rows = tables["spending"].to_pylist()
    alice = [r for r in rows if r["kind"] == "client" and r["name"] == "alice"]
    assert [r["amount"] for r in alice] == ["0.5", "0.25", "0.75"]
    assert [r["cumulative"] for r in alice] == ["0.5", "0.75", "1.5"]
    dataset = [r for r in rows if r["kind"] == "dataset"]
    assert dataset[-1]["cumulative"] == "2" and dataset[-1]["cap_value"] == 5.0
    assert dataset[-1]["remaining_value"] == 3.0
    times = [r["time"] for r in dataset]
    assert times == sorted(times)
    assert {r["kind"] for r in rows} == {"client", "institution", "dataset"}


def test_releases_carry_mechanism_tau_and_suppressed_share(
    tables: AuditTables, session: LiveServer
) -> None:
    rows = tables["releases"].to_pylist()
    assert len(rows) == 4
    assert {r["mechanism"] for r in rows} == {"discrete_laplace"}
    for row in rows:
        meta = session.ledger.release(row["release_id"]).metadata
        assert (row["tau"], row["cells"], row["suppressed_cells"]) == (
            meta.tau, meta.cells, meta.suppressed_cells,
        )
        assert row["suppressed_share"] == pytest.approx(meta.suppressed_cells / meta.cells)
        assert row["request_id"] in {"a1", "a2", "a4", "b1"}
    by_request = {r["request_id"]: r for r in rows}
    assert by_request["a1"]["replays"] == 1
    assert by_request["b1"]["query"] == "count by citizenship where gender = 'Female'"
    assert "value" not in tables["releases"].column_names  # values are never read


def test_queries_drawn_twice_and_replays_and_refusals(tables: AuditTables) -> None:
    queries = tables["queries"].to_pylist()
    assert queries[0]["query"] == "count by gender" and queries[0]["releases"] == 2
    assert queries[0]["total_loss"] == "1.25" and queries[0]["replays"] == 1
    (replay,) = tables["replays"].to_pylist()
    assert replay["client"] == "alice" and replay["request_id"] == "a3"
    refusals = tables["refusals"].to_pylist()
    outcomes = {(r["event"], r["outcome"]) for r in refusals}
    assert ("refused", "budget_exceeded") in outcomes
    assert any(event == "auth_denied" for event, _ in outcomes)
    (verification,) = tables["verification"].to_pylist()
    assert verification["ok"] and tables.summary["verified"] == "true"


def test_the_html_report_is_one_page_with_an_embedded_plot(
    tables: AuditTables, tmp_path: Path
) -> None:
    page = render_html(tables)
    assert "ledger verified" in page
    assert "count by gender" in page and "budget_exceeded" in page
    (encoded,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert base64.b64decode(encoded)[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "report.html").write_text(page)


def test_csv_tables_and_the_cli(session: LiveServer, tmp_path: Path) -> None:
    import veil_cli

    out = tmp_path / "tables"
    assert veil_cli.main(["audit", "tables", str(session.config.ledger), "--out", str(out)]) == 0
    assert {p.stem for p in out.glob("*.csv")} == set(TABLE_NAMES)
    with (out / "spending.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sum(Fraction(parse_amount(r["amount"])) for r in rows if r["kind"] == "dataset") == 2
    report = tmp_path / "report.html"
    assert veil_cli.main(["audit", "report", str(session.config.ledger), "--out", str(report)]) == 0
    assert "veil audit report" in report.read_text()


def test_the_same_tables_over_the_audit_service(
    session: LiveServer, tables: AuditTables, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from audit.cli import fetch_tables

    remote = fetch_tables(f"127.0.0.1:{session.port}", session.tokens["audra"])
    assert set(remote.tables) == set(TABLE_NAMES)
    for name in ("budgets", "releases", "queries", "replays"):
        assert remote[name].num_rows == tables[name].num_rows, name
    assert remote.summary["accounting"] == "pure_dp"
    only = fetch_tables(f"127.0.0.1:{session.port}", session.tokens["audra"], names=["budgets"])
    assert set(only.tables) == {"budgets"}

    import veil_cli

    monkeypatch.setenv("VEIL_TOKEN", session.tokens["audra"])
    report = tmp_path / "remote.html"
    server = f"127.0.0.1:{session.port}"
    assert veil_cli.main(["audit", "report", "--server", server, "--out", str(report)]) == 0
    assert "ledger verified" in report.read_text()

    with stubs(session.port) as s:
        with pytest.raises(grpc.RpcError) as denied:
            s.audit.GetAuditTables(pb.GetAuditTablesRequest(), metadata=session.auth("alice"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as unknown:
            s.audit.GetAuditTables(
                pb.GetAuditTablesRequest(tables=["values"]), metadata=session.auth("audra")
            )
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        listed = s.audit.ListReleases(pb.ListReleasesRequest(), metadata=session.auth("audra"))
    first = listed.releases[0]
    assert first.mechanism == "discrete_laplace" and first.tau > 0 and first.cells > 0
    assert first.suppressed_share == pytest.approx(first.suppressed_cells / first.cells)
    assert first.replays == 1


def test_a_tampered_ledger_is_reported_as_failed(session: LiveServer, tmp_path: Path) -> None:
    import veil_cli

    copy = tmp_path / "ledger.sqlite"
    with sqlite3.connect(session.config.ledger) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    with sqlite3.connect(copy) as conn:
        conn.execute("DROP TRIGGER audit_append_only_update")
        conn.execute("UPDATE audit SET entry = replace(entry, '\"0.5\"', '\"0.05\"') WHERE seq = 9")
    report = tmp_path / "report.html"
    assert veil_cli.main(["audit", "report", str(copy), "--out", str(report)]) == 1
    page = report.read_text()
    assert "verification FAILED" in page and "class='banner bad'" in page
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_describe_query() -> None:
    canonical = (
        '{"by":["gender"],"codebook":"ctdc_v7@7","measure":{"proportion":{"var":"isSexualExploit"'
        ',"in":[1],"missing":false}},"where":{"and":[{"var":"citizenship","in":["PH","UA"],'
        '"missing":true},{"var":"yearOfRegistration","in":[2019],"missing":false}]}}'
    )
    assert describe_query(canonical) == (
        "proportion with isSexualExploit = 1 by gender where (citizenship IN ('PH', 'UA') OR "
        "citizenship IS NULL) AND yearOfRegistration = 2019"
    )
    assert describe_query("not json") == "not json"


def test_an_auditor_reads_a_query_in_the_words_a_researcher_does(make_engine: Any) -> None:
    # The audit tables (engine) and the client's summaries and release lists describe the same
    # canonical form; two readers of it must not drift into two dialects.
    from client.results import describe_canonical
    from engine.loss import PrivacyLoss
    from engine.query import (
        And,
        Count,
        Eq,
        FlagCounts,
        In,
        IsMissing,
        Mean,
        Not,
        Or,
        Proportion,
        Query,
        Range,
        Sum,
    )

    engine = make_engine([{"gender": "Female"}] * 3)
    queries = [
        Query(Count(), by=("gender", "ageBroad"), where=Eq("majorityStatus", "Minor")),
        Query(FlagCounts("meansOfControl"), by=("majorityStatus",),
              where=Or(IsMissing("gender"), In("ageBroad", ["0--8", "9--17"]))),
        Query(Proportion(Eq("isAbduction", 1)), by=("gender",),
              where=And(Range("yearOfRegistration", 2010, 2014), Not(Eq("gender", "Male")))),
        Query(Mean("yearOfRegistration"), where=In("yearOfRegistration", [2002, 2010, 2021])),
        Query(Sum("yearOfRegistration"), by=("citizenshipRegion",),
              where=Or(And(Eq("gender", "Male"), Eq("majorityStatus", "Adult")),
                       Eq("citizenship", "UA"))),
    ]
    for query in queries:
        canonical = engine.plan(query, loss=PrivacyLoss.pure("1")).canonical
        assert describe_query(canonical, width=1000) == describe_canonical(canonical), canonical
    # The audit's tables shorten a list of more than six codes.
    codes = ["UA", "PH", "CO", "US", "MD", "RO", "NG", "VN"]
    eight = Query(Count(), where=In("citizenship", codes))
    assert describe_query(engine.plan(eight, loss=PrivacyLoss.pure("1")).canonical) == (
        "count where citizenship IN ('CO', 'MD', 'NG', 'PH', 'RO', 'UA', ... (8 values))"
    )


def test_a_zcdp_ledger_reports_rho_with_epsilon_equivalents(
    make_engine: Any, tmp_path: Path
) -> None:
    from engine.loss import Accounting, PrivacyLoss
    from engine.query import Count, Query
    from engine.settings import Settings

    engine = make_engine(
        [{"gender": "Female"}] * 30, settings=Settings(accounting=Accounting.ZCDP)
    )
    path = tmp_path / "zcdp.sqlite"
    with Ledger.open(path, accounting="zcdp", dataset_cap="1", dataset=engine.dataset,
                     data_version=engine.data_version, delta=1e-6) as ledger:
        ledger.register_client("zoe", role="researcher", cap="0.5")
        for i, by in enumerate((("gender",), ("ageBroad",))):
            engine.release(Query(Count(), by=by), loss=PrivacyLoss.zcdp("0.1"), charger=ledger,
                           client="zoe", request_id=f"z{i}")
    with Ledger.open_readonly(path) as ledger:
        tables = build_tables(ledger)
    assert tables.unit == "rho" and tables.summary["accounting"] == "zcdp"
    zoe = next(r for r in tables["budgets"].to_pylist() if r["name"] == "zoe")
    assert zoe["spent"] == "0.2"
    assert zoe["spent_epsilon"] == pytest.approx(0.2 + 2 * (0.2 * 13.815510557964274) ** 0.5)
    assert 0.5 < zoe["guess_bound"] < 1
    assert {r["mechanism"] for r in tables["releases"].to_pylist()} == {"discrete_gaussian"}
    page = render_html(tables)
    assert "spent (eps at delta)" in page and "Budgets (rho)" in page


def test_refused_credentials_count_those_the_rate_limits_left_unrecorded(tmp_path: Path) -> None:
    with Ledger.open(
        tmp_path / "ledger.sqlite", accounting="pure_dp", dataset_cap=1, dataset="ctdc"
    ) as ledger:
        detail = {"method": "/veil.v1.Research/GetBudget", "reason": "unknown or revoked token"}
        ledger.audit("auth_denied", None, outcome="refused", detail=detail)
        ledger.audit(
            "auth_denied", None, outcome="refused", detail={**detail, "unrecorded_before": "7"}
        )
    with Ledger.open_readonly(tmp_path / "ledger.sqlite") as ledger:
        tables = build_tables(ledger)
    assert [r["unrecorded_before"] for r in tables["refusals"].to_pylist()] == [None, "7"]
    assert "<b>9</b>refused credentials" in render_html(tables)


def test_cells_a_query_leaves_empty_are_not_counted_as_suppressed(tmp_path: Path) -> None:
    # A share among women by gender: the other genders' cells have no record by the query's
    # own terms, so no value, marked suppressed; the suppressed share is of the cells that may
    # hold records (the women's, 160 records, published), so it is 0, not 3 in 4.
    from engine.query import Count, Eq, Proportion, Query
    from server.convert import query_to_pb

    live = start_live(tmp_path / "audit-unreachable")
    women = Eq("gender", "Female")
    try:
        with stubs(live.port) as s:
            for rid, measure in (("p1", Proportion(Eq("isForcedLabour", 1))), ("c1", Count())):
                query = query_to_pb(Query(measure, by=("gender",), where=women))
                s.research.Release(
                    pb.ReleaseRequest(request_id=rid, query=query, loss="0.25"),
                    metadata=live.auth("alice"),
                )
            listed = s.audit.ListReleases(pb.ListReleasesRequest(), metadata=live.auth("audra"))
        with Ledger.open_readonly(live.config.ledger) as ledger:
            built = build_tables(ledger)
            rows = {r["request_id"]: r for r in built["releases"].to_pylist()}
            metas = {rid: ledger.release(rows[rid]["release_id"]).metadata for rid in rows}
            html = render_html(built)
    finally:
        live.stop()
    summaries = {r.request_id: r for r in listed.releases}
    for rid, marked in (("p1", 3), ("c1", 0)):  # a share of no record has no value
        meta, row, summary = metas[rid], rows[rid], summaries[rid]
        assert (meta.cells, meta.unreachable_cells, row["unreachable_cells"]) == (4, 3, 3)
        assert (meta.suppressed_cells, meta.suppressed_by_rule) == (marked, 0)
        assert row["suppressed_share"] == 0.0
        # The Audit service says the same as the tables, and the report shows the count.
        assert (summary.suppressed_share, summary.unreachable_cells) == (0.0, 3)
    assert "<th>empty by its terms</th>" in html and "are stated, not withheld" in html


def test_an_amount_edited_to_a_non_number_is_named_to_the_auditor_over_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A charge's amount edited by hand to a word, with the server stopped: the server opens the
    file (its totals still agree with the log), and the auditor's tables are refused as from an
    altered ledger, naming the column but not quoting it, while verification names the value.
    Before, the same call failed as an internal error, which tells the auditor nothing."""
    import veil_cli
    from server.accounts import LedgerAccounts
    from server.app import build_engine, start
    from tests.server_harness import live_config

    first = start_live(tmp_path)
    with stubs(first.port) as s:
        s.research.Release(
            pb.ReleaseRequest(request_id="a1", query=count_query("gender"), loss="0.5"),
            metadata=first.auth("alice"),
        )
    first.stop()
    with sqlite3.connect(first.config.ledger) as conn:
        triggers = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
        kept = triggers.fetchall()
        for name, _ in kept:
            conn.execute(f"DROP TRIGGER {name}")
        edited = conn.execute("UPDATE charges SET amount = 'lots' WHERE request_id = 'a1'")
        assert edited.rowcount == 1
        for _, sql in kept:
            conn.execute(sql)

    config = live_config(tmp_path, first.config.data)
    engine = build_engine(config)
    accounts = LedgerAccounts.for_config(config, engine, create=False)
    again = LiveServer(start(config, engine=engine, accounts=accounts), config, first.tokens,
                       tmp_path)
    try:
        with stubs(again.port) as s:
            with pytest.raises(grpc.RpcError) as refused:
                s.audit.GetAuditTables(pb.GetAuditTablesRequest(), metadata=again.auth("audra"))
            assert refused.value.code() == grpc.StatusCode.DATA_LOSS  # not to be retried
            details = refused.value.details() or ""
            assert "a charge's amount in the ledger file is not a number" in details
            assert "veil ledger verify" in details and "lots" not in details
            verified = s.audit.VerifyAuditLog(
                pb.VerifyAuditLogRequest(), metadata=again.auth("audra")
            )
            assert not verified.ok and "'lots' is not an amount" in verified.problem
        # The auditor's command says the ledger fails verification; it said the server could
        # not be reached, as it does of a server that is down.
        monkeypatch.setenv("VEIL_TOKEN", again.tokens["audra"])
        report = tmp_path / "report.html"
        code = veil_cli.main(["audit", "report", "--server", f"127.0.0.1:{again.port}",
                              "--out", str(report)])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 1 and not report.exists(), err
        assert "the veil server's ledger fails verification" in err and "veil ledger verify" in err
        assert "cannot reach" not in err and "lots" not in err
        # The server's log says it at the level a custodian is alerted by.
        refused_calls = [r for r in caplog.records if getattr(r, "event", None) == "call"
                         and getattr(r, "code", None) == "DATA_LOSS"]
        assert refused_calls and all(r.levelname == "ERROR" for r in refused_calls)
    finally:
        again.stop()
