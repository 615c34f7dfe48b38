"""The client's errors: one hierarchy, each class a thing a researcher can act on.

    try:
        veil_client.count().by("gender").release(epsilon=0.5)
    except BudgetExhausted as error:
        print(f"only {error.remaining} left in the {error.scope} budget")
    except InvalidQuery as error:
        print(f"{error.variable}: {error}")

Every error raised because of a server's answer carries the gRPC status name (`code`) and, for a
release, the request id that was used, so that a retry after a timeout can reuse it and is never
charged twice. Advice in a message names Python's ways (`tls=True`, `token=...`); where the
`veil` command's ways differ (`--tls`, `--token-file`), `shell_message` words it for the shell.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from client.amounts import Amount, parse_amount
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

# The environment variables the client reads (see client.connection); named here, the module
# every other imports, so that messages can name them too.
TOKEN_ENV = "VEIL_TOKEN"
CA_CERT_ENV = "VEIL_CA_CERT"


class VeilError(Exception):
    """Base of every error the client raises.

    `shell_message` is the same message with its advice worded for the `veil` command (its
    options and environment variables), or None when the message fits the shell as it is.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        request_id: str | None = None,
        shell_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code  # the gRPC status name, when the server (or the channel) sent one
        self.request_id = request_id  # the release's request id: reuse it to retry for free
        self.shell_message = shell_message


class InvalidQuery(VeilError, ValueError):
    """The query (or its privacy loss) does not fit the codebook or the server's limits.

    `variable` names the variable at fault when the server (or the client) knows it.
    """

    def __init__(
        self,
        message: str,
        *,
        variable: str | None = None,
        code: str | None = None,
        request_id: str | None = None,
        shell_message: str | None = None,
    ) -> None:
        super().__init__(message, code=code, request_id=request_id, shell_message=shell_message)
        self.variable = variable


SUPPORTED_SQL = """\
veil's SQL subset (parsed on your machine into a typed query; no SQL reaches the server):
  SELECT [dimension, ...,] <one aggregate> FROM <any one table name>
    [WHERE <condition>] [GROUP BY <the selected dimensions>]
  aggregates:  COUNT(*)                 records in each cell
               SUM(x), AVG(x)           of an integer variable, clamped to its codebook range
               PROPORTION(<condition>)  share of each cell's records satisfying it
               AVG(CASE WHEN <condition> THEN 1 ELSE 0 END)   the same, spelled in plain SQL
               FLAG_COUNTS(flag_set)    records with each flag of a flag set
  conditions:  =  <>  !=  <  <=  >  >=  IN (...)  NOT IN (...)  BETWEEN a AND b
               IS NULL  IS NOT NULL  AND  OR  NOT  (parentheses)
               (<condition>) IS [NOT] TRUE  (<condition>) IS [NOT] FALSE
               comparing a variable with a literal ('text', 12, TRUE/FALSE), or a flag alone
               NOT (c) drops the records where c is NULL (a variable it reads is missing), as
               in SQL; (c) IS NOT TRUE keeps them (the query builder's Not(c) is written so)
  not supported: SELECT *, joins, subqueries, WITH, UNION, HAVING, ORDER BY, LIMIT, DISTINCT,
               window functions, other functions, several statements"""


class UnsupportedSQL(InvalidQuery):
    """SQL text outside the subset the client understands; the message says what is supported."""

    supported = SUPPORTED_SQL

    def __init__(
        self, reason: str, *, variable: str | None = None, malformed: bool = False
    ) -> None:
        super().__init__(f"{reason}\n\n{SUPPORTED_SQL}", variable=variable)
        self.reason = reason
        # Not SQL at all (a typo, an unclosed parenthesis): `reason` alone says what to fix.
        self.malformed = malformed


class BudgetExhausted(VeilError):
    """The release would exceed a budget. `scope` says which ("client", "institution",
    "dataset"); `remaining` is what is left in it, an exact `Amount` as every amount the client
    gives (its `str()` is the server's text, "0.2"; a release takes it back as its loss; None
    when the server did not say), and `remaining_text` the server's text of it ("0.2").
    """

    def __init__(
        self,
        message: str,
        *,
        scope: str | None,
        remaining: str | None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code, request_id=request_id)
        self.scope = scope
        self.remaining_text = remaining
        self.remaining: Amount | None = parse_amount(remaining)


class RateLimited(VeilError):
    """Too many calls in a short time; `retry_after` is the seconds the server asks to wait."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class AuthenticationError(VeilError):
    """No token, an unknown, rotated or revoked token."""


class PermissionDenied(VeilError):
    """The token's role may not make this call."""


