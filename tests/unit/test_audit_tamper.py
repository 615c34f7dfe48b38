"""The audit log is hash-chained: `verify` finds a flipped byte, a deleted entry, a reordered pair,
and a rewrite that is inconsistent with the ledger's own tables."""

from __future__ import annotations

import hashlib
import html
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import pytest

from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import BudgetExceededError, LedgerIntegrityError
from engine.ledger import Ledger
from engine.ledger_cli import main as ledger_cli
from engine.ledger_verify import VerifyResult
from engine.loss import Accounting, PrivacyLoss, format_amount, parse_amount
from engine.query import Count, Query
from tests.conftest import write_database

CODEBOOK = default_codebook()
ROWS = [{"gender": "Male", "ageBroad": "18--20"}] * 40 + [{"gender": "Female"}] * 25


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_database(tmp_path_factory.mktemp("data") / "d.duckdb", ROWS, data_version="v1")
    return Engine(DuckDBBackend(path), codebook=CODEBOOK)


def open_ledger(path: Path) -> Ledger:
    return Ledger.open(
        path, accounting=Accounting.PURE_DP, dataset_cap="5", dataset="ctdc", data_version="v1"
    )


@pytest.fixture
def path(tmp_path: Path, engine: Engine) -> Path:
    """A closed ledger with every kind of entry: charges, a retry, a replay, refusals, a cancel,
    a forfeit (a query the server's time limit stopped: charged, nothing released)."""
    path = tmp_path / "ledger.sqlite"
    with open_ledger(path) as ledger:
        ledger.register_client("alice", role="researcher", institution="iom", cap="1")
        ledger.register_client("bob", role="researcher", cap="0.3")

        def ask(client: str, request_id: str, by: tuple[str, ...], eps: str) -> None:
            engine.release(
                Query(Count(), by=by),
                loss=PrivacyLoss.pure(eps),
                charger=ledger,
                client=client,
                request_id=request_id,
            )

        ask("alice", "a1", ("gender",), "0.1")
        ask("alice", "a1", ("gender",), "0.1")  # retry
        ask("bob", "b1", ("gender",), "0.1")  # replay
        ask("bob", "b2", ("ageBroad",), "0.2")
        with pytest.raises(BudgetExceededError):
            ask("bob", "b3", ("Datasource",), "0.2")
        held = ledger.reserve(
            engine.plan(Query(Count()), loss=PrivacyLoss.pure("0.1")),
            client="alice",
            request_id="a2",
        )
        held.cancel()
        ask("alice", "a3", ("gender", "ageBroad"), "0.3")
        stopped = ledger.reserve(
            engine.plan(Query(Count(), by=("Datasource",)), loss=PrivacyLoss.pure("0.2")),
            client="alice",
            request_id="a4",
        )
        stopped.forfeit("stopped_by_limit")
        assert ledger.verify().ok
    return path


def verify(path: Path, *, expect_head: str | None = None) -> VerifyResult:
    with Ledger.open_readonly(path) as ledger:
        return ledger.verify(expect_head=expect_head)


@contextmanager
def attacker(path: Path) -> Iterator[sqlite3.Connection]:
    """Someone with write access to the file: the guard triggers are no obstacle to them."""
    conn = sqlite3.connect(path, isolation_level=None)
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
    for name in names:
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def entry_count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
    finally:
        conn.close()


def restore_triggers_view(result: VerifyResult) -> list[str]:
    """The problems other than the removed guard triggers (which every attack here removes)."""
    return [p for p in result.problems if "guard trigger" not in p]


def test_an_untouched_ledger_verifies(path: Path) -> None:
    result = verify(path)
    assert result.ok, result.problems
    assert result.entries == entry_count(path) >= 14
    assert result.first_bad_seq is None


