"""Compiles a query against a codebook into a plan: validated, canonical, priced.

Nothing here touches data. Every rejection depends on the codebook and the settings alone, so a
rejection reveals nothing about the records. The plan fixes the public domain of every cell, the
sensitivity of every count (from the query's shape and the privacy unit, never from a caller),
the noise mechanism of each, the suppression threshold tau and the canonical fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from engine.codebook import Code, Codebook, Dimension, Kind, Variable
from engine.errors import InvalidQueryError, LimitExceededError
from engine.loss import PrivacyLoss
from engine.noise import Mechanism, calibrate
from engine.query import (
    And,
    Count,
    Eq,
    Filter,
    FlagCounts,
    In,
    IsMissing,
    Mean,
    Not,
    Or,
    Proportion,
    Query,
    Range,
    Sum,
    filter_depth,
    filter_terms,
)
from engine.settings import Settings

# ---- canonical filters ------------------------------------------------------------------------
#
# Every leaf predicate becomes the set of a stored variable's codes it admits (plus whether it
# admits missing). NOT is pushed down onto leaves as a complement, leaves on the same variable
# merge under AND (intersection) and OR (union), and operands are sorted. Reordered IN lists,
# reordered or repeated terms, double negation, region filters spelled as country lists and
# always-true conditions all reach the same form, so they share a fingerprint and a release.


@dataclass(frozen=True)
class Atom:
    variable: str
    codes: frozenset[Code]
    missing: bool


@dataclass(frozen=True)
class AllOf:
    operands: tuple[CanonicalFilter, ...]


@dataclass(frozen=True)
class AnyOf:
    operands: tuple[CanonicalFilter, ...]


@dataclass(frozen=True)
class Constant:
    value: bool


CanonicalFilter = Atom | AllOf | AnyOf | Constant
TRUE, FALSE = Constant(True), Constant(False)


def _atom(variable: Variable, codes: frozenset[Code], missing: bool) -> CanonicalFilter:
    if not codes and not missing:
        return FALSE
    if missing and len(codes) == len(variable.codes):
        return TRUE
    return Atom(variable.name, codes, missing)


def canonical_text(f: CanonicalFilter) -> Any:
    """A JSON-able, order-stable form of a canonical filter."""
    if isinstance(f, Constant):
        return f.value
    if isinstance(f, Atom):
        return {"var": f.variable, "in": sorted(f.codes, key=str), "missing": f.missing}
    key = "and" if isinstance(f, AllOf) else "or"
    return {key: [canonical_text(o) for o in f.operands]}


class _Canonicaliser:
    def __init__(self, codebook: Codebook) -> None:
        self.codebook = codebook

    def visit(self, f: Filter, negate: bool = False) -> CanonicalFilter:
        if isinstance(f, Not):
            return self.visit(f.operand, not negate)
        if isinstance(f, (And, Or)):
            children = [self.visit(o, negate) for o in f.operands]
            conjunction = isinstance(f, And) != negate  # De Morgan under negation
            return _combine(children, conjunction=conjunction, codebook=self.codebook)
        dimension = self.codebook.dimension(f.variable)
        variable = dimension.variable
        codes, missing = self._leaf(f, dimension)
        if negate:
            codes, missing = frozenset(variable.codes) - codes, not missing
        return _atom(variable, codes, missing)

    def _leaf(self, f: Filter, dimension: Dimension) -> tuple[frozenset[Code], bool]:
        if isinstance(f, IsMissing):
            return frozenset(), True
        if isinstance(f, Eq):
            keys = frozenset({dimension.parse_value(f.value)})
            return dimension.source_codes_for(keys), False
        if isinstance(f, In):
            keys = frozenset(dimension.parse_value(v) for v in f.values)
            return dimension.source_codes_for(keys), False
        if isinstance(f, Range):
            variable = dimension.variable
            if dimension.derived is not None or variable.kind is not Kind.INTEGER:
                raise InvalidQueryError(
                    f"{f.variable}: a range needs an integer variable", variable=f.variable
                )
            for bound in (f.low, f.high):
                if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                    raise InvalidQueryError(
                        f"{f.variable}: range bound {bound!r} is not an integer",
                        variable=f.variable,
                    )
            low = -math.inf if f.low is None else f.low
            high = math.inf if f.high is None else f.high
            return frozenset(c for c in variable.codes if low <= int(c) <= high), False
        raise InvalidQueryError(f"unknown filter {type(f).__name__}")


def _combine(
    children: list[CanonicalFilter], *, conjunction: bool, codebook: Codebook
) -> CanonicalFilter:
    absorbing, neutral = (FALSE, TRUE) if conjunction else (TRUE, FALSE)
    kind = AllOf if conjunction else AnyOf
    flat: list[CanonicalFilter] = []
    for child in children:
        if isinstance(child, kind):
            flat.extend(child.operands)
        else:
            flat.append(child)
    atoms: dict[str, Atom] = {}
    others: dict[str, CanonicalFilter] = {}
    for child in flat:
        if child == absorbing:
            return absorbing
        if child == neutral:
            continue
        if isinstance(child, Atom):
            if child.variable in atoms:
                prior = atoms[child.variable]
                if conjunction:
                    codes, missing = prior.codes & child.codes, prior.missing and child.missing
                else:
                    codes, missing = prior.codes | child.codes, prior.missing or child.missing
                merged = _atom(codebook.variable(child.variable), codes, missing)
                if merged == absorbing:
                    return absorbing
                if merged == neutral:
                    del atoms[child.variable]
                    continue
                assert isinstance(merged, Atom)
                atoms[child.variable] = merged
            else:
                atoms[child.variable] = child
        else:
            others[json.dumps(canonical_text(child), sort_keys=True)] = child
    operands = list(atoms.values()) + list(others.values())
    if not operands:
        return neutral
    if len(operands) == 1:
        return operands[0]
    operands.sort(key=lambda o: json.dumps(canonical_text(o), sort_keys=True))
    return kind(tuple(operands))


# ---- the plan ----------------------------------------------------------------------------------

# The code a flag's count counts: a flag is set when it is 1 (engine.sql counts `flag = 1`).
FLAG_SET: Code = 1


@dataclass(frozen=True)
class Component:
    """One noisy integer vector, drawn by one mechanism: a count, a flag's count, a clamped sum,
    or a split count.

    The vector holds `blocks` consecutive blocks of one entry per cell. A split count has two:
    each cell's records that meet a condition, then the rest of the cell's records. `thresholded`
    components are counts that decide suppression; `sensitivity` is the most one privacy unit can
    change the whole vector in L1 (and so in L2), from the query's shape.
    """

    name: str
    aggregate: str  # "count", "flag", "count_split", "sum_shifted", "count_present"
    sensitivity: int
    thresholded: bool
    argument: Any = None  # flag variable, canonical condition, or summed variable
    blocks: int = 1
    shift: int = 0  # a clamped sum's: taken from every clamped value before summing


@dataclass(frozen=True)
class Plan:
    codebook: Codebook
    query: Query
    dimensions: tuple[Dimension, ...]
    where: CanonicalFilter
    components: tuple[Component, ...]
    mechanisms: tuple[Mechanism, ...]  # one per component
    loss: PrivacyLoss
    settings: Settings
    tau: int
    canonical: str  # canonical query text (JSON), independent of how the query was written
    fingerprint: str  # sha256 of the canonical text

    @property
    def group_cells(self) -> int:
        return math.prod(d.size for d in self.dimensions)

    @property
    def flag_names(self) -> tuple[str, ...]:
        if isinstance(self.query.measure, FlagCounts):
            return tuple(c.argument for c in self.components)
        return ()

    @property
    def cells(self) -> int:
        """Rows of the release: group cells, times flags for a flag-set measure."""
        return self.group_cells * max(1, len(self.flag_names))

    @property
    def vector_sizes(self) -> tuple[int, ...]:
        """The length of each component's vector: its blocks of one entry per group cell."""
        return tuple(self.group_cells * c.blocks for c in self.components)

    @property
    def measured_loss(self) -> Fraction:
        """The loss OpenDP's privacy maps state for this plan; never more than `loss`."""
        return sum((m.loss for m in self.mechanisms), Fraction(0))

    @property
    def count_mechanism(self) -> Mechanism:
        return next(
            m for m, c in zip(self.mechanisms, self.components, strict=True) if c.thresholded
        )

    @functools.cached_property
    def unreachable(self) -> np.ndarray:
        """Group cells (in row-major order, as released) no record can fall into, by the
        query's own terms: its WHERE clause rules out their keys, or two of their keys
        contradict each other (a country beside a region it is not in). Such a cell is empty
        whatever the data, so saying so reveals nothing about the records. (Two conditions on a
        variable the query does not group by are not checked against each other, so a cell
        only they rule out is not found.)"""
        return unreachable_cells(self.dimensions, self.where)

    @functools.cached_property
    def unreachable_row_mask(self) -> np.ndarray:
        """Rows of the release (in its order) no record can fall into, by the query's own terms.

        For a flag-set measure the release is each flag's block of group cells, flags in order,
        and a flag's row counts the records whose flag is set (FLAG_SET): it is empty when its
        cell is unreachable, and also when the query admits no record with that flag set in the
        cell (`where isSexualExploit = 0` for the row of isSexualExploit, or a group by the flag
        for its cells of 0 and missing). For any other measure, the rows are the group cells
        (`unreachable`). Like `unreachable`, this is arithmetic on the query alone."""
        flags = self.flag_names
        if not flags:
            return self.unreachable
        given = tuple((self.codebook.variable(flag), FLAG_SET) for flag in flags)
        return unreachable_cells(self.dimensions, self.where, given=given)

    @property
    def unreachable_rows(self) -> int:
        """Rows of the release no record can fall into (see `unreachable_row_mask`)."""
        return int(self.unreachable_row_mask.sum())


