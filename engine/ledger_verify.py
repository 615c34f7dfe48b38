"""Verifying a ledger: its audit log's hash chain, replayed against every table.

`verify` walks the chain, replays the budget movements the entries record (each must start where
the one before ended and stay within its cap) and the administrative changes (registrations,
caps, tokens, revocations), and reconciles the totals, the charges, the stored release bytes,
the client registry, the institution caps and the meta rows with them. `registry_problems` is
the part `Ledger.open` runs before serving: the server acts on the registry.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple

from engine.ledger_format import (
    ADMIN_EVENTS,
    CHARGE_TIMES_FROM_ENTRIES,
    ENTRY_FIELDS,
    GENESIS_HASH,
    GUARD_TRIGGERS,
    chain_hash,
    scope_keys,
    token_digest,
)
from engine.loss import format_amount, parse_amount
from engine.release import Release

_ZERO = Fraction(0)


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `Ledger.verify`: the first broken or missing entry, and every problem."""

    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None
    problems: tuple[str, ...]

    @property
    def message(self) -> str:
        if self.ok:
            return (
                f"ledger verified: {self.entries} audit entries, chain intact, totals, charges, "
                f"stored releases and registry reconcile; head {self.head_seq}:{self.head_hash}"
            )
        return f"ledger verification FAILED: {self.problems[0]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head": f"{self.head_seq}:{self.head_hash}",
            "first_bad_seq": self.first_bad_seq,
            "problems": list(self.problems),
            "message": self.message,
        }





def verify(conn: sqlite3.Connection, expect_head: str | None) -> VerifyResult:
    """Walk the audit log's chain (against `expect_head`, "SEQ:HASH", when given), replay its
    entries, and reconcile every table with them: each column of a charge or a stored release
    that an entry, or the release's own bytes, records must be the one recorded."""
    problems: list[str] = []
    first_bad: int | None = None

    def broken(seq: int, message: str) -> None:
        nonlocal first_bad
        if first_bad is None:
            first_bad = seq
        problems.append(f"entry {seq}: {message}")

    tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master")}
    if "audit" not in tables or "meta" not in tables:
        return VerifyResult(False, 0, 0, GENESIS_HASH, None, ("this is not a veil ledger",))

    expected_seq, prev = 1, GENESIS_HASH
    count = 0
    running: dict[str, tuple[Fraction, Fraction]] = {}
    registry = _Registry()
    by_charge: dict[str, list[dict[str, Any]]] = defaultdict(list)
    # The entry from which charges are dated with their entries (None: none of them is).
    dated_from: int | None = None
    cursor = conn.execute(
        "SELECT seq, CAST(entry AS BLOB), prev_hash, hash FROM audit ORDER BY seq"
    )
    for seq, blob, prev_hash, digest in cursor:
        count += 1
        data = bytes(blob)
        if seq != expected_seq:
            if seq > expected_seq:
                missing = (
                    f"entry {expected_seq} is missing"
                    if seq == expected_seq + 1
                    else f"entries {expected_seq} to {seq - 1} are missing"
                )
                broken(expected_seq, f"{missing} (the log jumps to entry {seq})")
            else:
                broken(seq, f"is out of order (after entry {expected_seq - 1})")
        if prev_hash != prev:
            broken(seq, "does not bind the entry before it (its prev_hash does not match)")
        if chain_hash(str(prev_hash), data) != digest:
            broken(seq, "has been altered (its hash does not match its content)")
        entry: dict[str, Any] | None
        try:
            parsed = json.loads(data.decode("ascii"))
            entry = parsed if isinstance(parsed, dict) else None
        except (UnicodeDecodeError, ValueError):
            entry = None
        if entry is None:
            broken(seq, "is not a readable entry")
        else:
            if entry.get("seq") != seq:
                broken(seq, f"is out of place (its content says it is entry {entry.get('seq')})")
            if set(entry) != set(ENTRY_FIELDS):
                broken(seq, "does not have the fields of an audit entry")
            else:
                _replay_budget(seq, entry, running, problems)
                _replay_registry(seq, entry, registry, problems)
                if entry.get("charge_id"):
                    by_charge[str(entry["charge_id"])].append(entry)
                if dated_from is None and _dates_charges(entry):
                    dated_from = seq
        prev = str(digest)
        expected_seq = seq + 1

    last_seq = expected_seq - 1
    head = conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
    head_seq, head_hash = (0, GENESIS_HASH)
    if head is not None:
        seq_text, _, head_hash = str(head[0]).partition(":")
        head_seq = int(seq_text) if seq_text.isdigit() else -1
    if head_seq > last_seq:
        broken(
            last_seq + 1,
            f"is missing: the log ends at entry {last_seq} but the ledger recorded entry "
            f"{head_seq} as its head (entries were removed from the end)",
        )
    elif head_seq < last_seq:
        broken(head_seq + 1, f"follows the ledger's recorded head {head_seq} (entries were added)")
    elif head_hash != prev:
        broken(last_seq, "is not the head the ledger recorded (the log was rewritten)")
    if expect_head is not None:
        seq_text, _, want = expect_head.partition(":")
        row = (
            conn.execute("SELECT hash FROM audit WHERE seq = ?", (int(seq_text),)).fetchone()
            if seq_text.isdigit()
            else None
        )
        if row is None or row[0] != want:
            broken(
                int(seq_text) if seq_text.isdigit() else 0,
                f"does not match the expected head {expect_head} (the log was truncated or "
                f"rewritten since that head was recorded)",
            )

    try:
        _reconcile(conn, running, by_charge, dated_from, problems)
    except (ArithmeticError, ValueError, TypeError, KeyError) as exc:
        problems.append(f"the ledger's tables cannot be reconciled: {exc}")
    problems.extend(_registry_difference(conn, registry))
    triggers = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
    for trigger, statement in GUARD_TRIGGERS.items():
        if trigger not in triggers:
            problems.append(f"the guard trigger {trigger} has been removed")
        elif triggers[trigger] != statement:
            problems.append(
                f"the guard trigger {trigger} has been replaced by one that reads otherwise"
            )
    for trigger in sorted(set(triggers) - set(GUARD_TRIGGERS)):
        problems.append(f"a trigger the ledger never makes has been added: {trigger!r}")
    return VerifyResult(
        ok=not problems,
        entries=count,
        head_seq=last_seq,
        head_hash=prev,
        first_bad_seq=first_bad,
        problems=tuple(problems),
    )


