"""The ledger file's format: its tables, and its hash-chained audit log's entries.

What `engine.ledger` writes and `engine.ledger_verify` checks. An audit entry is canonical JSON
(`canonical_json`) holding every field of `ENTRY_FIELDS`; entry n is chained to entry n-1 by
`chain_hash(hash of n-1, entry n)`, starting from `GENESIS_HASH`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Version 1 kept a dataset cap per data version; opening such a ledger for writing upgrades it.
SCHEMA_VERSION = "2"
GENESIS_HASH = "0" * 64

# Fields of every audit entry, in every entry (null where they do not apply).
ENTRY_FIELDS = (
    "seq",
    "time",
    "event",
    "accounting",
    "client",
    "request_id",
    "charge_id",
    "data_version",
    "fingerprint",
    "canonical_query",
    "outcome",
    "charge",
    "release_id",
    "release_sha256",
    "budget",
    "detail",
)
# Changes to who may ask and how much: by an administrator, or by the ledger's owner at open.
# Actors that are the custodian's own processes, not registered clients, are named `local:...`.
LOCAL_ACTOR_PREFIX = "local:"
ADMIN_EVENTS = frozenset(
    {
        "register_client",
        "set_cap",
        "set_token",
        "revoke",
        "set_institution_cap",
        "set_dataset_cap",
        "set_delta",
    }
)
# Events the ledger writes itself; `audit` refuses them so that no caller can forge one.
LEDGER_EVENTS = frozenset(
    {
        "create",
        "open",
        "reserve",
        "release",
        "cancel",
        "abandon",
        "forfeit",
        "replay",
        "retry",
        "refused",
        *ADMIN_EVENTS,
    }
)

# What an `open` entry's detail records under "charge_times" once the ledger dates each charge's
# reserved_at and settled_at with the time of the entry that made or settled it (a release's with
# its created_at): `verify` holds the charges made after that entry to those times.
CHARGE_TIMES_FROM_ENTRIES = "entry"

# Indexes made on every open too, so that a ledger made before one was added gets it.
INDEXES = (
    # Every reservation looks up its request id among all attempts, cancelled ones too; without
    # this index that lookup reads the whole table.
    "CREATE INDEX IF NOT EXISTS charges_by_request ON charges (client, request_id)",
)

SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT",
    """CREATE TABLE clients (
        client_id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('researcher', 'auditor', 'admin')),
        institution TEXT,
        cap TEXT NOT NULL,
        token_hash TEXT UNIQUE,
        token_expires_at TEXT,
        status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        created_at TEXT NOT NULL,
        revoked_at TEXT
    ) STRICT""",
    "CREATE TABLE institutions (institution TEXT PRIMARY KEY, cap TEXT NOT NULL) STRICT",
    """CREATE TABLE totals (
        kind TEXT NOT NULL, name TEXT NOT NULL, spent TEXT NOT NULL, held TEXT NOT NULL,
        PRIMARY KEY (kind, name)
    ) STRICT""",
    """CREATE TABLE charges (
        charge_id TEXT PRIMARY KEY,
        client TEXT NOT NULL REFERENCES clients (client_id),
        institution TEXT,
        request_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('charge', 'replay')),
        fingerprint TEXT NOT NULL,
        canonical_query TEXT NOT NULL,
        data_version TEXT NOT NULL,
        requested TEXT NOT NULL,
        amount TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('reserved', 'committed', 'cancelled')),
        release_id TEXT,
        reserved_at TEXT NOT NULL,
        settled_at TEXT,
        reason TEXT
    ) STRICT""",
    # A committed charge is spent. Its release_id is NULL when it was forfeited: the server's time
    # limit stopped its query once the hold was taken, so nothing was released, yet whether the
    # query ran past the limit was seen (the `forfeit` entry says so, and `reason` why).
    # One live charge per request id; a cancelled attempt leaves the id free for its retry.
    """CREATE UNIQUE INDEX charges_request ON charges (client, request_id)
        WHERE state != 'cancelled'""",
    "CREATE INDEX charges_release ON charges (release_id)",
    *INDEXES,
    """CREATE TABLE releases (
        release_id TEXT PRIMARY KEY,
        charge_id TEXT NOT NULL UNIQUE REFERENCES charges (charge_id),
        client TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        canonical_query TEXT NOT NULL,
        data_version TEXT NOT NULL,
        loss TEXT NOT NULL,
        created_at TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        bytes BLOB NOT NULL
    ) STRICT""",
    "CREATE INDEX releases_query ON releases (fingerprint, data_version)",
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY, entry TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
    ) STRICT""",
    # Guard rails: the log and the releases are append-only, and a charge changes only once,
    # from reserved to committed or cancelled. (Anyone who can write the file can drop these;
    # the hash chain and `verify` are what catch that.)
    """CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER releases_append_only_update BEFORE UPDATE ON releases
        BEGIN SELECT RAISE(ABORT, 'stored releases are immutable'); END""",
    """CREATE TRIGGER releases_append_only_delete BEFORE DELETE ON releases
        BEGIN SELECT RAISE(ABORT, 'stored releases are immutable'); END""",
    """CREATE TRIGGER charges_no_delete BEFORE DELETE ON charges
        BEGIN SELECT RAISE(ABORT, 'charges are never deleted'); END""",
    """CREATE TRIGGER charges_settle_once BEFORE UPDATE ON charges
        WHEN OLD.state != 'reserved' OR NEW.state = 'reserved'
            OR NEW.amount IS NOT OLD.amount OR NEW.client IS NOT OLD.client
            OR NEW.institution IS NOT OLD.institution OR NEW.data_version IS NOT OLD.data_version
            OR NEW.fingerprint IS NOT OLD.fingerprint OR NEW.request_id IS NOT OLD.request_id
            OR NEW.kind IS NOT OLD.kind
        BEGIN SELECT RAISE(ABORT, 'a charge is settled once, from reserved'); END""",
)
# Each guard trigger's name and the statement that made it, which SQLite keeps as written: a
# trigger of the same name that reads otherwise (a no-op put in its place) guards nothing.
GUARD_TRIGGERS = {
    statement.split()[2]: statement
    for statement in SCHEMA
    if statement.startswith("CREATE TRIGGER")
}

def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def chain_hash(prev_hash: str, entry: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + entry).hexdigest()



@dataclass(frozen=True)
class ScopeKey:
    kind: str
    name: str

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"



def token_digest(token_hash: str | None) -> str | None:
    """What the audit log records of a token hash: a digest of it, so that `verify` can tell a
    swapped hash without the log holding what the server compares tokens with."""
    return None if token_hash is None else hashlib.sha256(token_hash.encode()).hexdigest()


def scope_keys(client: str, institution: str | None, dataset: str) -> tuple[ScopeKey, ...]:
    scopes = [ScopeKey("client", client)]
    if institution is not None:
        scopes.append(ScopeKey("institution", institution))
    scopes.append(ScopeKey("dataset", dataset))
    return tuple(scopes)
