"""The auditor's evidence from a ledger: tables of spending and releases, and a one-page report.

    with Ledger.open_readonly("ledger.sqlite") as ledger:
        tables = build_tables(ledger)
    tables.write_csv(Path("audit-tables/"))          # one CSV per table, plus summary.json
    Path("report.html").write_text(render_html(tables))

Tables (Arrow; `veil audit tables` writes them as CSV, the Audit service sends them as Arrow IPC):

- budgets: per client, institution and data version: cap, spent, held, remaining, a client's
  status (active or revoked, and when it was revoked), and the highest
  chance an attacker holding everything released against that scope has of guessing any one
  person's yes/no attribute (`guess_bound`, see `engine.risk.binary_guess_bound`).
- spending: one row per committed charge and scope it counts against (client, institution, data
  version), in time order, with the scope's cumulative spending, the cap in force at that charge
  and the budget remaining under it: spending over time. A charge with no release_id was
  forfeited: the server's time limit stopped its query after the charge was held.
- releases: every stored release with its query, charge, mechanism, noise scale, tau, cells, the
  cells its query's own terms leave empty, and the share of the other cells suppressed, read from
  the release's stored metadata (never its values); `problem` says why a release whose stored
  bytes were altered or cannot be read has none of these.
- queries: per query fingerprint, how many independent releases were drawn over every data
  version of the dataset (a query released again at a larger loss, or on a new data version,
  gets a fresh draw, and the losses add), the data versions, their total loss, the clients and
  the free replays.
- replays: every request answered from a stored release at no charge.
- refusals: audit-log entries for refused requests (budget exceeded, request conflicts, unknown
  clients) and refused credentials.
- administration: every change to the clients and the caps (registrations, cap changes, token
  rotations, revocations), with the cap before and after and the administrator who made it.
- verification: the result of walking the audit log's hash chain and reconciling the ledger,
  against a head recorded outside it when one is given (`expected_head`).

Nothing here reads the data file; the ledger holds no true value, only noisy releases, and the
report shows none of those either.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv

from engine.errors import LedgerIntegrityError
from engine.ledger import AuditEntry, ClientRecord, Ledger, ScopeBudget
from engine.ledger_format import ADMIN_EVENTS
from engine.loss import Accounting, epsilon_equivalent, format_amount, parse_amount
from engine.release import ReleaseMetadata
from engine.risk import binary_guess_bound

TABLE_NAMES = (
    "budgets",
    "spending",
    "releases",
    "queries",
    "replays",
    "refusals",
    "administration",
    "verification",
)
_SUMMARY_KEY = b"veil.audit"
_REFUSAL_EVENTS = frozenset({"refused", "auth_denied", "admin_refused"})


@dataclass(frozen=True)
class AuditTables:
    """The auditor's tables and what they were built from (`summary`: ledger, accounting, ...)."""

    summary: Mapping[str, str]
    tables: Mapping[str, pa.Table] = field(default_factory=dict)

    def __getitem__(self, name: str) -> pa.Table:
        return self.tables[name]

    @property
    def accounting(self) -> Accounting:
        return Accounting(self.summary["accounting"])

    @property
    def unit(self) -> str:
        return self.accounting.unit

    # -- export --

    def write_csv(self, directory: Path) -> list[Path]:
        """One CSV per table and summary.json; returns the paths written."""
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, table in self.tables.items():
            path = directory / f"{name}.csv"
            pa_csv.write_csv(table, path)
            written.append(path)
        path = directory / "summary.json"
        path.write_text(json.dumps(dict(self.summary), indent=2, sort_keys=True) + "\n")
        written.append(path)
        return written

    def to_ipc(self, names: Sequence[str] | None = None) -> dict[str, bytes]:
        """Each table as an Arrow IPC stream, the summary in its schema metadata."""
        out = {}
        meta = json.dumps(dict(self.summary), sort_keys=True).encode()
        for name in names or list(self.tables):
            table = self.tables[name].replace_schema_metadata({_SUMMARY_KEY: meta})
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            out[name] = bytes(sink.getvalue().to_pybytes())
        return out

    @classmethod
    def from_ipc(cls, streams: Mapping[str, bytes]) -> AuditTables:
        tables: dict[str, pa.Table] = {}
        summary: dict[str, str] = {}
        for name, data in streams.items():
            table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
            raw = (table.schema.metadata or {}).get(_SUMMARY_KEY)
            if raw is not None:
                summary = {str(k): str(v) for k, v in json.loads(raw).items()}
            tables[name] = table.replace_schema_metadata(None)
        return cls(summary, tables)


# ---- building the tables -------------------------------------------------------------------------


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


_TIME = pa.timestamp("us", tz="UTC")


