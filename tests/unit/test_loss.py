"""Exact privacy losses: the unit names and the (epsilon, delta) equivalent of a loss."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from engine.errors import InvalidLossError
from engine.loss import Accounting, PrivacyLoss, epsilon_equivalent, exact_cap


def test_each_accounting_names_its_unit() -> None:
    assert Accounting.PURE_DP.unit == "epsilon"
    assert Accounting.ZCDP.unit == "rho"
    assert str(PrivacyLoss.zcdp("0.5")) == "rho=0.5"


def test_epsilon_equivalent() -> None:
    assert epsilon_equivalent(Accounting.PURE_DP, Fraction(1, 10), 1e-6) == 0.1
    rho = 0.02
    expected = rho + 2 * math.sqrt(rho * math.log(1e6))
    assert epsilon_equivalent(Accounting.ZCDP, Fraction(2, 100), 1e-6) == pytest.approx(expected)
    assert epsilon_equivalent(Accounting.ZCDP, rho, 1e-6) == pytest.approx(expected)
    assert epsilon_equivalent(Accounting.ZCDP, Fraction(0), 1e-6) == 0.0


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-6, 2.0])
def test_epsilon_equivalent_refuses_a_delta_outside_zero_one(delta: float) -> None:
    with pytest.raises(InvalidLossError, match="delta"):
        epsilon_equivalent(Accounting.ZCDP, Fraction(1, 10), delta)


@pytest.mark.parametrize("zero", [0, 0.0, Fraction(0), "0", "0.000", " 0 "])
def test_a_cap_may_be_zero(zero: int | float | str | Fraction) -> None:
    assert exact_cap(zero) == 0


@pytest.mark.parametrize("value", [True, False, "-1", "NaN", "", "1e9"])
def test_a_cap_is_otherwise_a_valid_amount(value: bool | str) -> None:
    with pytest.raises(InvalidLossError):
        exact_cap(value)
    assert exact_cap("0.5", what="client cap") == Fraction(1, 2)


@pytest.mark.parametrize("negative", ["-1", " -0.5 ", -2, -0.25, Fraction(-1, 3)])
def test_a_negative_cap_is_refused_as_below_zero_not_as_short_of_positive(
    negative: str | int | float | Fraction,
) -> None:
    # "must be positive" would tell an administrator that 0 is refused too, which it is not.
    with pytest.raises(InvalidLossError, match="client cap must be zero or positive"):
        exact_cap(negative, what="client cap")


def test_amounts_are_written_exactly_at_any_length_and_as_the_client_writes_them() -> None:
    import random

    from client.amounts import format_amount as client_format
    from engine.loss import format_amount, parse_amount

    # 30 decimal places: a Decimal division would round it at 28 significant digits, and the
    # charge written would not be the hold it settles.
    long = Fraction("0.123456789012345678901234567891")
    assert format_amount(long) == "0.123456789012345678901234567891"
    rng = random.Random(7)
    amounts = [long, Fraction(-3, 8), Fraction(1, 3), Fraction(7), Fraction(0), Fraction(1, 10**40)]
    amounts += [
        Fraction(rng.randrange(-10**40, 10**40), 2 ** rng.randrange(80) * 5 ** rng.randrange(80))
        for _ in range(300)
    ]
    for amount in amounts:
        text = format_amount(amount)
        assert parse_amount(text) == amount, text
        assert text == client_format(amount), amount


@pytest.mark.parametrize("stored", ["lots", "1/0", "1/2/3", "a/b", "NaN", "Infinity", "", None, 5])
def test_a_stored_value_that_is_not_an_amount_is_named_as_such(stored: object) -> None:
    """The ledger reads amounts back with parse_amount; one edited by hand must fail as a value
    error that names it (the ledger turns that into an integrity error), never as a bare
    decimal or zero-division error, nor be read as some number."""
    from engine.loss import parse_amount

    with pytest.raises(ValueError, match="is not an amount") as raised:
        parse_amount(stored)  # type: ignore[arg-type]
    assert repr(stored)[:10] in str(raised.value)
