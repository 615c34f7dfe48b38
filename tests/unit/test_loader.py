"""The loader: real CTDC file quirks, strict and lenient domain checks, Parquet, the CLI."""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import re
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.backend import DuckDBBackend
from engine.codebook import Codebook, Kind, default_codebook, load_codebook
from engine.engine import Engine
from engine.errors import LoadError
from engine.loader import LoadReport, load
from engine.sql import Statement
from veil_cli import main  # the `veil` command itself, as custodians run it

EXCERPT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ctdc_global_2020_excerpt.csv"
CTDC = default_codebook()
TERMS = (
    "By using this data, you agree to the CTDC terms of use, including that you will not "
    'attempt to identify any individual ("re-identification"), and that you will cite the source.'
)

needs_excerpt = pytest.mark.skipif(
    not EXCERPT.exists(), reason=f"the CTDC 2020 excerpt fixture is not at {EXCERPT}"
)


# ---- helpers ----


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def ctdc_file(
    path: Path,
    rows: Sequence[Mapping[str, str]],
    *,
    missing: str = "-99",
    terms_column: bool = False,
    rename: Mapping[str, str] | None = None,
    drop: Sequence[str] = (),
    extra: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """A CSV with every CTDC v7 column; cells not given are written as `missing`."""
    names = [v.name for v in CTDC.variables if v.name not in drop]
    header = [(rename or {}).get(name, name) for name in names]
    body = [[row.get(name, missing) for name in names] for row in rows]
    if terms_column:
        header = [TERMS, *header]
        body = [["", *cells] for cells in body]
    for name, cells in (extra or {}).items():
        header.append(name)
        body = [[*row, cell] for row, cell in zip(body, cells, strict=True)]
    return write_csv(path, header, body)


def fetch(database: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(database), read_only=True) as connection:
        return connection.execute(sql).fetchall()


def records(database: Path, *columns: str) -> list[tuple[Any, ...]]:
    quoted = ", ".join(f'"{c}"' for c in columns)
    return fetch(database, f"SELECT {quoted} FROM records ORDER BY rowid")


def null_counts(database: Path, codebook: Codebook) -> dict[str, int]:
    names = [v.name for v in codebook.stored_variables]
    row = fetch(
        database, "SELECT " + ", ".join(f'count(*) - count("{n}")' for n in names) + " FROM records"
    )[0]
    return dict(zip(names, row, strict=True))


def excerpt_rows() -> list[dict[str, str]]:
    with EXCERPT.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ---- the real 2020 excerpt ----


@needs_excerpt
def test_excerpt_loads_strict_with_exact_counts(tmp_path: Path) -> None:
    database = tmp_path / "ctdc.duckdb"
    report = load(EXCERPT, database, codebook=CTDC)
    rows = excerpt_rows()
    assert report.rows == len(rows) == 44
    assert report.strict and not report.out_of_domain and not report.mapped_to_missing
    assert not report.absent

    citizenship = Counter(r["citizenship"] for r in rows)
    stored = dict(fetch(database, "SELECT citizenship, count(*) FROM records GROUP BY 1"))
    assert stored["00"] == citizenship["00"] > 0  # the unknown-country code, kept as a value
    assert stored["CO"] == citizenship["CO"] > 0
    females = sum(r["gender"] == "Female" for r in rows)
    assert fetch(database, "SELECT count(*) FROM records WHERE gender = 'Female'")[0][0] == females
    young = sum(r["ageBroad"] == "18--20" for r in rows)
    assert young > 0
    assert fetch(database, "SELECT count(*) FROM records WHERE ageBroad = '18--20'")[0][0] == young
    abduction_missing = sum(r["isAbduction"] == "-99" for r in rows)
    assert report.missing["isAbduction"] == abduction_missing > 0
    abducted = sum(r["isAbduction"] == "1" for r in rows)
    assert fetch(database, "SELECT count(*) FROM records WHERE isAbduction = 1")[0][0] == abducted


@needs_excerpt
def test_the_loaded_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The records are restricted: a umask that lets others read new files must not apply."""
    database = tmp_path / "ctdc.duckdb"
    previous = os.umask(0o022)
    try:
        load(EXCERPT, database, codebook=CTDC)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(database.stat().st_mode) == 0o600


@needs_excerpt
def test_every_load_is_named_apart_even_under_one_data_version(tmp_path: Path) -> None:
    ids = set()
    for name in ("a", "b"):
        database = tmp_path / f"{name}.duckdb"
        load(EXCERPT, database, codebook=CTDC, data_version="ctdc-2021")
        backend = DuckDBBackend(database)
        assert backend.data_version() == "ctdc-2021"
        ids.add(backend.load_id())
        backend.close()
    assert len(ids) == 2 and None not in ids


@needs_excerpt
def test_excerpt_every_column_matches_the_csv(tmp_path: Path) -> None:
    database = tmp_path / "ctdc.duckdb"
    report = load(EXCERPT, database, codebook=CTDC)
    rows = excerpt_rows()
    nulls = null_counts(database, CTDC)
    for variable in CTDC.stored_variables:
        name = variable.name
        expected_missing = sum(r[name] == "-99" for r in rows)
        assert report.missing[name] == nulls[name] == expected_missing, name
        expected = Counter(r[name] for r in rows if r[name] != "-99")
        found = fetch(
            database,
            f'SELECT "{name}", count(*) FROM records WHERE "{name}" IS NOT NULL GROUP BY 1',
        )
        assert {str(v): n for v, n in found} == dict(expected), name
    concatenated = {v.name for v in CTDC.variables if v.kind is Kind.CONCATENATED}
    assert {s.header for s in report.skipped} == concatenated
    assert all("concatenated" in s.reason for s in report.skipped)


# ---- every quirk of the real files in one crafted file ----


def quirky_file(path: Path) -> Path:
    rows = [
        {  # 2018/2020 style: -99 for missing, flags written as floats, the codebook's age label
            "yearOfRegistration": "2018",
            "Datasource": "Case management",
            "gender": "Female",
            "ageBroad": "18\u201320",  # an en dash, as the codebook prints it
            "citizenship": "NA",
            "CountryOfExploitation": "00",
            "isForcedLabour": "1.0",
            "isSexualExploit": "0.0",
            "meansOfControlConcatenated": "Threats;Takes earnings",
        },
        {  # 2021 style: blank for missing
            "yearOfRegistration": "2021",
            "Datasource": "Case Management",
            "gender": "Male",
            "ageBroad": "0--8",
            "citizenship": "00",
            "CountryOfExploitation": "NA",
            "isForcedLabour": "0",
            "isSexualExploit": "1",
            "majorityStatus": "",
        },
        {  # every cell missing, in both spellings
            "yearOfRegistration": "",
            "Datasource": "-99",
            "gender": "",
            "ageBroad": "-99",
            "citizenship": "",
            "CountryOfExploitation": "-99",
            "isForcedLabour": "",
            "isSexualExploit": "-99",
        },
    ]
    return ctdc_file(
        path, rows, terms_column=True, rename={"CountryOfExploitation": "CountryOfExploition"}
    )


def test_every_quirk_loads_strict(tmp_path: Path) -> None:
    database = tmp_path / "quirks.duckdb"
    report = load(quirky_file(tmp_path / "quirks.csv"), database, codebook=CTDC)
    assert report.rows == 3 and not report.out_of_domain
    assert records(
        database,
        "yearOfRegistration",
        "Datasource",
        "gender",
        "ageBroad",
        "citizenship",
        "CountryOfExploitation",
        "isForcedLabour",
        "isSexualExploit",
    ) == [
        (2018, "Case Management", "Female", "18--20", "NA", "00", 1, 0),
        (2021, "Case Management", "Male", "0--8", "00", "NA", 0, 1),
        (None, None, None, None, None, None, None, None),
    ]
    assert report.renamed == {"CountryOfExploition": "CountryOfExploitation"}
    skipped = {s.header: s for s in report.skipped}
    assert skipped[TERMS].position == 0 and "every cell is empty" in skipped[TERMS].reason
    assert "concatenated" in skipped["meansOfControlConcatenated"].reason
    assert report.missing["citizenship"] == 1 and report.missing["majorityStatus"] == 3
    assert report.missing == null_counts(database, CTDC)
    text = report.render()
    assert text.startswith("RESTRICTED: exact counts from the records")  # never a release
    assert "'CountryOfExploition' -> CountryOfExploitation" in text
    assert "every cell is empty" in text and "3 rows" in text


def test_types_come_from_the_codebook(tmp_path: Path) -> None:
    database = tmp_path / "quirks.duckdb"
    load(quirky_file(tmp_path / "quirks.csv"), database, codebook=CTDC)
    types = dict(
        fetch(
            database,
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'records'",
        )
    )
    assert types["yearOfRegistration"] == "SMALLINT"
    assert types["isForcedLabour"] == "UTINYINT"
    assert types["gender"].startswith("ENUM(") and types["citizenship"].startswith("ENUM(")
    assert "meansOfControlConcatenated" not in types


def test_byte_order_mark_and_gzip(tmp_path: Path) -> None:
    plain = quirky_file(tmp_path / "quirks.csv")
    marked = tmp_path / "marked.csv"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    zipped = tmp_path / "quirks.csv.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    expected = records(load_into(plain, tmp_path / "a.duckdb"), "citizenship", "ageBroad")
    for source in (marked, zipped):
        database = load_into(source, tmp_path / f"{source.name}.duckdb")
        assert records(database, "citizenship", "ageBroad") == expected


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_header_cell_with_a_line_break_loses_no_record(tmp_path: Path, newline: str) -> None:
    """The terms-of-use header, edited in a spreadsheet, can hold a line break inside its quotes:
    the header is still one row, and the first record after it is loaded like the others."""
    plain = quirky_file(tmp_path / "quirks.csv")
    with plain.open(newline="", encoding="utf-8") as handle:
        header, *body = list(csv.reader(handle))
    header[0] = header[0].replace(" you agree", newline + "you agree")
    broken = tmp_path / "broken_header.csv"
    with broken.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator=newline).writerows([header, *body])
    database = tmp_path / "broken_header.duckdb"
    report = load(broken, database, codebook=CTDC)
    names = [v.name for v in CTDC.stored_variables]
    expected = records(load_into(plain, tmp_path / "plain.duckdb"), *names)
    assert report.rows == 3 and records(database, *names) == expected


def load_into(source: Path, database: Path, **options: Any) -> Path:
    load(source, database, codebook=options.pop("codebook", CTDC), **options)
    return database


def test_integers_and_flags_are_parsed_exactly(tmp_path: Path) -> None:
    rows = [
        {"yearOfRegistration": "2018.0", "isAbduction": "1.00"},
        {"yearOfRegistration": " 2019 ", "isAbduction": "01"},
        {"yearOfRegistration": "2018.5", "isAbduction": "1.5"},
        {"yearOfRegistration": "0x7e2", "isAbduction": "yes"},
    ]
    database = tmp_path / "numbers.duckdb"
    report = load(ctdc_file(tmp_path / "numbers.csv", rows), database, codebook=CTDC, strict=False)
    assert records(database, "yearOfRegistration", "isAbduction") == [
        (2018, 1),
        (2019, 1),
        (None, None),
        (None, None),
    ]
    assert report.out_of_domain == {
        "yearOfRegistration": {"0x7e2": 1, "2018.5": 1},
        "isAbduction": {"1.5": 1, "yes": 1},
    }


def test_a_flag_written_as_a_boolean_loads_as_one_and_zero(tmp_path: Path) -> None:
    """pandas writes a boolean column as True/False to CSV; Parquet keeps it BOOLEAN."""
    rows = [
        {"isAbduction": "True", "isForcedLabour": "false"},
        {"isAbduction": "FALSE", "isForcedLabour": " true "},
        {"isAbduction": "-99", "isForcedLabour": "True"},
    ]
    source = ctdc_file(tmp_path / "booleans.csv", rows)
    expected = [(1, 0), (0, 1), (None, 1)]
    database = load_into(source, tmp_path / "csv.duckdb")  # strict: nothing out of the domain
    assert records(database, "isAbduction", "isForcedLabour") == expected
    with source.open(newline="", encoding="utf-8") as handle:
        header, *body = list(csv.reader(handle))
    columns = {
        name: pa.array([row[i] for row in body], pa.string()) for i, name in enumerate(header)
    }
    columns["isAbduction"] = pa.array([True, False, None], pa.bool_())
    columns["isForcedLabour"] = pa.array([False, True, True], pa.bool_())
    parquet = tmp_path / "booleans.parquet"
    pq.write_table(pa.table(columns), parquet)
    database = load_into(parquet, tmp_path / "parquet.duckdb")
    assert records(database, "isAbduction", "isForcedLabour") == expected


def test_the_missing_code_written_as_a_float_is_missing(tmp_path: Path) -> None:
    """A copy whose flags went through a float column writes 1.0, 0.0 and -99.0."""
    rows = [
        {"yearOfRegistration": "2018.0", "isAbduction": "1.0", "isForcedLabour": "-99.0"},
        {"yearOfRegistration": "-99.0", "isAbduction": "-99.0", "isForcedLabour": "0.0"},
    ]
    database = tmp_path / "floats.duckdb"
    report = load(ctdc_file(tmp_path / "floats.csv", rows), database, codebook=CTDC)
    assert not report.out_of_domain
    assert records(database, "yearOfRegistration", "isAbduction", "isForcedLabour") == [
        (2018, 1, None),
        (None, None, 0),
    ]
    assert report.missing["isAbduction"] == report.missing["isForcedLabour"] == 1
    assert report.missing == null_counts(database, CTDC)


# ---- values outside the domain ----


def dirty_file(path: Path) -> Path:
    rows = [
        {"yearOfRegistration": "2019", "gender": "Alien", "citizenship": "XK", "isAbduction": "1"},
        {"yearOfRegistration": "1990", "gender": "Alien", "citizenship": "CO", "isAbduction": "2"},
        {"yearOfRegistration": "2020", "gender": "Female", "citizenship": "XK", "isAbduction": "0"},
        {
            "yearOfRegistration": "2020",
            "gender": "female",
            "citizenship": "-99",
            "isAbduction": "-99",
        },
    ]
    return ctdc_file(path, rows)


def test_strict_refuses_out_of_domain_values_naming_them(tmp_path: Path) -> None:
    database = tmp_path / "dirty.duckdb"
    with pytest.raises(LoadError) as error:
        load(dirty_file(tmp_path / "dirty.csv"), database, codebook=CTDC)
    message = str(error.value)
    for column, value in [
        ("gender", "'Alien' (2 cells)"),
        ("gender", "'female'"),
        ("citizenship", "'XK' (2 cells)"),
        ("yearOfRegistration", "'1990'"),
        ("isAbduction", "'2'"),
    ]:
        assert column in message and value in message
    # A year past the range: a lenient load would empty it into the missing year.
    assert "outside the range of yearOfRegistration (2002 to 2021)" in message
    assert "a codebook of your own whose range admits them (--codebook" in message
    assert not database.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirty.csv"]  # nothing left behind


def test_lenient_maps_out_of_domain_values_to_missing_and_counts_them(tmp_path: Path) -> None:
    database = tmp_path / "dirty.duckdb"
    report = load(dirty_file(tmp_path / "dirty.csv"), database, codebook=CTDC, strict=False)
    assert report.rows == 4 and not report.strict
    assert report.out_of_domain == {
        "yearOfRegistration": {"1990": 1},
        "gender": {"Alien": 2, "female": 1},
        "citizenship": {"XK": 2},
        "isAbduction": {"2": 1},
    }
    assert report.mapped_to_missing == {
        "yearOfRegistration": 1,
        "gender": 3,
        "citizenship": 2,
        "isAbduction": 1,
    }
    assert report.missing["citizenship"] == 1 and report.missing["gender"] == 0
    assert records(database, "yearOfRegistration", "gender", "citizenship", "isAbduction") == [
        (2019, None, None, 1),
        (None, None, "CO", None),
        (2020, "Female", None, 0),
        (2020, None, None, None),
    ]
    nulls = null_counts(database, CTDC)
    for name in CTDC.stored_variables:
        assert nulls[name.name] == report.missing[name.name] + report.mapped_to_missing.get(
            name.name, 0
        )
    text = report.render()
    assert "gender: 'Alien' (2 cells), 'female' (1 cell)" in text and "lenient" in text


def test_every_out_of_domain_value_is_in_the_report_and_a_refusal_says_where(
    tmp_path: Path,
) -> None:
    values = [f"Alien{i:02}" for i in range(12)]
    source = ctdc_file(tmp_path / "many.csv", [{"gender": v} for v in values])
    with pytest.raises(LoadError) as error:
        load(source, tmp_path / "strict.duckdb", codebook=CTDC)
    message = str(error.value)
    assert "'Alien09'" in message and "'Alien10'" not in message
    assert "and 2 more values" in message and "lenient load's report lists every value" in message
    report = load(source, tmp_path / "lenient.duckdb", codebook=CTDC, strict=False)
    text = report.render()
    assert all(f"'{v}' (1 cell)" in text for v in values) and "more values" not in text


def test_the_codebooks_null_is_missing(tmp_path: Path) -> None:
    """Codebook v7 lists each variable's missing value as NULL: a file written so loads."""
    rows = [{"gender": "NULL", "citizenship": "NULL", "isAbduction": "NULL"}, {"gender": "Male"}]
    database = load_into(ctdc_file(tmp_path / "null.csv", rows, missing="NULL"), tmp_path / "n")
    assert records(database, "gender", "citizenship", "isAbduction") == [
        (None, None, None),
        ("Male", None, None),
    ]


def test_strict_refusal_keeps_an_existing_database(tmp_path: Path) -> None:
    database = tmp_path / "kept.duckdb"
    first = load(quirky_file(tmp_path / "quirks.csv"), database, codebook=CTDC)
    with pytest.raises(LoadError):
        load(dirty_file(tmp_path / "dirty.csv"), database, codebook=CTDC, overwrite=True)
    assert DuckDBBackend(database).data_version() == first.data_version


def test_an_existing_database_needs_overwrite(tmp_path: Path) -> None:
    source = quirky_file(tmp_path / "quirks.csv")
    database = load_into(source, tmp_path / "db.duckdb")
    with pytest.raises(LoadError, match="exists"):
        load(source, database, codebook=CTDC)
    report = load(source, database, codebook=CTDC, overwrite=True, data_version="second")
    assert DuckDBBackend(database).data_version() == report.data_version == "second"


# ---- columns: absent, unknown, duplicated ----


def test_absent_variable_strict_refuses_lenient_loads_missing(tmp_path: Path) -> None:
    source = ctdc_file(tmp_path / "short.csv", [{"gender": "Male"}] * 3, drop=["isAbduction"])
    with pytest.raises(LoadError, match="isAbduction"):
        load(source, tmp_path / "strict.duckdb", codebook=CTDC)
    database = tmp_path / "lenient.duckdb"
    report = load(source, database, codebook=CTDC, strict=False)
    assert report.absent == ("isAbduction",) and report.missing["isAbduction"] == 3
    assert null_counts(database, CTDC)["isAbduction"] == 3
    assert "isAbduction" in report.render()


def test_a_header_differing_only_in_case_is_named_in_the_refusal(tmp_path: Path) -> None:
    # Loading lenient, as the refusal offers, would store the column as missing: the refusal
    # names the header that was meant.
    source = ctdc_file(tmp_path / "case.csv", [{"gender": "Male"}] * 3,
                       rename={"gender": "Gender"})
    with pytest.raises(LoadError) as refused:
        load(source, tmp_path / "strict.duckdb", codebook=CTDC)
    assert "gender (the file has 'Gender': headers must match the codebook's names)" in str(
        refused.value
    )


def test_unknown_column_with_data_strict_refuses_lenient_ignores(tmp_path: Path) -> None:
    source = ctdc_file(
        tmp_path / "extra.csv",
        [{"gender": "Male"}, {"gender": "Female"}],
        extra={"caseNotes": ["met at border", ""], "": ["", ""]},
    )
    with pytest.raises(LoadError, match="caseNotes"):
        load(source, tmp_path / "strict.duckdb", codebook=CTDC)
    report = load(source, tmp_path / "lenient.duckdb", codebook=CTDC, strict=False)
    skipped = {s.header: s.reason for s in report.skipped}
    assert "1 cell with data ignored" in skipped["caseNotes"]
    assert "every cell is empty" in skipped[""]


def test_two_columns_for_one_variable_are_refused(tmp_path: Path) -> None:
    source = ctdc_file(
        tmp_path / "twice.csv", [{"gender": "Male"}], extra={"CountryOfExploition": ["US"]}
    )
    with pytest.raises(LoadError, match="CountryOfExploitation"):
        load(source, tmp_path / "db.duckdb", codebook=CTDC, strict=False)


def test_unreadable_sources_are_load_errors(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"expected a \.csv"):
        load(tmp_path / "data.xlsx", tmp_path / "db.duckdb", codebook=CTDC)
    with pytest.raises(LoadError, match="does not exist"):
        load(tmp_path / "absent.csv", tmp_path / "db.duckdb", codebook=CTDC)
    ragged = write_csv(
        tmp_path / "ragged.csv",
        [v.name for v in CTDC.variables],
        [["2019"] * len(CTDC.variables), ["2019"]],
    )
    with pytest.raises(LoadError, match=r"ragged\.csv"):
        load(ragged, tmp_path / "db.duckdb", codebook=CTDC, strict=False)
    assert not (tmp_path / "db.duckdb").exists()


@pytest.mark.parametrize("delimiter", [";", "\t"])
@pytest.mark.parametrize("mode", [[], ["--lenient"]])
def test_a_file_with_another_delimiter_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], delimiter: str, mode: list[str]
) -> None:
    """A spreadsheet in a European locale saves "CSV" with semicolons."""
    source = tmp_path / "semicolons.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow([TERMS, *(v.name for v in CTDC.variables)])
        writer.writerow(["", *("-99" for _ in CTDC.variables)])
    database = tmp_path / "db.duckdb"
    assert main(["load", str(source), str(database), "--no-progress", *mode]) == 2
    error = capsys.readouterr().err
    assert "not comma-separated" in error and repr(delimiter) in error
    assert "absent" not in error and not database.exists()