class ServerUnavailable(VeilError):
    """The server could not be reached, is stopping, or could not record a charge. The call may
    be retried: a release with the same request id is charged at most once (a connection lost
    after the server charged it gets the stored release back, free)."""


class QueryTimeout(VeilError):
    """The call's deadline passed. Retry with the same `request_id`: a release is charged at
    most once (one charged just as the deadline passed comes back, free)."""


class Cancelled(VeilError):
    """The call was cancelled. A release cancelled after the server charged it is kept: a retry
    with the same request id gets it back, free."""


class ClientClosed(VeilError):
    """A call on a client that was closed (`close()`, or the end of its `with` block). Nothing
    was sent; connect again to make more calls."""


class RequestConflict(VeilError):
    """The request id was already used for a different query or privacy loss.

    Admin calls raise the subclass `RegistryConflict` instead."""


# A subclass, not a sibling: `RequestConflict` was what Admin calls raised for these refusals
# (and what `AdminClient` documented), so callers' `except RequestConflict` keeps catching them.
class RegistryConflict(RequestConflict):
    """The client registry refused an administrator's change: a client id already registered, a
    cap below what the client has spent or holds, a revoked client's token to rotate, an
    administrator revoking itself. The message is the server's, naming the client and why."""


class NotFound(VeilError, LookupError):
    """The named release (or other item) does not exist for this caller."""


class ServerFault(VeilError):
    """The server failed: its message holds a reference for the custodian's log, or says that
    its ledger fails verification (DATA_LOSS), which retrying does not mend."""


# ---- from a gRPC error -------------------------------------------------------------------------


def status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, str | bytes]]:
    """The status code, message and trailing metadata of a failed call."""
    code_method = getattr(error, "code", None)
    code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
    details_method = getattr(error, "details", None)
    details = (details_method() if callable(details_method) else None) or str(error)
    trailers_method = getattr(error, "trailing_metadata", None)
    trailers = (trailers_method() if callable(trailers_method) else None) or ()
    return code, details, _trailers(trailers)


def _trailers(items: Iterable[Any]) -> dict[str, str | bytes]:
    out: dict[str, str | bytes] = {}
    for item in items:
        key, value = item[0], item[1]
        out[str(key).lower()] = value
    return out


