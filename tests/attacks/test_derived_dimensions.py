"""Derived dimensions and the cells a query's own terms leave empty, read against an independent
reading of the query.

The M49 regions (three levels) of a country and `majorityFromAge` of an age band are computed
from a stored variable, and a query may group by one and filter on its source, or on another
level of the same source, at once. The engine then does three things that must agree with each
other and with what the query means: its SQL groups by the source and folds source codes into
derived keys; its canonical filter rewrites derived values as source codes and pushes NOT onto
leaves (keeping missing, veil's rule); and the planner states as exactly 0, status `empty`,
every cell (or flag row) the filter rules out, without reading data. A cell stated empty that a
record can fall into would publish an exact, noiseless count; a component that counts other
records than the query names would be a release of something else than what was charged.

The attack asks several hundred random queries (every measure; group-bys over the three region
levels, the country, `majorityFromAge`, the age band, gender, a flag and the year; filters of
Eq, In, IsMissing and Range leaves under And, Or and Not, on derived and source variables
alike) of a data file holding every combination of a dozen countries (every region, the unknown
country `00` and missing), every age band, gender and two flags, and compares what the engine
computes with a plain Python reading of the query over the same rows:

- every component vector the statement returns equals the one the reading gives;
- no row called unreachable holds a record;
- in the answer (real OpenDP noise), the rows with status `empty` are exactly those rows, and a
  count's or sum's value there is exactly 0 [0, 0].

Deterministic (fixed seeds, and nothing compared depends on the noise): it fails by chance with
probability 0. The control tests break the engine in two plausible ways (NOT dropping missing
values; a derived dimension's missing key placed in its first group when finding empty cells)
and check the same comparison finds each.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from engine import planner
from engine.backend import DuckDBBackend
from engine.codebook import Code, Dimension, default_codebook
from engine.engine import Engine
from engine.errors import InvalidQueryError
from engine.loss import PrivacyLoss
from engine.planner import Plan
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
)
from tests.conftest import write_database

CODEBOOK = default_codebook()
LOSS = PrivacyLoss.pure("1")
# Every region is present (Antarctica through AQ, Unknown through 00), some several times over
# their sub-regions; DE and JP are asked about but hold no record.
COUNTRIES: tuple[str | None, ...] = (
    "FJ", "AU", "FR", "UA", "PH", "US", "BR", "MX", "NG", "AQ", "00", None,
)
ASKED_COUNTRIES = (*[c for c in COUNTRIES if c], "DE", "JP")
YEARS = (None, 2002, 2010, 2021)
GROUPINGS = (
    "citizenship", "citizenshipRegion", "citizenshipSubregion", "citizenshipIntermediateRegion",
    "majorityFromAge", "ageBroad", "gender", "isSexualExploit", "yearOfRegistration",
)
FILTERED = (*GROUPINGS, "majorityStatus")


def _rows() -> list[dict[str, Any]]:
    rng = random.Random(5)
    combos = itertools.product(
        COUNTRIES,
        (*CODEBOOK.variable("ageBroad").codes, None),
        (*CODEBOOK.variable("gender").codes, None),
        (0, 1, None),
        (0, 1, None),
    )
    return [
        {
            "citizenship": country, "ageBroad": age, "gender": gender,
            "isSexualExploit": sexual, "isForcedLabour": labour,
            "yearOfRegistration": rng.choice(YEARS),
            "majorityStatus": rng.choice([*CODEBOOK.variable("majorityStatus").codes, None]),
            "isOtherExploit": rng.choice([0, 1, None]),
        }
        for country, age, gender, sexual, labour in combos
    ]


ROWS = _rows()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = write_database(tmp_path_factory.mktemp("derived") / "combos.duckdb", ROWS)
    backend = DuckDBBackend(path)
    yield Engine(backend, codebook=CODEBOOK)
    backend.close()


# ---- the independent reading -------------------------------------------------------------------


def _value(row: dict[str, Any], name: str) -> Code | None:
    """The key of `name` (a stored or derived dimension) for a row; None when missing."""
    dimension = CODEBOOK.dimension(name)
    stored = row.get(dimension.variable.name)
    if stored is None or dimension.derived is None:
        return stored  # type: ignore[no-any-return]
    return dimension.derived.mapping[stored]


def holds(f: Filter, row: dict[str, Any]) -> bool:
    """Two-valued: a leaf is membership of the row's value in what it names (missing is a value
    only IsMissing names), and NOT is plain negation, so a negated leaf keeps missing values."""
    if isinstance(f, Not):
        return not holds(f.operand, row)
    if isinstance(f, And):
        return all(holds(o, row) for o in f.operands)
    if isinstance(f, Or):
        return any(holds(o, row) for o in f.operands)
    value = _value(row, f.variable)
    if isinstance(f, IsMissing):
        return value is None
    if value is None:
        return False
    dimension = CODEBOOK.dimension(f.variable)
    if isinstance(f, Eq):
        return bool(value == dimension.parse_value(f.value))
    if isinstance(f, In):
        return value in {dimension.parse_value(v) for v in f.values}
    assert isinstance(f, Range) and isinstance(value, int)
    return (f.low is None or value >= f.low) and (f.high is None or value <= f.high)


def _cell(dimensions: tuple[Dimension, ...], row: dict[str, Any]) -> int:
    index = 0
    for dimension in dimensions:
        value = _value(row, dimension.name)
        position = len(dimension.keys) if value is None else dimension.keys.index(value)
        index = index * dimension.size + position
    return index


def read(plan: Plan) -> list[np.ndarray]:
    """Each component's vector as the query reads, row by row, in Python."""
    n = plan.group_cells
    vectors = [np.zeros(n * c.blocks, dtype=np.int64) for c in plan.components]
    where, measure = plan.query.where, plan.query.measure
    for row in ROWS:
        if where is not None and not holds(where, row):
            continue
        cell = _cell(plan.dimensions, row)
        for vector, component in zip(vectors, plan.components, strict=True):
            if component.aggregate == "count":
                vector[cell] += 1
            elif component.aggregate == "flag":
                vector[cell] += row.get(component.argument) == 1
            elif component.aggregate == "count_split":
                assert isinstance(measure, Proportion)
                vector[cell if holds(measure.condition, row) else n + cell] += 1
            else:
                year = row.get(component.argument.name)
                if year is None:
                    continue
                if component.aggregate == "count_present":
                    vector[cell] += 1
                else:
                    low, high = component.argument.low, component.argument.high
                    vector[cell] += min(max(year, low), high) - component.shift
    return vectors


