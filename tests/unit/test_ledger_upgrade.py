"""A ledger written by schema version 1 (a dataset cap per data version) is upgraded on its first
open for writing: the spending of all its data versions becomes one dataset's, in one audited
step that `verify` replays.

`tests/fixtures/ledger-schema-1.sqlite` was written by the schema-1 ledger: clients alice
(institution iom) and bob; on data version v1, alice paid 0.25 and bob 0.125 (dataset cap 1);
v2 was given a cap of its own, 0.75, alice paid 0.5 on it, and bob's hold of 0.0625 was left
open, as a crash leaves it.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from fractions import Fraction
from pathlib import Path

import pytest

from engine.errors import ClientRegistryError, LedgerUnavailableError
from engine.ledger import Ledger
from engine.loss import Accounting
from tests.unit.test_audit_tamper import attacker, rewrite_from

FIXTURE = Path(__file__).parent.parent / "fixtures" / "ledger-schema-1.sqlite"


@pytest.fixture
def old(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite"
    shutil.copyfile(FIXTURE, path)
    return path


def open_for_writing(path: Path, cap: str = "1") -> Ledger:
    return Ledger.open(
        path, accounting=Accounting.PURE_DP, dataset_cap=cap, dataset="ctdc", data_version="v3"
    )


def schema_of(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return str(row[0])
    finally:
        conn.close()


def test_the_versions_spending_becomes_one_datasets(old: Path) -> None:
    with pytest.raises(LedgerUnavailableError, match=r"schema version '1'.*Start the server"):
        Ledger.open_readonly(old)
    with open_for_writing(old) as ledger:
        report = ledger.report()
        # 0.25 + 0.125 on v1 and 0.5 on v2; bob's abandoned hold is given back after the merge.
        assert (report.dataset.name, report.dataset.spent) == ("ctdc", Fraction(7, 8))
        assert report.dataset.held == 0 and report.dataset.cap == 1
        assert ledger.client_budget("bob").remaining == Fraction(1, 8)
        (upgrade,) = [e.entry for e in ledger.audit_log() if e.entry["event"] == "upgrade"]
        assert upgrade["detail"]["version_caps"] == "v2=0.75"
        moved = {item["scope"]: item["after"] for item in upgrade["budget"]}
        assert moved == {
            "dataset:v1": {"spent": "0", "held": "0"},
            "dataset:v2": {"spent": "0", "held": "0"},
            "dataset:ctdc": {"spent": "0.875", "held": "0.0625"},
        }
        assert ledger.verify().ok, ledger.verify().problems
    assert schema_of(old) == "2"
    with Ledger.open_readonly(old) as reader:
        assert reader.dataset == "ctdc"
        assert reader.verify().ok


def test_an_upgrade_past_the_cap_is_refused_and_changes_nothing(old: Path) -> None:
    before = old.read_bytes()
    with pytest.raises(ClientRegistryError, match=r"used 0\.9375, more than the dataset cap"):
        open_for_writing(old, cap="0.5")
    assert schema_of(old) == "1"
    conn = sqlite3.connect(old)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM dataset_caps").fetchone()[0] == 1
    finally:
        conn.close()
    assert len(old.read_bytes()) == len(before)


def test_an_upgrade_that_drops_spending_is_found(old: Path) -> None:
    """A forger who rewrites the upgrade so that less arrives than left, rehashing the chain and
    lowering the totals to match, is caught by the upgrade's conservation rule."""
    open_for_writing(old).close()
    with attacker(old) as conn:
        seq, text = conn.execute(
            "SELECT seq, entry FROM audit WHERE entry LIKE '%\"event\":\"upgrade\"%'"
        ).fetchone()
        entry = json.loads(text)
        for item in entry["budget"]:
            if item["scope"] == "dataset:ctdc":
                item["after"]["spent"] = "0.375"
        conn.execute(
            "UPDATE audit SET entry = ? WHERE seq = ?",
            (json.dumps(entry, sort_keys=True, separators=(",", ":")), seq),
        )
        rewrite_from(conn, seq)
    with Ledger.open_readonly(old) as ledger:
        result = ledger.verify()
    assert not result.ok
    assert any("the upgrade does not carry every amount over" in p for p in result.problems)
