"""The privacy-budget ledger: exact, durable, race-free charges, stored releases, an audit log.

The ledger is the only module that writes the ledger database, a SQLite file of its own (WAL
journal; every transaction that must be durable is synced to disk before it returns), apart from
the read-only data file. It implements the `Charger` side of the release seam:

    ledger = Ledger.open("ledger.sqlite", accounting=Accounting.PURE_DP, dataset_cap="10",
                         dataset=engine.dataset, data_version=engine.data_version)
    ledger.register_client("alice", role="researcher", institution="iom", cap="2")
    release = engine.release(query, loss=loss, charger=ledger, client="alice", request_id="r-1")

A request goes through `reserve` (check every cap and hold the charge), the engine's computation,
then `commit` (store the release bytes, turn the hold into a charge and append the audit entry,
in one transaction, synced to disk); only then is the release handed out. A failure in between
cancels the hold, and a hold left by a crash (or lost to a power cut: holds are not synced on
their own) is cancelled when the ledger is next opened: nothing was handed out, so giving the
budget back is safe. Nothing leaves without its charge on disk.

- Budgets are exact rationals, stored as `format_amount` text and compared as `Fraction`. Caps
  exist per client, per institution (optional) and for the dataset; a held reservation counts
  against every cap until it is committed or cancelled.
- A ledger keeps the budget of one dataset, named when the ledger is created (the name its data
  files record). Every data version served through it (a corrected file, next year's update)
  is paid for from that one dataset cap: the same people are in each.
- Every charge runs in a `BEGIN IMMEDIATE` transaction, so concurrent reservations serialise on
  the database's write lock (one connection per thread) and a cap can never be overrun.
- A retry with the same (client, request id) returns the stored release byte for byte with no
  second charge; the same id with a different query or loss is refused.
- A query whose canonical fingerprint matches a release already made on the same data version,
  at a loss at least as large as the one asked for, gets that stored release at zero charge, to
  any client. While one request for a (fingerprint, data version) is being computed, others for
  it wait and then replay, so no two fresh draws of one query ever exist side by side.
- The audit log lives in the same file and is written in the same transactions. Each entry is
  canonical JSON and is hash-chained to the one before it; `verify` walks the chain, replays the
  budget movements it records and reconciles them with the totals, the charges and the stored
  release bytes, and replays the administrative changes against the client registry, the
  institution caps and the meta rows (which `open` checks too, before serving, with the
  running totals the caps are enforced against). Entries hold
  ids, canonical queries, amounts and hashes (of a token hash, a digest), never a true value.
- The tables and the entries' format are in `engine.ledger_format`, the verification in
  `engine.ledger_verify`.
- One process writes a ledger at a time (an exclusive lock on `<ledger>.lock`); any number may
  read it with `Ledger.open_readonly`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

from engine import ledger_verify
from engine.errors import (
    BudgetExceededError,
    ClientRegistryError,
    InvalidLossError,
    LedgerIntegrityError,
    LedgerUnavailableError,
    RequestConflictError,
    RevokedClientError,
    UnknownClientError,
    VeilError,
)
from engine.ledger_format import (
    CHARGE_TIMES_FROM_ENTRIES,
    ENTRY_FIELDS,
    GENESIS_HASH,
    INDEXES,
    LEDGER_EVENTS,
    LOCAL_ACTOR_PREFIX,
    SCHEMA,
    SCHEMA_VERSION,
    ScopeKey,
    canonical_json,
    chain_hash,
    scope_keys,
    token_digest,
)
from engine.ledger_verify import (
    VerifyResult,
    registry_problems,
    releases_problems,
    totals_problems,
)
from engine.loss import (
    Accounting,
    Number,
    epsilon_equivalent,
    exact_amount,
    exact_cap,
    format_amount,
    parse_amount,
)
from engine.planner import Plan
from engine.release import Answer, Release, ReleaseMetadata, replays

ROLES = ("researcher", "auditor", "admin")
SCOPE_KINDS = ("client", "institution", "dataset")
# Where a test's `hooks` callable is called, with the point's name (to inject a crash there).
HOOK_POINTS = ("after_reserve", "after_compute", "after_commit")

Hooks = Callable[[str], None]
T = TypeVar("T")

_ZERO = Fraction(0)
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+/-]{0,127}$")
_EVENT = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HASH_TEXT = re.compile(r"^\S{32,512}$")



# ---- values ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRecord:
    """A registered client. The token hash is stored for the server, which checks tokens."""

    client_id: str
    role: str
    institution: str | None
    cap: Fraction
    status: str  # "active" or "revoked"
    token_hash: str | None
    created_at: str
    revoked_at: str | None
    token_expires_at: str | None = None  # None: the token does not expire

    @property
    def active(self) -> bool:
        return self.status == "active"

    def token_expired(self, now: datetime | None = None) -> bool:
        """Whether the client's token has passed its expiry (`now` defaults to the clock)."""
        if self.token_expires_at is None:
            return False
        expiry = datetime.fromisoformat(self.token_expires_at.replace("Z", "+00:00"))
        return (now or datetime.now(UTC)) >= expiry


@dataclass(frozen=True)
class ScopeBudget:
    """Spending against one cap: a client, an institution or one data version of the dataset.

    `spent` is committed charges; `held` is reservations not yet settled, which count against
    the cap too. An institution without a cap of its own has `cap` None.
    """

    kind: str
    name: str
    cap: Fraction | None
    spent: Fraction
    held: Fraction

    @property
    def used(self) -> Fraction:
        return self.spent + self.held

    @property
    def remaining(self) -> Fraction | None:
        return None if self.cap is None else max(_ZERO, self.cap - self.used)

    def to_dict(self, accounting: Accounting, delta: float) -> dict[str, Any]:
        """Exact amounts as text, floats for display, and the (epsilon, delta) equivalents."""
        remaining = self.remaining
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "cap": None if self.cap is None else format_amount(self.cap),
            "spent": format_amount(self.spent),
            "held": format_amount(self.held),
            "remaining": None if remaining is None else format_amount(remaining),
            "cap_float": None if self.cap is None else float(self.cap),
            "spent_float": float(self.spent),
            "remaining_float": None if remaining is None else float(remaining),
        }
        if accounting is Accounting.ZCDP:
            out["spent_epsilon"] = epsilon_equivalent(accounting, self.spent, delta)
            out["cap_epsilon"] = (
                None if self.cap is None else epsilon_equivalent(accounting, self.cap, delta)
            )
        return out


@dataclass(frozen=True)
class ClientBudget:
    """A client's budgets read at one instant: its own, its institution's, the dataset's."""

    active: bool
    scopes: tuple[ScopeBudget, ...]

    def scope(self, kind: str) -> ScopeBudget | None:
        return next((s for s in self.scopes if s.kind == kind), None)

    @property
    def remaining(self) -> Fraction:
        """What the client may still spend: the least remaining of its capped scopes (zero
        once revoked); holds in flight count as used."""
        left = [s.remaining for s in self.scopes if s.remaining is not None]
        return min(left) if self.active and left else _ZERO


@dataclass(frozen=True)
class LedgerReport:
    """Spent and remaining budget for every client and institution, and for the dataset."""

    accounting: Accounting
    delta: float
    clients: tuple[ScopeBudget, ...]
    institutions: tuple[ScopeBudget, ...]
    dataset: ScopeBudget
    head_seq: int
    head_hash: str

    def to_dict(self) -> dict[str, Any]:
        def rows(scopes: tuple[ScopeBudget, ...]) -> list[dict[str, Any]]:
            return [s.to_dict(self.accounting, self.delta) for s in scopes]

        return {
            "accounting": self.accounting.value,
            "unit": self.accounting.unit,
            "delta": self.delta,
            "clients": rows(self.clients),
            "institutions": rows(self.institutions),
            "dataset": self.dataset.to_dict(self.accounting, self.delta),
            "audit_head": f"{self.head_seq}:{self.head_hash}",
        }


@dataclass(frozen=True)
class ReleaseRecord:
    """One stored release: who paid for it, what it cost, how often it was replayed."""

    release_id: str
    charge_id: str
    client: str
    fingerprint: str
    canonical_query: str
    data_version: str
    loss: Fraction
    created_at: str
    sha256: str
    replays: int


@dataclass(frozen=True)
class ChargeRecord:
    """One ledger row: a charge (reserved, committed or cancelled) or a free replay."""

    charge_id: str
    client: str
    institution: str | None
    request_id: str
    kind: str  # "charge" or "replay"
    fingerprint: str
    data_version: str
    requested: Fraction
    amount: Fraction
    state: str
    release_id: str | None
    reserved_at: str
    settled_at: str | None
    reason: str | None


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    entry: dict[str, Any]
    prev_hash: str
    hash: str


# ---- internal helpers --------------------------------------------------------------------------


def _now() -> str:
    return _timestamp(datetime.now(UTC))


def _timestamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise VeilError("a time on the ledger must carry its time zone")
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise VeilError(
            f"{what} must be 1 to 128 letters, digits or . _ @ : + / - (starting with a letter "
            f"or digit), got {value!r}"
        )
    return value


# An institution's name read as a person reads it: case, a zero for an O and punctuation aside,
# `I0M`, `iom` and `I.O.M` are `IOM`. (Not 1 for I or l: UCL and UCI are two universities.)
_PUNCTUATION = re.compile(r"[^a-z0-9]+")


def _folded(name: str) -> str:
    return _PUNCTUATION.sub("", name.casefold().replace("0", "o"))


def _check_institution_spelling(conn: sqlite3.Connection, institution: str) -> None:
    """Refuse a new institution name that is an existing one spelt differently.

    Caps and totals are kept under the exact name, so a client registered as `iom` would escape
    the cap of `IOM`, and a cap set on `iom` would bind none of IOM's clients.
    """
    known = {
        row[0]
        for row in conn.execute(
            "SELECT institution FROM institutions UNION "
            "SELECT institution FROM clients WHERE institution IS NOT NULL"
        )
    }
    if institution in known:
        return
    for other in sorted(known):
        if _folded(other) == _folded(institution):
            raise ClientRegistryError(
                f"institution {institution!r} is {other!r} spelt differently; caps and spending "
                f"are counted under the exact name, so use {other!r}"
            )


def _loss_amount(value: Fraction) -> Fraction:
    return exact_amount(value, what="privacy loss")


_RELEASE_LOSS = "a stored release's loss"


def _stored_amount(text: str, what: str) -> Fraction:
    """An amount read back from the ledger file.

    The ledger writes amounts only through `format_amount`; one that does not parse was
    edited by hand, so the file is refused as altered (LedgerIntegrityError) rather than
    failing as an arithmetic error. The value is not quoted: the message may reach a caller.
    """
    try:
        return parse_amount(text)
    except ValueError as exc:
        raise LedgerIntegrityError(
            f"{what} in the ledger file is not a number: the file was altered since the ledger "
            "wrote it (`veil ledger verify` lists what changed)"
        ) from exc


