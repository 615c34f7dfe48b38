"""Build, start and stop veil's gRPC server: services, limits, health, reflection, TLS, signals.

    running = start(config)          # listening; running.port is the bound port
    running.stop()                   # drain calls in flight, then close the ledger and the data
    serve(config)                    # start, then block until SIGTERM or SIGINT, then stop

Stopping drains: the health status turns NOT_SERVING, new calls are refused, calls in flight get
`grace_seconds` to finish, queries still running after that are interrupted (their reservations
are released, nothing is charged), and the ledger is closed only once no call is running.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.backend import DuckDBBackend
from engine.codebook import load_codebook
from engine.engine import Engine
from engine.errors import VeilError
from protos.veil.v1 import veil_pb2 as pb
from server.accounts import Accounts, HeadFile, LedgerAccounts
from server.auth import AuthInterceptor
from server.config import ServerConfig
from server.servicer import Services, generic_handlers

log = logging.getLogger("veil.server")

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
# Bytes of a release per cell, at most (keys, value, interval, flag): used to check at start
# that the largest release a query may ask for fits in one response.
_BYTES_PER_CELL = 256
# How long a stopping server keeps its port for answers already made once every call is done.
_SEND_SECONDS = 2.0


# ---- logging -----------------------------------------------------------------------------------

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        return json.dumps(entry, default=str, separators=(",", ":"))


class PrivateLogFile(logging.handlers.WatchedFileHandler):
    """A log file that only its owner can read, reopened when it is moved or removed.

    The log names clients, their institutions' peers and what they asked, so a file it creates
    (at start, or after logrotate moved the old one away) is mode 0600, as the ledger is. A file
    that already exists keeps the mode the custodian gave it.
    """

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def configure_logging(level: str = "info", file: Path | None = None,
                      stream: TextIO | None = None) -> logging.Handler:
    """Send veil's server log to `file` (or `stream`, default standard error) as JSON lines."""
    handler: logging.Handler
    if file is not None:
        if file.parent.exists() and not file.parent.is_dir():
            raise OSError(f"log.file: {file.parent} is a file, not a directory")
        try:
            file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            handler = PrivateLogFile(file, encoding="utf-8")
        except OSError as exc:
            raise OSError(f"log.file: cannot write {file}: {exc.strerror}") from None
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    for name in ("veil", "grpc"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(level.upper() if name == "veil" else "WARNING")
    return handler


# ---- health ------------------------------------------------------------------------------------


class _Health(health.HealthServicer):
    """Check and List only: Watch would hold a slot of the concurrency cap for as long as any
    unauthenticated caller keeps it open."""

    def Watch(self, request: Any, context: Any, send_response_callback: Any = None) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "use Check; Watch is not offered")


# ---- the running server ------------------------------------------------------------------------


@dataclass
class Running:
    server: grpc.Server
    port: int
    services: Services
    health: health.HealthServicer
    grace_seconds: float
    head_file: HeadFile | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def accounts(self) -> Accounts:
        return self.services.accounts

    @property
    def engine(self) -> Engine:
        return self.services.engine

    def stop(self, grace: float | None = None, *, drain_timeout: float = 30.0) -> bool:
        """Drain and stop. True when every call finished and the ledger closed cleanly."""
        if self._stopped.is_set():
            return True
        self._stopped.set()
        grace = self.grace_seconds if grace is None else grace
        in_flight = self.services.in_flight
        log.info("stopping", extra={"event": "stopping", "grace_s": grace,
                                    "calls_in_flight": in_flight.calls})
        self.health.enter_graceful_shutdown()
        # New calls are refused from now on. gRPC would abort every call still open when its
        # grace ends, whatever the call had done: a release charged a moment before would be
        # lost on its way out. So gRPC's grace outlasts the drain, and the drain decides.
        self.server.stop(grace + drain_timeout + _SEND_SECONDS)
        # Calls that finish within the grace period finish normally; the rest are interrupted
        # (a query not yet charged fails with nothing charged; a release already charged is
        # sent).
        if not in_flight.wait_idle(grace):
            in_flight.cancel_all()
        clean = in_flight.wait_idle(drain_timeout)
        # Answers already made have a moment to leave; a shorter grace replaces the longer.
        self.server.stop(_SEND_SECONDS).wait(_SEND_SECONDS + 5)
        if not clean:
            log.error("calls still running after the drain timeout; the ledger is closed anyway",
                      extra={"event": "drain_timeout", "calls_in_flight": in_flight.calls})
        head = _head(self.accounts)
        if self.head_file is not None:
            self.head_file.stop()
        self.accounts.close()
        backend = self.engine.backend
        if isinstance(backend, DuckDBBackend):
            backend.close()
        # The audit head in the log as well: a record outside the ledger to check a restore by.
        # The most calls that ran at once, to size max_concurrent_calls and workers by.
        log.info("stopped", extra={"event": "stopped", "clean": clean, "audit_head": head,
                                   "most_calls_at_once": in_flight.peak})
        return clean

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def build_engine(config: ServerConfig) -> Engine:
    codebook = load_codebook(config.codebook)
    backend = DuckDBBackend(config.data)
    return Engine(
        backend,
        codebook=codebook,
        settings=config.engine_settings(min_cell_size=codebook.min_cell_size),
    )


