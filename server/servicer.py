"""The three veil services. Thin: check and convert the request, call the engine or the ledger,
convert back.

`generic_handlers` registers them with gRPC. Requests arrive as raw bytes and are parsed here, so
that bytes which are not a valid message, or a message carrying fields this server does not know,
get INVALID_ARGUMENT with a plain reason (gRPC's own parser would answer INTERNAL). Every error is
turned into a status by the one table in `server.errors`; every call is logged as one JSON line
with no data value in it.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf.descriptor import ServiceDescriptor

from engine.backend import Cancellation
from engine.engine import Engine
from engine.errors import LedgerUnavailableError, QueryCancelledError, VeilError
from engine.loss import PrivacyLoss, parse_amount
from engine.planner import Plan
from engine.release import Answer, Charger, Release, Reservation
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc
from server import convert
from server.accounts import Accounts
from server.auth import Identity, current_identity, identity_or_none, new_token
from server.errors import (
    CallCancelledError,
    CallDeadlineError,
    MalformedRequestError,
    ServerError,
    ServerStoppingError,
    abort,
    status_code_for,
)

log = logging.getLogger("veil.server")

# grpc reports "no deadline" as a time remaining of about 2**63 ns.
_NO_DEADLINE = 1e9

# What the caller does, as opposed to the server's own limit ("limit") and stop ("shutdown").
_CALLER_REASONS = frozenset({"deadline", "cancelled"})


# ---- calls in flight ---------------------------------------------------------------------------


@dataclass(eq=False)
class CallWatch:
    """Cancels one call's engine work when its deadline passes, its caller cancels, or the
    server stops; remembers which, so the caller is told the right status.

    Once the call holds a charge (`hold`), its query reads the data, and how long that takes
    depends on the records: a caller who could stop it free (a deadline, a cancel) would learn
    whether it finished in time at no cost, and could try again and again. So from then on only
    the server's own reasons (its query time limit, a stop) interrupt the work; a caller's are
    noted in `caller_gone`, and the release is charged and stored as any other, so that a retry
    under the same request id gets it free.
    """

    event: Cancellation = field(default_factory=Cancellation)
    reason: str = ""
    ended: bool = False  # the call has returned; a limit that comes due now is moot
    holding: bool = False  # a charge is held: only the server's own reasons stop the work
    caller_gone: str = ""  # the caller's reason, when it came while a charge was held
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fire(self, reason: str) -> None:
        with self._lock:
            if self.event.is_set():
                return
            if self.holding and reason in _CALLER_REASONS:
                self.caller_gone = self.caller_gone or reason
                return
            self.reason = reason
            self.event.set()

    def hold(self) -> bool:
        """Mark the call as holding a charge; False if the work was stopped before that."""
        with self._lock:
            if self.event.is_set():
                return False
            self.holding = True
            return True

    def error(self, limit: float) -> ServerError:
        if self.reason == "deadline":
            return CallDeadlineError(
                "the call's deadline passed before its charge was held; nothing was charged"
            )
        if self.reason == "limit":
            return CallDeadlineError(
                f"the query ran longer than the server's limit of {limit:g} s and was stopped; "
                "nothing was charged"
            )
        if self.reason == "shutdown":
            return ServerStoppingError("the server is stopping; nothing was charged, retry later")
        return CallCancelledError(
            "the call was cancelled before its charge was held; nothing was charged"
        )


@dataclass(eq=False)
class _Timer:
    """One pending limit: fires `watch` with `reason` unless cancelled first."""

    watch: CallWatch
    reason: str
    cancelled: bool = False
    queued: bool = True  # still in the heap (the thread has not taken it yet)


# Compact the heap once cancelled timers are at least this many and outnumber live ones: each
# compaction is O(n) but follows n/2 cancellations, so a call costs O(log n) amortised.
_COMPACT_AT = 64


class Watchdog:
    """Fires calls' time limits from one thread, instead of a timer thread per call."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Timer]] = []  # a heap, soonest first
        self._cancelled = 0  # timers in the heap whose call has ended
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def fire_after(self, seconds: float, watch: CallWatch, reason: str) -> _Timer:
        """Fire `watch` with `reason` after `seconds`, unless `cancel` is called first."""
        timer = _Timer(watch, reason)
        when = time.monotonic() + seconds
        with self._condition:
            heapq.heappush(self._due, (when, next(self._order), timer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="veil-watchdog", daemon=True)
                self._thread.start()
            if self._due[0][2] is timer:  # sooner than what the thread waits for: wake it
                self._condition.notify()
        return timer

    def cancel(self, timer: _Timer) -> None:
        """Drop a timer whose call has ended, so that ended calls do not pile up until their
        limits pass (at 200 calls/s and a 60 s limit, some 12,000 of them)."""
        with self._condition:
            if timer.cancelled:
                return
            timer.cancelled = True
            if not timer.queued:
                return
            self._cancelled += 1
            if self._cancelled >= _COMPACT_AT and 2 * self._cancelled > len(self._due):
                self._due = [entry for entry in self._due if not entry[2].cancelled]
                heapq.heapify(self._due)
                self._cancelled = 0
                # The soonest limit may have been dropped; the thread's wait is then merely early.

    def _run(self) -> None:
        while True:
            due = []
            with self._condition:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    timer = heapq.heappop(self._due)[2]
                    timer.queued = False
                    if timer.cancelled:
                        self._cancelled -= 1
                    else:
                        due.append(timer)
                if not due:
                    wait = self._due[0][0] - now if self._due else None
                    self._condition.wait(wait)
                    continue
            for timer in due:
                if not timer.watch.ended:  # the call may have ended since it was taken
                    try:
                        timer.watch.fire(timer.reason)
                    except Exception as exc:  # one failure must not end every call's limit
                        log.error("watchdog", extra={"event": "watchdog_error",
                                                     "error": type(exc).__name__})


class InFlight:
    """Counts running calls and holds the watches of running queries, for a clean stop."""

    def __init__(self) -> None:
        self._calls = 0
        self.peak = 0  # the most calls ever running at once
        self._watches: set[CallWatch] = set()
        self._condition = threading.Condition()
        self._watchdog = Watchdog()
        self.stopping = False

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._condition:
            self._calls += 1
            self.peak = max(self.peak, self._calls)
        try:
            yield
        finally:
            with self._condition:
                self._calls -= 1
                self._condition.notify_all()

    @contextmanager
    def watch(self, context: grpc.ServicerContext, *, limit: float) -> Iterator[CallWatch]:
        watch = CallWatch()
        remaining = context.time_remaining()
        deadline = remaining if remaining is not None and remaining < _NO_DEADLINE else None
        # The limit holds even after a deadline that came while a charge was held.
        timers = [self._watchdog.fire_after(limit, watch, "limit")]
        if deadline is not None and deadline < limit:
            timers.append(self._watchdog.fire_after(deadline, watch, "deadline"))
        def on_end() -> None:
            watch.fire("deadline" if _expired(context) else "cancelled")

        if not context.add_callback(on_end):
            on_end()  # the call had already ended: its work must not go on
        with self._condition:
            self._watches.add(watch)
            if self.stopping:
                watch.fire("shutdown")
        try:
            yield watch
        finally:
            watch.ended = True
            for timer in timers:
                self._watchdog.cancel(timer)
            with self._condition:
                self._watches.discard(watch)

    @property
    def calls(self) -> int:
        with self._condition:
            return self._calls

    def cancel_all(self) -> None:
        """Interrupt every running query (their reservations are released, nothing charged)."""
        with self._condition:
            self.stopping = True
            watches = list(self._watches)
        for watch in watches:
            watch.fire("shutdown")

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is running; False if some still are after `timeout` seconds."""
        end = time.monotonic() + timeout
        with self._condition:
            while self._calls:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._condition.wait(left)
        return True


class _WatchedCharger:
    """The ledger's charger, tying each hold to the call's watch.

    A call that ends before its charge is held has read nothing: it is refused, uncharged. Once
    the charge is held, only the server's limit or stop interrupts the query (see `CallWatch`),
    and then the commit is refused and the hold released: the engine interrupts DuckDB when the
    watch fires, but the noise and the commit that follow the statement are not interruptible.
    """

    def __init__(self, inner: Charger, watch: CallWatch) -> None:
        self.inner = inner
        self.watch = watch
        self.served_stored = False  # a stored release came back: this call was not charged

    def reserve(
        self, plan: Plan, *, client: str, request_id: str, data_version: str
    ) -> Reservation:
        if self.watch.event.is_set():
            raise QueryCancelledError("the call ended before its charge was reserved")
        reservation = self.inner.reserve(
            plan, client=client, request_id=request_id, data_version=data_version
        )
        self.served_stored = reservation.stored is not None
        if not self.served_stored and not self.watch.hold():
            reservation.cancel()  # ended while the charge was being held: nothing was read
            raise QueryCancelledError("the call ended before its charge was reserved")
        return _WatchedReservation(reservation, self.watch)


class _WatchedReservation:
    def __init__(self, inner: Reservation, watch: CallWatch) -> None:
        self.inner = inner
        self.watch = watch

    @property
    def stored(self) -> Release | None:
        return self.inner.stored

    def commit(self, answer: Answer) -> Release:
        if self.watch.event.is_set():
            self.inner.cancel()
            raise QueryCancelledError("the call ended before its release was recorded")
        return self.inner.commit(answer)

    def cancel(self) -> None:
        self.inner.cancel()


def _expired(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0.001


# ---- the services ------------------------------------------------------------------------------


@dataclass
class Services:
    """What the servicers share: the engine, the ledger and the limits."""

    engine: Engine
    accounts: Accounts
    max_query_seconds: float
    max_request_bytes: int
    max_response_bytes: int
    max_list_releases: int
    in_flight: InFlight = field(default_factory=InFlight)


class ResearchServicer(pb_grpc.ResearchServicer):
    def __init__(self, services: Services) -> None:
        self.s = services

    def GetCodebook(self, request: pb.GetCodebookRequest, context: Any) -> pb.GetCodebookResponse:
        engine = self.s.engine
        return pb.GetCodebookResponse(
            codebook=convert.codebook_to_pb(engine.codebook),
            deployment=convert.deployment_to_pb(
                engine.settings,
                data_version=engine.data_version,
                max_request_bytes=self.s.max_request_bytes,
                max_response_bytes=self.s.max_response_bytes,
            ),
        )

    def DescribeVariable(
        self, request: pb.DescribeVariableRequest, context: Any
    ) -> pb.DescribeVariableResponse:
        return convert.describe(self.s.engine.codebook, request.name)

    def DryRun(self, request: pb.DryRunRequest, context: Any) -> pb.DryRunResponse:
        engine = self.s.engine
        query = convert.query_from_pb(request.query, engine.settings)
        target = request.WhichOneof("target")
        if target is None:
            raise MalformedRequestError("give a target: a loss, or a half_width")
        assumed = request.assumed_count if request.HasField("assumed_count") else None
        if assumed is not None and not 0 <= assumed <= 10**12:
            raise MalformedRequestError("assumed_count must lie between 0 and 10^12")
        if target == "loss":
            dry = engine.dry_run(
                query, loss=convert.loss(request.loss, engine.settings), assumed_count=assumed
            )
        else:
            if not 1 <= request.half_width <= 10**9:
                raise MalformedRequestError("half_width must lie between 1 and 10^9")
            dry = engine.dry_run(query, half_width=request.half_width, assumed_count=assumed)
        stored = self.s.accounts.stored_release(dry.fingerprint)
        stored_loss = None if stored is None else parse_amount(stored.loss)
        already = stored_loss is not None and stored_loss >= dry.loss.amount
        if already:
            # The stored release is what a release would return: price its loss and accuracy,
            # not those of a fresh draw at the loss asked for, and state its empty cells as it
            # was made (a release made before they were recorded states none).
            assert stored is not None and stored_loss is not None
            if stored_loss != dry.loss.amount:
                dry = engine.dry_run(
                    query, loss=PrivacyLoss(dry.loss.accounting, stored_loss),
                    assumed_count=assumed,
                )
            dry = dataclasses.replace(
                dry,
                empty_pass_probability=stored.empty_pass_probability,
                expected_empty_published_bound=stored.expected_empty_published_bound,
                unreachable_cells=stored.unreachable_cells,
            )
        return convert.dry_run_to_pb(dry, already_released=already)

    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        engine = self.s.engine
        identity = current_identity()
        request_id = convert.request_id(request.request_id)
        query = convert.query_from_pb(request.query, engine.settings)
        loss = convert.loss(request.loss, engine.settings)
        limit = self.s.max_query_seconds
        with self.s.in_flight.watch(context, limit=limit) as watch:
            charger = _WatchedCharger(self.s.accounts.charger, watch)
            try:
                release = engine.release(
                    query,
                    loss=loss,
                    charger=charger,
                    client=identity.client_id,
                    request_id=request_id,
                    cancel=watch.event,
                )
            except QueryCancelledError as exc:
                raise watch.error(limit) from exc
        _note(request_id=request_id, fingerprint=release.metadata.fingerprint,
              release_id=release.metadata.release_id)
        if watch.caller_gone:
            # Charged and stored, but the caller had gone: a retry under the request id gets it.
            _note(caller_gone=watch.caller_gone)
        charged = "0" if charger.served_stored else release.metadata.loss
        return convert.release_to_pb(release, charged=charged)

    def GetBudget(self, request: pb.GetBudgetRequest, context: Any) -> pb.Budget:
        return self.s.accounts.budget(current_identity())

    def ListMyReleases(
        self, request: pb.ListMyReleasesRequest, context: Any
    ) -> pb.ListMyReleasesResponse:
        if request.limit < 0:
            raise MalformedRequestError("limit must not be negative")
        limit = min(request.limit or 100, self.s.max_list_releases)
        return pb.ListMyReleasesResponse(
            releases=self.s.accounts.received(current_identity(), limit=limit)
        )

    def GetRelease(self, request: pb.GetReleaseRequest, context: Any) -> pb.ReleaseResponse:
        release_id = convert.release_id(request.release_id)
        release = self.s.accounts.received_release(current_identity(), release_id)
        _note(release_id=release_id)
        return convert.release_to_pb(release)


def _refusals_audited(method: Callable[..., Any]) -> Callable[..., Any]:
    """An Admin method whose refusals (a conflict, a cap below what was spent, a bad client id)
    are appended to the audit log as well as returned to the administrator."""

    @functools.wraps(method)
    def audited(self: AdminServicer, request: Any, context: Any) -> Any:
        try:
            return method(self, request, context)
        except (VeilError, ServerError) as exc:
            if not isinstance(exc, LedgerUnavailableError):  # nothing could be written then
                try:
                    self.s.accounts.record_admin_refused(
                        method=method.__name__, reason=str(exc), by=current_identity()
                    )
                except Exception as failure:  # the refusal stands even if its audit fails
                    log.error(
                        "could not record a refused administrative call",
                        extra={"event": "audit_write_failed",
                               "error_type": type(failure).__name__},
                    )
            raise

    return audited


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, services: Services) -> None:
        self.s = services

    @_refusals_audited
    def RegisterClient(
        self, request: pb.RegisterClientRequest, context: Any
    ) -> pb.RegisterClientResponse:
        client = convert.client_id(request.client_id)
        role = convert.role_from_pb(request.role)
        institution = convert.institution(request.institution)
        cap = convert.amount(request.budget, "budget", allow_zero=True) if request.budget else None
        token = new_token()
        info = self.s.accounts.register(
            client, role=role, institution=institution, cap=cap, token=token,
            by=current_identity(),
        )
        return pb.RegisterClientResponse(client=info, token=token)

    @_refusals_audited
    def SetBudget(self, request: pb.SetBudgetRequest, context: Any) -> pb.SetBudgetResponse:
        client = convert.client_id(request.client_id)
        cap = convert.amount(request.budget, "budget", allow_zero=True)
        info = self.s.accounts.set_cap(client, cap, by=current_identity())
        return pb.SetBudgetResponse(client=info)

    @_refusals_audited
    def RevokeClient(
        self, request: pb.RevokeClientRequest, context: Any
    ) -> pb.RevokeClientResponse:
        client = convert.client_id(request.client_id)
        reason = convert.note(request.reason, "reason", limit=512)
        # Revoking a revoked client changes nothing, and the response says so: the
        # administrator is not told it was revoked now.
        return self.s.accounts.revoke(client, reason=reason, by=current_identity())

    def ListClients(self, request: pb.ListClientsRequest, context: Any) -> pb.ListClientsResponse:
        return pb.ListClientsResponse(clients=self.s.accounts.clients())

    @_refusals_audited
    def RotateToken(self, request: pb.RotateTokenRequest, context: Any) -> pb.RotateTokenResponse:
        client = convert.client_id(request.client_id)
        token = new_token()
        info = self.s.accounts.rotate(client, token=token, by=current_identity())
        return pb.RotateTokenResponse(token=token, expires_at=info.token_expires_at)


class AuditServicer(pb_grpc.AuditServicer):
    def __init__(self, services: Services) -> None:
        self.s = services

    def GetLedgerReport(
        self, request: pb.LedgerReportRequest, context: Any
    ) -> pb.LedgerReportResponse:
        return self.s.accounts.report()

    def ListReleases(
        self, request: pb.ListReleasesRequest, context: Any
    ) -> pb.ListReleasesResponse:
        client = convert.client_id(request.client_id) if request.client_id else None
        if request.limit < 0:
            raise MalformedRequestError("limit must not be negative")
        limit = min(request.limit or 100, self.s.max_list_releases)
        return pb.ListReleasesResponse(releases=self.s.accounts.releases(client, limit=limit))

    def VerifyAuditLog(
        self, request: pb.VerifyAuditLogRequest, context: Any
    ) -> pb.VerifyAuditLogResponse:
        return self.s.accounts.verify()

    def GetAuditTables(
        self, request: pb.GetAuditTablesRequest, context: Any
    ) -> pb.GetAuditTablesResponse:
        names = [convert.audit_table(name) for name in request.tables]
        return pb.GetAuditTablesResponse(tables=self.s.accounts.audit_tables(names))


# ---- registration: raw bytes in, checked messages to the servicers -----------------------------

_call_notes: Any = threading.local()


def _note(**fields: str) -> None:
    """Add fields (identifiers, never values) to this call's log line."""
    notes = getattr(_call_notes, "fields", None)
    if notes is not None:
        notes.update(fields)


def parse(data: bytes, message_class: type[protobuf_message.Message]) -> Any:
    """A request message from untrusted bytes, or MalformedRequestError saying why not."""
    name = message_class.DESCRIPTOR.full_name
    try:
        request = message_class.FromString(data)
    except protobuf_message.DecodeError:
        raise MalformedRequestError(
            f"the request is not a valid {name} message (malformed, truncated or too deeply nested)"
        ) from None
    known = message_class()
    known.CopyFrom(request)
    known.DiscardUnknownFields()
    if known.ByteSize() != request.ByteSize():
        raise MalformedRequestError(
            f"the request carries fields that {name} does not define; "
            "the client may be newer than this server"
        )
    return request


def _guarded(
    full_method: str,
    behavior: Callable[[Any, grpc.ServicerContext], Any],
    request_class: type[protobuf_message.Message],
    in_flight: InFlight,
) -> Callable[[bytes, grpc.ServicerContext], Any]:
    def handle(data: bytes, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        identity: Identity | None = identity_or_none()
        _call_notes.fields = {}
        code = grpc.StatusCode.OK
        try:
            with in_flight.call():
                try:
                    return behavior(parse(data, request_class), context)
                except Exception as exc:
                    code = status_code_for(exc)
                    abort(context, exc)
        finally:
            fields = dict(_call_notes.fields)
            _call_notes.fields = None
            log.info(
                "call",
                extra={
                    "event": "call",
                    "method": full_method,
                    "client": identity.client_id if identity else None,
                    "code": code.name,
                    "ms": round((time.perf_counter() - start) * 1000, 2),
                    **fields,
                },
            )

    return handle


def generic_handlers(services: Services) -> list[grpc.GenericRpcHandler]:  # type: ignore[type-arg]
    """One generic handler per service, with every method guarded as above."""
    servicers: list[tuple[ServiceDescriptor, Any]] = [
        (pb.DESCRIPTOR.services_by_name["Research"], ResearchServicer(services)),
        (pb.DESCRIPTOR.services_by_name["Admin"], AdminServicer(services)),
        (pb.DESCRIPTOR.services_by_name["Audit"], AuditServicer(services)),
    ]
    handlers = []
    for service, servicer in servicers:
        methods = {}
        for method in service.methods:
            request_class = _message_class(method.input_type.name)
            response_class = _message_class(method.output_type.name)
            methods[method.name] = grpc.unary_unary_rpc_method_handler(
                _guarded(
                    f"/{service.full_name}/{method.name}",
                    getattr(servicer, method.name),
                    request_class,
                    services.in_flight,
                ),
                request_deserializer=None,  # raw bytes: parsed and checked by `parse`
                response_serializer=response_class.SerializeToString,
            )
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return handlers


def _message_class(name: str) -> type[protobuf_message.Message]:
    cls = getattr(pb, name)
    assert isinstance(cls, type) and issubclass(cls, protobuf_message.Message)
    return cls


__all__ = [
    "AdminServicer",
    "AuditServicer",
    "CallWatch",
    "InFlight",
    "ResearchServicer",
    "Services",
    "generic_handlers",
    "parse",
]
