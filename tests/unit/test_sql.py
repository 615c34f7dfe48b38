"""SQL building: one statement per query, values only as bound parameters."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from engine.codebook import Codebook, default_codebook
from engine.engine import Engine
from engine.loss import PrivacyLoss
from engine.planner import plan_query
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
from engine.settings import Settings
from engine.sql import (
    build,
    checkpoint,
    create_table,
    generator_settings,
    metadata_table,
    quote,
    read_metadata,
    record_metadata,
)

CODEBOOK = default_codebook()


def statement(query: Query):  # type: ignore[no-untyped-def]
    return build(plan_query(query, CODEBOOK, Settings(), PrivacyLoss.pure("1")))


def test_values_never_appear_in_the_text() -> None:
    s = statement(
        Query(
            Count(),
            by=("gender",),
            where=And(Eq("Datasource", "Hotline"), In("citizenship", ["US", "NA"])),
        )
    )
    assert "Hotline" not in s.text and "'US'" not in s.text and "'NA'" not in s.text
    assert "Hotline" in s.parameters and "US" in s.parameters and "NA" in s.parameters
    assert s.text.count("?") == len(s.parameters)


def test_one_statement_with_raw_keys_and_one_column_per_component() -> None:
    s = statement(Query(FlagCounts("sexType"), by=("gender", "ageBroad")))
    assert re.findall(r" AS (k\d+|c\d+)\b", s.text) == ["k0", "k1", "c0", "c1", "c2", "c3"]
    assert s.text.endswith('GROUP BY "ageBroad", "gender"')
    assert ";" not in s.text


def test_a_derived_dimension_groups_by_its_source_once() -> None:
    s = statement(Query(Count(), by=("citizenship", "citizenshipRegion")))
    assert s.text.endswith('GROUP BY "citizenship"')


def test_ungrouped_queries_return_one_row() -> None:
    s = statement(Query(Count(), where=Eq("gender", "Male")))
    assert "GROUP BY" not in s.text


def test_missing_and_negation_are_written_null_safely() -> None:
    s = statement(Query(Count(), where=Not(Eq("gender", "Male"))))
    assert "IS NULL OR" in s.text
    s = statement(Query(Count(), where=IsMissing("gender")))
    assert '"gender" IS NULL' in s.text


def test_sums_clamp_to_codebook_bounds() -> None:
    s = statement(Query(Mean("yearOfRegistration")))
    assert "least(greatest(" in s.text
    assert 2002 in s.parameters and 2021 in s.parameters


def test_proportion_condition_is_bound_too() -> None:
    s = statement(Query(Proportion(Eq("Datasource", "Hotline")), by=("gender",)))
    assert "CASE WHEN" in s.text and "Hotline" not in s.text and "Hotline" in s.parameters


def test_an_integer_range_is_one_between() -> None:
    s = statement(Query(Count(), where=Range("yearOfRegistration", low=2007)))
    assert '"yearOfRegistration" BETWEEN ? AND ?' in s.text and " IN (" not in s.text
    assert s.parameters == (2007, 2021)
    s = statement(Query(Count(), where=Not(Range("yearOfRegistration", 2005, 2010))))
    assert '"yearOfRegistration" IS NULL OR "yearOfRegistration" NOT BETWEEN ? AND ?' in s.text
    assert s.parameters == (2005, 2010)
    # A list of one code is an equality (its complement of one, an inequality).
    s = statement(Query(Count(), where=Not(In("yearOfRegistration", [2010]))))
    assert '("yearOfRegistration" IS NULL OR "yearOfRegistration" <> ?)' in s.text
    s = statement(Query(Count(), where=Range("yearOfRegistration", 2010, 2010)))
    assert '("yearOfRegistration" = ?)' in s.text and s.parameters == (2010,)


YEARS = range(2002, 2022)  # the codebook's domain of yearOfRegistration


@pytest.mark.parametrize(
    ("where", "matches"),
    [
        (Range("yearOfRegistration", low=2007), lambda y: y is not None and y >= 2007),
        (Range("yearOfRegistration", high=2003), lambda y: y is not None and y <= 2003),
        (Range("yearOfRegistration", 2010, 2010), lambda y: y == 2010),
        (
            Not(Range("yearOfRegistration", 2005, 2010)),
            lambda y: y is None or not 2005 <= y <= 2010,
        ),
        (Not(Range("yearOfRegistration", low=2003)), lambda y: y is None or y < 2003),
        (In("yearOfRegistration", [2002, 2004, 2021]), lambda y: y in (2002, 2004, 2021)),
        # All but one year: an inequality, with the missing year or without it.
        (Not(In("yearOfRegistration", [2010])), lambda y: y is None or y != 2010),
        (
            In("yearOfRegistration", [y for y in YEARS if y != 2010]),
            lambda y: y is not None and y != 2010,
        ),
        (
            Or(Range("yearOfRegistration", high=2004), Range("yearOfRegistration", low=2019)),
            lambda y: y is not None and (y <= 2004 or y >= 2019),
        ),
        (Range("yearOfRegistration", 2002, 2021), lambda y: y is not None),
    ],
)
def test_integer_conditions_select_exactly_their_codes(
    where: Filter, matches: Callable[[int | None], bool]
) -> None:
    # One record per year of the domain and one with the year missing: each way of writing a
    # set of years (IN, NOT IN, BETWEEN, NOT BETWEEN) must count exactly the years in the set.
    connection = duckdb.connect()
    connection.execute(create_table(CODEBOOK))
    for year in [*YEARS, None]:
        connection.execute('INSERT INTO records ("yearOfRegistration") VALUES (?)', [year])
    s = statement(Query(Count(), where=where))
    (counted,) = connection.execute(s.text, list(s.parameters)).fetchone() or (None,)
    assert counted == sum(1 for year in [*YEARS, None] if matches(year))


@pytest.mark.parametrize("measure", [Sum, Mean])
def test_a_missing_value_adds_nothing_to_a_shifted_sum(measure: type[Sum] | type[Mean]) -> None:
    # A range across zero: a Mean shifts by its middle (1), a Sum by 0; a missing value must
    # add nothing to the sum, as it adds nothing to the count beside it.
    codebook = Codebook.from_mapping(
        {
            "name": "signed",
            "version": "1",
            "variables": [{"name": "x", "type": "integer", "range": [-5, 8]}],
        }
    )
    connection = duckdb.connect()
    connection.execute(create_table(codebook))
    present = [2, 2, -5, 8, 7]
    for value in [*present, None, None, None]:
        connection.execute('INSERT INTO records ("x") VALUES (?)', [value])
    plan = plan_query(Query(measure("x")), codebook, Settings(), PrivacyLoss.pure("1"))
    s = build(plan)
    row = connection.execute(s.text, list(s.parameters)).fetchone()
    assert row is not None
    (total,) = [c for c in plan.components if c.aggregate == "sum_shifted"]
    by_name = dict(zip([c.name for c in plan.components], row, strict=True))
    assert by_name["sum"] == sum(v - total.shift for v in present)
    if measure is Mean:
        assert total.shift == 1 and by_name["count"] == len(present)


def test_identifiers_are_checked() -> None:
    assert quote("gender") == '"gender"'
    for bad in ['x"; DROP TABLE records; --', "a b", "", "1abc"]:
        with pytest.raises(ValueError):
            quote(bad)


def test_every_statement_runs_on_the_typed_table() -> None:
    connection = duckdb.connect()
    connection.execute(create_table(CODEBOOK))
    for query in [
        Query(Count(), by=("gender", "citizenshipRegion")),
        Query(FlagCounts("meansOfControl"), by=("majorityFromAge",)),
        Query(Proportion(Eq("isSexualExploit", 1)), by=("yearOfRegistration",)),
        Query(Mean("yearOfRegistration"), by=("isAbduction",), where=Not(IsMissing("gender"))),
    ]:
        s = statement(query)
        assert connection.execute(s.text, list(s.parameters)).fetchall() in ([], [(0,) + (0,) * 0])


def test_a_data_file_records_and_replaces_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "data.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute(metadata_table())
        connection.execute("INSERT INTO veil_metadata VALUES ('other', 'kept, not read')")
        for version in ("v1", "v2"):  # recorded again, each key's value is replaced
            s = record_metadata(
                data_version=version, codebook="ctdc@7:abc", dataset="it's", load_id="l-1"
            )
            assert "v2" not in s.text and "it's" not in s.text
            connection.execute(s.text, s.parameters)
        connection.execute(checkpoint())
    with duckdb.connect(str(path), read_only=True) as connection:
        s = read_metadata()
        recorded = dict(connection.execute(s.text, s.parameters).fetchall())
    assert recorded == {
        "data_version": "v2", "codebook": "ctdc@7:abc", "dataset": "it's", "load_id": "l-1"
    }


def test_generator_settings_cap_memory_and_refuse_anything_but_a_size() -> None:
    connection, reference = duckdb.connect(), duckdb.connect()
    for setting in generator_settings("256MB"):
        connection.execute(setting)
    reference.execute("SET memory_limit = '256MB'")
    limit = "SELECT current_setting('memory_limit')"
    assert connection.execute(limit).fetchone() == reference.execute(limit).fetchone()
    assert connection.execute(limit).fetchone() != duckdb.connect().execute(limit).fetchone()
    assert connection.execute("SELECT current_setting('enable_progress_bar')").fetchone() == (
        False,
    )
    for bad in ["512MB'; SET enable_external_access = true; --", "lots", "", "512"]:
        with pytest.raises(ValueError):
            generator_settings(bad)


def _person_codebook(bound: int) -> Codebook:
    return Codebook.from_mapping(
        {
            "name": "people",
            "version": "1",
            "privacy_unit": {"id_column": "personId", "max_rows_per_person": bound},
            "variables": [
                {"name": "personId", "type": "integer", "range": [1, 1000]},
                {
                    "name": "gender",
                    "type": "category",
                    "categories": [{"code": "Male"}, {"code": "Female"}],
                },
            ],
        }
    )


@pytest.mark.parametrize("bound", [1, 2])
def test_rows_per_person_are_bounded_and_a_record_without_id_is_its_own_person(
    make_engine: Callable[..., Engine], bound: int
) -> None:
    codebook = _person_codebook(bound)
    rows = (
        [{"personId": 1, "gender": "Male"}] * 5  # one person, five records
        + [{"personId": None, "gender": "Male"}] * 40  # forty people, no id recorded
        + [{"personId": None, "gender": "Female"}] * 3
    )
    engine = make_engine(rows, codebook=codebook)
    plan = engine.plan(Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("1"))
    assert plan.components[0].sensitivity == bound
    (counts,) = engine._true_components(plan)  # keys: Male, Female, missing
    assert counts.tolist() == [bound + 40, 3, 0]
    # Removing one record without an id moves one cell by one, never by more: before the fix
    # all NULL ids were one "person" and removing one pulled another into its kept rows.
    fewer = make_engine(rows[:-1], codebook=codebook)
    (without,) = fewer._true_components(
        fewer.plan(Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("1"))
    )
    assert int(abs(counts - without).sum()) == 1


def test_the_rows_a_person_keeps_do_not_depend_on_the_order_they_are_stored_in(
    make_engine: Callable[..., Engine],
) -> None:
    # Kept by a hash of each row's own values: a variable named like the table (`records`)
    # must not stand in for the row, or rows tying on it would be kept in storage order.
    codebook = Codebook.from_mapping(
        {
            "name": "people",
            "version": "1",
            "privacy_unit": {"id_column": "personId", "max_rows_per_person": 1},
            "variables": [
                {"name": "personId", "type": "integer", "range": [1, 1000]},
                {"name": "records", "type": "integer", "range": [0, 9]},
                {
                    "name": "gender",
                    "type": "category",
                    "categories": [{"code": "Male"}, {"code": "Female"}],
                },
            ],
        }
    )
    rows = [
        {"personId": person, "records": 1, "gender": gender}
        for person in range(1, 41)
        for gender in ("Male", "Female")
    ]
    query = Query(Count(), by=("gender",))
    kept = []
    for ordered in (rows, rows[::-1]):
        engine = make_engine(ordered, codebook=codebook)
        (counts,) = engine._true_components(engine.plan(query, loss=PrivacyLoss.pure("1")))
        kept.append(counts.tolist())
    assert kept[0] == kept[1]
    assert sum(kept[0]) == 40 and 0 < kept[0][0] < 40  # one row each, chosen by the hash



@pytest.mark.parametrize(
    ("measure", "column", "value"),
    [
        (FlagCounts("sexType"), CODEBOOK.flag_set("sexType").flags[0], 1),
        (Sum("yearOfRegistration"), "yearOfRegistration", 2010),
        (Mean("yearOfRegistration"), "yearOfRegistration", 2010),
    ],
)
def test_a_group_whose_values_are_all_missing_aggregates_to_zero_not_null(
    measure: FlagCounts | Sum | Mean, column: str, value: int
) -> None:
    connection = duckdb.connect()
    connection.execute(create_table(CODEBOOK))
    rows = [("Male", value), ("Female", None), ("Female", None)]  # Female: all missing
    for gender, present in rows:
        connection.execute(
            f'INSERT INTO records ("gender", {quote(column)}) VALUES (?, ?)', [gender, present]
        )
    grouped = statement(Query(measure, by=("gender",)))
    # Ungrouped and over no record at all: one row of aggregates, which must be 0 too.
    nobody = statement(Query(measure, where=Eq("gender", "Transgender/NonConforming")))
    for s in (grouped, nobody):
        result = connection.execute(s.text, list(s.parameters)).fetchnumpy()
        aggregates = [c for c in result if c.startswith("c")]
        assert aggregates
        for name in aggregates:
            # A NULL would come as a masked float, its value whatever lies under the mask.
            assert result[name].dtype.kind == "i" and not hasattr(result[name], "mask")
        if s is nobody:
            assert all(result[c].tolist() == [0] for c in aggregates)
        else:
            per_group = sorted(any(int(result[c][i]) for c in aggregates) for i in range(2))
            assert per_group == [False, True]  # Female's values all missing: they add nothing
