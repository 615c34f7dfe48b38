"""Queries built on the researcher's machine: filters, measures and an immutable, fluent `Query`.

    veil_client.count().by("gender", "ageBroad").where(majorityStatus="Minor").release(epsilon=0.5)
    veil_client.flag_counts("meansOfControl").by("majorityStatus").dry_run(half_width=20)
    veil_client.proportion(isSexualExploit=1).by("gender").where(In("ageBroad", ["0--8", "9--17"]))

Conditions mirror the wire's filters: keyword arguments are equalities (a list means IN, None
means the value is missing), and `Eq`, `In`, `Range`, `Missing`, `Not`, `And`, `Or` build the
rest; `&`, `|` and `~` combine them. Names are codebook names and values are codebook values;
nothing here is SQL, and each method returns a new query.

`Not(...)` follows veil's rule: it keeps the records where the variable is missing (the complement
of a set of codebook values includes "missing"). SQL's `<>` and `NOT IN` drop them; the SQL
subset (`client.sql`) translates them so that they mean what they mean in SQL.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from client.errors import InvalidQuery
from protos.veil.v1 import veil_pb2 as pb

if TYPE_CHECKING:
    from client.codebook import Codebook
    from client.connection import Client
    from client.results import DryRun, Release

Value = str | int
Amount = int | float | str | Decimal | Fraction  # a privacy loss, as the caller writes it


# The wire carries integers as int64; a larger one would fail in protobuf with no variable named.
_INT64 = range(-(2**63), 2**63)


def _integer(value: int, variable: str, what: str = "value") -> int:
    if value not in _INT64:
        raise InvalidQuery(
            f"{variable}: {what} {value} is out of range (integers are at most 19 digits, "
            f"from -{2**63} to {2**63 - 1})",
            variable=variable,
        )
    return value


def _name(name: Any, what: str) -> str:
    """A codebook name given as `what` ("flag_counts' flag set"): text that is not blank."""
    if not isinstance(name, str):
        raise TypeError(f"{what} is a codebook name (text), got {type(name).__name__} {name!r}")
    if not name.strip():
        raise InvalidQuery(f"{what} is empty: give a codebook name")
    return name


def _value(value: Any, variable: str) -> Value:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return _integer(value, variable)
    if isinstance(value, str):
        return value
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):  # numpy scalars
        return _value(value.item(), variable)
    raise InvalidQuery(
        f"{variable}: a value must be text (a category or country code) or an integer, "
        f"got {type(value).__name__} {value!r}",
        variable=variable,
    )


def _quote(value: Value) -> str:
    return repr(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"


# ---- filters ------------------------------------------------------------------------------------


class Filter:
    """A condition on records. Combine with `&` (and), `|` (or) and `~` (not)."""

    def __and__(self, other: Filter) -> Filter:
        return And(self, other)

    def __or__(self, other: Filter) -> Filter:
        return Or(self, other)

    def __invert__(self) -> Filter:
        return Not(self)

    def to_pb(self) -> pb.Filter:
        raise NotImplementedError

    def variables(self) -> list[str]:
        raise NotImplementedError

    def map(self, fix: Any) -> Filter:
        """The same filter with `fix(leaf)` applied to every leaf (used to normalise names)."""
        raise NotImplementedError


@dataclass(frozen=True, repr=False)
class Eq(Filter):
    """variable = value."""

    variable: str
    value: Value

    def __post_init__(self) -> None:
        _name(self.variable, "a condition's variable")
        object.__setattr__(self, "value", _value(self.value, self.variable))

    def to_pb(self) -> pb.Filter:
        return pb.Filter(equals=pb.Equals(variable=self.variable, value=_value_pb(self.value)))

    def variables(self) -> list[str]:
        return [self.variable]

    def map(self, fix: Any) -> Filter:
        result: Filter = fix(self)
        return result

    def __repr__(self) -> str:
        return f"Eq({self.variable!r}, {self.value!r})"

    def __str__(self) -> str:
        return f"{self.variable} = {_quote(self.value)}"


@dataclass(frozen=True, repr=False, eq=False)
class FlagAlone(Eq):
    """A variable named alone as a condition (SQL's `WHERE isSexualExploit`, NOT before it for
    0): the same filter as Eq(variable, 1 or 0), and equal to it, remembered so that a name
    that is not a flag's is refused in those words rather than as a value 1 the variable lacks."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Eq):
            return NotImplemented
        return (self.variable, self.value) == (other.variable, other.value)

    __hash__ = Eq.__hash__