def build_tables(
    ledger: Ledger, *, names: Sequence[str] = TABLE_NAMES, expect_head: str | None = None
) -> AuditTables:
    """Every auditor table named in `names`, from one ledger (open it read-only).

    `expect_head` ("seq:hash", recorded outside the ledger) pins the audit log's head in the
    verification: a log rewritten end to end, hashes and all, then fails it.
    """
    unknown = set(names) - set(TABLE_NAMES)
    if unknown:
        raise ValueError(f"unknown audit tables {sorted(unknown)}; known: {', '.join(TABLE_NAMES)}")
    accounting = ledger.accounting
    delta = ledger.delta
    report = ledger.report()
    records = ledger.releases()
    charges = ledger.charges()
    wanted = set(names)
    # A pinned head is checked even when the verification table is not asked for.
    checked = "verification" in wanted or expect_head is not None
    verification = ledger.verify(expect_head=expect_head) if checked else None

    dataset = report.dataset
    summary = {
        "ledger": str(ledger.path),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "accounting": accounting.value,
        "unit": accounting.unit,
        "delta": repr(delta),
        "audit_head": f"{report.head_seq}:{report.head_hash}",
        "clients": str(len(report.clients)),
        "releases": str(len(records)),
        "replays": str(sum(1 for c in charges if c.kind == "replay")),
        "forfeited": str(
            sum(1 for c in charges if c.state == "committed" and c.release_id is None)
        ),
        "dataset": dataset.name,
        "dataset_spent": format_amount(dataset.spent),
        "dataset_cap": "" if dataset.cap is None else format_amount(dataset.cap),
        "dataset_guess_bound": repr(binary_guess_bound(accounting, float(dataset.spent))),
    }
    if verification is not None:
        summary["verified"] = "true" if verification.ok else "false"
        summary["verification"] = verification.message
        summary["verification_problems"] = json.dumps(list(verification.problems))
        # Without a head kept outside the ledger, a log rewritten end to end still verifies.
        summary["expected_head"] = expect_head or ""

    tables: dict[str, pa.Table] = {}
    release_counts: dict[str, int] = defaultdict(int)
    for record in records:
        release_counts[record.client] += 1
    if "budgets" in wanted:
        scopes = (*report.clients, *report.institutions, report.dataset)
        clients = {c.client_id: c for c in ledger.list_clients()}
        tables["budgets"] = _budgets(scopes, accounting, delta, release_counts, clients)
    log = ledger.audit_log() if wanted & {"spending", "refusals", "administration"} else []
    if "spending" in wanted:
        tables["spending"] = _spending(charges, log, dataset.name, accounting, delta)
    if "releases" in wanted or "queries" in wanted:
        releases = _releases(ledger, records, charges)
        summary["unreadable_releases"] = str(sum(1 for p in releases["problem"].to_pylist() if p))
        if "releases" in wanted:
            tables["releases"] = releases
        if "queries" in wanted:
            tables["queries"] = _queries(releases)
    if "replays" in wanted:
        tables["replays"] = _replays(charges)
    if "refusals" in wanted:
        tables["refusals"] = _refusals(log)
    if "administration" in wanted:
        tables["administration"] = _administration(log)
    if verification is not None and "verification" in wanted:
        tables["verification"] = pa.table(
            {
                "ok": pa.array([verification.ok]),
                "entries": pa.array([verification.entries], type=pa.int64()),
                "head": pa.array([f"{verification.head_seq}:{verification.head_hash}"]),
                "first_bad_seq": pa.array([verification.first_bad_seq], type=pa.int64()),
                "problems": pa.array(["; ".join(verification.problems)]),
                "message": pa.array([verification.message]),
                "expected_head": pa.array([expect_head], type=pa.string()),
            }
        )
    summary["refusals"] = str(tables["refusals"].num_rows) if "refusals" in tables else ""
    return AuditTables(summary, {n: tables[n] for n in TABLE_NAMES if n in tables})


def _budgets(
    scopes: Sequence[ScopeBudget],
    accounting: Accounting,
    delta: float,
    release_counts: Mapping[str, int],
    clients: Mapping[str, ClientRecord],
) -> pa.Table:
    rows: dict[str, list[Any]] = defaultdict(list)
    left = {(s.kind, s.name): s.remaining for s in scopes}
    dataset_left = [s.remaining for s in scopes if s.kind == "dataset"]
    for s in scopes:
        client = clients.get(s.name) if s.kind == "client" else None
        remaining = s.remaining
        rows["kind"].append(s.kind)
        rows["name"].append(s.name)
        rows["cap"].append(None if s.cap is None else format_amount(s.cap))
        rows["spent"].append(format_amount(s.spent))
        rows["held"].append(format_amount(s.held))
        rows["remaining"].append(None if remaining is None else format_amount(remaining))
        rows["can_spend"].append(None if client is None else format_amount(
            _can_spend(client, left, dataset_left)
        ))
        rows["cap_value"].append(None if s.cap is None else float(s.cap))
        rows["spent_value"].append(float(s.spent))
        rows["used_share"].append(float(s.used / s.cap) if s.cap else None)
        rows["spent_epsilon"].append(epsilon_equivalent(accounting, s.spent, delta))
        rows["guess_bound"].append(binary_guess_bound(accounting, float(s.spent)))
        rows["releases"].append(release_counts.get(s.name, 0) if s.kind == "client" else None)
        rows["status"].append(None if client is None else client.status)
        rows["revoked_at"].append(None if client is None else _time(client.revoked_at))
    schema = pa.schema(
        [
            ("kind", pa.string()),
            ("name", pa.string()),
            ("cap", pa.string()),
            ("spent", pa.string()),
            ("held", pa.string()),
            ("remaining", pa.string()),
            ("can_spend", pa.string()),
            ("cap_value", pa.float64()),
            ("spent_value", pa.float64()),
            ("used_share", pa.float64()),
            ("spent_epsilon", pa.float64()),
            ("guess_bound", pa.float64()),
            ("releases", pa.int64()),
            ("status", pa.string()),
            ("revoked_at", _TIME),
        ]
    )
    return pa.table({f.name: rows[f.name] for f in schema}, schema=schema)