# ---- cells no record can reach ----------------------------------------------------------------
#
# A cell fixes the stored value of each variable it groups by to a set (one code, a region's
# countries, or missing). An atom of the WHERE clause on such a variable may hold in the cell when
# it admits some value of the set; on a variable the query does not group by, it may always hold.
# AND and OR combine these (canonical filters have no NOT), and a cell where the clause cannot
# hold is unreachable. A flag's rows of a flag-set count hold only records whose flag is set:
# there the flag's variable is fixed to that one value too, as if grouped by, in a layer of the
# grid of its own (one per flag), so every flag's rows are found in the same single pass.
#
# Each stored value lies in exactly one position along each dimension on its variable, so the
# cells where an atom may hold are found by scattering the values it admits to their cells: work
# in proportion to the variable's domain and the cells, with no Python loop over either (a query
# is planned, free, for every dry run).


def unreachable_cells(
    dimensions: tuple[Dimension, ...],
    where: CanonicalFilter,
    *,
    given: tuple[tuple[Variable, Code], ...] | None = None,
) -> np.ndarray:
    """The cells of `dimensions` (row-major) that no record meeting `where` can fall into.

    With `given`, one block of cells per (variable, code) in it, blocks first: the cells no
    record meeting `where` whose variable holds that code can fall into (a flag's rows of a
    flag-set count, which count only the records whose flag is set)."""
    shape = tuple(d.size for d in dimensions)
    layers = given or ()
    lead = (len(layers),) if given is not None else ()
    by_variable: dict[str, list[int]] = {}
    for axis, dimension in enumerate(dimensions):
        by_variable.setdefault(dimension.variable.name, []).append(axis)
    # For each variable a layer holds to one code: per layer, the stored values (codes in order,
    # then missing) the variable may take there, one only in a layer that holds it.
    pinned: dict[str, np.ndarray] = {}
    variable_of = {d.variable.name: d.variable for d in dimensions}
    for i, (variable, code) in enumerate(layers):
        variable_of[variable.name] = variable
        if variable.name not in pinned:
            pinned[variable.name] = np.ones((len(layers), len(variable.codes) + 1), dtype=bool)
        pinned[variable.name][i] = False
        pinned[variable.name][i, variable.code_index[code]] = True
    # Only a variable the clause reads, one grouped twice, or one a layer holds can rule a cell
    # out.
    mentioned = _variables(where)
    cells_of = {
        name: (axes, _cells_of_values(tuple(dimensions[a] for a in axes)))
        for name, axes in by_variable.items()
        if name in mentioned or len(axes) > 1 or name in pinned
    }
    if not cells_of and not mentioned & pinned.keys():
        return np.zeros(math.prod(lead + shape), dtype=bool)  # the common case, at no cost

    def spread(axes: list[int], admitted: np.ndarray) -> np.ndarray:
        """The cells along `axes` where some value in `admitted` (a mask over the variable's
        values, missing last; or one such mask per layer) lies, shaped to broadcast over the
        whole grid (layers first)."""
        positions = cells_of[dimensions[axes[0]].variable.name][1]
        full = [1] * len(shape)
        for axis in axes:
            full[axis] = shape[axis]
        size = math.prod(shape[a] for a in axes)
        if admitted.ndim == 1:
            grid = np.zeros(size, dtype=bool)
            grid[positions[admitted]] = True
            return grid.reshape(full)
        rows, values = np.nonzero(admitted)
        grid = np.zeros((admitted.shape[0], size), dtype=bool)
        grid[rows, positions[values]] = True
        return grid.reshape([admitted.shape[0], *full])

    def may_hold(f: CanonicalFilter) -> Any:
        if isinstance(f, Constant):
            return f.value
        if isinstance(f, Atom):
            if f.variable not in cells_of and f.variable not in pinned:
                return True
            admitted = _admitted(variable_of[f.variable], f)
            if f.variable in pinned:
                admitted = admitted & pinned[f.variable]  # one mask per layer
            if f.variable in cells_of:
                return spread(cells_of[f.variable][0], admitted)
            return admitted.any(axis=1).reshape([len(layers)] + [1] * len(shape))
        parts = [may_hold(o) for o in f.operands]
        combine = np.logical_and if isinstance(f, AllOf) else np.logical_or
        return functools.reduce(combine, parts)

    unreachable = ~np.asarray(may_hold(where), dtype=bool)
    for name, (axes, positions) in cells_of.items():
        if name in pinned:  # in a layer that holds it, only the cells where that code lies
            unreachable = unreachable | ~spread(axes, pinned[name])
        elif len(axes) > 1:  # a variable grouped twice (a country and its region)
            unreachable = unreachable | ~spread(axes, np.ones(positions.size, dtype=bool))
    return np.broadcast_to(unreachable, lead + shape).ravel()


