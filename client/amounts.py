"""Exact amounts as the server writes them: privacy losses, charges, caps and budgets.

The server sends every amount as exact text, a decimal ("0.5") or a ratio ("1/3"). The client
reads each into an `Amount`, a Fraction (exact: 0.1 + 0.2 is 0.3; it adds and subtracts with
ints and Fractions, and compares with any number) whose `str()` is the server's text again
("0.867", not "867/1000"). Every public amount the client hands out is one: `Budget`'s, a release's
`charged` and its metadata's `loss`, a dry run's `loss` and `cost`, a listed release's
`charged` and `release_loss`, `BudgetExhausted.remaining`, an administrator's view of a client.
`format_amount` writes one back as the server would (the engine's `format_amount`, which the
client cannot import: it ships without the engine).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any


class Amount(Fraction):
    """An exact amount: a Fraction whose `str()` is its exact decimal text ("0.25"; a ratio such
    as "1/3" only when no decimal is exact), as the server writes it.

    Adding, subtracting, multiplying or dividing it by an int or a Fraction gives an Amount (a
    float operand gives a float, as with any Fraction); it compares with any number."""

    __slots__ = ()

    def __str__(self) -> str:
        return format_amount(self)

    def __repr__(self) -> str:
        return f"Amount({format_amount(self)!r})"

    def __format__(self, spec: str) -> str:
        """`f"{amount}"` and width or alignment alone give the exact text ("0.3", not "3/10":
        Fraction formats itself so from Python 3.13); a float presentation type ("f", "e", "g",
        "%") formats the number."""
        if not spec or spec[-1] not in "eEfFgG%":
            return format(str(self), spec)
        if Fraction.__format__ is not object.__format__:
            return Fraction.__format__(self, spec)  # exact, from Python 3.12
        return format(float(self), spec)


def _exact(name: str) -> Any:
    operation = getattr(Fraction, name)

    def exact(self: Amount, *other: Any) -> Any:
        result = operation(self, *other)
        return Amount(result) if type(result) is Fraction else result

    exact.__name__ = exact.__qualname__ = name
    exact.__doc__ = operation.__doc__
    return exact


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
              "__truediv__", "__rtruediv__", "__neg__", "__pos__", "__abs__"):
    setattr(Amount, _name, _exact(_name))


def parse_amount(text: str | None) -> Amount | None:
    """An exact amount from the server's text ("0.5", "1/3"); None when empty or unreadable."""
    if not text:
        return None
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            return Amount(int(numerator), int(denominator))
        return Amount(Decimal(text))
    except (ValueError, ZeroDivisionError, OverflowError, InvalidOperation):
        return None


def amount(text: str) -> Amount:
    """An exact amount from the server's text ("0.5", "1/3"); 0 for empty."""
    return parse_amount(text) or Amount(0)


def format_amount(value: Fraction) -> str:
    """An exact amount as text: a terminating decimal as a decimal ("0.25"), else a ratio."""
    if value.denominator == 1:
        return str(value.numerator)
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    # Scaled to whole units of its last place: exact at any length, where a Decimal division
    # would round past its context's 28 digits.
    places = max(twos, fives)
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    sign = "-" if value.numerator < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")
