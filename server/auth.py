"""Who is calling, and may they: bearer tokens, roles, rate limits, and the interceptor.

A caller presents `authorization: Bearer <token>` in its call metadata. The server keeps only a
hash of each token; the hash names the client, and the client's registration gives its role and
institution. The caller's identity comes from the credential alone, never from a request field.

The interceptor wraps every veil method so that the check runs on the call's worker thread
(inside the server's concurrency cap, never on the thread that accepts calls): authenticate, check
the role against `METHOD_ROLES`, apply the client's rate limit, then run the method with the
identity available through `current_identity()`. The check needs only the call's metadata, so it
runs before the request message is read, and the message must then arrive within
`request_seconds` (`RequestWait`): gRPC gives a call its worker when its headers arrive, so calls
that never send their message would otherwise hold every worker, before any credential is seen.
Health checks get the same bound. Failed attempts are recorded in the server log
and in the audit log: without a registered client's token, at most `audit_failures_per_minute`
per peer address and `audit_failures_total_per_minute` in all, so that a flood of bad tokens,
even from many addresses, can neither flood the log nor keep the ledger's write lock from the
releases; a registered client's refusals, at most `audit_failures_per_minute` per client, so that
such a flood cannot keep them out of the log either. Each
entry counts the refusals left unrecorded before it, so the log still accounts for every one.
Health checks and reflection need no credential.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import heapq
import itertools
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import grpc

from server.errors import (
    AuthenticationError,
    CallDeadlineError,
    MalformedRequestError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
    abort,
)

log = logging.getLogger("veil.server")

TOKEN_PREFIX = "veil_"
_MAX_TOKEN_LENGTH = 256
# The wait a client refused for having too many calls running is told to take before it retries.
_CONCURRENCY_RETRY_SECONDS = 0.1


class Role(Enum):
    RESEARCHER = "researcher"
    AUDITOR = "auditor"
    ADMIN = "admin"


@dataclass(frozen=True)
class Identity:
    """The caller, as its credential names it."""

    client_id: str
    role: Role
    institution: str = ""


@dataclass(frozen=True)
class ExpiredToken:
    """A token that named a client until `expired_at` (ISO 8601, UTC)."""

    client_id: str
    expired_at: str


@dataclass(frozen=True)
class RevokedToken:
    """The token of a client that has been revoked: refused like any invalid token, but its
    refusal is audited under the client's name (a revoked client still calling is news)."""

    client_id: str


# ---- tokens ------------------------------------------------------------------------------------


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


# Anything shaped like a token: an administrator may paste one where an id or an amount goes,
# and the refusal quoting it must not carry it into the audit log.
_TOKEN_LIKE = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_\-]{8,}")


def without_tokens(text: str) -> str:
    """`text` with anything shaped like a bearer token replaced, for the audit log."""
    return _TOKEN_LIKE.sub(TOKEN_PREFIX + "<redacted>", text)


# A bearer token as `new_token` makes them: the prefix and 43 URL-safe characters. Shorter names
# that merely start with the prefix (veil_team) are ordinary ids.
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_\-]{32,}")


def is_token(text: str) -> bool:
    """Whether `text` is, whole, a bearer token (not merely a name starting as one does)."""
    return _TOKEN.fullmatch(text) is not None


def hash_token(token: str) -> str:
    """The only form in which a token is stored: SHA-256 of its text, in hex.

    Tokens are 256-bit random strings, so a fast hash is enough: there is nothing to guess.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(metadata: Any) -> str | None:
    """The token in `authorization: Bearer <token>`, or None when there is none."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if not isinstance(value, str):
            return None
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        if len(token) > _MAX_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
            return None
        return str(token)
    return None


# ---- roles -------------------------------------------------------------------------------------

_ALL = frozenset(Role)
_QUERYING = frozenset({Role.RESEARCHER, Role.AUDITOR})
_AUDITING = frozenset({Role.AUDITOR, Role.ADMIN})
_ADMIN = frozenset({Role.ADMIN})

