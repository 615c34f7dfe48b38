"""What an attack was charged, against the loss its bound is computed from.

A repeat of a query already released is answered with the stored release, free. The attacker
then holds a release made at its loss, and the bound must count it; but the client was charged
nothing for it, and the charge an attack reports must add up to what the ledger booked.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest

from audit import attacks
from audit.attacks import Context
from engine.loss import parse_amount
from engine.query import Count, Query
from tests.attacks.conftest import ALPHA, Attacker
from tests.attacks.test_attack_cli import _rows, _veil_attack


def _spent(attacker: Attacker) -> Fraction:
    return parse_amount(attacker.target.budget().spent or "0")


def _amount(text: str) -> Fraction:
    """The amount of "epsilon=0.5" or "0"."""
    return parse_amount(text.rpartition("=")[2])


def test_the_wire_tallies_what_the_server_charged(attack: Callable[..., Attacker]) -> None:
    attacker = attack()
    query = Query(Count(), by=("gender",))
    first = attacker.target.release(query, loss="0.5")
    again = attacker.target.release(query, loss="0.25")  # a stored release at 0.5 serves it
    assert (first.charged, first.loss, first.replayed) == ("0.5", "0.5", False)
    assert (again.charged, again.loss, again.replayed) == ("0", "0.5", True)
    assert attacker.target.charged == Fraction(1, 2) == _spent(attacker)
    assert attacker.target.replays == 1


def test_a_repeated_attack_is_charged_nothing_but_bounded_by_what_it_holds(
    attack: Callable[..., Attacker],
) -> None:
    """The same attack twice, the second time from a fresh context with the same seed: every
    release it asks for exists, so it is served free and the ledger books nothing; its bound
    still counts every release it holds, at the loss each was made at."""
    attacker = attack(cap="1.5")  # suppression 0.5, then 100 subset counts of 0.01
    firsts = [attacks.suppression(attacker.ctx), attacks.reconstruction(attacker.ctx)]
    spent = _spent(attacker)
    assert [r.charged for r in firsts] == ["epsilon=0.5", "epsilon=1"]
    assert spent == Fraction(3, 2)
    again = Context(attacker.target, attacker.ctx.truth, alpha=ALPHA)
    seconds = [attacks.suppression(again), attacks.reconstruction(again)]
    assert _spent(attacker) == spent
    for first, second in zip(firsts, seconds, strict=True):
        assert second.charged == "0", second
        assert second.dp_loss == first.dp_loss and second.bound == first.bound, second
    assert [r.dp_loss for r in seconds] == ["epsilon=0.5", "epsilon=1"]


def test_the_charged_column_adds_up_to_what_the_ledger_booked(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole suite at the default client cap of 1: suppression's release by citizenship is
    the one key_leakage already made, a free replay. The charges listed add up to the ledger's
    spending; the loss each bound is computed from still counts the replay."""
    attacker = attack(cap="1")
    _veil_attack(attacker, monkeypatch, truth=population_file)
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[-3:] == ["loss", "charged", "verdict"]
    rows = _rows(out)
    assert all(row.split()[-1] == "defended" or row.split()[-1] == "stopped"
               for row, _ in rows.values()), out
    # name, success, 95% upper, DP bound, trials, DP loss, charged, verdict
    charged = {name: _amount(row.split()[6]) for name, (row, _) in rows.items()}
    assert sum(charged.values()) == _spent(attacker)
    suppression, detail = rows["suppression"]
    assert charged["suppression"] == 0 and "1 release was a stored one, returned free" in detail
    assert suppression.split()[5] == rows["key_leakage"][0].split()[5] == "epsilon=0.166"


def test_differencing_is_bounded_by_the_losses_of_the_releases_it_holds(
    attack: Callable[..., Attacker],
) -> None:
    """Asked again at a smaller loss, every count is served by the stored release made at the
    larger one: the attacker holds releases at 0.5, so its bound counts 0.5 twice, not 0.25."""
    attacker = attack(cap="50")
    first = attacks.differencing(attacker.ctx, trials=20, loss="0.5")
    again = Context(attacker.target, attacker.ctx.truth, alpha=ALPHA)
    second = attacks.differencing(again, trials=20, loss="0.25")
    assert second.charged == "0", second
    assert second.dp_loss == first.dp_loss == "epsilon=1", second
    assert second.bound == first.bound


def test_reconstruction_without_room_for_one_query_says_what_one_query_needs(
    attack: Callable[..., Attacker],
) -> None:
    attacker = attack(cap="1")
    attacker.ctx.share = Fraction(5, 1000)  # what `run` leaves it after the other attacks
    result = attacks.reconstruction(attacker.ctx)
    assert result.verdict == "not run", result
    assert "need at least epsilon=0.01 (it keeps its loss per query" in result.detail, result
    assert _spent(attacker) == 0
