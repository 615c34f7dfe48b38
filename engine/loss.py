"""Privacy loss as exact values.

A loss is either pure epsilon-DP or rho-zCDP, held as an exact rational so that budgets never
drift through accumulated float rounding. Inputs written as decimals ("0.1", 0.1) mean the
decimal the person wrote: 0.1 becomes exactly 1/10, not the binary float nearest to it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import Enum
from fractions import Fraction

from engine.errors import InvalidLossError

# Below this a release is pure noise; above it the guarantee is meaningless. Both bounds exist to
# refuse typos (1e-30, 1e30) with a clear message rather than to express policy.
MIN_AMOUNT = Fraction(1, 10**6)
MAX_AMOUNT = Fraction(100)

Number = int | float | str | Decimal | Fraction


class Accounting(Enum):
    """How a deployment measures and composes privacy loss."""

    PURE_DP = "pure_dp"  # epsilon, basic composition
    ZCDP = "zcdp"  # rho, additive composition

    @property
    def unit(self) -> str:
        """What an amount under this accounting is called: "epsilon" or "rho"."""
        return "epsilon" if self is Accounting.PURE_DP else "rho"


def exact_amount(value: Number, *, what: str = "privacy loss") -> Fraction:
    """Convert a user-supplied amount to an exact, validated rational."""
    if isinstance(value, bool):
        raise InvalidLossError(f"{what} must be a number, not a boolean")
    try:
        if isinstance(value, Fraction):
            amount = value
        elif isinstance(value, int):
            amount = Fraction(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidLossError(f"{what} must be finite, got {value!r}")
            if value == 0 or not 1e-12 <= abs(value) <= 1e6:
                raise InvalidLossError(
                    f"{what} must lie between {float(MIN_AMOUNT)} and {float(MAX_AMOUNT)}, "
                    f"got {value!r}"
                )
            amount = Fraction(Decimal(repr(value)))
        else:
            text = str(value).strip()
            if len(text) > 64:
                raise InvalidLossError(f"{what} must be a decimal of at most 64 characters")
            decimal = Decimal(text)
            if not decimal.is_finite():
                raise InvalidLossError(f"{what} must be finite, got {value!r}")
            # Refuse absurd exponents before building the exact rational, which for
            # "1e-99999999" would take unbounded time and memory.
            if not -12 <= decimal.adjusted() <= 6:
                raise InvalidLossError(
                    f"{what} must lie between {float(MIN_AMOUNT)} and {float(MAX_AMOUNT)}, "
                    f"got {value!r}"
                )
            amount = Fraction(decimal)
    except (InvalidOperation, ValueError, TypeError) as exc:
        raise InvalidLossError(f"{what} must be a decimal number, got {value!r}") from exc
    if amount <= 0:
        raise InvalidLossError(f"{what} must be positive, got {value!r}")
    if amount < MIN_AMOUNT or amount > MAX_AMOUNT:
        raise InvalidLossError(
            f"{what} must lie between {float(MIN_AMOUNT)} and {float(MAX_AMOUNT)}, got {value!r}"
        )
    return amount


def exact_cap(value: Number, *, what: str = "cap") -> Fraction:
    """A budget cap as an exact rational: zero (nothing may be spent) or a valid amount.

    Zero may be written any way that means zero ("0", "0.00", 0, 0.0); anything else must pass
    `exact_amount`, whose errors name `what`.
    """
    negative = False
    if not isinstance(value, bool):
        with contextlib.suppress(ArithmeticError, ValueError, TypeError):
            number = Decimal(value.strip()) if isinstance(value, str) else value
            if number == 0:
                return Fraction(0)
            negative = number < 0
    if negative:  # not "must be positive", which would rule out the zero a cap may be
        raise InvalidLossError(f"{what} must be zero or positive, got {value!r}")
    return exact_amount(value, what=what)


def format_amount(amount: Fraction) -> str:
    """A stable, exact text form: an integer, a terminating decimal, or p/q.

    The client writes amounts with the same rule (client/amounts.py, which cannot import the
    engine); a test holds the two to one text.
    """
    if amount.denominator == 1:
        return str(amount.numerator)
    rest, twos, fives = amount.denominator, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{amount.numerator}/{amount.denominator}"
    # Scaled to whole units of its last place: exact at any length, where a Decimal division
    # rounds past its context's 28 digits (and a charge so rounded would not match its hold).
    places = max(twos, fives)
    digits = str(abs(amount.numerator) * 10**places // amount.denominator).rjust(places + 1, "0")
    sign = "-" if amount.numerator < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")


@functools.lru_cache(maxsize=4096)
def parse_amount(text: str) -> Fraction:
    """Inverse of format_amount, without range checks (for stored values).

    Cached: the ledger reads the same few amounts (caps, totals, losses) again and again, and
    a Fraction is immutable. Raises ValueError, quoting the value's start, for one that is not
    a number (edited by hand), rather than the bare arithmetic error it would cause.
    """
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return Fraction(int(numerator), int(denominator))
        return Fraction(Decimal(text))
    except (ArithmeticError, ValueError, TypeError) as exc:
        raise ValueError(f"{text!r:.40} is not an amount") from exc


def epsilon_equivalent(accounting: Accounting, amount: float | Fraction, delta: float) -> float:
    """The epsilon of the (epsilon, delta)-DP guarantee that `amount` under `accounting` gives.

    Under pure DP that is the amount itself. Under rho-zCDP it is rho + 2 sqrt(rho ln(1/delta))
    (Bun and Steinke 2016, Proposition 1.3). No loss (zero or less) is zero. Raises
    InvalidLossError when delta is not in (0, 1).
    """
    if isinstance(delta, bool) or not 0 < delta < 1:
        raise InvalidLossError(f"delta must lie in (0, 1), got {delta!r}")
    if amount <= 0:
        return 0.0
    if accounting is Accounting.PURE_DP:
        return float(amount)
    rho = float(amount)
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


@dataclass(frozen=True)
class PrivacyLoss:
    """An exact privacy loss under one accounting: epsilon for pure DP, rho for zCDP."""

    accounting: Accounting
    amount: Fraction

    def __post_init__(self) -> None:
        if not isinstance(self.amount, Fraction) or self.amount <= 0:
            raise InvalidLossError("privacy loss must be a positive exact rational")

    @classmethod
    def pure(cls, epsilon: Number) -> PrivacyLoss:
        return cls(Accounting.PURE_DP, exact_amount(epsilon, what=Accounting.PURE_DP.unit))

    @classmethod
    def zcdp(cls, rho: Number) -> PrivacyLoss:
        return cls(Accounting.ZCDP, exact_amount(rho, what=Accounting.ZCDP.unit))

    @property
    def symbol(self) -> str:
        return self.accounting.unit

    def __str__(self) -> str:
        return f"{self.symbol}={format_amount(self.amount)}"