_SQLITE_REASONS = {
    sqlite3.SQLITE_FULL: "the disk holding the ledger is full",
    sqlite3.SQLITE_IOERR: "the disk holding the ledger reported an I/O error",
    sqlite3.SQLITE_READONLY: "the ledger file is read-only",
    sqlite3.SQLITE_CANTOPEN: "the ledger file cannot be opened",
    sqlite3.SQLITE_PERM: "permission to write the ledger file was denied",
    sqlite3.SQLITE_CORRUPT: "the ledger file is damaged",
    sqlite3.SQLITE_NOTADB: "the file is not a ledger database",
    sqlite3.SQLITE_PROTOCOL: "the ledger's lock protocol failed",
}


def _unavailable(
    exc: sqlite3.Error, what: str, *, busy_timeout: float, releasing: bool = True
) -> LedgerUnavailableError:
    """The ledger's words for a failed SQLite call while it was doing `what`.

    `releasing`: the call served a request, so the caller is told nothing was released (opening
    the ledger at start serves none).
    """
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        reason = f"the ledger stayed locked for more than {busy_timeout:g} s"
    elif primary == sqlite3.SQLITE_CONSTRAINT:
        return LedgerIntegrityError(
            f"cannot {what}: the ledger refused a change that would break its integrity "
            f"({exc}){_NOTHING_RELEASED if releasing else ''}"
        )
    else:
        reason = _SQLITE_REASONS.get(primary or -1, f"the ledger database failed ({exc})")
    return LedgerUnavailableError(
        f"cannot {what}: {reason} ({name}){_NOTHING_RELEASED if releasing else ''}"
    )


_NOTHING_RELEASED = "; nothing was released"
_RESTORE = "nothing more is released until the ledger is restored and reopened"

# The write-ahead log's header: magic, version, page size, checkpoint sequence, salts, checksum.
_LOG_HEADER = 32
# The bytes of the ledger file SQLite's readers lock (SHARED_FIRST, SHARED_SIZE in os_unix.c).
_SHARED_FIRST = 0x40000000 + 2
_SHARED_SIZE = 510


@dataclass(frozen=True)
class _LogMark:
    """The write-ahead log as the ledger's last write left it: which file, how long, its header."""

    device: int
    inode: int
    size: int
    header: bytes


def _log_mark(path: str) -> _LogMark:
    fd = os.open(path, os.O_RDONLY)
    try:
        status = os.fstat(fd)
        header = os.pread(fd, _LOG_HEADER, 0)
    finally:
        os.close(fd)
    return _LogMark(status.st_dev, status.st_ino, status.st_size, header)


def _log_damage(mark: _LogMark, now: _LogMark, *, header: bool) -> str | None:
    """How the log changed from `mark` other than by SQLite's writing (None: it did not).

    `header`: compare the headers too (no write of the ledger's came between the two).
    """
    if (now.device, now.inode) != (mark.device, mark.inode):
        return "was replaced by another file"
    if now.size < mark.size:
        return f"was cut short ({now.size} bytes; the ledger had written {mark.size})"
    if header and now.header != mark.header:
        return "was overwritten (its header changed)"
    return None


@dataclass
class _Outcome:
    """What a reservation transaction decided. Errors are raised after the refusal is audited."""

    error: VeilError | None = None
    stored: bytes | None = None
    charge_id: str | None = None
    scopes: tuple[ScopeKey, ...] = ()


# ---- the reservation ---------------------------------------------------------------------------


