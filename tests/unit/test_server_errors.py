"""The one table from errors to gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from engine import errors as engine_errors
from engine.errors import (
    BudgetExceededError,
    ClientRegistryError,
    InvalidLossError,
    InvalidQueryError,
    LedgerIntegrityError,
    LedgerUnavailableError,
    LimitExceededError,
    QueryCancelledError,
    RequestConflictError,
    RevokedClientError,
    UnknownClientError,
    VeilError,
)
from protos.veil.v1 import status_pb2
from server import errors
from server.errors import (
    AuthenticationError,
    CallCancelledError,
    CallDeadlineError,
    MalformedRequestError,
    PermissionDeniedError,
    RateLimitedError,
    ServerStoppingError,
    status_code_for,
    status_for,
)

CASES = [
    (
        InvalidQueryError("gender: value 'x' is not in the codebook domain"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (LimitExceededError("too many cells"), grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidLossError("epsilon must be positive"), grpc.StatusCode.INVALID_ARGUMENT),
    (MalformedRequestError("not a message"), grpc.StatusCode.INVALID_ARGUMENT),
    (
        BudgetExceededError("over", scope="client", remaining="0.5"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    (RateLimitedError("slow down", retry_after=0.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AuthenticationError("no token"), grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError("not for you"), grpc.StatusCode.PERMISSION_DENIED),
    (CallDeadlineError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (CallCancelledError("gone"), grpc.StatusCode.CANCELLED),
    (ServerStoppingError("stopping"), grpc.StatusCode.UNAVAILABLE),
    (QueryCancelledError("gone"), grpc.StatusCode.CANCELLED),
    (LedgerUnavailableError("disk full"), grpc.StatusCode.UNAVAILABLE),
    (LedgerIntegrityError("chain broken"), grpc.StatusCode.DATA_LOSS),  # not retried
    (RequestConflictError("reused"), grpc.StatusCode.FAILED_PRECONDITION),
    (ClientRegistryError("exists"), grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownClientError("nobody"), grpc.StatusCode.NOT_FOUND),
    (RevokedClientError("revoked"), grpc.StatusCode.UNAUTHENTICATED),
]


@pytest.mark.parametrize(("error", "code"), CASES)
def test_the_table(error: Exception, code: grpc.StatusCode) -> None:
    assert status_code_for(error) == code
    status = status_for(error)
    assert status.code == code and status.details == str(error)


def test_every_engine_error_class_is_mapped_on_purpose() -> None:
    classes = [
        cls
        for cls in vars(engine_errors).values()
        if isinstance(cls, type) and issubclass(cls, VeilError) and cls is not VeilError
    ]
    mapped = {cls for cls, _ in errors._TABLE}  # the table itself, not its fall-through
    assert set(classes) <= mapped, set(classes) - mapped


def test_faults_reveal_nothing() -> None:
    secret = "true count 3 in cell (PH, 9--17)"
    for fault in (ValueError(secret), KeyError(secret), VeilError(secret), RuntimeError(secret)):
        status = status_for(fault)
        assert status.code == grpc.StatusCode.INTERNAL
        assert secret not in status.details and "reference" in status.details


def test_budget_status_carries_a_quota_failure() -> None:
    status = status_for(BudgetExceededError("over the cap", scope="institution", remaining="1/3"))
    trailers = dict(status.trailing_metadata)
    assert trailers["veil-budget-scope"] == "institution"
    assert trailers["veil-budget-remaining"] == "1/3"
    rich = status_pb2.RpcStatus.FromString(trailers["grpc-status-details-bin"])  # type: ignore[arg-type]
    assert (
        rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and rich.message == "over the cap"
    )
    assert rich.details[0].type_url == "type.googleapis.com/google.rpc.QuotaFailure"
    quota = status_pb2.QuotaFailure.FromString(rich.details[0].value)
    assert quota.violations[0].subject == "institution"


def test_registered_errors_take_precedence() -> None:
    class Special(InvalidQueryError):
        pass

    errors.register(Special, grpc.StatusCode.OUT_OF_RANGE)
    assert status_code_for(Special("x")) == grpc.StatusCode.OUT_OF_RANGE
    assert status_code_for(InvalidQueryError("x")) == grpc.StatusCode.INVALID_ARGUMENT
