"""Table packs: a set of standard tables priced as a whole, released in order, and pinned.

A modeler who pulls the same tables every cycle writes them once, in a TOML spec:

    epsilon = 0.1                     # the loss of every table (or rho, or loss)
    [tables.gender_age]
    sql = "SELECT gender, ageBroad, COUNT(*) FROM records GROUP BY gender, ageBroad"
    [tables.sexual_share_minors]
    sql = "SELECT gender, PROPORTION(isSexualExploit = 1) FROM records WHERE ..."
    epsilon = 0.2                     # this table's own loss
    [tables.citizenship_region]
    sql = "SELECT citizenshipRegion, COUNT(*) FROM records GROUP BY citizenshipRegion"
    half_width = 50                   # or a target accuracy: counts within +/- 50 records

and then, from Python:

    from client.pack import Pack, dry_run_pack, release_pack
    pack = Pack.from_toml("standard_tables.toml")
    dry_run_pack(veil_client, pack)                      # free: each table, the total, the fit
    releases = release_pack(veil_client, pack, manifest="out/manifest.json")

or from the shell: `veil pack standard_tables.toml --dry-run`, then `veil pack
standard_tables.toml --out out/`.

A dry run of each table alone checks it against what remains now, so six tables can each fit
while the six together do not. `dry_run_pack` adds the tables up in order (a table released
before, pinned by the manifest, or a repeat of an earlier table of the pack costs 0) and says
whether the total fits and which table is the first that would not. `release_pack` refuses the
whole pack, charging nothing, when it does not fit. A table that gives `half_width` (records,
either side of each count, at the deployment's confidence; `confidence = 0.95` states the level
it is meant at, refused if the server's differs) in place of a loss is priced by the server's
dry run for it, and released at the loss that dry run returns.

The manifest (JSON) records, for each table, the request id it is released under, and once it
is, its release id, data version, query fingerprint and charge. A request id already answered
returns exactly that release again, free: running the pack again with the same manifest gives
the same numbers even if someone has since released the same query at a larger loss (which
would otherwise be served), and a run stopped halfway resumes, the tables already released
coming back free. The manifest also records the loss each table is released at, a half-width's
as priced when its request id was handed out: a run resumed or repeated asks that loss again
rather than pricing the half-width anew (the server's settings may have changed since, and
another loss would be another request). Request ids belong to one client on one data version:
a manifest written by another client, or for releases of a data version the server no longer
serves, is refused before anything is charged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from client import query as q
from client.amounts import Amount, format_amount, parse_amount
from client.connection import Client, decimal_text
from client.errors import (
    BudgetExhausted,
    InvalidQuery,
    PermissionDenied,
    RequestConflict,
    UnsupportedSQL,
    VeilError,
)
from client.results import Budget, DryRun, Release

LOSS_NAMES = ("epsilon", "rho", "loss")
SPEC_KEYS = ("tables", *LOSS_NAMES)
TABLE_KEYS = ("sql", *LOSS_NAMES, "half_width", "confidence")
# The wire's largest integer, the most a half-width may be (protos/veil/v1/veil.proto).
_INT64_MAX = 2**63 - 1
MANIFEST_FORMAT = "veil.pack-manifest/1"
# A table's name is also its output file's: no path separators, no leading dot.
_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
# How many of the caller's latest releases are searched for what a pack's request cost, when
# the release call's own answer leaves it open (see `_costs`): as many as the server lists at
# once (its max_list_releases, 1000 by default).
_LISTED = 2**31 - 1


# ---- errors -------------------------------------------------------------------------------------


class PackSpecError(VeilError, ValueError):
    """A pack spec or manifest that cannot be used as written: not TOML (or JSON), an unknown
    key, a table without SQL or without a loss. `table` names the table at fault, when one is.
    Nothing was asked of any server."""

    def __init__(self, message: str, *, table: str | None = None) -> None:
        super().__init__(message)
        self.table = table


class PackDoesNotFit(BudgetExhausted):
    """The pack's total cost is more than remains; nothing was charged. `pricing` is the
    pack's `PackPricing`; `total` its cost, `first_short` the first table that would not fit
    (with `scope` and `remaining` as in BudgetExhausted)."""

    def __init__(self, pricing: PackPricing) -> None:
        assert pricing.remaining is not None and pricing.first_short is not None
        name = pricing.loss_name
        super().__init__(
            f"the pack costs {name} {pricing.total} in all and {pricing.remaining} remains "
            f"({pricing.limiting_scope or 'client'} budget); table {pricing.first_short} is the "
            f"first that does not fit. Nothing was charged",
            scope=pricing.limiting_scope, remaining=format_amount(pricing.remaining),
        )
        self.pricing = pricing
        self.total = pricing.total
        self.first_short = pricing.first_short


class ManifestConflict(RequestConflict):
    """The manifest cannot pin this pack: it was written by another client, pins releases of a
    data version the server no longer serves, or pins a table whose query or loss has changed
    since. Nothing was charged. `table` names the table at fault, when one is."""

    def __init__(self, message: str, *, table: str | None = None) -> None:
        super().__init__(message)
        self.table = table


def _naming(table: str, error: InvalidQuery) -> InvalidQuery:
    """`error` again, of the same class, its message naming the pack's table."""
    if isinstance(error, UnsupportedSQL):
        return UnsupportedSQL(
            f"table {table}: {error.reason}", variable=error.variable, malformed=error.malformed
        )
    return InvalidQuery(
        f"table {table}: {error.message}", variable=error.variable, code=error.code,
        request_id=error.request_id,
    )


