"""The only module that writes SQL text.

One statement per query. Identifiers come from the codebook (checked to be plain names) and every
value is a bound parameter. The statement returns one row per non-empty cell: the cell's index in
the row-major order of the plan's public domain, then one integer per component. The engine
densifies that over the full domain, so the set of rows DuckDB returns never shapes the release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.codebook import Codebook, Dimension, Kind, Variable
from engine.planner import AllOf, AnyOf, Atom, CanonicalFilter, Component, Constant, Plan

TABLE = "records"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Statement:
    text: str
    parameters: tuple[Any, ...]


def quote(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return f'"{name}"'


class _Builder:
    def __init__(self, codebook: Codebook) -> None:
        self.codebook = codebook
        self.parameters: list[Any] = []

    def bind(self, value: Any) -> str:
        self.parameters.append(value)
        return "?"

    def key_index(self, dimension: Dimension) -> str:
        """The 0-based key index of a row along one dimension; missing is the last key."""
        variable = dimension.variable
        column = quote(variable.name)
        missing = len(dimension.keys)
        if dimension.derived is not None:
            lookup = self.bind(list(dimension.source_to_key))
            return f"coalesce(list_extract({lookup}::INTEGER[], enum_code({column}) + 1), {missing})"
        if variable.kind in (Kind.CATEGORY, Kind.COUNTRY):
            return f"coalesce(enum_code({column})::INTEGER, {missing})"
        if variable.kind is Kind.FLAG:
            return f"coalesce({column}::INTEGER, {missing})"
        return f"coalesce(({column} - {self.bind(variable.low)})::INTEGER, {missing})"

    def condition(self, f: CanonicalFilter) -> str:
        if isinstance(f, Constant):
            return "TRUE" if f.value else "FALSE"
        if isinstance(f, Atom):
            return self.atom(f)
        joiner = " AND " if isinstance(f, AllOf) else " OR "
        assert isinstance(f, (AllOf, AnyOf))
        return "(" + joiner.join(self.condition(o) for o in f.operands) + ")"

    def atom(self, atom: Atom) -> str:
        variable = self.codebook.variable(atom.variable)
        column = quote(variable.name)
        codes = sorted(atom.codes, key=_order(variable))
        complement = sorted(set(variable.codes) - atom.codes, key=_order(variable))
        # Write whichever list is shorter; NOT IN is false on missing, IN is too.
        if not codes:
            present = "FALSE"
        elif not complement:
            present = f"{column} IS NOT NULL"
        elif len(codes) <= len(complement):
            present = f"{column} IN ({', '.join(self.bind(c) for c in codes)})"
        else:
            present = f"{column} NOT IN ({', '.join(self.bind(c) for c in complement)})"
        if atom.missing:
            return f"({column} IS NULL OR {present})"
        return f"({present})"

    def aggregate(self, component: Component) -> str:
        if component.aggregate == "count":
            return "count(*)"
        if component.aggregate == "flag":
            return f"count(*) FILTER (WHERE {quote(component.argument)} = 1)"
        if component.aggregate == "count_where":
            return f"count(*) FILTER (WHERE {self.condition(component.argument)})"
        variable: Variable = component.argument
        column = quote(variable.name)
        if component.aggregate == "count_present":
            return f"count({column})"
        low, high = self.bind(variable.low), self.bind(variable.high)
        low_again = self.bind(variable.low)
        # Clamp to the public bounds, then shift so the sum's sensitivity is high - low.
        return f"coalesce(sum(least(greatest({column}, {low}), {high}) - {low_again}), 0)::BIGINT"


def _order(variable: Variable) -> Any:
    index = variable.code_index
    return lambda code: index[code]


def build(plan: Plan) -> Statement:
    """The statement that computes every component of `plan` for every non-empty cell."""
    builder = _Builder(plan.codebook)
    strides = []
    stride = 1
    for dimension in reversed(plan.dimensions):
        strides.append(stride)
        stride *= dimension.size
    strides.reverse()
    # Parameters bind in text order: cell index, then aggregates, then the WHERE clause.
    index_terms = [
        f"{builder.key_index(d)} * {s}" if s != 1 else builder.key_index(d)
        for d, s in zip(plan.dimensions, strides)
    ]
    cell = " + ".join(index_terms) if index_terms else "0"
    aggregates = [f"{builder.aggregate(c)} AS c{i}" for i, c in enumerate(plan.components)]
    where = builder.condition(plan.where)
    source = _source(plan.codebook)
    text = f"SELECT ({cell})::INTEGER AS cell, {', '.join(aggregates)} FROM {source}"
    if where != "TRUE":
        text += f" WHERE {where}"
    if plan.dimensions:
        text += " GROUP BY ALL"
    return Statement(text, tuple(builder.parameters))


def _source(codebook: Codebook) -> str:
    unit = codebook.privacy_unit
    if unit.id_column is None:
        return TABLE
    # Bound each person's contribution before aggregating: keep at most max_rows_per_person
    # rows per id, chosen by a fixed hash so the choice does not depend on row order.
    column = quote(unit.id_column)
    return (
        f"(SELECT * FROM {TABLE} QUALIFY row_number() OVER "
        f"(PARTITION BY {column} ORDER BY hash({TABLE})) <= {int(unit.max_rows_per_person)})"
    )


def code_literal_type(variable: Variable) -> str:
    """The DuckDB type of a stored variable (used by the loader when it creates the table)."""
    if variable.kind in (Kind.CATEGORY, Kind.COUNTRY):
        return "ENUM (" + ", ".join(_string_literal(str(c)) for c in variable.codes) + ")"
    if variable.kind is Kind.FLAG:
        return "UTINYINT"
    assert variable.low is not None and variable.high is not None
    return "SMALLINT" if -(2**15) <= variable.low and variable.high < 2**15 else "INTEGER"


def _string_literal(value: str) -> str:
    # ENUM members cannot be bound parameters in DDL; codebook values are escaped here, once.
    return "'" + value.replace("'", "''") + "'"


def create_table(codebook: Codebook) -> str:
    """DDL for the records table, typed from the codebook."""
    columns = ", ".join(
        f"{quote(v.name)} {code_literal_type(v)}" for v in codebook.stored_variables
    )
    return f"CREATE TABLE {TABLE} ({columns})"