# Every method of veil's services and the roles that may call it. A method missing here is
# refused to everyone. Browsing and pricing touch no data and are open to every role; releasing
# spends budget and is for researchers and auditors (who probe the live server); administration
# is the administrator's; the audit trail is for auditors and administrators.
METHOD_ROLES: Mapping[str, frozenset[Role]] = {
    "/veil.v1.Research/GetCodebook": _ALL,
    "/veil.v1.Research/DescribeVariable": _ALL,
    "/veil.v1.Research/DryRun": _ALL,
    "/veil.v1.Research/Release": _QUERYING,
    "/veil.v1.Research/GetBudget": _QUERYING,
    "/veil.v1.Research/ListMyReleases": _QUERYING,
    "/veil.v1.Research/GetRelease": _QUERYING,
    "/veil.v1.Admin/RegisterClient": _ADMIN,
    "/veil.v1.Admin/SetBudget": _ADMIN,
    "/veil.v1.Admin/RevokeClient": _ADMIN,
    "/veil.v1.Admin/ListClients": _ADMIN,
    "/veil.v1.Admin/RotateToken": _ADMIN,
    "/veil.v1.Audit/GetLedgerReport": _AUDITING,
    "/veil.v1.Audit/ListReleases": _AUDITING,
    "/veil.v1.Audit/VerifyAuditLog": _AUDITING,
    "/veil.v1.Audit/GetAuditTables": _AUDITING,
}

# Services that need no credential.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "veil_identity", default=None
)


def identity_or_none() -> Identity | None:
    """The authenticated caller of the call running on this thread, if any."""
    return _identity.get()


def current_identity() -> Identity:
    """The authenticated caller of the call running on this thread."""
    identity = _identity.get()
    if identity is None:
        raise AuthenticationError("this call has no authenticated caller")
    return identity


# ---- the client directory ----------------------------------------------------------------------


class Directory(Protocol):
    """Where the interceptor looks tokens up and records failed attempts (the ledger)."""

    def identify(self, token_hash: str) -> Identity | ExpiredToken | RevokedToken | None:
        """The active client holding this token hash, ExpiredToken when its token has expired,
        RevokedToken when its client has been revoked, or None (unknown, or rotated away)."""

    def record_denied(
        self, *, method: str, reason: str, client: str | None, peer: str, unrecorded: int = 0
    ) -> None:
        """Append a failed attempt to the audit log; `unrecorded` refusals before it were left
        out of the log by its rate limits."""


# ---- rate limits -------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key: `rate` calls per second sustained, `burst` at once."""

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if a call may proceed now, else the seconds until it may."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > 100_000:  # forget idle keys rather than grow without bound
                self._buckets = {
                    k: v for k, v in self._buckets.items() if now - v[1] < self.burst / self.rate
                }
            return (1 - tokens) / self.rate


# ---- the request's arrival ---------------------------------------------------------------------