def registry_problems(conn: sqlite3.Connection) -> list[str]:
    """Where the clients, institution caps and meta rows differ from what the audit log's
    administrative entries set.

    The whole chain is walked (each entry's hash, and its link to the one before), so that an
    administrative entry cannot be rewritten, with its own hash recomputed, on its own; only
    those entries are parsed. A log rewritten end to end is found only against a head kept
    elsewhere (`veil ledger verify --expect-head`).
    """
    rows = conn.execute(
        "SELECT seq, CAST(entry AS BLOB), prev_hash, hash, "
        "CASE WHEN json_valid(entry) THEN json_extract(entry, '$.event') END "
        "FROM audit ORDER BY seq"
    )
    registry, problems = _Registry(), []
    expected_seq, prev = 1, GENESIS_HASH
    for seq, blob, prev_hash, digest, event in rows:
        data = bytes(blob)
        if seq != expected_seq or prev_hash != prev or chain_hash(prev, data) != digest:
            problems.append(f"entry {seq} has been altered, moved or unbound from the chain")
            return problems
        if event in _REGISTRY_EVENTS:
            _replay_registry(seq, json.loads(data), registry, problems)
        expected_seq, prev = seq + 1, str(digest)
    return problems or _registry_difference(conn, registry)


def totals_problems(conn: sqlite3.Connection) -> list[str]:
    """Where the running totals differ from what the audit log's last budget movement of each
    scope left (caps are enforced against the totals). The chain itself is `registry_problems`'s
    to walk; this reads each entry's budget movements with SQLite's own JSON functions."""
    rows = conn.execute(
        "SELECT json_extract(b.value, '$.scope'), json_extract(b.value, '$.after.spent'), "
        "json_extract(b.value, '$.after.held') "
        "FROM audit a, json_each(CASE WHEN json_valid(a.entry) "
        "AND json_type(a.entry, '$.budget') = 'array' THEN a.entry END, '$.budget') b "
        "ORDER BY a.seq, b.key"
    )
    logged: dict[str, tuple[Any, Any]] = {}
    for scope, spent, held in rows:
        logged[str(scope)] = (_table_amount(spent), _table_amount(held))
    totals = {
        f"{kind}:{name}": (_table_amount(spent), _table_amount(held))
        for kind, name, spent, held in conn.execute("SELECT kind, name, spent, held FROM totals")
    }
    problems = []
    for label in sorted(set(logged) | set(totals)):
        if totals.get(label, (_ZERO, _ZERO)) != logged.get(label, (_ZERO, _ZERO)):
            problems.append(f"{label}: the totals differ from what the audit log records")
    return problems


