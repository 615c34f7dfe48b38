"""`veil audit` and `veil attack` on the command line, up to the point they call a server."""

from __future__ import annotations

from pathlib import Path

import pytest

import veil_cli


def test_audit_with_neither_a_ledger_nor_a_server_says_one_is_needed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VEIL_SERVER", raising=False)
    status = veil_cli.main(["audit", "report", "--out", str(tmp_path / "x.html")])
    err = capsys.readouterr().err
    assert status == 2
    assert "give a ledger file or --server" in err and "not both" not in err
    assert not (tmp_path / "x.html").exists()


def test_audit_with_both_a_ledger_and_a_server_says_not_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["audit", "tables", str(tmp_path / "l.sqlite"), "--server", "127.0.0.1:1"]
    assert veil_cli.main([*argv, "--out", str(tmp_path / "t")]) == 2
    assert "not both" in capsys.readouterr().err
