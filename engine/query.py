"""The typed query model: immutable descriptions of one aggregate. Never SQL text.

A query is a measure, up to four group-by dimensions and an optional filter, all named with
codebook names and codebook values. These classes check only their own shape; the planner
checks them against a codebook and compiles them.

    Query(Count(), by=("gender", "ageBroad"), where=Eq("majorityStatus", "Minor"))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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

    # -- a plain-data form, used by the ledger, the CLI and tests --

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"measure": _measure_to_dict(self.measure), "by": list(self.by)}
        if self.where is not None:
            out["where"] = filter_to_dict(self.where)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Query:
        try:
            where = raw.get("where")
            return cls(
                _measure_from_dict(raw["measure"]),
                by=[str(b) for b in raw.get("by", ())],
                where=filter_from_dict(where) if where is not None else None,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidQueryError(f"malformed query: {exc}") from exc


def _measure_to_dict(measure: Measure) -> dict[str, Any]:
    if isinstance(measure, Count):
        return {"count": {}}
    if isinstance(measure, FlagCounts):
        return {"flag_counts": measure.flag_set}
    if isinstance(measure, Sum):
        return {"sum": measure.variable}
    if isinstance(measure, Mean):
        return {"mean": measure.variable}
    return {"proportion": filter_to_dict(measure.condition)}


def _measure_from_dict(raw: Mapping[str, Any]) -> Measure:
    ((kind, arg),) = raw.items()
    if kind == "count":
        return Count()
    if kind == "flag_counts":
        return FlagCounts(str(arg))
    if kind == "sum":
        return Sum(str(arg))
    if kind == "mean":
        return Mean(str(arg))
    if kind == "proportion":
        return Proportion(filter_from_dict(arg))
    raise InvalidQueryError(f"unknown measure {kind!r}")


def filter_to_dict(f: Filter) -> dict[str, Any]:
    if isinstance(f, Eq):
        return {"eq": [f.variable, f.value]}
    if isinstance(f, In):
        return {"in": [f.variable, list(f.values)]}
    if isinstance(f, Range):
        return {"range": [f.variable, f.low, f.high]}
    if isinstance(f, IsMissing):
        return {"missing": f.variable}
    if isinstance(f, Not):
        return {"not": filter_to_dict(f.operand)}
    if isinstance(f, And):
        return {"and": [filter_to_dict(o) for o in f.operands]}
    return {"or": [filter_to_dict(o) for o in f.operands]}


def filter_from_dict(raw: Mapping[str, Any]) -> Filter:
    ((kind, arg),) = raw.items()
    if kind == "eq":
        return Eq(str(arg[0]), arg[1])
    if kind == "in":
        return In(str(arg[0]), arg[1])
    if kind == "range":
        return Range(str(arg[0]), arg[1], arg[2])
    if kind == "missing":
        return IsMissing(str(arg))
    if kind == "not":
        return Not(filter_from_dict(arg))
    if kind == "and":
        return And(*(filter_from_dict(o) for o in arg))
    if kind == "or":
        return Or(*(filter_from_dict(o) for o in arg))
    raise InvalidQueryError(f"unknown filter {kind!r}")


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
