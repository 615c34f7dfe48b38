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