def test_a_latin_1_file_is_refused_naming_the_line_and_nothing_else(tmp_path: Path) -> None:
    """A byte that is not UTF-8 far below the header is found by DuckDB, whose message names
    the line; its advice about reader options a custodian cannot pass is left out."""
    rows = [{"Datasource": "Case Management"}] * 500 + [{"Datasource": "Gestión de casos"}]
    source = ctdc_file(tmp_path / "latin1.csv", rows)
    source.write_bytes(source.read_text(encoding="utf-8").encode("latin-1"))
    with pytest.raises(LoadError) as error:
        load(source, tmp_path / "db.duckdb", codebook=CTDC, strict=False)
    message = str(error.value)
    assert "Line: 502" in message and "not utf-8 encoded" in message
    assert "Possible" not in message and "ignore_errors" not in message


def test_records_with_every_cell_empty_strict_refuses_lenient_counts(tmp_path: Path) -> None:
    """A spreadsheet saves its blank rows as lines of commas: in the 2021 style they read as
    people with every variable missing, so they are never loaded without being counted."""
    rows = [{"gender": "Female"}, {}, {"gender": "Male"}, {}, {"gender": " "}]
    source = ctdc_file(tmp_path / "blank_rows.csv", rows, missing="", terms_column=True)
    with pytest.raises(LoadError, match="3 records with every cell empty, the first on line 3"):
        load(source, tmp_path / "strict.duckdb", codebook=CTDC)
    assert not (tmp_path / "strict.duckdb").exists()
    database = tmp_path / "lenient.duckdb"
    report = load(source, database, codebook=CTDC, strict=False)
    assert report.rows == 5 and report.empty_records == 3
    assert records(database, "gender") == [("Female",), (None,), ("Male",), (None,), (None,)]
    assert "Records with every cell empty: 3" in report.render()
    clean = load(quirky_file(tmp_path / "quirks.csv"), tmp_path / "clean.duckdb", codebook=CTDC)
    assert clean.empty_records == 0 and "every cell empty" not in clean.render()


