"""Tokens, roles and rate limits, without a network."""

from __future__ import annotations

import pytest

from protos.veil.v1 import veil_pb2 as pb
from server.auth import (
    METHOD_ROLES,
    AuthInterceptor,
    RateLimiter,
    Role,
    bearer_token,
    hash_token,
    new_token,
)
from server.errors import AuthenticationError


def test_tokens_are_random_and_stored_as_hashes() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(t.startswith("veil_") and len(t) > 40 for t in tokens)
    token = next(iter(tokens))
    digest = hash_token(token)
    assert len(digest) == 64 and token not in digest and digest == hash_token(token)


def test_bearer_parsing() -> None:
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("Authorization", "bearer  abc "),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert bearer_token((("authorization", "Bearer"),)) is None
    assert bearer_token((("authorization", "Bearer " + "a" * 257),)) is None
    assert bearer_token((("authorization", "Bearer é"),)) is None
    assert bearer_token((("authorization-bin", b"abc"),)) is None
    assert bearer_token(()) is None and bearer_token(None) is None


_EVERY = frozenset({Role.RESEARCHER, Role.AUDITOR, Role.ADMIN})
_QUERYING = frozenset({Role.RESEARCHER, Role.AUDITOR})
_AUDITING = frozenset({Role.AUDITOR, Role.ADMIN})
_ADMIN = frozenset({Role.ADMIN})

# Who may call what, written out by hand rather than read from server.auth, so that widening a
# method's roles there (a researcher reading every client's releases, say) fails a test. The
# integration matrix in tests/integration/test_server_auth.py checks a live server against it.
EXPECTED_ROLES: dict[str, frozenset[Role]] = {
    "/veil.v1.Research/GetCodebook": _EVERY,
    "/veil.v1.Research/DescribeVariable": _EVERY,
    "/veil.v1.Research/DryRun": _EVERY,
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


def test_every_method_has_roles() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(METHOD_ROLES) == methods
    assert set(EXPECTED_ROLES) == methods


def test_each_method_is_for_exactly_the_roles_it_should_be() -> None:
    wrong = {
        method: (sorted(r.value for r in METHOD_ROLES.get(method, frozenset())),
                 sorted(r.value for r in expected))
        for method, expected in EXPECTED_ROLES.items()
        if METHOD_ROLES.get(method) != expected
    }
    assert not wrong, wrong  # method: (roles it has, roles it should have)
    assert dict(METHOD_ROLES) == EXPECTED_ROLES


def test_rate_limiter() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == 0.5
    assert limiter.take("b") == 0.0
    now[0] = 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0


def test_rate_limiter_banks_no_more_than_burst_over_a_long_idle() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    now[0] = 1000.0  # 2000 tokens' worth of idle: the bucket holds `burst`, no more
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == 0.5
    # A key first seen after the clock has run a long time starts with `burst` too.
    assert [limiter.take("b") for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


class _Directory:
    """Identifies nobody; records the refusals the interceptor chooses to audit."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, int]] = []
        self.failing = False

    def identify(self, token_hash: str) -> None:
        return None

    def record_denied(
        self, *, method: str, reason: str, client: str | None, peer: str, unrecorded: int = 0
    ) -> None:
        if self.failing:
            raise OSError("disk full")
        self.entries.append((peer, unrecorded))


class _Context:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer veil_guess"),)


def test_refusals_from_many_peers_are_audited_at_a_bounded_total_rate() -> None:
    now = [0.0]
    directory = _Directory()
    interceptor = AuthInterceptor(directory, rate_per_second=10, rate_burst=10)
    interceptor.failure_audit = RateLimiter(rate=2 / 60, burst=2, clock=lambda: now[0])
    interceptor.total_failure_audit = RateLimiter(rate=5 / 60, burst=5, clock=lambda: now[0])

    def refuse(peer: str) -> None:
        with pytest.raises(AuthenticationError):
            interceptor.check("/veil.v1.Research/GetCodebook", _Context(peer))  # type: ignore[arg-type]

    # Forty addresses, three tries each: two per address would pass the per-peer limit, but
    # only five reach the ledger in all.
    for attempt in range(3):
        for host in range(40):
            refuse(f"ipv4:10.0.0.{host}:{5000 + attempt}")
    assert len(directory.entries) == 5
    assert all(unrecorded == 0 for _, unrecorded in directory.entries)
    # A minute later the next entry says how many went unrecorded: every refusal is counted.
    now[0] = 60.0
    refuse("ipv4:10.0.1.1:6000")
    assert directory.entries[-1] == ("ipv4:10.0.1.1:6000", 115)
    assert sum(1 + unrecorded for _, unrecorded in directory.entries) == 121
    # An entry that cannot be written hands its count on to the next one.
    directory.failing = True
    refuse("ipv4:10.0.1.2:6000")
    directory.failing = False
    refuse("ipv4:10.0.1.3:6000")
    assert directory.entries[-1] == ("ipv4:10.0.1.3:6000", 1)


class _Aborted(Exception):
    pass


class _AbortingContext(_Context):
    def abort_with_status(self, status: object) -> None:
        self.status = status
        raise _Aborted


def test_a_streaming_method_outside_the_open_services_is_refused_unread() -> None:
    """veil's methods are all unary; a streaming one registered beside them (a future method,
    a service added by mistake) is refused at once, without its handler ever running."""
    import grpc

    ran: list[object] = []

    def handler(requests: object, context: object) -> object:
        ran.append(requests)
        return iter(())

    streaming = grpc.stream_stream_rpc_method_handler(handler)
    interceptor = AuthInterceptor(_Directory(), rate_per_second=10, rate_burst=10)

    class Details:
        method = "/veil.v1.Research/Stream"

    served = interceptor.intercept_service(lambda _: streaming, Details())  # type: ignore[arg-type]
    assert served is not None and served.stream_unary is not None
    context = _AbortingContext("ipv4:10.0.0.1:5000")
    with pytest.raises(_Aborted):
        served.stream_unary(iter(()), context)
    assert context.status.code == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "not a veil method" in context.status.details  # type: ignore[attr-defined]
    assert ran == []