def _can_spend(
    client: ClientRecord,
    left: Mapping[tuple[str, str], Fraction | None],
    dataset_left: Sequence[Fraction | None],
) -> Fraction:
    """What a client could still be charged: the least of what its own cap, its institution's
    and the dataset's leave (a client's "remaining" is against its own cap alone); none once
    revoked."""
    if not client.active:
        return Fraction(0)
    limits = [left.get(("client", client.client_id)), *dataset_left]
    if client.institution:
        limits.append(left.get(("institution", client.institution)))
    return max(Fraction(0), min(x for x in limits if x is not None))


def _spending(
    charges: Sequence[Any],
    log: Sequence[AuditEntry],
    dataset: str,
    accounting: Accounting,
    delta: float,
) -> pa.Table:
    """Cumulative spending of every scope, one row per committed charge and scope."""
    # The cap in force at each charge, as its release (or forfeit) entry records it for every
    # scope it counts against: today's caps would rewrite history after a cap change.
    caps: dict[tuple[str, str], Fraction | None] = {}
    for entry in log:
        e = entry.entry
        if e.get("event") in ("release", "forfeit") and e.get("charge_id"):
            for item in e.get("budget") or []:
                cap = item.get("cap")
                key = (str(e["charge_id"]), str(item.get("scope")))
                caps[key] = None if cap is None else parse_amount(cap)
    committed = sorted(
        (c for c in charges if c.kind == "charge" and c.state == "committed"),
        key=lambda c: (c.settled_at or c.reserved_at),
    )
    running: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
    rows: dict[str, list[Any]] = defaultdict(list)
    for charge in committed:
        scopes = [("client", charge.client)]
        if charge.institution:
            scopes.append(("institution", charge.institution))
        scopes.append(("dataset", dataset))
        for kind, name in scopes:
            running[(kind, name)] += charge.amount
            label = f"{kind}:{name}"
            if kind == "dataset" and (charge.charge_id, label) not in caps:
                label = f"dataset:{charge.data_version}"  # schema 1 capped each data version
            # None where the log holds no release entry for the charge (it fails verification).
            cap = caps.get((charge.charge_id, label))
            rows["time"].append(_time(charge.settled_at or charge.reserved_at))
            rows["kind"].append(kind)
            rows["name"].append(name)
            rows["client"].append(charge.client)
            rows["charge_id"].append(charge.charge_id)
            rows["release_id"].append(charge.release_id)
            rows["amount"].append(format_amount(charge.amount))
            rows["cumulative"].append(format_amount(running[(kind, name)]))
            rows["amount_value"].append(float(charge.amount))
            rows["cumulative_value"].append(float(running[(kind, name)]))
            rows["cumulative_epsilon"].append(
                epsilon_equivalent(accounting, running[(kind, name)], delta)
            )
            rows["cap_value"].append(None if cap is None else float(cap))
            rows["remaining_value"].append(
                None if cap is None else float(max(Fraction(0), cap - running[(kind, name)]))
            )
    schema = pa.schema(
        [
            ("time", _TIME),
            ("kind", pa.string()),
            ("name", pa.string()),
            ("client", pa.string()),
            ("charge_id", pa.string()),
            ("release_id", pa.string()),
            ("amount", pa.string()),
            ("cumulative", pa.string()),
            ("amount_value", pa.float64()),
            ("cumulative_value", pa.float64()),
            ("cumulative_epsilon", pa.float64()),
            ("cap_value", pa.float64()),
            ("remaining_value", pa.float64()),  # the cap less what was spent up to this charge
        ]
    )
    return pa.table({f.name: rows[f.name] for f in schema}, schema=schema)


def _release_metadata(
    ledger: Ledger, release_ids: Sequence[str]
) -> dict[str, ReleaseMetadata | str]:
    """Each release's stored metadata, or why it cannot be read: one altered or unreadable
    release must not hide the others from the auditor (verification reports it too)."""
    try:
        return dict(ledger.release_metadata(release_ids))
    except (LedgerIntegrityError, pa.ArrowException, ValueError, KeyError, TypeError):
        pass
    out: dict[str, ReleaseMetadata | str] = {}
    for release_id in release_ids:  # one at a time, to find which
        try:
            out[release_id] = ledger.release_metadata([release_id])[release_id]
        except LedgerIntegrityError:
            out[release_id] = "its stored bytes do not match the hash recorded for them"
        except (pa.ArrowException, ValueError, KeyError, TypeError):
            out[release_id] = "its stored bytes cannot be read as a release"
    return out