class LedgerReservation:
    """A hold on budget for one request (the `Reservation` side of the seam)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        client: str,
        request_id: str,
        fingerprint: str,
        data_version: str,
        amount: Fraction,
        charge_id: str | None = None,
        scopes: tuple[ScopeKey, ...] = (),
        keys: tuple[tuple[str, ...], ...] = (),
        stored: Release | None = None,
    ) -> None:
        self._ledger = ledger
        self.client = client
        self.request_id = request_id
        self.fingerprint = fingerprint
        self.data_version = data_version
        self.amount = amount
        self.charge_id = charge_id
        self._scopes = scopes
        self._keys = keys
        self._stored = stored
        self._state = "stored" if stored is not None else "reserved"

    @property
    def stored(self) -> Release | None:
        """The release already made for this request or query; None when one must be computed."""
        return self._stored

    @property
    def state(self) -> str:
        return self._state

    def commit(self, answer: Answer) -> Release:
        """Store the release and turn the hold into a charge, in one transaction; then return it."""
        if self._state == "stored":
            raise VeilError("this request was answered from a stored release; nothing to commit")
        if self._state != "reserved":
            raise VeilError(f"this reservation is already {self._state}")
        assert self.charge_id is not None
        try:
            self._ledger._hook("after_compute")
            self._check(answer)
            release_id = _new_id("rel")
            release = Release.from_answer(
                answer, release_id=release_id, charge_id=self.charge_id, created_at=_now()
            )
            data = release.to_bytes()
            self._ledger._write(
                "record the charge and the release",
                lambda c: self._ledger._commit_in(c, self, release, data),
            )
        except RevokedClientError:
            self._settle("client_revoked")
            raise
        except BaseException:
            self._settle("commit_failed")
            raise
        self._state = "committed"
        self._ledger._unclaim(self._keys)
        self._ledger._hook("after_commit")
        # It carries the stored bytes, and sends them as every retry and replay of it will.
        return release

    def cancel(self) -> None:
        """Give the held budget back: nothing was released. Safe to call more than once.

        If the ledger cannot be written just now, the hold stays counted against the caps (the
        safe side) and is released by the next transaction that succeeds, or on the next open.
        """
        if self._state == "reserved":
            self._settle("cancelled")

    def forfeit(self, reason: str) -> None:
        """Spend the hold with nothing released: the query was stopped after reading data.

        For a stop the caller sees and whose timing depends on the records (the server's time
        limit): were it free, whether a query runs past the limit could be asked again and
        again. The charge is committed with no release and synced before this returns, so the
        stop may be reported; its request id stays taken. If the ledger cannot be written just
        now, the hold stays counted and is spent by the next transaction that succeeds (a
        restart before then cancels it, as it cancels every hold it finds).
        """
        if self._state == "reserved":
            self._settle(reason, spent=True)

    def _settle(self, reason: str, *, spent: bool = False) -> None:
        if self._state != "reserved":
            return
        self._state = "forfeited" if spent else "cancelled"
        try:
            assert self.charge_id is not None
            self._ledger._settle(self.charge_id, reason, spent=spent)
        finally:
            self._ledger._unclaim(self._keys)

    def _check(self, answer: Answer) -> None:
        meta = answer.metadata
        if (
            meta.fingerprint != self.fingerprint
            or meta.data_version != self.data_version
            or meta.loss != format_amount(self.amount)
            or meta.accounting != self._ledger.accounting.value
        ):
            raise VeilError(
                "the answer does not match its reservation (query, data version, loss or "
                "accounting differ); nothing was released"
            )


# ---- the ledger --------------------------------------------------------------------------------


class Ledger:
    """The durable privacy-budget ledger (the `Charger` side of the seam). Thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        accounting: Accounting,
        delta: float,
        data_version: str | None,
        dataset: str | None,
        hooks: Hooks | None,
        readonly: bool,
        busy_timeout: float,
        wait_timeout: float,
        lock_fd: int | None,
    ) -> None:
        self.path = path
        self.accounting = accounting
        self.delta = delta
        self.data_version = data_version
        # Asked for at open, then what the ledger records (see `_open_in`).
        self.dataset = dataset
        self.readonly = readonly
        self._hooks = hooks
        self._busy_timeout = busy_timeout
        self._wait_timeout = wait_timeout
        self._lock_fd = lock_fd
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        # Why the ledger stopped, after a failed sync or a damaged log: see `_sync`, `_check_log`.
        self._stopped: str | None = None
        # The write-ahead log as the last write left it (None: not written yet), and a lock that
        # keeps SQLite from copying a damaged one into the ledger file on close: see `_check_log`.
        self._log: _LogMark | None = None
        self._log_hold: int | None = None
        self._cond = threading.Condition()
        self._inflight: set[tuple[str, ...]] = set()
        # Settlements not yet written: charge id -> (reason, whether the hold is spent).
        self._pending: dict[str, tuple[str, bool]] = {}
        self._pending_lock = threading.Lock()
        # This process's writers take turns here: a waiter wakes as soon as the ledger is free,
        # where SQLite's busy handler would sleep in growing steps (up to 100 ms). Other
        # processes (an administrator's command) are still kept out by SQLite's own lock.
        self._write_lock = threading.Lock()

    # ---- opening and closing -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        accounting: Accounting | str,
        dataset_cap: Number,
        delta: float = 1e-6,
        dataset: str | None = None,
        data_version: str | None = None,
        hooks: Hooks | None = None,
        busy_timeout: float = 10.0,
        wait_timeout: float = 600.0,
        actor: str | None = None,
        create: bool = True,
        load_id: str | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> Ledger:
        """Open (or, with `create`, create) a ledger for writing; one process at a time.

        Without `create`, a path that holds no ledger (no file, an empty file, a database with
        no tables) is refused rather than started afresh, every budget unspent.

        `load_id` names the load that wrote the data (`Engine.load_id`): a data version served
        before from another load is refused, since its stored releases, drawn from other
        records, would be replayed as this data's. `settings` (the deployment's k, beta and the
        like, as text) are recorded in the audit entry of this open, so that a change between
        starts is on the record.

        `dataset` names the dataset whose budget the ledger keeps (`Engine.dataset`): a new
        ledger needs it and records it, an existing one refuses another (None reads it).
        `dataset_cap` is that dataset's cap, over all its data versions. `delta` is the
        custodian's delta for reporting the (epsilon, delta) equivalent of zCDP budgets.
        `data_version` is charged when `reserve` is not given one. Reservations left open by a
        crash are cancelled here, and audited as abandoned. A change of the dataset cap or of
        delta is audited with `actor` (who opened it). A ledger written by schema version 1 is
        upgraded here, in one audited transaction (see `_upgrade_in`). A ledger whose audit log
        does not end at its recorded head, or whose clients, institution caps or meta rows differ
        from what its administrative entries set, is refused (LedgerIntegrityError).
        """
        accounting = Accounting(accounting)
        if actor is not None:
            _check_name(actor, "acting client")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise InvalidLossError(f"delta must lie in (0, 1), got {delta!r}")
        default_cap = exact_cap(dataset_cap, what="dataset cap")
        if data_version is not None:
            _check_name(data_version, "data version")
        if dataset is not None:
            _check_name(dataset, "dataset")
        # Resolved: a later change of directory must not move the ledger, and a symlink must not
        # either: SQLite writes its log beside the file it points at, where the sync and the
        # one-writer lock (named from this path) must look too.
        path = Path(path).resolve()
        if not create and not path.exists():
            raise LedgerUnavailableError(
                f"there is no ledger at {path}, and this open may not create one: a new ledger "
                f"starts with every budget unspent"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
        ledger = cls(
            path,
            accounting=accounting,
            delta=float(delta),
            data_version=data_version,
            dataset=dataset,
            hooks=hooks,
            readonly=False,
            busy_timeout=busy_timeout,
            wait_timeout=wait_timeout,
            lock_fd=lock_fd,
        )
        try:
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            # Opening is done at start, for the custodian: the errors name the file.
            what = f"open the ledger {path}"
            conn = ledger._conn(what, releasing=False)
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.Error as exc:
                raise _unavailable(
                    exc, what, busy_timeout=busy_timeout, releasing=False
                ) from exc
            if str(mode).lower() != "wal":
                raise LedgerUnavailableError(
                    f"cannot {what}: SQLite refused WAL journaling (mode {mode})"
                )
            ledger._write(
                "open the ledger",
                lambda c: ledger._open_in(c, default_cap, actor, create, load_id, settings or {}),
                releasing=False,
            )
        except BaseException:
            ledger.close()
            raise
        return ledger

    @classmethod
    def open_readonly(cls, path: str | Path, *, busy_timeout: float = 10.0) -> Ledger:
        """Open an existing ledger to verify it or report on it; it cannot charge."""
        path = Path(path).resolve()
        if not path.is_file():
            raise LedgerUnavailableError(f"there is no ledger at {path}")
        ledger = cls(
            path,
            accounting=Accounting.PURE_DP,
            delta=1e-6,
            data_version=None,
            dataset=None,
            hooks=None,
            readonly=True,
            busy_timeout=busy_timeout,
            wait_timeout=0.0,
            lock_fd=None,
        )
        what = f"read the ledger {path}"
        try:
            with ledger._snapshot(what, releasing=False) as conn:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            ledger.close()
            raise _unavailable(exc, what, busy_timeout=busy_timeout, releasing=False) from exc
        except BaseException:
            ledger.close()
            raise
        if "accounting" not in meta:
            ledger.close()
            raise LedgerUnavailableError(f"{path} is not a veil ledger")
        if meta.get("schema_version") != SCHEMA_VERSION:
            ledger.close()
            raise LedgerUnavailableError(
                f"{path} has schema version {meta.get('schema_version')!r}; this build reads "
                f"version {SCHEMA_VERSION}. Start the server on it once (it upgrades the ledger "
                f"in one audited step), then read it again"
            )
        ledger.dataset = meta["dataset"]
        ledger.accounting = Accounting(meta["accounting"])
        ledger.delta = float(meta["delta"])
        return ledger

    def close(self) -> None:
        """Close every connection and release the write lock. Unsettled holds stay held.

        The last connection's close copies the write-ahead log into the ledger file (SQLite's
        checkpoint): a log found damaged is not copied (see `_check_log`).
        """
        if not self._closed and self._stopped is None and self._log is not None:
            locked = self._write_lock.acquire(timeout=self._busy_timeout)
            try:
                # A log deleted under it is copied in whole, from SQLite's own descriptors.
                self._check_log("close the ledger", locked=True, missing_ok=True)
            except LedgerUnavailableError:
                pass  # stopped: the log is set aside and held off
            finally:
                if locked:
                    self._write_lock.release()
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if self._log_hold is not None:
            hold, self._log_hold = self._log_hold, None
            os.close(hold)
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_in(
        self,
        conn: sqlite3.Connection,
        default_cap: Fraction,
        actor: str | None,
        create: bool,
        load_id: str | None,
        settings: Mapping[str, str],
    ) -> None:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not exists:
            if conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                raise LedgerUnavailableError(
                    f"{self.path} is a database but not a veil ledger; a ledger needs a file of "
                    f"its own"
                )
            if not create:
                raise LedgerUnavailableError(
                    f"{self.path} holds no ledger (it has no tables), and this open may not "
                    f"create one: a new ledger starts with every budget unspent"
                )
            if self.dataset is None:
                raise VeilError("a new ledger needs the name of the dataset whose budget it keeps")
            for statement in SCHEMA:
                conn.execute(statement)
            created = _now()
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("schema_version", SCHEMA_VERSION),
                    ("ledger_id", _new_id("ledger")),
                    ("created_at", created),
                    ("accounting", self.accounting.value),
                    ("delta", repr(self.delta)),
                    ("dataset", self.dataset),
                    ("dataset_cap", format_amount(default_cap)),
                    ("audit_head", f"0:{GENESIS_HASH}"),
                ],
            )
            self._append(
                conn,
                "create",
                outcome="created",
                detail={
                    "accounting": self.accounting.value,
                    "delta": repr(self.delta),
                    "dataset": self.dataset,
                    "dataset_cap": format_amount(default_cap),
                },
            )
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") == "1":
            self._check_head(conn)
            self._upgrade_in(conn, default_cap, actor)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise LedgerUnavailableError(
                f"the ledger has schema version {meta.get('schema_version')!r}; this build "
                f"reads version {SCHEMA_VERSION}"
            )
        for statement in INDEXES:
            conn.execute(statement)
        if meta["accounting"] != self.accounting.value:
            raise VeilError(
                f"the ledger accounts in {meta['accounting']}, not {self.accounting.value}; a "
                f"ledger's accounting cannot change"
            )
        self._check_head(conn)
        self._check_against_log(conn)
        if self.dataset is not None and self.dataset != meta["dataset"]:
            raise VeilError(
                f"this ledger keeps the budget of dataset {meta['dataset']!r}, and the data "
                f"belongs to dataset {self.dataset!r}. Serve a new dataset with a ledger of its "
                f"own; a new version of the same people must be loaded under the same name "
                f"(veil load --dataset {meta['dataset']})"
            )
        self.dataset = meta["dataset"]
        if float(meta["delta"]) != self.delta:
            self._append(
                conn,
                "set_delta",
                outcome="changed",
                detail=self._admin_detail(actor, before=meta["delta"], after=repr(self.delta)),
            )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'delta'", (repr(self.delta),))
        if _stored_amount(meta["dataset_cap"], "the dataset cap") != default_cap:
            self._set_dataset_cap_in(conn, default_cap, actor)
        self._check_load(conn, load_id)
        abandoned = conn.execute(
            "SELECT charge_id FROM charges WHERE state = 'reserved' ORDER BY rowid"
        ).fetchall()
        for (charge_id,) in abandoned:
            self._settle_in(conn, charge_id, "abandoned", spent=False)
        detail = {**settings, "pid": str(os.getpid()), "abandoned": str(len(abandoned))}
        # From here on, charges are dated with their entries, and `verify` holds them to it.
        detail["charge_times"] = CHARGE_TIMES_FROM_ENTRIES
        if load_id is not None:
            detail["load_id"] = load_id
        self._append(
            conn, "open", outcome="opened", data_version=self.data_version, detail=detail
        )

    def _check_load(self, conn: sqlite3.Connection, load_id: str | None) -> None:
        """Refuse a data version served before from another load of the records: releases are
        stored, and replayed, by data version, so a corrected file under the old version's name
        would be answered with the old records' releases."""
        if self.data_version is None:
            return
        earlier = conn.execute(
            "SELECT DISTINCT json_extract(entry, '$.detail.load_id') FROM audit "
            "WHERE json_valid(entry) AND json_extract(entry, '$.event') = 'open' "
            "AND json_extract(entry, '$.data_version') = ?",
            (self.data_version,),
        ).fetchall()
        # An open recorded without a load (before loads were named) cannot be told apart; a
        # file without one, on a version served from a named load, is another load.
        if any(row[0] is not None and row[0] != load_id for row in earlier):
            raise VeilError(
                f"data version {self.data_version!r} was served before from another load of "
                f"the records; its stored releases would be replayed as this file's. Load the "
                f"changed file under a version of its own (veil load --data-version NEW, or "
                f"without it for a fresh one)"
            )

    def _check_head(self, conn: sqlite3.Connection) -> None:
        """A quick check on open that the log's last entry is the one the ledger recorded."""
        head_seq, head_hash = self._head(conn)
        row = conn.execute(
            "SELECT seq, CAST(entry AS BLOB), prev_hash, hash FROM audit ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        last = (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[3]))
        intact = row is None or chain_hash(str(row[2]), bytes(row[1])) == row[3]
        if last != (head_seq, head_hash) or not intact:
            raise LedgerIntegrityError(
                f"the ledger's audit log does not end at its recorded head {head_seq}:{head_hash}; "
                f"run `veil ledger verify {self.path}` before serving from it"
            )

    def _check_against_log(self, conn: sqlite3.Connection) -> None:
        """A check on open that what the server acts on is what the audit log set: the
        clients, institution caps and meta rows (`registry_problems`: a revived client, a raised
        cap), the running totals every cap is enforced against (`totals_problems`: a total
        written down lets a scope spend past its cap) and the stored releases a replay hands
        out (`releases_problems`: a row copied in, or moved to another query, would be served
        free). Edited outside the ledger, they refuse."""
        problems = registry_problems(conn) or totals_problems(conn) or releases_problems(conn)
        if problems:
            raise LedgerIntegrityError(
                f"the ledger's tables differ from its audit log ({problems[0]}); run "
                f"`veil ledger verify {self.path}` before serving from it"
            )

    # ---- connections and transactions --------------------------------------------------

    def _conn(self, what: str = "open the ledger", *, releasing: bool = True) -> sqlite3.Connection:
        if self._closed:
            raise LedgerUnavailableError("the ledger is closed; nothing was released")
        if self._stopped is not None:
            raise LedgerUnavailableError(self._stopped)
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            if self.readonly:
                uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
                conn = sqlite3.connect(
                    uri,
                    uri=True,
                    timeout=self._busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                conn = sqlite3.connect(
                    str(self.path),
                    timeout=self._busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
                # Durability is the caller's choice per transaction: `_write` syncs the
                # write-ahead log after a synced commit, outside the write lock (see there).
                conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise _unavailable(
                exc, what, busy_timeout=self._busy_timeout, releasing=releasing
            ) from exc
        self._local.conn = conn
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _write(
        self,
        what: str,
        work: Callable[[sqlite3.Connection], T],
        *,
        synced: bool = True,
        releasing: bool = True,
    ) -> T:
        """Run `work` in one BEGIN IMMEDIATE transaction: all of it is durable, or none of it.

        Every connection commits at SQLite's NORMAL sync (WAL mode): a committed transaction
        survives a process crash at once and a power cut once the write-ahead log is synced.
        A synced write returns only after `_sync`, as SQLite's FULL sync would, but syncs
        after giving the write lock up, so other writers need not wait for the disk. A
        transaction left unsynced (`synced=False`) is made durable by the next sync, since the
        log is written in order: a power cut may take it back, whole, and nothing after it.
        `releasing`: as for `_unavailable`.
        """
        if self.readonly:
            raise LedgerUnavailableError(f"cannot {what}: the ledger was opened read-only")
        conn = self._conn(what, releasing=releasing)
        if not self._write_lock.acquire(timeout=self._busy_timeout):
            raise LedgerUnavailableError(
                f"cannot {what}: the ledger stayed locked for more than {self._busy_timeout:g} s "
                f"in this process{_NOTHING_RELEASED if releasing else ''}"
            )
        try:
            result = self._write_locked(conn, what, work, releasing=releasing)
        finally:
            self._write_lock.release()
        if synced:
            self._sync(what)
        return result

    def _sync(self, what: str) -> None:
        """Make every transaction written so far durable, as a synced commit would.

        A failed sync stops the ledger for good (until it is opened again). After a write-back
        error Linux may drop the dirty pages and report the next fdatasync as a success, so a
        retry could hand out a release whose charge never reached the disk. Nothing more is
        read, written or released by this process; reopening reads what the disk really holds.
        A log synced that is no longer the file the ledger wrote, or is shorter than it left
        it, stops it too (see `_check_log`).
        """
        if self._stopped is not None:
            raise LedgerUnavailableError(self._stopped)
        mark = self._log  # read first: the log only grows after it (see `_check_log`)
        try:
            # SQLite removes the log only when the last connection to the ledger closes, and
            # this one is open: a log missing now was deleted under it, and what SQLite writes
            # to the deleted file can never be made durable.
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
            try:
                os.fdatasync(fd)
                status = os.fstat(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._stop_unsynced(what, exc)
        if mark is not None:
            now = _LogMark(status.st_dev, status.st_ino, status.st_size, b"")
            damage = _log_damage(mark, now, header=False)
            if damage is not None:
                self._stop_for_log(what, damage, locked=False)

    def _stop_unsynced(self, what: str, exc: OSError) -> NoReturn:
        self._stopped = (
            f"the ledger stopped: a write could not be made durable ({exc.strerror or exc}); "
            "nothing more is released until the server is restarted and the ledger reopened"
        )
        raise LedgerUnavailableError(f"cannot {what}: {self._stopped}") from exc

    def _check_log(
        self, what: str, *, locked: bool, after_write: bool = False, missing_ok: bool = False
    ) -> None:
        """Stop the ledger if its write-ahead log was cut short or replaced under it.

        SQLite trusts its log while a connection is open: it reads the frames its shared index
        lists from whatever the file now holds, and checkpoints copy them into the ledger file,
        a cut log's hole as zeros, another file's pages as this ledger's. Only the ledger's own
        writes change the log while it is open, under the write lock: they append (the file
        never shrinks: the ledger sets no journal_size_limit and runs no TRUNCATE checkpoint,
        and SQLite's automatic checkpoints only copy it into the file), and the first write
        after a checkpoint starts it again from its beginning under a new header. So after
        each write the log's file, length and header are noted, and before the next one, with
        the lock held, it must be the same file, no shorter, with the same header (after it,
        no shorter: that write may have started it again); the sync after a write checks the
        file and its length, without the lock. One open, fstat and 32-byte read each side.

        `after_write`: note the log as the write just made left it. `locked`: the caller holds
        (or gave up waiting for) the write lock. `missing_ok`: a deleted log is not checked.
        """
        if self._stopped is not None:
            raise LedgerUnavailableError(self._stopped)
        mark = self._log
        if mark is None and not after_write:
            return
        try:
            now = _log_mark(f"{self.path}-wal")
        except OSError as exc:
            if missing_ok:
                return
            self._stop_unsynced(what, exc)
        if mark is not None:
            damage = _log_damage(mark, now, header=not after_write)
            if damage is not None:
                self._stop_for_log(what, damage, locked=locked)
        if after_write:
            self._log = now

    def _stop_for_log(self, what: str, damage: str, *, locked: bool) -> NoReturn:
        """Stop the ledger on a damaged log, keep it out of the ledger file, and say so.

        The log is set aside, so that the next open reads the ledger file alone: the state of
        its last checkpoint, whole (replaying the rest of a cut log over it could mix older
        pages into newer ones, and another file's pages are not this ledger's). Its close
        must not copy the log in either: SQLite checkpoints on the last connection's close
        only if it can lock the ledger file exclusively, and a read lock on the bytes its
        readers lock, held through a description of its own (an open file description lock,
        which conflicts with SQLite's locks even in this process), refuses it until `close`
        has closed every connection.
        """
        log = f"{self.path}-wal"
        # With the write lock no writer of this process is between its check and its commit,
        # and one that waits for it sees the stop first.
        locked_here = not locked and self._write_lock.acquire(timeout=self._busy_timeout)
        try:
            if self._stopped is not None:  # another thread saw it first
                raise LedgerUnavailableError(f"cannot {what}: {self._stopped}")
            said = f"the ledger stopped: its write-ahead log {log} {damage} while it was open"
            self._stopped = f"{said}; {_RESTORE}"  # at once: no new connection, no release
            held = self._hold_off_checkpoint()
            aside = f"{log}.damaged-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}"
            try:
                os.rename(log, aside)
                moved = f"it was set aside as {aside}"
            except OSError as exc:
                moved = f"it could not be set aside ({exc.strerror or exc}): move it away"
            kept = (
                "was not copied into the ledger file, which holds the ledger as of its last "
                "checkpoint: releases charged since may be missing from it (a head file kept "
                "outside the ledger's directory tells)"
                if held
                else "may be copied into the ledger file when the server stops: stop it at "
                "once, and check the ledger against a backup"
            )
            self._stopped = f"{said}; the log {kept}; {moved}; {_RESTORE}"
        finally:
            if locked_here:
                self._write_lock.release()
        raise LedgerUnavailableError(f"cannot {what}: {self._stopped}")

    def _hold_off_checkpoint(self) -> bool:
        """Keep the connections' close from copying the log into the ledger file (see above)."""
        if self._log_hold is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            lock = struct.pack(
                "hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, _SHARED_FIRST, _SHARED_SIZE, 0
            )
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
        except (OSError, AttributeError):  # AttributeError: no OFD locks (not Linux)
            os.close(fd)
            return False
        self._log_hold = fd
        return True

    def _write_locked(
        self,
        conn: sqlite3.Connection,
        what: str,
        work: Callable[[sqlite3.Connection], T],
        *,
        releasing: bool = True,
    ) -> T:
        self._check_log(what, locked=True)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _unavailable(
                exc, what, busy_timeout=self._busy_timeout, releasing=releasing
            ) from exc
        try:
            settled = self._settle_pending(conn)
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            self._roll_back(conn)
            if isinstance(exc, sqlite3.Error):
                raise _unavailable(
                    exc, what, busy_timeout=self._busy_timeout, releasing=releasing
                ) from exc
            raise
        if settled:
            with self._pending_lock:
                for charge_id in settled:
                    self._pending.pop(charge_id, None)
        self._check_log(what, locked=True, after_write=True)
        return result

    @contextlib.contextmanager
    def _snapshot(self, what: str, *, releasing: bool = True) -> Iterator[sqlite3.Connection]:
        """A read transaction: everything read inside it is one consistent state."""
        conn = self._conn(what, releasing=releasing)
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise _unavailable(
                exc, what, busy_timeout=self._busy_timeout, releasing=releasing
            ) from exc
        try:
            yield conn
        except sqlite3.Error as exc:
            raise _unavailable(
                exc, what, busy_timeout=self._busy_timeout, releasing=releasing
            ) from exc
        finally:
            self._roll_back(conn)

    def _roll_back(self, conn: sqlite3.Connection) -> None:
        """End a failed transaction; a connection that cannot end it is closed and replaced.

        Left open, its transaction would hold SQLite's lock, and its thread could begin nothing.
        """
        if not conn.in_transaction:
            return
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if conn.in_transaction:
            self._drop(conn)

    def _drop(self, conn: sqlite3.Connection) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._connections_lock:
            if conn in self._connections:
                self._connections.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()  # closing rolls back what is left
        # If it was the last connection, its close copied the log in and removed it: the next
        # write starts a new one (perhaps on the same inode), and notes it afresh.
        self._log = None

    def _read(
        self, what: str, work: Callable[[sqlite3.Connection], T], *, releasing: bool = True
    ) -> T:
        with self._snapshot(what, releasing=releasing) as conn:
            return work(conn)

    def _hook(self, point: str) -> None:
        assert point in HOOK_POINTS, point
        if self._hooks is not None:
            self._hooks(point)

    # ---- in-flight requests --------------------------------------------------------------

    def _claim(self, keys: tuple[tuple[str, ...], ...]) -> None:
        deadline = time.monotonic() + self._wait_timeout
        with self._cond:
            while any(key in self._inflight for key in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LedgerUnavailableError(
                        "another request for the same query, or with the same request id, is "
                        "still being computed; nothing was released, try again"
                    )
                self._cond.wait(left)
            self._inflight.update(keys)

    def _unclaim(self, keys: tuple[tuple[str, ...], ...]) -> None:
        if not keys:
            return
        with self._cond:
            self._inflight.difference_update(keys)
            self._cond.notify_all()

    # ---- the charger ---------------------------------------------------------------------

    def reserve(
        self, plan: Plan, *, client: str, request_id: str, data_version: str | None = None
    ) -> LedgerReservation:
        """Check every cap and hold the plan's loss, or find the stored release.

        Raises BudgetExceededError, RequestConflictError, UnknownClientError, InvalidLossError
        (all audited), or LedgerUnavailableError when the ledger cannot be written.
        """
        if self.readonly:
            raise LedgerUnavailableError("cannot reserve a charge: the ledger was opened read-only")
        version = data_version if data_version is not None else self.data_version
        if version is None:
            raise VeilError("the ledger needs the data version a charge is made against")
        _check_name(version, "data version")
        _check_name(client, "client id")
        if not isinstance(request_id, str) or not 1 <= len(request_id) <= 256:
            raise VeilError("a request id must be a string of 1 to 256 characters")
        if not request_id.isprintable():
            raise VeilError("a request id must contain printable characters only")
        request = (client, request_id, version)
        loss_error: VeilError | None = None
        amount = plan.loss.amount
        if plan.loss.accounting is not self.accounting:
            loss_error = InvalidLossError(
                f"this ledger accounts in {self.accounting.value}; a {plan.loss.symbol} loss "
                f"cannot be charged"
            )
        else:
            try:
                amount = _loss_amount(plan.loss.amount)
            except InvalidLossError as exc:
                loss_error = exc
        if loss_error is not None:
            error = loss_error
            self._write(
                "record the refusal",
                lambda c: self._refuse(c, plan, request, "invalid_loss", str(error)),
            )
            raise loss_error

        keys = (("request", client, request_id), ("query", plan.fingerprint, version))
        self._claim(keys)
        try:
            # A hold releases nothing, so it need not reach the disk before the query runs: a
            # hold lost to a power cut is a hold a crash would have left, and nothing was
            # handed out under it. The commit's sync flushes it with the charge. What is handed
            # out at once (a stored release, a refusal) is synced first.
            outcome = self._write(
                "reserve the charge",
                lambda c: self._reserve_in(c, plan, request, amount),
                synced=False,
            )
            if outcome.error is not None or outcome.stored is not None:
                self._sync("record the answer to the request")
        except BaseException:
            self._unclaim(keys)
            raise
        if outcome.error is not None or outcome.stored is not None:
            self._unclaim(keys)
            if outcome.error is not None:
                raise outcome.error
            assert outcome.stored is not None
            return LedgerReservation(
                self,
                client=client,
                request_id=request_id,
                fingerprint=plan.fingerprint,
                data_version=version,
                amount=_ZERO,
                stored=Release.from_bytes(outcome.stored),
            )
        reservation = LedgerReservation(
            self,
            client=client,
            request_id=request_id,
            fingerprint=plan.fingerprint,
            data_version=version,
            amount=amount,
            charge_id=outcome.charge_id,
            scopes=outcome.scopes,
            keys=keys,
        )
        try:
            self._hook("after_reserve")
        except BaseException:
            reservation.cancel()
            raise
        return reservation

    def _reserve_in(
        self,
        conn: sqlite3.Connection,
        plan: Plan,
        request: tuple[str, str, str],
        amount: Fraction,
    ) -> _Outcome:
        """One reservation's transaction. In order: the client must be active; an earlier
        attempt under the request id answers it (or refuses it); a stored release of the query
        at a loss at least this one is replayed free; a cap the charge would pass refuses it;
        else the charge is held."""
        client_id, request_id, version = request
        client = _client_row(conn, client_id)
        if client is None or not client.active:
            outcome = "unknown_client" if client is None else "revoked_client"
            why = "is not registered" if client is None else "has been revoked"
            message = f"client {client_id} {why}; nothing was released"
            self._refuse(conn, plan, request, outcome, message)
            error = UnknownClientError if client is None else RevokedClientError
            return _Outcome(error=error(message))
        requested = format_amount(amount)
        earlier = self._earlier_attempt(conn, plan, request, client, requested)
        if earlier is not None:
            return earlier
        scopes = self._scopes(client)
        budgets = self._budgets(conn, scopes)
        replay = self._replay(conn, plan, request, client, requested, amount, budgets)
        if replay is not None:
            return replay
        refusal = self._over_cap(conn, plan, request, requested, amount, budgets)
        if refusal is not None:
            return refusal
        now = _now()
        charge_id = self._insert_charge(
            conn, plan, request, client, requested, kind="charge", amount=requested,
            state="reserved", now=now,
        )
        self._append(
            conn,
            "reserve",
            at=now,
            client=client_id,
            request_id=request_id,
            charge_id=charge_id,
            data_version=version,
            fingerprint=plan.fingerprint,
            canonical_query=plan.canonical,
            outcome="reserved",
            charge=requested,
            budget=self._move(conn, budgets, spent=_ZERO, held=amount),
        )
        return _Outcome(charge_id=charge_id, scopes=scopes)

    def _earlier_attempt(
        self,
        conn: sqlite3.Connection,
        plan: Plan,
        request: tuple[str, str, str],
        client: ClientRecord,
        requested: str,
    ) -> _Outcome | None:
        """What the client's latest attempt under this request id says of this one: its stored
        release, or a refusal; None when there is none, or it was cancelled."""
        client_id, request_id, version = request
        previous = conn.execute(
            "SELECT charge_id, fingerprint, requested, state, release_id, data_version "
            "FROM charges WHERE client = ? AND request_id = ? ORDER BY rowid DESC LIMIT 1",
            (client_id, request_id),
        ).fetchone()
        if previous is None:
            return None
        charge_id, fingerprint, before, state, release_id, first_version = previous
        if fingerprint != plan.fingerprint or before != requested:
            message = (
                f"request id {request_id!r} was already used by {client_id} for a different "
                f"query or loss (or under another suppression rule); use a new request id "
                f"for a new request"
            )
            self._refuse(conn, plan, request, "request_conflict", message)
            return _Outcome(error=RequestConflictError(message))
        if state == "committed" and release_id is None:
            message = (
                f"request {request_id!r} was stopped by the server's time limit after its "
                f"charge was held, and was charged with nothing released; use a new request "
                f"id to ask again (a narrower query finishes sooner)"
            )
            self._refuse(conn, plan, request, "request_forfeited", message)
            return _Outcome(error=RequestConflictError(message))
        if first_version != version and state == "committed":
            # A request id kept from one cycle to the next would otherwise be handed the
            # earlier data's release, labelled with its version but easily taken for new.
            # (One whose attempt was cancelled, say by a restart onto new data, released
            # nothing: its retry is served on the data now served.)
            message = (
                f"request id {request_id!r} was already used by {client_id} on data version "
                f"{first_version}, and the server now serves {version}; use a new request id "
                f"for a release of this data (the earlier one is among your releases, free)"
            )
            self._refuse(conn, plan, request, "request_conflict", message)
            return _Outcome(error=RequestConflictError(message))
        if state == "committed":
            data, digest = _release_bytes(conn, release_id)
            self._append(
                conn,
                "retry",
                client=client_id,
                request_id=request_id,
                charge_id=charge_id,
                data_version=first_version,
                fingerprint=plan.fingerprint,
                canonical_query=plan.canonical,
                outcome="stored",
                charge="0",
                release_id=release_id,
                release_sha256=digest,
                budget=self._budget_items(conn, self._scopes(client)),
            )
            return _Outcome(stored=data)
        if state == "reserved":
            # Not in flight in this process (its key is ours), so a cancel is still unwritten.
            return _Outcome(
                error=LedgerUnavailableError(
                    f"request {request_id!r} is still held by a reservation that could not "
                    f"be settled; try again shortly"
                )
            )
        return None  # cancelled: nothing was released, the id is free

    def _replay(
        self,
        conn: sqlite3.Connection,
        plan: Plan,
        request: tuple[str, str, str],
        client: ClientRecord,
        requested: str,
        amount: Fraction,
        budgets: tuple[ScopeBudget, ...],
    ) -> _Outcome | None:
        """The query's stored release on this data version, free, if its loss is at least the
        one asked (recorded as a replay charge of 0); else None."""
        client_id, request_id, version = request
        best = _best_release(conn, plan.fingerprint, version)
        if best is None or not replays(_stored_amount(best[1], _RELEASE_LOSS), amount):
            return None
        release_id, loss = best
        data, digest = _release_bytes(conn, release_id)
        now = _now()
        charge_id = self._insert_charge(
            conn, plan, request, client, requested, kind="replay", amount="0",
            state="committed", now=now, release_id=release_id,
        )
        self._append(
            conn,
            "replay",
            at=now,
            client=client_id,
            request_id=request_id,
            charge_id=charge_id,
            data_version=version,
            fingerprint=plan.fingerprint,
            canonical_query=plan.canonical,
            outcome="replayed",
            charge="0",
            release_id=release_id,
            release_sha256=digest,
            budget=self._move(conn, budgets, spent=_ZERO, held=_ZERO),
            detail={"requested": requested, "release_loss": loss},
        )
        return _Outcome(stored=data)

    def _over_cap(
        self,
        conn: sqlite3.Connection,
        plan: Plan,
        request: tuple[str, str, str],
        requested: str,
        amount: Fraction,
        budgets: tuple[ScopeBudget, ...],
    ) -> _Outcome | None:
        """The refusal of a charge that would pass a cap (the first such, naming what is left);
        None when every cap holds it."""
        for budget in budgets:
            if budget.cap is None or budget.used + amount <= budget.cap:
                continue
            left = budget.remaining
            assert left is not None
            message = (
                f"a charge of {plan.loss} would exceed the {budget.kind} budget of "
                f"{budget.name}: {format_amount(left)} of {format_amount(budget.cap)} remains; "
                f"nothing was released"
            )
            self._refuse(
                conn,
                plan,
                request,
                "budget_exceeded",
                message,
                budget=self._move(conn, budgets, spent=_ZERO, held=_ZERO),
                charge=requested,
            )
            return _Outcome(
                error=BudgetExceededError(message, scope=budget.kind, remaining=format_amount(left))
            )
        return None

    @staticmethod
    def _insert_charge(
        conn: sqlite3.Connection,
        plan: Plan,
        request: tuple[str, str, str],
        client: ClientRecord,
        requested: str,
        *,
        kind: str,
        amount: str,
        state: str,
        now: str,
        release_id: str | None = None,
    ) -> str:
        """A new row of `charges`, dated `now` (also settled then when it is made committed, as
        a replay is); returns its id."""
        client_id, request_id, version = request
        charge_id = _new_id("chg")
        conn.execute(
            "INSERT INTO charges (charge_id, client, institution, request_id, kind, fingerprint, "
            "canonical_query, data_version, requested, amount, state, release_id, reserved_at, "
            "settled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                charge_id,
                client_id,
                client.institution,
                request_id,
                kind,
                plan.fingerprint,
                plan.canonical,
                version,
                requested,
                amount,
                state,
                release_id,
                now,
                now if state == "committed" else None,
            ),
        )
        return charge_id

    def _refuse(
        self,
        conn: sqlite3.Connection,
        plan: Plan,
        request: tuple[str, str, str],
        outcome: str,
        message: str,
        *,
        budget: list[dict[str, Any]] | None = None,
        charge: str | None = None,
    ) -> None:
        client_id, request_id, version = request
        self._append(
            conn,
            "refused",
            client=client_id,
            request_id=request_id,
            data_version=version,
            fingerprint=plan.fingerprint,
            canonical_query=plan.canonical,
            outcome=outcome,
            charge=charge,
            budget=budget,
            detail={"reason": message},
        )

    def _commit_in(
        self,
        conn: sqlite3.Connection,
        reservation: LedgerReservation,
        release: Release,
        data: bytes,
    ) -> None:
        charge_id = reservation.charge_id
        meta = release.metadata
        client = _client_row(conn, reservation.client)
        if client is None or not client.active:
            # Revoked while the query ran: the hold is cancelled, and nothing goes out.
            raise RevokedClientError(
                f"client {reservation.client} was revoked while its query ran; nothing was "
                "released or charged"
            )
        settled = conn.execute(
            "UPDATE charges SET state = 'committed', release_id = ?, settled_at = ? "
            "WHERE charge_id = ? AND state = 'reserved'",
            (meta.release_id, meta.created_at, charge_id),
        )
        if settled.rowcount != 1:
            row = conn.execute(
                "SELECT state FROM charges WHERE charge_id = ?", (charge_id,)
            ).fetchone()
            state = "missing" if row is None else row[0]
            raise LedgerUnavailableError(
                f"the reservation {charge_id} is {state}, not held; nothing was released"
            )
        digest = hashlib.sha256(data).hexdigest()
        conn.execute(
            "INSERT INTO releases (release_id, charge_id, client, fingerprint, canonical_query, "
            "data_version, loss, created_at, sha256, bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                meta.release_id,
                charge_id,
                reservation.client,
                meta.fingerprint,
                meta.canonical_query,
                meta.data_version,
                meta.loss,
                meta.created_at,
                digest,
                data,
            ),
        )
        amount = reservation.amount
        self._append(
            conn,
            "release",
            client=reservation.client,
            request_id=reservation.request_id,
            charge_id=charge_id,
            data_version=meta.data_version,
            fingerprint=meta.fingerprint,
            canonical_query=meta.canonical_query,
            outcome="released",
            charge=format_amount(amount),
            release_id=meta.release_id,
            release_sha256=digest,
            budget=self._move(
                conn, self._budgets(conn, reservation._scopes), spent=amount, held=-amount
            ),
        )

    def _settle(self, charge_id: str, reason: str, *, spent: bool) -> None:
        what = "record the stopped query's charge" if spent else "cancel the reservation"
        try:
            self._write(what, lambda c: self._settle_in(c, charge_id, reason, spent=spent))
        except LedgerUnavailableError:
            # Still held in the file, which is the safe side; written by the next transaction.
            with self._pending_lock:
                self._pending[charge_id] = (reason, spent)
            if spent:
                raise

    def _settle_pending(self, conn: sqlite3.Connection) -> list[str]:
        with self._pending_lock:
            pending = dict(self._pending)
        for charge_id, (reason, spent) in pending.items():
            self._settle_in(conn, charge_id, reason, spent=spent)
        return list(pending)

    def _settle_in(
        self, conn: sqlite3.Connection, charge_id: str, reason: str, *, spent: bool
    ) -> None:
        """Settle a hold: give it back (a cancel), or spend it with nothing released (a
        forfeit)."""
        row = conn.execute(
            "SELECT client, institution, data_version, amount, state, request_id, fingerprint, "
            "canonical_query FROM charges WHERE charge_id = ?",
            (charge_id,),
        ).fetchone()
        if row is None or row[4] != "reserved":
            return  # already settled (a commit whose outcome was uncertain did land)
        client, institution, version, amount_text, _, request_id, fingerprint, canonical = row
        amount = _stored_amount(amount_text, "a held charge's amount")
        scopes = scope_keys(client, institution, self._dataset_scope().name)
        now = _now()
        conn.execute(
            "UPDATE charges SET state = ?, settled_at = ?, reason = ? WHERE charge_id = ?",
            ("committed" if spent else "cancelled", now, reason, charge_id),
        )
        if spent:
            event, charge, detail = "forfeit", amount_text, {"released": "nothing"}
        else:
            event = "abandon" if reason == "abandoned" else "cancel"
            charge, detail = "0", {"released_hold": amount_text}
        self._append(
            conn,
            event,
            at=now,
            client=client,
            request_id=request_id,
            charge_id=charge_id,
            data_version=version,
            fingerprint=fingerprint,
            canonical_query=canonical,
            outcome=reason,
            charge=charge,
            budget=self._move(
                conn, self._budgets(conn, scopes), spent=amount if spent else _ZERO, held=-amount
            ),
            detail=detail,
        )

    # ---- budgets -------------------------------------------------------------------------

    def _scopes(self, client: ClientRecord) -> tuple[ScopeKey, ...]:
        return scope_keys(client.client_id, client.institution, self._dataset_scope().name)

    def _budget(self, conn: sqlite3.Connection, scope: ScopeKey) -> ScopeBudget:
        return self._budgets(conn, (scope,))[0]

    def _budgets(
        self, conn: sqlite3.Connection, scopes: tuple[ScopeKey, ...]
    ) -> tuple[ScopeBudget, ...]:
        """Each scope's cap and running totals, in the order given, read by one statement."""
        if not scopes:
            return ()
        rows = conn.execute(
            _budgets_sql(len(scopes)),
            [part for scope in scopes for part in (scope.kind, scope.name)],
        ).fetchall()
        return tuple(
            ScopeBudget(
                scope.kind,
                scope.name,
                # Constant descriptions: this runs twice for every release.
                None if cap is None else _stored_amount(cap, "a budget cap"),
                _ZERO if spent is None else _stored_amount(spent, "a running total"),
                _ZERO if held is None else _stored_amount(held, "a running total"),
            )
            for scope, (cap, spent, held) in zip(scopes, rows, strict=True)
        )

    def _budget_items(
        self,
        conn: sqlite3.Connection,
        scopes: tuple[ScopeKey, ...],
        *,
        cap_before: dict[ScopeKey, Fraction | None] | None = None,
    ) -> list[dict[str, Any]]:
        """The audit's view of the scopes as they stand, with no movement."""
        budgets = self._budgets(conn, scopes)
        return self._move(conn, budgets, spent=_ZERO, held=_ZERO, cap_before=cap_before)

    def _move(
        self,
        conn: sqlite3.Connection,
        budgets: tuple[ScopeBudget, ...],
        *,
        spent: Fraction,
        held: Fraction,
        cap_before: dict[ScopeKey, Fraction | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Add to each scope's running totals; return the audit's before/after for each.

        `budgets` are the scopes as read earlier in the same transaction.
        """
        items, rows = [], []
        for budget in budgets:
            scope = ScopeKey(budget.kind, budget.name)
            spent_after, held_after = budget.spent + spent, budget.held + held
            if spent_after < 0 or held_after < 0:
                raise LedgerIntegrityError(
                    f"the {scope.label} totals would go negative; the ledger is inconsistent"
                )
            rows.append(
                (scope.kind, scope.name, format_amount(spent_after), format_amount(held_after))
            )
            item: dict[str, Any] = {
                "scope": scope.label,
                "cap": None if budget.cap is None else format_amount(budget.cap),
                "before": {
                    "spent": format_amount(budget.spent),
                    "held": format_amount(budget.held),
                },
                "after": {"spent": format_amount(spent_after), "held": format_amount(held_after)},
            }
            if cap_before is not None and scope in cap_before:
                previous = cap_before[scope]
                item["cap_before"] = None if previous is None else format_amount(previous)
            items.append(item)
        if rows and (spent or held):
            conn.execute(
                "INSERT INTO totals (kind, name, spent, held) VALUES "
                + ", ".join(["(?, ?, ?, ?)"] * len(rows))
                + " ON CONFLICT (kind, name) DO UPDATE SET spent = excluded.spent, "
                "held = excluded.held",
                [part for row in rows for part in row],
            )
        return items

    def _set_cap_checked(
        self, conn: sqlite3.Connection, scope: ScopeKey, cap: Fraction | None
    ) -> dict[ScopeKey, Fraction | None]:
        """Refuse a cap below what the scope has already used; return the cap it replaces."""
        current = self._budget(conn, scope)
        if cap is not None and current.used > cap:
            raise ClientRegistryError(
                f"cannot set the {scope.kind} cap of {scope.name} to {format_amount(cap)}: "
                f"{format_amount(current.used)} is already spent or held"
            )
        return {scope: current.cap}

    # ---- the audit log -------------------------------------------------------------------

    def _head(self, conn: sqlite3.Connection) -> tuple[int, str]:
        row = conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
        if row is None:
            return 0, GENESIS_HASH
        seq, digest = str(row[0]).split(":")
        return int(seq), digest

    def _append(
        self, conn: sqlite3.Connection, event: str, *, at: str | None = None, **fields: Any
    ) -> int:
        """Append an entry to the log, dated `at` (now, if not given): a charge's row is dated
        with the entry that makes or settles it, so that `verify` can hold its times to it."""
        unknown = set(fields) - set(ENTRY_FIELDS)
        if unknown:
            raise ValueError(f"unknown audit fields {sorted(unknown)}")
        head_seq, head_hash = self._head(conn)
        seq = head_seq + 1
        entry: dict[str, Any] = dict.fromkeys(ENTRY_FIELDS)
        entry.update(fields)
        entry.update(seq=seq, time=at or _now(), event=event, accounting=self.accounting.value)
        text = canonical_json(entry)
        digest = chain_hash(head_hash, text.encode("ascii"))
        conn.execute(
            "INSERT INTO audit (seq, entry, prev_hash, hash) VALUES (?, ?, ?, ?)",
            (seq, text, head_hash, digest),
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (f"{seq}:{digest}",))
        return seq

    def audit(
        self,
        event: str,
        client: str | None,
        *,
        outcome: str,
        request_id: str | None = None,
        fingerprint: str | None = None,
        canonical_query: str | None = None,
        detail: dict[str, str] | None = None,
    ) -> int:
        """Append a non-charge event (an authentication failure, a refused query, ...).

        Returns the entry's sequence number. Never pass a value read from the data: only ids,
        codebook names, canonical queries and reasons belong in the log.
        """
        if not isinstance(event, str) or not _EVENT.match(event):
            raise VeilError(f"an audit event is a lower-case identifier, got {event!r}")
        if event in LEDGER_EVENTS:
            raise VeilError(f"the event {event!r} is written by the ledger itself")
        if detail is not None and not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in detail.items()
        ):
            raise VeilError("audit detail maps names to text")
        return self._write(
            "append to the audit log",
            lambda c: self._append(
                c,
                event,
                client=client,
                request_id=request_id,
                fingerprint=fingerprint,
                canonical_query=canonical_query,
                outcome=outcome,
                detail=detail,
            ),
        )

    # ---- the client registry --------------------------------------------------------------

    def register_client(
        self,
        client_id: str,
        *,
        role: str,
        cap: Number,
        institution: str | None = None,
        token_hash: str | None = None,
        token_expires_at: datetime | None = None,
        actor: str | None = None,
    ) -> ClientRecord:
        """Register a client with its role, cap and (optional) institution and token hash.

        Only a hash of a token is stored; the server hashes what it receives and compares,
        and refuses it from `token_expires_at` on (None: never).
        `actor`, here and in the other admin methods, is who asked (an administrator's client
        id); the audit entry records it in its detail, null when not given.
        """
        _check_name(client_id, "client id")
        if client_id.startswith(LOCAL_ACTOR_PREFIX):
            # Kept for the custodian's own processes (`local:veil-serve`), so that an actor in
            # the audit log is never mistaken for a client.
            raise ClientRegistryError(
                f"client ids starting with {LOCAL_ACTOR_PREFIX!r} are reserved for local actors"
            )
        if role not in ROLES:
            raise ClientRegistryError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if institution is not None:
            _check_name(institution, "institution")
        amount = exact_cap(cap, what="client cap")
        _check_token_hash(token_hash)
        expires = None if token_expires_at is None else _timestamp(token_expires_at)
        detail = self._admin_detail(
            actor,
            role=role,
            institution=institution,
            token="set" if token_hash else "none",
            token_digest=token_digest(token_hash),
            token_expires_at=expires,
        )
        now = _now()

        def work(conn: sqlite3.Connection) -> None:
            if _client_row(conn, client_id) is not None:
                raise ClientRegistryError(f"client {client_id} is already registered")
            if institution is not None:
                _check_institution_spelling(conn, institution)
            if (
                token_hash is not None
                and conn.execute(
                    "SELECT 1 FROM clients WHERE token_hash = ?", (token_hash,)
                ).fetchone()
            ):
                raise ClientRegistryError("that token hash belongs to another client")
            conn.execute(
                "INSERT INTO clients (client_id, role, institution, cap, token_hash, "
                "token_expires_at, status, created_at) VALUES (?, ?, ?, ?, ?, ?, 'active', ?)",
                (client_id, role, institution, format_amount(amount), token_hash, expires, now),
            )
            self._append(
                conn,
                "register_client",
                client=client_id,
                outcome="registered",
                budget=self._budget_items(conn, (ScopeKey("client", client_id),)),
                detail=detail,
            )

        self._write("register the client", work)
        return self.client(client_id)

    def set_cap(self, client_id: str, cap: Number, *, actor: str | None = None) -> ClientRecord:
        """Set a client's cap; never below what it has already spent or holds."""
        amount = exact_cap(cap, what="client cap")
        detail = self._admin_detail(actor)
        self._write(
            "set the cap",
            lambda c: self._set_client_cap(c, client_id, amount, detail),
        )
        return self.client(client_id)

    def _set_client_cap(
        self,
        conn: sqlite3.Connection,
        client_id: str,
        cap: Fraction,
        detail: dict[str, str | None],
    ) -> None:
        if _client_row(conn, client_id) is None:
            raise UnknownClientError(f"client {client_id} is not registered")
        scope = ScopeKey("client", client_id)
        previous = self._set_cap_checked(conn, scope, cap)
        conn.execute(
            "UPDATE clients SET cap = ? WHERE client_id = ?", (format_amount(cap), client_id)
        )
        self._append(
            conn,
            "set_cap",
            client=client_id,
            outcome="changed",
            budget=self._budget_items(conn, (scope,), cap_before=previous),
            detail=detail,
        )

    def set_token_hash(
        self,
        client_id: str,
        token_hash: str | None,
        *,
        expires_at: datetime | None = None,
        actor: str | None = None,
    ) -> ClientRecord:
        """Replace (or clear) a client's token hash, e.g. when its token is rotated; the new
        token is refused from `expires_at` on (None: never)."""
        _check_token_hash(token_hash)
        expires = None if expires_at is None else _timestamp(expires_at)
        detail = self._admin_detail(
            actor, token_digest=token_digest(token_hash), token_expires_at=expires
        )

        def work(conn: sqlite3.Connection) -> None:
            record = _client_row(conn, client_id)
            if record is None:
                raise UnknownClientError(f"client {client_id} is not registered")
            # Checked in the write, not before it: a revocation racing a rotation would
            # otherwise leave the revoked client with a new token and its rotation a success.
            if token_hash is not None and not record.active:
                raise ClientRegistryError(
                    f"client {client_id} is revoked; register a new client instead"
                )
            if (
                token_hash is not None
                and conn.execute(
                    "SELECT 1 FROM clients WHERE token_hash = ? AND client_id != ?",
                    (token_hash, client_id),
                ).fetchone()
            ):
                raise ClientRegistryError("that token hash belongs to another client")
            conn.execute(
                "UPDATE clients SET token_hash = ?, token_expires_at = ? WHERE client_id = ?",
                (token_hash, expires, client_id),
            )
            self._append(
                conn,
                "set_token",
                client=client_id,
                outcome="set" if token_hash else "cleared",
                detail=detail,
            )

        self._write("set the token hash", work)
        return self.client(client_id)

    def revoke(self, client_id: str, *, reason: str = "", actor: str | None = None) -> bool:
        """Stop serving a client. Its charges and releases stay on the ledger.

        True when this call revoked the client; False when it was already revoked, and nothing
        was written. Decided inside the write, so of two revocations at once one is True.
        """
        detail = self._admin_detail(actor, reason=reason)

        def work(conn: sqlite3.Connection) -> bool:
            client = _client_row(conn, client_id)
            if client is None:
                raise UnknownClientError(f"client {client_id} is not registered")
            if not client.active:
                return False
            conn.execute(
                "UPDATE clients SET status = 'revoked', revoked_at = ? WHERE client_id = ?",
                (_now(), client_id),
            )
            self._append(conn, "revoke", client=client_id, outcome="revoked", detail=detail)
            return True

        return self._write("revoke the client", work)

    def set_institution_cap(
        self, institution: str, cap: Number | None, *, actor: str | None = None
    ) -> None:
        """Cap the clients of an institution together; None removes the institution's cap."""
        _check_name(institution, "institution")
        amount = None if cap is None else exact_cap(cap, what="institution cap")
        scope = ScopeKey("institution", institution)
        detail = self._admin_detail(actor)

        def work(conn: sqlite3.Connection) -> None:
            _check_institution_spelling(conn, institution)
            previous = self._set_cap_checked(conn, scope, amount)
            if amount is None:
                conn.execute("DELETE FROM institutions WHERE institution = ?", (institution,))
            else:
                conn.execute(
                    "INSERT INTO institutions (institution, cap) VALUES (?, ?) "
                    "ON CONFLICT (institution) DO UPDATE SET cap = excluded.cap",
                    (institution, format_amount(amount)),
                )
            self._append(
                conn,
                "set_institution_cap",
                outcome="changed",
                budget=self._budget_items(conn, (scope,), cap_before=previous),
                detail=detail,
            )

        self._write("set the institution cap", work)

    def set_dataset_cap(self, cap: Number, *, actor: str | None = None) -> None:
        """Change the dataset's cap (over all its data versions) until the ledger is next
        opened, which sets the cap it is opened with. A cap below what is spent is refused."""
        amount = exact_cap(cap, what="dataset cap")
        if actor is not None:
            _check_name(actor, "acting client")
        self._write("set the dataset cap", lambda c: self._set_dataset_cap_in(c, amount, actor))

    @staticmethod
    def _admin_detail(actor: str | None, **fields: str | None) -> dict[str, str | None]:
        # Who acted goes in the detail, not in a field of its own, so that entries keep the
        # fields `verify` and the audit tables expect.
        if actor is not None:
            _check_name(actor, "acting client")
        return {**fields, "actor": actor}

    def _set_dataset_cap_in(
        self, conn: sqlite3.Connection, cap: Fraction, actor: str | None
    ) -> None:
        scope = self._dataset_scope()
        previous = self._set_cap_checked(conn, scope, cap)
        before = conn.execute("SELECT value FROM meta WHERE key = 'dataset_cap'").fetchone()[0]
        conn.execute("UPDATE meta SET value = ? WHERE key = 'dataset_cap'", (format_amount(cap),))
        self._append(
            conn,
            "set_dataset_cap",
            outcome="changed",
            budget=self._budget_items(conn, (scope,), cap_before=previous),
            detail=self._admin_detail(actor, before=before, after=format_amount(cap)),
        )

    def _upgrade_in(self, conn: sqlite3.Connection, cap: Fraction, actor: str | None) -> None:
        """Upgrade a schema-1 ledger: its per-version dataset totals become one dataset's.

        Schema 1 gave every data version a dataset cap of its own, so a new version of the same
        people started afresh. Their spending is merged into the dataset being opened (the
        conservative reading: nothing spent is forgotten, though a ledger that once served
        another dataset then counts that too). A merged total past `cap` is refused, naming
        the cap that would hold it; per-version caps are dropped and recorded in the entry.
        """
        if self.dataset is None:
            raise VeilError("upgrading a schema-1 ledger needs the name of its dataset")
        name = self.dataset
        target = ScopeKey("dataset", name)
        rows = conn.execute(
            "SELECT name, spent, held FROM totals WHERE kind = 'dataset' ORDER BY name"
        ).fetchall()
        spent = sum((_stored_amount(r[1], "a dataset total") for r in rows), _ZERO)
        held = sum((_stored_amount(r[2], "a dataset total") for r in rows), _ZERO)
        if spent + held > cap:
            raise ClientRegistryError(
                f"cannot upgrade the ledger: its data versions have together used "
                f"{format_amount(spent + held)}, more than the dataset cap of "
                f"{format_amount(cap)}; open it with a dataset cap of at least that (nothing "
                f"more can then be released)"
            )
        items = []
        for version, before_spent, before_held in rows:
            merged = version == name
            items.append(
                {
                    "scope": ScopeKey("dataset", str(version)).label,
                    "cap": format_amount(cap) if merged else None,
                    "before": {"spent": before_spent, "held": before_held},
                    "after": {
                        "spent": format_amount(spent if merged else _ZERO),
                        "held": format_amount(held if merged else _ZERO),
                    },
                }
            )
        if name not in {str(r[0]) for r in rows}:
            items.append(
                {
                    "scope": target.label,
                    "cap": format_amount(cap),
                    "before": {"spent": "0", "held": "0"},
                    "after": {"spent": format_amount(spent), "held": format_amount(held)},
                }
            )
        version_caps = conn.execute(
            "SELECT data_version, cap FROM dataset_caps ORDER BY data_version"
        ).fetchall()
        conn.execute("DELETE FROM totals WHERE kind = 'dataset'")
        conn.execute(
            "INSERT INTO totals (kind, name, spent, held) VALUES ('dataset', ?, ?, ?)",
            (name, format_amount(spent), format_amount(held)),
        )
        conn.execute("DROP TABLE dataset_caps")
        # Schema 2 also lets a token expire; tokens issued before never do.
        conn.execute("ALTER TABLE clients ADD COLUMN token_expires_at TEXT")
        conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("schema_version", SCHEMA_VERSION), ("dataset", name)],
        )
        self._append(
            conn,
            "upgrade",
            outcome="upgraded",
            budget=items,
            detail=self._admin_detail(
                actor,
                schema_before="1",
                schema_after=SCHEMA_VERSION,
                dataset=name,
                version_caps=", ".join(f"{v}={c}" for v, c in version_caps) or None,
            ),
        )

    def _dataset_scope(self) -> ScopeKey:
        assert self.dataset is not None, "the dataset is known once the ledger is open"
        return ScopeKey("dataset", self.dataset)

    def client(self, client_id: str) -> ClientRecord:
        client = self._read("read the client", lambda c: _client_row(c, client_id))
        if client is None:
            raise UnknownClientError(f"client {client_id} is not registered")
        return client

    def client_for_token_hash(self, token_hash: str) -> ClientRecord | None:
        """The client holding a token hash (active or not); the server decides what follows."""

        def work(conn: sqlite3.Connection) -> ClientRecord | None:
            row = conn.execute(
                "SELECT client_id FROM clients WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            return None if row is None else _client_row(conn, row[0])

        return self._read("read the client", work)

    def list_clients(self) -> list[ClientRecord]:
        def work(conn: sqlite3.Connection) -> list[ClientRecord]:
            ids = conn.execute("SELECT client_id FROM clients ORDER BY client_id").fetchall()
            return [c for (i,) in ids if (c := _client_row(conn, i)) is not None]

        return self._read("list the clients", work)

    # ---- reports -------------------------------------------------------------------------

    def budget(self, kind: str, name: str) -> ScopeBudget:
        """Spending against one cap: kind is "client", "institution" or "dataset"."""
        if kind not in SCOPE_KINDS:
            raise VeilError(f"a budget scope is one of {', '.join(SCOPE_KINDS)}, got {kind!r}")
        scope = ScopeKey(kind, name)
        if kind == "dataset" and name != self.dataset:
            raise VeilError(f"this ledger keeps the budget of dataset {self.dataset}, not {name}")

        def work(conn: sqlite3.Connection) -> ScopeBudget:
            if kind == "client" and _client_row(conn, name) is None:
                raise UnknownClientError(f"client {name} is not registered")
            return self._budget(conn, scope)

        return self._read("read the budget", work)

    def spent(self, client: str) -> Fraction:
        """What a client has been charged (committed charges only)."""
        return self.budget("client", client).spent

    def remaining(self, client: str) -> Fraction:
        """What the client may still spend: the least of its own, its institution's and the
        dataset's remaining budgets (holds in flight count as used)."""
        return self.client_budget(client).remaining

    def client_budget(self, client: str) -> ClientBudget:
        """The client's own, its institution's and the dataset's budgets, read together."""

        def work(conn: sqlite3.Connection) -> ClientBudget:
            record = _client_row(conn, client)
            if record is None:
                raise UnknownClientError(f"client {client} is not registered")
            return ClientBudget(record.active, self._budgets(conn, self._scopes(record)))

        return self._read("read the budget", work)

    def report(self) -> LedgerReport:
        """Every client's and institution's spent and remaining budget, and the dataset's."""

        def work(conn: sqlite3.Connection) -> LedgerReport:
            clients = [str(r[0]) for r in conn.execute("SELECT client_id FROM clients ORDER BY 1")]
            institutions = sorted(
                {
                    str(r[0])
                    for r in conn.execute(
                        "SELECT institution FROM clients WHERE institution IS NOT NULL "
                        "UNION SELECT institution FROM institutions "
                        "UNION SELECT name FROM totals WHERE kind = 'institution'"
                    )
                }
            )

            def scoped(kind: str, names: list[str]) -> tuple[ScopeBudget, ...]:
                return self._budgets(conn, tuple(ScopeKey(kind, name) for name in names))

            head_seq, head_hash = self._head(conn)
            return LedgerReport(
                accounting=self.accounting,
                delta=self.delta,
                clients=scoped("client", clients),
                institutions=scoped("institution", institutions),
                dataset=self._budget(conn, self._dataset_scope()),
                head_seq=head_seq,
                head_hash=head_hash,
            )

        return self._read("report on the ledger", work)

    def releases(
        self, *, client: str | None = None, data_version: str | None = None
    ) -> list[ReleaseRecord]:
        """Every stored release with its charge and the number of free replays it served."""
        sql = (
            f"SELECT {_RELEASE_COLUMNS} FROM releases r WHERE (? IS NULL OR r.client = ?) "
            "AND (? IS NULL OR r.data_version = ?) ORDER BY r.rowid"
        )

        def work(conn: sqlite3.Connection) -> list[ReleaseRecord]:
            rows = conn.execute(sql, (client, client, data_version, data_version)).fetchall()
            return [_release_record(r) for r in rows]

        return self._read("list the releases", work)

    def received(
        self,
        client: str,
        *,
        last: int | None = None,
        release_id: str | None = None,
        fingerprint: str | None = None,
    ) -> list[tuple[ChargeRecord, ReleaseRecord]]:
        """The releases a client received (paid for or replayed), oldest first, each with the
        client's charge for it: the `last` ones, the one with `release_id`, or those of the query
        with `fingerprint` (on every data version)."""
        sql = (
            f"SELECT {_CHARGE_COLUMNS}, {_RELEASE_COLUMNS} FROM charges c "
            "JOIN releases r ON r.release_id = c.release_id "
            "WHERE c.client = ? AND c.state = 'committed' AND (? IS NULL OR c.release_id = ?) "
            "AND (? IS NULL OR c.fingerprint = ?) ORDER BY c.rowid DESC LIMIT ?"
        )
        width = _CHARGE_COLUMNS.count(",") + 1

        def work(conn: sqlite3.Connection) -> list[tuple[ChargeRecord, ReleaseRecord]]:
            limit = -1 if last is None else last  # SQLite: a negative limit is none
            arguments = (client, release_id, release_id, fingerprint, fingerprint, limit)
            rows = conn.execute(sql, arguments).fetchall()
            return [(_charge_record(r[:width]), _release_record(r[width:])) for r in rows[::-1]]

        return self._read("list the client's releases", work)

    def replayed_release(
        self, fingerprint: str, data_version: str, loss: Fraction
    ) -> ReleaseMetadata | None:
        """The metadata of the stored release a request for this query at `loss` would get back
        free on the data version (the one of largest loss, if it covers `loss`), or None when
        the request would be drawn afresh."""
        best = self._read(
            "look up the query's releases", lambda c: _best_release(c, fingerprint, data_version)
        )
        if best is None or not replays(_stored_amount(best[1], _RELEASE_LOSS), loss):
            return None
        return self.release_metadata([best[0]])[best[0]]

    def release(self, release_id: str) -> Release:
        """A stored release, byte for byte as it was handed out; durable before it is returned.

        A commit is visible to other connections before its `_write` has synced it, so a release
        read in that instant (its client listing its releases while the call that made it is
        still returning) is synced here rather than handed out ahead of its charge.
        """
        data = self._read("read the release", lambda c: _release_bytes(c, release_id)[0])
        self._sync("read the release")
        return Release.from_bytes(data)

    def release_metadata(self, release_ids: Iterable[str]) -> dict[str, ReleaseMetadata]:
        """Stored releases' metadata, for the audit tables, by release id: read in one
        transaction and durable before it is returned.

        Metadata holds no cell, but it does hold noisy statistics of the data (how many cells
        were suppressed), so it waits for the charges' sync as the cells do.
        """
        ids = list(release_ids)
        blobs = self._read("read the releases", lambda c: [_release_bytes(c, i)[0] for i in ids])
        self._sync("read the releases")
        return {i: Release.from_bytes(data).metadata for i, data in zip(ids, blobs, strict=True)}

    def charges(self, *, client: str | None = None) -> list[ChargeRecord]:
        """The ledger's rows in the order they were made: charges, holds and free replays."""

        def work(conn: sqlite3.Connection) -> list[ChargeRecord]:
            rows = conn.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM charges c WHERE (? IS NULL OR c.client = ?) "
                "ORDER BY c.rowid",
                (client, client),
            ).fetchall()
            return [_charge_record(r) for r in rows]

        return self._read("list the charges", work)

    def audit_log(self, *, since: int = 0) -> list[AuditEntry]:
        """Audit entries after sequence number `since`, parsed (use `verify` to check them)."""

        def work(conn: sqlite3.Connection) -> list[AuditEntry]:
            rows = conn.execute(
                "SELECT seq, entry, prev_hash, hash FROM audit WHERE seq > ? ORDER BY seq",
                (since,),
            ).fetchall()
            return [AuditEntry(int(r[0]), json.loads(r[1]), r[2], r[3]) for r in rows]

        return self._read("read the audit log", work)

    def head(self) -> str:
        """The audit log's head, "seq:hash": record it elsewhere to detect a rewritten log."""
        seq, digest = self._read("read the audit head", self._head)
        return f"{seq}:{digest}"

    def durable_head(self) -> str:
        """The audit head as `head()` gives it, once it is on disk: a hold is committed without
        a sync of its own, and a power cut may take it back, so a head kept outside the ledger
        (to catch a restored backup) must never be one the ledger could lose."""
        head = self.head()
        self._sync("keep the audit head")  # read first: the sync covers at least that far
        return head

    def holds_head(self, head: str) -> bool:
        """Whether the audit log holds `head` ("seq:hash", from an earlier `head()`): a ledger
        restored from an older backup, or another ledger, does not."""
        seq, _, digest = head.strip().partition(":")
        if not seq.isdigit():
            return False
        row = self._read(
            "read the audit log",
            lambda c: c.execute("SELECT hash FROM audit WHERE seq = ?", (int(seq),)).fetchone(),
        )
        return row is not None and row[0] == digest

    def verify(self, *, expect_head: str | None = None) -> VerifyResult:
        """Check the hash chain, replay its budget movements and administrative changes, and
        reconcile every table with them.

        `expect_head` ("seq:hash", from an earlier `head()` kept outside the ledger) also
        catches a log rewritten from some point on with its hashes recomputed.
        """
        return self._read(
            "verify the ledger", lambda c: ledger_verify.verify(c, expect_head), releasing=False
        )


# ---- module helpers ------------------------------------------------------------------------------


def _lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LedgerUnavailableError(
            f"the ledger {path} is open for writing in another process (pid {holder}); one "
            f"process writes a ledger at a time"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _check_token_hash(token_hash: str | None) -> None:
    if token_hash is not None and (
        not isinstance(token_hash, str) or not _HASH_TEXT.match(token_hash)
    ):
        raise ClientRegistryError(
            "a token hash is 32 to 512 characters without spaces (store the hash, never a token)"
        )


def _client_row(conn: sqlite3.Connection, client_id: str) -> ClientRecord | None:
    row = conn.execute(
        "SELECT client_id, role, institution, cap, status, token_hash, created_at, revoked_at, "
        "token_expires_at "
        "FROM clients WHERE client_id = ?",
        (client_id,),
    ).fetchone()
    if row is None:
        return None
    return ClientRecord(
        client_id=row[0],
        role=row[1],
        institution=row[2],
        cap=_stored_amount(row[3], "a client's cap"),
        status=row[4],
        token_hash=row[5],
        created_at=row[6],
        revoked_at=row[7],
        token_expires_at=row[8],
    )


@functools.lru_cache(maxsize=8)
def _budgets_sql(scopes: int) -> str:
    """One statement reading the cap and the running totals of `scopes` scopes, in order.

    A scope without totals has spent and held nothing.
    """
    values = ", ".join(f"({position}, ?, ?)" for position in range(scopes))
    return (
        f"WITH s (position, kind, name) AS (VALUES {values}) "
        "SELECT CASE s.kind "
        "WHEN 'client' THEN (SELECT cap FROM clients WHERE client_id = s.name) "
        "WHEN 'institution' THEN (SELECT cap FROM institutions WHERE institution = s.name) "
        "ELSE (SELECT value FROM meta WHERE key = 'dataset_cap') END, t.spent, t.held "
        "FROM s LEFT JOIN totals t ON t.kind = s.kind AND t.name = s.name ORDER BY s.position"
    )


_CHARGE_COLUMNS = (
    "c.charge_id, c.client, c.institution, c.request_id, c.kind, c.fingerprint, c.data_version, "
    "c.requested, c.amount, c.state, c.release_id, c.reserved_at, c.settled_at, c.reason"
)
_RELEASE_COLUMNS = (
    "r.release_id, r.charge_id, r.client, r.fingerprint, r.canonical_query, r.data_version, "
    "r.loss, r.created_at, r.sha256, (SELECT count(*) FROM charges p WHERE p.kind = 'replay' "
    "AND p.release_id = r.release_id)"
)


def _charge_record(r: Any) -> ChargeRecord:
    return ChargeRecord(
        charge_id=r[0],
        client=r[1],
        institution=r[2],
        request_id=r[3],
        kind=r[4],
        fingerprint=r[5],
        data_version=r[6],
        requested=_stored_amount(r[7], "a charge's requested loss"),
        amount=_stored_amount(r[8], "a charge's amount"),
        state=r[9],
        release_id=r[10],
        reserved_at=r[11],
        settled_at=r[12],
        reason=r[13],
    )


def _release_record(r: Any) -> ReleaseRecord:
    return ReleaseRecord(
        release_id=r[0],
        charge_id=r[1],
        client=r[2],
        fingerprint=r[3],
        canonical_query=r[4],
        data_version=r[5],
        loss=_stored_amount(r[6], _RELEASE_LOSS),
        created_at=r[7],
        sha256=r[8],
        replays=int(r[9]),
    )


def _best_release(
    conn: sqlite3.Connection, fingerprint: str, version: str
) -> tuple[str, str] | None:
    """The stored release of a query on a data version with the largest loss: (id, loss text).

    That is the latest: a query is drawn afresh only at a loss above its stored releases' (else
    the stored one is replayed), and one release of a query is computed at a time (`_claim`),
    so its releases are stored in increasing loss. Read through the index, this stays one row
    however often a query is drawn; were the order ever broken, a request would get a fresh,
    charged draw or the smaller release, never a free one it should have paid for.
    """
    row = conn.execute(
        "SELECT release_id, loss FROM releases WHERE fingerprint = ? AND data_version = ? "
        "ORDER BY rowid DESC LIMIT 1",
        (fingerprint, version),
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def _release_bytes(conn: sqlite3.Connection, release_id: str) -> tuple[bytes, str]:
    row = conn.execute(
        "SELECT bytes, sha256 FROM releases WHERE release_id = ?", (release_id,)
    ).fetchone()
    if row is None:
        raise LedgerIntegrityError(f"the stored release {release_id} is missing from the ledger")
    data = bytes(row[0])
    if hashlib.sha256(data).hexdigest() != row[1]:
        raise LedgerIntegrityError(
            f"the stored release {release_id} does not match its recorded hash; nothing was "
            f"released"
        )
    return data, str(row[1])

