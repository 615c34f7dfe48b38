"""The one table that maps errors to gRPC status codes, and the server's own error classes.

Every rejection the server sends goes through `abort`. Engine errors carry messages that name
what was rejected and why and never contain a value read from the private data; they are sent as
they are. Anything not in the table is a fault: the caller gets INTERNAL with a reference id and
nothing else, and the log gets the exception's type and where it was raised, never its message
(a message from a library below the engine could quote data).
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import grpc

from engine.errors import (
    BudgetExceededError,
    ClientRegistryError,
    CodebookError,
    DataFileExistsError,
    InvalidLossError,
    InvalidQueryError,
    LedgerIntegrityError,
    LedgerUnavailableError,
    LimitExceededError,
    LoadError,
    QueryCancelledError,
    RequestConflictError,
    RevokedClientError,
    UnknownClientError,
)
from protos.veil.v1 import status_pb2
from protos.veil.v1.trailers import (
    BUDGET_REMAINING_KEY,
    BUDGET_SCOPE_KEY,
    QUOTA_FAILURE_TYPE_URL,
    REQUEST_SPENT_KEY,
    RETRY_AFTER_KEY,
    STATUS_DETAILS_KEY,
    VARIABLE_KEY,
)

log = logging.getLogger("veil.server")


# ---- the server's own errors -------------------------------------------------------------------


class ServerError(Exception):
    """Base of the errors the server raises on purpose (the engine has its own hierarchy)."""


class MalformedRequestError(ServerError):
    """The bytes are not a valid request message, or a field is missing, too long or unknown."""


class AuthenticationError(ServerError):
    """No credential, an unknown one, or one whose client is revoked."""


class PermissionDeniedError(ServerError):
    """The caller's role may not make this call."""


class RateLimitedError(ServerError):
    """The caller has made more calls than its rate allows; retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CallDeadlineError(ServerError):
    """The call's deadline (or the server's longest query time) passed. Nothing was charged,
    unless `spent`: the limit stopped the query after its charge was held, and its request id
    is charged with nothing released."""

    def __init__(self, message: str, *, spent: bool = False) -> None:
        super().__init__(message)
        self.spent = spent


class CallCancelledError(ServerError):
    """The caller cancelled; nothing was charged."""


class ServerStoppingError(ServerError):
    """The server is stopping and interrupted the call; nothing was charged, retry later."""


class NotFoundError(ServerError):
    """A named client, release or codebook entry does not exist."""


class AlreadyExistsError(ServerError):
    """A client with this id is already registered."""


# ---- the table ---------------------------------------------------------------------------------
#
# First match wins, so a subclass must come before its base (LimitExceededError before
# InvalidQueryError). Errors defined by the ledger are added by `register` when it is loaded.

_TABLE: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (MalformedRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CallDeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (CallCancelledError, grpc.StatusCode.CANCELLED),
    (ServerStoppingError, grpc.StatusCode.UNAVAILABLE),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (BudgetExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LimitExceededError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidQueryError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidLossError, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (RevokedClientError, grpc.StatusCode.UNAUTHENTICATED),
    (UnknownClientError, grpc.StatusCode.NOT_FOUND),
    (ClientRegistryError, grpc.StatusCode.FAILED_PRECONDITION),
    # Not UNAVAILABLE: an altered or damaged ledger does not heal if the caller retries.
    (LedgerIntegrityError, grpc.StatusCode.DATA_LOSS),
    (LedgerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (QueryCancelledError, grpc.StatusCode.CANCELLED),
    (CodebookError, grpc.StatusCode.INTERNAL),
    (DataFileExistsError, grpc.StatusCode.INTERNAL),  # the loader's, as LoadError
    (LoadError, grpc.StatusCode.INTERNAL),
]

# Codes whose messages are not shown to the caller: these are faults, not rejections.
_HIDDEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


def register(error: type[BaseException], code: grpc.StatusCode) -> None:
    """Add an error class defined outside the engine's errors module (the ledger's own).

    It goes first, so that a subclass of an engine error keeps its own, more specific code.
    """
    if not any(cls is error for cls, _ in _TABLE):
        _TABLE.insert(0, (error, code))


def status_code_for(error: BaseException) -> grpc.StatusCode:
    for cls, code in _TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class Status(grpc.Status):
    """A status with trailing metadata, as `ServicerContext.abort_with_status` takes it."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


def status_for(error: BaseException) -> Status:
    """The status a caller receives for `error`."""
    code = status_code_for(error)
    if code in _HIDDEN:
        reference = uuid.uuid4().hex[:12]
        frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_tb(error.__traceback__)]
        log.error(
            "internal error",
            extra={"event": "internal_error", "reference": reference,
                   "error_type": type(error).__name__, "frames": frames[-8:]},
        )
        return Status(code, f"internal error (reference {reference}); nothing was charged")
    message = str(error) or type(error).__name__
    trailers: list[tuple[str, str | bytes]] = []
    if isinstance(error, BudgetExceededError):
        trailers.extend(_quota_trailers(code, message, error.scope, error.remaining))
    if isinstance(error, RateLimitedError):
        trailers.append((RETRY_AFTER_KEY, f"{error.retry_after:.3f}"))
    if isinstance(error, CallDeadlineError) and error.spent:
        trailers.append((REQUEST_SPENT_KEY, "1"))
    if isinstance(error, InvalidQueryError) and error.variable:
        trailers.append((VARIABLE_KEY, _ascii(error.variable[:128])))
    return Status(code, message, tuple(trailers))


def _quota_trailers(
    code: grpc.StatusCode, message: str, scope: str, remaining: str
) -> Sequence[tuple[str, str | bytes]]:
    violation = status_pb2.QuotaFailure.Violation(
        subject=scope, description=f"{message}; remaining: {remaining}"
    )
    detail = status_pb2.QuotaFailure(violations=[violation])
    status = status_pb2.RpcStatus(code=code.value[0], message=message)
    any_detail = status.details.add()
    any_detail.type_url = QUOTA_FAILURE_TYPE_URL
    any_detail.value = detail.SerializeToString()
    return (
        (STATUS_DETAILS_KEY, status.SerializeToString()),
        (BUDGET_SCOPE_KEY, _ascii(scope)),
        (BUDGET_REMAINING_KEY, _ascii(remaining)),
    )


def _ascii(text: str) -> str:
    """Metadata values must be printable ASCII."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def abort(context: grpc.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the status the table gives `error`."""
    status = status_for(error)
    context.abort_with_status(status)
