"""The server's view of the ledger: clients, tokens, budgets, releases and the audit log.

`Accounts` is what the servicers and the interceptor need; `LedgerAccounts` adapts
`engine.ledger.Ledger` to it and converts the ledger's records to protobuf. Tokens reach the
ledger only as hashes (`server.auth.hash_token`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from engine.audit_report import TABLE_NAMES, build_tables
from engine.errors import ClientRegistryError, LedgerIntegrityError, LedgerUnavailableError
from engine.ledger import ClientRecord, Ledger
from engine.ledger_format import LOCAL_ACTOR_PREFIX
from engine.loss import parse_amount
from engine.release import Charger, Release, ReleaseMetadata
from engine.settings import Settings
from protos.veil.v1 import veil_pb2 as pb
from server.auth import (
    ExpiredToken,
    Identity,
    RevokedToken,
    Role,
    hash_token,
    without_tokens,
)
from server.config import Caps, ServerConfig
from server.convert import ACCOUNTING_TO_PB, ROLE_TO_PB, amount_text
from server.errors import NotFoundError

log = logging.getLogger("veil.server")

if TYPE_CHECKING:
    from engine.engine import Engine

# The actor recorded for changes made by `veil serve` itself on the ledger's host (the config's
# caps, --init-admin, the demo's clients), with no authenticated caller behind them. Client ids
# over the Admin service cannot hold a colon, so this is never taken for an administrator's.
LOCAL_ACTOR = f"{LOCAL_ACTOR_PREFIX}veil-serve"  # `veil serve` itself, in audit entries


class Accounts(Protocol):
    @property
    def charger(self) -> Charger: ...

    # -- authentication (the interceptor) --
    def identify(self, token_hash: str) -> Identity | ExpiredToken | RevokedToken | None: ...

    def record_denied(
        self, *, method: str, reason: str, client: str | None, peer: str, unrecorded: int = 0
    ) -> None: ...

    def record_admin_refused(self, *, method: str, reason: str, by: Identity) -> None:
        """Append a refused administrative request (a conflicting registration, a cap below
        what was spent, ...) to the audit log: an attempt to change who may spend what is
        evidence whether or not it succeeded."""
        ...

    # -- researchers --
    def stored_release(self, fingerprint: str, loss: Fraction) -> ReleaseMetadata | None:
        """The metadata of the stored release a request for this query at `loss` would get back
        free on the data served (`engine.release.replays`), or None when it would be drawn
        afresh."""
        ...

    def earlier_release(self, identity: Identity, fingerprint: str) -> pb.EarlierRelease | None:
        """The newest release of this query the caller itself received on a data version other
        than the one served, or None. Never another client's: it would tell one researcher what
        another asked."""
        ...

    def budget(self, identity: Identity) -> pb.Budget: ...

    def received(self, identity: Identity, *, limit: int) -> list[pb.MyRelease]:
        """The last `limit` releases the caller received (paid for or reused), oldest first."""
        ...

    def received_release(self, identity: Identity, release_id: str) -> Release:
        """A release the caller received; NotFoundError when it received no such release."""
        ...

    # -- administrators (`by`, the calling administrator, is the audit entry's actor) --
    def register(
        self, client: str, *, role: Role, institution: str, cap: Fraction | None, token: str,
        by: Identity,
    ) -> pb.ClientInfo:
        """Register a client; `cap` None takes the deployment's default client cap."""
        ...

    def set_cap(self, client: str, cap: Fraction, *, by: Identity) -> pb.ClientInfo: ...

    def revoke(self, client: str, *, reason: str, by: Identity) -> pb.RevokeClientResponse:
        """Revoke a client; the response says whether it was already revoked (nothing changed)."""
        ...

    def clients(self) -> list[pb.ClientInfo]: ...

    def rotate(self, client: str, *, token: str, by: Identity) -> pb.ClientInfo: ...

    # -- auditors --
    def report(self) -> pb.LedgerReportResponse: ...

    def releases(self, client: str | None, *, limit: int) -> list[pb.ReleaseSummary]: ...

    def verify(self) -> pb.VerifyAuditLogResponse: ...

    def audit_tables(self, names: list[str]) -> list[pb.AuditTable]:
        """The auditor's tables (`engine.audit_report`) as Arrow IPC; empty names: all."""
        ...

    def close(self) -> None: ...