# ---- the pack -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackTable:
    """One table of a pack: its name (also its output file's), its query, and either the loss
    it is released at (exact) or `half_width`, the target accuracy of its count intervals (in
    records, either side, at the deployment's confidence; `confidence`, when given, is the
    level the table expects, refused if the server's differs). A half-width is priced by the
    server's dry run, and the table released at the loss that dry run returns (see
    `dry_run_pack`). `sql` is the text it was written as, when it was SQL."""

    name: str
    query: q.Query
    loss: Amount | None = None
    sql: str | None = None
    half_width: int | None = None
    confidence: float | None = None

    def __post_init__(self) -> None:
        if (self.loss is None) == (self.half_width is None):
            given = "both a loss and" if self.loss is not None else "neither a loss nor"
            raise PackSpecError(f"table {self.name} gives {given} a half_width; give exactly "
                                f"one", table=str(self.name))
        if self.confidence is not None and self.half_width is None:
            raise PackSpecError(f"table {self.name}: confidence is the level of a half_width; "
                                f"give half_width too", table=str(self.name))


@dataclass(frozen=True)
class Pack:
    """An ordered set of named tables, each a query and the loss to release it at, or a target
    half-width its loss is priced from (see `PackTable`).

    `loss_name` is how the losses are named ("epsilon" under pure DP, "rho" under zCDP, or
    "loss" for either); the server refuses a name that is not its accounting's. Build one from
    a TOML spec (`Pack.from_toml`) or from a mapping (`Pack.of`)."""

    tables: tuple[PackTable, ...]
    loss_name: str = "loss"
    source: str | None = None  # the spec file it was read from

    def __post_init__(self) -> None:
        if self.loss_name not in LOSS_NAMES:
            raise PackSpecError(f"a pack's losses are named {', '.join(LOSS_NAMES)}, "
                                f"not {self.loss_name!r}")
        if not self.tables:
            raise PackSpecError(f"{self._where}the pack has no tables")
        seen: dict[str, str] = {}
        for table in self.tables:
            if not isinstance(table.name, str) or not _TABLE_NAME.fullmatch(table.name):
                raise PackSpecError(
                    f"{self._where}table name {table.name!r}: a name is letters, digits, '_' "
                    f"and '-' (at most 100, not starting with '_' or '-'), since it names the "
                    f"table's file", table=str(table.name),
                )
            # Told apart by case alone, two tables would write one file on some file systems.
            other = seen.setdefault(table.name.lower(), table.name)
            if other != table.name or sum(t.name == table.name for t in self.tables) > 1:
                raise PackSpecError(f"{self._where}table {table.name!r} is named twice "
                                    f"(names are compared regardless of case)", table=table.name)
            if not isinstance(table.query, q.Query):
                raise TypeError(f"table {table.name}: expected a veil query, got "
                                f"{type(table.query).__name__}")

    @property
    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    @classmethod
    def of(
        cls, tables: Mapping[str, tuple[str | q.Query, Any]], *, loss_name: str = "loss"
    ) -> Pack:
        """A pack from `{name: (query, loss)}`, in the mapping's order. A query is SQL text in
        veil's subset or a query object; a loss is what `release` takes (decimal text, a
        Decimal, an int, a Fraction). Bad SQL or a bad loss raises InvalidQuery (UnsupportedSQL
        for SQL) naming the table."""
        made = []
        for name, (query, loss) in tables.items():
            made.append(_table(name, query, loss, loss_name))
        return cls(tuple(made), loss_name=loss_name)

    @classmethod
    def from_toml(cls, path: str | Path) -> Pack:
        """The pack a TOML spec file describes (see the module's docstring). An unreadable file
        or an unknown key raises PackSpecError; bad SQL or a bad loss, InvalidQuery naming the
        table. Nothing is asked of any server."""
        path = Path(path)
        try:
            text = path.expanduser().read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise PackSpecError(f"cannot read the pack spec {path}: {why}") from None
        try:
            spec = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PackSpecError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_spec(spec, source=str(path))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], *, source: str | None = None) -> Pack:
        """The pack a spec describes, as parsed from TOML: `tables` (name -> {sql, and a loss,
        or `half_width` and optionally `confidence` in its place}) and a default loss
        (`epsilon`, `rho` or `loss`) for the tables that give neither. A table that gives both
        a loss and a half-width, a half-width that is not a whole number from 1, or a
        confidence without a half-width, raises PackSpecError naming the table."""
        where = f"{source}: " if source else ""
        _refuse_unknown(spec, SPEC_KEYS, where, "the spec")
        default_name, default = _one_loss(spec, where, "the spec's default")
        tables = spec.get("tables")
        if not isinstance(tables, Mapping) or not tables:
            raise PackSpecError(
                f"{where}no tables: write each as [tables.NAME] with sql = \"SELECT ...\""
            )
        names = {default_name} - {None, "loss"}
        made = []
        for name, entry in tables.items():
            if not isinstance(entry, Mapping):
                raise PackSpecError(
                    f"{where}tables.{name} is not a table: write [tables.{name}] with "
                    f"sql = \"SELECT ...\"", table=name,
                )
            _refuse_unknown(entry, TABLE_KEYS, where, f"table {name}", table=name)
            sql = entry.get("sql")
            if not isinstance(sql, str) or not sql.strip():
                raise PackSpecError(f"{where}table {name} has no sql = \"SELECT ...\"",
                                    table=name)
            own_name, own = _one_loss(entry, where, f"table {name}", table=name)
            half_width, confidence = _accuracy(entry, own_name, where, name)
            if own_name is None and half_width is None and default_name is None:
                raise PackSpecError(
                    f"{where}table {name} has no loss: give the spec a default (epsilon = ..., "
                    f"rho = ... or loss = ... before the tables) or the table its own, or a "
                    f"target half_width = N (records, either side of each count)",
                    table=name,
                )
            if half_width is not None:
                made.append(_table(name, sql, None, "loss", half_width=half_width,
                                   confidence=confidence))
                continue
            names |= {own_name} - {None, "loss"}
            made.append(_table(name, sql, own if own_name is not None else default,
                               own_name or default_name or "loss"))
        if len(names) > 1:
            raise PackSpecError(
                f"{where}the spec names losses both {' and '.join(sorted(str(n) for n in names))}"
                f"; a deployment accounts one way: use one of them (or loss) throughout"
            )
        loss_name = next(iter(names)) if names else "loss"
        return cls(tuple(made), loss_name=str(loss_name), source=source)

    # -- reading it --
    def __len__(self) -> int:
        return len(self.tables)

    def __iter__(self) -> Iterator[PackTable]:
        return iter(self.tables)

    def __getitem__(self, name: str) -> PackTable:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [table.name for table in self.tables]