def releases_problems(conn: sqlite3.Connection) -> list[str]:
    """Stored releases that no `release` entry of the audit log records as they are: a row
    copied in from another ledger, or one whose query, data version, loss or hash was changed,
    would be handed out as a free replay. What decides a replay is compared (not the bytes,
    which are checked against the hash whenever they are served); the chain is
    `registry_problems`' to walk."""
    logged = set(
        conn.execute(
            "SELECT json_extract(entry, '$.release_id'), json_extract(entry, '$.release_sha256'), "
            "json_extract(entry, '$.fingerprint'), json_extract(entry, '$.data_version'), "
            "json_extract(entry, '$.charge') "
            "FROM audit WHERE json_valid(entry) AND json_extract(entry, '$.event') = 'release'"
        )
    )
    stored = conn.execute(
        "SELECT release_id, sha256, fingerprint, data_version, loss FROM releases ORDER BY rowid"
    )
    return [
        f"release {row[0]}: stored otherwise than the audit log records it, or not recorded"
        for row in stored
        if tuple(row) not in logged
    ]


def _replay_budget(
    seq: int,
    entry: dict[str, Any],
    running: dict[str, tuple[Fraction, Fraction]],
    problems: list[str],
) -> None:
    """Each budget movement must start where the one before it ended, and stay within its cap."""
    moved = (_ZERO, _ZERO)
    for item in entry.get("budget") or []:
        try:
            scope = str(item["scope"])
            before = (parse_amount(item["before"]["spent"]), parse_amount(item["before"]["held"]))
            after = (parse_amount(item["after"]["spent"]), parse_amount(item["after"]["held"]))
            cap = None if item["cap"] is None else parse_amount(item["cap"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError, ArithmeticError):
            problems.append(f"entry {seq}: its budget record is unreadable")
            continue
        if before != running.get(scope, (_ZERO, _ZERO)):
            problems.append(
                f"entry {seq}: {scope} starts from a budget the entries before it do not end at"
            )
        if min(*before, *after) < 0:
            problems.append(f"entry {seq}: {scope} records a negative amount")
        if cap is not None and after[0] + after[1] > cap:
            problems.append(f"entry {seq}: {scope} is past its cap of {format_amount(cap)}")
        delta = (after[0] - before[0], after[1] - before[1])
        charge = entry.get("charge")
        event = entry.get("event")
        if event == "reserve" and (charge is None or delta != (_ZERO, parse_amount(charge))):
            problems.append(f"entry {seq}: {scope} does not hold the reserved charge")
        if event in ("release", "forfeit") and (
            charge is None or delta != (parse_amount(charge), -parse_amount(charge))
        ):
            problems.append(f"entry {seq}: {scope} does not turn the hold into the charge")
        moves = ("reserve", "release", "forfeit", "cancel", "abandon", "upgrade")
        if event not in moves and delta != (_ZERO, _ZERO):
            problems.append(f"entry {seq}: {scope} changes in an event that spends nothing")
        moved = (moved[0] + delta[0], moved[1] + delta[1])
        running[scope] = after
    if entry.get("event") == "upgrade" and moved != (_ZERO, _ZERO):
        # An upgrade only moves totals between scopes: what leaves one must arrive in another.
        problems.append(f"entry {seq}: the upgrade does not carry every amount over")


# Administrative entries: they set the client registry, the institution caps and the meta rows.
_REGISTRY_EVENTS = ADMIN_EVENTS | {"create", "upgrade"}
# Entries that only a registered, active client's request writes.
_SPENDING_EVENTS = frozenset({"reserve", "release", "replay", "retry"})
# A token the log says was set without recording a digest of it (entries written before it did).
_SOME_TOKEN = "set"
_CLIENT_FIELDS = ("role", "institution", "cap", "token_hash", "token_expires_at", "status")


@dataclass
class _Registry:
    """The client registry, institution caps and meta rows as the audit log's entries set them."""

    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    institutions: dict[str, Fraction] = field(default_factory=dict)
    meta: dict[str, str | None] = field(
        default_factory=lambda: dict.fromkeys(("accounting", "delta", "dataset", "dataset_cap"))
    )
    # Schema 1 only: data versions given a cap of their own (the upgrade drops them).
    version_caps: dict[str, Fraction] = field(default_factory=dict)

    def cap(self, kind: str, name: str) -> Fraction | str | None:
        if kind == "client":
            return self.clients.get(name, {}).get("cap")
        if kind == "institution":
            return self.institutions.get(name)
        return self.version_caps.get(name, _table_amount(self.meta["dataset_cap"]))


def _replay_registry(
    seq: int, entry: dict[str, Any], registry: _Registry, problems: list[str]
) -> None:
    """Apply an administrative entry to `registry`. Every entry's caps must be the ones the
    entries before it set, and only a registered, active client can spend: a registry edited
    for a while and put back leaves its mark in the entries written meanwhile."""
    event = entry.get("event")
    if event in _REGISTRY_EVENTS:
        try:
            _apply_admin(seq, entry, registry, problems)
        except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError):
            problems.append(f"entry {seq}: its {event} record is unreadable")
            return
    client = entry.get("client")
    if event in _SPENDING_EVENTS:
        status = registry.clients.get(str(client), {}).get("status", "not registered")
        if status != "active":
            problems.append(
                f"entry {seq}: a {event} for client {client}, whom the audit log records as "
                f"{status}"
            )
    if event == "upgrade":
        return  # it carries the caps of the open that upgrades, set by the entries after it
    for item in entry.get("budget") or []:
        try:
            kind, _, name = str(item["scope"]).partition(":")
            recorded = None if item["cap"] is None else parse_amount(item["cap"])
        except (KeyError, TypeError, ValueError, ArithmeticError):
            continue  # `_replay_budget` reports an unreadable budget record
        expected = registry.cap(kind, name)
        if recorded != expected:
            problems.append(
                f"entry {seq}: {item['scope']} records a cap of {_shown(recorded)}; the "
                f"administrative entries before it set {_shown(expected)}"
            )