@dataclass(frozen=True, repr=False)
class In(Filter):
    """variable is one of values."""

    variable: str
    values: tuple[Value, ...]

    def __init__(self, variable: str, values: Iterable[Any]) -> None:
        _name(variable, "a condition's variable")
        if isinstance(values, (str, bytes)):
            values = [values]
        object.__setattr__(self, "variable", variable)
        object.__setattr__(self, "values", tuple(_value(v, variable) for v in values))
        if not self.values:
            raise InvalidQuery(f"{variable}: IN needs at least one value", variable=variable)

    def to_pb(self) -> pb.Filter:
        return pb.Filter(
            in_set=pb.InSet(variable=self.variable, values=[_value_pb(v) for v in self.values])
        )

    def variables(self) -> list[str]:
        return [self.variable]

    def map(self, fix: Any) -> Filter:
        result: Filter = fix(self)
        return result

    def __repr__(self) -> str:
        return f"In({self.variable!r}, {list(self.values)!r})"

    def __str__(self) -> str:
        return f"{self.variable} IN ({', '.join(_quote(v) for v in self.values)})"


@dataclass(frozen=True, repr=False)
class Range(Filter):
    """low <= variable <= high on an integer variable; either bound may be None (open)."""

    variable: str
    low: int | None = None
    high: int | None = None

    def __post_init__(self) -> None:
        _name(self.variable, "a condition's variable")
        if self.low is None and self.high is None:
            raise InvalidQuery(f"{self.variable}: a range needs a bound", variable=self.variable)
        for bound in (self.low, self.high):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                raise InvalidQuery(
                    f"{self.variable}: range bounds must be integers, got {bound!r}",
                    variable=self.variable,
                )
            if bound is not None:
                _integer(bound, self.variable, "bound")

    def to_pb(self) -> pb.Filter:
        return pb.Filter(between=pb.Between(variable=self.variable, low=self.low, high=self.high))

    def variables(self) -> list[str]:
        return [self.variable]

    def map(self, fix: Any) -> Filter:
        result: Filter = fix(self)
        return result

    def __repr__(self) -> str:
        return f"Range({self.variable!r}, low={self.low!r}, high={self.high!r})"

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.variable} BETWEEN {self.low} AND {self.high}"
        if self.low is not None:
            return f"{self.variable} >= {self.low}"
        return f"{self.variable} <= {self.high}"


@dataclass(frozen=True, repr=False)
class Missing(Filter):
    """The variable's value is missing (null)."""

    variable: str

    def __post_init__(self) -> None:
        _name(self.variable, "a condition's variable")

    def to_pb(self) -> pb.Filter:
        return pb.Filter(is_missing=pb.IsMissing(variable=self.variable))

    def variables(self) -> list[str]:
        return [self.variable]

    def map(self, fix: Any) -> Filter:
        result: Filter = fix(self)
        return result

    def __repr__(self) -> str:
        return f"Missing({self.variable!r})"

    def __str__(self) -> str:
        return f"{self.variable} IS NULL"


@dataclass(frozen=True, repr=False)
class Not(Filter):
    """Records the operand does not admit (including those where its variable is missing)."""

    operand: Filter

    def __post_init__(self) -> None:
        _check_filter(self.operand)

    def to_pb(self) -> pb.Filter:
        return pb.Filter(negation=pb.Negation(operand=self.operand.to_pb()))

    def variables(self) -> list[str]:
        return self.operand.variables()

    def map(self, fix: Any) -> Filter:
        return Not(self.operand.map(fix))

    def __repr__(self) -> str:
        return f"Not({self.operand!r})"

    def __str__(self) -> str:
        if isinstance(self.operand, Missing):
            return f"{self.operand.variable} IS NOT NULL"
        # SQL's NOT drops the records where the operand is NULL (a missing value); this keeps
        # them, which is what IS NOT TRUE says, and reads back as the same filter.
        return f"({self.operand}) IS NOT TRUE"