def _releases(ledger: Ledger, records: Sequence[Any], charges: Sequence[Any]) -> pa.Table:
    by_charge = {c.charge_id: c for c in charges}
    rows: dict[str, list[Any]] = defaultdict(list)
    metadata = _release_metadata(ledger, [r.release_id for r in records])
    for record in records:
        read = metadata[record.release_id]
        meta = None if isinstance(read, str) else read
        rows["problem"].append(read if isinstance(read, str) else None)
        charge = by_charge.get(record.charge_id)
        rows["created_at"].append(_time(record.created_at))
        rows["release_id"].append(record.release_id)
        rows["charge_id"].append(record.charge_id)
        rows["client"].append(record.client)
        rows["institution"].append(charge.institution if charge else None)
        rows["request_id"].append(charge.request_id if charge else None)
        rows["data_version"].append(record.data_version)
        rows["fingerprint"].append(record.fingerprint)
        rows["canonical_query"].append(record.canonical_query)
        rows["query"].append(describe_query(record.canonical_query))
        rows["measure"].append(meta and meta.measure)
        rows["mechanism"].append(meta and meta.mechanism)
        rows["accounting"].append(meta and meta.accounting)
        rows["loss"].append(format_amount(record.loss))
        rows["loss_value"].append(float(record.loss))
        rows["measured_loss"].append(meta and meta.measured_loss)
        rows["noise_scale"].append(meta and meta.noise_scale)
        rows["tau"].append(meta and meta.tau)
        rows["k"].append(meta and meta.k)
        rows["beta"].append(meta and meta.beta)
        rows["cells"].append(meta and meta.cells)
        rows["suppressed_cells"].append(meta and meta.suppressed_cells)
        rows["unreachable_cells"].append(meta and meta.unreachable_cells)
        rows["suppressed_share"].append(meta and meta.suppressed_share)
        rows["replays"].append(record.replays)
        rows["sha256"].append(record.sha256)
    schema = pa.schema(
        [
            ("created_at", _TIME),
            ("release_id", pa.string()),
            ("charge_id", pa.string()),
            ("client", pa.string()),
            ("institution", pa.string()),
            ("request_id", pa.string()),
            ("data_version", pa.string()),
            ("fingerprint", pa.string()),
            ("canonical_query", pa.string()),
            ("query", pa.string()),
            ("measure", pa.string()),
            ("mechanism", pa.string()),
            ("accounting", pa.string()),
            ("loss", pa.string()),
            ("loss_value", pa.float64()),
            ("measured_loss", pa.string()),
            ("noise_scale", pa.float64()),
            ("tau", pa.int64()),
            ("k", pa.int64()),
            ("beta", pa.float64()),
            ("cells", pa.int64()),
            ("suppressed_cells", pa.int64()),
            ("unreachable_cells", pa.int64()),  # null for releases made before they were counted
            ("suppressed_share", pa.float64()),
            ("replays", pa.int64()),
            ("sha256", pa.string()),
            ("problem", pa.string()),  # why its stored metadata cannot be read; null when read
        ]
    )
    return pa.table({f.name: rows[f.name] for f in schema}, schema=schema)


def _queries(releases: pa.Table) -> pa.Table:
    # By fingerprint alone: every data version of the dataset describes the same people and is
    # paid for from one dataset cap, so a draw on a new version adds to the loss of the others.
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in releases.to_pylist():
        groups[row["fingerprint"]].append(row)
    rows: dict[str, list[Any]] = defaultdict(list)
    for fingerprint, items in groups.items():
        total = sum((parse_amount(r["loss"]) for r in items), Fraction(0))
        rows["fingerprint"].append(fingerprint)
        rows["data_versions"].append(", ".join(dict.fromkeys(r["data_version"] for r in items)))
        rows["query"].append(items[0]["query"])
        rows["releases"].append(len(items))
        rows["total_loss"].append(format_amount(total))
        rows["total_loss_value"].append(float(total))
        rows["clients"].append(", ".join(sorted({r["client"] for r in items})))
        rows["replays"].append(sum(r["replays"] for r in items))
        rows["first"].append(min(r["created_at"] for r in items))
        rows["last"].append(max(r["created_at"] for r in items))
    schema = pa.schema(
        [
            ("fingerprint", pa.string()),
            ("data_versions", pa.string()),  # those it was drawn on, first drawn first
            ("query", pa.string()),
            ("releases", pa.int64()),
            ("total_loss", pa.string()),
            ("total_loss_value", pa.float64()),
            ("clients", pa.string()),
            ("replays", pa.int64()),
            ("first", _TIME),
            ("last", _TIME),
        ]
    )
    table = pa.table({f.name: rows[f.name] for f in schema}, schema=schema)
    return table.sort_by([("releases", "descending"), ("total_loss_value", "descending")])