def _text(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def quota_violations(trailers: dict[str, str | bytes]) -> list[tuple[str, str]]:
    """The (subject, description) pairs of a google.rpc.QuotaFailure in the status details."""
    raw = trailers.get(STATUS_DETAILS_KEY)
    if not isinstance(raw, bytes):
        return []
    try:
        status = status_pb2.RpcStatus.FromString(raw)
        out: list[tuple[str, str]] = []
        for detail in status.details:
            if detail.type_url == QUOTA_FAILURE_TYPE_URL:
                failure = status_pb2.QuotaFailure.FromString(detail.value)
                out.extend((v.subject, v.description) for v in failure.violations)
        return out
    except Exception:  # a malformed detail never hides the status itself
        return []


def is_budget_error(trailers: dict[str, str | bytes]) -> bool:
    return BUDGET_SCOPE_KEY in trailers or bool(quota_violations(trailers))


def retry_after(trailers: dict[str, str | bytes]) -> float | None:
    text = _text(trailers.get(RETRY_AFTER_KEY))
    try:
        return float(text) if text else None
    except ValueError:
        return None


# What gRPC (1.85, BoringSSL) reports, as UNAVAILABLE, for a connection that fails; the status
# details read, after "failed to connect to all addresses; last error: ":
#   a TLS client, the server's certificate not signed by the CA given (or the system's roots):
#     "UNKNOWN: ipv4:127.0.0.1:PORT: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL:
#      error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get
#      local issuer certificate: OK"
#   a TLS client, the certificate naming another host: "UNKNOWN: ipv4:...: Custom verification
#     check failed with error: UNAUTHENTICATED: Hostname Verification Check failed."
#   a TLS client, a plaintext server: "UNKNOWN: ipv4:...: Tls handshake failed
#     (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:
#     OPENSSL_internal:WRONG_VERSION_NUMBER: ..."
#   a plaintext client, a TLS server; a TLS client presenting no client certificate, or one
#     signed by a CA the server does not trust, under mutual TLS (the server ends the handshake):
#     "UNAVAILABLE: ipv4:127.0.0.1:PORT: Socket closed"
#   nobody listening (a server down or restarting): "UNKNOWN: ipv4:127.0.0.1:PORT: Failed to
#     connect to remote host: Connection refused"
# The first three are the client's own verdict on what the server sent, certain to repeat on
# every try; "Socket closed" is also what a server stopping mid-connection gives.
_HANDSHAKE_FAILED = (
    "tls handshake failed",
    "hostname verification check failed",
    "certificate_verify_failed",
)
_SOCKET_CLOSED = ("socket closed", "connection reset", "eof")
# The resolver's answer that the name does not exist (NXDOMAIN) or cannot be a host name, in the
# words of gRPC's resolvers and of getaddrinfo; a lookup that timed out or failed for a while
# says otherwise.
_NO_SUCH_HOST = ("domain name not found", "misformatted domain name",
                 "name or service not known", "nodename nor servname provided")


def is_handshake_failure(details: str) -> bool:
    """Whether a call's status details say the client refused the TLS handshake (an unknown
    CA, a certificate naming another host, a server that does not speak TLS): retrying cannot
    help."""
    lowered = details.lower()
    return any(s in lowered for s in _HANDSHAKE_FAILED)


def is_unknown_host(details: str) -> bool:
    """Whether a call's status details say the server's host name does not exist (a misspelt
    --server, most often): retrying cannot help."""
    lowered = details.lower()
    return any(s in lowered for s in _NO_SUCH_HOST)


def from_rpc_error(
    error: grpc.RpcError,
    *,
    address: str = "",
    tls: bool = False,
    request_id: str | None = None,
    client_certificate: bool = False,
    answered: bool = False,
) -> VeilError:
    """The client error for a failed call, with a message a researcher can act on.

    `tls` and `client_certificate` say how the channel was made (TLS; a client certificate
    presented), so that a failed connection can be explained; `answered`, that a call on it
    was answered before, so its security was not the trouble."""
    code, details, trailers = status_of(error)
    kw: dict[str, Any] = {"code": code.name, "request_id": request_id}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidQuery(details, variable=_text(trailers.get(VARIABLE_KEY)), **kw)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if is_budget_error(trailers):
            scope = _text(trailers.get(BUDGET_SCOPE_KEY))
            remaining = _text(trailers.get(BUDGET_REMAINING_KEY))
            if scope is None:
                violations = quota_violations(trailers)
                scope = violations[0][0] if violations else None
            return BudgetExhausted(details, scope=scope, remaining=remaining, **kw)
        wait = retry_after(trailers)
        hint = f"; retry in {wait:.2f} s" if wait is not None and "retry in" not in details else ""
        return RateLimited(f"{details}{hint}", retry_after=wait, **kw)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        python, shell = _token_advice(details)
        return AuthenticationError(
            f"{details}{python}", shell_message=f"{details}{shell}" if shell != python else None,
            **kw,
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(details, **kw)
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        lost = QueryTimeout if code == grpc.StatusCode.DEADLINE_EXCEEDED else Cancelled
        if _text(trailers.get(REQUEST_SPENT_KEY)) == "1":
            # Charged with nothing released: the id is spent, and a retry under it is refused.
            # No request id to reuse, then; the server's message says to ask under a new one.
            return lost(details, code=code.name, request_id=None)
        if not request_id:
            return lost(details, **kw)
        # The release may have been charged on its way back: the same id gets it, free.
        return lost(
            f"{details}; retry with request_id={request_id!r} to be charged at most once",
            shell_message=f"{details}; retry with --request-id {request_id} to be charged at "
            "most once",
            **kw,
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return RequestConflict(details, **kw)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details, **kw)
    if code == grpc.StatusCode.UNAVAILABLE:
        python, shell = _unavailable_messages(
            details, address, tls, client_certificate, request_id, answered
        )
        return ServerUnavailable(python, shell_message=shell if shell != python else None, **kw)
    return ServerFault(details, **kw)


def _token_advice(details: str) -> tuple[str, str]:
    """What to do about a refused token, in Python's words and in the shell's."""
    lowered = details.lower()
    if "expired" in lowered or "certificate" in lowered:
        # The server's message says what to do: a new token from an administrator (`veil admin
        # rotate CLIENT`), or the token issued to the client the certificate names.
        return "", ""
    if "not valid" in lowered:  # unknown, rotated or revoked: another way of passing it won't do
        # The server does not say which (a revoked client's token is refused like any other),
        # and the two remedies differ: a revoked client cannot be given a token again.
        replaced = (
            "a rotated or expired token needs a new one from the administrator (veil admin "
            "rotate CLIENT); a revoked client needs to be registered anew (veil admin register)"
        )
        return (
            f" (check that token=... or {TOKEN_ENV} holds the latest token issued to you; "
            f"{replaced})",
            f" (check that {TOKEN_ENV} or --token-file holds the latest token issued to you; "
            f"{replaced})",
        )
    return (
        f" (pass token=..., or set {TOKEN_ENV}, with the token the custodian issued)",
        f" (set {TOKEN_ENV} or pass --token-file FILE, with the token the custodian issued)",
    )




def unavailable_message(
    details: str, address: str, *, tls: bool, client_certificate: bool, turn_on_tls: str
) -> str:
    """The shell's words for a call to `address` that failed UNAVAILABLE (`details`, gRPC's),
    with the hints about TLS a researcher's command gives: for the commands that make their own
    calls (`veil audit`, `veil attack`), so that a server that is down, or that speaks TLS to a
    plaintext call, is not reported as a server that refused. `turn_on_tls` says how the
    command is told to use TLS, for a plaintext call the server closed."""
    return _unavailable_messages(
        details, address, tls, client_certificate, None, turn_on_tls=turn_on_tls
    )[1]


def _unavailable_messages(
    details: str, address: str, tls: bool, client_certificate: bool, request_id: str | None,
    answered: bool = False,
    *,
    turn_on_tls: str = f"pass --tls, with --ca-cert PEM or {CA_CERT_ENV} for a private CA",
) -> tuple[str, str]:
    """The message for an unavailable server, in Python's words and in the shell's
    (`turn_on_tls`: how the command is told to use TLS)."""
    lowered = details.lower()
    where = f" at {address}" if address else ""
    if is_unknown_host(details):
        message = f"cannot reach the veil server{where}: no host has that name ({details})"
    elif any(s in lowered for s in ("failed to connect", "connection refused", "dns resolution",
                                    "errors resolving")):
        message = f"cannot reach the veil server{where}: {details}"
    else:
        message = f"the veil server{where} is unavailable: {details}"
    python = shell = message
    closed = any(s in lowered for s in _SOCKET_CLOSED)
    if answered:
        pass  # the channel's security worked for an earlier call: no hint about TLS
    elif tls and "wrong_version_number" in lowered:
        python += " (the TLS handshake failed: this server may not use TLS; connect with tls=False)"
        shell += " (the TLS handshake failed: this server may not use TLS; pass --no-tls)"
    elif tls and "hostname verification" in lowered:
        note = " (the TLS handshake failed: the server's certificate does not name this host"
        python += f"{note}; connect with client.TLS(server_name=...) naming the host it does)"
        shell += f"{note}; use the host name the certificate was issued for)"
    elif tls and is_handshake_failure(details):
        python += (
            f" (the TLS handshake failed: check the CA certificate (tls='ca.pem' or "
            f"{CA_CERT_ENV}), or connect with tls=False if this server does not use TLS)"
        )
        shell += (
            f" (the TLS handshake failed: check the CA certificate (--ca-cert PEM or "
            f"{CA_CERT_ENV}), or pass --no-tls if this server does not use TLS)"
        )
    elif tls and closed and not client_certificate:
        python += (
            " (the server may require a client certificate: connect with "
            "tls=client.TLS(ca_cert=..., client_cert=..., client_key=...))"
        )
        shell += (
            " (the server may require a client certificate: pass --client-cert PEM and "
            "--client-key PEM)"
        )
    elif tls and closed:
        note = (
            " (the server may not accept this client certificate: it takes only certificates "
            "signed by the CA it trusts for clients"
        )
        python += f"{note}; check client_cert and client_key)"
        shell += f"{note}; check --client-cert and --client-key)"
    elif not tls and closed:
        python += " (if this server uses TLS, connect with tls=True)"
        shell += f" (if this server uses TLS, {turn_on_tls})"
    if request_id:
        # Not "nothing was charged": a connection lost after the server charged the release is
        # also UNAVAILABLE, and a retry under the same id is what gets it back.
        python += f"; retry with request_id={request_id!r} to be charged at most once"
        shell += f"; retry with --request-id {request_id} to be charged at most once"
    return python, shell


__all__ = [
    "SUPPORTED_SQL",
    "AuthenticationError",
    "BudgetExhausted",
    "Cancelled",
    "InvalidQuery",
    "NotFound",
    "PermissionDenied",
    "QueryTimeout",
    "RateLimited",
    "RegistryConflict",
    "RequestConflict",
    "ServerFault",
    "ServerUnavailable",
    "UnsupportedSQL",
    "VeilError",
    "from_rpc_error",
    "is_handshake_failure",
    "unavailable_message",
]
