"""veil's researcher client: tables with confidence intervals from a veil server.

    import client
    from client import In, Range, Missing

    veil_client = client.connect("localhost:50051", token="veil_...")
    veil_client.codebook()                                  # browse variables and flag sets
    r = (veil_client.count().by("gender", "ageBroad")
         .where(majorityStatus="Minor").release(epsilon=0.5))
    r.to_pandas()               # the keys, value, ci_low, ci_high, suppressed, status
    veil_client.sql("SELECT gender, COUNT(*) FROM victims GROUP BY gender", epsilon=0.5)
    veil_client.budget(), veil_client.releases()

Depends on the generated protos, grpcio, protobuf, pyarrow and sqlglot only (pandas for
`to_pandas`, matplotlib for `plot`); it needs neither DuckDB nor OpenDP, and never imports the
server or the engine.
"""

from __future__ import annotations

from typing import Any

from client.amounts import Amount
from client.codebook import Category, Codebook, Deployment, DerivedDimension, FlagSet, Variable
from client.connection import DEFAULT_ADDRESS, TLS, Client, Retry, connect
from client.errors import (
    SUPPORTED_SQL,
    AuthenticationError,
    BudgetExhausted,
    Cancelled,
    ClientClosed,
    InvalidQuery,
    NotFound,
    PermissionDenied,
    QueryTimeout,
    RateLimited,
    RequestConflict,
    ServerFault,
    ServerUnavailable,
    UnsupportedSQL,
    VeilError,
)
from client.pack import (
    ManifestConflict,
    Pack,
    PackDoesNotFit,
    PackSpecError,
    dry_run_pack,
    release_pack,
)
from client.query import (
    And,
    Count,
    Eq,
    Filter,
    FlagCounts,
    In,
    Mean,
    Missing,
    Not,
    Or,
    Present,
    Proportion,
    Query,
    Range,
    Sum,
)
from client.results import (
    Budget,
    Cell,
    DryRun,
    EarlierRelease,
    ReceivedRelease,
    Release,
    ReleaseList,
    ReleaseMetadata,
)


def __getattr__(name: str) -> Any:
    # The SQL parser loads sqlglot, which only the SQL convenience needs.
    if name in ("parse_sql", "parse_condition"):
        from client import sql

        return getattr(sql, name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")


__all__ = [
    "DEFAULT_ADDRESS",
    "SUPPORTED_SQL",
    "TLS",
    "Amount",
    "And",
    "AuthenticationError",
    "Budget",
    "BudgetExhausted",
    "Cancelled",
    "Category",
    "Cell",
    "Client",
    "ClientClosed",
    "Codebook",
    "Count",
    "Deployment",
    "DerivedDimension",
    "DryRun",
    "EarlierRelease",
    "Eq",
    "Filter",
    "FlagCounts",
    "FlagSet",
    "In",
    "InvalidQuery",
    "ManifestConflict",
    "Mean",
    "Missing",
    "Not",
    "NotFound",
    "Or",
    "Pack",
    "PackDoesNotFit",
    "PackSpecError",
    "PermissionDenied",
    "Present",
    "Proportion",
    "Query",
    "QueryTimeout",
    "Range",
    "RateLimited",
    "ReceivedRelease",
    "Release",
    "ReleaseList",
    "ReleaseMetadata",
    "RequestConflict",
    "Retry",
    "ServerFault",
    "ServerUnavailable",
    "Sum",
    "UnsupportedSQL",
    "Variable",
    "VeilError",
    "connect",
    "dry_run_pack",
    "parse_condition",  # provided lazily by __getattr__
    "parse_sql",
    "release_pack",
]