def _variables(f: CanonicalFilter) -> set[str]:
    if isinstance(f, Atom):
        return {f.variable}
    if isinstance(f, Constant):
        return set()
    return set().union(*(_variables(o) for o in f.operands))


def _cells_of_values(dimensions: tuple[Dimension, ...]) -> np.ndarray:
    """For each stored value of the variable of `dimensions` (its codes in order, then missing),
    the cell it lies in among the cells of `dimensions` (row-major)."""
    positions = []
    for dimension in dimensions:
        if dimension.derived is None:  # the keys are the variable's codes, in order
            along = np.arange(dimension.size)
        else:
            along = np.array([*dimension.source_to_key, dimension.size - 1])
        positions.append(along)
    return np.ravel_multi_index(tuple(positions), tuple(d.size for d in dimensions))


def _admitted(variable: Variable, atom: Atom) -> np.ndarray:
    """Which of the variable's stored values (its codes in order, then missing) `atom` admits."""
    admitted = np.zeros(len(variable.codes) + 1, dtype=bool)
    admitted[[variable.code_index[code] for code in atom.codes]] = True
    admitted[-1] = atom.missing
    return admitted


def _check_limits(query: Query, settings: Settings) -> None:
    if len(query.by) > settings.max_dimensions:
        raise LimitExceededError(
            f"{len(query.by)} group-by dimensions exceed the maximum of {settings.max_dimensions}"
        )
    filters = [query.where] if query.where is not None else []
    if isinstance(query.measure, Proportion):
        filters.append(query.measure.condition)
    for f in filters:
        if filter_depth(f) > settings.max_filter_depth:
            raise LimitExceededError.filter_depth(settings.max_filter_depth)
        if filter_terms(f) > settings.max_filter_terms:
            raise LimitExceededError.filter_terms(settings.max_filter_terms)