def _replays(charges: Sequence[Any]) -> pa.Table:
    items = [c for c in charges if c.kind == "replay"]
    return pa.table(
        {
            "time": pa.array([_time(c.settled_at or c.reserved_at) for c in items], type=_TIME),
            "client": pa.array([c.client for c in items], type=pa.string()),
            "request_id": pa.array([c.request_id for c in items], type=pa.string()),
            "release_id": pa.array([c.release_id for c in items], type=pa.string()),
            "fingerprint": pa.array([c.fingerprint for c in items], type=pa.string()),
            "requested": pa.array([format_amount(c.requested) for c in items], type=pa.string()),
        }
    )


def _log_table(
    log: Sequence[AuditEntry],
    events: frozenset[str],
    columns: Sequence[tuple[str, pa.DataType]],
    rows_of: Callable[[Mapping[str, Any]], Iterable[Mapping[str, Any]]],
) -> pa.Table:
    """Rows from the audit-log entries of `events`: each entry's seq, time, event and client,
    then `columns` as `rows_of(entry)` gives them (one row per mapping it yields)."""
    schema = pa.schema(
        [("seq", pa.int64()), ("time", _TIME), ("event", pa.string()), ("client", pa.string()),
         *columns]
    )
    rows: dict[str, list[Any]] = defaultdict(list)
    for entry in log:
        e = entry.entry
        if e.get("event") not in events:
            continue
        for extra in rows_of(e):
            row = {"seq": entry.seq, "time": _time(e.get("time")), "event": e.get("event"),
                   "client": e.get("client"), **extra}
            for name in schema.names:
                rows[name].append(row[name])
    return pa.table({f.name: rows[f.name] for f in schema}, schema=schema)


