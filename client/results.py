"""What the server sends back: releases, dry runs, budgets and the list of one's releases.

A `Release` holds its cells as an Arrow table, one row per cell of the public domain: a column
per group-by dimension (null is the "missing" key), `flag` for flag-set counts, then `value`,
`ci_low`, `ci_high`, `suppressed` and `status`. A suppressed cell's value and interval are null
and its `suppressed` is true: suppressed is never shown as zero. `status` says why a cell shows
what it shows: "published", "suppressed" (withheld: its noisy count fell short of tau) or
"empty" (no record can fall into it by the query's own terms: a count or sum stated as 0
[0, 0], a share or mean with no value, and so also marked suppressed).

    release.table           # pyarrow.Table (also release.arrow(), and any Arrow consumer)
    release.to_pandas()     # pandas.DataFrame (also release.df()), nullable integers
    release.metadata        # mechanism, scale, tau, charge, ids, interval level
    release.plot()          # bar chart with error bars, suppressed cells marked
    release.to_json()       # the JSON document `veil query --format json` prints
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from client.amounts import Amount, amount, format_amount, parse_amount
from client.codebook import ACCOUNTING_NAMES, LOSS_SYMBOL
from client.display import (
    earlier_release_text,
    empty_cells_text,
    html_table,
    key_text,
    shorten,
    text_table,
    unreachable_text,
    value_accuracy_text,
    wrap,
)
from client.errors import InvalidQuery
from client.query import query_of_canonical
from protos.veil.v1 import veil_pb2 as pb

if TYPE_CHECKING:
    from client.connection import Client
    from client.query import Query

VALUE_COLUMNS = ("value", "ci_low", "ci_high", "suppressed", "status")
STATUSES = ("published", "suppressed", "empty")
_META_KEY = b"veil.release"
JSON_FORMAT = "veil.release/1"


def _optional(message: Any, name: str) -> Any:
    """An optional field's value (as protobuf types it), None when the server did not set it."""
    return getattr(message, name) if message.HasField(name) else None