def _apply_admin(
    seq: int, entry: dict[str, Any], registry: _Registry, problems: list[str]
) -> None:
    event, client = entry["event"], entry["client"]
    detail = entry["detail"] or {}
    if event == "create":
        registry.meta.update(
            accounting=detail["accounting"],
            delta=detail["delta"],
            dataset=detail.get("dataset"),  # schema 1 named it at the upgrade
            dataset_cap=detail["dataset_cap"],
        )
    elif event == "upgrade":
        registry.meta["dataset"] = detail["dataset"]
        registry.version_caps.clear()
    elif event == "set_delta":
        registry.meta["delta"] = detail["after"]
    elif event == "set_dataset_cap":
        if "after" in detail:
            registry.meta["dataset_cap"] = detail["after"]
        else:  # schema 1: a cap of one data version's own
            (item,) = entry["budget"]
            registry.version_caps[str(item["scope"]).partition(":")[2]] = parse_amount(item["cap"])
    elif event == "set_institution_cap":
        (item,) = entry["budget"]
        kind, _, name = str(item["scope"]).partition(":")
        if kind != "institution":
            raise ValueError(kind)
        if item["cap"] is None:
            registry.institutions.pop(name, None)
        else:
            registry.institutions[name] = parse_amount(item["cap"])
    elif event == "register_client":
        if client in registry.clients:
            problems.append(f"entry {seq}: client {client} is registered a second time")
        registry.clients[client] = {
            "role": detail["role"],
            "institution": detail["institution"],
            "cap": _entry_cap(entry),
            "token_hash": _logged_token(detail["token"] == "set", detail),
            "token_expires_at": detail.get("token_expires_at"),  # schema 1: never expires
            "status": "active",
        }
    elif client not in registry.clients:
        problems.append(f"entry {seq}: client {client} is changed before it is registered")
    elif event == "set_cap":
        registry.clients[client]["cap"] = _entry_cap(entry)
    elif event == "set_token":
        registry.clients[client].update(
            token_hash=_logged_token(entry["outcome"] == "set", detail),
            token_expires_at=detail.get("token_expires_at"),
        )
    elif event == "revoke":
        registry.clients[client]["status"] = "revoked"