@pytest.mark.parametrize("strict", [True, False])
def test_a_record_with_an_extra_empty_field_is_refused_not_shifted(
    tmp_path: Path, strict: bool
) -> None:
    """In the 2021 style the last cell is often blank; a stray comma inside such a record gives
    it one field too many, the last one empty. DuckDB drops that field without an error, which
    would move every value after the comma one column to the right."""
    source = ctdc_file(
        tmp_path / "stray.csv",
        [{"gender": "Female", "ageBroad": "0--8", "citizenship": "CO"}] * 3,
        missing="",
    )
    lines = source.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].replace("Female,", "Female,,", 1)  # the second record, on line 3
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    database = tmp_path / "stray.duckdb"
    width = len(CTDC.variables)
    with pytest.raises(
        LoadError, match=f"line 3 has {width + 1} fields where the header has {width}"
    ):
        load(source, database, codebook=CTDC, strict=strict)
    assert not database.exists()


def test_a_header_short_of_one_name_is_refused_as_such(tmp_path: Path) -> None:
    """Every record has the column, the header lost its name: that is not an absent variable
    (which strict mode reports, lenient loads as missing) but a header that does not fit."""
    source = ctdc_file(tmp_path / "short_header.csv", [{"gender": "Male"}] * 2)
    lines = source.read_text(encoding="utf-8").splitlines()
    lines[0] = lines[0].replace(",gender,", ",", 1)
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    width = len(CTDC.variables)
    for strict in (True, False):
        with pytest.raises(LoadError, match=f"line 2 has {width} fields .* header has {width - 1}"):
            load(source, tmp_path / "db.duckdb", codebook=CTDC, strict=strict)


