"""The auditor's tables and report from a ledger whose history has changed: caps raised after
charges, a query drawn again on a new data version, clients with a single charge."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from engine.audit_report import AuditTables, build_tables, render_html, spending_figure
from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.ledger import Ledger
from engine.loss import Accounting, PrivacyLoss
from engine.query import Count, Query
from engine.risk import binary_guess_bound
from tests.conftest import write_database

ROWS = [{"gender": "Male", "ageBroad": "18--20"}] * 40 + [{"gender": "Female"}] * 25


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> AuditTables:
    """alice: a charge at a cap of 1, then her cap and the dataset's are raised, then another;
    the same query drawn on data versions v1 and v2; bob, carol and dave one charge each."""
    root = tmp_path_factory.mktemp("history")
    engines = {
        version: Engine(
            DuckDBBackend(write_database(root / f"{version}.duckdb", ROWS, data_version=version)),
            codebook=default_codebook(),
        )
        for version in ("v1", "v2")
    }
    path = root / "ledger.sqlite"
    with Ledger.open(path, accounting="pure_dp", dataset_cap="5", dataset="ctdc") as ledger:
        for client in ("alice", "bob", "carol", "dave"):
            ledger.register_client(client, role="researcher", cap="1")

        def ask(version: str, client: str, rid: str, by: tuple[str, ...], eps: str) -> None:
            engines[version].release(
                Query(Count(), by=by), loss=PrivacyLoss.pure(eps), charger=ledger,
                client=client, request_id=rid,
            )

        ask("v1", "alice", "a1", ("gender",), "0.5")
        ledger.set_cap("alice", "1.8", actor="root")
        ledger.set_dataset_cap("6", actor="root")
        ask("v2", "alice", "a2", ("gender",), "0.25")  # the same query, a new data version
        ask("v2", "bob", "b1", ("ageBroad",), "0.1")
        ask("v2", "carol", "c1", ("gender", "ageBroad"), "0.2")
        ask("v2", "dave", "d1", ("citizenship",), "0.3")
    for engine in engines.values():
        backend = engine.backend
        assert isinstance(backend, DuckDBBackend)
        backend.close()
    with Ledger.open_readonly(path) as ledger:
        return build_tables(ledger)


def test_spending_shows_the_cap_in_force_at_each_charge(tables: AuditTables) -> None:
    rows = tables["spending"].to_pylist()
    alice = [r for r in rows if (r["kind"], r["name"]) == ("client", "alice")]
    assert [(r["amount"], r["cap_value"]) for r in alice] == [("0.5", 1.0), ("0.25", 1.8)]
    assert [r["remaining_value"] for r in alice] == [0.5, pytest.approx(1.05)]
    dataset = [r for r in rows if r["kind"] == "dataset"]
    assert [r["cap_value"] for r in dataset] == [5.0] + [6.0] * 4


def test_a_query_drawn_again_on_a_new_data_version_counts_as_drawn_twice(
    tables: AuditTables,
) -> None:
    (twice,) = [q for q in tables["queries"].to_pylist() if q["releases"] > 1]
    assert twice["query"] == "count by gender"
    assert (twice["data_versions"], twice["total_loss"]) == ("v1, v2", "0.75")
    page = render_html(tables)
    assert "<b>1</b>queries drawn more than once" in page
    assert "<td>v1, v2</td>" in page
    assert "Queries drawn more than once (1; their losses add up)" in page


def test_the_report_says_when_it_shows_only_some_repeated_queries(tables: AuditTables) -> None:
    page = render_html(tables, max_rows=0)
    assert "Queries drawn more than once (1; the 0 drawn most often;" in page


def test_every_client_is_visible_in_the_spending_plot(tables: AuditTables) -> None:
    import matplotlib.pyplot as plt

    figure = spending_figure(tables)
    try:
        lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
        last = max(r["time"] for r in tables["spending"].to_pylist())
        for client in ("alice", "bob", "carol", "dave"):
            line = lines[f"client {client}"]
            # A marker at each charge, however few, and the step held to the last charge.
            assert line.get_marker() not in (None, "", " ", "None"), client
            charges = sum(
                1 for r in tables["spending"].to_pylist()
                if (r["kind"], r["name"]) == ("client", client)
            )
            assert len(line.get_markevery()) == charges, client
            assert line.get_xdata()[-1] == last, client
    finally:
        plt.close(figure)


def test_charges_before_a_schema_1_upgrade_show_their_data_versions_cap(tmp_path: Path) -> None:
    from tests.unit.test_ledger_upgrade import FIXTURE, open_for_writing

    path = tmp_path / "ledger.sqlite"
    shutil.copyfile(FIXTURE, path)
    open_for_writing(path).close()  # the upgrade; v1 had a cap of 1, v2 one of 0.75
    with Ledger.open_readonly(path) as ledger:
        rows = build_tables(ledger, names=["spending"])["spending"].to_pylist()
    dataset = [(r["amount"], r["cap_value"]) for r in rows if r["kind"] == "dataset"]
    assert sorted(dataset) == [("0.125", 1.0), ("0.25", 1.0), ("0.5", 0.75)]


def test_budgets_say_what_each_client_can_still_spend(tmp_path: Path) -> None:
    # "remaining" is against a client's own cap; what it can still be charged is also bounded
    # by its institution's and the dataset's caps, and is nothing once it is revoked.
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, accounting="pure_dp", dataset_cap="2", dataset="ctdc") as ledger:
        ledger.register_client("amina", role="researcher", cap="1", institution="iom")
        ledger.register_client("bob", role="researcher", cap="1", institution="iom")
        ledger.register_client("carol", role="researcher", cap="1.5")
        ledger.register_client("dave", role="researcher", cap="1")
        ledger.set_institution_cap("iom", "0.3", actor="root")
        ledger.revoke("dave", reason="left")
        tables = build_tables(ledger, names=["budgets"])
    rows = {(r["kind"], r["name"]): r for r in tables["budgets"].to_pylist()}
    assert rows["client", "amina"]["remaining"] == "1"
    assert rows["client", "amina"]["can_spend"] == "0.3"  # the institution's cap binds
    assert rows["client", "carol"]["can_spend"] == "1.5"
    assert rows["client", "dave"]["can_spend"] == "0"  # revoked
    assert rows["institution", "iom"]["can_spend"] is None
    assert rows["dataset", "ctdc"]["can_spend"] is None
    assert "can still spend" in render_html(tables)


def _engine(tmp_path: Path) -> Engine:
    """An engine over ROWS, data version v1."""
    path = write_database(tmp_path / "d.duckdb", ROWS, data_version="v1")
    return Engine(DuckDBBackend(path), codebook=default_codebook())


def test_shares_are_shown_to_a_tenth_of_a_percent(tmp_path: Path) -> None:
    # A share just over a half (flagged as such) must not read "50%".
    engine = _engine(tmp_path)
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, accounting="pure_dp", dataset_cap="5", dataset="ctdc") as ledger:
        ledger.register_client("amina", role="researcher", cap="1")
        engine.release(Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.502"),
                       charger=ledger, client="amina", request_id="a1")
        page = render_html(build_tables(ledger, names=["budgets"]))
    assert "50.2%" in page and ">50%<" not in page


def test_a_budget_nine_tenths_used_is_flagged_in_the_report(tmp_path: Path) -> None:
    """A client close to its cap is marked in the budgets table; one at half of it is not."""
    engine = _engine(tmp_path)
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, accounting="pure_dp", dataset_cap="5", dataset="ctdc") as ledger:
        for client, eps in (("amina", "0.95"), ("bob", "0.5")):
            ledger.register_client(client, role="researcher", cap="1")
            engine.release(Query(Count(), by=("gender",)), loss=PrivacyLoss.pure(eps),
                           charger=ledger, client=client, request_id="r1")
        page = render_html(build_tables(ledger, names=["budgets"]))
    rows = re.findall(r"<tr( class='flag')?><td>(client|dataset)</td><td>([^<]*)</td>", page)
    assert {name: bool(flag) for flag, _, name in rows} == {
        "amina": True, "bob": False, "ctdc": False
    }


def test_a_forfeit_counts_in_spending_the_summary_and_the_headline(tmp_path: Path) -> None:
    """A query the server's time limit stopped is charged with nothing released: the spending
    table, the summary's forfeit count and the report's guess bound must all count it."""
    engine = _engine(tmp_path)
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, accounting="pure_dp", dataset_cap="5", dataset="ctdc") as ledger:
        ledger.register_client("alice", role="researcher", cap="1")
        engine.release(Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.1"),
                       charger=ledger, client="alice", request_id="a1")
        stopped = ledger.reserve(
            engine.plan(Query(Count(), by=("ageBroad",)), loss=PrivacyLoss.pure("0.4")),
            client="alice", request_id="a2", data_version="v1",
        )
        stopped.forfeit("stopped_by_limit")
        for request_id in ("a3", "a4"):  # two holds given back: neither is a forfeit
            cancelled = ledger.reserve(
                engine.plan(Query(Count()), loss=PrivacyLoss.pure("0.2")),
                client="alice", request_id=request_id, data_version="v1",
            )
            cancelled.cancel()
        tables = build_tables(ledger)
    backend = engine.backend
    assert isinstance(backend, DuckDBBackend)
    backend.close()
    alice = [r for r in tables["spending"].to_pylist() if r["kind"] == "client"]
    assert [(r["amount"], r["cumulative"], r["cap_value"]) for r in alice] == [
        ("0.1", "0.1", 1.0), ("0.4", "0.5", 1.0)
    ]
    assert tables.summary["forfeited"] == "1" and tables.summary["dataset_spent"] == "0.5"
    assert tables.summary["dataset_guess_bound"] == repr(
        binary_guess_bound(Accounting.PURE_DP, 0.5)
    )
    assert f"{binary_guess_bound(Accounting.PURE_DP, 0.5):.3f}" in render_html(tables)


@pytest.mark.parametrize("position", [0, 1])  # the oldest, and the last before those shown
def test_an_altered_release_older_than_the_rows_shown_is_still_in_the_report(
    tmp_path: Path, position: int
) -> None:
    """The report shows the last releases only; an altered one before them gets its own table,
    or an early forgery would be out of sight."""
    engine = _engine(tmp_path)
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, accounting="pure_dp", dataset_cap="5", dataset="ctdc") as ledger:
        ledger.register_client("alice", role="researcher", cap="1")
        for i in range(4):  # each a fresh release: a larger loss than the one before
            engine.release(Query(Count(), by=("gender",)), loss=PrivacyLoss.pure(f"0.0{i + 1}"),
                           charger=ledger, client="alice", request_id=f"a{i}")
    backend = engine.backend
    assert isinstance(backend, DuckDBBackend)
    backend.close()
    with sqlite3.connect(path) as conn:  # someone with write access: the guards dropped
        guards = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        for (name,) in list(guards):
            conn.execute(f"DROP TRIGGER {name}")
        altered, data = conn.execute(
            "SELECT release_id, bytes FROM releases ORDER BY rowid LIMIT 1 OFFSET ?", (position,)
        ).fetchone()
        conn.execute("UPDATE releases SET bytes = ? WHERE release_id = ?",
                     (bytes(data[:-1]) + bytes([data[-1] ^ 1]), altered))
    with Ledger.open_readonly(path) as ledger:
        page = render_html(build_tables(ledger), max_rows=2)
    earlier = page.split("Earlier releases altered or unreadable", 1)
    assert len(earlier) == 2 and altered in earlier[1]