def _entry_cap(entry: dict[str, Any]) -> Fraction:
    (item,) = [i for i in entry["budget"] if i["scope"] == f"client:{entry['client']}"]
    return parse_amount(item["cap"])


def _logged_token(is_set: bool, detail: dict[str, Any]) -> str | None:
    if not is_set:
        return None
    return str(detail["token_digest"]) if "token_digest" in detail else _SOME_TOKEN


def _shown(value: object) -> str:
    if value is None:
        return "none"
    return format_amount(value) if isinstance(value, Fraction) else str(value)


def _registry_difference(conn: sqlite3.Connection, registry: _Registry) -> list[str]:
    """Where the clients, institutions and meta tables differ from what the log set."""
    problems: list[str] = []
    logged = dict(registry.clients)
    rows = conn.execute(
        "SELECT client_id, role, institution, cap, token_hash, token_expires_at, status, "
        "revoked_at FROM clients ORDER BY client_id"
    ).fetchall()
    for client_id, role, institution, cap, token_hash, expires, status, revoked_at in rows:
        want = logged.pop(client_id, None)
        if want is None:
            problems.append(f"client {client_id}: in the registry but never registered in the log")
            continue
        token = token_hash if token_hash is None else token_digest(token_hash)
        if token is not None and want["token_hash"] == _SOME_TOKEN:
            token = _SOME_TOKEN  # the log recorded that a token was set, not which
        have = {
            "role": role,
            "institution": institution,
            "cap": _table_amount(cap),
            "token_hash": token,
            "token_expires_at": expires,
            "status": status,
        }
        for name in _CLIENT_FIELDS:
            if have[name] == want[name]:
                continue
            if name == "token_hash":  # a digest shown is no help; say what differs
                problems.append(f"client {client_id}: its token hash is not the one logged")
            else:
                problems.append(
                    f"client {client_id}: its {name} is {_shown(have[name])} in the registry; "
                    f"the audit log records {_shown(want[name])}"
                )
        if (status == "revoked") != (revoked_at is not None):
            problems.append(f"client {client_id}: its revoked_at does not match its status")
    for client_id in sorted(logged):
        problems.append(f"client {client_id}: registered in the log but not in the registry")

    caps = {
        str(r[0]): _table_amount(r[1])
        for r in conn.execute("SELECT institution, cap FROM institutions")
    }
    for name in sorted(set(caps) | set(registry.institutions)):
        have_cap, want_cap = caps.get(name), registry.institutions.get(name)
        if have_cap != want_cap:
            problems.append(
                f"institution {name}: its cap is {_shown(have_cap)} in the registry; the audit "
                f"log records {_shown(want_cap)}"
            )

    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    for key, logged_value in registry.meta.items():
        value = meta.get(key)
        if key in ("delta", "dataset_cap"):
            same = _table_amount(value) == _table_amount(logged_value)
        else:
            same = value == logged_value
        if not same:
            problems.append(
                f"meta {key}: {_shown(value)} in the ledger; the audit log records "
                f"{_shown(logged_value)}"
            )
    return problems