@dataclass(frozen=True, repr=False)
class And(Filter):
    """Every operand holds."""

    operands: tuple[Filter, ...]

    def __init__(self, *operands: Filter) -> None:
        flat: list[Filter] = []
        for operand in operands:
            _check_filter(operand)
            flat.extend(operand.operands if isinstance(operand, And) else [operand])
        if not flat:
            raise InvalidQuery("And needs at least one condition")
        object.__setattr__(self, "operands", tuple(flat))

    def to_pb(self) -> pb.Filter:
        return pb.Filter(all_of=pb.AllOf(operands=[o.to_pb() for o in self.operands]))

    def variables(self) -> list[str]:
        return [v for o in self.operands for v in o.variables()]

    def map(self, fix: Any) -> Filter:
        return And(*(o.map(fix) for o in self.operands))

    def __repr__(self) -> str:
        return f"And({', '.join(repr(o) for o in self.operands)})"

    def __str__(self) -> str:
        return " AND ".join(f"({o})" if isinstance(o, Or) else str(o) for o in self.operands)


@dataclass(frozen=True, repr=False)
class Or(Filter):
    """At least one operand holds."""

    operands: tuple[Filter, ...]

    def __init__(self, *operands: Filter) -> None:
        flat: list[Filter] = []
        for operand in operands:
            _check_filter(operand)
            flat.extend(operand.operands if isinstance(operand, Or) else [operand])
        if not flat:
            raise InvalidQuery("Or needs at least one condition")
        object.__setattr__(self, "operands", tuple(flat))

    def to_pb(self) -> pb.Filter:
        return pb.Filter(any_of=pb.AnyOf(operands=[o.to_pb() for o in self.operands]))

    def variables(self) -> list[str]:
        return [v for o in self.operands for v in o.variables()]

    def map(self, fix: Any) -> Filter:
        return Or(*(o.map(fix) for o in self.operands))

    def __repr__(self) -> str:
        return f"Or({', '.join(repr(o) for o in self.operands)})"

    def __str__(self) -> str:
        return " OR ".join(f"({o})" if isinstance(o, And) else str(o) for o in self.operands)


def Present(variable: str) -> Filter:
    """The variable's value is not missing."""
    return Not(Missing(variable))


def _check_filter(value: Any) -> None:
    if not isinstance(value, Filter):
        sql = (
            f"; for SQL text, pass client.parse_condition({value!r})"
            if isinstance(value, str) else ""
        )
        raise TypeError(
            f"expected a condition (Eq, In, Range, Missing, Not, And, Or), got {value!r}{sql}"
        )


def _value_pb(value: Value) -> pb.Value:
    return pb.Value(integer=value) if isinstance(value, int) else pb.Value(text=value)


def conditions(positional: Sequence[Any], equals: Mapping[str, Any]) -> Filter | None:
    """One filter from positional conditions and keyword equalities (list: IN; None: missing)."""
    parts: list[Filter] = []
    for condition in positional:
        _check_filter(condition)
        parts.append(condition)
    for variable, value in equals.items():
        if value is None:
            parts.append(Missing(variable))
        elif isinstance(value, Filter):
            raise TypeError(
                f"{variable}=...: give a value, or pass the condition positionally"
            )
        elif isinstance(value, (list, tuple, set, frozenset)):
            values = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
            if any(v is None for v in values):
                # Missing is no value, so it cannot be one of an IN's values.
                present = [v for v in values if v is not None]
                instead = (
                    f"Or(In({variable!r}, {present!r}), Missing({variable!r}))"
                    if present else f"{variable}=None"
                )
                raise InvalidQuery(
                    f"{variable}: None (missing) cannot be one of a list's values; for these "
                    f"values or missing, write {instead}",
                    variable=variable,
                )
            parts.append(In(variable, values))
        else:
            parts.append(Eq(variable, value))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else And(*parts)


# ---- measures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Count:
    """Records in each cell."""

    def to_pb(self) -> pb.Measure:
        return pb.Measure(count=pb.CountMeasure())

    def __str__(self) -> str:
        return "count"


@dataclass(frozen=True)
class FlagCounts:
    """Records with each flag of a flag set, in each cell."""

    flag_set: str

    def __post_init__(self) -> None:
        _name(self.flag_set, "flag_counts' flag set")

    def to_pb(self) -> pb.Measure:
        return pb.Measure(flag_counts=pb.FlagCountsMeasure(flag_set=self.flag_set))

    def __str__(self) -> str:
        return f"flag counts of {self.flag_set}"


