"""OpenDP's own query context: `dp.Context.compositor` over a Polars LazyFrame (OpenDP 0.16).

The table is read once from the same DuckDB file (DuckDB -> Arrow -> Polars), keeping only the
columns the workload reads. ENUM columns become Polars Enums with the codebook's codes, flags and
years become Int32 (OpenDP's Polars domains take neither UInt8 nor Int16 flags in sums). Keys are
public, as in veil: every query is joined with the codebook's key set (`with_keys`), missing
included, so every cell of the domain is released and no key is taken from the data.

Each run gets a context of its own holding one query's budget, built outside the timing; a run
is what a custodian's script waits for: build the query, resolve it into a measurement (OpenDP
calibrates the scale by search), release and collect.
"""

from __future__ import annotations

import gc
import itertools
import time
import warnings
from typing import Any

from benchmarks.data import Dataset
from benchmarks.systems import Options, System, Unavailable
from benchmarks.systems.raw_duckdb import connect
from benchmarks.workload import WorkloadQuery, quote, workload
from engine.codebook import Codebook, Kind, default_codebook

try:
    import opendp.prelude as _opendp
    import polars as pl
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise Unavailable(f"needs polars and opendp[polars]: {exc}") from exc

dp: Any = _opendp  # OpenDP's Polars helpers are attached at import time: untyped
dp.enable_features("contrib")


def _private(expression: Any) -> Any:
    """The `.dp` namespace OpenDP adds to Polars expressions."""
    return expression.dp


class OpenDPPolars:
    name = "opendp_polars"
    label = "OpenDP 0.16 Context over a Polars LazyFrame"
    slow = True
    reference = False

    def __init__(self, options: Options) -> None:
        self.options = options
        self.codebook: Codebook = default_codebook()
        self.frame: Any = None
        self.rows = 0
        self.context: Any = None
        self._cells: int | None = None

    def open(self, data: Dataset) -> None:
        columns = sorted({c for q in workload(self.codebook) for c in q.columns()})
        text = f"SELECT {', '.join(quote(c) for c in columns)} FROM records"
        # Opened as veil's backend opens it: one process may not open a file two ways.
        with connect(str(data.path)) as connection:
            table = connection.sql(text).to_arrow_table()
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        casts = []
        for name in columns:
            variable = self.codebook.variable(name)
            if variable.kind in (Kind.CATEGORY, Kind.COUNTRY):
                enum = pl.Enum([str(code) for code in variable.codes])
                casts.append(pl.col(name).cast(pl.String).cast(enum))
            else:
                casts.append(pl.col(name).cast(pl.Int32))
        self.frame = frame.with_columns(casts).lazy()
        self.rows = data.rows

    def prepare(self, query: WorkloadQuery) -> None:
        self.context = self._context(query)

    def _context(self, query: WorkloadQuery) -> Any:
        # Over the query's own columns only: a frame of every column the workload reads makes
        # OpenDP's plan resolution about 1.8x slower for the small tables.
        return dp.Context.compositor(
            data=self.frame.select(list(query.columns())),
            privacy_unit=dp.unit_of(contributions=1),
            privacy_loss=dp.loss_of(epsilon=self.options.epsilon),
            split_evenly_over=1,
            margins=[dp.polars.Margin(by=[], max_length=max(self.rows, 1))],
        )

    def _keys(self, query: WorkloadQuery) -> Any:
        schema = self.frame.collect_schema()
        domains = []
        for name in query.by:
            dimension = self.codebook.dimension(name)
            keys: list[Any] = [
                int(k) if dimension.key_is_integer else str(k) for k in dimension.keys
            ]
            domains.append([*keys, None])
        rows = list(itertools.product(*domains))
        return pl.LazyFrame(rows, schema={b: schema[b] for b in query.by}, orient="row")

    def run(self, query: WorkloadQuery) -> float:
        keys = self._keys(query)  # public, built from the codebook: not part of the timing
        start = time.perf_counter()
        plan = self.context.query()
        if query.where is not None:
            plan = plan.filter(pl.col(query.where[0]) == query.where[1])
        grouped = plan.group_by(list(query.by))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if query.measure == "count":
                aggregates = [dp.len(signed=True)]
            elif query.measure == "flags":
                aggregates = [_private(pl.col(f).fill_null(0)).sum((0, 1)) for f in query.flags]
            else:
                assert query.condition is not None
                column, value = query.condition
                numerator = (pl.col(column) == value).fill_null(False).cast(pl.Int32)
                aggregates = [
                    _private(numerator).sum((0, 1)).alias("numerator"),
                    dp.len(signed=True),
                ]
            result = grouped.agg(aggregates).with_keys(keys).release().collect()
        elapsed = time.perf_counter() - start
        self._cells = result.height
        # A spent context sits in reference cycles that hold a copy of the table (about 0.8 GiB
        # at 10M rows): collected now, outside the timing, or a 10M-row run exhausts memory.
        self.context = None
        del plan, grouped, result
        gc.collect()
        self.context = self._context(query)  # the next run's budget, outside the timing
        return elapsed

    def cells(self, query: WorkloadQuery) -> int | None:
        return self._cells

    def close(self) -> None:
        self.frame = None
        self.context = None


def systems(options: Options) -> list[System]:
    return [OpenDPPolars(options)]