class RequestWait:
    """Cancels a call whose request message has not arrived `seconds` after it began.

    One thread keeps the deadlines of the calls waiting for their message, earliest first; a
    call whose message arrives in time is struck off (a timer thread per call would cost a
    thread start on every call).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._waiting: list[list[Any]] = []  # [deadline, order, expire or None once struck off]
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, expire: Callable[[], None]) -> Iterator[None]:
        """Within the block, `expire` is called (once) if the block outlasts `seconds`."""
        entry = [time.monotonic() + self.seconds, next(self._order), expire]
        with self._changed:
            heapq.heappush(self._waiting, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="veil-request-wait", daemon=True
                )
                self._thread.start()
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                entry[2] = None

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._waiting and self._waiting[0][2] is None:
                    heapq.heappop(self._waiting)
                if not self._waiting:
                    self._changed.wait()
                    continue
                delay = self._waiting[0][0] - time.monotonic()
                if delay > 0:
                    self._changed.wait(delay)
                    continue
                expire = heapq.heappop(self._waiting)[2]
            try:
                expire()
            except Exception:  # a call already gone: nothing to cancel
                log.debug("a late call could not be cancelled", exc_info=True)
            # Not kept until the next expiry: it holds the call, and through it the server.
            del expire


def _first_request(
    requests: Iterator[Any], context: grpc.ServicerContext, wait: RequestWait, method: str,
    client: str | None,
) -> Any:
    """The call's one request message, read within `wait.seconds` of asking; the call is
    cancelled (and logged) when it does not come."""

    def expire() -> None:
        log.warning(
            "request not sent in time",
            extra={"event": "request_timeout", "method": method, "client": client,
                   "peer": context.peer(), "seconds": wait.seconds},
        )
        context.cancel()  # type: ignore[no-untyped-call]

    with wait.watch(expire):
        try:
            return next(requests)
        except StopIteration:
            abort(context, MalformedRequestError("the call ended without its request message"))
        except grpc.RpcError:  # cancelled: by `expire`, or by the caller
            abort(context, CallDeadlineError(
                f"the request message did not arrive within {wait.seconds:g} s of the call"
            ))


# ---- the interceptor ---------------------------------------------------------------------------


def certificate_names(context: grpc.ServicerContext) -> set[str]:
    """The names the caller's verified TLS certificate carries: its common name and subject
    alternative names. Empty without mutual TLS."""
    # Each property is a list of values (the grpc-stubs package types it as one bytes value).
    auth: Mapping[str, Iterable[bytes]] = context.auth_context()  # type: ignore[assignment]
    names = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            names.add(value.decode("utf-8", "replace"))
    return names


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates, authorises and rate-limits every veil call."""

    def __init__(
        self,
        directory: Directory,
        *,
        rate_per_second: float,
        rate_burst: int,
        audit_failures_per_minute: int = 60,
        audit_failures_total_per_minute: int = 600,
        calls_per_client: int | None = None,
        bind_client_ids: bool = False,
        request_seconds: float = 10.0,
    ) -> None:
        self.directory = directory
        self.request_wait = RequestWait(request_seconds)
        # Calls each client has running: a cap keeps one client from holding every worker with
        # slow calls while others wait (the rate limit counts calls begun, not calls running).
        self.calls_per_client = calls_per_client
        self._running: dict[str, int] = {}
        self._running_lock = threading.Lock()
        # Mutual TLS only: the token's client must be named by the caller's certificate.
        self.bind_client_ids = bind_client_ids
        self.limiter = RateLimiter(rate=rate_per_second, burst=rate_burst)
        self.failure_audit = RateLimiter(
            rate=audit_failures_per_minute / 60.0, burst=audit_failures_per_minute
        )
        # One bucket for all peers: many addresses must not add up to a flood either.
        self.total_failure_audit = RateLimiter(
            rate=audit_failures_total_per_minute / 60.0, burst=audit_failures_total_per_minute
        )
        self._unrecorded = 0  # refusals left out of the audit log since its last entry
        self._unrecorded_lock = threading.Lock()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return None
        wait = self.request_wait
        # Each handler is served as taking a stream of requests, so that its worker starts at
        # once (a unary handler's waits for the message first), and reads the one message itself.
        if method.startswith(OPEN_SERVICES):
            if handler.request_streaming:
                return handler  # reflection's own stream (off unless configured)
            unary = handler.unary_unary is not None
            served = handler.unary_unary if unary else handler.unary_stream
            assert served is not None  # a handler serves its method one way or another

            def open_call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return served(_first_request(requests, context, wait, method, None), context)

            make = (
                grpc.stream_unary_rpc_method_handler
                if unary
                else grpc.stream_stream_rpc_method_handler
            )
            return make(
                open_call,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:  # veil's methods are all unary
            return _refusal(PermissionDeniedError(f"{method} is not a veil method"))
        behavior = handler.unary_unary

        def authorised(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            try:
                identity = self.check(method, context)
            except Exception as exc:  # a refusal, or a ledger that cannot be read: fail closed
                abort(context, exc)
            token = _identity.set(identity)
            try:
                request = _first_request(requests, context, wait, method, identity.client_id)
                return behavior(request, context)
            finally:
                _identity.reset(token)
                self.end_call(identity.client_id)

        return grpc.stream_unary_rpc_method_handler(
            authorised,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def check(self, method: str, context: grpc.ServicerContext) -> Identity:
        """The caller's identity, its call counted as running (until `end_call`), or an
        AuthenticationError, PermissionDeniedError or RateLimitedError saying why the call is
        refused."""
        peer = context.peer()
        token = bearer_token(context.invocation_metadata())
        if token is None:
            self._denied(method, "no bearer token in the authorization metadata", None, peer)
            raise AuthenticationError(
                "missing credential: send `authorization: Bearer <token>` in the call metadata"
            )
        identity = self.directory.identify(hash_token(token))
        if identity is None or isinstance(identity, RevokedToken):
            # The caller is told the same either way; the log says whose the token was.
            revoked = isinstance(identity, RevokedToken)
            reason = "revoked client's token" if revoked else "unknown or rotated token"
            self._denied(method, reason, identity.client_id if identity else None, peer)
            raise AuthenticationError("the token is not valid: unknown, rotated or revoked")
        if isinstance(identity, ExpiredToken):
            self._denied(method, "expired token", identity.client_id, peer)
            raise AuthenticationError(
                f"the token expired at {identity.expired_at}; an administrator can issue a new "
                f"one (veil admin rotate {identity.client_id})"
            )
        if self.bind_client_ids and identity.client_id not in certificate_names(context):
            self._denied(
                method, "the client certificate does not name the token's client",
                identity.client_id, peer,
            )
            raise AuthenticationError(
                "the token does not belong to the client your certificate names (by its common "
                "name or a subject alternative name); use the token issued to that client"
            )
        allowed = METHOD_ROLES.get(method, frozenset())
        if identity.role not in allowed:
            reason = f"role {identity.role.value} may not call"
            self._denied(method, reason, identity.client_id, peer)
            roles = ", ".join(sorted(r.value for r in allowed)) or "no role"
            raise PermissionDeniedError(
                f"{method} is for {roles}; client {identity.client_id!r} is {identity.role.value}"
            )
        # Counted as running before the rate is taken: a call refused for the calls its client
        # has running must not use up the client's rate as well.
        self._begin(method, identity.client_id)
        wait = self.limiter.take(identity.client_id)
        if wait > 0:
            self.end_call(identity.client_id)
            log.warning(
                "rate limited",
                extra={"event": "rate_limited", "method": method, "client": identity.client_id},
            )
            raise RateLimitedError(
                f"client {identity.client_id!r} exceeded its rate limit of "
                f"{self.limiter.rate:g} calls per second (burst {self.limiter.burst}); "
                f"retry in {wait:.2f} s",
                retry_after=wait,
            )
        return identity

    def _begin(self, method: str, client_id: str) -> None:
        """Count a call of `client_id` as running, or refuse it when the client has its cap of
        calls running already (RateLimitedError: RESOURCE_EXHAUSTED, with a wait to retry)."""
        with self._running_lock:
            running = self._running.get(client_id, 0)
            if self.calls_per_client is None or running < self.calls_per_client:
                self._running[client_id] = running + 1
                return
        log.warning(
            "too many calls running",
            extra={"event": "concurrency_limited", "method": method, "client": client_id},
        )
        raise RateLimitedError(
            f"client {client_id!r} already has {running} calls running, the most one client may "
            "have at once; retry when one of them ends",
            retry_after=_CONCURRENCY_RETRY_SECONDS,
        )

    def end_call(self, client_id: str) -> None:
        """Count a call of `client_id` that `check` admitted as ended."""
        with self._running_lock:
            running = self._running[client_id] - 1
            if running:
                self._running[client_id] = running
            else:
                del self._running[client_id]

    def _denied(self, method: str, reason: str, client: str | None, peer: str) -> None:
        log.warning(
            "call refused",
            extra={"event": "auth_denied", "method": method, "reason": reason,
                   "client": client, "peer": peer},
        )
        with self._unrecorded_lock:
            # A registered client's refusal (a role it lacks, a revoked or expired token) has an
            # allowance of its own: anonymous garbage from the same address, or from anywhere,
            # must not leave a known client's attempts unnamed in the log.
            if client is not None:
                full = self.failure_audit.take(f"client {client}") > 0
            else:
                full = (
                    self.failure_audit.take(peer.rpartition(":")[0] or peer) > 0
                    or self.total_failure_audit.take("") > 0
                )
            if full:
                self._unrecorded += 1  # counted in the next entry that is written
                return
            unrecorded, self._unrecorded = self._unrecorded, 0
        try:
            self.directory.record_denied(
                method=method, reason=reason, client=client, peer=peer, unrecorded=unrecorded
            )
        except Exception as exc:  # the refusal stands even if the audit write fails
            with self._unrecorded_lock:
                self._unrecorded += unrecorded + 1
            log.error(
                "could not record a refused call",
                extra={"event": "audit_write_failed", "error_type": type(exc).__name__},
            )


def _refusal(error: ServerError) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    def refuse(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        abort(context, error)  # at once: no request message is waited for

    return grpc.stream_unary_rpc_method_handler(refuse)