def _table_amount(text: Any) -> Fraction | str | None:
    """A stored amount; its text as it is when it is not one (it then matches nothing logged)."""
    try:
        return None if text is None else parse_amount(text)
    except (ArithmeticError, ValueError, TypeError):
        return str(text)


# What an entry written by an older version does not record: its column is compared with nothing.
_UNRECORDED: Any = object()
# The columns of the charges and releases tables that `verify` checks (not `reserved_at`, nor
# the stored bytes themselves, which are checked against `sha256`).
_CHARGE_COLUMNS = (
    "charge_id",
    "client",
    "institution",
    "request_id",
    "kind",
    "fingerprint",
    "canonical_query",
    "data_version",
    "requested",
    "amount",
    "state",
    "release_id",
    "reserved_at",
    "settled_at",
    "reason",
)
_RELEASE_COLUMNS = (
    "release_id",
    "charge_id",
    "client",
    "fingerprint",
    "canonical_query",
    "data_version",
    "loss",
    "created_at",
    "sha256",
)
# The columns a stored release's own metadata records, in the order they are reported.
_RELEASE_META_COLUMNS = (
    "release_id",
    "charge_id",
    "fingerprint",
    "canonical_query",
    "data_version",
    "loss",
    "created_at",
)


class _Stored(NamedTuple):
    """What the charges' checks need of a stored release (not its bytes: a ledger can be large)."""

    sha256: str
    created_at: Any  # as its bytes record it; `_UNRECORDED` when they cannot be read


def _carried(value: Any) -> Any:
    """An entry's field, or `_UNRECORDED` where the entry holds null (older versions did)."""
    return _UNRECORDED if value is None else value


