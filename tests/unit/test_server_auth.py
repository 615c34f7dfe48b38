"""Tokens, roles and rate limits, without a network."""

from __future__ import annotations

from protos.veil.v1 import veil_pb2 as pb
from server.auth import METHOD_ROLES, RateLimiter, Role, bearer_token, hash_token, new_token


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


def test_every_method_has_roles() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(METHOD_ROLES) == methods
    assert Role.RESEARCHER not in METHOD_ROLES["/veil.v1.Admin/RegisterClient"]
    assert Role.ADMIN not in METHOD_ROLES["/veil.v1.Research/Release"]
    assert Role.RESEARCHER not in METHOD_ROLES["/veil.v1.Audit/VerifyAuditLog"]


def test_rate_limiter() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == 0.5
    assert limiter.take("b") == 0.0
    now[0] = 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