def test_a_record_count_that_duckdb_does_not_match_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were DuckDB to skip more than the header (as it once did, counting lines rather than
    rows), the records it did not read are not silently lost: the load is refused."""
    import engine.loader

    read_headers = engine.loader._read_headers
    monkeypatch.setattr(engine.loader, "_read_headers", lambda *args: (read_headers(*args)[0], 2))
    database = tmp_path / "short.duckdb"
    with pytest.raises(LoadError, match="holds 3 records but DuckDB read 2"):
        load(quirky_file(tmp_path / "quirks.csv"), database, codebook=CTDC)
    assert not database.exists()


# ---- Parquet ----


def test_a_parquet_column_repeated_is_refused_as_in_a_csv(tmp_path: Path) -> None:
    # DuckDB reads the second as gender_1: the refusal names the file's own columns, in strict
    # and in lenient mode alike, rather than load one and skip a column the file does not have.
    names = [v.name for v in CTDC.stored_variables]
    arrays = [pa.array(["-99"] * 2, pa.string()) for _ in names]
    table = pa.Table.from_arrays([*arrays, pa.array(["Male"] * 2)], names=[*names, "gender"])
    source = tmp_path / "twice.parquet"
    pq.write_table(table, source)
    for strict in (True, False):
        with pytest.raises(LoadError, match="columns 'gender' and 'gender' are both"):
            load(source, tmp_path / f"db-{strict}.duckdb", codebook=CTDC, strict=strict)


def test_parquet_with_text_and_typed_columns(tmp_path: Path) -> None:
    csv_database = load_into(quirky_file(tmp_path / "quirks.csv"), tmp_path / "csv.duckdb")
    with (tmp_path / "quirks.csv").open(newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    header, body = table[0], table[1:]
    columns: dict[str, pa.Array] = {}
    for i, name in enumerate(header):
        cells = [row[i] for row in body]
        if name == "yearOfRegistration":  # an integer column with a null
            columns[name] = pa.array([int(c) if c else None for c in cells], pa.int64())
        elif name == "isForcedLabour":  # a float column, as pandas writes flags with gaps
            columns[name] = pa.array([float(c) if c else None for c in cells], pa.float64())
        else:
            columns[name] = pa.array(cells, pa.string())
    source = tmp_path / "quirks.parquet"
    pq.write_table(pa.table(columns), source)
    database = tmp_path / "parquet.duckdb"
    report = load(source, database, codebook=CTDC)
    assert report.rows == 3 and not report.out_of_domain
    names = [v.name for v in CTDC.stored_variables]
    assert records(database, *names) == records(csv_database, *names)


# ---- the data version and the read-only backend ----


def test_default_data_version_and_backend(tmp_path: Path) -> None:
    source = quirky_file(tmp_path / "quirks.csv")
    database = tmp_path / "db.duckdb"
    report = load(source, database, codebook=CTDC)
    assert re.fullmatch(r"ctdc@7:[0-9a-f]{16}", report.data_version)
    # Clients are told the version: it must not be a function of the records, or whoever holds
    # the candidate files could tell which one is served. The same file loads under a new one.
    again = load(source, tmp_path / "again.duckdb", codebook=CTDC)
    assert again.data_version != report.data_version
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert digest[:16] not in report.data_version
    backend = DuckDBBackend(database)
    try:
        assert backend.data_version() == report.data_version
        counts = backend.run(Statement("SELECT count(*) AS n FROM records", ()))
        assert int(counts["n"][0]) == 3
    finally:
        backend.close()


# ---- a second codebook ----


def test_ics_tip_codebook_with_aliases_and_its_own_missing_codes(tmp_path: Path) -> None:
    codebook = load_codebook("ics_tip_victims")
    header = [
        "dat", "ret", "sxv", "agv", "stv", "civ", "coe",
        "isSexualExploitation", "isForcedLabour", "isForcedCriminality", "isForcedBegging",
        "isForcedMarriage", "isOrganRemoval", "isOtherExploitation",
    ]  # fmt: skip
    rows = [
        ["2023", "Police", "Female", "17", "Child", "NA", "ZZ", "1", "0", "0", "0", "0", "0", "0"],
        ["2024", "Civil society", "Male", "-9", "", "ZZ", "DE", "0", "1.0", "", "", "", "", ""],
    ]
    database = tmp_path / "ics.duckdb"
    report = load(write_csv(tmp_path / "ics.csv", header, rows), database, codebook=codebook)
    assert report.rows == 2 and report.data_version.startswith("ics_tip_victims@1:")
    assert records(
        database, "reportingYear", "reportingEntityType", "ageYears", "citizenship",
        "countryOfExploitation", "isForcedLabour", "isForcedBegging",
    ) == [
        (2023, "Police", 17, "NA", "ZZ", 0, 0),
        (2024, "CivilSociety", None, "ZZ", "DE", 1, None),
    ]  # fmt: skip
    assert report.missing["ageYears"] == 1 and report.missing["isForcedBegging"] == 1
    assert report.renamed["ret"] == "reportingEntityType"
    rows[0][5] = "00"  # CTDC's unknown-country code is not this codebook's
    with pytest.raises(LoadError, match="citizenship: '00'"):
        load(
            write_csv(tmp_path / "bad.csv", header, rows),
            tmp_path / "bad.duckdb",
            codebook=codebook,
        )


# ---- the command line ----


def test_cli_load_prints_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = quirky_file(tmp_path / "quirks.csv")
    database = tmp_path / "db.duckdb"
    assert main(["load", str(source), str(database), "--data-version", "v1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Loaded 3 rows" in out and "v1" in out and "strict" in out
    assert DuckDBBackend(database).data_version() == "v1"

    assert main(["load", str(source), str(database)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_cli_load_onto_an_existing_file_names_the_flag_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = quirky_file(tmp_path / "quirks.csv")
    database = load_into(source, tmp_path / "db.duckdb")
    assert main(["load", str(source), str(database)]) == 2
    err = capsys.readouterr().err
    assert err == f"veil load: {database} exists; replace it with --overwrite\n"
    with pytest.raises(LoadError, match="exists; replace it with overwrite=True"):  # the API's
        load(source, database, codebook=CTDC)
    assert main(["load", str(source), str(database), "--overwrite", "--no-progress"]) == 0


def test_the_dataset_name_is_recorded_for_the_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every version of the same people is loaded under one dataset name, which the ledger keys
    the dataset budget by; the default is the codebook's name."""
    source = quirky_file(tmp_path / "quirks.csv")
    assert load(source, tmp_path / "default.duckdb", codebook=CTDC).dataset == "ctdc"
    assert DuckDBBackend(tmp_path / "default.duckdb").dataset() == "ctdc"
    named = tmp_path / "named.duckdb"
    assert main(["load", str(source), str(named), "--dataset", "iom-2021", "--no-progress"]) == 0
    assert "dataset       iom-2021" in capsys.readouterr().out
    assert Engine(DuckDBBackend(named), codebook=CTDC).dataset == "iom-2021"
    refused = tmp_path / "refused.duckdb"
    assert main(["load", str(source), str(refused), "--dataset", "iom 2021"]) == 2
    assert "a dataset name is" in capsys.readouterr().err
    assert not refused.exists()


