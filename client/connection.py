"""The connection to a veil server: channel, token, retries, and one method per call.

    import client
    veil_client = client.connect("veil.example.org:443", token="veil_...")   # TLS
    veil_client = client.connect("localhost:50051", token="veil_...")         # plaintext, loopback

The address defaults to $VEIL_SERVER (else localhost:50051) and the token to $VEIL_TOKEN.
`tls=None` uses TLS for every host but a loopback one (the server refuses plaintext elsewhere);
`tls=True` forces it, `tls=False` turns it off, and a path (or `TLS(...)`) names the CA
certificate that signed the server's certificate, plus a client certificate for mutual TLS.

Every release gets a fresh request id (a UUID) unless the caller gives one. A call that fails
with UNAVAILABLE (server restarting, a connection reset, a ledger that could not write) or that
was rate-limited is retried with bounded exponential backoff and the same request id, so the
server returns the release it stored instead of charging again. A TLS handshake the client
refuses (a server certificate it cannot verify, a server without TLS) is not retried.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import numbers
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc

from client import query as q
from client.codebook import Codebook, Deployment, Item, item_from_pb
from client.errors import (
    CA_CERT_ENV,
    TOKEN_ENV,
    AuthenticationError,
    ClientClosed,
    InvalidQuery,
    PermissionDenied,
    from_rpc_error,
    is_budget_error,
    is_handshake_failure,
    is_unknown_host,
    retry_after,
    status_of,
)
from client.results import Budget, DryRun, ReceivedRelease, Release, ReleaseList
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc

log = logging.getLogger("veil.client")

DEFAULT_ADDRESS = "localhost:50051"
ADDRESS_ENV = "VEIL_SERVER"
_MAX_MESSAGE = 256 * 1024 * 1024

T = TypeVar("T")
Amount = q.Amount


@dataclass(frozen=True)
class Retry:
    """How transient failures are retried: at most `attempts` tries in all, waiting
    `initial_backoff` seconds, then `multiplier` times longer each time up to `max_backoff`,
    each wait stretched by up to `jitter` (a fraction) at random."""

    attempts: int = 5
    initial_backoff: float = 0.25
    max_backoff: float = 8.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * (1 + self.jitter * random.random())


@dataclass(frozen=True)
class TLS:
    """TLS settings. `ca_cert`: the certificate (PEM path or bytes) that signed the server's,
    None for the system's roots. `client_cert` and `client_key`: for servers that require mutual
    TLS. `server_name`: the name to check in the server's certificate, when it differs from the
    address's host."""

    ca_cert: str | Path | bytes | None = None
    client_cert: str | Path | bytes | None = None
    client_key: str | Path | bytes | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca_cert, "CA certificate"),
            certificate_chain=_pem(self.client_cert, "client certificate"),
            private_key=_pem(self.client_key, "client key"),
        )


def _slow_down_hint(error: grpc.RpcError) -> float | None:
    """The seconds a server asks this client to wait before calling again (its rate limit, or
    the calls it has running: RESOURCE_EXHAUSTED with retry-after, not a budget), else None."""
    code, _, trailers = status_of(error)
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or is_budget_error(trailers):
        return None
    return retry_after(trailers)


def _pem(value: str | Path | bytes | None, what: str) -> bytes | None:
    """The PEM bytes of `value` (a path or the bytes themselves). A file that cannot be read
    raises the OSError it raised, worded to say which of the TLS files it is: Python's own
    "[Errno 2] No such file or directory: 'ca.pem'" names neither the option nor the role."""
    if value is None or isinstance(value, bytes):
        return value
    path = Path(value).expanduser()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise type(exc)(f"cannot read the {what} {value}: {exc.strerror or exc}") from None