def _rows_counted(plan: Plan, vectors: list[np.ndarray]) -> np.ndarray:
    """The count behind each row of the release: each flag's, a share's N + C, else the count."""
    counts = [v for v, c in zip(vectors, plan.components, strict=True) if c.thresholded]
    if isinstance(plan.query.measure, FlagCounts):
        return np.concatenate(counts)
    (count,) = counts
    return count.reshape(-1, plan.group_cells).sum(axis=0)


def problems(engine: Engine, query: Query) -> list[str]:
    """Where the engine's plan, statement and answer disagree with the reading of `query`."""
    plan = engine.plan(query, loss=LOSS)
    found = []
    exact = engine._true_components(plan)
    expected = read(plan)
    for component, got, want in zip(plan.components, exact, expected, strict=True):
        if not np.array_equal(got, want):
            found.append(f"component {component.name} differs from the reading")
    empty = plan.unreachable_row_mask
    if (empty & (_rows_counted(plan, expected) > 0)).any():
        found.append("a row stated empty holds records")
    answer = engine.answer(plan)
    status = np.asarray(answer.table.column("status").to_pylist())
    if not np.array_equal(status == "empty", empty):
        found.append("the empty status differs from the rows the query rules out")
    if isinstance(query.measure, (Count, FlagCounts, Sum)) and empty.any():
        for name in ("value", "ci_low", "ci_high"):
            stated = np.asarray(answer.table.column(name).to_pylist(), dtype=object)[empty]
            if any(v != 0 for v in stated):
                found.append(f"an empty row's {name} is not exactly 0")
    return found


# ---- random queries ----------------------------------------------------------------------------


def _leaf(rng: random.Random) -> Filter:
    name = rng.choice(FILTERED)
    if name == "yearOfRegistration" and rng.random() < 0.5:
        low = rng.choice([None, 2002, 2005, 2010])
        high = rng.choice([2010, 2021] if low is None else [None, 2010, 2021])
        return Range(name, low, high)
    keys: list[Code] = list(CODEBOOK.dimension(name).keys)
    if name == "citizenship":
        keys = list(ASKED_COUNTRIES)
    kind = rng.randrange(3)
    if kind == 0:
        return Eq(name, rng.choice(keys))
    if kind == 1:
        return In(name, rng.sample(keys, rng.randint(1, min(4, len(keys)))))
    return IsMissing(name)


def _filter(rng: random.Random, depth: int) -> Filter:
    if depth == 0 or rng.random() < 0.35:
        f = _leaf(rng)
    else:
        combine = And if rng.random() < 0.5 else Or
        f = combine(*(_filter(rng, depth - 1) for _ in range(rng.randint(2, 3))))
    return Not(f) if rng.random() < 0.25 else f