def _administration(log: Sequence[AuditEntry]) -> pa.Table:
    def rows_of(e: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
        detail = e.get("detail") or {}
        other = ", ".join(f"{k}={v}" for k, v in sorted(detail.items()) if k != "actor")
        for scope in e.get("budget") or [{}]:  # a row per scope the change touched
            yield {
                "scope": scope.get("scope"),
                "cap_before": scope.get("cap_before"),
                "cap": scope.get("cap"),
                "actor": detail.get("actor"),
                "detail": other[:300],
            }

    columns = [(name, pa.string()) for name in ("scope", "cap_before", "cap", "actor", "detail")]
    return _log_table(log, ADMIN_EVENTS, columns, rows_of)


def _refusals(log: Sequence[AuditEntry]) -> pa.Table:
    def rows_of(e: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
        detail = e.get("detail") or {}
        yield {
            "outcome": e.get("outcome"),
            "fingerprint": e.get("fingerprint"),
            "charge": e.get("charge"),
            "reason": str(detail.get("reason", ""))[:300],
            "method": detail.get("method"),
            # Refused credentials the server's audit rate limits left out before this entry.
            "unrecorded_before": detail.get("unrecorded_before"),
        }

    names = ("outcome", "fingerprint", "charge", "reason", "method", "unrecorded_before")
    return _log_table(log, _REFUSAL_EVENTS, [(name, pa.string()) for name in names], rows_of)


# ---- describing a canonical query ----------------------------------------------------------------


def describe_query(canonical: str, *, width: int = 160) -> str:
    """A canonical query as one line, in the words the client uses for it (its summaries and
    release lists): "count by gender where majorityStatus = 'Minor'", so that an auditor and a
    researcher read a query alike. A list of more than six codes is shortened."""
    try:
        raw = json.loads(canonical)
        measure = raw["measure"]
        if measure == "count":
            text = "count"
        elif "flag_counts" in measure:
            text = f"flag counts of {measure['flag_counts']}"
        elif "proportion" in measure:
            text = f"proportion with {_describe_filter(measure['proportion'])[0]}"
        else:
            ((kind, variable),) = measure.items()
            text = f"{kind} of {variable}"
        if raw.get("by"):
            text += " by " + ", ".join(str(name) for name in raw["by"])
        where = raw.get("where", True)
        if where is not True:
            text += " where " + _describe_filter(where)[0]
    except (ValueError, TypeError, KeyError, AttributeError):
        return canonical[:width]
    return text if len(text) <= width else text[: width - 3] + "..."


def _quoted(code: Any) -> str:
    return repr(code) if isinstance(code, int) else "'" + str(code).replace("'", "''") + "'"


def _describe_filter(node: Any) -> tuple[str, str]:
    """A canonical filter as SQL, and whether it is an "and", an "or" or an "atom" (to bracket
    it inside another). The client writes the same text (`client.query.query_of_canonical`)."""
    if node is True or node is False:
        return ("TRUE" if node else "FALSE"), "atom"
    if "var" in node:
        variable, codes = node["var"], list(node["in"])
        parts = []
        integers = sorted(codes) if all(isinstance(c, int) for c in codes) else []
        if len(integers) >= 3 and integers == list(range(integers[0], integers[-1] + 1)):
            parts.append(f"{variable} BETWEEN {integers[0]} AND {integers[-1]}")
        elif len(codes) == 1:
            parts.append(f"{variable} = {_quoted(codes[0])}")
        elif codes:
            shown = [_quoted(c) for c in (integers or codes)]
            more = f", ... ({len(shown)} values)" if len(shown) > 6 else ""
            parts.append(f"{variable} IN ({', '.join(shown[:6])}{more})")
        if node.get("missing"):
            parts.append(f"{variable} IS NULL")
        if not parts:
            return "FALSE", "atom"
        return " OR ".join(parts), "or" if len(parts) > 1 else "atom"
    kind = "and" if "and" in node else "or"
    other = "or" if kind == "and" else "and"
    texts = []
    for operand in node[kind]:
        text, inner = _describe_filter(operand)
        texts.append(f"({text})" if inner == other else text)
    return f" {kind.upper()} ".join(texts), kind


# ---- the one-page report -------------------------------------------------------------------------


def spending_figure_png(tables: AuditTables) -> bytes | None:
    """Cumulative spending over time (per client, and the dataset against its cap) and each
    client's spent and remaining budget, as one PNG; None when nothing was spent."""
    import matplotlib.pyplot as plt

    figure = spending_figure(tables)
    if figure is None:
        return None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def spending_figure(tables: AuditTables) -> Any:
    """The matplotlib figure of `spending_figure_png` (close it with pyplot.close), or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    spending = tables.tables.get("spending")
    budgets = tables.tables.get("budgets")
    if spending is None or budgets is None or spending.num_rows == 0:
        return None
    rows = spending.to_pylist()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), width_ratios=(3, 2))
    series: dict[tuple[str, str], list[tuple[datetime, float]]] = defaultdict(list)
    caps: dict[tuple[str, str], float | None] = {}
    for row in rows:
        series[(row["kind"], row["name"])].append((row["time"], row["cumulative_value"]))
        caps[(row["kind"], row["name"])] = row["cap_value"]
    end = max(row["time"] for row in rows)
    for (kind, name), points in series.items():
        if kind == "institution":
            continue
        # Each step held to the last charge of all, a marker at each charge of its own: a
        # client with one charge, or charges close together, is a point rather than nothing.
        times = [p[0] for p in points] + [end]
        values = [p[1] for p in points] + [points[-1][1]]
        style: dict[str, Any] = {
            "where": "post",
            "linewidth": 1.4,
            "marker": "o",
            "markersize": 4,
            "markevery": list(range(len(points))),
        }
        if kind == "dataset":
            style.update(color="black", linewidth=2.2)
        line = left.step(times, values, label=f"{kind} {name}"[:40], **style)[0]
        cap = caps[(kind, name)]
        if cap is not None and kind == "dataset":
            left.axhline(cap, color=line.get_color(), linestyle="--", linewidth=1,
                         label=f"dataset cap {cap:g}")
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    left.xaxis.set_major_locator(locator)
    left.xaxis.set_major_formatter(
        mdates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
    )
    left.set_title(f"Cumulative privacy loss ({tables.unit}) over time", fontsize=10)
    left.set_ylabel(tables.unit)
    left.set_ylim(bottom=0)
    left.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    left.grid(alpha=0.3)
    left.tick_params(labelsize=8)

    clients = [r for r in budgets.to_pylist() if r["kind"] == "client"]
    names = [r["name"] for r in clients]
    spent = [r["spent_value"] for r in clients]
    caps_list = [r["cap_value"] or 0.0 for r in clients]
    right.barh(names, caps_list, color="#dddddd", label="cap")
    right.barh(names, spent, color="#c0392b", label="spent")
    right.set_title(f"Spent against each client's cap ({tables.unit})", fontsize=10)
    right.legend(fontsize=7, loc="lower right")
    right.invert_yaxis()
    right.tick_params(labelsize=8)
    figure.tight_layout()
    return figure


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; max-width: 1100px; font-size: 13px; }
h1 { font-size: 20px; margin: 0 0 4px 0; } h2 { font-size: 15px; margin: 18px 0 6px 0; }
.sub { color: #666; margin-bottom: 12px; }
.banner { padding: 8px 12px; border-radius: 4px; font-weight: 600; margin: 8px 0; }
.ok { background: #e6f4ea; color: #1e7e34; } .bad { background: #fdecea; color: #b71c1c; }
.figures { display: flex; gap: 10px; flex-wrap: wrap; margin: 10px 0; }
.figure { border: 1px solid #ddd; border-radius: 4px; padding: 6px 10px; min-width: 130px; }
.figure b { display: block; font-size: 17px; }
table { border-collapse: collapse; width: 100%; margin-bottom: 4px; }
th, td { border-bottom: 1px solid #eee; padding: 3px 6px; text-align: left; font-size: 12px; }
th { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.flag { color: #b71c1c; font-weight: 600; } .note { color: #666; font-size: 11px; }
img { max-width: 100%; }
"""


def render_html(tables: AuditTables, *, max_rows: int = 20) -> str:
    """The one-page report: verification, key figures, spending plots, budgets, recent releases,
    repeated queries and refusals. Long tables show their last `max_rows` rows."""
    s = tables.summary
    unit = tables.unit
    zcdp = tables.accounting is Accounting.ZCDP
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>veil audit report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>veil audit report</h1>",
        f"<div class='sub'>ledger {esc(s.get('ledger', ''))} &middot; generated "
        f"{esc(s.get('generated_at', ''))} &middot; accounting {esc(s.get('accounting', ''))} "
        f"({esc(unit)}{', delta ' + esc(s.get('delta', '')) if zcdp else ''})"
        f" &middot; audit head {esc(s.get('audit_head', '')[:24])}&hellip;</div>",
    ]
    if "verified" in s:
        good = s["verified"] == "true"
        parts.append(
            f"<div class='banner {'ok' if good else 'bad'}'>"
            f"{'&#10004;' if good else '&#10008;'} {esc(s.get('verification', ''))}</div>"
        )
        problems = json.loads(s.get("verification_problems") or "[]")[1:]  # the first is above
        if problems:
            items = [f"<li>{esc(p)}</li>" for p in problems[:max_rows]]
            if len(problems) > max_rows:
                items.append(f"<li>and {len(problems) - max_rows} more</li>")
            parts.append(f"<ul class='flag'>{''.join(items)}</ul>")
        pinned = s.get("expected_head")
        parts.append(
            f"<p class='note'>Audit head pinned to {esc(pinned)}, recorded outside the ledger.</p>"
            if pinned
            else "<p class='note'>Audit head not pinned: a log rewritten end to end, its hashes "
            "recomputed, would verify. Give a head recorded earlier outside the ledger with "
            "<code>--expect-head SEQ:HASH</code>.</p>"
        )
    releases = tables.tables.get("releases")
    refusals = tables.tables.get("refusals")
    queries = tables.tables.get("queries")
    repeated = (
        [q for q in queries.to_pylist() if q["releases"] > 1] if queries is not None else []
    )
    mostly_suppressed = (
        sum(1 for r in releases.to_pylist() if (r["suppressed_share"] or 0) > 0.5)
        if releases
        else 0
    )
    unreadable = int(s.get("unreadable_releases") or 0)
    budget_refusals = (
        sum(1 for r in refusals.to_pylist() if r["outcome"] == "budget_exceeded")
        if refusals is not None
        else 0
    )
    denied = (
        sum(
            1 + int(r["unrecorded_before"] or 0)
            for r in refusals.to_pylist()
            if r["event"] == "auth_denied"
        )
        if refusals is not None
        else 0
    )
    cap = s.get("dataset_cap") or "no cap"
    bound = float(s.get("dataset_guess_bound", "0.5"))
    figures = [
        (f"{s.get('dataset_spent', '0')} / {cap}", f"dataset {unit} spent / cap"),
        (f"{bound:.3f}", "highest chance to guess one person's yes/no attribute"),
        (s.get("clients", "0"), "clients"),
        (s.get("releases", "0"), "releases"),
        (s.get("replays", "0"), "free replays"),
        (str(len(repeated)), "queries drawn more than once"),
        (str(mostly_suppressed), "releases over half suppressed"),
        (str(budget_refusals), "refused: budget exceeded"),
        (str(denied), "refused credentials"),
    ]
    if s.get("forfeited", "0") != "0":
        figures.insert(5, (s["forfeited"], "charged, stopped by the time limit"))
    if unreadable:
        figures.insert(4, (str(unreadable), "releases altered or unreadable"))
    parts.append("<div class='figures'>")
    parts.extend(
        f"<div class='figure'><b>{esc(value)}</b>{esc(label)}</div>" for value, label in figures
    )
    parts.append("</div>")
    png = spending_figure_png(tables)
    if png is not None:
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f"<img alt='spending over time' src='data:image/png;base64,{encoded}'>")
    else:
        parts.append("<p class='note'>Nothing has been spent yet.</p>")

    budgets = tables.tables.get("budgets")
    if budgets is not None:
        parts.append(f"<h2>Budgets ({esc(unit)})</h2>")
        columns = [
            ("kind", "scope", None),
            ("name", "name", None),
            ("cap", "cap", "num"),
            ("spent", "spent", "num"),
            ("held", "held", "num"),
            ("remaining", "remaining", "num"),
            ("can_spend", "can still spend", "num"),
            ("used_share", "used", "pct"),
            ("guess_bound", "guess bound", "fixed"),
            ("releases", "releases", "num"),
            ("status", "status", None),
            ("revoked_at", "revoked", "time"),
        ]
        if zcdp:
            columns.insert(7, ("spent_epsilon", "spent (eps at delta)", "fixed"))
        parts.append(_html_table(budgets.to_pylist(), columns, flag=_over_nine_tenths))
    if releases is not None:
        rows = releases.to_pylist()
        parts.append(f"<h2>Releases ({len(rows)}; the last {min(len(rows), max_rows)})</h2>")
        parts.append(
            _html_table(
                rows[-max_rows:],
                [
                    ("created_at", "time", "time"),
                    ("client", "client", None),
                    ("query", "query", None),
                    ("mechanism", "mechanism", None),
                    ("loss", "charge", "num"),
                    ("noise_scale", "scale", "fixed"),
                    ("tau", "tau", "num"),
                    ("cells", "cells", "num"),
                    ("unreachable_cells", "empty by its terms", "num"),
                    ("suppressed_share", "suppressed", "pct"),
                    ("replays", "replays", "num"),
                    ("fingerprint", "fingerprint", "short"),
                    ("problem", "problem", None),
                ],
                flag=lambda r: r["problem"] or (r["suppressed_share"] or 0) > 0.5,
            )
        )
        bad = [r for r in rows[:-max_rows] if r["problem"]]  # not among the rows shown
        if bad:
            parts.append("<h2>Earlier releases altered or unreadable</h2>")
            parts.append(
                _html_table(
                    bad[-max_rows:],
                    [
                        ("created_at", "time", "time"),
                        ("release_id", "release", None),
                        ("client", "client", None),
                        ("query", "query", None),
                        ("problem", "problem", None),
                    ],
                    flag=lambda r: True,
                )
            )
    if repeated:
        shown = (
            f"{len(repeated)}"
            if len(repeated) <= max_rows
            else f"{len(repeated)}; the {max_rows} drawn most often"
        )
        parts.append(f"<h2>Queries drawn more than once ({shown}; their losses add up)</h2>")
        parts.append(
            _html_table(
                repeated[:max_rows],
                [
                    ("query", "query", None),
                    ("releases", "draws", "num"),
                    ("data_versions", "data versions", None),
                    ("total_loss", f"total {unit}", "num"),
                    ("clients", "clients", None),
                    ("fingerprint", "fingerprint", "short"),
                ],
            )
        )
    parts += _recent(
        "Refusals",
        refusals,
        [
            ("time", "time", "time"),
            ("event", "event", None),
            ("client", "client", None),
            ("outcome", "outcome", None),
            ("reason", "reason", None),
        ],
        max_rows,
    )
    parts += _recent(
        "Administration",
        tables.tables.get("administration"),
        [
            ("time", "time", "time"),
            ("event", "event", None),
            ("client", "client", None),
            ("scope", "scope", None),
            ("cap_before", "cap before", None),
            ("cap", "cap", None),
            ("actor", "by", None),
        ],
        max_rows,
    )
    parts.append(
        "<p class='note'>Read from the ledger only: no data value, true or noisy, appears here. "
        "The suppressed share of a release is read from its stored metadata, and is of the "
        "cells its query's own terms do not leave empty (those are stated, not withheld; blank "
        "for releases made before they were counted). The guess bound is "
        "the highest chance that anyone holding every release charged to a scope guesses one "
        "person's yes/no attribute correctly (against 0.5 for a coin toss). All tables are "
        "available as CSV with <code>veil audit tables</code>.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _recent(
    title: str,
    table: pa.Table | None,
    columns: Sequence[tuple[str, str, str | None]],
    max_rows: int,
) -> list[str]:
    """A heading and the last `max_rows` rows of a table of audit-log entries; none when empty."""
    if table is None or not table.num_rows:
        return []
    rows = table.to_pylist()
    heading = f"<h2>{title} ({len(rows)}; the last {min(len(rows), max_rows)})</h2>"
    return [heading, _html_table(rows[-max_rows:], columns)]


def _over_nine_tenths(row: Mapping[str, Any]) -> bool:
    share = row.get("used_share")
    return share is not None and share > 0.9


def _html_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str, str | None]],
    *,
    flag: Any = None,
) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(title)}</th>" for _, title, _ in columns)
    body = []
    for row in rows:
        cells = []
        for key, _, kind in columns:
            value = row.get(key)
            if value is None:
                text = ""
            elif kind == "pct":
                # One decimal: a share flagged as over half must not read "50%".
                text = f"{100 * float(value):.1f}%"
            elif kind == "fixed":
                text = f"{float(value):.3g}"
            elif kind == "time" and isinstance(value, datetime):
                text = value.strftime("%Y-%m-%d %H:%M:%S")
            elif kind == "short":
                text = str(value)[:12]
            else:
                text = str(value)
            css = " class='num'" if kind in ("num", "pct", "fixed") else ""
            cells.append(f"<td{css}>{esc(text)}</td>")
        marked = " class='flag'" if flag is not None and flag(row) else ""
        body.append(f"<tr{marked}>{''.join(cells)}</tr>")
    if not body:
        return "<p class='note'>none</p>"
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


__all__ = ["TABLE_NAMES", "AuditTables", "build_tables", "describe_query", "render_html"]
