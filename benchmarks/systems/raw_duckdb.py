"""Raw DuckDB: the same aggregation on the same typed table, with no privacy.

The connection is opened with exactly the settings veil's backend uses: within one process DuckDB
keeps one database instance per file, so both read the same buffer pool, and a file may not be
opened twice with different settings. Results are fetched as numpy arrays, as veil's backend
fetches them, and the statement is written in the fastest form measured (see `raw_sql`). Only
the keys present in the data come back.
"""

from __future__ import annotations

import time

import duckdb

from benchmarks.data import Dataset
from benchmarks.systems import Options, System
from benchmarks.workload import WorkloadQuery, raw_sql
from engine.codebook import default_codebook

# engine.backend.DuckDBBackend's settings, repeated here.
BACKEND_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "access_mode": "READ_ONLY",
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "lock_configuration": True,
}


def connect(path: str) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(path, read_only=True, config=dict(BACKEND_CONFIG))


class RawDuckDB:
    name = "raw_duckdb"
    label = "raw DuckDB (no privacy)"
    slow = False
    reference = False

    def __init__(self) -> None:
        self._codebook = default_codebook()
        self._connection: duckdb.DuckDBPyConnection | None = None
        self._rows = 0

    def open(self, data: Dataset) -> None:
        self._connection = connect(str(data.path))

    def prepare(self, query: WorkloadQuery) -> None:
        pass

    def run(self, query: WorkloadQuery) -> float:
        assert self._connection is not None
        text = raw_sql(query, self._codebook)
        start = time.perf_counter()
        cursor = self._connection.cursor()
        result = cursor.execute(text).fetchnumpy()
        cursor.close()
        elapsed = time.perf_counter() - start
        self._rows = len(next(iter(result.values())))
        return elapsed

    def cells(self, query: WorkloadQuery) -> int | None:
        return self._rows

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def systems(options: Options) -> list[System]:
    return [RawDuckDB()]
