"""The client registry, the institution caps and the meta rows are what the audit log's
administrative entries set: `verify` replays those entries and names the client, institution or
field a direct edit of the tables changed; the ledger refuses to open for serving on such a
ledger; `veil ledger report` says when the ledger it reports on does not verify."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import LedgerIntegrityError
from engine.ledger import Ledger
from engine.ledger_cli import main as ledger_cli
from engine.ledger_verify import VerifyResult
from engine.loss import Accounting, PrivacyLoss
from engine.query import Count, Query
from tests.conftest import write_database
from tests.unit.test_audit_tamper import attacker, rewrite_from

FIXTURE = Path(__file__).parent.parent / "fixtures" / "ledger-schema-1.sqlite"
ROWS = [{"gender": "Male", "ageBroad": "18--20"}] * 40 + [{"gender": "Female"}] * 25


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_database(tmp_path_factory.mktemp("data") / "d.duckdb", ROWS, data_version="v1")
    return Engine(DuckDBBackend(path), codebook=default_codebook())


def open_ledger(path: Path, *, dataset_cap: str = "5", delta: float = 1e-6) -> Ledger:
    return Ledger.open(
        path,
        accounting=Accounting.PURE_DP,
        dataset_cap=dataset_cap,
        delta=delta,
        dataset="ctdc",
        data_version="v1",
    )


def spend(
    engine: Engine, ledger: Ledger, client: str, request_id: str, eps: str, by: str = "gender"
) -> None:
    engine.release(
        Query(Count(), by=(by,)),
        loss=PrivacyLoss.pure(eps),
        charger=ledger,
        client=client,
        request_id=request_id,
    )


@pytest.fixture
def path(tmp_path: Path, engine: Engine) -> Path:
    """A closed ledger with every kind of administrative change; dave has been revoked."""
    path = tmp_path / "ledger.sqlite"
    with open_ledger(path) as ledger:
        ledger.register_client(
            "alice",
            role="researcher",
            institution="iom",
            cap="1",
            token_hash="a" * 64,
            token_expires_at=datetime(2030, 1, 1, tzinfo=UTC),
            actor="root",
        )
        ledger.register_client("dave", role="researcher", cap="1", token_hash="d" * 64)
        ledger.register_client("erin", role="auditor", cap="0", token_hash="e" * 64)
        ledger.set_institution_cap("iom", "2")
        ledger.set_institution_cap("ilo", "3")
        ledger.set_institution_cap("ilo", None)
        ledger.set_cap("alice", "1.5")
        ledger.set_cap("dave", "1.5")
        ledger.set_token_hash(
            "alice", "b" * 64, expires_at=datetime(2031, 1, 1, tzinfo=UTC), actor="root"
        )
        ledger.set_token_hash("erin", None)
        spend(engine, ledger, "dave", "d1", "0.25")
        ledger.revoke("dave", reason="left the project")
        ledger.set_dataset_cap("4")
    with open_ledger(path, dataset_cap="4.5", delta=1e-7):  # changes made at open
        pass
    return path


def verify(path: Path) -> VerifyResult:
    with Ledger.open_readonly(path) as ledger:
        return ledger.verify()


@contextmanager
def edited(path: Path) -> Iterator[sqlite3.Connection]:
    """What `sqlite3 ledger.sqlite "UPDATE ..."` does: no trigger guards these tables."""
    conn = sqlite3.connect(path)
    try:
        yield conn
        conn.commit()
    finally:
        conn.close()


def test_a_ledger_of_every_administrative_change_verifies_and_opens(path: Path) -> None:
    result = verify(path)
    assert result.ok, result.problems
    assert "registry" in result.message
    open_ledger(path, dataset_cap="4.5").close()


def test_the_log_records_a_digest_of_each_token_hash(path: Path) -> None:
    with Ledger.open_readonly(path) as ledger:
        entries = [
            e.entry
            for e in ledger.audit_log()
            if e.entry["event"] in {"register_client", "set_token"}
        ]
    digest = {c: hashlib.sha256(c.encode()).hexdigest() for c in ("a" * 64, "b" * 64)}
    assert [(e["client"], e["detail"]["token_digest"]) for e in entries] == [
        ("alice", digest["a" * 64]),
        ("dave", hashlib.sha256(b"d" * 64).hexdigest()),
        ("erin", hashlib.sha256(b"e" * 64).hexdigest()),
        ("alice", digest["b" * 64]),
        ("erin", None),
    ]
    assert "a" * 64 not in json.dumps(entries)  # the hash itself stays out of the log


# Each edit, and the problem verify states for it.
EDITS = {
    "revived": (
        "UPDATE clients SET status = 'active', revoked_at = NULL, cap = '50' "
        "WHERE client_id = 'dave'",
        "client dave: its status is active in the registry; the audit log records revoked",
    ),
    "cap": (
        "UPDATE clients SET cap = '50' WHERE client_id = 'alice'",
        "client alice: its cap is 50 in the registry; the audit log records 1.5",
    ),
    "role": (
        "UPDATE clients SET role = 'admin' WHERE client_id = 'erin'",
        "client erin: its role is admin in the registry; the audit log records auditor",
    ),
    "institution": (
        "UPDATE clients SET institution = NULL WHERE client_id = 'alice'",
        "client alice: its institution is none in the registry; the audit log records iom",
    ),
    "token_swapped": (
        f"UPDATE clients SET token_hash = '{'f' * 64}' WHERE client_id = 'alice'",
        "client alice: its token hash is not the one logged",
    ),
    "token_given": (
        f"UPDATE clients SET token_hash = '{'f' * 64}' WHERE client_id = 'erin'",
        "client erin: its token hash is not the one logged",
    ),
    "token_expiry": (
        "UPDATE clients SET token_expires_at = NULL WHERE client_id = 'alice'",
        "client alice: its token_expires_at is none in the registry; the audit log records "
        "2031-01-01T00:00:00.000000Z",
    ),
    "revoked_at": (
        "UPDATE clients SET revoked_at = NULL WHERE client_id = 'dave'",
        "client dave: its revoked_at does not match its status",
    ),
    "client_added": (
        "INSERT INTO clients (client_id, role, institution, cap, token_hash, status, created_at) "
        "SELECT 'mallory', 'admin', NULL, '5', 'c' || substr(token_hash, 2), 'active', "
        "created_at FROM clients WHERE client_id = 'alice'",
        "client mallory: in the registry but never registered in the log",
    ),
    "client_removed": (
        "DELETE FROM clients WHERE client_id = 'erin'",
        "client erin: registered in the log but not in the registry",
    ),
    "institution_cap": (
        "UPDATE institutions SET cap = '20' WHERE institution = 'iom'",
        "institution iom: its cap is 20 in the registry; the audit log records 2",
    ),
    "institution_uncapped": (
        "DELETE FROM institutions WHERE institution = 'iom'",
        "institution iom: its cap is none in the registry; the audit log records 2",
    ),
    "institution_capped": (
        "INSERT INTO institutions (institution, cap) VALUES ('ilo', '9')",
        "institution ilo: its cap is 9 in the registry; the audit log records none",
    ),
    "unreadable_cap": (
        "UPDATE clients SET cap = 'lots' WHERE client_id = 'alice'",
        "client alice: its cap is lots in the registry; the audit log records 1.5",
    ),
    "dataset_cap": (
        "UPDATE meta SET value = '99' WHERE key = 'dataset_cap'",
        "meta dataset_cap: 99 in the ledger; the audit log records 4.5",
    ),
    "delta": (
        "UPDATE meta SET value = '0.1' WHERE key = 'delta'",
        "meta delta: 0.1 in the ledger; the audit log records 1e-07",
    ),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_edited_registry_fails_verification_and_is_not_served(
    path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    statement, problem = EDITS[name]
    with edited(path) as conn:
        conn.execute(statement)
    result = verify(path)
    assert not result.ok
    assert problem in result.problems, result.problems
    assert ledger_cli(["ledger", "verify", str(path)]) == 1
    assert problem in capsys.readouterr().out
    with pytest.raises(LedgerIntegrityError, match=r"tables differ .*veil ledger verify") as e:
        open_ledger(path, dataset_cap="4.5")
    assert problem.split(":")[0] in str(e.value)  # the client, institution or meta row


def test_a_ledger_switched_to_another_accounting_fails_verification_and_is_not_served(
    path: Path,
) -> None:
    """Every amount in the ledger is read in its accounting: its meta row switched from pure DP
    to zCDP would have each epsilon read as a rho. The log's create entry records which it is,
    and a server configured for zCDP does not serve from the edited file."""
    with edited(path) as conn:
        conn.execute("UPDATE meta SET value = 'zcdp' WHERE key = 'accounting'")
    problem = "meta accounting: zcdp in the ledger; the audit log records pure_dp"
    assert problem in verify(path).problems
    with pytest.raises(LedgerIntegrityError, match="meta accounting"):
        Ledger.open(
            path,
            accounting=Accounting.ZCDP,
            dataset_cap="4.5",
            delta=1e-7,
            dataset="ctdc",
            data_version="v1",
        )


def test_a_revived_client_is_refused_by_the_server_ledger(path: Path) -> None:
    """The auditor's case: dave, revoked, revived with a raised cap; a server would serve him."""
    with edited(path) as conn:
        conn.execute(EDITS["revived"][0])
    with pytest.raises(LedgerIntegrityError) as refused:
        open_ledger(path, dataset_cap="4.5")
    assert "client dave" in str(refused.value)