def _refuse_unknown(
    spec: Mapping[str, Any], known: tuple[str, ...], where: str, what: str,
    table: str | None = None,
) -> None:
    unknown = sorted(str(key) for key in spec if key not in known)
    if unknown:
        raise PackSpecError(
            f"{where}{what} has unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; the keys it takes are {', '.join(known)}",
            table=table,
        )


def _one_loss(
    spec: Mapping[str, Any], where: str, what: str, table: str | None = None
) -> tuple[str | None, Any]:
    given = [name for name in LOSS_NAMES if name in spec]
    if len(given) > 1:
        raise PackSpecError(f"{where}{what} gives {' and '.join(given)}; give one loss",
                            table=table)
    return (given[0], spec[given[0]]) if given else (None, None)


def _accuracy(
    entry: Mapping[str, Any], own_loss: str | None, where: str, name: str
) -> tuple[int | None, float | None]:
    """A table's `half_width` and `confidence` (None when not given), checked: a half-width is
    a whole number of records from 1, given in place of a loss, not with one; a confidence is
    the level it is meant at, a number from 0.5 to below 1."""
    if "half_width" not in entry:
        if "confidence" in entry:
            raise PackSpecError(
                f"{where}table {name} gives confidence without half_width: confidence is the "
                f"level of a target half_width", table=name,
            )
        return None, None
    if own_loss is not None:
        raise PackSpecError(
            f"{where}table {name} gives both {own_loss} and half_width; give one: a loss, or "
            f"the half-width whose least loss the server prices", table=name,
        )
    half_width = entry["half_width"]
    if isinstance(half_width, bool) or not isinstance(half_width, int) or not (
        1 <= half_width <= _INT64_MAX
    ):
        raise PackSpecError(
            f"{where}table {name}: half_width is how far each count's interval may reach either "
            f"side, in records: a whole number from 1 (half_width = 50), got {half_width!r}",
            table=name,
        )
    confidence = entry.get("confidence")
    if confidence is not None and (
        isinstance(confidence, bool) or not isinstance(confidence, (int, float))
        or not 0.5 <= confidence < 1
    ):
        raise PackSpecError(
            f"{where}table {name}: confidence is the level of the half-width's intervals, a "
            f"number from 0.5 to below 1 (confidence = 0.95), got {confidence!r}", table=name,
        )
    return half_width, None if confidence is None else float(confidence)


def _table(
    name: str, query: str | q.Query, loss: Any, loss_name: str, *,
    half_width: int | None = None, confidence: float | None = None,
) -> PackTable:
    try:
        exact = (None if half_width is not None
                 else Amount(parse_amount(decimal_text(loss, loss_name)) or 0))
        if isinstance(query, str):
            from client.sql import parse_sql

            return PackTable(name, parse_sql(query), exact, sql=query, half_width=half_width,
                             confidence=confidence)
    except InvalidQuery as exc:
        raise _naming(name, exc) from None
    if not isinstance(query, q.Query):
        raise TypeError(f"table {name}: a query is SQL text or a veil query, got "
                        f"{type(query).__name__}")
    return PackTable(name, query, exact, half_width=half_width, confidence=confidence)


