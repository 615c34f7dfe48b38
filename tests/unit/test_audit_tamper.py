"""The audit log is hash-chained: `verify` finds a flipped byte, a deleted entry, a reordered pair,
and a rewrite that is inconsistent with the ledger's own tables."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import BudgetExceededError, LedgerIntegrityError
from engine.ledger import Ledger, VerifyResult
from engine.ledger_cli import main as ledger_cli
from engine.loss import Accounting, PrivacyLoss
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
    """A closed ledger with every kind of entry: charges, a retry, a replay, refusals, a cancel."""
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
    assert any("reservation has no matching audit entry" in p for p in problems)
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
