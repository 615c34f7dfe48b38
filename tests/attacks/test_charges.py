"""What an attack was charged, against the loss its bound is computed from.

A repeat of a query already released is answered with the stored release, free. The attacker
then holds a release made at its loss, and the bound must count it; but the client was charged
nothing for it, and the charge an attack reports must add up to what the ledger booked.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

from engine.loss import parse_amount
from engine.query import Count, Query
from tests.attacks.conftest import Attacker


def _spent(attacker: Attacker) -> Fraction:
    return parse_amount(attacker.target.budget().spent or "0")


def test_the_wire_tallies_what_the_server_charged(attack: Callable[..., Attacker]) -> None:
    attacker = attack()
    query = Query(Count(), by=("gender",))
    first = attacker.target.release(query, loss="0.5")
    again = attacker.target.release(query, loss="0.25")  # a stored release at 0.5 serves it
    assert (first.charged, first.loss, first.replayed) == ("0.5", "0.5", False)
    assert (again.charged, again.loss, again.replayed) == ("0", "0.5", True)
    assert attacker.target.charged == Fraction(1, 2) == _spent(attacker)
    assert attacker.target.replays == 1