class HeadFile:
    """The ledger's audit head ("seq:hash"), kept in a file outside the ledger's directory.

    Restoring an older backup of the ledger gives back every budget spent since, and drops the
    releases since from the audit trail; nothing inside the ledger can tell. The server refuses
    a ledger that does not hold the head last kept here, and keeps it current each `every`
    seconds and when it stops (a crash leaves it a little behind, which still refuses any older
    backup). The file's line is also what `veil ledger verify --expect-head` takes.
    """

    def __init__(self, path: Path, ledger: Ledger, *, every: float = 1.0) -> None:
        self.path = path
        self.ledger = ledger
        self.every = every
        self._kept: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Refuse a ledger that does not hold the head last kept (LedgerIntegrityError)."""
        try:
            kept = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return  # the first start with a head file
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerIntegrityError(f"cannot read the head file {self.path}: {exc}") from exc
        if not self.ledger.holds_head(kept):
            raise LedgerIntegrityError(
                f"the ledger does not hold the audit head {kept} kept in {self.path}: it is "
                "older than the ledger this server last served (a restored backup, which gives "
                "back every budget spent since), or another ledger. If that is what you mean, "
                f"move {self.path} aside and start again"
            )

    def keep(self) -> None:
        """Write the current head, once durable, when it has moved (replacing the file whole)."""
        if self.ledger.head() == self._kept:
            return  # no sync each second for a ledger at rest
        head = self.ledger.durable_head()
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", encoding="ascii") as out:
            out.write(head + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, self.path)
        self._kept = head

    def start(self) -> None:
        self.keep()
        self._thread = threading.Thread(target=self._run, name="veil-head-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Keep the last head (before the ledger closes) and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.keep()
        except Exception as exc:  # a stopped ledger: what was kept last is still behind it
            log.error(
                "could not keep the audit head",
                extra={"event": "head_file_failed", "error_type": type(exc).__name__},
            )

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.keep()
            except Exception as exc:  # the next try may succeed; the start check stays safe
                log.error(
                    "could not keep the audit head",
                    extra={"event": "head_file_failed", "error_type": type(exc).__name__},
                )


class LedgerAccounts:
    """`Accounts` backed by the durable ledger (`engine.ledger.Ledger`)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        data_version: str,
        default_cap: Fraction,
        token_lifetime: timedelta | None = None,
    ) -> None:
        self.ledger = ledger
        self.data_version = data_version
        self.default_cap = default_cap
        self.token_lifetime = token_lifetime

    @classmethod
    def open(
        cls, path: Path, *, settings: Settings, dataset: str, data_version: str, caps: Caps,
        wait_timeout: float, token_lifetime: timedelta | None = None, create: bool = True,
        load_id: str | None = None, recorded: Mapping[str, str] | None = None,
    ) -> LedgerAccounts:
        """Open (or, with `create`, create) the ledger and apply the config's dataset and
        institution caps."""
        if caps.dataset is None:
            raise LedgerUnavailableError(
                "the ledger needs a dataset-wide cap: set caps.dataset in the config"
            )
        ledger = Ledger.open(
            path,
            accounting=settings.accounting,
            dataset_cap=caps.dataset,
            dataset=dataset,
            data_version=data_version,
            wait_timeout=wait_timeout,
            actor=LOCAL_ACTOR,
            create=create,
            load_id=load_id,
            settings=recorded,
        )
        try:
            for institution, cap in caps.institutions.items():
                if ledger.budget("institution", institution).cap != parse_amount(cap):
                    ledger.set_institution_cap(institution, cap, actor=LOCAL_ACTOR)
        except BaseException:
            ledger.close()
            raise
        return cls(
            ledger,
            data_version=data_version,
            default_cap=parse_amount(caps.client),
            token_lifetime=token_lifetime,
        )

    @classmethod
    def for_config(
        cls, config: ServerConfig, engine: Engine, *, create: bool = True
    ) -> LedgerAccounts:
        """The deployment's ledger, opened as `config` says for the data `engine` serves. The
        settings that shape what is released and who may ask are recorded in the audit entry
        of the open, so that a change between starts is on the record."""
        settings = engine.settings
        tls = config.tls
        recorded = {
            "codebook": engine.codebook.identity,
            "k": str(settings.k),
            "k_floor": str(settings.k_floor),
            "beta": repr(settings.beta),
            "confidence": repr(settings.confidence),
            "tls": "none" if tls is None else ("mutual" if tls.mutual else "server"),
        }
        return cls.open(
            config.ledger,
            settings=engine.settings,
            dataset=engine.dataset,
            data_version=engine.data_version,
            caps=config.caps,
            wait_timeout=config.limits.max_query_seconds,
            token_lifetime=config.token_lifetime,
            create=create,
            load_id=engine.load_id,
            recorded=recorded,
        )

    def token_expiry(self) -> datetime | None:
        """When a token issued now expires; None: never."""
        return None if self.token_lifetime is None else datetime.now(UTC) + self.token_lifetime

    @property
    def charger(self) -> Charger:
        return self.ledger

    # -- authentication --
    def identify(self, token_hash: str) -> Identity | ExpiredToken | RevokedToken | None:
        record = self.ledger.client_for_token_hash(token_hash)
        if record is None:
            return None
        if not record.active:
            return RevokedToken(record.client_id)
        if record.token_expired():
            assert record.token_expires_at is not None
            return ExpiredToken(record.client_id, record.token_expires_at)
        return Identity(record.client_id, Role(record.role), record.institution or "")

    def record_denied(
        self, *, method: str, reason: str, client: str | None, peer: str, unrecorded: int = 0
    ) -> None:
        detail = {"method": method[:200], "reason": without_tokens(reason)[:200],
                  "peer": peer[:200]}
        if unrecorded:
            detail["unrecorded_before"] = str(unrecorded)
        self.ledger.audit("auth_denied", client, outcome="refused", detail=detail)

    def record_admin_refused(self, *, method: str, reason: str, by: Identity) -> None:
        detail = {"method": method[:200], "reason": without_tokens(reason)[:300]}
        self.ledger.audit("admin_refused", by.client_id, outcome="refused", detail=detail)

    # -- researchers --
    def stored_release(self, fingerprint: str, loss: Fraction) -> ReleaseMetadata | None:
        return self.ledger.replayed_release(fingerprint, self.data_version, loss)

    def earlier_release(self, identity: Identity, fingerprint: str) -> pb.EarlierRelease | None:
        # Only the caller's own receipts are read, so no other client's release is named.
        own = self.ledger.received(identity.client_id, fingerprint=fingerprint)
        for charge, record in reversed(own):
            if record.data_version != self.data_version:
                return pb.EarlierRelease(
                    release_id=record.release_id,
                    data_version=record.data_version,
                    loss=amount_text(record.loss),
                    received_at=charge.settled_at or charge.reserved_at,
                )
        return None

    def budget(self, identity: Identity) -> pb.Budget:
        budget = self.ledger.client_budget(identity.client_id)
        own, institution, dataset = (budget.scope(k) for k in ("client", "institution", "dataset"))
        assert own is not None and dataset is not None
        out = pb.Budget(
            client_id=identity.client_id,
            role=ROLE_TO_PB[identity.role],
            institution=identity.institution,
            accounting=ACCOUNTING_TO_PB[self.ledger.accounting],
            cap=amount_text(own.cap),
            spent=amount_text(own.spent),
            reserved=amount_text(own.held),
            remaining=amount_text(budget.remaining),
            dataset_remaining=amount_text(dataset.remaining),
        )
        if institution is not None:
            out.institution_cap = amount_text(institution.cap)
            out.institution_remaining = amount_text(institution.remaining)
        return out

    def received(self, identity: Identity, *, limit: int) -> list[pb.MyRelease]:
        return [
            pb.MyRelease(
                release_id=record.release_id,
                request_id=charge.request_id,
                fingerprint=charge.fingerprint,
                canonical_query=record.canonical_query,
                charged=amount_text(charge.amount),
                release_loss=amount_text(record.loss),
                received_at=charge.settled_at or charge.reserved_at,
                reused=charge.kind == "replay",
                data_version=charge.data_version,
            )
            for charge, record in self.ledger.received(identity.client_id, last=limit)
        ]

    def received_release(self, identity: Identity, release_id: str) -> Release:
        if not self.ledger.received(identity.client_id, release_id=release_id):
            raise NotFoundError(
                f"client {identity.client_id!r} has received no release {release_id!r}"
            )
        return self.ledger.release(release_id)

    # -- administrators --
    def _info(self, record: ClientRecord) -> pb.ClientInfo:
        scope = self.ledger.budget("client", record.client_id)
        return pb.ClientInfo(
            client_id=record.client_id,
            role=ROLE_TO_PB[Role(record.role)],
            institution=record.institution or "",
            cap=amount_text(record.cap),
            spent=amount_text(scope.spent),
            remaining=amount_text(scope.remaining),
            revoked=not record.active,
            created_at=record.created_at,
            revoked_at=record.revoked_at or "",
            token_expires_at=record.token_expires_at or "",
        )

    def register(
        self, client: str, *, role: Role, institution: str, cap: Fraction | None, token: str,
        by: Identity,
    ) -> pb.ClientInfo:
        record = self.ledger.register_client(
            client,
            role=role.value,
            cap=self.default_cap if cap is None else cap,
            institution=institution or None,
            token_hash=hash_token(token),
            token_expires_at=self.token_expiry(),
            actor=by.client_id,
        )
        return self._info(record)

    def set_cap(self, client: str, cap: Fraction, *, by: Identity) -> pb.ClientInfo:
        return self._info(self.ledger.set_cap(client, cap, actor=by.client_id))

    def revoke(self, client: str, *, reason: str, by: Identity) -> pb.RevokeClientResponse:
        if client == by.client_id:
            raise ClientRegistryError("an administrator cannot revoke its own registration")
        revoked = self.ledger.revoke(client, reason=reason, actor=by.client_id)
        return pb.RevokeClientResponse(
            client=self._info(self.ledger.client(client)), already_revoked=not revoked
        )

    def clients(self) -> list[pb.ClientInfo]:
        return [self._info(record) for record in self.ledger.list_clients()]

    def rotate(self, client: str, *, token: str, by: Identity) -> pb.ClientInfo:
        record = self.ledger.set_token_hash(
            client, hash_token(token), expires_at=self.token_expiry(), actor=by.client_id
        )
        return self._info(record)

    # -- auditors --
    def report(self) -> pb.LedgerReportResponse:
        report = self.ledger.report()
        counts: dict[str, int] = {}
        for record in self.ledger.releases():
            counts[record.client] = counts.get(record.client, 0) + 1
        rows = [
            pb.SpendingRow(
                scope=scope.kind,
                name=scope.name,
                cap=amount_text(scope.cap),
                spent=amount_text(scope.spent),
                remaining=amount_text(scope.remaining),
                releases=counts.get(scope.name, 0) if scope.kind == "client" else 0,
            )
            for scope in (*report.clients, *report.institutions, report.dataset)
        ]
        return pb.LedgerReportResponse(
            accounting=ACCOUNTING_TO_PB[report.accounting],
            rows=rows,
            report_json=json.dumps(report.to_dict(), sort_keys=True),
        )

    def releases(self, client: str | None, *, limit: int) -> list[pb.ReleaseSummary]:
        records = self.ledger.releases(client=client)
        charges = {c.charge_id: c for c in self.ledger.charges(client=client)}
        out = []
        shown = records[-limit:]
        metadata = self.ledger.release_metadata(r.release_id for r in shown)
        for record in shown:
            charge = charges.get(record.charge_id)
            meta = metadata[record.release_id]
            out.append(
                pb.ReleaseSummary(
                    release_id=record.release_id,
                    charge_id=record.charge_id,
                    client_id=record.client,
                    request_id=charge.request_id if charge else "",
                    fingerprint=record.fingerprint,
                    canonical_query=record.canonical_query,
                    loss=amount_text(record.loss),
                    created_at=record.created_at,
                    data_version=record.data_version,
                    measure=meta.measure,
                    mechanism=meta.mechanism,
                    noise_scale=meta.noise_scale,
                    tau=meta.tau,
                    cells=meta.cells,
                    suppressed_cells=meta.suppressed_cells,
                    suppressed_share=meta.suppressed_share,
                    replays=record.replays,
                    unreachable_cells=meta.unreachable_cells,
                )
            )
        return out

    def verify(self) -> pb.VerifyAuditLogResponse:
        result = self.ledger.verify()
        return pb.VerifyAuditLogResponse(
            ok=result.ok, entries=result.entries, problem="" if result.ok else result.message
        )

    def audit_tables(self, names: list[str]) -> list[pb.AuditTable]:
        tables = build_tables(self.ledger, names=names or TABLE_NAMES)
        return [pb.AuditTable(name=n, arrow_ipc=data) for n, data in tables.to_ipc().items()]

    def close(self) -> None:
        self.ledger.close()