# ---- the manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    """One table's line of a manifest: the request id it is released under, what was asked,
    and, once released, the release it received. `loss` is the loss it is released at (exact
    text): the table's own, or, for a table that gives `half_width`, the loss the server priced
    that half-width at when the request id was handed out, which a run resuming or repeating the
    pack releases at again rather than pricing the half-width anew. `charged` is what the
    request cost (exact text; None when not known)."""

    request_id: str
    query: str
    loss: str
    fingerprint: str
    release_id: str | None = None
    data_version: str | None = None
    charged: str | None = None
    half_width: int | None = None  # the table's target, when it gave one in place of a loss

    @property
    def released(self) -> bool:
        return self.release_id is not None


@dataclass(frozen=True)
class Manifest:
    """What a pack was released as, by table name (see the module's docstring)."""

    client_id: str | None = None
    tables: Mapping[str, ManifestEntry] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """The manifest in `path`, or an empty one when there is no such file."""
        path = Path(path)
        try:
            document = json.loads(path.expanduser().read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackSpecError(f"cannot read the manifest {path}: {exc}") from None
        if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
            raise PackSpecError(f"{path} is not a pack manifest (format {MANIFEST_FORMAT})")
        try:
            entries = {name: ManifestEntry(**entry)
                       for name, entry in document.get("tables", {}).items()}
        except (TypeError, AttributeError) as exc:
            raise PackSpecError(f"the manifest {path} has a malformed table: {exc}") from None
        return cls(client_id=document.get("client_id"), tables=entries)

    def to_json(self) -> str:
        return json.dumps(
            {"format": MANIFEST_FORMAT, "client_id": self.client_id,
             "tables": {name: _entry_json(entry) for name, entry in self.tables.items()}},
            indent=2,
        ) + "\n"

    def write(self, path: str | Path) -> None:
        """Write it whole or not at all (a stopped write leaves the manifest that was there)."""
        from client.cli import write_replacing

        write_replacing(Path(path).expanduser(), self.to_json())


def _entry_json(entry: ManifestEntry) -> dict[str, Any]:
    """An entry as the manifest writes it: `half_width` only for a table that gives one, so
    that a manifest of losses alone reads as it did before tables could give one."""
    document = dict(vars(entry))
    if entry.half_width is None:
        del document["half_width"]
    return document


# ---- pricing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TablePrice:
    """One table of a pack, priced in order. `cost` is what releasing it as part of the pack
    would charge: 0 when it is already released, pinned by the manifest, or a repeat of an
    earlier table of the pack (`free_because` says which). `remaining_after` is what would
    remain after it and every table before it (None when the budget is not known); it is
    negative from the first table that does not fit, by how much is missing. `loss` is the loss
    it is released at: the table's own, or the one its `half_width` was priced at (by this dry
    run, or, once the manifest records a request for it, the manifest's)."""

    name: str
    dry_run: DryRun
    cost: Amount
    free_because: str | None
    remaining_after: Amount | None
    loss: Amount | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.remaining_after is None else self.remaining_after >= 0


@dataclass(frozen=True)
class PackPricing:
    """A pack priced as a whole: each table in order, the total, and whether it fits in what
    the caller's budgets have left (`remaining`, the least of them, read once after the
    tables' dry runs). Charges nothing. Spending by anyone sharing those budgets after it was
    read can change the answer."""

    tables: tuple[TablePrice, ...]
    total: Amount
    loss_name: str
    data_version: str
    budget: Budget | None = field(default=None, compare=False)

    @property
    def remaining(self) -> Amount | None:
        return None if self.budget is None else self.budget.remaining

    @property
    def fits(self) -> bool | None:
        """Whether the whole pack fits in what remains (None: the budget is not known)."""
        return None if self.remaining is None else self.total <= self.remaining

    @property
    def first_short(self) -> str | None:
        """The first table, in order, that would not fit (None when all fit, or not known)."""
        return next((t.name for t in self.tables if t.fits is False), None)

    @property
    def limiting_scope(self) -> str | None:
        """The budget that would refuse the pack ("client", "institution" or "dataset"), or
        None when it fits or is not known."""
        if self.budget is None or self.fits:
            return None
        return self.budget.limiting_scope(self.total)

    def __getitem__(self, name: str) -> TablePrice:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)

    HEADERS: ClassVar[tuple[str, ...]] = (
        "table", "cost", "free because", "cells", "tau", "+/- count", "remaining after", "query",
    )

    def rows(self) -> list[list[str]]:
        """One row per table, as the text and CSV forms show them (see `HEADERS`)."""
        return [
            [t.name, format_amount(t.cost), t.free_because or "", str(t.dry_run.cells),
             str(t.dry_run.tau), str(t.dry_run.half_width),
             "" if t.remaining_after is None else format_amount(t.remaining_after),
             "" if t.dry_run.query is None else str(t.dry_run.query)]
            for t in self.tables
        ]

    def verdict(self) -> str:
        """The total and whether it fits, in one sentence."""
        free = sum(1 for t in self.tables if t.cost == 0)
        total = (f"total: {self.loss_name} {self.total} for {_tables(len(self.tables))}"
                 + (f" ({free} free)" if free else ""))
        if self.remaining is None:
            return f"{total}; your remaining budget is not known"
        if self.fits:
            return (f"{total}; it fits: {self.remaining} remaining now, "
                    f"{Amount(self.remaining - self.total)} after")
        return (f"{total}; it does NOT fit: {self.remaining} remains "
                f"({self.limiting_scope} budget), and table {self.first_short} is the first "
                f"that does not fit")

    def to_text(self) -> str:
        from client.display import shorten, text_table

        rows = [[*row[:-2], _shortfall(t.remaining_after) or row[-2], shorten(row[-1], 70)]
                for t, row in zip(self.tables, self.rows(), strict=True)]
        right = [False, True, False, True, True, True, True, False]
        return f"{text_table(self.HEADERS, rows, right=right)}\n\n{self.verdict()}{self._earlier()}"

    def _earlier(self) -> str:
        """The tables the caller received on another data version (last year's): not this
        version's tables, since releases belong to their data version, but still to be had.
        Not said to be priced afresh: a table already released on this version, or pinned by
        the manifest, costs nothing above, and is listed here all the same."""
        lines = [
            f"  {t.name}: {e.release_id} (data version {e.data_version})"
            for t in self.tables if (e := t.dry_run.earlier_release) is not None
        ]
        if not lines:
            return ""
        from client.display import wrap

        head = wrap("you also received these tables on another data version; releases belong "
                    "to their data version, so those are not this one's tables, and `veil "
                    "releases RELEASE_ID` shows one again, free:", indent="")
        return f"\n\n{head}\n" + "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def amount_text(value: Amount | None) -> str | None:
            return None if value is None else format_amount(value)

        return {
            "loss_name": self.loss_name, "data_version": self.data_version,
            "total": format_amount(self.total), "remaining": amount_text(self.remaining),
            "fits": self.fits, "first_short": self.first_short,
            "limiting_scope": self.limiting_scope,
            "tables": [
                {"name": t.name, "cost": format_amount(t.cost), "free_because": t.free_because,
                 "loss": amount_text(t.loss),
                 "remaining_after": amount_text(t.remaining_after), "fits": t.fits,
                 "dry_run": t.dry_run.to_dict()}
                for t in self.tables
            ],
        }

    def __repr__(self) -> str:
        return self.to_text()


def dry_run_pack(
    client: Client, pack: Pack, *, manifest: Manifest | str | Path | None = None,
    timeout: float | None = None,
) -> PackPricing:
    """Price `pack` as a whole, charging nothing: a dry run of each table, their costs added up
    in order, and whether the total fits in what the caller has left.

    A table costs 0 when it is already released (by anyone, at a loss at least its own), when
    `manifest` pins it (its request id replays its release free), or when an earlier table of
    the pack asks the same query at a loss at least its own. A table that gives `half_width`
    is priced by the server's dry run for that half-width, and its loss is the one that dry run
    returns (a query already released comes back at its release's loss, free), unless the
    manifest records a request for it: then the manifest's loss, so that a run resumed or
    repeated asks exactly what was asked before, whatever the server's settings now price the
    half-width at. A table whose query is invalid, or whose `confidence` is not the server's,
    raises InvalidQuery naming the table; a manifest that cannot pin this pack (another
    client's, another data version's, a table changed since) raises ManifestConflict."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest() if manifest is None else Manifest.read(manifest)
    priced: list[tuple[str, DryRun, Amount, str | None, Amount]] = []
    seen: dict[str, tuple[Amount, str]] = {}  # fingerprint -> the largest loss asked, by whom
    for table in pack:
        entry = manifest.tables.get(table.name)
        asked: Any = table.loss
        if asked is None and entry is not None and entry.half_width == table.half_width:
            asked = entry.loss  # the loss the manifest recorded for this half-width
        try:
            if asked is not None:
                dry = client.dry_run(table.query, timeout=timeout, **{pack.loss_name: asked})
                loss = Amount(parse_amount(decimal_text(asked, pack.loss_name)) or 0)
            else:  # the half-width, priced now
                dry = client.dry_run(table.query, half_width=table.half_width, timeout=timeout)
                _check_confidence(table, dry)
                loss = dry.loss
        except InvalidQuery as exc:
            raise _naming(table.name, exc) from None
        if entry is not None:
            _check_entry(table, entry, dry)
        earlier = seen.get(dry.fingerprint)
        why: str | None = None
        if entry is not None and entry.released:
            why = f"pinned by the manifest ({entry.release_id})"
        elif dry.already_released:
            why = "already released"
        elif earlier is not None and earlier[0] >= loss:
            why = f"the same query as table {earlier[1]}"
        cost = Amount(0) if why else dry.loss
        if earlier is None or loss > earlier[0]:
            seen[dry.fingerprint] = (loss, table.name)
        priced.append((table.name, dry, cost, why, loss))
    try:
        budget: Budget | None = client.budget()
    except PermissionDenied:  # a role without a budget may still price
        budget = None
    if (budget is not None and manifest.client_id is not None
            and manifest.client_id != budget.client_id):
        raise ManifestConflict(
            f"the manifest was written by client {manifest.client_id}, and this is "
            f"{budget.client_id}: its request ids replay only for the client that made them; "
            f"use a manifest of your own (another file) to release the pack as {budget.client_id}"
        )
    tables = []
    total = Amount(0)
    for name, dry, cost, why, loss in priced:
        total = Amount(total + cost)
        after = None if budget is None else Amount(budget.remaining - total)
        tables.append(TablePrice(name, dry, cost, why, after, loss))
    version = priced[0][1].data_version if priced else ""
    # A pack of half-widths names no loss: the deployment's name for it, as its dry runs say.
    name = priced[0][1].loss_name if pack.loss_name == "loss" and priced else pack.loss_name
    return PackPricing(tuple(tables), total, name, version, budget)


def _check_confidence(table: PackTable, dry: DryRun) -> None:
    """Refuse (InvalidQuery) a table whose half-width is meant at another level than the one
    the server states every interval at: the server prices a half-width at its own."""
    if table.confidence is not None and not math.isclose(table.confidence, dry.confidence):
        raise InvalidQuery(
            f"half_width {table.half_width} is asked at confidence {table.confidence:g}, and "
            f"this server states every interval at {dry.confidence:g}: give confidence = "
            f"{dry.confidence:g}, or leave it out, with the half-width wanted at that level"
        )


def _check_entry(table: PackTable, entry: ManifestEntry, dry: DryRun) -> None:
    """Refuse (ManifestConflict) a manifest entry its table no longer matches, or that pins a
    release of data the server no longer serves: its request id would be refused, or worse,
    stand for another table. A table that gives a half-width matches an entry for the same
    half-width (at the entry's loss); one that gives a loss, an entry for that loss."""
    # New data first: a query's fingerprint names the codebook too, so a table released on
    # data loaded under another codebook would otherwise be called changed in the spec.
    if entry.released and dry.data_version and entry.data_version != dry.data_version:
        raise ManifestConflict(
            f"the manifest pins table {table.name} to a release of data version "
            f"{entry.data_version}, and the server now serves {dry.data_version}: pinned "
            f"releases cannot be replayed on new data; release the pack with a new manifest "
            f"(another file) for this data version", table=table.name,
        )
    same_ask = (entry.half_width == table.half_width if table.half_width is not None
                else entry.half_width is None and table.loss is not None
                and entry.loss == format_amount(table.loss))
    if entry.fingerprint != dry.fingerprint or not same_ask:
        what = (f"the release {entry.release_id}" if entry.released
                else f"request id {entry.request_id}")
        asked = (entry.loss if entry.half_width is None
                 else f"+/- {entry.half_width}, loss {entry.loss}")
        raise ManifestConflict(
            f"table {table.name} has changed since the manifest recorded {what} for it "
            f"({entry.query} at {asked}): restore it in the spec, or remove its entry from "
            f"the manifest to release the new one", table=table.name,
        )


# ---- releasing ----------------------------------------------------------------------------------


def release_pack(
    client: Client,
    pack: Pack,
    *,
    manifest: str | Path | None = None,
    on_release: Callable[[str, Release], None] | None = None,
    timeout: float | None = None,
) -> dict[str, Release]:
    """Release every table of `pack`, in order, once the whole pack is known to fit; returns
    name -> Release.

    The pack is priced first (`dry_run_pack`); when its total is more than remains, it raises
    PackDoesNotFit, naming the total, what remains and the first table that breaks it, and
    nothing is charged. Each table is then released under a request id of its own.

    With `manifest` (a JSON file path, read when it exists), every table's request id is
    written to it before the first release, and each release's id, data version, fingerprint
    and charge as it arrives. Running the pack again with the same manifest replays exactly
    those releases, free; a run stopped halfway resumes (the tables released already come back
    free, the rest are released; a release the server made just as the run stopped is returned
    under its request id, not charged again). `on_release(name, release)` is called as each
    table arrives. Each release's `charged` is what this run paid for it (0 for a table
    replayed), as the server stated it in answer to the release call; None only when a try of
    it was lost after a run that stopped had sent the same request, so either may have paid.
    The manifest's `charged` is what each table's request cost, once known.

    Not atomic: the up-front check reads the budget once. Releases made meanwhile by the same
    client (another process or notebook), its institution or, for the dataset's cap, anyone,
    draw on the same budgets, and a table can then still be refused (BudgetExhausted); the
    tables released before it stay released and recorded in the manifest, and running the
    pack again resumes it.
    """
    path = None if manifest is None else Path(manifest)
    state = Manifest() if path is None else Manifest.read(path)
    pricing = dry_run_pack(client, pack, manifest=state, timeout=timeout)
    if pricing.fits is False:
        raise PackDoesNotFit(pricing)
    # Every table has its request id on disk before anything is released, so that a run
    # stopped at any point, even inside a release the server committed, resumes under the same
    # ids and is never charged twice.
    entries = dict(state.tables)
    fresh = set()
    for table, price in zip(pack, pricing.tables, strict=True):
        if table.name not in entries:
            fresh.add(table.name)
            assert price.loss is not None
            entries[table.name] = ManifestEntry(
                request_id=str(uuid.uuid4()), query=str(table.query),
                loss=format_amount(price.loss), fingerprint=price.dry_run.fingerprint,
                half_width=table.half_width,
            )
    client_id = state.client_id or (None if pricing.budget is None else pricing.budget.client_id)
    state = Manifest(client_id=client_id, tables=entries)
    if path is not None:
        state.write(path)
    releases: dict[str, Release] = {}
    for table in pack:
        entry = entries[table.name]
        try:
            # At the manifest's loss: the table's own, or what its half-width was priced at
            # when its request id was handed out (checked against the spec by the pricing).
            at: dict[str, Any] = {pack.loss_name: entry.loss}
            release = client.release(table.query, request_id=entry.request_id, timeout=timeout,
                                     **at)
        except VeilError as exc:
            done = ", ".join(releases) or "none"
            exc.add_note(
                f"pack: tables released before {table.name}: {done}"
                + (f"; {path} records them, and running the pack again with it resumes"
                   if path is not None else "")
            )
            raise
        metadata = release.metadata
        if entry.released and metadata.release_id != entry.release_id:
            raise ManifestConflict(
                f"table {table.name}: request id {entry.request_id} returned release "
                f"{metadata.release_id}, not {entry.release_id} as the manifest pins",
                table=table.name,
            )
        if entry.released:
            release.charged = Amount(0)  # a request id answered before is never charged again
        else:
            release.charged, cost = _costs(client, release, entry.request_id,
                                           sent_before=table.name not in fresh)
            entry = replace(
                entry, release_id=metadata.release_id, data_version=metadata.data_version,
                fingerprint=metadata.fingerprint or entry.fingerprint,
                charged=None if cost is None else format_amount(cost),
            )
            entries[table.name] = entry
            if path is not None:
                Manifest(client_id=client_id, tables=entries).write(path)
        releases[table.name] = release
        if on_release is not None:
            on_release(table.name, release)
    return releases


def _costs(
    client: Client, release: Release, request_id: str, *, sent_before: bool
) -> tuple[Amount | None, Amount | None]:
    """What this run's call paid for `release`, and what its request `request_id` cost in all
    (None: not known). `sent_before`: the request id was handed out by an earlier run, which
    may have sent it (and paid) before it stopped.

    The server states what each try of a Release call cost: the release's loss when it was made
    for that try, 0 when a stored release came back (the request's own, or anyone's release of
    the query). So a loss stated is what the request cost, and so is a 0 stated to the first
    try of an id never sent before. A 0 leaves the request's cost open only when the id may
    have been answered earlier, by a try of this call that was lost or by the run that stopped:
    then, and only then, the caller's list of releases is read for it."""
    stated, tries = release._answer or (None, 0)
    if stated is not None and stated > 0:
        return stated, stated  # made and charged for this call
    if stated is not None and tries == 1:
        # This call's one try came back free; the request was paid by the run that stopped
        # (its cost is listed), or never (a release of the query that was already there).
        return Amount(0), (_charged(client, request_id) if sent_before else Amount(0))
    cost = _charged(client, request_id)
    # A try of this call lost after the server charged it: the request's cost was this run's.
    # With a run stopped before as well, which of the two paid is not known.
    return (None if sent_before else cost), cost


def _charged(client: Client, request_id: str) -> Amount | None:
    """What the request `request_id` cost, as the caller's list of releases records it; None
    when it is not listed (the list holds the caller's latest releases, as many as the server
    lists at once), which leaves the cost unknown, never wrong."""
    try:
        listed = client.releases(limit=_LISTED)
    except VeilError:
        return None
    return next((r.charged for r in reversed(listed) if r.request_id == request_id), None)


# ---- `veil pack` --------------------------------------------------------------------------------

_SPEC_EXAMPLE = """\
a spec (TOML):
  epsilon = 0.1                   # every table's loss (or rho, or loss)
  [tables.gender_age]
  sql = "SELECT gender, ageBroad, COUNT(*) FROM records GROUP BY gender, ageBroad"
  [tables.means_of_control]
  sql = "SELECT majorityStatus, FLAG_COUNTS(meansOfControl) FROM records GROUP BY majorityStatus"
  epsilon = 0.2                   # this table's own
  [tables.citizenship_region]
  sql = "SELECT citizenshipRegion, COUNT(*) FROM records GROUP BY citizenshipRegion"
  half_width = 50                 # counts within +/- 50 records: priced by the server

examples/standard_tables.toml has CTDC's standard tables."""


def add_pack_command(subparsers: Any) -> argparse.ArgumentParser:
    from client.cli import connection_options

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "pack", parents=[connection_options()],
        help="price or release a pack of tables from a TOML spec, pinned by a manifest",
        description="Price a pack of tables as a whole (--dry-run: free), or release it: "
        "refused, charging nothing, unless the whole pack fits in what remains; then each "
        "table is written to DIR/NAME.csv (or .json) and its release pinned in the manifest, "
        "so that running it again replays the same releases free and a stopped run resumes.",
        epilog=_SPEC_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", type=Path, metavar="SPEC.toml", help="the pack's spec")
    parser.add_argument("--dry-run", action="store_true",
                        help="price each table and the total, and say whether it fits (free)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where the tables are written (default: a directory named after "
                        "the spec, in the current one)")
    parser.add_argument("--manifest", type=Path, metavar="FILE",
                        help="the manifest pinning each table's release (default "
                        "DIR/manifest.json; used when it exists)")
    parser.add_argument("-f", "--format", choices=("csv", "json"), default=None,
                        help="the tables' files (default csv); with --dry-run, the pricing as "
                        "CSV or JSON instead of a table")
    parser.set_defaults(handler=run_pack)
    return parser


def run_pack(args: argparse.Namespace) -> int:
    from client import cli

    out: Path = args.out if args.out is not None else Path(args.spec.stem)
    manifest_path: Path = args.manifest if args.manifest is not None else out / "manifest.json"
    try:
        pack = Pack.from_toml(args.spec)  # its SQL parser loads here: a moment to interrupt
        manifest = Manifest.read(manifest_path)
    except (PackSpecError, InvalidQuery) as exc:
        # Refused before any server is asked: the spec is the caller's to fix.
        text = str(exc) if isinstance(exc, PackSpecError) else cli.invalid_query_text(exc)
        print(f"veil: {text}", file=sys.stderr)
        return cli.EXIT_INVALID
    except KeyboardInterrupt:
        print("veil: interrupted; nothing was asked of any server", file=sys.stderr)
        return cli.EXIT_INTERRUPTED

    if args.dry_run:
        def price(client: Client) -> int:
            with cli.progress("pack dry run", quiet=args.quiet):
                pricing = dry_run_pack(client, pack, manifest=manifest)
            if args.format == "json":
                cli.emit(json.dumps(pricing.to_dict(), indent=2))
            elif args.format == "csv":
                cli.emit(cli.csv_text([list(PackPricing.HEADERS), *pricing.rows()]))
            else:
                cli.emit(pricing.to_text())
            return cli.EXIT_OK

        return cli.run_with_client(args, price)

    fmt = args.format or "csv"
    made = _missing_directories(out, manifest_path.parent)
    try:
        return _release_into(args, pack, out, manifest_path, fmt)
    finally:
        # A run refused before anything was written (over budget, server down, a file that
        # cannot be written) leaves no empty directory behind; rmdir removes only what is empty.
        for directory in made:
            with contextlib.suppress(OSError):
                directory.rmdir()


def _release_into(
    args: argparse.Namespace, pack: Pack, out: Path, manifest_path: Path, fmt: str
) -> int:
    """`veil pack` past its dry run: release every table into `out`, in format `fmt`."""
    from client import cli

    try:
        out.mkdir(parents=True, exist_ok=True)
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"veil: cannot write {out}: {exc.strerror or exc}; nothing was released or "
              f"charged", file=sys.stderr)
        return cli.EXIT_INVALID
    for target in [manifest_path, *(out / f"{t.name}.{fmt}" for t in pack)]:
        if (reason := cli._writable(target)) is not None:
            print(f"veil: cannot write {target}: {reason}; nothing was released or charged",
                  file=sys.stderr)
            return cli.EXIT_INVALID

    written: list[list[str]] = []

    def write(name: str, release: Release) -> None:
        target = out / f"{name}.{fmt}"
        cli.write_replacing(target, release.to_json() + "\n" if fmt == "json"
                            else release.to_csv())
        charged = "" if release.charged is None else format_amount(release.charged)
        written.append([name, release.metadata.release_id, charged or "?",
                        "yes" if release.replayed else "", str(target)])
        if not args.quiet:
            print(f"veil: {name}: {release.metadata.release_id} -> {target}", file=sys.stderr)

    def run(client: Client) -> int:
        try:
            releases = release_pack(client, pack, manifest=manifest_path, on_release=write)
        except KeyboardInterrupt:
            print(f"veil: interrupted; {len(written)} of {len(pack)} tables were released and "
                  f"written; run the same command again to resume: {manifest_path} records the "
                  f"request id of every table asked for, so none is charged twice",
                  file=sys.stderr)
            return cli.EXIT_INTERRUPTED
        except OSError as exc:
            # A table was paid for and pinned, but its file could not be written.
            print(f"veil: a table was released, but its file could not be written "
                  f"({exc.strerror or exc}); {manifest_path} pins it: run the same command "
                  f"again to write it, free", file=sys.stderr)
            return cli.EXIT_ERROR
        except PackDoesNotFit as exc:
            print(f"veil: budget exhausted: {exc}", file=sys.stderr)
            if not args.quiet:
                print(exc.pricing.to_text(), file=sys.stderr)
            return cli.EXIT_BUDGET
        except VeilError as exc:
            for note in getattr(exc, "__notes__", []):
                print(f"veil: {note}", file=sys.stderr)
            raise  # worded and given its exit status as for `veil query`
        from client.display import text_table

        total = sum((r.charged for r in releases.values() if r.charged is not None), Amount(0))
        unknown = sum(1 for r in releases.values() if r.charged is None)
        # A pack of half-widths names no loss: the deployment's name for it, as releases say.
        name = next((r.metadata.loss_name for r in releases.values()), pack.loss_name)
        cli.emit(
            text_table(["table", "release", "charged", "replayed", "file"], written)
            + f"\n\n{_tables(len(releases))}; charged {name} {total} in this run"
            + (f", besides {_tables(unknown)} whose charge is not known (a try lost after an "
               f"earlier run had sent the same request)" if unknown else "")
            + f"; manifest {manifest_path}"
        )
        return cli.EXIT_OK

    return cli.run_with_client(args, run)


def _missing_directories(*paths: Path) -> list[Path]:
    """The directories that making `paths` would create, deepest first."""
    missing = set()
    for path in paths:
        while not path.exists() and path != path.parent:
            missing.add(path)
            path = path.parent
    return sorted(missing, key=lambda directory: len(directory.absolute().parts), reverse=True)


def _shortfall(remaining_after: Amount | None) -> str | None:
    """'short 0.1' for a table the budget cannot cover (-0.1 remaining after it): a negative
    budget reads as a debt the caller could run up. CSV and JSON keep the number."""
    if remaining_after is None or remaining_after >= 0:
        return None
    return f"short {format_amount(-remaining_after)}"


def _tables(count: int) -> str:
    """'1 table', '2 tables'."""
    return f"{count} table" if count == 1 else f"{count} tables"


__all__ = [
    "LOSS_NAMES",
    "Manifest",
    "ManifestConflict",
    "ManifestEntry",
    "Pack",
    "PackDoesNotFit",
    "PackPricing",
    "PackSpecError",
    "PackTable",
    "TablePrice",
    "add_pack_command",
    "dry_run_pack",
    "release_pack",
]