def test_every_flipped_byte_position_is_found(path: Path) -> None:
    """Flip one byte of each entry in turn, at several positions: always found, at that entry."""
    total = entry_count(path)
    for seq in range(1, total + 1):
        conn = sqlite3.connect(path)
        (text,) = conn.execute("SELECT entry FROM audit WHERE seq = ?", (seq,)).fetchone()
        conn.close()
        for position in (0, len(text) // 3, len(text) // 2, len(text) - 1):
            flipped = text[:position] + chr(ord(text[position]) ^ 0x01) + text[position + 1 :]
            with attacker(path) as conn:
                conn.execute("UPDATE audit SET entry = ? WHERE seq = ?", (flipped, seq))
            result = verify(path)
            assert not result.ok
            assert result.first_bad_seq == seq, (seq, position, result.problems)
            assert "altered" in result.problems[0]
            with attacker(path) as conn:
                conn.execute("UPDATE audit SET entry = ? WHERE seq = ?", (text, seq))
    assert restore_triggers_view(verify(path)) == []


def test_a_flipped_byte_in_the_file_itself_is_found(path: Path) -> None:
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    data = bytearray(path.read_bytes())
    marker = b'"seq":7,"time":"'
    at = data.find(marker)
    assert at > 0 and data.find(marker, at + 1) == -1
    position = at + len(marker) + 3  # a digit of the entry's timestamp
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify(path)
    assert not result.ok and result.first_bad_seq == 7
    assert "entry 7: has been altered" in result.problems[0]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_deleted_entry_is_found(path: Path, where: str) -> None:
    total = entry_count(path)
    seq = {"first": 1, "middle": total // 2, "last": total}[where]
    with attacker(path) as conn:
        conn.execute("DELETE FROM audit WHERE seq = ?", (seq,))
    result = verify(path)
    assert not result.ok
    assert result.first_bad_seq == seq
    assert "missing" in restore_triggers_view(result)[0]


def test_a_deleted_run_of_entries_is_found(path: Path) -> None:
    with attacker(path) as conn:
        conn.execute("DELETE FROM audit WHERE seq BETWEEN 5 AND 8")
    result = verify(path)
    assert result.first_bad_seq == 5
    assert "entries 5 to 8 are missing" in restore_triggers_view(result)[0]


@pytest.mark.parametrize("pair", [(1, 2), (4, 5), (3, 9)])
def test_a_reordered_pair_is_found(path: Path, pair: tuple[int, int]) -> None:
    first, second = pair
    with attacker(path) as conn:
        rows = {
            seq: conn.execute(
                "SELECT entry, prev_hash, hash FROM audit WHERE seq = ?", (seq,)
            ).fetchone()
            for seq in pair
        }
        for seq, other in ((first, second), (second, first)):
            conn.execute(
                "UPDATE audit SET entry = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (*rows[other], seq),
            )
    result = verify(path)
    assert not result.ok
    assert result.first_bad_seq == first


def rewrite_from(conn: sqlite3.Connection, start: int) -> None:
    """Recompute the chain from entry `start` on and the recorded head: a careful forger."""
    prev = conn.execute("SELECT hash FROM audit WHERE seq = ?", (start - 1,)).fetchone()[0]
    rows = conn.execute("SELECT seq, entry FROM audit WHERE seq >= ? ORDER BY seq", (start,))
    for seq, text in list(rows):
        digest = hashlib.sha256(prev.encode() + text.encode()).hexdigest()
        conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev = digest
        last = seq
    conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (f"{last}:{prev}",))


def test_a_rewritten_charge_is_found_by_reconciliation(path: Path) -> None:
    """Lowering a charge in the log, with every later hash recomputed, still fails: the budget
    movements no longer add up, and they disagree with the totals and the charges."""
    with attacker(path) as conn:
        seq, text = conn.execute(
            'SELECT seq, entry FROM audit WHERE entry LIKE \'%"event":"release"%\' LIMIT 1'
        ).fetchone()
        entry = json.loads(text)
        entry["charge"] = "0.01"
        canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        conn.execute("UPDATE audit SET entry = ? WHERE seq = ?", (canonical, seq))
        rewrite_from(conn, seq)
    problems = restore_triggers_view(verify(path))
    assert problems
    assert any(f"entry {seq}" in p for p in problems)
    assert any("release differs from the audited one" in p for p in problems)


def test_a_truncated_and_reheaded_log_is_found_with_a_recorded_head(path: Path) -> None:
    head = verify(path)
    recorded = f"{head.head_seq}:{head.head_hash}"
    total = entry_count(path)
    with attacker(path) as conn:
        conn.execute("DELETE FROM audit WHERE seq = ?", (total,))
        rewrite_from(conn, total - 1)
    result = verify(path, expect_head=recorded)
    assert not result.ok
    assert any("expected head" in p for p in result.problems)


def test_tampered_tables_are_found(path: Path) -> None:
    with attacker(path) as conn:
        conn.execute(
            "UPDATE charges SET amount = '0.05' WHERE rowid = "
            "(SELECT min(rowid) FROM charges WHERE state = 'committed' AND kind = 'charge')"
        )
    problems = restore_triggers_view(verify(path))
    assert any("its amount is 0.05 in the ledger; the audit log records" in p for p in problems)
    assert any("sum of its charges" in p for p in problems)


def test_tampered_release_bytes_are_found_and_never_served(path: Path, engine: Engine) -> None:
    with attacker(path) as conn:
        release_id, blob = conn.execute("SELECT release_id, bytes FROM releases LIMIT 1").fetchone()
        data = bytearray(blob)
        data[len(data) // 2] ^= 0x01
        conn.execute(
            "UPDATE releases SET bytes = ? WHERE release_id = ?", (bytes(data), release_id)
        )
    problems = restore_triggers_view(verify(path))
    assert any(f"release {release_id}: its stored bytes do not match" in p for p in problems)
    with open_ledger(path) as ledger, pytest.raises(LedgerIntegrityError):
        engine.release(
            Query(Count(), by=("gender",)),
            loss=PrivacyLoss.pure("0.1"),
            charger=ledger,
            client="alice",
            request_id="a1",
        )


def test_the_ledger_refuses_to_open_on_a_broken_tail(path: Path) -> None:
    total = entry_count(path)
    with attacker(path) as conn:
        conn.execute("DELETE FROM audit WHERE seq = ?", (total,))
    with pytest.raises(LedgerIntegrityError, match="verify"):
        open_ledger(path)


def test_removed_guard_triggers_are_reported(path: Path) -> None:
    with attacker(path):
        pass
    result = verify(path)
    assert not result.ok
    assert all("guard trigger" in p for p in result.problems)


def test_each_guard_trigger_dropped_on_its_own_is_reported(path: Path) -> None:
    """Every trigger the ledger makes, dropped alone with the others left in place, is named."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        triggers = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
        assert triggers
        for name, sql in triggers.items():
            conn.execute(f"DROP TRIGGER {name}")
            assert verify(path).problems == (f"the guard trigger {name} has been removed",)
            conn.execute(sql)
    finally:
        conn.close()
    assert verify(path).ok


def test_a_guard_trigger_replaced_by_a_no_op_of_its_name_is_reported(path: Path) -> None:
    """Each guard trigger swapped for one of the same name that guards nothing: the log can then
    be rewritten with no trigger missing, so the name alone proves nothing. Each is named, and
    a trigger the ledger never makes is reported too."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        triggers = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
        assert len(triggers) == 6
        for name, sql in triggers.items():
            table = sql.split(" ON ")[1].split()[0]
            conn.execute(f"DROP TRIGGER {name}")
            conn.execute(f"CREATE TRIGGER {name} BEFORE UPDATE ON {table} BEGIN SELECT 1; END")
            assert verify(path).problems == (
                f"the guard trigger {name} has been replaced by one that reads otherwise",
            )
            conn.execute(f"DROP TRIGGER {name}")
            conn.execute(sql)
        assert verify(path).ok
        conn.execute(
            "CREATE TRIGGER audit_rewrite AFTER INSERT ON charges BEGIN "
            "UPDATE charges SET amount = '0' WHERE charge_id = NEW.charge_id; END"
        )
        assert verify(path).problems == (
            "a trigger the ledger never makes has been added: 'audit_rewrite'",
        )
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("UPDATE audit SET entry = entry WHERE seq = 1", "the audit log is append-only"),
        ("DELETE FROM audit WHERE seq = 1", "the audit log is append-only"),
        ("UPDATE releases SET loss = '0.01'", "stored releases are immutable"),
        ("DELETE FROM releases", "stored releases are immutable"),
        ("DELETE FROM charges WHERE state = 'cancelled'", "charges are never deleted"),
        ("UPDATE charges SET state = 'reserved' WHERE state = 'cancelled'", "settled once"),
        ("UPDATE charges SET amount = '0.01' WHERE state = 'committed'", "settled once"),
    ],
)
def test_the_guard_triggers_refuse_to_rewrite_the_log_a_release_or_a_settled_charge(
    path: Path, statement: str, refusal: str
) -> None:
    """Someone who writes to the file with SQLite, not through the ledger, meets the triggers
    first (dropping them is what `verify` reports)."""
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match=refusal):
            conn.execute(statement)
    finally:
        conn.close()
    assert verify(path).ok


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("amount", "'0.01'"),
        ("client", "'bob'"),
        ("institution", "NULL"),
        ("data_version", "'v2'"),
        ("fingerprint", "'" + "f" * 64 + "'"),
        ("request_id", "'a9'"),
        ("kind", "'replay'"),
    ],
)
def test_a_held_charge_settles_only_as_it_was_reserved(
    path: Path, engine: Engine, column: str, value: str
) -> None:
    """A hold taken for a running query may be settled, but not settled as another charge: what
    it charges, to whom, on which data, for which query and request stay as reserved."""
    with open_ledger(path) as ledger:
        held = ledger.reserve(
            engine.plan(Query(Count()), loss=PrivacyLoss.pure("0.1")),
            client="alice",
            request_id="a5",
        )
        conn = sqlite3.connect(path)
        try:
            with pytest.raises(sqlite3.IntegrityError, match="settled once"):
                conn.execute(
                    f"UPDATE charges SET state = 'committed', {column} = {value} "
                    "WHERE state = 'reserved'"
                )
        finally:
            conn.close()
        held.cancel()
    assert verify(path).ok