def is_loopback(address: str) -> bool:
    """Whether `address` is this machine's (loopback or a Unix socket): the one place a token may
    travel without TLS."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = _target(address)
    # A DNS server of the caller's choosing, not this machine, says where "localhost" is; gRPC's
    # ipv4: and ipv6: targets may list several addresses: all of them must be this machine.
    return (target is not None and not target.authority
            and all(_is_loopback_host(one) for one in target.host_ports))


# The gRPC name resolvers whose targets name HOST:PORT addresses (dns:[//authority/]HOST:PORT,
# ipv4:ADDR:PORT[,ADDR:PORT...], ipv6:[ADDR]:PORT[,...]).
_ADDRESS_SCHEMES = ("dns", "ipv4", "ipv6")


class _Target(NamedTuple):
    """A gRPC target as veil reads it: the DNS server it names ("" for the system's), and the
    HOST:PORT addresses it names."""

    authority: str
    host_ports: list[str]


def _target(address: str) -> _Target | None:
    """`address` read as a gRPC target: itself a HOST:PORT, or a dns:, ipv4: or ipv6: target;
    None for a target of another resolver (xds:///NAME), which gRPC is left to read."""
    scheme, sep, rest = address.partition(":")
    if sep and scheme.lower() in _ADDRESS_SCHEMES:
        authority = ""
        if rest.startswith("//"):  # dns://AUTHORITY/HOST:PORT, dns:///HOST:PORT
            authority, _, rest = rest[2:].partition("/")
        return _Target(authority, rest.split(","))
    if sep and rest.startswith("//"):
        return None
    return _Target("", [address])


def _is_loopback_host(host_port: str) -> bool:
    with_port = host_port.count(":") == 1 or "]" in host_port
    host = (host_port.rsplit(":", 1)[0] if with_port else host_port).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_URL_SCHEMES = ("http", "https", "grpc", "grpcs")


def checked_address(address: str) -> str:
    """`address`, refused (ValueError) when gRPC would dial it otherwise than written: with no
    port (443), a port beyond 1 to 65535 (99999 wraps around), an IPv6 address without brackets
    (read whole as the host, or as a malformed name), or a URL (http://HOST:PORT, looked up as
    a host name)."""
    if not isinstance(address, str):
        raise TypeError(f"address must be text (HOST:PORT), got {type(address).__name__}")
    if address.startswith(("unix:", "unix-abstract:")):
        return address
    scheme, sep, rest = address.partition("://")
    if sep and scheme.lower() in _URL_SCHEMES:
        # gRPC reads "http://host:port" as a host name, and reports a failed DNS lookup of it
        # as a server that is unavailable, after retrying.
        raise ValueError(
            f"the server address {address} is a URL; give HOST:PORT ({rest.rstrip('/')}), "
            f"without {scheme}:// (TLS is used for every host but a loopback one)"
        )
    default_port = DEFAULT_ADDRESS.rsplit(":", 1)[1]
    target = _target(address)
    for host_port in [] if target is None else target.host_ports:
        if host_port.count(":") > 1 and not host_port.startswith("["):
            raise ValueError(
                f"the server address {address} is an IPv6 address without brackets; give "
                f"[ADDRESS]:PORT, such as [::1]:{default_port}"
            )
        if ":" not in host_port or (host_port.startswith("[") and "]:" not in host_port):
            # gRPC would dial its own default, 443, without a word.
            raise ValueError(
                f"the server address {address} has no port; give HOST:PORT (a veil server "
                f"listens on port {default_port} unless it is configured otherwise)"
            )
        port = host_port.rsplit(":", 1)[1]
        if port.isdigit() and not 1 <= int(port) <= 65535:
            raise ValueError(
                f"the server address {address} has port {port}; a port is a number from 1 to "
                f"65535"
            )
    return address


def _checked_timeout(timeout: Any) -> float:
    """A call's deadline in seconds: a positive, finite number (0, a negative or nan would fail
    every call at once, or never)."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout is a number of seconds, got {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


_CLOSED = (
    "this client is closed (close(), or the end of its with block), so {method} was not sent; "
    "connect again to make more calls"
)


def _call_timeout(timeout: Any) -> float | None:
    """A call's own timeout, checked as the client's is (None: the client's)."""
    return None if timeout is None else _checked_timeout(timeout)


def check_token(token: str) -> str:
    """`token` without surrounding whitespace, refused (AuthenticationError) unless it is
    printable ASCII: gRPC cannot send anything else in a header, and would fail the call with
    "Invalid metadata" after logging its own lines. Tokens the custodian issues are ASCII."""
    token = token.strip()
    if not (token.isascii() and token.isprintable()):
        # The token itself is not shown: a pasted secret should not reach a terminal or a log.
        odd = next(c for c in token if not (c.isascii() and c.isprintable()))
        raise AuthenticationError(
            f"the token holds a character a token cannot ({odd!a}); tokens are printable "
            f"ASCII (veil_...): copy it again from what the custodian "
            f"issued"
        )
    return token


def connect(
    address: str | None = None,
    *,
    token: str | None = None,
    tls: bool | str | Path | TLS | None = None,
    timeout: float = 120.0,
    retry: Retry | None = None,
) -> Client:
    """A client of the veil server at `address` (default $VEIL_SERVER, else localhost:50051),
    authenticated by `token` (default $VEIL_TOKEN). No call is made until one is needed."""
    return Client(address, token=token, tls=tls, timeout=timeout, retry=retry)


class Client:
    """A researcher's connection to veil. Build queries from it (`count()`, `flag_counts()`,
    `sum()`, `mean()`, `proportion()`, `sql()`), then `release` or `dry_run` them."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls: bool | str | Path | TLS | None = None,
        timeout: float = 120.0,
        retry: Retry | None = None,
    ) -> None:
        self.address = checked_address(address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS)
        self.timeout = _checked_timeout(timeout)
        if token is not None and not isinstance(token, str):
            raise TypeError(
                f"token must be text (the token the custodian issued), got {type(token).__name__}"
            )
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            raise AuthenticationError(
                f"no token: pass token=... or set {TOKEN_ENV} to the token the custodian issued"
            )
        self._token = check_token(token)
        if tls is None and os.environ.get(CA_CERT_ENV):
            tls = TLS(ca_cert=os.environ[CA_CERT_ENV])
        if tls is None:
            tls = not is_loopback(self.address)
        if isinstance(tls, (str, Path)):
            tls = TLS(ca_cert=tls)
        elif tls is True:
            tls = TLS()
        self.tls: TLS | None = tls if isinstance(tls, TLS) else None
        self.retry = retry or Retry()
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.primary_user_agent", "veil-client-python/0.1"),
            ("grpc.enable_retries", 0),  # retries are this client's, with one request id
        ]
        if self.tls is not None:
            if self.tls.server_name:
                options.append(("grpc.ssl_target_name_override", self.tls.server_name))
            self._channel = grpc.secure_channel(self.address, self.tls.credentials(), options)
        else:
            self._channel = grpc.insecure_channel(self.address, options)
        self._stub = pb_grpc.ResearchStub(self._channel)
        self._codebook: Codebook | None = None
        self.on_retry: Callable[[str, int, float, str], None] | None = None
        # The request id of the last Release call made (from its first try on): a caller
        # interrupted during or after it can name the id that fetches that release again, free.
        self.last_request_id: str | None = None
        self._closed = False
        # Whether a call on this channel has been answered: its security is then not in doubt,
        # and a lost connection needs no hint about TLS.
        self._answered = False

    # -- lifecycle --
    def close(self) -> None:
        """Close the connection; a later call raises ClientClosed. Closing again does nothing."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        security = "TLS" if self.tls is not None else "plaintext"
        return f"<veil Client {self.address} ({security})>"

    # -- calls --
    def _call(
        self,
        method: str,
        request: Any,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        stub: Any = None,
        tries: list[int] | None = None,
    ) -> Any:
        """One unary call, retried on transient failures; errors become VeilError. `stub` is
        another service's stub on this channel (default: Research); `tries`, when given, gets
        the number of each try appended as it is made."""
        if self._closed:
            raise ClientClosed(_CLOSED.format(method=method), request_id=request_id)
        stub_method = getattr(stub if stub is not None else self._stub, method)
        metadata = (("authorization", f"Bearer {self._token}"),)
        attempt = failures = 0
        # The call's timeout bounds it whole: its tries, and the waits between them.
        seconds = self.timeout if timeout is None else _checked_timeout(timeout)
        deadline = time.monotonic() + seconds
        while True:
            attempt += 1
            if tries is not None:
                tries.append(attempt)
            try:
                left = max(0.001, deadline - time.monotonic())
                response = stub_method(request, metadata=metadata, timeout=left)
                self._answered = True
                return response
            except ValueError as exc:
                # gRPC's own refusal of a channel closed (by another thread) since the check.
                if "closed channel" not in str(exc):
                    raise
                raise ClientClosed(
                    _CLOSED.format(method=method), request_id=request_id
                ) from None
            except grpc.RpcError as exc:
                # A refusal to slow down is not a failure: it leaves a failure's tries alone.
                slowed = _slow_down_hint(exc) is not None
                failures += not slowed
                wait = self._transient(
                    exc, attempt if slowed else failures, patience=deadline - time.monotonic()
                )
                if wait is None:
                    raise from_rpc_error(
                        exc, address=self.address, tls=self.tls is not None,
                        request_id=request_id,
                        client_certificate=self.tls is not None
                        and self.tls.client_cert is not None,
                        answered=self._answered,
                    ) from None
                code, details, _ = status_of(exc)
                # A caller that reports retries itself (the CLI) gets one line each, not two.
                log.log(
                    logging.DEBUG if self.on_retry is not None else logging.WARNING,
                    "%s: %s (%s); retrying in %.2f s (attempt %d)%s",
                    method, code.name, details, wait, attempt + 1,
                    f" with request id {request_id}" if request_id else "",
                )
                if self.on_retry is not None:
                    self.on_retry(method, attempt + 1, wait, f"{code.name}: {details}")
                time.sleep(wait)

    def _transient(
        self, error: grpc.RpcError, attempt: int, *, patience: float = 0.0
    ) -> float | None:
        """Seconds to wait before retrying, or None when the failure is not transient.

        A failure is retried while tries remain (`Retry.attempts`). A server's request to slow
        down (its rate, or the calls this client has running, with a time to retry after) is
        not a failure: it is waited out, backing off, for as long as `patience` (the seconds the
        call may still take) allows, unless retries are off (`attempts` 1).
        """
        code, details, trailers = status_of(error)
        if (hint := _slow_down_hint(error)) is not None:
            if self.retry.attempts <= 1 or hint > self.retry.max_backoff * 4:
                return None
            # At least the server's hint, backing off with jitter: threads of one client refused
            # together would otherwise all come back together and be refused again.
            wait = max(hint, self.retry.delay(attempt))
            return wait if wait < patience else None
        if attempt >= self.retry.attempts:
            return None
        if code == grpc.StatusCode.UNAVAILABLE:
            # A handshake this client refused (unknown CA, wrong host, no TLS on the server), or a
            # host name that does not exist, fails the same way every time; a server that is
            # down or restarting is retried.
            if is_handshake_failure(details) or is_unknown_host(details):
                return None
            return self.retry.delay(attempt)
        if code == grpc.StatusCode.INTERNAL and any(
            s in details for s in ("RST_STREAM", "Connection reset", "Stream removed")
        ):
            return self.retry.delay(attempt)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not is_budget_error(trailers):
            return self.retry.delay(attempt)  # gRPC's own cap on calls, which gives no hint
        return None

    # -- the codebook --
    def codebook(self, *, refresh: bool = False) -> Codebook:
        """The codebook and this deployment's settings (fetched once, then cached)."""
        if self._codebook is None or refresh:
            self._codebook = Codebook.from_pb(self._call("GetCodebook", pb.GetCodebookRequest()))
        return self._codebook

    @property
    def deployment(self) -> Deployment:
        return self.codebook().deployment

    def variable(self, name: str) -> Item:
        """One variable, flag set or derived dimension, as the server describes it. The name
        matches regardless of case, as in queries; an unknown one raises InvalidQuery naming the
        closest."""
        book = self.codebook()
        item = book.find(name)
        request = pb.DescribeVariableRequest(name=name if item is None else item.name)
        try:
            response = self._call("DescribeVariable", request)
        except InvalidQuery as exc:  # the server refuses unknown names; say which are close
            close = book.suggest(name) if item is None else []
            if not close:
                raise
            raise InvalidQuery(
                f"{exc.message}; did you mean {', '.join(close)}?",
                variable=exc.variable, code=exc.code, request_id=exc.request_id,
            ) from None
        return item_from_pb(response)

    # -- building queries --
    def count(self) -> q.Query:
        """Records in each cell."""
        return q.Query(q.Count(), client=self)

    def flag_counts(self, flag_set: str) -> q.Query:
        """Records with each flag of `flag_set` (one release for every flag of the set)."""
        return q.Query(q.FlagCounts(flag_set), client=self)

    def sum(self, variable: str) -> q.Query:
        """Sum of an integer variable, clamped to its codebook range."""
        return q.Query(q.Sum(variable), client=self)

    def mean(self, variable: str) -> q.Query:
        """Mean of an integer variable over the records where it is present."""
        return q.Query(q.Mean(variable), client=self)

    def proportion(self, *conditions: q.Filter, **equals: Any) -> q.Query:
        """Share of each cell's records satisfying the condition:
        `proportion(isSexualExploit=1)`, `proportion(In("ageBroad", [...]))`.

        The share is of all the cell's records, as SQL's AVG(CASE WHEN c THEN 1 ELSE 0 END) is:
        those whose condition variable is missing included. For the share among the records
        that have it, add `.where(Present("isSexualExploit"))`."""
        return q.proportion(*conditions, **equals).bind(self)

    def sql(
        self,
        text: str,
        *,
        epsilon: Amount | None = None,
        rho: Amount | None = None,
        loss: Amount | None = None,
        half_width: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The query a SQL SELECT (in veil's subset) describes; released at once when a privacy
        loss or a half-width is given, otherwise returned for `.release()` or `.dry_run()`.
        SQL outside the subset raises UnsupportedSQL, which lists what is supported."""
        from client.sql import parse_sql

        query = parse_sql(text).bind(self)
        if epsilon is None and rho is None and loss is None and half_width is None:
            return query
        return self.release(
            query, epsilon=epsilon, rho=rho, loss=loss, half_width=half_width,
            request_id=request_id, timeout=timeout,
        )

    # -- pricing and releasing --
    def _prepare(self, query: q.Query) -> q.Query:
        if not isinstance(query, q.Query):
            raise TypeError(f"expected a veil query, got {type(query).__name__}")
        return query.normalized(self.codebook()).bind(self)

    def _loss_text(
        self, epsilon: Amount | None, rho: Amount | None, loss: Amount | None
    ) -> str | None:
        given = {k: v for k, v in (("epsilon", epsilon), ("rho", rho), ("loss", loss))
                 if v is not None}
        if len(given) > 1:
            raise TypeError(f"give one privacy loss, not {' and '.join(given)}")
        if not given:
            return None
        (name, value), = given.items()
        deployment = self.deployment
        if name != "loss" and name != deployment.loss_name:
            accounts = (f"this server accounts privacy loss as {deployment.loss_name} "
                        f"({deployment.accounting})")
            raise InvalidQuery(
                f"{accounts}; pass {deployment.loss_name}=... instead of {name}=",
                shell_message=f"{accounts}; pass --{deployment.loss_name} instead of --{name}",
            )
        return decimal_text(value, name)

    def dry_run(
        self,
        query: q.Query,
        *,
        epsilon: Amount | None = None,
        rho: Amount | None = None,
        loss: Amount | None = None,
        half_width: int | None = None,
        assumed_count: int | None = None,
        timeout: float | None = None,
    ) -> DryRun:
        """What releasing `query` would cost (for a half-width) or how accurate it would be (for
        a loss), the suppression threshold, and whether it is already released. Charges nothing.

        It also reads the caller's budget, so that the dry run says whether the cost fits in what
        remains (`fits_budget`, `remaining_after`, `limiting_scope`); an already released query
        costs nothing. `already_released` speaks of the data version served only: when the
        caller received this query on another data version (last year's table), the dry run
        prices a fresh draw and names that release in `earlier_release` (its data version,
        release id and loss), which `get_release` fetches again, free.
        """
        timeout = _call_timeout(timeout)
        if assumed_count is not None:
            assumed_count = _integer_argument(
                assumed_count, "assumed_count", "the true count assumed for a cell, in records",
                0, _INT64_MAX,
            )
        query = self._prepare(query)
        text = self._loss_text(epsilon, rho, loss)
        if (text is None) == (half_width is None):
            raise TypeError(
                f"give a privacy loss ({self.deployment.loss_name}=...) or a target half_width=..."
            )
        request = pb.DryRunRequest(query=query.to_pb())
        if text is not None:
            request.loss = text
        else:
            request.half_width = _half_width(half_width)
        if assumed_count is not None:
            request.assumed_count = assumed_count
        response = self._call("DryRun", request, timeout=timeout)
        try:
            budget: Budget | None = self.budget()
        except PermissionDenied:  # a role without a budget (an administrator) may still price
            budget = None
        return DryRun.from_pb(response, query, budget)

    def release(
        self,
        query: q.Query,
        *,
        epsilon: Amount | None = None,
        rho: Amount | None = None,
        loss: Amount | None = None,
        half_width: int | None = None,
        max_loss: Amount | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Release:
        """Release `query`, charged `epsilon`/`rho`/`loss`, or the least loss whose count
        intervals are at most `half_width` on each side, refused (nothing charged) when that
        loss is more than `max_loss`. A query released before (by anyone, at a loss at least
        this one) comes back free, with the same noise.

        `request_id` (default: a fresh UUID) identifies this release: retrying with it never
        charges twice. Transient failures are retried with it automatically. `timeout`: the
        seconds the call may take, its retries included (a positive number; default the
        client's).
        """
        timeout = _call_timeout(timeout)
        if request_id is not None:
            request_id = _text_argument(request_id, "request_id", "the id of an earlier request")
        query = self._prepare(query)
        text = self._loss_text(epsilon, rho, loss)
        if (text is None) == (half_width is None):
            raise TypeError(
                f"give a privacy loss ({self.deployment.loss_name}=...) or a target half_width=..."
            )
        fresh_id = request_id is None
        request_id = request_id or str(uuid.uuid4())
        if max_loss is not None and half_width is None:
            raise TypeError("max_loss bounds the loss a half_width costs; give half_width too")
        if text is None:
            request = pb.DryRunRequest(query=query.to_pb(), half_width=_half_width(half_width))
            priced = self._call("DryRun", request, timeout=timeout)
            text = priced.loss
            ceiling = None if max_loss is None else decimal_text(max_loss, "max_loss")
            # A query released before comes back free, whatever loss it was made at.
            if (
                ceiling is not None
                and not priced.already_released
                and Decimal(text) > Decimal(ceiling)
            ):
                name = self.deployment.loss_name
                raise InvalidQuery(
                    f"count intervals of +/- {half_width} would cost {name} {text}, more than "
                    f"max_loss {ceiling}; nothing was charged (ask a wider half_width, or a "
                    f"larger max_loss)"
                )
        tries: list[int] = []
        self.last_request_id = request_id
        response = self._call(
            "Release",
            pb.ReleaseRequest(request_id=request_id, query=query.to_pb(), loss=text),
            timeout=timeout,
            request_id=request_id,
            tries=tries,
        )
        release = Release.from_pb(response, query=query, request_id=request_id)
        release._answer = (release.charged, tries[-1])
        if not fresh_id or tries[-1] > 1:
            # The server says what this call cost; an earlier try under the same request id may
            # have paid for the release it returned, so nothing is claimed about the request.
            release.charged = None
        return release

    # -- the caller's account --
    def budget(self) -> Budget:
        """The caller's budget: cap, spent, reserved (held by releases in progress), remaining
        (and institution, dataset)."""
        return Budget.from_pb(self._call("GetBudget", pb.GetBudgetRequest()))

    def releases(self, limit: int = 100) -> ReleaseList:
        """The last `limit` releases the caller received, oldest first."""
        limit = _integer_argument(
            limit, "limit", "how many of the most recent releases to list (0: the server's "
            "default; a server lists at most its max_list_releases, 1000 by default)",
            0, _INT32_MAX,
        )
        response = self._call("ListMyReleases", pb.ListMyReleasesRequest(limit=limit))
        return ReleaseList(ReceivedRelease.from_pb(m, self) for m in response.releases)

    def get_release(self, release_id: str, *, by: str | Sequence[str] | None = None) -> Release:
        """A release the caller received before, free: its cells and metadata as the server
        stored them, its query rebuilt from the server's canonical form.

        Its dimensions come in the canonical (alphabetical) order unless `by` names the order
        wanted (`by=["ageBroad", "gender"]`, as `Release.arrange` takes it: names in any case,
        those left out after those named): the order a query named them in is not part of its
        identity, and is kept neither by the server nor in the caller's list of releases. A
        name the release is not grouped by raises InvalidQuery (nothing is charged either way).

        Its `request_id` and `charged` are None, since the server does not send them with it;
        `releases()` lists each release with the request id that received it
        (`ReceivedRelease.fetch()` carries it) and what it cost."""
        release_id = _text_argument(release_id, "release_id", "a release's id, such as rel_...")
        if by is not None and not isinstance(by, (str, Sequence)):
            raise TypeError(f"by is the dimensions' order (a list of names), got "
                            f"{type(by).__name__}")
        response = self._call("GetRelease", pb.GetReleaseRequest(release_id=release_id))
        # The query as a fresh release names it, rebuilt from the server's canonical form.
        query = q.query_of_canonical(response.metadata.canonical_query)
        release = Release.from_pb(response, query=query)
        return release if by is None else release.arrange(by)


# The wire's integers (protos/veil/v1/veil.proto): a larger value fails in protobuf, unexplained.
_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1


def _half_width(value: int | None) -> int:
    # numbers.Integral: numpy's integers too, which are not Python ints.
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 1 <= int(value) <= _INT64_MAX
    ):
        raise InvalidQuery(
            f"half_width is how far count intervals may reach either side, in records: a "
            f"positive integer (at most {_INT64_MAX}), got {value!r} (a share's or mean's own "
            f"accuracy for a given loss is the dry run's value_half_width)"
        )
    return int(value)


def _integer_argument(value: Any, name: str, meaning: str, low: int, high: int) -> int:
    """An integer argument the wire carries, refused (InvalidQuery) outside low..high or when it
    is not an integer, with what it means and the range it may take."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
        low <= int(value) <= high
    ):
        raise InvalidQuery(
            f"{name} is {meaning}: an integer from {low} to {high}, got {value!r}"
        )
    return int(value)


def _text_argument(value: Any, name: str, meaning: str) -> str:
    """A text argument: TypeError when it is not text, InvalidQuery when it is blank (an empty
    id is no id, and must not quietly become another one)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} is {meaning} (text), got {type(value).__name__} {value!r}")
    if not value.strip():
        raise InvalidQuery(f"{name} is empty: give {meaning}, or leave it out")
    return value


# The wire's form of an amount (server/convert.py): plain decimal text, at most 15 digits on each
# side of the point, no sign or exponent.
_WIRE_DIGITS = 15


def decimal_text(value: Any, name: str = "loss", *, allow_zero: bool = False) -> str:
    """A privacy loss as exact decimal text, as the wire carries it: 0.1 stays "0.1".

    `allow_zero` admits 0, which a cap may be (a client that never queries) and a loss may not.

    An int, a float (read as the shortest decimal that prints it, so 0.1 is 1/10), a Decimal, a
    Fraction with a terminating decimal, or text. Exponent notation ("1e-3", 1e-3) is read as the
    number it writes and sent in the plain form the server takes ("0.001"). A value that needs
    more than 15 digits on either side of the point is refused here, with what to pass instead:
    it is almost always float arithmetic (0.1 + 0.2 is 0.30000000000000004), and charging a
    rounded amount would charge something nobody asked for.
    """
    if isinstance(value, bool):
        raise InvalidQuery(f"{name} must be a number, not {value!r}")
    if isinstance(value, str):
        instead = f"write it with at most {_WIRE_DIGITS} decimal places, such as '0.3'"
    else:
        instead = f"pass the {name} as decimal text such as '0.3' or a Fraction"
    try:
        # numbers.Integral and numbers.Real admit numpy's scalars too (whose repr is
        # "np.float64(0.5)", not a number): the value is read through int() or float().
        if isinstance(value, numbers.Integral):
            decimal = Decimal(int(value))
        elif isinstance(value, numbers.Real) and not isinstance(value, Fraction):
            decimal = Decimal(repr(float(value)))
        elif isinstance(value, Decimal):
            decimal = value
        elif isinstance(value, Fraction):
            decimal = Decimal(value.numerator) / Decimal(value.denominator)
            if Fraction(decimal) != value:
                raise InvalidQuery(
                    f"{name} {value} is not a decimal of at most {_WIRE_DIGITS} places; "
                    f"pass the {name} as decimal text such as '0.3'"
                )
        elif isinstance(value, str):
            decimal = Decimal(value.strip())
        else:
            raise InvalidQuery(f"{name} must be a number, got {type(value).__name__}; {instead}")
    except InvalidOperation:
        raise InvalidQuery(f"{name} must be a decimal number such as 0.5, got {value!r}") from None
    if decimal.is_finite() and decimal == 0 and allow_zero:
        return "0"
    if not decimal.is_finite() or decimal <= 0:
        raise InvalidQuery(f"{name} must be a positive, finite number, got {value!r}")
    if decimal.adjusted() >= _WIRE_DIGITS:
        raise InvalidQuery(
            f"{name} {value!r} is too large: the server takes at most {_WIRE_DIGITS} digits "
            "before the decimal point"
        )
    # Counted before formatting: "1e-999999" would otherwise be written out digit by digit.
    shape = decimal.as_tuple()
    digits, exponent = list(shape.digits), shape.exponent
    assert isinstance(exponent, int)  # finite, checked above
    while exponent < 0 and len(digits) > 1 and digits[-1] == 0:  # "0.50" has one place
        digits.pop()
        exponent += 1
    places = max(0, -exponent)
    if places > _WIRE_DIGITS:
        cause = (
            " (float arithmetic such as 0.1 + 0.2 gives such values)"
            if isinstance(value, float) and len(digits) > _WIRE_DIGITS else ""
        )
        raise InvalidQuery(
            f"{name} {value!r} has {places} decimal places and the server takes at most "
            f"{_WIRE_DIGITS}{cause}; {instead}"
        )
    text = format(decimal, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


__all__ = [
    "DEFAULT_ADDRESS",
    "TLS",
    "Client",
    "Retry",
    "check_token",
    "connect",
    "decimal_text",
]
