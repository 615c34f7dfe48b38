"""Where statements run. The engine needs one small protocol; DuckDB is today's backend.

The data connection is opened read-only, with external access (files, network, extensions)
disabled and the configuration locked, so that even a statement the engine did not mean to write
could not read another file, attach a database or turn those settings back on.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import duckdb
import numpy as np

from engine.errors import QueryCancelledError
from engine.sql import Statement


class Backend(Protocol):
    """Runs one engine-written statement and returns its columns as integer arrays."""

    def run(
        self, statement: Statement, *, cancel: threading.Event | None = None
    ) -> dict[str, np.ndarray]: ...

    def data_version(self) -> str: ...


class DuckDBBackend:
    """A read-only DuckDB file (one cursor per call, so calls may run on many threads)."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        config: dict[str, str | bool | int | float | list[str]] = {
            "access_mode": "READ_ONLY",
            "enable_external_access": False,
            "autoload_known_extensions": False,
            "autoinstall_known_extensions": False,
        }
        if threads is not None:
            config["threads"] = threads
        config["lock_configuration"] = True
        self.path = Path(path)
        self._connection = duckdb.connect(str(self.path), read_only=True, config=config)
        row = self._connection.execute(
            "SELECT value FROM veil_metadata WHERE key = 'data_version'"
        ).fetchone()
        self._data_version = str(row[0]) if row else "unversioned"

    def data_version(self) -> str:
        return self._data_version

    def run(
        self, statement: Statement, *, cancel: threading.Event | None = None
    ) -> dict[str, np.ndarray]:
        cursor = self._connection.cursor()
        watcher = None
        if cancel is not None:
            # A deadline or cancellation interrupts DuckDB mid-scan rather than waiting for it.
            done = threading.Event()

            def watch() -> None:
                while not done.wait(0.01):
                    if cancel.is_set():
                        cursor.interrupt()
                        return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
        try:
            if cancel is not None and cancel.is_set():
                raise QueryCancelledError("the query was cancelled before it ran")
            result = cursor.execute(statement.text, list(statement.parameters)).fetchnumpy()
        except duckdb.InterruptException as exc:
            raise QueryCancelledError("the query was cancelled while it ran") from exc
        finally:
            if watcher is not None:
                done.set()
            cursor.close()
        if cancel is not None and cancel.is_set():
            raise QueryCancelledError("the query was cancelled while it ran")
        # Masked arrays keep NULL (a missing key) distinct from the code 0.
        return dict(result)

    def close(self) -> None:
        self._connection.close()