def test_a_registry_changed_and_put_back_leaves_its_mark(engine: Engine, path: Path) -> None:
    """A cap raised and a client revived long enough to spend, then restored: the entries written
    meanwhile carry caps and a spender the administrative entries never allowed."""
    with edited(path) as conn:
        conn.execute("UPDATE clients SET cap = '3' WHERE client_id = 'alice'")
        conn.execute(EDITS["revived"][0])
    # A ledger opened by an older build, which did not compare the registry with the log.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Ledger, "_check_against_log", lambda self, conn: None)
        with open_ledger(path, dataset_cap="4.5") as ledger:
            spend(engine, ledger, "alice", "a1", "1.75")
            spend(engine, ledger, "dave", "d2", "0.5", by="ageBroad")
    with edited(path) as conn:
        conn.execute("UPDATE clients SET cap = '1.5' WHERE client_id = 'alice'")
        conn.execute(
            "UPDATE clients SET status = 'revoked', revoked_at = created_at, cap = '1.5' "
            "WHERE client_id = 'dave'"
        )
    problems = verify(path).problems
    assert any(
        "client:alice records a cap of 3; the administrative entries before it set 1.5" in p
        for p in problems
    ), problems
    assert any(
        "a reserve for client dave, whom the audit log records as revoked" in p for p in problems
    ), problems
    assert any(
        "a release for client dave, whom the audit log records as revoked" in p for p in problems
    ), problems
    assert not any(p.startswith("client ") for p in problems)  # the tables are as logged


