"""A ledger restored from an older backup gives back every budget spent since: with a head file
kept outside the ledger's directory, the server refuses to serve it."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from engine.errors import LedgerIntegrityError
from engine.loss import PrivacyLoss
from engine.query import Count, Query
from server.accounts import LedgerAccounts
from server.app import build_engine, start
from server.config import ConfigError, load_config
from tests.conftest import write_database
from tests.server_harness import ROWS


def _config(tmp_path: Path, head: str) -> Path:
    (tmp_path / "ledger").mkdir(exist_ok=True)
    (tmp_path / "head").mkdir(exist_ok=True)
    write_database(tmp_path / "data.duckdb", ROWS)
    path = tmp_path / "veil.toml"
    path.write_text(
        f'data = "data.duckdb"\nledger = "ledger/ledger.sqlite"\nhead_file = "{head}"\n'
        '[caps]\ndataset = "5"\n[server]\nlisten = "127.0.0.1:0"\n'
    )
    return path


def test_a_ledger_restored_from_an_older_backup_is_refused(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, "head/veil.head"))
    engine = build_engine(config)

    def serve_and_spend(request: str) -> str:
        accounts = LedgerAccounts.for_config(config, engine)
        running = start(config, engine=engine, accounts=accounts)
        try:
            if "alice" not in {c.client_id for c in accounts.ledger.list_clients()}:
                accounts.ledger.register_client("alice", role="researcher", cap="1")
            engine.release(
                Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.25"),
                charger=accounts.ledger, client="alice", request_id=request,
            )
            return accounts.ledger.head()
        finally:
            running.stop(0)

    serve_and_spend("r1")
    backup = tmp_path / "backup.sqlite"
    with contextlib.closing(sqlite3.connect(config.ledger)) as live, contextlib.closing(
        sqlite3.connect(backup)
    ) as copy:
        live.backup(copy)  # the online backup: the log's transactions included
    head = serve_and_spend("r2")
    # The head file holds the head the server stopped at, as `--expect-head` takes it.
    assert (tmp_path / "head" / "veil.head").read_text().strip().startswith(
        head.split(":")[0] + ":"
    )
    for name in ("ledger.sqlite-wal", "ledger.sqlite-shm"):
        (tmp_path / "ledger" / name).unlink(missing_ok=True)
    backup.replace(config.ledger)
    accounts = LedgerAccounts.for_config(config, engine)
    try:
        assert accounts.ledger.spent("alice") == PrivacyLoss.pure("0.25").amount  # rolled back
        with pytest.raises(LedgerIntegrityError, match=r"does not hold the audit head .* restored"):
            start(config, engine=engine, accounts=accounts)
    finally:
        accounts.close()


def test_the_head_file_must_be_outside_the_ledgers_directory(tmp_path: Path) -> None:
    for inside in ("ledger/veil.head", "ledger/sub/veil.head"):
        (tmp_path / "ledger" / "sub").mkdir(parents=True, exist_ok=True)
        with pytest.raises(ConfigError, match="outside the ledger's directory"):
            load_config(_config(tmp_path, inside))
