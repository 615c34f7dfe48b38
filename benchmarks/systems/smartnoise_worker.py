"""SmartNoise SQL's side of the benchmark: runs in its own virtual environment.

smartnoise-sql 1.0.10 pins opendp < 0.15, which cannot live beside veil's opendp 0.16, so this
script runs under `benchmarks/.venv-smartnoise` (made by `benchmarks/setup_smartnoise.sh`) and
imports nothing from veil. It reads one JSON request per line on standard input and writes one
JSON answer per line on standard output:

    {"op": "open", "path": ..., "metadata": {...}, "epsilon": 1.0, "delta": 1e-06}
    {"op": "run", "sql": "SELECT ..."}      -> {"ok": true, "seconds": 0.12, "rows": 41}
    {"op": "quit"}

Each run is timed here, around `PrivateReader.execute`, so the pipe costs nothing measured.
SmartNoise reads DuckDB through a thin DB-API wrapper (its `from_df` would copy the table into
SQLite first); it writes its SQL in the PostgreSQL dialect, which DuckDB accepts.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import duckdb


class Cursor:
    """The part of a DB-API cursor that SmartNoise's readers use."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection) -> None:
        self._cursor = cursor
        self.description: Any = None
        self._rows: list[Any] = []

    def execute(self, sql: str, parameters: Any = None) -> None:
        self._cursor.execute(sql)
        self.description = self._cursor.description
        self._rows = self._cursor.fetchall() if self.description is not None else []

    def fetchall(self) -> list[Any]:
        return self._rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def close(self) -> None:
        self._cursor.close()


class Connection:
    """A DB-API connection over a read-only DuckDB connection (reads only: no transactions)."""

    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self._connection = connection

    def cursor(self) -> Cursor:
        return Cursor(self._connection.cursor())

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def main() -> int:
    import snsql

    reader: Any = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            op = request["op"]
            if op == "quit":
                break
            if op == "open":
                connection = duckdb.connect(request["path"], read_only=True)
                privacy = snsql.Privacy(epsilon=request["epsilon"], delta=request["delta"])
                reader = snsql.from_connection(
                    Connection(connection),
                    privacy=privacy,
                    metadata=request["metadata"],
                    engine="postgres",
                )
                answer: dict[str, Any] = {"ok": True, "version": _version()}
            elif op == "run":
                start = time.perf_counter()
                rows = reader.execute(request["sql"])
                seconds = time.perf_counter() - start
                answer = {"ok": True, "seconds": seconds, "rows": len(rows) - 1}
            else:
                answer = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            answer = {"ok": False, "error": detail}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


def _version() -> str:
    from importlib.metadata import version

    return f"smartnoise-sql {version('smartnoise-sql')}, opendp {version('opendp')}"


if __name__ == "__main__":
    sys.exit(main())
