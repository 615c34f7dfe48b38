"""Shared fixtures: small real DuckDB data files built from rows written in the test."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from engine import data_file as database
from engine.backend import DuckDBBackend
from engine.codebook import Codebook, default_codebook
from engine.engine import Engine
from engine.settings import Settings

Row = Mapping[str, Any]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def write_database(
    path: Path, rows: Iterable[Row], *, codebook: Codebook | None = None, data_version: str = "test"
) -> Path:
    """A real data file whose records are exactly `rows` (columns not given are missing)."""
    codebook = codebook or default_codebook()
    rows = list(rows)
    connection = database.create(path, codebook, overwrite=True)
    if rows:
        names = sorted({name for row in rows for name in row})
        table = pa.table({name: [row.get(name) for row in rows] for name in names})
        columns = ", ".join(f'"{name}"' for name in names)
        connection.register("incoming", table)
        connection.execute(f"INSERT INTO records ({columns}) SELECT {columns} FROM incoming")
        connection.unregister("incoming")
    database.finish(connection, codebook=codebook, data_version=data_version)
    return path


@pytest.fixture
def make_engine(tmp_path: Path) -> Callable[..., Engine]:
    """Build an Engine over a data file holding `rows`."""
    counter = iter(range(10**6))

    def build(
        rows: Iterable[Row], *, codebook: Codebook | None = None, settings: Settings | None = None
    ) -> Engine:
        codebook = codebook or default_codebook()
        path = write_database(tmp_path / f"data{next(counter)}.duckdb", rows, codebook=codebook)
        return Engine(DuckDBBackend(path), codebook=codebook, settings=settings)

    return build
