"""The typed query model: immutable descriptions of one aggregate. Never SQL text.

A query is a measure, up to four group-by dimensions and an optional filter, all named with
codebook names and codebook values. These classes check only their own shape; the planner
checks them against a codebook and compiles them.

    Query(Count(), by=("gender", "ageBroad"), where=Eq("majorityStatus", "Minor"))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from engine.errors import InvalidQueryError

Value = str | int


# ---- filters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Eq:
    variable: str
    value: Value


@dataclass(frozen=True)
class In:
    variable: str
    values: tuple[Value, ...]

    def __init__(self, variable: str, values: Iterable[Value]) -> None:
        object.__setattr__(self, "variable", variable)
        object.__setattr__(self, "values", tuple(values))
        if not self.values:
            raise InvalidQueryError(f"{variable}: IN needs at least one value", variable=variable)


@dataclass(frozen=True)
class Range:
    """low <= variable <= high; either bound may be None (open)."""

    variable: str
    low: int | None = None
    high: int | None = None

    def __post_init__(self) -> None:
        if self.low is None and self.high is None:
            raise InvalidQueryError(
                f"{self.variable}: a range needs a bound", variable=self.variable
            )


@dataclass(frozen=True)
class IsMissing:
    variable: str


@dataclass(frozen=True)
class Not:
    operand: Filter


@dataclass(frozen=True)
class And:
    operands: tuple[Filter, ...]

    def __init__(self, *operands: Filter) -> None:
        object.__setattr__(self, "operands", tuple(operands))
        if not self.operands:
            raise InvalidQueryError("AND needs at least one operand")


@dataclass(frozen=True)
class Or:
    operands: tuple[Filter, ...]

    def __init__(self, *operands: Filter) -> None:
        object.__setattr__(self, "operands", tuple(operands))
        if not self.operands:
            raise InvalidQueryError("OR needs at least one operand")


Filter = Eq | In | Range | IsMissing | Not | And | Or


# ---- measures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Count:
    """Number of records in each cell."""


@dataclass(frozen=True)
class FlagCounts:
    """Number of records with each flag of a flag set, in each cell (one query, every flag)."""

    flag_set: str


@dataclass(frozen=True)
class Sum:
    """Sum of a numeric variable, each value clamped to its codebook range."""

    variable: str


@dataclass(frozen=True)
class Mean:
    """Mean of a numeric variable over records where it is present, clamped to its range."""

    variable: str


@dataclass(frozen=True)
class Proportion:
    """Share of each cell's records that satisfy `condition` (numerator over the cell's count)."""

    condition: Filter


Measure = Count | FlagCounts | Sum | Mean | Proportion


@dataclass(frozen=True)
class Query:
    measure: Measure
    by: tuple[str, ...] = ()
    where: Filter | None = None

    def __init__(
        self, measure: Measure, by: Iterable[str] = (), where: Filter | None = None
    ) -> None:
        object.__setattr__(self, "measure", measure)
        object.__setattr__(self, "by", tuple(by))
        object.__setattr__(self, "where", where)
        if len(set(self.by)) != len(self.by):
            raise InvalidQueryError("a dimension appears twice in by")


def filter_depth(f: Filter) -> int:
    """Nesting depth, computed without recursion so hostile nesting cannot overflow the stack."""
    depth, stack = 0, [(f, 1)]
    while stack:
        node, level = stack.pop()
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in _children(node))
    return depth


def filter_terms(f: Filter) -> int:
    """Number of leaf predicates."""
    terms, stack = 0, [f]
    while stack:
        node = stack.pop()
        children = _children(node)
        terms += not children
        stack.extend(children)
    return terms


def _children(f: Filter) -> tuple[Filter, ...]:
    if isinstance(f, Not):
        return (f.operand,)
    if isinstance(f, (And, Or)):
        return f.operands
    return ()
