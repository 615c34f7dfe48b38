"""The README's main job, `veil demo`, end to end on a small synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

import veil_cli


def test_demo_releases_every_table_charges_once_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert veil_cli.main(["demo", "--rows", "3000", "--workdir", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert first.count("== ") == 7  # six tables and the budget
    assert "charged epsilon" in first and "suppressed" in first
    assert "spent 4.5, cap 20" in first
    assert "chain intact" in first
    # A second run asks the same questions: every answer is replayed, nothing more is spent.
    assert veil_cli.main(["demo", "--rows", "3000", "--workdir", str(tmp_path)]) == 0
    second = capsys.readouterr().out
    assert "spent 4.5, cap 20" in second
    assert "generated" not in second