def _numeric(codebook: Codebook, name: str) -> Variable:
    variable = codebook.dimension(name).variable
    if codebook.dimension(name).derived is not None or variable.kind is not Kind.INTEGER:
        raise InvalidQueryError(
            f"{name}: sums and means need an integer variable with a codebook range",
            variable=name,
        )
    assert variable.low is not None and variable.high is not None
    if variable.low == variable.high:
        raise InvalidQueryError(f"{name}: its codebook range holds a single value", variable=name)
    return variable


def _components(query: Query, codebook: Codebook, canon: _Canonicaliser) -> list[Component]:
    unit = codebook.privacy_unit.max_rows_per_person if codebook.privacy_unit.id_column else 1
    measure = query.measure
    if isinstance(measure, Count):
        return [Component("count", "count", unit, True)]
    if isinstance(measure, FlagCounts):
        flag_set = codebook.flag_set(measure.flag_set)
        return [Component(flag, "flag", unit, True, flag) for flag in flag_set.flags]
    if isinstance(measure, Proportion):
        # One vector [N, C]: each cell's records that meet the condition (N), then the rest (C =
        # the cell's count minus N). Every record lands in exactly one entry, so a person moves
        # the whole vector by at most `unit`, as a count does: one mechanism at the full loss
        # draws it. Drawing N and the cell's count apart, at half the loss each, gave twice this
        # noise under pure DP (sqrt 2 times under zCDP). The cell's count is N' + C'.
        condition = canon.visit(measure.condition)
        return [Component("split", "count_split", unit, True, condition, blocks=2)]
    variable = _numeric(codebook, measure.variable)
    assert variable.low is not None and variable.high is not None
    low, high = variable.low, variable.high
    # Each clamped value x is summed as x - shift, so a record moves the sum by at most the
    # larger of shift - low and high - shift. A mean is shift + sum / count: the range's middle
    # halves the sum's sensitivity, and the count's noise weighs |mean - shift|, at most half
    # the range. A sum is shifted sum + shift x count: its spread is the sum's noise plus
    # |shift| times the count's, least at the point of the range nearest zero.
    shift = (low + high) // 2 if isinstance(measure, Mean) else min(max(0, low), high)
    reach = max(shift - low, high - shift)
    return [
        Component("sum", "sum_shifted", unit * reach, False, variable, shift=shift),
        Component("count", "count_present", unit, True, variable),
    ]


