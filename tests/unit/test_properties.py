"""Property tests: sensitivity holds on random neighbouring datasets; keys come from the codebook.

For random datasets and a random record (extreme values included) added to them, each noisy
component's true vector moves by at most the sensitivity the planner declared, in L1. This is
what makes the noise calibrated: if the planner understated a sensitivity, this would fail.
"""

from __future__ import annotations

import threading
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codebook import Kind, default_codebook
from engine.engine import Engine
from engine.loss import PrivacyLoss
from engine.query import Count, Eq, FlagCounts, Mean, Proportion, Query, Sum
from engine.sql import Statement, create_table

CODEBOOK = default_codebook()
COLUMNS = [
    "gender",
    "ageBroad",
    "citizenship",
    "yearOfRegistration",
    "isSexualExploit",
    "meansOfControlDebtBondage",
    "meansOfControlThreats",
    "meansOfControlOther",
    "recruiterRelationFamily",
]


class MemoryBackend:
    """A throwaway in-memory DuckDB holding exactly the given rows."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.connection = duckdb.connect()
        self.connection.execute(create_table(CODEBOOK))
        if rows:
            table = pa.table({c: [r.get(c) for r in rows] for c in COLUMNS})
            self.connection.register("incoming", table)
            names = ", ".join(f'"{c}"' for c in COLUMNS)
            self.connection.execute(f"INSERT INTO records ({names}) SELECT {names} FROM incoming")

    def run(
        self, statement: Statement, *, cancel: threading.Event | None = None
    ) -> dict[str, np.ndarray]:
        return self.connection.execute(statement.text, list(statement.parameters)).fetchnumpy()

    def data_version(self) -> str:
        return "memory"

    def codebook(self) -> str | None:
        return None  # rows written here from CODEBOOK itself

    def dataset(self) -> str | None:
        return None

    def load_id(self) -> str | None:
        return None


def value_strategy(name: str) -> st.SearchStrategy[Any]:
    variable = CODEBOOK.variable(name)
    if variable.kind is Kind.INTEGER:
        assert variable.low is not None and variable.high is not None
        # Extreme values: the bounds themselves, and the first and last code.
        return st.one_of(
            st.none(),
            st.sampled_from([variable.low, variable.high]),
            st.integers(variable.low, variable.high),
        )
    return st.one_of(st.none(), st.sampled_from(list(variable.codes)))


RECORD = st.fixed_dictionaries({name: value_strategy(name) for name in COLUMNS})

QUERIES = [
    Query(Count(), by=("gender", "ageBroad")),
    Query(Count(), by=("citizenshipRegion",), where=Eq("isSexualExploit", 1)),
    Query(FlagCounts("meansOfControl"), by=("gender",)),
    Query(Proportion(Eq("recruiterRelationFamily", 1)), by=("majorityFromAge",)),
    Query(Sum("yearOfRegistration"), by=("isSexualExploit",)),
    Query(Mean("yearOfRegistration")),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(RECORD, max_size=30), extra=RECORD, query_index=st.integers(0, len(QUERIES) - 1)
)
def test_one_record_moves_each_component_by_at_most_its_sensitivity(
    rows: list[dict[str, Any]], extra: dict[str, Any], query_index: int
) -> None:
    query = QUERIES[query_index]
    loss = PrivacyLoss.pure("1")
    without = Engine(MemoryBackend(rows), codebook=CODEBOOK)
    with_extra = Engine(MemoryBackend([*rows, extra]), codebook=CODEBOOK)
    plan = without.plan(query, loss=loss)
    before = without._true_components(plan)
    after = with_extra._true_components(plan)
    for component, a, b in zip(plan.components, before, after, strict=True):
        assert int(np.abs(a - b).sum()) <= component.sensitivity, component.name


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(RECORD, max_size=20), query_index=st.integers(0, len(QUERIES) - 1))
def test_released_keys_are_always_in_the_codebook_domain(
    rows: list[dict[str, Any]], query_index: int
) -> None:
    query = QUERIES[query_index]
    engine = Engine(MemoryBackend(rows), codebook=CODEBOOK)
    answer = engine.answer(engine.plan(query, loss=PrivacyLoss.pure("1")))
    for name in query.by:
        domain = set(CODEBOOK.dimension(name).keys) | {None}
        assert set(answer.table[name].to_pylist()) <= domain
    if isinstance(query.measure, FlagCounts):
        flags = set(CODEBOOK.flag_set(query.measure.flag_set).flags)
        assert set(answer.table["flag"].to_pylist()) == flags