def test_an_administrative_entry_edited_with_the_table_is_refused_on_open(path: Path) -> None:
    with attacker(path) as conn:
        seq, text = conn.execute(
            'SELECT seq, entry FROM audit WHERE entry LIKE \'%"event":"set_cap"%\''
        ).fetchone()
        assert '"client":"alice"' in text and '"cap":"1.5"' in text
        conn.execute(
            "UPDATE audit SET entry = ? WHERE seq = ?", (text.replace('"1.5"', '"50"'), seq)
        )
        conn.execute(EDITS["cap"][0])
    with pytest.raises(LedgerIntegrityError, match=f"entry {seq} has been altered"):
        open_ledger(path, dataset_cap="4.5")


def test_an_unreadable_entry_elsewhere_is_refused_not_a_crash(path: Path) -> None:
    """The check on open walks the whole chain but parses administrative entries only: a
    damaged other entry is refused as such, not a database error at start."""
    with attacker(path) as conn:
        seq = conn.execute(
            'SELECT seq FROM audit WHERE entry LIKE \'%"event":"reserve"%\''
        ).fetchone()[0]
        conn.execute("UPDATE audit SET entry = 'not json' WHERE seq = ?", (seq,))
    with pytest.raises(LedgerIntegrityError, match=f"entry {seq} has been altered"):
        open_ledger(path, dataset_cap="4.5")
    assert f"entry {seq}: has been altered" in verify(path).problems[0]


