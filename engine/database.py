"""Creating the restricted data file: the typed records table and its metadata.

Only the loader and the synthetic generator write data files; the query path opens them
read-only through `engine.backend.DuckDBBackend`.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from engine.codebook import Codebook
from engine.errors import LoadError
from engine.sql import append_records, create_table


def check_free(path: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing data file unless asked to."""
    if path.exists() and not overwrite:
        raise LoadError(f"{path} exists; replace it with --overwrite (overwrite=True)")


def create(
    path: str | Path, codebook: Codebook, *, overwrite: bool = False
) -> duckdb.DuckDBPyConnection:
    """A new DuckDB file holding an empty `records` table typed from `codebook`."""
    path = Path(path)
    check_free(path, overwrite=overwrite)
    if path.exists():
        path.unlink()
        Path(f"{path}.wal").unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = duckdb.connect(str(path))
    connection.execute(create_table(codebook))
    connection.execute("CREATE TABLE veil_metadata (key VARCHAR PRIMARY KEY, value VARCHAR)")
    return connection


def append(connection: duckdb.DuckDBPyConnection, batch: pa.Table) -> None:
    """Append an Arrow table whose columns are the records table's, in order."""
    connection.register("veil_incoming", batch)
    try:
        connection.execute(append_records("veil_incoming"))
    finally:
        connection.unregister("veil_incoming")


def finish(connection: duckdb.DuckDBPyConnection, *, codebook: Codebook, data_version: str) -> None:
    """Record what the file holds, checkpoint it and close it."""
    connection.executemany(
        "INSERT OR REPLACE INTO veil_metadata VALUES (?, ?)",
        [
            ["data_version", data_version],
            ["codebook", codebook.identity],
        ],
    )
    connection.execute("CHECKPOINT")
    connection.close()


def recorded(path: str | Path) -> dict[str, str]:
    """What a data file records about itself (data version, codebook identity); empty when the
    file is missing or is not a data file."""
    try:
        with duckdb.connect(str(path), read_only=True) as connection:
            rows = connection.execute(
                "SELECT key, value FROM veil_metadata WHERE key IN ('data_version', 'codebook')"
            ).fetchall()
    except duckdb.Error:
        return {}
    return {str(key): str(value) for key, value in rows}
