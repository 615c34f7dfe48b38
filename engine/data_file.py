"""Creating the restricted data file: the typed records table and its metadata.

Only the loader and the synthetic generator write data files; the query path opens them
read-only through `engine.backend.DuckDBBackend`.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import duckdb
import pyarrow as pa

from engine.codebook import Codebook
from engine.errors import DataFileExistsError, LoadError
from engine.sql import (
    append_records,
    checkpoint,
    create_table,
    metadata_table,
    read_metadata,
    record_metadata,
)

# The name under which the ledger keeps the dataset's budget: every data version loaded under
# one name is paid for from one dataset cap (a subset of the ledger's names).
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_dataset_name(name: str) -> str:
    """Refuse a dataset name the ledger could not key a budget by."""
    if not _DATASET_NAME.match(name):
        raise LoadError(
            f"a dataset name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit; got {name!r}"
        )
    return name


# Heads every report read from the records themselves (`veil load`, `veil risk`): exact counts,
# unprotected by noise or suppression, that must stay with the custodian.
RESTRICTED_NOTICE = (
    "RESTRICTED: exact counts from the records, for the data custodian; not for release"
)


def check_free(path: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing data file unless asked to."""
    if path.exists() and not overwrite:
        raise DataFileExistsError(path)


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
    # The records are restricted: readable by the custodian's account only, like the ledger and
    # the server's log (DuckDB creates the file with the umask's mode; the loader writes it in a
    # private directory, so it is never readable by others before this).
    os.chmod(path, 0o600)
    connection.execute(create_table(codebook))
    connection.execute(metadata_table())
    return connection


def append(connection: duckdb.DuckDBPyConnection, batch: pa.Table) -> None:
    """Append an Arrow table whose columns are the records table's, in order."""
    connection.register("veil_incoming", batch)
    try:
        connection.execute(append_records("veil_incoming"))
    finally:
        connection.unregister("veil_incoming")


def finish(
    connection: duckdb.DuckDBPyConnection,
    *,
    codebook: Codebook,
    data_version: str,
    dataset: str | None = None,
    load_id: str | None = None,
) -> None:
    """Record what the file holds, checkpoint it and close it.

    `dataset` names the people the file describes, the same for every version of them; it
    defaults to the codebook's name. `load_id` names this load of the records (default: 32
    random hex digits): a ledger refuses a second file served under a data version it has
    seen served from another load, whose stored releases would be replayed for it.
    """
    statement = record_metadata(
        data_version=data_version,
        codebook=codebook.identity,
        dataset=check_dataset_name(dataset or codebook.name),
        load_id=load_id or secrets.token_hex(16),
    )
    connection.execute(statement.text, statement.parameters)
    connection.execute(checkpoint())
    connection.close()


def recorded(path: str | Path) -> dict[str, str]:
    """What a data file records about itself (data version, codebook identity, dataset name);
    empty when the file is missing or is not a data file."""
    try:
        with duckdb.connect(str(path), read_only=True) as connection:
            statement = read_metadata()
            rows = connection.execute(statement.text, statement.parameters).fetchall()
    except duckdb.Error:
        return {}
    return {str(key): str(value) for key, value in rows}