def test_entries_rehashed_on_their_own_are_refused_on_open(path: Path) -> None:
    """dave's revocation turned into another event and his registered cap raised, each entry's
    own hash recomputed but not the chain after it, and the table edited to match: the entries
    no longer bind the ones after them, and the server does not serve from the file."""
    with attacker(path) as conn:

        def rehash(seq: int, entry: dict[str, object]) -> None:
            text = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            prev = conn.execute("SELECT prev_hash FROM audit WHERE seq = ?", (seq,)).fetchone()
            digest = hashlib.sha256(prev[0].encode() + text.encode()).hexdigest()
            conn.execute("UPDATE audit SET entry = ?, hash = ? WHERE seq = ?", (text, digest, seq))

        for seq, text in conn.execute("SELECT seq, entry FROM audit").fetchall():
            entry = json.loads(text)
            if entry["client"] == "dave" and entry["event"] == "revoke":
                rehash(seq, {**entry, "event": "audit_note"})
            if entry["client"] == "dave" and entry["event"] == "register_client":
                entry["budget"][0]["cap"] = "100"
                rehash(seq, entry)
        conn.execute(
            "UPDATE clients SET status = 'active', revoked_at = NULL, cap = '100' "
            "WHERE client_id = 'dave'"
        )
    with pytest.raises(LedgerIntegrityError, match="unbound from the chain"):
        open_ledger(path, dataset_cap="4.5")
    assert not verify(path).ok


def test_a_forger_who_rewrites_the_log_to_match_is_caught_by_the_spending_entries(
    path: Path,
) -> None:
    """Raising dave's cap in the log as well as in the table, hashes recomputed, makes the two
    agree, but his spending after it still records the cap the true entry set."""
    with attacker(path) as conn:
        seq, text = conn.execute(
            'SELECT seq, entry FROM audit WHERE entry LIKE \'%"event":"set_cap"%\' '
            'AND entry LIKE \'%"client":"dave"%\''
        ).fetchone()
        entry = json.loads(text)
        entry["budget"][0]["cap"] = "50"
        conn.execute(
            "UPDATE audit SET entry = ? WHERE seq = ?",
            (json.dumps(entry, sort_keys=True, separators=(",", ":")), seq),
        )
        rewrite_from(conn, seq)
        conn.execute("UPDATE clients SET cap = '50' WHERE client_id = 'dave'")
    problems = verify(path).problems
    assert any(
        "client:dave records a cap of 1.5; the administrative entries before it set 50" in p
        for p in problems
    ), problems


def test_a_malformed_administrative_entry_is_reported_not_a_crash(path: Path) -> None:
    with attacker(path) as conn:
        seq, text = conn.execute(
            "SELECT seq, entry FROM audit WHERE entry LIKE '%\"event\":\"set_token\"%'"
        ).fetchone()
        entry = json.loads(text)
        entry["detail"] = "rotated"
        conn.execute(
            "UPDATE audit SET entry = ? WHERE seq = ?",
            (json.dumps(entry, sort_keys=True, separators=(",", ":")), seq),
        )
        rewrite_from(conn, seq)
    assert f"entry {seq}: its set_token record is unreadable" in verify(path).problems
    with pytest.raises(LedgerIntegrityError, match=f"entry {seq}: its set_token record"):
        open_ledger(path)


# ---- ledgers written before the log recorded token digests ----------------------------------