def _differences(
    label: str,
    have: dict[str, Any],
    want: dict[str, Any],
    source: str,
    skip: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """A problem for each column (not in `skip`) whose value in the ledger is not the one
    `source` records, by column."""
    return {
        column: f"{label}: its {column} is {_shown(have[column])} in the ledger; {source} "
        f"{_shown(value)}"
        for column, value in want.items()
        if value is not _UNRECORDED and column not in skip and have[column] != value
    }


def _logged_institution(entry: dict[str, Any]) -> Any:
    """The institution whose budget an entry moved (None: the client has none)."""
    budget = entry.get("budget")
    if not isinstance(budget, list):
        return _UNRECORDED
    names = [
        str(item.get("scope")).partition(":")[2]
        for item in budget
        if isinstance(item, dict) and str(item.get("scope")).startswith("institution:")
    ]
    if len(names) > 1:
        return _UNRECORDED  # `_replay_budget` and the totals speak to a malformed record
    return names[0] if names else None


def _check_releases(
    conn: sqlite3.Connection, released: dict[str, dict[str, Any]], problems: list[str]
) -> dict[str, _Stored]:
    """Check every stored release's row against its `release` entry and its bytes' metadata."""
    stored: dict[str, _Stored] = {}
    cursor = conn.execute(f"SELECT {', '.join(_RELEASE_COLUMNS)}, bytes FROM releases")
    for *row, blob in cursor:
        have = dict(zip(_RELEASE_COLUMNS, row, strict=True))
        release_id, data = str(have["release_id"]), bytes(blob)
        label = f"release {release_id}"
        entry = released.get(release_id)
        logged: dict[str, str] = {}
        if entry is None:
            problems.append(f"{label}: stored without a release entry in the audit log")
        else:
            # The entry is in the chain: what it records of the release is its true value.
            want = {
                column: _carried(entry.get(column))
                for column in ("charge_id", "client", "fingerprint", "canonical_query",
                               "data_version")
            }
            want["sha256"] = _carried(entry.get("release_sha256"))
            logged = _differences(label, have, want, "the audit log records")
            problems.extend(logged.values())
        created: Any = _UNRECORDED
        if hashlib.sha256(data).hexdigest() != have["sha256"]:
            problems.append(f"{label}: its stored bytes do not match their hash")
        else:
            try:
                meta = Release.from_bytes(data).metadata
            except Exception:
                problems.append(f"{label}: its stored bytes cannot be read")
            else:
                # The bytes are bound to the log by their hash: their metadata is true too. A
                # column already found to differ from the log is not reported twice.
                recorded = {column: getattr(meta, column) for column in _RELEASE_META_COLUMNS}
                if not recorded["created_at"]:
                    recorded["created_at"] = _UNRECORDED  # stored before releases were dated
                created = recorded["created_at"]
                problems.extend(
                    _differences(
                        label, have, recorded, "its stored bytes record", frozenset(logged)
                    ).values()
                )
        stored[release_id] = _Stored(str(have["sha256"]), created)
    return stored


def _dates_charges(entry: dict[str, Any]) -> bool:
    """Whether the entry is the open after which charges are dated with their entries."""
    detail = entry.get("detail")
    return (
        entry.get("event") == "open"
        and isinstance(detail, dict)
        and detail.get("charge_times") == CHARGE_TIMES_FROM_ENTRIES
    )


def _reconcile(
    conn: sqlite3.Connection,
    running: dict[str, tuple[Fraction, Fraction]],
    by_charge: dict[str, list[dict[str, Any]]],
    dated_from: int | None,
    problems: list[str],
) -> None:
    """Totals == the log's replay == the sums of the charges; every charge and release logged,
    each column of theirs as the entries (or the release's own bytes) record it."""
    (dataset,) = conn.execute("SELECT value FROM meta WHERE key = 'dataset'").fetchone()
    totals: dict[str, tuple[Fraction, Fraction]] = {}
    for kind, name, spent, held in conn.execute("SELECT kind, name, spent, held FROM totals"):
        totals[f"{kind}:{name}"] = (parse_amount(spent), parse_amount(held))
    sums: dict[str, list[Fraction]] = defaultdict(lambda: [_ZERO, _ZERO])
    released = {
        str(e.get("release_id")): e
        for entries in by_charge.values()
        for e in entries
        if e.get("event") == "release"
    }
    # Reported after the charges', as before; read first, for the times committed charges settled.
    release_problems: list[str] = []
    releases = _check_releases(conn, released, release_problems)
    charged_releases: set[str] = set()
    rows = conn.execute(
        f"SELECT {', '.join(_CHARGE_COLUMNS)} FROM charges ORDER BY rowid"
    ).fetchall()
    for row in rows:
        have = dict(zip(_CHARGE_COLUMNS, row, strict=True))
        charge_id, client, institution = have["charge_id"], have["client"], have["institution"]
        kind, amount_text, state = have["kind"], have["amount"], have["state"]
        release_id = have["release_id"]
        amount = parse_amount(amount_text)
        for scope in scope_keys(client, institution, str(dataset)):
            if state == "committed":
                sums[scope.label][0] += amount
            elif state == "reserved":
                sums[scope.label][1] += amount
        events = {str(e["event"]): e for e in by_charge.get(charge_id, [])}
        problems.extend(_charge_problems(have, events, releases, dated_from))
        if kind == "replay":
            if amount != 0:
                problems.append(f"charge {charge_id}: a replay was charged")
            if release_id not in releases:
                problems.append(f"charge {charge_id}: replays a release that is not stored")
            continue
        if state == "committed" and release_id is None:
            entry = events.get("forfeit")
            if entry is None:
                problems.append(f"charge {charge_id}: committed with no release and no forfeit")
            elif entry.get("charge") != amount_text:
                problems.append(f"charge {charge_id}: its forfeit differs from the audited one")
        elif state == "committed":
            charged_releases.add(str(release_id))
            entry = events.get("release")
            stored = releases.get(str(release_id))
            if entry is None or entry.get("release_id") != release_id:
                problems.append(f"charge {charge_id}: its release has no matching audit entry")
            elif stored is None:
                problems.append(f"charge {charge_id}: its release {release_id} is not stored")
            elif (
                entry.get("release_sha256") != stored.sha256
                or entry.get("charge") != amount_text
            ):
                problems.append(f"charge {charge_id}: its release differs from the audited one")
    known = {str(r[0]) for r in rows}
    for charge_id in sorted(set(by_charge) - known):
        problems.append(f"charge {charge_id}: audited but missing from the ledger")

    problems.extend(release_problems)
    for release_id in releases:
        if release_id not in charged_releases:
            problems.append(f"release {release_id}: stored without a committed charge")

    labels = set(totals) | set(running) | set(sums)
    for label in sorted(labels):
        table = totals.get(label, (_ZERO, _ZERO))
        from_log = running.get(label, (_ZERO, _ZERO))
        from_charges = tuple(sums[label]) if label in sums else (_ZERO, _ZERO)
        if table != from_log:
            problems.append(f"{label}: the totals differ from what the audit log records")
        if table != from_charges:
            problems.append(f"{label}: the totals differ from the sum of its charges")


def _charge_problems(
    have: dict[str, Any],
    events: dict[str, dict[str, Any]],
    releases: dict[str, _Stored],
    dated_from: int | None,
) -> list[str]:
    """Where a charge's row differs from the entries that made and settled it.

    A charge is made by its `reserve` entry (or, for a free replay, its `replay` entry), which
    records who asked, for what, on which data and at what price; a `release`, `forfeit`,
    `cancel` or `abandon` entry settles it. A committed release's `settled_at` is its release's
    `created_at`. Made after the entry `dated_from` (see `CHARGE_TIMES_FROM_ENTRIES`), its
    `reserved_at`, and the `settled_at` of a cancelled or forfeited charge or a replay, are the
    times of the entries that made and settled it; before it the ledger took them from a clock
    read of their own, recorded nowhere else.
    """
    label = f"charge {have['charge_id']}"
    replay, reserve = events.get("replay"), events.get("reserve")
    origin = replay if replay is not None else reserve
    if origin is None:
        if have["kind"] == "replay":
            return [f"{label}: the replay has no audit entry"]
        return [f"{label}: its reservation has no matching audit entry"]
    release = events.get("release")
    cancel = events.get("cancel", events.get("abandon"))
    forfeit = events.get("forfeit")
    if sum(e is not None for e in (release, cancel, forfeit)) > 1:
        return [f"{label}: the audit log settles it more than once"]
    want: dict[str, Any] = {
        column: _carried(origin.get(column))
        for column in ("client", "request_id", "fingerprint", "canonical_query", "data_version")
    }
    want["institution"] = _logged_institution(origin)
    want["kind"] = "charge" if replay is None else "replay"
    want["amount"] = _carried(origin.get("charge"))
    if replay is None:
        want["requested"] = want["amount"]  # a charge is for what was asked
        settled = {"committed": release or forfeit, "cancelled": cancel}
        want["state"] = next((s for s, e in settled.items() if e is not None), "reserved")
    else:
        detail = replay.get("detail")
        want["requested"] = _carried(detail.get("requested") if isinstance(detail, dict) else None)
        want["state"] = "committed"  # a replay is settled as it is made
    settler = replay if replay is not None else release
    want["release_id"] = None if settler is None else _carried(settler.get("release_id"))
    stopper = cancel if cancel is not None else forfeit
    want["reason"] = None if stopper is None else _carried(stopper.get("outcome"))
    if dated_from is not None and isinstance(origin.get("seq"), int) and origin["seq"] > dated_from:
        want["reserved_at"] = _carried(origin.get("time"))
        settled_by = replay if replay is not None else stopper
        if settled_by is not None:
            want["settled_at"] = _carried(settled_by.get("time"))
    if want["state"] == "reserved":
        want["settled_at"] = None  # not settled, as far as the log knows
    problems = list(_differences(label, have, want, "the audit log records").values())
    if release is not None and "settled_at" not in want:
        # Settled by its release, and dated with it: by the time the release's bytes record.
        stored = releases.get(str(have["release_id"]))
        dated = {"settled_at": _UNRECORDED if stored is None else stored.created_at}
        problems.extend(
            _differences(label, have, dated, "its release's stored bytes record").values()
        )
    return problems
