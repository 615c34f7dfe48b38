"""Key leakage: a canary category absent from the codebook never becomes a released key.

A custodian's file may hold values nobody declared (a typo, a new category, one person's
unique label). If keys came from the data, such a value would be published as a key, and with
count 1 that discloses a person. Keys come from the codebook, so whatever its count the canary
must never appear: strict loading refuses it, lenient loading maps it to missing, and the DuckDB
ENUM type cannot even store it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import duckdb
import pytest

from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import LoadError
from engine.loader import load
from engine.loss import PrivacyLoss
from engine.query import Count, FlagCounts, Query
from engine.sql import create_table

CODEBOOK = default_codebook()
CANARY = "Canary-7f3a"


def write_file(path: Path, canaries: int, others: int) -> Path:
    names = [v.name for v in CODEBOOK.variables]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for i in range(canaries + others):
            row = dict.fromkeys(names, "-99")
            row["gender"] = CANARY if i < canaries else "Female"
            row["citizenship"] = "QQ" if i < canaries else "UA"  # not an ISO code either
            writer.writerow([row[n] for n in names])
    return path


@pytest.mark.parametrize("canaries", [1, 500])
def test_canary_is_refused_in_strict_mode(tmp_path: Path, canaries: int) -> None:
    source = write_file(tmp_path / "data.csv", canaries, 100)
    with pytest.raises(LoadError, match="gender"):
        load(source, tmp_path / "data.duckdb", codebook=CODEBOOK)
    assert not (tmp_path / "data.duckdb").exists()


@pytest.mark.parametrize("canaries", [1, 500])
def test_canary_never_appears_as_a_key_whatever_its_count(tmp_path: Path, canaries: int) -> None:
    source = write_file(tmp_path / "data.csv", canaries, 100)
    report = load(source, tmp_path / "data.duckdb", codebook=CODEBOOK, strict=False)
    assert report.out_of_domain["gender"] == {CANARY: canaries}
    engine = Engine(DuckDBBackend(tmp_path / "data.duckdb"), codebook=CODEBOOK)
    for query in (
        Query(Count(), by=("gender", "citizenship")),
        Query(Count(), by=("citizenshipRegion",)),
        Query(FlagCounts("exploitationType"), by=("gender",)),
    ):
        table = engine.answer(engine.plan(query, loss=PrivacyLoss.pure("1"))).table
        for name in query.by:
            keys = set(table[name].to_pylist())
            assert keys <= set(CODEBOOK.dimension(name).keys) | {None}
            assert CANARY not in keys and "QQ" not in keys
        assert CANARY not in str(table.to_pylist())


def test_the_typed_table_cannot_store_an_undeclared_value() -> None:
    connection = duckdb.connect()
    connection.execute(create_table(CODEBOOK))
    with pytest.raises(duckdb.ConversionException):
        connection.execute("INSERT INTO records (gender) VALUES (?)", [CANARY])