def start(config: ServerConfig, *, engine: Engine, accounts: Accounts) -> Running:
    """Start serving `engine` and `accounts` as `config` says; returns once listening."""
    limits = config.limits
    head_file = None
    if config.head_file is not None and isinstance(accounts, LedgerAccounts):
        head_file = HeadFile(config.head_file, accounts.ledger)
        head_file.check()  # before anything listens: a rolled-back ledger serves nothing
    if engine.settings.max_cells * _BYTES_PER_CELL > limits.max_response_bytes:
        raise ValueError(
            f"limits.max_response_bytes ({limits.max_response_bytes}) is too small for a release "
            f"of limits.max_cells ({engine.settings.max_cells}) cells; raise it to at least "
            f"{engine.settings.max_cells * _BYTES_PER_CELL}"
        )
    services = Services(
        engine=engine,
        accounts=accounts,
        max_query_seconds=limits.max_query_seconds,
        max_request_bytes=limits.max_request_bytes,
        max_response_bytes=limits.max_response_bytes,
        max_list_releases=limits.max_list_releases,
    )
    interceptor = AuthInterceptor(
        accounts,
        rate_per_second=limits.rate_per_second,
        rate_burst=limits.rate_burst,
        calls_per_client=limits.calls_per_client,
        request_seconds=limits.request_seconds,
        bind_client_ids=config.tls is not None and config.tls.binds_client_ids,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="veil-call"),
        handlers=generic_handlers(services),
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_send_message_length", limits.max_response_bytes),
            ("grpc.max_metadata_size", 16 * 1024),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=limits.max_concurrent_calls,
    )
    health_servicer = _Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    _check_free(config.listen)
    try:
        if config.tls is not None:
            tls = config.tls
            credentials = grpc.ssl_server_credentials(
                [(tls.key.read_bytes(), tls.cert.read_bytes())],
                root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
                require_client_auth=tls.mutual,
            )
            port = server.add_secure_port(config.listen, credentials)
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError:  # gRPC's "Failed to bind", with the cause only in its C log
        port = 0
    if not port:
        raise OSError(f"cannot listen on {config.listen}: gRPC could not bind that address")
    server.start()
    if head_file is not None:
        head_file.start()
    log.info(
        "serving",
        extra={
            "event": "serving",
            "listen": config.listen,
            "port": port,
            "tls": "mutual" if config.tls and config.tls.mutual else bool(config.tls),
            "client_ids_bound_to_certificates": bool(config.tls and config.tls.binds_client_ids),
            "reflection": config.reflection,
            "data_version": engine.data_version,
            "codebook": engine.codebook.identity,
            "accounting": engine.settings.accounting.value,
            "k": engine.settings.k,
            "max_concurrent_calls": limits.max_concurrent_calls,
            "audit_head": _head(accounts),
        },
    )
    return Running(server, port, services, health_servicer, config.grace_seconds, head_file)


def _head(accounts: Accounts) -> str | None:
    """The ledger's audit head, for the log; None without a ledger, or with one that has
    stopped or closed (a failed sync stops it: the head is then in the ledger file alone)."""
    if not isinstance(accounts, LedgerAccounts):
        return None
    try:
        return accounts.ledger.head()
    except VeilError:
        return None


def _check_free(listen: str) -> None:
    """Refuse an address another process listens on, or one this machine does not have.

    gRPC reports a bind failure without its cause, and binds a name such as `localhost` if any
    one of its addresses is free: a second server would then serve on ::1 while the first
    serves on 127.0.0.1, and clients would reach either.
    """
    host, _, port_text = listen.rpartition(":")
    port = int(port_text)
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return  # gRPC resolves the name itself and says if it cannot
    missing = 0
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                # As gRPC binds: a port left in TIME_WAIT by a server just stopped is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    f"cannot listen on {listen}: {address[0]} port {port} is already in use "
                    "(another veil server, or another program)"
                ) from None
            missing += exc.errno == errno.EADDRNOTAVAIL
    # One address of several may be missing (localhost's ::1 without IPv6); gRPC binds the rest.
    if addresses and missing == len(addresses):
        raise OSError(f"cannot listen on {listen}: {host} is not an address of this machine")


class StopSignals:
    """SIGTERM and SIGINT as a request to stop, caught from `install` until `restore`."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch the signals from now on (once: a second call changes nothing)."""
        if not self._previous:
            self._previous = {
                s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)
            }

    def restore(self) -> None:
        """Put back the handlers `install` replaced (nothing if it did not run)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        self.requested.set()


def serve(
    running: Running, *, ready: TextIO | None = None, signals: StopSignals | None = None
) -> int:
    """Block until SIGTERM or SIGINT, then drain and stop. Returns the process exit code.

    Give `signals`, installed before `start`, to also catch a signal sent while the server was
    starting: a supervisor may stop it as soon as it logs `serving`.
    """
    stop = StopSignals() if signals is None else signals
    stop.install()
    try:
        if ready is not None:
            ready.write(f"listening on port {running.port}\n")
            ready.flush()
        while not stop.requested.wait(0.5):
            pass
        log.info("signal received", extra={"event": "signal",
                                           "signal": signal.Signals(stop.received[0]).name})
        clean = running.stop()
    finally:
        stop.restore()
    return 0 if clean else 1
