"""Releases: what a client receives, and the seam through which every release is charged.

The engine computes an `Answer` (noisy, suppressed, with intervals) but an answer is not handed
out. Only a `Charger` turns it into a `Release`, after it has durably recorded the charge: a
`Release` cannot be constructed without a charge id. `Engine.release` drives that sequence.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from engine.accuracy import EmptyCellBound, count_interval_level, empty_cell_bound
from engine.codebook import RESERVED_NAMES, Dimension
from engine.loss import format_amount
from engine.planner import Plan
from engine.query import Count, FlagCounts, Mean, Proportion, Sum

_META_KEY = b"veil.release"


@dataclass(frozen=True)
class ReleaseMetadata:
    """Everything about a release except its cells. Contains no true value.

    `suppressed_cells` counts the cells marked `suppressed` in the table, those with no value: the
    cells the publication rule withheld (status "suppressed") and, for a share or a mean, the
    cells the query's own terms leave empty (status "empty"), which have no value to show. A
    count's or sum's empty cells are stated as 0 [0, 0] and not marked, so not counted.
    `unreachable_cells` counts the cells the query's own terms leave empty, for every measure
    (status "empty"; None in releases stored before they were counted). `suppressed_by_rule`
    counts the withheld cells alone, the same way for every measure.

    `empty_pass_probability` and `expected_empty_published_bound` depend on the plan only (cells,
    tau, the count's noise): on average at most `expected_empty_published_bound` of the published
    cells are empty ones published by chance, each empty cell with probability at most
    `empty_pass_probability`. The names say "empty" and "bound" because that is all they claim:
    not how many published cells are wrong, but a ceiling on the expected number with true count 0.
    """

    fingerprint: str
    canonical_query: str
    data_version: str
    codebook: str
    measure: str
    mechanism: str
    accounting: str
    loss: str  # the exact amount charged
    measured_loss: str  # the sum of OpenDP's privacy maps (a float), never more than `loss`
    noise_scale: float  # scale of every count's noise
    sum_noise_scale: float | None  # scale of a clamped sum's noise, for sums and means
    tau: int
    k: int
    beta: float
    confidence: float
    cells: int
    suppressed_cells: int
    release_id: str = ""
    charge_id: str = ""
    created_at: str = ""
    # None in releases stored before they were recorded (decoded from their stored bytes).
    unreachable_cells: int | None = None  # rows the query's own terms leave empty
    empty_pass_probability: float | None = None  # p0: P(an empty cell is published)
    expected_empty_published_bound: float | None = None  # cells x p0 (see EmptyCellBound)

    @property
    def reachable_cells(self) -> int:
        """Cells some record may fall into (every cell, for a release made before the cells
        its query's terms leave empty were counted)."""
        return self.cells - (self.unreachable_cells or 0)

    @property
    def suppressed_by_rule(self) -> int:
        """Cells the publication rule withheld (status "suppressed"), for every measure. A
        share's or mean's cells left empty by the query's terms have no value and are marked
        suppressed, but no rule withheld them."""
        ruled_out = self.unreachable_cells or 0
        return self.suppressed_cells - (ruled_out if self.measure in ("Proportion", "Mean") else 0)

    @property
    def suppressed_share(self) -> float:
        """The share of the cells the publication rule was put to that it withheld."""
        reachable = self.reachable_cells
        return self.suppressed_by_rule / reachable if reachable else 0.0


_META_FIELDS = fields(ReleaseMetadata)


@dataclass(frozen=True)
class Answer:
    """A computed, noisy, suppressed table that has not been charged and must not leave."""

    table: pa.Table
    metadata: ReleaseMetadata


@dataclass(frozen=True)
class Release:
    """A charged answer: the only thing the engine lets out."""

    table: pa.Table
    metadata: ReleaseMetadata
    # The bytes this release was read from, sent as they are instead of encoded again. Not an
    # init field, so that `dataclasses.replace` cannot carry stale bytes to a changed release.
    _data: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.metadata.charge_id or not self.metadata.release_id:
            raise ValueError("a release cannot exist without its charge id and release id")

    @classmethod
    def from_answer(
        cls, answer: Answer, *, release_id: str, charge_id: str, created_at: str
    ) -> Release:
        metadata = replace(
            answer.metadata, release_id=release_id, charge_id=charge_id, created_at=created_at
        )
        return cls(answer.table, metadata)

    def to_bytes(self) -> bytes:
        """An Arrow IPC stream carrying the metadata in its schema; stored and sent as is."""
        if self._data is not None:
            return self._data
        # Every field is a str, int, float or None, so a shallow dict is what asdict (which
        # deep-copies each value) would give, at a tenth of the cost.
        meta = json.dumps(
            {f.name: getattr(self.metadata, f.name) for f in _META_FIELDS}, sort_keys=True
        ).encode()
        table = self.table.replace_schema_metadata({_META_KEY: meta})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        data = bytes(sink.getvalue().to_pybytes())
        object.__setattr__(self, "_data", data)  # encoded once: what is stored is what is sent
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> Release:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        raw = json.loads((table.schema.metadata or {})[_META_KEY])
        release = cls(table.replace_schema_metadata(None), ReleaseMetadata(**raw))
        object.__setattr__(release, "_data", data)
        return release

    def to_pandas(self) -> Any:
        return self.table.to_pandas()


class Reservation(Protocol):
    """A hold on budget for one request, counted against every cap until settled."""

    @property
    def stored(self) -> Release | None:
        """A release already made for this request or query: returned as is, never recomputed."""

    def commit(self, answer: Answer) -> Release:
        """Durably record the charge and the release, then return it."""

    def cancel(self) -> None:
        """Give the held budget back; nothing was released."""

    def forfeit(self, reason: str) -> None:
        """Spend the held budget with nothing released: the query was stopped after it read
        data, in a way its caller sees (the server's time limit)."""


class Charger(Protocol):
    """The ledger's side of the seam."""

    def reserve(
        self, plan: Plan, *, client: str, request_id: str, data_version: str
    ) -> Reservation: ...


def replays(stored_loss: Fraction, asked: Fraction) -> bool:
    """The replay rule: a request for a query gets its stored release on the same data version
    back, free, when that release was drawn at no less loss than the request asks; a request at
    a larger loss is drawn afresh and charged. The ledger's reservation and the server's dry
    run both ask this, so what a dry run promises is what a release does."""
    return stored_loss >= asked


# ---- building the table -------------------------------------------------------------------


def publishable(noisy_counts: np.ndarray, tau: int) -> np.ndarray:
    """The publication rule: a count passes when its NOISY value reaches tau.

    It never reads a true count. Suppressing on the true count would make the pattern of
    suppressed cells a deterministic function of one person's presence.
    """
    return np.asarray(noisy_counts >= tau)


def build_answer(plan: Plan, noisy: list[np.ndarray], *, data_version: str) -> Answer:
    """Turn noisy component vectors (dense over the plan's cells) into a release table."""
    measure = plan.query.measure
    settings = plan.settings
    count_dist = plan.count_mechanism.distribution
    tau = plan.tau
    n = plan.group_cells
    keys = _key_columns(plan.dimensions, n)
    sum_scale: float | None = None
    # Rows the query's own terms leave empty (see Plan.unreachable_row_mask: for flag counts,
    # also a flag's rows where the query admits no record with that flag set): known from the
    # query alone, so stated as they are (a count or sum of 0; a share or mean of nothing, left
    # out) rather than published as noise around zero. Zeroing them reads no data.
    unreachable = plan.unreachable_row_mask

    q_count, q_sum = interval_quantiles(plan)

    if isinstance(measure, (Count, FlagCounts)):
        counts = np.concatenate(noisy) if isinstance(measure, FlagCounts) else noisy[0]
        counts = np.where(unreachable, 0, counts)
        published = publishable(counts, tau) | unreachable
        value: pa.Array = _withheld(counts, published, pa.int64())
        low = np.where(unreachable, 0, np.maximum(counts - q_count, 0)).astype(float)
        high = np.where(unreachable, 0, counts + q_count).astype(float)
        if isinstance(measure, FlagCounts):
            flags = plan.flag_names
            keys = {name: pa.concat_arrays([col] * len(flags)) for name, col in keys.items()}
            keys["flag"] = _strings([flag for flag in flags for _ in range(n)])
    elif isinstance(measure, Proportion):
        # One noisy vector: the records meeting the condition (N'), then the rest (C').
        (split,) = noisy
        if split.size != 2 * n:
            raise ValueError(f"a proportion's vector holds 2 x {n} values, not {split.size}")
        numerator, rest = split[:n], split[n:]
        denominator = numerator + rest
        # N' passing tau bounds the chance of publishing a cell of fewer than k records (its N
        # is fewer still), whatever the wider noise of N' + C'; D' must pass too.
        published = publishable(numerator, tau) & publishable(denominator, tau) & ~unreachable
        ratio = np.clip(numerator / np.maximum(denominator, 1).astype(float), 0.0, 1.0)
        value = _withheld(ratio, published, pa.float64())
        # N / (N + C) grows with N and shrinks with C: its interval's ends take each count's
        # opposite ends, the two intervals joined by the union bound.
        low = _share(np.maximum(numerator - q_count, 0), np.maximum(rest + q_count, 0), empty=0.0)
        high = _share(np.maximum(numerator + q_count, 0), np.maximum(rest - q_count, 0), empty=1.0)
    else:
        assert isinstance(measure, (Sum, Mean))
        shifted, present = noisy
        variable = plan.components[0].argument
        shift = plan.components[0].shift
        lo_bound, hi_bound = float(variable.low), float(variable.high)
        sum_scale = plan.mechanisms[0].distribution.scale
        published = publishable(present, tau)
        if isinstance(measure, Mean):
            published &= ~unreachable  # the mean of no record
            # mean = shift + S / P, with S in [S' - q_sum, S' + q_sum] and P a count of at least
            # one in [P' - q_count, P' + q_count]: S / P is least at the lowest S over the largest
            # P when that S is not negative, over the smallest P when it is; greatest likewise.
            fewest = np.maximum(present - q_count, 1).astype(float)
            most = np.maximum(present + q_count, 1).astype(float)
            least_sum, greatest_sum = shifted - q_sum, shifted + q_sum
            estimate = shift + shifted / np.maximum(present, 1).astype(float)
            low = shift + least_sum / np.where(least_sum >= 0, most, fewest)
            high = shift + greatest_sum / np.where(greatest_sum >= 0, fewest, most)
            estimate, low, high = (np.clip(v, lo_bound, hi_bound) for v in (estimate, low, high))
        else:
            estimate = np.where(unreachable, 0, shifted + shift * present)
            spread = np.where(unreachable, 0, _sum_spread(q_sum, q_count, shift))
            low, high = estimate - spread, estimate + spread
            published |= unreachable
        value = _withheld(estimate.astype(float), published, pa.float64())

    mask = ~published
    chance = empty_cell_bound_of(plan)
    columns = dict(keys)
    clash = {d.name.lower() for d in plan.dimensions} & RESERVED_NAMES
    if clash:
        # Named so, a dimension's keys would be overwritten, or read as the cells' values (a
        # parsed codebook refuses such names; one built in code may not have).
        raise ValueError(f"a dimension is named {', '.join(sorted(clash))}, a column of every "
                         f"release; the codebook must call it something else")
    columns["value"] = value
    columns["ci_low"] = _withheld(np.asarray(low, dtype=float), published, pa.float64())
    columns["ci_high"] = _withheld(np.asarray(high, dtype=float), published, pa.float64())
    columns["suppressed"] = _booleans(mask)
    columns["status"] = cell_status(published, unreachable)
    table = pa.table(columns)
    metadata = ReleaseMetadata(
        fingerprint=plan.fingerprint,
        canonical_query=plan.canonical,
        data_version=data_version,
        codebook=plan.codebook.identity,
        measure=type(measure).__name__,
        mechanism=count_dist.mechanism,
        accounting=plan.loss.accounting.value,
        loss=format_amount(plan.loss.amount),
        measured_loss=repr(float(plan.measured_loss)),
        noise_scale=count_dist.scale,
        sum_noise_scale=sum_scale,
        tau=tau,
        k=settings.k,
        beta=settings.beta,
        confidence=settings.confidence,
        cells=table.num_rows,
        suppressed_cells=int(mask.sum()),
        unreachable_cells=plan.unreachable_rows,
        empty_pass_probability=chance.pass_probability,
        expected_empty_published_bound=chance.expected_published,
    )
    return Answer(table, metadata)


STATUSES = ("published", "suppressed", "empty")


def cell_status(published: np.ndarray, unreachable: np.ndarray) -> pa.Array:
    """Why each cell shows what it shows: "published" (a value the noisy rule let through),
    "suppressed" (withheld: its noisy count fell short of tau) or "empty" (no record can fall
    into it by the query's own terms: a count or sum stated as 0, a share or mean with no value).

    The `suppressed` column marks every cell without a value, a share's or mean's empty cells
    too; this column says which reason holds. It reads the query's terms and the noisy
    publication decision only, never a true count: what it adds to the values, which cells the
    query's terms rule out, is known from the query alone.
    """
    reason = np.where(unreachable, 2, np.where(published, 0, 1)).astype(np.int8)
    # Dictionary-encoded: a string per cell took 20 ms for the 63,001 cells of a corridor.
    return pa.DictionaryArray.from_arrays(_numbers(reason, pa.int8()), _strings(STATUSES))


def value_half_width(plan: Plan, count: int) -> float:
    """About how far a cell's interval reaches either side, in the measure's own units, for a
    cell of `count` records: the accuracy a dry run can state before anything is read.

    A count's is the count noise's quantile. A share N / (N + C) moves by about q / count either
    way (q: each count's quantile under the union bound, as `build_answer` takes it; the noisy
    count stands in for the true one, so a published share's is wider about half the time). A
    sum's is its interval's spread. A mean's, (q_sum + reach x q_count) / (count - q_count),
    with reach the farthest a clamped value lies from the shift, and never more than the
    variable's range: the noisy count stands in for the true one.
    """
    measure = plan.query.measure
    q_count, q_sum = interval_quantiles(plan)
    if isinstance(measure, (Count, FlagCounts)):
        return float(q_count)
    if isinstance(measure, Proportion):
        return min(1.0, q_count / count) if count > 0 else 1.0
    shift = plan.components[0].shift
    if isinstance(measure, Sum):
        return float(_sum_spread(q_sum, q_count, shift))
    variable = plan.components[0].argument
    width = float(variable.high - variable.low)
    reach = max(shift - variable.low, variable.high - shift)
    return width if count <= q_count else min(width, (q_sum + reach * q_count) / (count - q_count))


def interval_quantiles(plan: Plan) -> tuple[float, float]:
    """How far the noise reaches at the plan's confidence: (count noise, sum noise; 0 without a
    sum). A count's interval takes the whole confidence; a share's two counts, and a sum's or
    mean's sum and count, share it by the union bound (`bonferroni_level`)."""
    measure = plan.query.measure
    count_dist = plan.count_mechanism.distribution
    level = count_interval_level(measure, plan.settings.confidence)
    if isinstance(measure, (Count, FlagCounts)):
        return count_dist.quantile_abs(level), 0.0
    q_sum = (
        plan.mechanisms[0].distribution.quantile_abs(level)
        if isinstance(measure, (Sum, Mean))
        else 0.0
    )
    return count_dist.quantile_abs(level), q_sum


def _sum_spread(q_sum: float, q_count: float, shift: int) -> float:
    """How far a sum's interval reaches either side: the sum S = S' + shift x P is off by its
    own noise and by the shift times its count's."""
    return q_sum + abs(shift) * q_count


def empty_cell_bound_of(plan: Plan) -> EmptyCellBound:
    """The plan's bound on empty cells published by chance (see `EmptyCellBound`).

    Every measure's publication rule reads a count drawn with the plan's count noise against tau
    (a count, each flag's count, a proportion's N', a sum's or mean's group count), one per cell.
    Cells (a flag's rows, for flag counts) the query's own terms leave empty are stated, never
    published by chance, and are not counted.
    """
    reachable = plan.cells - plan.unreachable_rows
    return empty_cell_bound(plan.count_mechanism.distribution, tau=plan.tau, cells=reachable)


def _share(meets: np.ndarray, rest: np.ndarray, *, empty: float) -> np.ndarray:
    """meets / (meets + rest) of non-negative counts; `empty` where both are zero."""
    total = meets + rest
    return np.where(total > 0, meets / np.maximum(total, 1), empty)


def _withheld(values: np.ndarray, published: np.ndarray, kind: pa.DataType) -> pa.Array:
    """A column whose unpublished cells are null AND zero underneath.

    Arrow's null mask alone leaves the value in the data buffer, where any reader of the IPC
    bytes would find the suppressed cell's noisy count.
    """
    return _numbers(np.where(published, values, 0), kind, null=~published)


def _key_columns(dimensions: tuple[Dimension, ...], cells: int) -> dict[str, pa.Array]:
    """Key columns in row-major order of the dimensions; the missing key is null."""
    return dict(_cached_key_columns(dimensions, cells))


@functools.lru_cache(maxsize=32)  # an entry may hold up to max_cells keys per dimension
def _cached_key_columns(dimensions: tuple[Dimension, ...], cells: int) -> dict[str, pa.Array]:
    # Public keys only, the same for every release over these dimensions; Arrow arrays are
    # immutable, and the dict is copied before use.
    columns: dict[str, pa.Array] = {}
    stride = cells
    index = np.arange(cells)
    for dimension in dimensions:
        stride //= dimension.size
        position = (index // stride) % dimension.size
        if dimension.key_is_integer:
            keys = np.array([*dimension.keys, 0], dtype=np.int64)
            missing = position == len(dimension.keys)
            columns[dimension.name] = _numbers(keys[position], pa.int64(), null=missing)
        else:
            labels = [*map(str, dimension.keys), None]
            columns[dimension.name] = _strings([labels[p] for p in position.tolist()])
    return columns


# ---- Arrow arrays from numpy ---------------------------------------------------------------------
#
# pa.array() asks pandas whether its input is a pandas categorical, and so imports pandas, which
# no release uses: 47 MiB more resident memory and about half a second on a server's first
# release. Arrays assembled from their buffers are the same arrays without it (and, for numbers,
# without a copy).

_NUMPY_TYPES = {pa.int8(): np.int8, pa.int64(): np.int64, pa.float64(): np.float64}


def _numbers(values: np.ndarray, kind: pa.DataType, *, null: np.ndarray | None = None) -> pa.Array:
    """A numeric Arrow array of `values`, null where `null` is true."""
    data = np.ascontiguousarray(values, dtype=_NUMPY_TYPES[kind])
    validity, nulls = _validity(null)
    return pa.Array.from_buffers(kind, len(data), [validity, pa.py_buffer(data)], null_count=nulls)


def _booleans(values: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, _bits(values)], null_count=0)


def _strings(values: Sequence[str | None]) -> pa.Array:
    """A string Arrow array of `values`, null where a value is None."""
    encoded = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    validity, nulls = _validity(np.array([v is None for v in values], dtype=bool))
    buffers = [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(encoded), buffers, null_count=nulls)


def _validity(null: np.ndarray | None) -> tuple[pa.Buffer | None, int]:
    """The validity bitmap for cells null where `null` is true (none when no cell is), and
    how many are null."""
    nulls = 0 if null is None else int(np.count_nonzero(null))
    return (_bits(~null) if null is not None and nulls else None), nulls


def _bits(values: np.ndarray) -> pa.Buffer:
    # Arrow's bitmaps are least significant bit first.
    return pa.py_buffer(np.packbits(np.asarray(values, dtype=bool), bitorder="little"))