@pytest.fixture
def upgraded(tmp_path: Path) -> Path:
    """The schema-1 fixture, upgraded on open (see test_ledger_upgrade.py)."""
    path = tmp_path / "old.sqlite"
    shutil.copyfile(FIXTURE, path)
    with Ledger.open(
        path, accounting=Accounting.PURE_DP, dataset_cap="1", dataset="ctdc", data_version="v3"
    ) as ledger:
        assert ledger.verify().ok
    return path


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        (
            "UPDATE clients SET cap = '9' WHERE client_id = 'bob'",
            "client bob: its cap is 9 in the registry; the audit log records 2",
        ),
        (
            "UPDATE clients SET institution = 'iom' WHERE client_id = 'bob'",
            "client bob: its institution is iom in the registry; the audit log records none",
        ),
        (
            f"UPDATE clients SET token_hash = '{'f' * 64}' WHERE client_id = 'bob'",
            "client bob: its token hash is not the one logged",
        ),
        (
            "UPDATE meta SET value = '0.5' WHERE key = 'dataset_cap'",
            "meta dataset_cap: 0.5 in the ledger; the audit log records 1",
        ),
        (
            "UPDATE meta SET value = 'other' WHERE key = 'dataset'",
            "meta dataset: other in the ledger; the audit log records ctdc",
        ),
    ],
)
def test_an_upgraded_schema_1_ledgers_registry_is_checked(
    upgraded: Path, statement: str, problem: str
) -> None:
    with edited(upgraded) as conn:
        conn.execute(statement)
    assert problem in verify(upgraded).problems


def test_a_token_registered_before_digests_is_checked_for_presence_only(path: Path) -> None:
    """An entry that says only that a token was set (as every entry did before `token_digest`)
    cannot tell one hash from another: a cleared hash is found, a swapped one is not."""
    with attacker(path) as conn:
        seq, text = conn.execute(
            'SELECT seq, entry FROM audit WHERE entry LIKE \'%"event":"register_client"%\' '
            'AND entry LIKE \'%"client":"dave"%\''
        ).fetchone()
        entry = json.loads(text)
        del entry["detail"]["token_digest"]
        conn.execute(
            "UPDATE audit SET entry = ? WHERE seq = ?",
            (json.dumps(entry, sort_keys=True, separators=(",", ":")), seq),
        )
        rewrite_from(conn, seq)
    with edited(path) as conn:
        conn.execute(f"UPDATE clients SET token_hash = '{'f' * 64}' WHERE client_id = 'dave'")
    assert not any("client dave" in p for p in verify(path).problems)
    with edited(path) as conn:
        conn.execute("UPDATE clients SET token_hash = NULL WHERE client_id = 'dave'")
    assert "client dave: its token hash is not the one logged" in verify(path).problems


# ---- the report ----------------------------------------------------------------------------


def test_the_report_of_a_ledger_that_verifies_says_so(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ledger_cli(["ledger", "report", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ledger verified: ") and captured.err == ""
    assert ledger_cli(["ledger", "report", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["ok"] is True


def test_the_report_of_a_tampered_ledger_warns_and_fails(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with edited(path) as conn:
        conn.execute(EDITS["revived"][0])
    assert ledger_cli(["ledger", "report", str(path)]) == 1
    captured = capsys.readouterr()
    first, rest = captured.out.split("\n", 1)
    assert first.startswith("ledger verification FAILED: client dave")
    assert "dave" in rest  # the totals are still printed, under the warning
    assert "does not verify" in captured.err and f"veil ledger verify {path}" in captured.err
    assert ledger_cli(["ledger", "report", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["verification"]["ok"] is False
    assert any("client dave" in p for p in data["verification"]["problems"])


def test_the_report_can_skip_the_verification_and_says_it_did(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with edited(path) as conn:
        conn.execute(EDITS["revived"][0])
    assert ledger_cli(["ledger", "report", str(path), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"not verified: run `veil ledger verify {path}`")
    assert ledger_cli(["ledger", "report", str(path), "--no-verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"] is None
