"""Exact amounts as the server writes them: privacy losses, charges, caps and budgets.

The server sends every amount as exact text, a decimal ("0.5") or a ratio ("1/3"); these read it
into a Fraction and write one back the same way (the engine's `format_amount`, which the client
cannot import: it ships without the engine).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from fractions import Fraction


def parse_amount(text: str | None) -> Fraction | None:
    """An exact amount from the server's text ("0.5", "1/3"); None when empty or unreadable."""
    if not text:
        return None
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            return Fraction(int(numerator), int(denominator))
        return Fraction(Decimal(text))
    except (ValueError, ZeroDivisionError, InvalidOperation):
        return None


def amount(text: str) -> Fraction:
    """An exact amount from the server's text ("0.5", "1/3"); 0 for empty."""
    return parse_amount(text) or Fraction(0)


def format_amount(value: Fraction) -> str:
    """An exact amount as text: a terminating decimal as a decimal ("0.25"), else a ratio."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
        return text.rstrip("0").rstrip(".")
    return f"{value.numerator}/{value.denominator}"
