"""Where statements run. The engine needs one small protocol; DuckDB is today's backend.

The data connection is opened read-only, with external access (files, network, extensions)
disabled and the configuration locked, so that even a statement the engine did not mean to write
could not read another file, attach a database or turn those settings back on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import duckdb
import numpy as np

from engine.errors import LoadError, QueryCancelledError
from engine.sql import Statement, read_metadata


class Cancellation:
    """A one-way switch a running query watches: once set, its statement is interrupted.

    Setting it calls what is registered at once, so no thread per running query has to poll a
    flag to interrupt it (the server holds many calls at a time).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._next_key = 0

    def set(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until this is set or `timeout` seconds pass; whether it is set."""
        return self._event.wait(timeout)

    @contextlib.contextmanager
    def calling(self, callback: Callable[[], object]) -> Iterator[None]:
        """Call `callback` if this is set while the block runs (at once if it already is)."""
        with self._lock:
            key = self._next_key
            self._next_key += 1
            watching = not self._event.is_set()
            if watching:
                self._callbacks[key] = callback
        if not watching:
            callback()
        try:
            yield
        finally:
            with self._lock:
                self._callbacks.pop(key, None)


class Backend(Protocol):
    """Runs one engine-written statement and returns its columns as integer arrays."""

    def run(
        self, statement: Statement, *, cancel: Cancellation | None = None
    ) -> dict[str, np.ndarray]: ...

    def data_version(self) -> str: ...

    def codebook(self) -> str | None:
        """The identity of the codebook the data was loaded with (`Codebook.identity`), when the
        data records it."""
        ...

    def dataset(self) -> str | None:
        """The name the data was loaded under, which every version of the same people shares,
        when the data records it."""
        ...

    def load_id(self) -> str | None:
        """The id of the load that wrote the records, when the data records it."""
        ...


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
        if not self.path.is_file():
            raise LoadError(f"there is no data file at {self.path} (write one with `veil load`)")
        try:
            self._connection = duckdb.connect(str(self.path), read_only=True, config=config)
        except duckdb.Error as exc:
            raise _foreign(self.path, exc) from exc
        try:
            statement = read_metadata()
            rows = self._connection.execute(statement.text, statement.parameters).fetchall()
            recorded = dict(rows)
        except duckdb.Error as exc:  # a DuckDB file, but not one of ours
            self._connection.close()
            raise _foreign(self.path, exc) from exc
        self._data_version = str(recorded.get("data_version", "unversioned"))
        self._codebook = recorded.get("codebook")
        self._dataset = recorded.get("dataset")
        self._load_id = recorded.get("load_id")

    def data_version(self) -> str:
        return self._data_version

    def codebook(self) -> str | None:
        return None if self._codebook is None else str(self._codebook)

    def dataset(self) -> str | None:
        return None if self._dataset is None else str(self._dataset)

    def load_id(self) -> str | None:
        return None if self._load_id is None else str(self._load_id)

    def run(
        self, statement: Statement, *, cancel: Cancellation | None = None
    ) -> dict[str, np.ndarray]:
        cursor = self._connection.cursor()
        try:
            if cancel is not None and cancel.is_set():
                raise QueryCancelledError("the query was cancelled before it ran")
            # A deadline or cancellation interrupts DuckDB mid-scan rather than waiting for it.
            # (Set in the instant before the statement starts, the interrupt is lost; the check
            # after the statement still refuses its result.)
            interrupt = (
                cancel.calling(lambda: _interrupt(cursor)) if cancel else contextlib.nullcontext()
            )
            with interrupt:
                result = cursor.execute(statement.text, list(statement.parameters)).fetchnumpy()
        except duckdb.InterruptException as exc:
            raise QueryCancelledError("the query was cancelled while it ran") from exc
        finally:
            cursor.close()
        if cancel is not None and cancel.is_set():
            raise QueryCancelledError("the query was cancelled while it ran")
        # Masked arrays keep NULL (a missing key) distinct from the code 0.
        return dict(result)

    def close(self) -> None:
        self._connection.close()


def _foreign(path: Path, exc: duckdb.Error) -> LoadError:
    return LoadError(f"{path} is not a data file written by `veil load` or `veil synth` ({exc})")


def _interrupt(cursor: duckdb.DuckDBPyConnection) -> None:
    # Set as the statement ends, the interrupt may find the cursor closed: nothing is left to stop.
    with contextlib.suppress(duckdb.Error):
        cursor.interrupt()