def queries(seed: int, count: int) -> Iterator[Query]:
    rng = random.Random(seed)
    for _ in range(count):
        measure = rng.choice([
            Count(), FlagCounts("exploitationType"), Proportion(_filter(rng, 2)),
            Sum("yearOfRegistration"), Mean("yearOfRegistration"),
        ])
        by = rng.sample(GROUPINGS, rng.randint(0, 2))
        yield Query(measure, by=by, where=_filter(rng, 3) if rng.random() < 0.9 else None)


def _run(
    engine: Engine, seed: int, count: int, *, first: bool = False
) -> tuple[list[str], int, int]:
    """Problems found over `count` random queries (up to the first query with any, if `first`);
    how many were planned, and how many rows they stated empty."""
    found, planned, empty = [], 0, 0
    for query in queries(seed, count):
        try:
            plan = engine.plan(query, loss=LOSS)
        except InvalidQueryError:
            continue  # a filter no record can meet, refused from the codebook alone
        planned += 1
        empty += plan.unreachable_rows
        found += [f"{p}: {query}" for p in problems(engine, query)]
        if first and found:
            break
    return found, planned, empty


def test_derived_keys_filters_and_empty_cells_mean_what_the_query_says(engine: Engine) -> None:
    found, planned, empty = _run(engine, seed=17, count=400)
    assert found == [], found[:3]
    # The queries did what the attack needs: most were answered, and many rows were stated.
    assert planned > 300 and empty > 1000


def test_a_derived_filter_and_its_source_spelling_share_one_release(engine: Engine) -> None:
    # The same records asked for through the derived key and through its source codes reach
    # one fingerprint (one release, one charge); the negation, which keeps missing age bands,
    # does not.
    minors = [c for c, g in CODEBOOK.dimension("majorityFromAge").derived.mapping.items()  # type: ignore[union-attr]
              if g == "Minor"]
    europe = [c for c, g in CODEBOOK.dimension("citizenshipRegion").derived.mapping.items()  # type: ignore[union-attr]
              if g == "Europe"]
    spellings = [
        And(Eq("majorityFromAge", "Minor"), Eq("citizenshipRegion", "Europe")),
        And(In("ageBroad", list(reversed(minors))), In("citizenship", europe)),
        Not(Or(Not(In("ageBroad", minors)), Not(Eq("citizenshipRegion", "Europe")))),
    ]
    prints = {engine.plan(Query(Count(), by=("gender",), where=w), loss=LOSS).fingerprint
              for w in spellings}
    assert len(prints) == 1
    other = And(Not(Eq("majorityFromAge", "Adult")), Eq("citizenshipRegion", "Europe"))
    assert engine.plan(Query(Count(), by=("gender",), where=other), loss=LOSS).fingerprint \
        not in prints
    # And each spelling counts the same records as the reading does.
    for where in [*spellings, other]:
        assert problems(engine, Query(Count(), by=("gender", "majorityFromAge"), where=where)) \
            == []


# ---- the comparison finds what it looks for ----------------------------------------------------


@pytest.fixture
def negation_drops_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOT read as SQL reads it: the complement without the missing values."""
    original = planner._Canonicaliser.visit

    def visit(self: planner._Canonicaliser, f: Filter, negate: bool = False) -> Any:
        result = original(self, f, negate)
        if negate and isinstance(result, planner.Atom) and result.missing:
            variable = self.codebook.variable(result.variable)
            return planner._atom(variable, result.codes, False)
        return result

    monkeypatch.setattr(planner._Canonicaliser, "visit", visit)


@pytest.fixture
def missing_key_in_first_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding empty cells, a derived dimension's missing key taken for its first group."""

    def cells_of_values(dimensions: tuple[Dimension, ...]) -> np.ndarray:
        positions = []
        for dimension in dimensions:
            if dimension.derived is None:
                positions.append(np.arange(dimension.size))
            else:
                positions.append(np.array([*dimension.source_to_key, 0]))
        return np.ravel_multi_index(tuple(positions), tuple(d.size for d in dimensions))

    monkeypatch.setattr(planner, "_cells_of_values", cells_of_values)


@pytest.mark.parametrize(
    ("broken", "symptom"),
    [
        ("negation_drops_missing", "differs from the reading"),
        ("missing_key_in_first_group", "a row stated empty holds records"),
    ],
)
def test_the_comparison_finds_a_broken_engine(
    engine: Engine, broken: str, symptom: str, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue(broken)
    found, _, _ = _run(engine, seed=17, count=400, first=True)
    assert any(symptom in problem for problem in found), found[:3]
