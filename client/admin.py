"""The custodian's side of the client: register clients, set their caps, rotate and revoke
their tokens, list them. Every call needs an administrator's token.

    from client.admin import connect_admin

    admin = connect_admin("localhost:50051", token="veil_...")   # default $VEIL_SERVER, $VEIL_TOKEN
    info, token = admin.register("amina", role="researcher", institution="iom", budget="1")
    admin.set_budget("amina", "2")
    new_token = admin.rotate_token("amina")       # the old token stops working now
    admin.revoke("amina", reason="left the project")
    admin.clients()                               # every client, revoked ones included

The connection (address, TLS, retries, errors) is the researcher's `Client`'s; a new token is
returned once and never kept by the server, which stores only its hash.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from client.amounts import Amount, amount, format_amount
from client.connection import TLS, Client, Retry, decimal_text
from client.errors import InvalidQuery, RegistryConflict, RequestConflict
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc

ROLES: dict[str, Any] = {
    "researcher": pb.ROLE_RESEARCHER,
    "auditor": pb.ROLE_AUDITOR,
    "admin": pb.ROLE_ADMIN,
}
_ROLE_NAMES = {value: name for name, value in ROLES.items()}


@dataclass(frozen=True)
class ClientInfo:
    """One registered client as the server reports it. Amounts are `Amount`s, exact Fractions;
    `str()` of one, or `to_dict()`, gives its exact decimal text."""

    client_id: str
    role: str  # "researcher", "auditor" or "admin"
    institution: str | None
    cap: Amount
    spent: Amount
    remaining: Amount
    revoked: bool
    created_at: str
    revoked_at: str | None
    token_expires_at: str | None = None  # None: the token never expires

    @classmethod
    def from_pb(cls, m: pb.ClientInfo) -> ClientInfo:
        return cls(
            client_id=m.client_id,
            role=_ROLE_NAMES.get(m.role, "unspecified"),
            institution=m.institution or None,
            cap=amount(m.cap),
            spent=amount(m.spent),
            remaining=amount(m.remaining),
            revoked=m.revoked,
            created_at=m.created_at,
            revoked_at=m.revoked_at or None,
            token_expires_at=m.token_expires_at or None,
        )

    @property
    def status(self) -> str:
        return "revoked" if self.revoked else "active"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON: amounts as exact decimal text."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = format_amount(value) if isinstance(value, Amount) else value
        return out

    def __str__(self) -> str:
        d = self.to_dict()
        where = f", {self.institution}" if self.institution else ""
        revoked = f", revoked {self.revoked_at}" if self.revoked else ""
        expires = (
            f", token expires {self.token_expires_at}"
            if self.token_expires_at and not self.revoked
            else ""
        )
        # Of the client's own cap: its institution's or the dataset's may leave it less (what
        # `veil budget` shows the client).
        return (f"{self.client_id} ({self.role}{where}): cap {d['cap']}, spent {d['spent']}, "
                f"remaining {d['remaining']} of its own cap{revoked}{expires}")


@dataclass(frozen=True)
class RevokedClient(ClientInfo):
    """A client's record as `AdminClient.revoke` returns it, with what the call did.

    `already_revoked`: the client had been revoked before (at `revoked_at`), so the call changed
    nothing and wrote nothing to the audit log. A server too old to say reports False."""

    already_revoked: bool = False

    @classmethod
    def from_response(cls, m: pb.RevokeClientResponse) -> RevokedClient:
        info = ClientInfo.from_pb(m.client)
        values = {f.name: getattr(info, f.name) for f in fields(ClientInfo)}
        return cls(**values, already_revoked=m.already_revoked)


def budget_text(value: Any) -> str:
    """A client's cap as exact decimal text. Unlike a privacy loss, a cap may be 0 (a client
    that only browses, audits or administers)."""
    return decimal_text(value, "budget", allow_zero=True)


def _role(value: str) -> Any:
    role = ROLES.get(value.strip().lower()) if isinstance(value, str) else None
    if role is None:
        raise InvalidQuery(f"role must be one of {', '.join(ROLES)}, got {value!r}")
    return role


class _Attempts:
    """A stub that counts the calls made through it, so a refusal can tell a retried call."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.stub, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return method(*args, **kwargs)

        return call