def test_cli_strict_refusal_and_lenient(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = dirty_file(tmp_path / "dirty.csv")
    database = tmp_path / "db.duckdb"
    assert main(["load", str(source), str(database), "--codebook", "ctdc_v7"]) == 2
    captured = capsys.readouterr()
    assert "'Alien'" in captured.err and "gender" in captured.err and captured.out == ""
    assert not database.exists()
    assert main(["load", str(source), str(database), "--lenient", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "lenient" in out and "'Alien' (2 cells)" in out


def test_cli_codebook_path_and_bad_codebook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = quirky_file(tmp_path / "quirks.csv")
    path = Path(__file__).resolve().parents[2] / "engine" / "codebooks" / "ctdc_v7.yaml"
    assert main(["load", str(source), str(tmp_path / "a.duckdb"), "--codebook", str(path)]) == 0
    assert "ctdc@7" in capsys.readouterr().out
    assert main(["load", str(source), str(tmp_path / "b.duckdb"), "--codebook", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_report_is_frozen(tmp_path: Path) -> None:
    report: LoadReport = load(
        quirky_file(tmp_path / "q.csv"), tmp_path / "db.duckdb", codebook=CTDC
    )
    with pytest.raises(AttributeError):
        report.rows = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        report.missing["gender"] = 0  # type: ignore[index]