def plan_query(query: Query, codebook: Codebook, settings: Settings, loss: PrivacyLoss) -> Plan:
    """Validate `query` against the codebook and settings and price it at `loss`."""
    if loss.accounting is not settings.accounting:
        raise InvalidQueryError(
            f"this deployment accounts in {settings.accounting.value}; "
            f"a {loss.symbol} loss cannot be charged"
        )
    _check_limits(query, settings)
    dimensions = tuple(codebook.dimension(name) for name in query.by)
    canon = _Canonicaliser(codebook)
    components = _components(query, codebook, canon)
    cells = math.prod(d.size for d in dimensions) * (
        len(components) if isinstance(query.measure, FlagCounts) else 1
    )
    if cells > settings.max_cells:
        raise LimitExceededError(
            f"the query spans {cells} cells, more than the maximum of {settings.max_cells}"
        )
    where = canon.visit(query.where) if query.where is not None else TRUE
    if where == FALSE:
        # Decided by the codebook alone, so refusing says nothing about the data, and spares a
        # charge for a table that is noise around zero in every cell.
        raise InvalidQueryError(
            "the filter admits no record under the codebook (its conditions contradict each "
            "other), so every cell would be zero; nothing was charged"
        )

    # Equal shares: each component is one histogram whose L1 sensitivity the shape fixes.
    share = loss.amount / len(components)
    mechanisms = tuple(
        calibrate(loss.accounting, sensitivity=c.sensitivity, budget=share) for c in components
    )
    count_mechanism = next(m for m, c in zip(mechanisms, components, strict=True) if c.thresholded)
    tau = settings.k + count_mechanism.distribution.suppression_margin(settings.beta)

    canonical = json.dumps(
        {
            # Its content, not only its name: an edited codebook never replays older releases.
            "codebook": codebook.identity,
            "measure": _canonical_measure(query, components),
            # Group-by order does not change what is released, only its presentation.
            "by": sorted(query.by),
            "where": canonical_text(where),
            # The suppression rule shapes what is published: a release made under another k or
            # beta (before a custodian raised k, say) is never replayed for this one.
            "suppression": {"k": settings.k, "beta": settings.beta},
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    plan = Plan(
        codebook=codebook,
        query=query,
        dimensions=tuple(sorted(dimensions, key=lambda d: d.name)),
        where=where,
        components=tuple(components),
        mechanisms=mechanisms,
        loss=loss,
        settings=settings,
        tau=tau,
        canonical=canonical,
        fingerprint=hashlib.sha256(canonical.encode()).hexdigest(),
    )
    if plan.unreachable_row_mask.all():
        # As for a filter that admits nothing: the table is known before any data is read, so
        # it is refused rather than charged (and the release computes the mask anyway).
        raise InvalidQueryError(
            "the query's own terms rule out every cell (its filter admits no record in any of "
            "them), so every cell would be stated empty; nothing was charged"
        )
    return plan


def _canonical_measure(query: Query, components: list[Component]) -> Any:
    measure = query.measure
    if isinstance(measure, Count):
        return "count"
    if isinstance(measure, FlagCounts):
        return {"flag_counts": measure.flag_set}
    if isinstance(measure, Proportion):
        return {"proportion": canonical_text(components[0].argument)}
    kind = "sum" if isinstance(measure, Sum) else "mean"
    assert isinstance(measure, (Sum, Mean))
    return {kind: measure.variable}