def connect_admin(
    address: str | None = None,
    *,
    token: str | None = None,
    tls: bool | str | Path | TLS | None = None,
    timeout: float = 120.0,
    retry: Retry | None = None,
) -> AdminClient:
    """An administrator's client of the veil server at `address` (default $VEIL_SERVER, else
    localhost:50051), authenticated by an administrator's `token` (default $VEIL_TOKEN). The
    options are `client.connect`'s. No call is made until one is needed."""
    return AdminClient(Client(address, token=token, tls=tls, timeout=timeout, retry=retry))


class AdminClient:
    """Calls of veil's Admin service over a `Client`'s connection (its channel, token, TLS and
    retries). Errors are the client's: `PermissionDenied` for a token that is not an
    administrator's, `InvalidQuery` for a malformed argument, `NotFound` for an unknown client,
    `RegistryConflict` (a `RequestConflict`) for a change the registry refuses (a client id
    already taken, a cap below what the client has spent, rotating a revoked client's token)."""

    def __init__(self, connection: Client) -> None:
        self.connection = connection
        # The Research stub's channel, so a Client and its AdminClient share one connection.
        self._stub = pb_grpc.AdminStub(connection._channel)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        security = "TLS" if self.connection.tls is not None else "plaintext"
        return f"<veil AdminClient {self.connection.address} ({security})>"

    def _call(self, method: str, request: Any, stub: Any = None) -> Any:
        try:
            return self.connection._call(method, request, stub=stub or self._stub)
        except RequestConflict as exc:
            # FAILED_PRECONDITION from the Admin service is the registry refusing the change;
            # Admin calls carry no request id that could have been reused.
            raise RegistryConflict(exc.message, code=exc.code, request_id=exc.request_id) from None

    def register(
        self,
        client_id: str,
        *,
        role: str = "researcher",
        institution: str | None = None,
        budget: Any = None,
    ) -> tuple[ClientInfo, str]:
        """Register a client; returns its record and its bearer token. The token is shown only
        here (the server keeps its hash): hand it to the client, or `rotate_token` later.

        `role` is "researcher", "auditor" or "admin"; `budget` is the client's cap as an exact
        decimal ("0.5", Decimal, int; 0 for a client that never queries), None for the
        deployment's default client cap."""
        request = pb.RegisterClientRequest(
            client_id=client_id, role=_role(role), institution=institution or "",
            budget="" if budget is None else budget_text(budget),
        )
        attempts = _Attempts(self._stub)
        try:
            response = self._call("RegisterClient", request, attempts)
        except RegistryConflict as exc:
            if attempts.count > 1 and "already registered" in exc.message:
                # The first attempt may have registered it and lost the answer on the way back.
                raise RegistryConflict(
                    f"{exc.message} (the call was retried, so an earlier attempt may have "
                    f"registered it: rotate its token to get one)", code=exc.code,
                ) from None
            raise
        return ClientInfo.from_pb(response.client), response.token

    def set_budget(self, client_id: str, budget: Any) -> ClientInfo:
        """Set a client's cap (exact decimal; 0 stops its releases). A cap below what the client
        has already spent or holds is refused."""
        response = self._call(
            "SetBudget", pb.SetBudgetRequest(client_id=client_id, budget=budget_text(budget))
        )
        return ClientInfo.from_pb(response.client)

    def revoke(self, client_id: str, reason: str) -> RevokedClient:
        """Stop serving a client: its token fails from now on. Its charges and releases stay on
        the ledger; `reason` goes to the audit log. Revoking a revoked client changes nothing
        and is no error: the result's `already_revoked` says so."""
        response = self._call(
            "RevokeClient", pb.RevokeClientRequest(client_id=client_id, reason=reason)
        )
        return RevokedClient.from_response(response)

    def rotate_token(self, client_id: str) -> str:
        """A new token for an active client; its old token stops working now."""
        return str(self._call("RotateToken", pb.RotateTokenRequest(client_id=client_id)).token)

    def clients(self) -> list[ClientInfo]:
        """Every registered client, revoked ones included, with cap, spent and remaining."""
        response = self._call("ListClients", pb.ListClientsRequest())
        return [ClientInfo.from_pb(m) for m in response.clients]


__all__ = [
    "ROLES", "AdminClient", "ClientInfo", "RegistryConflict", "RevokedClient", "budget_text",
    "connect_admin",
]