@dataclass(frozen=True)
class Sum:
    """Sum of an integer variable, each value clamped to its codebook range."""

    variable: str

    def __post_init__(self) -> None:
        _name(self.variable, "sum's variable")

    def to_pb(self) -> pb.Measure:
        return pb.Measure(sum=pb.SumMeasure(variable=self.variable))

    def __str__(self) -> str:
        return f"sum of {self.variable}"


@dataclass(frozen=True)
class Mean:
    """Mean of an integer variable over records where it is present, clamped to its range."""

    variable: str

    def __post_init__(self) -> None:
        _name(self.variable, "mean's variable")

    def to_pb(self) -> pb.Measure:
        return pb.Measure(mean=pb.MeanMeasure(variable=self.variable))

    def __str__(self) -> str:
        return f"mean of {self.variable}"


@dataclass(frozen=True)
class Proportion:
    """Share of each cell's records satisfying `condition`, of all the cell's records (those
    missing the condition's variables included; filter with `Present` for a share among the
    records that have them)."""

    condition: Filter

    def to_pb(self) -> pb.Measure:
        return pb.Measure(proportion=pb.ProportionMeasure(condition=self.condition.to_pb()))

    def __str__(self) -> str:
        return f"proportion with {self.condition}"


Measure = Count | FlagCounts | Sum | Mean | Proportion


