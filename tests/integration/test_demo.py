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
    # ... and each table says so, rather than naming the first run's charge as its own.
    assert "charged epsilon" not in second
    assert second.count("released before at epsilon") == 6


def test_demo_reruns_on_a_ledger_another_build_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.backend import DuckDBBackend
    from engine.codebook import default_codebook
    from engine.demo import RESEARCHER, TABLES
    from engine.engine import Engine
    from engine.ledger import Ledger
    from engine.loss import Accounting, PrivacyLoss
    from engine.query import Count, Query

    assert veil_cli.main(["demo", "--rows", "3000", "--workdir", str(tmp_path)]) == 0
    capsys.readouterr()
    # An older build named its requests by title: the same ids, held for other questions.
    engine = Engine(DuckDBBackend(next(tmp_path.glob("*.duckdb"))), codebook=default_codebook())
    with Ledger.open(
        tmp_path / "ledger.sqlite", accounting=Accounting.PURE_DP, dataset_cap=50,
        dataset=engine.dataset,
    ) as ledger:
        for title, _, epsilon in TABLES:
            engine.release(
                Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.01"), charger=ledger,
                client=RESEARCHER, request_id=f"demo:{title}:{epsilon}",
            )
    assert veil_cli.main(["demo", "--rows", "3000", "--workdir", str(tmp_path)]) == 0
    assert "chain intact" in capsys.readouterr().out


def test_demo_at_another_size_in_the_same_workdir_is_a_new_data_version_not_a_conflict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`veil demo` then `veil demo --rows N` in the same directory: the second run is another
    data version of the one synthetic dataset. Its request ids named the question only, so
    the first table was refused as a request id used on another data version, a traceback.
    It is released and charged afresh; once the budget is spent, a run says so and which
    ledger holds it, with exit status 1."""
    workdir = ["--workdir", str(tmp_path)]
    assert veil_cli.main(["demo", "--rows", "3000", *workdir]) == 0
    capsys.readouterr()
    assert veil_cli.main(["demo", "--rows", "2000", *workdir]) == 0
    second = capsys.readouterr().out
    assert second.count("charged epsilon") == 6 and "released before" not in second
    assert "spent 9, cap 20" in second and "chain intact" in second
    # Each run spends 4.5 of the researcher's 20: the fifth version does not fit.
    for seed in ("1", "2"):
        assert veil_cli.main(["demo", "--rows", "2000", "--seed", seed, *workdir]) == 0
    capsys.readouterr()
    assert veil_cli.main(["demo", "--rows", "2000", "--seed", "3", *workdir]) == 1
    err = capsys.readouterr().err
    assert "would exceed the client budget of demo-researcher" in err
    assert f"The ledger in {tmp_path} keeps the demo's budget" in err and "--workdir" in err
