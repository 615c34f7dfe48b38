"""Helpers for the client's tests: a real server on port 0 over synthetic records, and
researchers registered with their own budgets, so that tests sharing a server do not share a
budget or a list of releases."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import grpc

from server.auth import hash_token, new_token
from tests.server_harness import LiveServer, start_live

ROWS = 20_000
SEED = 3


class ResponseLost(grpc.RpcError):
    """What a client sees when the connection drops after the server answered: a stub patched
    to raise it after calling the real one shows a lost response."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Connection reset by peer"

    def trailing_metadata(self) -> tuple[()]:
        return ()


@functools.cache
def synthetic_data() -> Path:
    """A synthetic CTDC-like data file, built once per test process."""
    from engine import synthetic

    directory = Path(tempfile.mkdtemp(prefix="veil-client-tests-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "synthetic.duckdb"
    synthetic.generate(path, rows=ROWS, seed=SEED, overwrite=True)
    return path


def start_server(root: Path, **sections: Any) -> LiveServer:
    """A server on port 0 over the synthetic records, with room in the dataset's budget."""
    caps = {"dataset": "100", "client": "1", **sections.pop("caps", {})}
    limits = {"rate_per_second": 1000, "rate_burst": 1000, **sections.pop("limits", {})}
    return start_live(root, data=synthetic_data(), caps=caps, limits=limits, **sections)


def add_researcher(live: LiveServer, *, cap: str = "10", institution: str | None = None,
                   role: str = "researcher") -> tuple[str, str]:
    """Register a new client; returns (client id, token)."""
    client_id = f"r-{uuid.uuid4().hex[:10]}"
    token = new_token()
    live.ledger.register_client(
        client_id, role=role, cap=cap, institution=institution, token_hash=hash_token(token)
    )
    return client_id, token


def address(live: LiveServer) -> str:
    return f"127.0.0.1:{live.port}"