# ---- the query ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One aggregate: a measure, group-by dimensions and an optional filter. Immutable: `by` and
    `where` return new queries. Bound to a client (when built from one) so that `release` and
    `dry_run` can be called on it directly."""

    measure: Measure
    dimensions: tuple[str, ...] = ()
    filter: Filter | None = None
    client: Client | None = field(default=None, compare=False, repr=False)
    # How the researcher wrote it ("python", "sql" or "cli"), so that a message can say what to
    # write instead in the same language.
    spelling: str = field(default="python", compare=False, repr=False)

    def by(self, *dimensions: str | Iterable[str]) -> Query:
        """Group by these dimensions (added to any already given). "a, b" is split at commas."""
        names = list(self.dimensions)
        for item in dimensions:
            if not isinstance(item, str) and not isinstance(item, Iterable):
                raise TypeError(f"a dimension is a codebook name, got {item!r}")
            parts = item.split(",") if isinstance(item, str) else list(item)
            for part in parts:
                if not isinstance(part, str):
                    raise TypeError(f"a dimension is a codebook name, got {part!r}")
                name = part.strip()
                if not name:
                    # Dropping it would release a table grouped by less than was written.
                    raise InvalidQuery(
                        f"by {item!r}: an empty name in the list of dimensions; name each "
                        f"dimension (\"gender\", or \"gender, ageBroad\" for several)"
                    )
                # Names match the codebook regardless of case, so GENDER is gender again.
                if name.lower() in (n.lower() for n in names):
                    raise InvalidQuery(f"{name} appears twice in by", variable=name)
                names.append(name)
        return replace(self, dimensions=tuple(names))

    def where(self, *conditions_: Filter, **equals: Any) -> Query:
        """Keep the records satisfying every condition (added to any filter already given).

        `where(majorityStatus="Minor")` is an equality, `where(ageBroad=["0--8", "9--17"])` an IN,
        `where(gender=None)` keeps records whose gender is missing; positional arguments are
        conditions built with Eq, In, Range, Missing, Not, And, Or.
        """
        condition = conditions(conditions_, equals)
        if condition is None:
            return self
        combined = condition if self.filter is None else And(self.filter, condition)
        return replace(self, filter=combined)

    def bind(self, client: Client) -> Query:
        return replace(self, client=client)

    # -- running it --
    def release(
        self,
        *,
        epsilon: Amount | None = None,
        rho: Amount | None = None,
        loss: Amount | None = None,
        half_width: int | None = None,
        max_loss: Amount | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Release:
        """Release this query, paying `epsilon` (pure DP), `rho` (zCDP) or `loss` (either), or
        the least loss whose count intervals are at most `half_width` wide on each side, but
        never more than `max_loss`."""
        return self._client().release(
            self, epsilon=epsilon, rho=rho, loss=loss, half_width=half_width,
            max_loss=max_loss, request_id=request_id, timeout=timeout,
        )

    def dry_run(
        self,
        *,
        epsilon: Amount | None = None,
        rho: Amount | None = None,
        loss: Amount | None = None,
        half_width: int | None = None,
        assumed_count: int | None = None,
        timeout: float | None = None,
    ) -> DryRun:
        """What releasing would cost and how accurate it would be; charges nothing."""
        return self._client().dry_run(
            self, epsilon=epsilon, rho=rho, loss=loss, half_width=half_width,
            assumed_count=assumed_count, timeout=timeout,
        )

    def _client(self) -> Client:
        if self.client is None:
            raise TypeError(
                "this query is not bound to a client: build it from one "
                "(veil_client.count()...), or call veil_client.release(query, ...)"
            )
        return self.client

    # -- the wire --
    def to_pb(self) -> pb.Query:
        out = pb.Query(measure=self.measure.to_pb(), by=list(self.dimensions))
        if self.filter is not None:
            out.where.CopyFrom(self.filter.to_pb())
        return out

    def variables(self) -> list[str]:
        """Every codebook name the query mentions."""
        names = list(self.dimensions)
        if isinstance(self.measure, FlagCounts):
            names.append(self.measure.flag_set)
        elif isinstance(self.measure, (Sum, Mean)):
            names.append(self.measure.variable)
        elif isinstance(self.measure, Proportion):
            names.extend(self.measure.condition.variables())
        if self.filter is not None:
            names.extend(self.filter.variables())
        return names

    def normalized(self, codebook: Codebook) -> Query:
        """Names spelled as the codebook spells them (matched without regard to case, as SQL
        does) and values of the codebook's type: "1" for a flag becomes 1, 2015 for a category
        becomes "2015". An unknown name close to a known one is refused here with the close
        ones named; other names the codebook does not know are left for the server to refuse."""
        resolve = codebook.resolve_name
        self._refuse_likely_typos(codebook)
        self._refuse_flag_sets(codebook)

        def fix(leaf: Filter) -> Filter:
            if isinstance(leaf, FlagAlone):
                self._refuse_alone(codebook, leaf.variable)
            if isinstance(leaf, Eq):
                name = resolve(leaf.variable)
                return Eq(name, codebook.coerce(name, leaf.value))
            if isinstance(leaf, In):
                name = resolve(leaf.variable)
                return In(name, [codebook.coerce(name, v) for v in leaf.values])
            if isinstance(leaf, Range):
                return Range(resolve(leaf.variable), leaf.low, leaf.high)
            if isinstance(leaf, Missing):
                return Missing(resolve(leaf.variable))
            return leaf

        measure: Measure = self.measure
        if isinstance(measure, FlagCounts):
            measure = FlagCounts(resolve(measure.flag_set))
        elif isinstance(measure, Sum):
            measure = Sum(resolve(measure.variable))
            self._refuse_flag_arithmetic(codebook, measure.variable, "sum")
        elif isinstance(measure, Mean):
            measure = Mean(resolve(measure.variable))
            self._refuse_flag_arithmetic(codebook, measure.variable, "mean")
        elif isinstance(measure, Proportion):
            measure = Proportion(measure.condition.map(fix))
        return replace(
            self,
            measure=measure,
            dimensions=tuple(resolve(d) for d in self.dimensions),
            filter=None if self.filter is None else self.filter.map(fix),
        )

    def _refuse_flag_arithmetic(self, codebook: Codebook, name: str, kind: str) -> None:
        """A sum or mean of a flag (0/1) is refused here with what asks for it: the server
        takes sums and means of integer variables only, and would not say that a flag's mean is
        a share and its sum a count."""
        from client.codebook import Variable

        item = codebook.find(name)
        if not (isinstance(item, Variable) and item.kind == "flag"):
            return
        if kind == "mean":
            asked = {"sql": f"PROPORTION({name} = 1)", "cli": f"--proportion {name}=1"}.get(
                self.spelling, f"proportion({name}=1)")
            what = f"its mean is the share of records with it set: ask for {asked}"
        else:
            asked = {"sql": f"COUNT(*) ... WHERE {name} = 1",
                     "cli": f"--count --where {name}=1"}.get(
                self.spelling, f"count().where({name}=1)")
            what = f"its sum is the count of records with it set: ask for {asked}"
        raise InvalidQuery(
            f"{name} is a flag (0/1), and sums and means need an integer variable; {what}",
            variable=name,
        )

    def _refuse_alone(self, codebook: Codebook, name: str) -> None:
        """A name alone is a condition only for a flag (0/1): one that is not a flag's is refused
        saying so (the server would only say 1 is not one of its values)."""
        from client.codebook import DerivedDimension, Variable

        item = codebook.find(name)
        if isinstance(item, Variable) and item.kind in ("category", "country", "integer"):
            kind = f"{item.kind} variable"
        elif isinstance(item, DerivedDimension):
            kind = "derived dimension"  # a region beside its countries, say
        else:
            # A flag is a condition alone; an unknown name, or one that cannot be queried (a
            # concatenated label column), is for the server to refuse in its own words.
            return
        value = "N" if kind == "integer variable" else "'VALUE'"
        example = f"{item.name}=VALUE" if self.spelling == "cli" else f"{item.name} = {value}"
        raise InvalidQuery(
            f"{item.name} alone is not a condition: a bare name is a condition only for a flag "
            f"(0/1) variable, and {item.name} is {_a(kind)} {kind}; compare it with one of its "
            f"values ({example}), or write {item.name} IS NOT NULL for the records that have it",
            variable=item.name,
        )

    def _refuse_likely_typos(self, codebook: Codebook) -> None:
        """An unknown name close to a codebook name (or matching two of them in different cases)
        is refused here, naming the close ones: the server would only call it unknown."""
        for name in self.variables():
            if codebook.find(name) is not None:
                continue
            twins = [known for known in codebook.names() if known.lower() == name.lower()]
            if len(twins) > 1 or codebook.suggest(name):
                raise InvalidQuery(codebook.unknown(name), variable=name)

    def _refuse_flag_sets(self, codebook: Codebook) -> None:
        """A flag set where a variable belongs is refused here, naming the flag-set count to ask
        for instead: the server would only call the name unknown."""
        from client.codebook import FlagSet

        def flag_set(name: str) -> FlagSet | None:
            item = codebook.find(name)
            return item if isinstance(item, FlagSet) else None

        for name in self.dimensions:
            found = flag_set(name)
            if found is not None:
                others = [d for d in self.dimensions if d != name]
                raise InvalidQuery(
                    f"{found.name} is a flag set ({len(found.flags)} flags), not a variable, so "
                    f"it cannot be grouped by; count each of its flags with "
                    f"{_flag_counts_text(found.name, others, self.spelling)}",
                    variable=found.name,
                )
        instead = functools.partial(
            _flag_counts_text, dimensions=list(self.dimensions), spelling=self.spelling
        )
        measure = self.measure
        if isinstance(measure, (Sum, Mean)):
            found = flag_set(measure.variable)
            if found is not None:
                raise InvalidQuery(
                    f"{found.name} is a flag set, not an integer variable; count each of its "
                    f"flags with {instead(found.name)}",
                    variable=found.name,
                )
        in_conditions = (
            measure.condition.variables() if isinstance(measure, Proportion) else []
        )
        if self.filter is not None:
            in_conditions += self.filter.variables()
        for name in in_conditions:
            found = flag_set(name)
            if found is not None:
                example = found.flags[0] if found.flags else "a flag"
                raise InvalidQuery(
                    f"{found.name} is a flag set, not a variable; put one of its flags in the "
                    f"condition (such as {example} = 1), or count each of them with "
                    f"{instead(found.name)}",
                    variable=found.name,
                )

    def __str__(self) -> str:
        text = str(self.measure)
        if self.dimensions:
            text += f" by {', '.join(self.dimensions)}"
        if self.filter is not None:
            text += f" where {self.filter}"
        return text

    def __repr__(self) -> str:
        measure = self.measure
        if isinstance(measure, Count):
            text = "count()"
        elif isinstance(measure, FlagCounts):
            text = f"flag_counts({measure.flag_set!r})"
        elif isinstance(measure, Sum):
            text = f"sum({measure.variable!r})"
        elif isinstance(measure, Mean):
            text = f"mean({measure.variable!r})"
        else:
            text = f"proportion({measure.condition!r})"
        if self.dimensions:
            text += f".by({', '.join(repr(d) for d in self.dimensions)})"
        if self.filter is not None:
            text += f".where({self.filter!r})"
        return f"<veil query {text}>"


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _flag_counts_text(flag_set: str, dimensions: list[str], spelling: str) -> str:
    """The flag-set count by `dimensions`, written as the researcher writes queries."""
    if spelling == "sql":
        select = ", ".join([*dimensions, f"FLAG_COUNTS({flag_set})"])
        group = f" GROUP BY {', '.join(dimensions)}" if dimensions else ""
        return f"SELECT {select} FROM victims{group}"
    if spelling == "cli":
        return f"--flag-counts {flag_set}" + (f" --by {','.join(dimensions)}" if dimensions else "")
    quoted = ", ".join('"' + d + '"' for d in dimensions)
    by = f".by({quoted})" if dimensions else ""
    return f'veil_client.flag_counts("{flag_set}"){by}'


def count() -> Query:
    """An unbound count query (bind it with `veil_client.release(query, ...)`)."""
    return Query(Count())


def flag_counts(flag_set: str) -> Query:
    return Query(FlagCounts(flag_set))


def sum_of(variable: str) -> Query:
    return Query(Sum(variable))


def mean(variable: str) -> Query:
    return Query(Mean(variable))


def proportion(*conditions_: Filter, **equals: Any) -> Query:
    condition = conditions(conditions_, equals)
    if condition is None:
        raise InvalidQuery(
            "a proportion needs a condition, e.g. proportion(isSexualExploit=1)"
        )
    return Query(Proportion(condition))


def query_of_canonical(canonical: str) -> Query | None:
    """The query a server's canonical form (`ReleaseMetadata.canonical_query`, JSON) describes,
    written as a researcher would write it: a code alone is `=`, several `IN`, a run of three
    or more integers `BETWEEN`, missing `IS NULL`. It asks for the same records as the query
    that was released, in the canonical form's terms (a NOT comes back as the codes it admits,
    a region as its countries, dimensions in alphabetical order). None for a form it does not
    know, or a condition that admits nothing."""
    try:
        data = json.loads(canonical)
        measure = data["measure"]
        built: Query
        if measure == "count":
            built = count()
        elif "flag_counts" in measure:
            built = flag_counts(measure["flag_counts"])
        elif "proportion" in measure:
            condition = _filter_of_canonical(measure["proportion"])
            if condition is None:
                return None
            built = proportion(condition)
        elif "sum" in measure:
            built = sum_of(measure["sum"])
        else:
            built = mean(measure["mean"])
        built = built.by(*data.get("by", []))
        where = data.get("where", True)
        if where is True:
            return built
        condition = _filter_of_canonical(where)
        return None if condition is None else built.where(condition)
    except (TypeError, ValueError, KeyError, AttributeError, InvalidQuery):
        return None


def _filter_of_canonical(node: Any) -> Filter | None:
    """One canonical filter as the client's condition; None for one that admits nothing."""
    if node is True or node is False:
        return None  # TRUE stands only as a whole condition; FALSE has no spelling of its own
    if "var" in node:
        variable, codes = node["var"], node["in"]
        parts: list[Filter] = []
        integers = sorted(codes) if all(isinstance(c, int) for c in codes) else []
        if len(integers) >= 3 and integers == list(range(integers[0], integers[-1] + 1)):
            parts.append(Range(variable, integers[0], integers[-1]))
        elif len(codes) == 1:
            parts.append(Eq(variable, codes[0]))
        elif codes:
            parts.append(In(variable, integers or codes))
        if node.get("missing"):
            parts.append(Missing(variable))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else Or(*parts)
    key = "and" if "and" in node else "or"
    operands: list[Filter] = []
    for operand in node[key]:
        condition = _filter_of_canonical(operand)
        if condition is None:
            return None
        operands.append(condition)
    if not operands:
        return None
    return And(*operands) if key == "and" else Or(*operands)


__all__ = [
    "And",
    "Count",
    "Eq",
    "Filter",
    "FlagCounts",
    "In",
    "Mean",
    "Measure",
    "Missing",
    "Not",
    "Or",
    "Present",
    "Proportion",
    "Query",
    "Range",
    "Sum",
    "count",
    "flag_counts",
    "mean",
    "proportion",
    "query_of_canonical",
    "sum_of",
]
