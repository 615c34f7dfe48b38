"""The three veil services. Thin: check and convert the request, call the engine or the ledger,
convert back.

`generic_handlers` registers them with gRPC. Requests arrive as raw bytes and are parsed here, so
that bytes which are not a valid message, or a message carrying fields this server does not know,
get INVALID_ARGUMENT with a plain reason (gRPC's own parser would answer INTERNAL). Every error is
turned into a status by the one table in `server.errors`; every call is logged as one JSON line
with no data value in it. A call's lifecycle (its watch, its limits, the calls in flight) is
`server.calls`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf.descriptor import ServiceDescriptor

from engine.engine import Engine
from engine.errors import LedgerUnavailableError, QueryCancelledError, VeilError
from engine.loss import PrivacyLoss, parse_amount
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc
from server import convert
from server.accounts import Accounts
from server.auth import Identity, current_identity, identity_or_none, new_token
from server.calls import InFlight, WatchedCharger
from server.errors import (
    MalformedRequestError,
    ServerError,
    abort,
    status_code_for,
)

log = logging.getLogger("veil.server")


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
        stored = self.s.accounts.stored_release(dry.fingerprint, dry.loss.amount)
        if stored is not None:
            # The stored release is what a release would return: price its loss and accuracy,
            # not those of a fresh draw at the loss asked for, and state its empty cells as it
            # was made (a release made before they were recorded states none).
            stored_loss = parse_amount(stored.loss)
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
        # A release belongs to its data version, so one the caller received on another is
        # priced afresh above; it is named so that last year's table can still be found. A
        # servicer called directly, with no authenticated caller, has no releases to name.
        caller = identity_or_none()
        earlier = (
            None if caller is None else self.s.accounts.earlier_release(caller, dry.fingerprint)
        )
        return convert.dry_run_to_pb(
            dry, already_released=stored is not None, earlier_release=earlier
        )

    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        engine = self.s.engine
        identity = current_identity()
        request_id = convert.request_id(request.request_id)
        query = convert.query_from_pb(request.query, engine.settings)
        loss = convert.loss(request.loss, engine.settings)
        limit = self.s.max_query_seconds
        with self.s.in_flight.watch(context, limit=limit) as watch:
            charger = WatchedCharger(self.s.accounts.charger, watch)
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
            log.log(
                # A ledger that fails verification needs the custodian, as no refusal does.
                logging.ERROR if code == grpc.StatusCode.DATA_LOSS else logging.INFO,
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
    "ResearchServicer",
    "Services",
    "generic_handlers",
    "parse",
]
