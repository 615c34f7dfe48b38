"""The attacker's side of the wire: a live veil server reached over gRPC with the generated stubs.

Queries are written as the engine's typed `Query` (so the same query can be asked of the truth
oracle in `audit.truth`) and sent as their protobuf form. Nothing here imports the server.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

import grpc
import pyarrow as pa

from client.connection import TLS, checked_address, is_loopback
from client.errors import is_budget_error, retry_after, status_of
from engine.loss import parse_amount
from engine.query import Query
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc
from server.convert import query_to_pb

Key = tuple[Any, ...]
_T = TypeVar("_T")

# How long to wait for the server's rate limit, at most, before giving up on one call.
_RATE_WAIT_SECONDS = 30.0
# The wait `call` takes when the server refuses for its rate without saying how long to wait.
_DEFAULT_RATE_WAIT = 0.05


# ---- answers and refusals ------------------------------------------------------------------------


class Refused(Exception):
    """The server refused a call; `budget` is True when a budget would have been exceeded."""

    def __init__(self, code: grpc.StatusCode, message: str, *, budget: bool = False) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.budget = budget


@dataclass(frozen=True)
class Answer:
    """A release as the attacker sees it: cell values (None when suppressed) by key.

    `loss` is the loss the release was made at, which is what the attacker holds; `charged` is
    what this call cost the caller, as the server reports it: the loss when the release was made
    for this call, "0" when a stored release was returned (a replay or a retry), empty when the
    server did not say."""

    release_id: str
    loss: str
    tau: int
    cells: Mapping[Key, int | float | None]
    keys: tuple[str, ...]
    charged: str = ""

    @property
    def charge(self) -> Fraction:
        """What this call cost the caller. A server that does not report it is taken to have
        charged the full loss: a tally that may overstate, never understate, the spending."""
        return parse_amount(self.charged or self.loss)

    @property
    def replayed(self) -> bool:
        """A stored release returned free, though it was made at a loss."""
        return self.charge == 0 and parse_amount(self.loss) > 0

    def value(self, key: Key) -> int | float | None:
        return self.cells.get(key)

    def published(self, key: Key) -> bool:
        return self.cells.get(key) is not None


def answer_from_pb(response: pb.ReleaseResponse, by: tuple[str, ...]) -> Answer:
    table = pa.ipc.open_stream(pa.py_buffer(response.arrow_ipc)).read_all()
    columns = {name: table.column(name).to_pylist() for name in by}
    values = table.column("value").to_pylist()
    suppressed = table.column("suppressed").to_pylist()
    cells: dict[Key, int | float | None] = {}
    for row in range(table.num_rows):
        key = tuple(columns[name][row] for name in by)
        cells[key] = None if suppressed[row] else values[row]
    meta = response.metadata
    return Answer(meta.release_id, meta.loss, int(meta.tau), cells, by, response.charged)


def _slow_down(error: grpc.RpcError, default: float | None) -> float | None:
    """The seconds to wait before calling again when the server refused `error`'s call for its
    rate limit or its cap of calls running (RESOURCE_EXHAUSTED, not a budget): its retry-after,
    else `default`. None when the refusal was for anything else."""
    code, _, trailers = status_of(error)
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or is_budget_error(trailers):
        return None
    wait = retry_after(trailers)
    return default if wait is None else wait


def _waiting_out_rate_limits(attempt: Callable[[], _T], *, default: float | None) -> _T:
    """`attempt()`, tried again after the wait the server asks for while it refuses the call for
    its rate (see `_slow_down`; `default` is the wait when it names none, None not to wait then),
    as long as the wait ends within _RATE_WAIT_SECONDS of the first try. Any other refusal, or
    one whose wait would end later, is raised as the call raised it."""
    deadline = time.monotonic() + _RATE_WAIT_SECONDS
    while True:
        try:
            return attempt()
        except grpc.RpcError as exc:
            wait = _slow_down(exc, default)
            if wait is None or time.monotonic() + wait >= deadline:
                raise
            time.sleep(wait)  # the rate limit, not the request, refused it


# ---- the connection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """The outcome of one raw call: its status, message and duration."""

    code: grpc.StatusCode
    message: str
    seconds: float


def uses_tls(address: str, tls: TLS | None) -> bool:
    """Whether a `Target` of `address` with `tls` calls over TLS: always but to a loopback
    address with no TLS files named."""
    return tls is not None or not is_loopback(address)


class Target:
    """A live veil server, as one client (its bearer token) sees it. An address gRPC would dial
    otherwise than written (no port, a URL) raises ValueError, as the client's does; reading a
    TLS file it is given (`tls`) can raise OSError."""

    def __init__(
        self,
        address: str,
        token: str,
        *,
        tls: TLS | None = None,
        timeout: float = 60.0,
        max_receive: int = 256 << 20,
    ) -> None:
        address = checked_address(address)
        options = [("grpc.max_receive_message_length", max_receive)]
        if uses_tls(address, tls):
            # As the researcher's client does: the token leaves this machine only over TLS (the
            # system's CAs unless one is named), whatever the server would accept.
            credentials = (tls or TLS()).credentials()
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.address = address
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout
        self.research = pb_grpc.ResearchStub(self.channel)
        self.audit = pb_grpc.AuditStub(self.channel)
        self._codebook: pb.GetCodebookResponse | None = None
        self._ids = itertools.count()
        self._prefix = f"atk-{uuid.uuid4().hex[:10]}"
        # The server's own account of what each release cost (releases run from many threads).
        self._tally_lock = threading.Lock()
        self._charged = Fraction(0)
        self._replays = 0

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    @property
    def charged(self) -> Fraction:
        """The sum of what the server charged for every release made through `release`, as each
        response states it (`ReleaseResponse.charged`): what the ledger booked for them."""
        with self._tally_lock:
            return self._charged

    @property
    def replays(self) -> int:
        """How many releases made through `release` were stored releases returned free."""
        with self._tally_lock:
            return self._replays

    # -- calls --

    def call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        """One call, waiting out the server's rate limit and concurrency cap (the wait it names,
        or _DEFAULT_RATE_WAIT when it names none); raises Refused for any other refusal."""
        try:
            return _waiting_out_rate_limits(
                lambda: method(request, metadata=self.metadata, timeout=timeout or self.timeout),
                default=_DEFAULT_RATE_WAIT,
            )
        except grpc.RpcError as exc:
            code, _, trailers = status_of(exc)
            raise Refused(code, exc.details() or "", budget=is_budget_error(trailers)) from None

    def codebook(self) -> pb.GetCodebookResponse:
        if self._codebook is None:
            self._codebook = self.call(self.research.GetCodebook, pb.GetCodebookRequest())
        return self._codebook

    def budget(self) -> pb.Budget:
        return self.call(self.research.GetBudget, pb.GetBudgetRequest())  # type: ignore[no-any-return]

    def release(self, query: Query, *, loss: str, request_id: str | None = None) -> Answer:
        """Release `query` at `loss`; raises Refused when the server says no."""
        request = pb.ReleaseRequest(
            request_id=request_id or self.request_id(), query=query_to_pb(query), loss=loss
        )
        response = self.call(self.research.Release, request)
        answer = answer_from_pb(response, query.by)
        with self._tally_lock:
            self._charged += answer.charge
            self._replays += answer.replayed
        return answer

    def already_released(self, query: Query, *, loss: str) -> bool:
        """Whether a release of `query` at `loss` exists, so asking it again is free (a dry run,
        which charges nothing)."""
        request = pb.DryRunRequest(query=query_to_pb(query), loss=loss)
        return bool(self.call(self.research.DryRun, request).already_released)

    def raw(self, method: str, payload: bytes, *, timeout: float | None = None) -> Call:
        """Send raw request bytes to `/veil.v1.<Service>/<Method>`; never raises for a status.

        A refusal for the server's rate is waited out only when the server names the wait, and
        `seconds` is the duration of the last try alone."""
        call = self.channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        seconds = 0.0

        def attempt() -> Call:
            nonlocal seconds
            start = time.perf_counter()
            try:
                call(payload, metadata=self.metadata, timeout=timeout or self.timeout)
            except grpc.RpcError:
                seconds = time.perf_counter() - start
                raise
            return Call(grpc.StatusCode.OK, "", time.perf_counter() - start)

        try:
            return _waiting_out_rate_limits(attempt, default=None)
        except grpc.RpcError as exc:
            return Call(exc.code(), exc.details() or "", seconds)

    def healthy(self) -> bool:
        """The standard health check says SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