def test_the_verify_command_names_the_first_broken_entry(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with attacker(path) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 6")
    assert ledger_cli(["ledger", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "entry 6" in out and "missing" in out
    assert ledger_cli(["ledger", "verify", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["first_bad_seq"] == 6


# ---- the auditor's tables and report of a tampered ledger ----


@contextmanager
def forger(path: Path) -> Iterator[sqlite3.Connection]:
    """An attacker who puts the guard triggers back: their removal gives nothing away."""
    conn = sqlite3.connect(path)
    triggers = [r[0] for r in conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'")]
    conn.close()
    with attacker(path) as conn:
        yield conn
        for sql in triggers:
            conn.execute(sql)


def audit_cli(path: Path, out: Path, *extra: str) -> tuple[int, int]:
    """`veil audit tables` and `veil audit report` of the ledger: their exit statuses."""
    import veil_cli

    tables = veil_cli.main(["audit", "tables", str(path), "--out", str(out / "t"), *extra])
    report = veil_cli.main(["audit", "report", str(path), "--out", str(out / "r.html"), *extra])
    return tables, report


@pytest.mark.parametrize(
    ("blob", "found"),
    [
        ("zeroblob_hash_recorded", "cannot be read as a release"),
        ("flipped_hash_kept", "do not match the hash recorded for them"),
    ],
)
def test_a_corrupted_release_is_reported_failed_not_a_crash(
    path: Path, tmp_path: Path, blob: str, found: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    with forger(path) as conn:
        release_id, data = conn.execute(
            "SELECT release_id, bytes FROM releases ORDER BY rowid LIMIT 1"
        ).fetchone()
        if blob == "zeroblob_hash_recorded":  # the forger records the new bytes' hash too
            data = bytes(10)
            digest = hashlib.sha256(data).hexdigest()
            conn.execute(
                "UPDATE releases SET bytes = ?, sha256 = ? WHERE release_id = ?",
                (data, digest, release_id),
            )
        else:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x01
            conn.execute(
                "UPDATE releases SET bytes = ? WHERE release_id = ?", (bytes(data), release_id)
            )
    assert audit_cli(path, tmp_path) == (1, 1)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nothing was released" not in err
    with (tmp_path / "t" / "releases.csv").open() as handle:
        rows = {r["release_id"]: r for r in csv.DictReader(handle)}
    assert len(rows) == 3
    problem = rows[release_id]["problem"]
    assert found in problem and "nothing was released" not in problem
    assert rows[release_id]["mechanism"] == ""
    assert all(r["problem"] == "" for i, r in rows.items() if i != release_id)
    with (tmp_path / "t" / "verification.csv").open() as handle:
        (verification,) = csv.DictReader(handle)
    assert verification["ok"] == "false" and f"release {release_id}" in verification["problems"]
    page = (tmp_path / "r.html").read_text()
    assert "class='banner bad'" in page and "verification FAILED" in page
    assert f"release {release_id}: its stored bytes" in page
    assert "<b>1</b>releases altered or unreadable" in page
    assert "<tr class='flag'>" in page
    # Asked for the releases alone (no verification table): still found, still exit 1.
    import veil_cli

    alone = ["audit", "tables", str(path), "--out", str(tmp_path / "alone"), "--table", "releases"]
    assert veil_cli.main(alone) == 1
    assert "1 stored release(s) altered or unreadable" in capsys.readouterr().out


def test_an_amount_the_ledger_never_writes_is_reported_failed_not_a_crash(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No table can be built from a charge whose amount is not a number: the auditor is told
    that the ledger fails verification, and where, rather than shown a traceback."""
    _, head = forge_column(path, "charges", _ROW["a3"], "amount", "'lots'")
    assert audit_cli(path, tmp_path, "--expect-head", head) == (1, 1)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "ledger verification FAILED" in err and "veil ledger verify" in err
    assert "'lots' is not an amount" in err  # the value named, not a decimal module's class


def test_a_log_rewritten_end_to_end_fails_against_a_pinned_head(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recorded = verify(path)
    head = f"{recorded.head_seq}:{recorded.head_hash}"
    with forger(path) as conn:  # a refusal's reason reworded, every hash after it recomputed
        seq, text = conn.execute(
            "SELECT seq, entry FROM audit WHERE entry LIKE '%\"event\":\"refused\"%' LIMIT 1"
        ).fetchone()
        conn.execute(
            "UPDATE audit SET entry = ? WHERE seq = ?", (text.replace("exceed", "excede"), seq)
        )
        rewrite_from(conn, seq)
    assert verify(path).ok  # nothing inside the ledger can tell
    assert audit_cli(path, tmp_path / "unpinned") == (0, 0)
    assert "Audit head not pinned" in (tmp_path / "unpinned" / "r.html").read_text()
    capsys.readouterr()

    assert audit_cli(path, tmp_path / "pinned", "--expect-head", head) == (1, 1)
    assert "expected head" in capsys.readouterr().out
    page = (tmp_path / "pinned" / "r.html").read_text()
    assert "class='banner bad'" in page and "expected head" in page
    assert f"Audit head pinned to {head}" in page
    summary = json.loads((tmp_path / "pinned" / "t" / "summary.json").read_text())
    assert summary["verified"] == "false" and summary["expected_head"] == head
    # A pinned head is checked even when only other tables are asked for.
    import veil_cli

    argv = ["audit", "tables", str(path), "--table", "budgets", "--expect-head", head]
    assert veil_cli.main([*argv, "--out", str(tmp_path / "budgets")]) == 1
    assert not (tmp_path / "budgets" / "verification.csv").exists()


def test_every_problem_verification_finds_is_in_the_report(path: Path, tmp_path: Path) -> None:
    """The banner states the first problem; every other one is listed under it."""
    _, head = forge_column(path, "charges", _ROW["a3"], "amount", "'0.2'")
    problems = verify(path, expect_head=head).problems
    assert len(problems) > 2, problems
    assert audit_cli(path, tmp_path, "--expect-head", head) == (1, 1)
    page = (tmp_path / "r.html").read_text()
    for problem in problems:
        assert html.escape(problem) in page, problem


def test_a_pinned_head_that_holds_verifies(path: Path, tmp_path: Path) -> None:
    recorded = verify(path)
    head = f"{recorded.head_seq}:{recorded.head_hash.upper()}"  # as typed
    assert audit_cli(path, tmp_path, "--expect-head", head) == (0, 0)
    assert "Audit head pinned to" in (tmp_path / "r.html").read_text()


def test_expect_head_is_refused_with_a_server_or_when_malformed(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import veil_cli

    monkeypatch.setenv("VEIL_TOKEN", "veil_unused")
    head = "3:" + "ab" * 32
    out = str(tmp_path / "r.html")
    argv = ["audit", "report", "--server", "127.0.0.1:1", "--expect-head", head, "--out", out]
    assert veil_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--expect-head needs the ledger file" in err and not Path(out).exists()
    with pytest.raises(SystemExit) as bad:
        veil_cli.main(["audit", "tables", str(path), "--expect-head", "3:abc", "--out", out])
    assert bad.value.code == 2
    assert "is not an audit head" in capsys.readouterr().err


# ---- every column the log or the stored bytes determine is checked ----

# Rows of the `path` ledger, by the request that wrote them.
_ROW = {
    "a1": "client = 'alice' AND request_id = 'a1'",  # committed, alice (institution iom)
    "b1": "client = 'bob' AND request_id = 'b1'",  # a replay of a1's release, free
    "a2": "client = 'alice' AND request_id = 'a2'",  # cancelled
    "a3": "client = 'alice' AND request_id = 'a3'",  # committed
    "a4": "client = 'alice' AND request_id = 'a4'",  # forfeited: committed, no release
}
_RELEASE_OF = {r: f"charge_id = (SELECT charge_id FROM charges WHERE {w})" for r, w in _ROW.items()}
_A1_QUERY = f"SELECT canonical_query FROM charges WHERE {_ROW['a1']}"
_A3_RELEASE = f"SELECT release_id FROM charges WHERE {_ROW['a3']}"


def forge_column(path: Path, table: str, where: str, column: str, value: str) -> tuple[str, str]:
    """Set one column of one row by hand (guard triggers dropped and put back); `value` is SQL.
    Returns the row's id and the head pinned before the edit."""
    recorded = verify(path)
    key = "charge_id" if table == "charges" else "release_id"
    with forger(path) as conn:
        (row_id,) = conn.execute(f"SELECT {key} FROM {table} WHERE {where}").fetchone()
        before = conn.execute(f"SELECT {column} FROM {table} WHERE {key} = ?", (row_id,))
        (old,) = before.fetchone()
        conn.execute(f"UPDATE {table} SET {column} = ({value}) WHERE {key} = ?", (row_id,))
        (new,) = conn.execute(
            f"SELECT {column} FROM {table} WHERE {key} = ?", (row_id,)
        ).fetchone()
        assert new != old, "the edit must change the column"
    return row_id, f"{recorded.head_seq}:{recorded.head_hash}"


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [
        ("b1", "client", "'alice'"),  # a free replay: no total moves
        ("a1", "request_id", "'a9'"),
        ("a1", "fingerprint", "'" + "f" * 64 + "'"),
        ("a3", "canonical_query", _A1_QUERY),
        ("a1", "data_version", "'v2'"),
        ("b1", "institution", "'iom'"),
        ("b1", "requested", "'0.05'"),
        ("a1", "requested", "'0.2'"),
        ("a3", "amount", "'0.2'"),
        ("a3", "kind", "'replay'"),
        ("a2", "state", "'reserved'"),
        ("b1", "release_id", _A3_RELEASE),  # the replay is shown as of another release
        ("a1", "settled_at", "'2020-01-01T00:00:00.000000Z'"),
        ("a2", "reason", "'commit_failed'"),
        ("a1", "reserved_at", "'2020-01-01T00:00:00.000000Z'"),  # charges are dated by entries
        ("a2", "settled_at", "'2020-01-01T00:00:00.000000Z'"),
        ("b1", "reserved_at", "'2020-01-01T00:00:00.000000Z'"),
        ("b1", "settled_at", "'2020-01-01T00:00:00.000000Z'"),
        ("a4", "settled_at", "'2020-01-01T00:00:00.000000Z'"),
        ("a4", "state", "'cancelled'"),  # a forfeit given back: the budget it spent returns
        ("a4", "release_id", _A3_RELEASE),  # shown as if the stopped query had been released
        ("a4", "reason", "NULL"),
        ("a4", "amount", "'0.02'"),
        ("a2", "institution", "'ilo'"),  # a cancelled hold: no total moves
    ],
)
def test_a_hand_edited_charge_column_is_found(
    path: Path, row: str, column: str, value: str
) -> None:
    charge_id, head = forge_column(path, "charges", _ROW[row], column, value)
    result = verify(path, expect_head=head)
    assert not result.ok
    assert any(p.startswith(f"charge {charge_id}: its {column} is ") for p in result.problems), (
        result.problems
    )


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [
        ("a1", "client", "'bob'"),  # moves the release between clients in the auditor's tables
        ("a1", "canonical_query", "'{\"by\":[],\"measure\":\"count\"}'"),
        ("a3", "canonical_query", _A1_QUERY),  # shown as another query
        ("a1", "created_at", "'2020-01-01T00:00:00.000000Z'"),  # back-dated
        ("a1", "fingerprint", "'" + "f" * 64 + "'"),
        ("a1", "data_version", "'v2'"),
        ("a3", "loss", "'0.1'"),
        ("a3", "charge_id", f"SELECT charge_id FROM charges WHERE {_ROW['a2']}"),
        ("a3", "sha256", "'" + "0" * 64 + "'"),
    ],
)
def test_a_hand_edited_release_column_is_found(
    path: Path, row: str, column: str, value: str
) -> None:
    release_id, head = forge_column(path, "releases", _RELEASE_OF[row], column, value)
    result = verify(path, expect_head=head)
    assert not result.ok
    assert any(p.startswith(f"release {release_id}: its {column} is ") for p in result.problems), (
        result.problems
    )


def test_a_release_moved_to_another_client_fails_the_audit_tables(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The auditor's case: a release attributed to another client by hand, triggers put back."""
    release_id, head = forge_column(path, "releases", _RELEASE_OF["a1"], "client", "'bob'")
    assert audit_cli(path, tmp_path, "--expect-head", head) == (1, 1)
    out = capsys.readouterr().out
    assert f"release {release_id}: its client is bob in the ledger" in out


def test_a_field_an_older_entry_did_not_record_is_not_held_against_the_table(
    path: Path,
) -> None:
    """Entries written by older versions may lack a field (null, or no key in `detail`): the
    table's column is then compared with nothing, and the ledger still verifies."""
    with forger(path) as conn:
        rows = conn.execute(
            "SELECT seq, entry FROM audit WHERE entry LIKE '%\"event\":\"reserve\"%' "
            "OR entry LIKE '%\"event\":\"replay\"%' ORDER BY seq"
        ).fetchall()
        for seq, text in rows:
            entry = json.loads(text)
            entry["canonical_query"] = None
            if entry["event"] == "replay":
                entry["detail"] = {"release_loss": entry["detail"]["release_loss"]}
            canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            conn.execute("UPDATE audit SET entry = ? WHERE seq = ?", (canonical, seq))
        rewrite_from(conn, rows[0][0])
    result = verify(path)
    assert result.ok, result.problems


def test_a_forfeit_rewritten_as_a_cancel_is_found(path: Path) -> None:
    """A careful forger turns the forfeit entry into a cancel that gives the charge back, and
    recomputes the chain: the budget movement no longer matches the charges or the totals."""
    with attacker(path) as conn:
        seq, text = conn.execute(
            'SELECT seq, entry FROM audit WHERE entry LIKE \'%"event":"forfeit"%\''
        ).fetchone()
        entry = json.loads(text)
        entry["event"], entry["charge"] = "cancel", "0"
        for item in entry["budget"]:
            item["after"]["spent"] = item["before"]["spent"]
        canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        conn.execute("UPDATE audit SET entry = ? WHERE seq = ?", (canonical, seq))
        rewrite_from(conn, seq)
    problems = restore_triggers_view(verify(path))
    assert any("the totals differ" in p for p in problems), problems
    assert any("its state is committed in the ledger" in p for p in problems), problems


def test_charges_made_before_their_entries_dated_them_are_not_held_to_those_times(
    tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger written by a build that took charges' times from a clock read of their own:
    verify holds a charge to its entries' times only from the open that says it dates them."""
    path = tmp_path / "ledger.sqlite"
    monkeypatch.setattr("engine.ledger.CHARGE_TIMES_FROM_ENTRIES", "unrecorded")
    with open_ledger(path) as ledger:
        ledger.register_client("alice", role="researcher", cap="1")
        engine.release(Query(Count()), loss=PrivacyLoss.pure("0.1"), charger=ledger,
                       client="alice", request_id="old")
    monkeypatch.undo()
    with forger(path) as conn:
        conn.execute("UPDATE charges SET reserved_at = '2020-01-01T00:00:00.000000Z'")
    with open_ledger(path) as ledger:
        engine.release(Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.1"),
                       charger=ledger, client="alice", request_id="new")
    assert verify(path).ok
    with forger(path) as conn:
        conn.execute(
            "UPDATE charges SET reserved_at = '2020-01-01T00:00:00.000000Z' "
            "WHERE request_id = 'new'"
        )
        query = "SELECT charge_id FROM charges WHERE request_id = 'new'"
        (new_id,) = conn.execute(query).fetchone()
    dated = [p for p in verify(path).problems if "reserved_at" in p]
    assert len(dated) == 1 and dated[0].startswith(f"charge {new_id}: its reserved_at is ")


# ---- forgeries that only one check of verify can catch ------------------------------------------


def _canonical(entry: dict[str, object]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(prev: str, text: str) -> str:
    return hashlib.sha256(prev.encode() + text.encode()).hexdigest()


def _first(conn: sqlite3.Connection, event: str) -> tuple[int, str, str]:
    seq, prev, text = conn.execute(
        "SELECT seq, prev_hash, entry FROM audit WHERE entry LIKE ? ORDER BY seq LIMIT 1",
        (f'%"event":"{event}"%',),
    ).fetchone()
    return seq, prev, text


def _redate_with_its_own_hash(conn: sqlite3.Connection, seq: int, prev: str, text: str) -> None:
    """Entry `seq` redated, its hash recomputed over its link, nothing after it rechained."""
    entry = json.loads(text)
    entry["time"] = "2000-01-01T00:00:00Z"
    rewritten = _canonical(entry)
    conn.execute(
        "UPDATE audit SET entry = ?, hash = ? WHERE seq = ?",
        (rewritten, _digest(prev, rewritten), seq),
    )


def test_an_entry_rehashed_but_not_rechained_is_found(path: Path) -> None:
    """A middle entry rewritten with its own hash recomputed: the next entry's link breaks."""
    with forger(path) as conn:
        seq, prev, text = _first(conn, "refused")
        _redate_with_its_own_hash(conn, seq, prev, text)
    result = verify(path)
    assert not result.ok and result.first_bad_seq == seq + 1, result.problems
    assert "does not bind the entry before it" in result.problems[0], result.problems


def test_the_last_entry_rehashed_beside_the_recorded_head_is_found(path: Path) -> None:
    """The last entry rewritten with its own hash, the recorded head left as it was."""
    with forger(path) as conn:
        seq, prev, text = conn.execute(
            "SELECT seq, prev_hash, entry FROM audit ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        _redate_with_its_own_hash(conn, seq, prev, text)
    result = verify(path)
    assert not result.ok and any("head" in p for p in result.problems), result.problems


def test_an_entry_deleted_and_the_rest_renumbered_and_rechained_is_found(path: Path) -> None:
    """Each entry names its own place in the log: renumbering the rows around a deleted refusal
    and recomputing the chain and the head leaves the later entries' own numbers out of place."""
    with forger(path) as conn:
        seq, _, _ = _first(conn, "refused")
        conn.execute("DELETE FROM audit WHERE seq = ?", (seq,))
        later = conn.execute("SELECT seq FROM audit WHERE seq > ? ORDER BY seq", (seq,))
        for (old,) in list(later):
            conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (old - 1, old))
        rewrite_from(conn, seq)
    result = verify(path)
    assert not result.ok and result.first_bad_seq == seq, result.problems
    assert "out of place" in result.problems[0], result.problems


@pytest.mark.parametrize("where", ["state = 'cancelled'", "kind = 'replay'"])
def test_a_charge_the_log_records_deleted_from_the_table_is_found(path: Path, where: str) -> None:
    """A cancelled hold and a free replay move no budget: only the comparison of the log with
    the charges table notices that their rows are gone."""
    with forger(path) as conn:
        assert conn.execute(f"DELETE FROM charges WHERE {where}").rowcount == 1
    result = verify(path)
    assert not result.ok
    assert any("missing from the ledger" in p for p in result.problems), result.problems


def test_a_revoked_client_brought_back_by_a_forged_registration_is_found(path: Path) -> None:
    """A revoked client re-registered by an appended, chained entry (its budget shown as it
    stands) and set active again in the table: verify names the second registration, and the
    ledger will not open to serve the client."""
    with open_ledger(path) as ledger:
        ledger.revoke("bob")
    with forger(path) as conn:
        (last,) = conn.execute("SELECT max(seq) FROM audit").fetchone()
        (text,) = conn.execute(
            "SELECT entry FROM audit WHERE entry LIKE '%\"event\":\"register_client\"%' "
            "AND entry LIKE '%\"client\":\"bob\"%'"
        ).fetchone()
        entry = json.loads(text)
        entry["seq"], entry["time"] = last + 1, "2099-01-01T00:00:00Z"
        spent, held = conn.execute(
            "SELECT spent, held FROM totals WHERE kind = 'client' AND name = 'bob'"
        ).fetchone()
        for item in entry["budget"]:
            item["before"] = item["after"] = {"spent": spent, "held": held}
        conn.execute(
            "INSERT INTO audit (seq, entry, prev_hash, hash) VALUES (?, ?, '', '')",
            (last + 1, _canonical(entry)),
        )
        rewrite_from(conn, last + 1)
        conn.execute(
            "UPDATE clients SET status = 'active', revoked_at = NULL WHERE client_id = 'bob'"
        )
    result = verify(path)
    assert not result.ok
    assert any("client bob is registered a second time" in p for p in result.problems)
    with pytest.raises(LedgerIntegrityError):
        open_ledger(path).close()


def test_a_charge_made_before_the_ledger_was_last_opened_is_held_to_its_entries_times(
    path: Path,
) -> None:
    """Every open says again that charges are dated with their entries: a charge made in an
    earlier session of the server is held to its entries' times all the same."""
    open_ledger(path).close()  # the server started again
    charge_id, head = forge_column(
        path, "charges", _ROW["a1"], "reserved_at", "'2020-01-01T00:00:00.000000Z'"
    )
    result = verify(path, expect_head=head)
    assert any(p.startswith(f"charge {charge_id}: its reserved_at is ") for p in result.problems), (
        result.problems
    )


def test_an_entry_past_the_recorded_head_is_found(path: Path) -> None:
    """An entry at the end of the log, chained to the one before it, with the ledger's recorded
    head left where it was before: the log runs past the head the ledger wrote."""
    with open_ledger(path) as ledger:
        recorded = ledger.verify()
        ledger.audit("auth_denied", None, outcome="refused", detail={"reason": "unknown token"})
    with forger(path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'audit_head'",
            (f"{recorded.head_seq}:{recorded.head_hash}",),
        )
    result = verify(path)
    assert not result.ok and result.first_bad_seq == recorded.head_seq + 1, result.problems
    assert any("entries were added" in p for p in result.problems), result.problems


def test_a_charge_amount_that_is_not_a_number_fails_verification(path: Path) -> None:
    """An amount the tables cannot be summed with stops the reconciliation: that is a failure
    in itself, not a ledger with nothing left to reconcile."""
    _, head = forge_column(path, "charges", _ROW["a3"], "amount", "'lots'")
    result = verify(path, expect_head=head)
    assert not result.ok
    assert any(
        p.startswith("the ledger's tables cannot be reconciled") for p in result.problems
    ), result.problems


def test_a_budget_movement_that_does_not_start_where_the_last_one_ended_is_found(
    path: Path,
) -> None:
    """A reservation's amounts lowered (what it holds kept) and every hash after it recomputed:
    the log still ends at the tables' totals, but it no longer runs on from one movement of
    alice's budget to the next, at the rewritten entry and at the one after it."""
    with forger(path) as conn:
        seq, text = conn.execute(
            "SELECT seq, entry FROM audit WHERE entry LIKE '%\"event\":\"reserve\"%' "
            "AND entry LIKE '%\"request_id\":\"a3\"%'"
        ).fetchone()
        entry = json.loads(text)
        (item,) = [i for i in entry["budget"] if i["scope"] == "client:alice"]
        for side in ("before", "after"):
            spent = parse_amount(item[side]["spent"]) - Fraction(1, 10)
            item[side]["spent"] = format_amount(spent)
        conn.execute("UPDATE audit SET entry = ? WHERE seq = ?", (_canonical(entry), seq))
        rewrite_from(conn, seq)
    problems = verify(path).problems
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"entry {seq}: client:alice starts from a budget")
    assert "client:alice starts from a budget the entries before it do not end at" in problems[1]


def test_a_refund_forged_as_a_stopped_query_at_a_negative_charge_is_found(path: Path) -> None:
    """A forger appends a query stopped at a charge of -0.2 (its reservation and forfeit entries
    chained, its charge row and the totals made to agree): every sum reconciles, and the
    spending it gives back shows only as the negative hold between the two entries."""
    refund = Fraction(-2, 10)
    with forger(path) as conn:
        (last,) = conn.execute("SELECT max(seq) FROM audit").fetchone()
        totals = {
            f"{kind}:{name}": (parse_amount(spent), parse_amount(held))
            for kind, name, spent, held in conn.execute(
                "SELECT kind, name, spent, held FROM totals"
            )
        }
        forged = []
        for number, event in enumerate(("reserve", "forfeit"), start=last + 1):
            (text,) = conn.execute(
                "SELECT entry FROM audit WHERE entry LIKE ? AND entry LIKE ?",
                (f'%"event":"{event}"%', '%"request_id":"a4"%'),
            ).fetchone()
            entry = json.loads(text)
            entry.update(
                seq=number, charge_id="chg_refund", request_id="a9", charge=format_amount(refund)
            )
            for item in entry["budget"]:
                spent, held = totals[item["scope"]]
                if event == "reserve":
                    after = (spent, held + refund)
                else:
                    after = (spent + refund, Fraction(0))
                item["before"] = {"spent": format_amount(spent), "held": format_amount(held)}
                item["after"] = {"spent": format_amount(after[0]), "held": format_amount(after[1])}
                totals[item["scope"]] = after
            conn.execute(
                "INSERT INTO audit (seq, entry, prev_hash, hash) VALUES (?, ?, '', '')",
                (number, _canonical(entry)),
            )
            forged.append(entry)
        rewrite_from(conn, last + 1)
        conn.execute(
            "INSERT INTO charges SELECT 'chg_refund', client, institution, 'a9', kind, "
            "fingerprint, canonical_query, data_version, ?, ?, state, release_id, ?, ?, reason "
            f"FROM charges WHERE {_ROW['a4']}",
            (format_amount(refund), format_amount(refund), forged[0]["time"], forged[1]["time"]),
        )
        for label, (spent, held) in totals.items():
            kind, _, name = label.partition(":")
            conn.execute(
                "UPDATE totals SET spent = ?, held = ? WHERE kind = ? AND name = ?",
                (format_amount(spent), format_amount(held), kind, name),
            )
    problems = verify(path).problems
    assert problems, "the forged refund verifies"
    assert all("records a negative amount" in p for p in problems), problems
    assert f"entry {last + 1}: client:alice records a negative amount" in problems


def test_a_ledger_verified_while_a_query_holds_its_charge_verifies(
    path: Path, engine: Engine
) -> None:
    """An auditor may verify the file while the server runs: a charge held for a query still
    running is in the totals' holds as it is in the charges table."""
    with open_ledger(path) as ledger:
        held = ledger.reserve(
            engine.plan(Query(Count()), loss=PrivacyLoss.pure("0.1")),
            client="alice",
            request_id="a5",
        )
        try:
            result = verify(path)
        finally:
            held.cancel()
    assert result.ok, result.problems


def test_a_release_copied_in_from_another_ledger_is_found(
    path: Path, tmp_path: Path, engine: Engine
) -> None:
    """A release made elsewhere and inserted whole, its row agreeing with its bytes: a replay
    would serve it free, though nothing in this ledger's log made it or charged for it."""
    other = tmp_path / "other.sqlite"
    with open_ledger(other) as ledger:
        ledger.register_client("alice", role="researcher", institution="iom", cap="1")
        engine.release(
            Query(Count(), by=("citizenship",)),
            loss=PrivacyLoss.pure("0.1"),
            charger=ledger,
            client="alice",
            request_id="x1",
        )
    source = sqlite3.connect(other)
    try:
        row = source.execute("SELECT * FROM releases").fetchone()
    finally:
        source.close()
    with forger(path) as conn:
        conn.execute(f"INSERT INTO releases VALUES ({', '.join('?' * len(row))})", row)
    problems = verify(path).problems
    assert f"release {row[0]}: stored without a release entry in the audit log" in problems
    assert f"release {row[0]}: stored without a committed charge" in problems
    # Nor is it served until someone runs verify: the ledger refuses to open for writing.
    with pytest.raises(LedgerIntegrityError, match=rf"release {row[0]}: stored otherwise"):
        open_ledger(path)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("fingerprint", "(SELECT fingerprint FROM charges WHERE " + _ROW["a3"] + ")"),
        ("loss", "'5'"),  # a larger loss: every request for the query at any loss replays it
        ("data_version", "'v2'"),
    ],
)
def test_a_stored_release_moved_to_be_replayed_otherwise_is_refused_on_open(
    path: Path, engine: Engine, column: str, value: str
) -> None:
    """A stored release's row edited so that it answers another query, more losses or another
    data version as a free replay: the ledger opens only if its releases are as the log
    recorded them, and refuses before anything is served."""
    forge_column(path, "releases", _RELEASE_OF["a1"], column, value)
    with pytest.raises(LedgerIntegrityError, match="stored otherwise than the audit log records"):
        open_ledger(path)
    assert not verify(path).ok