# ---- releases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseMetadata:
    """Everything about a release but its cells, as the server states it.

    release_id, charge_id, created_at: the release's id, the charge that paid for it, when.
    fingerprint, canonical_query: the query's identity and the server's canonical form of it.
    data_version, codebook: the data it was drawn from and the codebook it was asked under.
    measure: Count, FlagCounts, Proportion, Sum or Mean.
    mechanism, noise_scale, sum_noise_scale: the noise (a sum's, for sums and means).
    accounting, loss: "pure_dp" (epsilon) or "zcdp" (rho), and the loss the release was made
        with, an exact `Amount` (a caller served a stored release pays nothing: see
        `Release.charged`). measured_loss: the text of what OpenDP's maps state, a float, not
        an exact amount.
    tau, k, beta, confidence: the noisy count a cell needs to be published, the smallest cell
        the rule protects, the chance it fails to, and the level of every interval.
    cells: how many cells the release has.
    suppressed_cells: the cells marked `suppressed` (no value): those withheld under tau and,
        for a share or a mean, those empty by the query's own terms. `suppressed_by_rule`
        counts the withheld ones alone, alike for every measure.
    unreachable_cells: the cells empty by the query's own terms (status "empty"), for every
        measure: a count's or sum's stated as 0 [0, 0], a share's or mean's without a value.
    empty_pass_probability, expected_empty_published_bound: p0, the chance a cell whose true
        count is 0 is published anyway, and cells x p0, a ceiling on how many published cells
        are expected to be such. Data-independent.
    The last three are None for a release stored, or a server built, before they were recorded.
    """

    release_id: str
    charge_id: str
    created_at: str
    fingerprint: str
    canonical_query: str
    data_version: str
    codebook: str
    measure: str
    mechanism: str
    accounting: str  # "pure_dp" (epsilon) or "zcdp" (rho)
    loss: Amount
    measured_loss: str
    noise_scale: float
    sum_noise_scale: float | None
    tau: int
    k: int
    beta: float
    confidence: float
    cells: int
    # The cells marked `suppressed`, those without a value: the ones withheld under tau (status
    # "suppressed") and, for a share or a mean, the ones empty by the query's own terms (status
    # "empty", no value to show). A count's or sum's empty cells are stated as 0, not counted.
    # `suppressed_by_rule` counts the withheld ones alone, alike for every measure.
    suppressed_cells: int
    # p0, the chance that a cell whose true count is 0 is published anyway, and cells x p0, a
    # ceiling on how many published cells are expected to be such empty cells. Data-independent.
    # None for a release stored, or a server built, before they were recorded.
    empty_pass_probability: float | None = None
    expected_empty_published_bound: float | None = None
    # Rows no record can fall into by the query's own terms (its filter rules out their keys),
    # status "empty" for every measure: stated as 0 [0, 0] (a count or sum) or with no value and
    # marked suppressed (a share or mean), never noised. None as above.
    unreachable_cells: int | None = None

    @classmethod
    def from_pb(cls, m: pb.ReleaseMetadata) -> ReleaseMetadata:
        return cls(
            release_id=m.release_id,
            charge_id=m.charge_id,
            created_at=m.created_at,
            fingerprint=m.fingerprint,
            canonical_query=m.canonical_query,
            data_version=m.data_version,
            codebook=m.codebook,
            measure=m.measure,
            mechanism=m.mechanism,
            accounting=ACCOUNTING_NAMES.get(m.accounting, "unspecified"),
            loss=amount(m.loss),
            measured_loss=m.measured_loss,
            noise_scale=m.noise_scale,
            sum_noise_scale=_optional(m, "sum_noise_scale"),
            tau=m.tau,
            k=m.k,
            beta=m.beta,
            confidence=m.confidence,
            cells=m.cells,
            suppressed_cells=m.suppressed_cells,
            empty_pass_probability=_optional(m, "empty_pass_probability"),
            expected_empty_published_bound=_optional(m, "expected_empty_published_bound"),
            unreachable_cells=_optional(m, "unreachable_cells"),
        )

    @property
    def loss_name(self) -> str:
        """What the loss is called under this accounting: "epsilon" or "rho"."""
        return LOSS_SYMBOL.get(self.accounting, "loss")

    @property
    def suppressed_by_rule(self) -> int:
        """The cells withheld under tau (status "suppressed"), for every measure alike: a
        share's or mean's cells empty by the query's terms are marked suppressed, but no rule
        withheld them (the server's audit counts the same)."""
        empty = self.unreachable_cells or 0
        return self.suppressed_cells - (empty if self.measure in ("Proportion", "Mean") else 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON: `loss` as its exact decimal text, as the server wrote it."""
        out = asdict(self)
        out["loss"] = format_amount(self.loss)
        return out


@dataclass(frozen=True)
class Cell:
    """One cell of a release.

    keys: its key by dimension name (and "flag", for flag counts); None is the missing key.
    value: the count, share (0 to 1), mean or sum published; None when it has none.
    ci_low, ci_high: its interval at the release's confidence; None when it has no value.
    suppressed: whether it has no value (withheld, or a share or mean empty by the query).
    status: why: "published", "suppressed" (its noisy count fell short of tau) or "empty" (no
        record can fall into it by the query's own terms; a count or sum is then 0 [0, 0]).
        Derived from `suppressed` when not given.
    """

    keys: dict[str, Any]
    value: float | int | None
    ci_low: float | None
    ci_high: float | None
    suppressed: bool
    status: str = ""

    def __post_init__(self) -> None:
        if not self.status:
            object.__setattr__(self, "status", "suppressed" if self.suppressed else "published")


def share_base_text(query: Query | None) -> str:
    """What a proportion's shares are of, when a variable of its condition may be missing.

    A share counts every record of its cell (as SQL's AVG(CASE WHEN c THEN 1 ELSE 0 END) does),
    so "7% abducted" can be 7% of records most of which never recorded abduction at all. Said
    for each variable the condition tests for a value (not only for being missing, where
    leaving the missing out would make every share 0 or 1) and the filter does not require.
    """
    from client.query import Proportion

    if query is None or not isinstance(query.measure, Proportion):
        return ""
    condition = query.measure.condition
    loose = [
        v for v in dict.fromkeys(condition.variables())
        if not _tests_only_missing(condition, v) and not _required(query.filter, v)
    ]
    if not loose:
        return ""
    if query.spelling == "python":
        add = " and ".join(f'.where(Present("{v}"))' for v in loose)
    else:
        add = " AND ".join(f"{v} IS NOT NULL" for v in loose)
    return (
        f"each share is of all the cell's records, those whose {' or '.join(loose)} is missing "
        f"included (add {add} for the share among the records that have it)"
    )


def _leaves(condition: Any) -> Iterator[Any]:
    from client.query import And, Not, Or

    if isinstance(condition, (And, Or)):
        for operand in condition.operands:
            yield from _leaves(operand)
    elif isinstance(condition, Not):
        yield from _leaves(condition.operand)
    else:
        yield condition


def _tests_only_missing(condition: Any, variable: str) -> bool:
    """Whether every test of `variable` in `condition` is whether it is missing."""
    from client.query import Missing

    return all(
        isinstance(leaf, Missing) for leaf in _leaves(condition) if variable in leaf.variables()
    )


def _required(where: Any, variable: str) -> bool:
    """Whether `where` keeps only records that have `variable` (a value compared at the top
    level, or IS NOT NULL): read safely, so that a filter it cannot tell of counts as not."""
    from client.query import And, Eq, In, Missing, Not, Range

    if where is None:
        return False
    for conjunct in where.operands if isinstance(where, And) else (where,):
        if isinstance(conjunct, (Eq, In, Range)) and conjunct.variable == variable:
            return True
        if (
            isinstance(conjunct, Not)
            and isinstance(conjunct.operand, Missing)
            and conjunct.operand.variable == variable
        ):
            return True
    return False


def share_text(value: float) -> str:
    """A share as a percentage with two significant figures of its distance from 0% or 100%
    where that is under one point (0.046%, 99.95%), else one decimal: at one decimal a rare
    event's share and its interval would all read 0.0%."""
    percent = 100 * value
    distance = min(abs(percent), abs(100 - percent))
    if distance >= 1 or distance == 0:
        return f"{percent:.1f}%"
    decimals = min(4, 1 - math.floor(math.log10(distance)))
    return f"{percent:.{decimals}f}%"


class Release:
    """A released table. Immutable; everything in it is already paid for.

    table: the cells, as a pyarrow Table (see the module's docstring for its columns).
    metadata: a `ReleaseMetadata`: ids, loss, mechanism, noise scale, tau, confidence, counts.
    query: the `Query` released (None when unknown); a fetched release's is rebuilt from the
        server's canonical form.
    request_id: the request id that received it (None for one fetched by its id alone).
    charged: what the call that returned it cost, an exact `Amount`: 0 for a stored release
        returned free (`replayed`), None when not known.
    cells, keys, dimensions: the cells as `Cell`s, the key columns, the group-by dimensions.
    """

    def __init__(
        self,
        table: pa.Table,
        metadata: ReleaseMetadata,
        *,
        query: Query | None = None,
        request_id: str | None = None,
        charged: Amount | str | None = None,
    ) -> None:
        self.table = table
        self.metadata = metadata
        self.query = query
        self.request_id = request_id
        self._query_text: str | None = None  # the query's text in a saved document read back
        # What the server stated the Release call's last try cost, and how many tries the call
        # made (set by `Client.release`; None otherwise). `charged` claims nothing once an id was
        # given, but a pack, which hands out its own request ids, can read what each cost here.
        self._answer: tuple[Amount | None, int] | None = None
        # What the call that returned this release cost: 0 for a stored release (a retry, or a
        # query already released); None when the server did not say (a release fetched again).
        self.charged: Amount | None = (
            parse_amount(charged) if isinstance(charged, str) else charged
        )

    @classmethod
    def from_pb(
        cls, response: pb.ReleaseResponse, *, query: Query | None = None,
        request_id: str | None = None,
    ) -> Release:
        table = pa.ipc.open_stream(pa.py_buffer(response.arrow_ipc)).read_all()
        schema_meta = dict(table.schema.metadata or {})
        schema_meta.pop(_META_KEY, None)
        table = table.replace_schema_metadata(schema_meta or None)
        unreachable = (response.metadata.unreachable_cells
                       if response.metadata.HasField("unreachable_cells") else None)
        table = with_status(table, response.metadata.measure, unreachable)
        if query is not None:
            table = arrange(table, query.dimensions)
        if response.metadata.measure in ("Count", "FlagCounts"):
            table = _integer_bounds(table)
        return cls(table, ReleaseMetadata.from_pb(response.metadata), query=query,
                   request_id=request_id, charged=parse_amount(response.charged))

    # -- shape --
    @property
    def keys(self) -> list[str]:
        """The key columns: the group-by dimensions, then `flag` for flag-set counts."""
        return [name for name in self.table.column_names if name not in VALUE_COLUMNS]

    @property
    def dimensions(self) -> list[str]:
        """The group-by dimensions (the keys without `flag`)."""
        flagged = self.metadata.measure == "FlagCounts"
        return [name for name in self.keys if not (flagged and name == "flag")]

    def arrange(self, by: str | Sequence[str]) -> Release:
        """This release with its dimensions in the order `by` names them: the key columns in
        that order (`flag` still first for flag counts), the rows sorted the same way, each key
        in its codebook order. A new Release; this one is unchanged.

        Names are read in any case. Dimensions `by` leaves out follow those it names, in the
        order they had. The release is the same one: its metadata, request id and `charged`
        (so `replayed`) are kept, and its `query` names its dimensions in the new order.

        InvalidQuery (`.variable` the name at fault) when `by` names a dimension this release
        is not grouped by, or one twice: arranging cannot add a dimension, and a pipeline that
        expects one the release lacks should stop here, not further on."""
        order = self._arrangement([by] if isinstance(by, str) else list(by))
        release = Release(
            arrange(self.table, order), self.metadata, query=self._query_in(order),
            request_id=self.request_id, charged=self.charged,
        )
        release._query_text, release._answer = self._query_text, self._answer
        return release

    def _arrangement(self, by: list[str]) -> list[str]:
        """Every dimension, those `by` names first in its order (see `arrange`)."""
        dimensions = self.dimensions
        names = {name.lower(): name for name in dimensions}
        grouped = ", ".join(dimensions) or "nothing"
        order: list[str] = []
        for name in by:
            if not isinstance(name, str):
                raise TypeError(f"by names dimensions (text), got {type(name).__name__} "
                                f"{name!r}")
            found = names.get(name.lower())
            if found is None:
                flag = (" (`flag`, the flag of a flag-set count, always comes first)"
                        if name.lower() == "flag" and "flag" in self.keys else "")
                raise InvalidQuery(
                    f"by names {name!r}, which this release is not grouped by{flag}; it is "
                    f"grouped by {grouped} (name those, in the order wanted)", variable=name,
                )
            if found in order:
                raise InvalidQuery(f"by names {found!r} twice (names are read in any case)",
                                   variable=found)
            order.append(found)
        return order + [name for name in dimensions if name not in order]

    def _query_in(self, order: list[str]) -> Query | None:
        """The release's query, naming its dimensions in `order` (the same dimensions)."""
        query = self.query
        if query is None:
            return None
        by_lower = {name.lower(): name for name in query.dimensions}
        if sorted(by_lower) != sorted(name.lower() for name in order):
            return query  # a query that does not name the table's columns: left as it was
        return replace(query, dimensions=tuple(by_lower[name.lower()] for name in order))

    def __len__(self) -> int:
        return int(self.table.num_rows)

    @property
    def cells(self) -> list[Cell]:
        """Every cell as a `Cell` (keys, value, interval, suppressed, status), in table order."""
        keys = self.keys
        out = []
        for row in self.table.to_pylist():
            out.append(
                Cell(
                    keys={k: row[k] for k in keys},
                    value=row["value"],
                    ci_low=row["ci_low"],
                    ci_high=row["ci_high"],
                    suppressed=bool(row["suppressed"]),
                    status=row["status"],
                )
            )
        return out

    def __iter__(self) -> Iterator[Cell]:
        return iter(self.cells)

    def cell(self, **keys: Any) -> Cell:
        """The one cell with these keys, by dimension name (and `flag` for flag counts; names
        in any case, as everywhere else; None is the missing key): `cell(gender="Male")`.

        KeyError when a name is not one of the release's keys (a dimension it is not grouped
        by is not "missing" in it), or when not exactly one cell matches."""
        names = {name.lower(): name for name in self.keys}
        unknown = [name for name in keys if name.lower() not in names]
        if unknown:
            grouped = ", ".join(self.keys) or "nothing"
            raise KeyError(
                f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a key of this "
                f"release; its keys are: {grouped}"
            )
        wanted = {names[name.lower()]: value for name, value in keys.items()}
        if len(wanted) < len(keys):
            raise KeyError(f"a key is named twice (names are read in any case): {list(keys)}")
        found = [c for c in self.cells if all(c.keys[k] == v for k, v in wanted.items())]
        if len(found) != 1:
            raise KeyError(f"{len(found)} cells have keys {wanted}")
        return found[0]

    # -- conversions --
    def arrow(self) -> pa.Table:
        """The cells as an Arrow table (as DuckDB's `.arrow()`)."""
        return self.table

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        """Arrow's C stream interface: polars, DuckDB and others read a release directly."""
        return self.table.__arrow_c_stream__(requested_schema)

    def to_pandas(self) -> Any:
        """The cells as a pandas DataFrame; integer counts stay integers (nullable `Int64`) and
        a suppressed cell's value is <NA>, never 0; shares, means and sums are nullable
        `Float64`, so theirs is <NA> too, not NaN. Text keys are ordered categoricals in the
        codebook's order (so a pivot or a sort puts '9--17' before '18--20'), the missing key
        <NA>."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError("to_pandas() needs pandas: pip install pandas") from exc
        mapping = {
            pa.int64(): pd.Int64Dtype(),
            pa.float64(): pd.Float64Dtype(),
            pa.bool_(): pd.BooleanDtype(),
        }
        frame = self.table.to_pandas(types_mapper=mapping.get)
        for name in self.keys:
            if pa.types.is_string(self.table.schema.field(name).type):
                # The cells come in the codebook's order of each key (the release is dense over
                # the public domain), so the order keys first appear in is the codebook's.
                order = list(dict.fromkeys(self.table.column(name).drop_null().to_pylist()))
                frame[name] = pd.Categorical(frame[name], categories=order, ordered=True)
        return frame

    def df(self) -> Any:
        """The cells as a pandas DataFrame (as DuckDB's `.df()`)."""
        return self.to_pandas()

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: metadata, the request, dimensions and cells (see README, "For
        researchers"). `request` holds what this call was: its request id, the query as
        written, what it `charged` (exact decimal text; null when not known, as for a release
        fetched again) and whether it was `replayed` free (null when that is not known
        either). `Release.from_json` reads it back."""
        return {
            "format": JSON_FORMAT,
            "metadata": self.metadata.to_dict(),
            "request": {
                "request_id": self.request_id,
                "query": self._query_text or (None if self.query is None else str(self.query)),
                "charged": None if self.charged is None else format_amount(self.charged),
                "replayed": self.replayed,
            },
            "dimensions": self.dimensions,
            "cells": [
                {
                    "keys": cell.keys,
                    "value": cell.value,
                    "ci_low": cell.ci_low,
                    "ci_high": cell.ci_high,
                    "suppressed": cell.suppressed,
                    "status": cell.status,
                }
                for cell in self.cells
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The JSON document of `to_dict()` as text (what `veil query --format json` prints)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_json(cls, document: str | bytes | dict[str, Any]) -> Release:
        """The release a JSON document of `to_json()` (or `veil query --format json`) holds,
        its text or its parsed dict: cells, metadata, request id and charge as saved. Its query
        is rebuilt from the metadata's canonical form (None when the client cannot read it)."""
        data: dict[str, Any] = (
            json.loads(document) if isinstance(document, (str, bytes)) else document
        )
        if data.get("format") != JSON_FORMAT:
            raise ValueError(f"not a saved veil release (format {data.get('format')!r}, "
                             f"expected {JSON_FORMAT!r})")
        known = {f.name for f in fields(ReleaseMetadata)}
        saved = {k: v for k, v in data["metadata"].items() if k in known}
        metadata = ReleaseMetadata(**{**saved, "loss": amount(saved["loss"])})
        counts = metadata.measure in ("Count", "FlagCounts")
        cells = data["cells"]
        keys = list(cells[0]["keys"]) if cells else ["flag", *data["dimensions"]] if (
            metadata.measure == "FlagCounts") else list(data["dimensions"])
        columns: dict[str, pa.Array] = {
            name: pa.array([c["keys"][name] for c in cells]) for name in keys
        }
        for name in ("value", "ci_low", "ci_high"):
            kind = pa.int64() if counts and name == "value" else pa.float64()
            columns[name] = pa.array([c[name] for c in cells], type=kind)
        columns["suppressed"] = pa.array([bool(c["suppressed"]) for c in cells], pa.bool_())
        if all("status" in c for c in cells):  # saved before the status: derived below
            columns["status"] = pa.array([c["status"] for c in cells], pa.string())
        table = with_status(pa.table(columns), metadata.measure, metadata.unreachable_cells)
        if counts:
            table = _integer_bounds(table)
        request = data.get("request") or {}
        written = request.get("query")
        query = None if written is None else query_of_canonical(metadata.canonical_query)
        if query is not None and sorted(query.dimensions) == sorted(data["dimensions"]):
            query = replace(query, dimensions=tuple(data["dimensions"]))
        release = cls(table, metadata, query=query, request_id=request.get("request_id"),
                      charged=request.get("charged"))
        # The query as it was written (a canonical form reads back in its own terms: a NOT as
        # the codes it admits), saved again as it was.
        release._query_text = written
        return release

    def to_csv(self, path: str | Path | None = None) -> str:
        """The cells as CSV (keys, value, ci_low, ci_high, suppressed, status); nulls are empty
        fields. Written to `path` when given; the text is returned either way."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        names = [*self.keys, *VALUE_COLUMNS]
        writer.writerow(names)
        for row in self.table.to_pylist():
            writer.writerow(
                [
                    "" if row[n] is None else ("true" if row[n] else "false")
                    if isinstance(row[n], bool) else row[n]
                    for n in names
                ]
            )
        text = buffer.getvalue()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    # -- display --
    def _format_value(self, value: float | None) -> str:
        if value is None:
            return "-"
        measure = self.metadata.measure
        if measure == "Proportion":
            return share_text(value)
        if measure == "Mean":
            return f"{value:,.2f}"
        return f"{value:,.0f}"

    def _interval(self, low: float | None, high: float | None) -> str:
        if low is None or high is None:
            return ""
        return f"[{self._format_value(low)}, {self._format_value(high)}]"

    @property
    def interval_label(self) -> str:
        """The intervals' heading, from their confidence: "95% CI"."""
        return f"{100 * self.metadata.confidence:g}% CI"

    def display_rows(self) -> tuple[list[str], list[list[str]], list[bool]]:
        """Headers, formatted rows and which rows were not published (suppressed, or empty by
        the query's terms): the readable table. Its last column is the status of a cell that
        was not published, blank for one that was."""
        keys = self.keys
        headers = [*keys, "value", self.interval_label, "status"]
        rows: list[list[str]] = []
        muted: list[bool] = []
        for row in self.table.to_pylist():
            hidden = bool(row["suppressed"])
            status = row["status"]
            rows.append(
                [
                    *(key_text(row[k]) for k in keys),
                    "-" if hidden else self._format_value(row["value"]),
                    "" if hidden else self._interval(row["ci_low"], row["ci_high"]),
                    "" if status == "published" else status,
                ]
            )
            muted.append(status != "published")
        return headers, rows, muted

    def summary(self) -> str:
        """One line: what was asked, what it cost, how it was protected."""
        m = self.metadata
        asked = str(self.query) if self.query is not None else m.measure
        scale = f"scale {m.noise_scale:.3g}"
        if m.sum_noise_scale is not None:
            scale += f" (sum {m.sum_noise_scale:.3g})"
        chance = empty_cells_text(m.expected_empty_published_bound, m.empty_pass_probability)
        ruled_out = unreachable_text(m.unreachable_cells, m.measure)
        return (
            f"{asked}: {m.loss_name} {m.loss}, {m.mechanism} {scale}, tau {m.tau} (k {m.k}); "
            f"{m.suppressed_by_rule} of {m.cells} cells suppressed; "
            + (f"{ruled_out}; " if ruled_out else "")
            + (f"{chance}; " if chance else "")
            + (f"{base}; " if (base := share_base_text(self.query)) else "")
            + ("released before, so free of charge; " if self.replayed else "")
            + f"release {m.release_id}"
        )

    @property
    def replayed(self) -> bool | None:
        """A stored release this call returned free of charge (a retry, or a query released
        before by anyone); None when what the call cost is not known (a release fetched again,
        a request id retried or given). Its loss is the one it was made at, the highest any
        release of the query was made at, which may differ from the loss asked for."""
        return None if self.charged is None else self.charged == 0

    def to_text(self, max_rows: int | None = None) -> str:
        headers, rows, _ = self.display_rows()
        right = [False] * len(self.keys) + [True, True, False]
        return text_table(headers, rows, right=right, max_rows=max_rows)

    def __repr__(self) -> str:
        return f"{self.to_text(max_rows=40)}\n{self.summary()}"

    def _repr_html_(self) -> str:
        headers, rows, suppressed = self.display_rows()
        right = [False] * len(self.keys) + [True, True, False]
        return html_table(
            headers, rows, right=right, muted=suppressed, caption=shorten(str(self.query or ""),
                                                                          200),
            footer=self.summary(), max_rows=200,
        )

    def plot(self, **kwargs: Any) -> Any:
        """A bar chart with error bars; suppressed cells marked. See `client.plot.plot_release`."""
        from client.plot import plot_release

        return plot_release(self, **kwargs)


def with_status(table: pa.Table, measure: str, unreachable: int | None = None) -> pa.Table:
    """`table` with its `status` column, dictionary-encoded over `STATUSES` whatever its source:
    the server's, or, for a release stored before the server wrote one, derived from what the
    cells show. There a cell marked suppressed reads "suppressed", and a count's or sum's cell
    stated as exactly 0 [0, 0] reads "empty" (a published count is at least tau, and a
    published sum's interval has a width, so only a cell empty by the query's terms is shown
    so). A share's or mean's empty cell had no value and was marked suppressed like a withheld
    one: when the release's `unreachable` count is every cell marked so, they are all empty;
    otherwise which are is not known, and they read "suppressed"."""
    names = table.column_names
    if "status" in names:
        if names.index("status") < names.index("value"):
            raise ValueError(
                "this release groups by a variable named 'status', which this client reads as "
                "each cell's status; rename the variable in the codebook"
            )
        column = table.column("status").combine_chunks()
        if column.type == _STATUS_TYPE and column.dictionary.to_pylist() == list(STATUSES):
            return table  # as the server writes it: nothing to redo for each response
        status = column.to_pylist()
        return table.set_column(names.index("status"), "status", _status_array(status))
    hidden = table.column("suppressed").to_pylist()
    all_empty = (
        measure in ("Proportion", "Mean") and bool(unreachable) and sum(hidden) == unreachable
    )
    status = [
        "empty" if all_empty and withheld else derived_status(measure, withheld, low, high)
        for withheld, low, high in zip(
            hidden, table.column("ci_low").to_pylist(), table.column("ci_high").to_pylist(),
            strict=True,
        )
    ]
    return table.append_column("status", _status_array(status))


def _status_array(status: list[str]) -> pa.Array:
    """The status column as the server writes it: indices into `STATUSES`."""
    try:
        indices = [STATUSES.index(s) for s in status]
    except ValueError:
        raise ValueError(f"a cell's status is none of {', '.join(STATUSES)}") from None
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int8()), pa.array(STATUSES))


_STATUS_TYPE = pa.dictionary(pa.int8(), pa.string())


def derived_status(measure: str, suppressed: bool, low: float | None, high: float | None) -> str:
    """A cell's status where the release does not state it (see `with_status`)."""
    if suppressed:
        return "suppressed"
    stated = measure in ("Count", "FlagCounts", "Sum")
    return "empty" if stated and low == 0 and high == 0 else "published"


def _integer_bounds(table: pa.Table) -> pa.Table:
    """A count's interval bounds are whole numbers: typed as integers, like its value."""
    for name in ("ci_low", "ci_high"):
        column = table.column(name)
        if pa.types.is_floating(column.type):
            values = column.to_pylist()
            if all(v is None or float(v).is_integer() for v in values):
                index = table.column_names.index(name)
                table = table.set_column(index, name, pa.array(
                    [None if v is None else int(v) for v in values], type=pa.int64()))
    return table


def arrange(table: pa.Table, dimensions: tuple[str, ...] | list[str]) -> pa.Table:
    """The cells with the key columns in the order the query named its dimensions (`flag`
    first for flag counts) and the rows sorted the same way, each key in its codebook order.

    The server orders dimensions its own way (the order is not part of a query's identity, so a
    stored release may come back in the order its first requester used)."""
    names = table.column_names
    wanted = [d for d in dimensions if d in names]
    keys = [n for n in names if n not in VALUE_COLUMNS]
    if sorted(wanted) != sorted(k for k in keys if k != "flag") or not keys:
        return table
    order = (["flag"] if "flag" in keys else []) + wanted
    if order == keys:
        return table
    ranks = []
    for name in order:
        first_seen: dict[Any, int] = {}
        for value in table.column(name).to_pylist():
            first_seen.setdefault(value, len(first_seen))
        ranks.append([first_seen[v] for v in table.column(name).to_pylist()])
    rows = sorted(range(table.num_rows), key=lambda i: tuple(r[i] for r in ranks))
    values = [name for name in VALUE_COLUMNS if name in names]
    return table.select([*order, *values]).take(pa.array(rows, type=pa.int64()))


# ---- dry runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EarlierRelease:
    """A release of the same query that the caller itself received on another data version
    (last year's table, say). A release now is drawn afresh from the data served, since
    releases belong to their data version; `Client.get_release(release_id)` fetches this one
    again, free."""

    release_id: str
    data_version: str
    loss: Amount  # the loss it was made with (exact)
    received_at: str

    @classmethod
    def from_pb(cls, m: pb.EarlierRelease) -> EarlierRelease:
        return cls(release_id=m.release_id, data_version=m.data_version, loss=amount(m.loss),
                   received_at=m.received_at)

    def to_dict(self) -> dict[str, Any]:
        return {"release_id": self.release_id, "data_version": self.data_version,
                "loss": format_amount(self.loss), "received_at": self.received_at}


@dataclass(frozen=True)
class DryRun:
    """What a release would cost and how accurate it would be. Charges nothing."""

    loss: Amount  # what a release would be made with (exact)
    accounting: str
    cells: int
    mechanism: str
    noise_scale: float
    tau: int  # a cell is published when its noisy count reaches tau
    half_width: int  # of a count's interval at `confidence`
    confidence: float
    assumed_count: int
    expected_suppressed_share: float  # for cells whose true count is `assumed_count`
    fingerprint: str
    already_released: bool  # releasing it would return the stored release, free
    # As in ReleaseMetadata: p0 and cells x p0 (None from a server older than these fields).
    empty_pass_probability: float | None = None
    expected_empty_published_bound: float | None = None
    unreachable_cells: int | None = None  # as in ReleaseMetadata
    measure: str = ""  # Count, FlagCounts, Proportion, Sum or Mean ("" from an older server)
    # About how far a cell's interval reaches either side in the measure's own units (a share
    # between 0 and 1, a mean, a sum) for a cell of `assumed_count` records.
    value_half_width: float | None = None
    data_version: str = ""  # the data a release would be drawn from ("" from an older server)
    # The caller's newest release of this query on another data version: not what a release
    # now returns, but where the earlier table is (None: none, or a server older than this).
    earlier_release: EarlierRelease | None = None
    query: Query | None = field(default=None, compare=False)
    # The caller's budget read just after the dry run (None when it could not be read): what
    # `fits_budget` and `remaining_after` are computed from, on this machine.
    budget: Budget | None = field(default=None, compare=False)

    @classmethod
    def from_pb(
        cls, m: pb.DryRunResponse, query: Query | None = None, budget: Budget | None = None
    ) -> DryRun:
        return cls(
            loss=amount(m.loss), accounting=ACCOUNTING_NAMES.get(m.accounting, "unspecified"),
            cells=m.cells, mechanism=m.mechanism, noise_scale=m.noise_scale, tau=m.tau,
            half_width=m.half_width, confidence=m.confidence, assumed_count=m.assumed_count,
            expected_suppressed_share=m.expected_suppressed_share, fingerprint=m.fingerprint,
            already_released=m.already_released,
            empty_pass_probability=_optional(m, "empty_pass_probability"),
            expected_empty_published_bound=_optional(m, "expected_empty_published_bound"),
            unreachable_cells=_optional(m, "unreachable_cells"),
            measure=m.measure, value_half_width=_optional(m, "value_half_width"),
            data_version=m.data_version,
            earlier_release=(EarlierRelease.from_pb(m.earlier_release)
                             if m.HasField("earlier_release") else None),
            query=query, budget=budget,
        )

    @property
    def loss_name(self) -> str:
        return LOSS_SYMBOL.get(self.accounting, "loss")

    @property
    def cost(self) -> Amount:
        """What releasing would charge now: 0 when the query was already released."""
        return Amount(0) if self.already_released else self.loss

    @property
    def fits_budget(self) -> bool | None:
        """Whether the cost fits in what the caller's budgets had left (None: not known).
        Releases made after the dry run, by the caller or its institution, can change it."""
        if self.budget is None:
            return None
        return self.cost <= self.budget.remaining

    @property
    def remaining_after(self) -> Amount | None:
        """What the caller could still spend after this release (None: not known or it does
        not fit)."""
        if not self.fits_budget:
            return None
        assert self.budget is not None
        return Amount(self.budget.remaining - self.cost)

    @property
    def limiting_scope(self) -> str | None:
        """The budget that would refuse the release ("client", "institution" or "dataset"), or
        None when it fits or is not known."""
        if self.budget is None or self.fits_budget:
            return None
        return self.budget.limiting_scope(self.cost)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("query", "budget")}
        out["loss"] = format_amount(self.loss)
        earlier = self.earlier_release
        out["earlier_release"] = None if earlier is None else earlier.to_dict()
        out["query"] = None if self.query is None else str(self.query)
        remaining = None if self.budget is None else format_amount(self.budget.remaining)
        after = self.remaining_after
        return {
            **out, "loss_name": self.loss_name, "cost": format_amount(self.cost),
            "remaining": remaining, "fits_budget": self.fits_budget,
            "remaining_after": None if after is None else format_amount(after),
            "limiting_scope": self.limiting_scope,
        }

    def _suppression_line(self) -> str:
        chance = f"{self.expected_suppressed_share:.1%}"
        if self.measure == "Proportion":
            # A share is published only if its records meeting the condition pass tau too, so a
            # rare condition is suppressed in a cell of any size; the forecast is for that count.
            return (
                f"  a share is published when the noisy count of its records that meet the "
                f"condition reaches tau = {self.tau}, whatever the cell's size; if "
                f"{self.assumed_count} of a cell's records meet it, it is suppressed with "
                f"probability at least {chance}\n"
            )
        return (
            f"  published when the noisy count reaches tau = {self.tau}; a cell of "
            f"{self.assumed_count} records is suppressed with probability {chance}\n"
        )

    def _budget_line(self) -> str:
        if self.already_released:
            # The server reports the stored release's own loss and accuracy.
            left = "" if self.budget is None else (
                f"; {format_amount(self.budget.remaining)} remains"
            )
            return (
                f"  cost: 0 (the stored release is returned free{left}); it was made at "
                f"{self.loss_name} {self.loss}, with the accuracy shown"
            )
        if self.budget is None:
            return f"  cost: {self.loss_name} {self.loss}; your remaining budget is not known"
        remaining = format_amount(self.budget.remaining)
        after = self.remaining_after
        if after is not None:
            return (
                f"  cost: {self.loss_name} {self.loss}; it fits: {remaining} remaining now, "
                f"{format_amount(after)} after"
            )
        scope = self.limiting_scope
        short = self.budget.scopes_remaining().get(scope or "client", self.budget.remaining)
        return (
            f"  cost: {self.loss_name} {self.loss}; it does NOT fit: the {scope} budget has "
            f"{format_amount(short)} left"
        )

    def __repr__(self) -> str:
        free = " (already released: it would be returned free)" if self.already_released else ""
        asked = f"{self.query}\n" if self.query is not None else ""
        def line(text: str) -> str:
            return f"  {text}\n" if text else ""

        m = self.measure
        accuracy = line(value_accuracy_text(m, self.value_half_width, self.assumed_count))
        empty_cells = line(unreachable_text(self.unreachable_cells, m or None)) + line(
            empty_cells_text(self.expected_empty_published_bound, self.empty_pass_probability)
        )
        return (
            f"{asked}Dry run: {self.loss_name} {self.loss}{free}\n"
            f"  cells: {self.cells:,}; {self.mechanism}, scale {self.noise_scale:.4g}\n"
            f"  count intervals: +/- {self.half_width} at {100 * self.confidence:g}%\n"
            f"{accuracy}"
            f"{self._suppression_line()}"
            f"{line(share_base_text(self.query))}"
            f"{empty_cells}"
            f"{self._budget_line()}\n"
            f"  fingerprint {self.fingerprint[:16]}"
            + (f"; data version {self.data_version}" if self.data_version else "")
            + self._earlier_line()
        )

    def _earlier_line(self) -> str:
        earlier = self.earlier_release
        if earlier is None:
            return ""
        spelling = "python" if self.query is None else self.query.spelling
        return "\n" + wrap(earlier_release_text(
            earlier.release_id, earlier.data_version,
            f"{self.loss_name} {format_amount(earlier.loss)}", spelling=spelling,
        ))


# ---- budgets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """The caller's privacy budget, exactly. Amounts are `Amount`s, exact Fractions (compare
    and add them with numbers; `str()` gives the server's exact decimal text)."""

    client_id: str
    role: str
    institution: str
    accounting: str
    cap: Amount
    spent: Amount
    reserved: Amount  # held by releases in progress
    remaining: Amount
    institution_cap: Amount | None
    institution_remaining: Amount | None
    dataset_remaining: Amount | None

    @classmethod
    def from_pb(cls, m: pb.Budget) -> Budget:
        roles = {pb.ROLE_RESEARCHER: "researcher", pb.ROLE_AUDITOR: "auditor",
                 pb.ROLE_ADMIN: "admin"}
        return cls(
            client_id=m.client_id,
            role=roles.get(m.role, "unspecified"),
            institution=m.institution,
            accounting=ACCOUNTING_NAMES.get(m.accounting, "unspecified"),
            cap=amount(m.cap),
            spent=amount(m.spent),
            reserved=amount(m.reserved),
            remaining=amount(m.remaining),
            institution_cap=parse_amount(m.institution_cap),
            institution_remaining=parse_amount(m.institution_remaining),
            dataset_remaining=parse_amount(m.dataset_remaining),
        )

    @property
    def loss_name(self) -> str:
        return LOSS_SYMBOL.get(self.accounting, "loss")

    def scopes_remaining(self) -> dict[str, Amount]:
        """What is left in each budget that caps the caller: its own, its institution's (when
        capped) and the dataset's. `remaining` is the least of them."""
        left = {"client": Amount(self.cap - self.spent - self.reserved)}
        if self.institution_remaining is not None:
            left["institution"] = self.institution_remaining
        if self.dataset_remaining is not None:
            left["dataset"] = self.dataset_remaining
        return left

    def limiting_scope(self, cost: Amount) -> str:
        """The budget that would refuse a charge of `cost`: the one with least left among those
        short of it ("client" when none is, as when the server's own figures moved meanwhile)."""
        short = {scope: left for scope, left in self.scopes_remaining().items() if left < cost}
        return min(short, key=lambda scope: short[scope]) if short else "client"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = format_amount(value) if isinstance(value, Amount) else value
        out["loss_name"] = self.loss_name
        return out

    def __repr__(self) -> str:
        d = self.to_dict()
        lines = [
            f"Budget of {self.client_id} ({self.role}"
            + (f", {self.institution}" if self.institution else "")
            + f"), {self.loss_name} ({self.accounting})",
            f"  cap {d['cap']}, spent {d['spent']}, reserved {d['reserved']}, "
            f"remaining {d['remaining']}",
        ]
        if self.institution_cap is not None:
            lines.append(
                f"  institution {self.institution}: cap {d['institution_cap']}, "
                f"remaining {d['institution_remaining']}"
            )
        if self.dataset_remaining is not None:
            lines.append(f"  dataset: remaining {d['dataset_remaining']}")
        return "\n".join(lines)


# ---- the caller's releases ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedRelease:
    """One release the caller received: paid for, or served free because it existed already."""

    release_id: str
    request_id: str
    fingerprint: str
    canonical_query: str
    charged: Amount  # what the caller paid (exact)
    release_loss: Amount  # the loss the release was made with (exact)
    received_at: str
    reused: bool
    data_version: str
    client: Client | None = None

    @classmethod
    def from_pb(cls, m: pb.MyRelease, client: Client | None = None) -> ReceivedRelease:
        return cls(
            release_id=m.release_id, request_id=m.request_id, fingerprint=m.fingerprint,
            canonical_query=m.canonical_query, charged=amount(m.charged),
            release_loss=amount(m.release_loss), received_at=m.received_at, reused=m.reused,
            data_version=m.data_version, client=client,
        )

    @property
    def query(self) -> str:
        """The query, as one readable line."""
        return describe_canonical(self.canonical_query)

    def fetch(self, *, by: str | Sequence[str] | None = None) -> Release:
        """The release again, at no charge: its cells and metadata as the server stored them,
        with this record's `request_id`.

        Its dimensions come in the server's canonical order (alphabetical), not necessarily
        the order the query first named them in (neither this record nor the stored release
        keeps that order, which is not part of a query's identity), unless `by` names the order
        wanted, as `Client.get_release` takes it. Its `charged` is None (this record's
        `charged` says what was paid)."""
        if self.client is None:
            raise TypeError("this record is not bound to a client")
        release = self.client.get_release(self.release_id, by=by)
        release.request_id = self.request_id or None
        return release

    def to_dict(self) -> dict[str, Any]:
        return {
            "release_id": self.release_id, "request_id": self.request_id,
            "fingerprint": self.fingerprint, "canonical_query": self.canonical_query,
            "charged": format_amount(self.charged),
            "release_loss": format_amount(self.release_loss),
            "received_at": self.received_at, "reused": self.reused,
            "data_version": self.data_version, "query": self.query,
        }

    def __repr__(self) -> str:
        return (
            f"ReceivedRelease({self.release_id}, charged {format_amount(self.charged)}, "
            f"{'reused' if self.reused else 'new'}, {self.received_at})"
        )


_RECEIVED_COLUMNS = (
    "release_id", "request_id", "fingerprint", "canonical_query", "charged", "release_loss",
    "received_at", "reused", "data_version", "query",
)


class ReleaseList(list[ReceivedRelease]):
    """The caller's releases, oldest first; prints as a table (with each release's data version
    when they span more than one: after a reload, one query's releases differ only in it)."""

    @property
    def _versioned(self) -> bool:
        return len({r.data_version for r in self}) > 1

    @property
    def _headers(self) -> tuple[str, ...]:
        versions = ("data_version",) if self._versioned else ()
        return ("received_at", "release_id", "charged", "reused", *versions, "query")

    def _rows(self) -> list[list[str]]:
        versioned = self._versioned
        return [
            [r.received_at, r.release_id, format_amount(r.charged), "yes" if r.reused else "",
             *([r.data_version] if versioned else []), shorten(r.query, 80)]
            for r in self
        ]

    def to_pandas(self) -> Any:
        """The releases as a pandas DataFrame, one row each; `charged` and `release_loss` are
        numbers (floats: the records themselves keep them exact, as `Amount`s)."""
        import pandas as pd

        frame = pd.DataFrame([r.to_dict() for r in self], columns=_RECEIVED_COLUMNS)
        for name in ("charged", "release_loss"):
            frame[name] = pd.Series([float(getattr(r, name)) for r in self], dtype="float64")
        return frame

    def __repr__(self) -> str:
        if not self:
            return "no releases yet"
        return text_table(self._headers, self._rows())

    def _repr_html_(self) -> str:
        return html_table(self._headers, self._rows())


def describe_canonical(canonical: str) -> str:
    """A server's canonical query (JSON) as one readable line, written as a summary writes the
    query ("count by gender where majorityStatus = 'Minor'"); the text itself for a form the
    client does not know."""
    query = query_of_canonical(canonical)
    return canonical if query is None else str(query)


def cells_from_json(document: dict[str, Any]) -> list[Cell]:
    """The cells of a JSON document written by `Release.to_json` (for reading it back); a
    document saved before cells had a status has it derived as `with_status` does."""
    measure = document.get("metadata", {}).get("measure", "")
    return [
        Cell(c["keys"], c["value"], c["ci_low"], c["ci_high"], c["suppressed"],
             c.get("status") or derived_status(measure, c["suppressed"], c["ci_low"],
                                               c["ci_high"]))
        for c in document["cells"]
    ]


__all__ = [
    "JSON_FORMAT",
    "Budget",
    "Cell",
    "DryRun",
    "EarlierRelease",
    "ReceivedRelease",
    "Release",
    "ReleaseList",
    "ReleaseMetadata",
    "cells_from_json",
]
