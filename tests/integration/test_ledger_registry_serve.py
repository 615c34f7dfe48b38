"""`veil serve` refuses to start on a ledger whose client registry was edited outside the ledger
(a revoked client revived with a raised cap), in one line that points to `veil ledger verify`."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from engine.ledger import Ledger
from server.app import build_engine
from server.config import load_config
from tests.conftest import write_database
from tests.server_harness import ROWS

ROOT = Path(__file__).resolve().parents[2]


def test_serve_refuses_a_ledger_with_a_revived_client(tmp_path: Path) -> None:
    write_database(tmp_path / "data.duckdb", ROWS)
    config_path = tmp_path / "veil.toml"
    config_path.write_text(
        'data = "data.duckdb"\nledger = "ledger.sqlite"\n[caps]\ndataset = "5"\n'
        '[server]\nlisten = "127.0.0.1:0"\n'
    )
    config = load_config(config_path)
    engine = build_engine(config)
    with Ledger.open(
        config.ledger,
        accounting=engine.settings.accounting,
        dataset_cap="5",
        dataset=engine.dataset,
        data_version=engine.data_version,
    ) as ledger:
        ledger.register_client("ops", role="admin", cap="0", token_hash="a" * 64)
        ledger.register_client("dave", role="researcher", cap="1", token_hash="d" * 64)
        ledger.revoke("dave", reason="left the project", actor="ops")
    conn = sqlite3.connect(config.ledger)
    with conn:
        conn.execute(
            "UPDATE clients SET status = 'active', revoked_at = NULL, cap = '50' "
            "WHERE client_id = 'dave'"
        )
    conn.close()

    process = subprocess.Popen(
        [sys.executable, "-m", "veil_cli", "serve", "--config", str(config_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # it started serving: stop it, and fail below
            process.kill()
            out, err = process.communicate()
    assert process.returncode == 2, (out, err)
    assert "listening" not in out and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "tables differ from its audit log (client dave: its cap is 50" in line
    assert f"veil ledger verify {config.ledger}" in line
