"""Loading a custodian's source file (CSV or Parquet) into a restricted data file.

This is a custodian tool: it runs offline, on a writable connection of its own, and its reports
and errors show the custodian values from the file (an out-of-domain spelling, a line that does
not parse). Nothing here is on the query path.

DuckDB reads the source with every column as text; normalisation and the domain check are SQL
(`engine.sql`, section "load statements"), so a load is two parallel scans of the file: one that
counts missing and out-of-domain cells per column, one that inserts the typed rows. A CSV file is
read once before them by Python's csv module, which counts its records and refuses a record
whose number of fields is not the header's. The database
is written under a temporary name next to the destination and moved into place only when it is
complete, so a refused or failed load never leaves a partial file or destroys an existing one.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import duckdb
from tqdm import tqdm

from engine import data_file
from engine.codebook import Codebook, Kind, Variable
from engine.errors import LoadError
from engine.sql import (
    LoadColumn,
    SourceFile,
    Statement,
    describe_parquet,
    load_check,
    load_insert,
    load_out_of_domain,
    load_settings,
)

_SHOWN_VALUES = 10  # out-of-domain values a strict refusal lists per column (a report lists all)
_HEADER_WIDTH = 60  # long headers (a terms-of-use sentence) are shortened in reports


@dataclass(frozen=True)
class SkippedColumn:
    """A source column that was not stored, and why."""

    position: int  # 0-based position in the source file
    header: str
    reason: str


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class LoadReport:
    """What a load read, stored, skipped and changed.

    `missing[v]` counts the cells of stored variable v that the source marks missing (a missing
    code, a blank, or the whole column when it is absent). `out_of_domain[v]` maps each source
    text outside v's domain to its number of cells; in lenient mode those cells are stored as
    missing and `mapped_to_missing[v]` is their total (strict mode refuses such a file, so a
    strict report has none). A value stored as missing is therefore counted in exactly one of
    `missing` and `mapped_to_missing`. `empty_records` counts the CSV records whose every cell is
    empty (a spreadsheet's blank rows, saved as lines of commas): lenient mode loads each as a
    record with every variable missing, strict mode refuses them.
    """

    rows: int
    source: Path
    database: Path
    data_version: str
    dataset: str
    codebook: str
    strict: bool
    missing: Mapping[str, int]
    out_of_domain: Mapping[str, Mapping[str, int]]
    mapped_to_missing: Mapping[str, int]
    skipped: tuple[SkippedColumn, ...] = ()
    absent: tuple[str, ...] = ()
    renamed: Mapping[str, str] = field(default_factory=dict)
    empty_records: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "missing", _frozen(self.missing))
        object.__setattr__(
            self,
            "out_of_domain",
            _frozen({k: _frozen(v) for k, v in self.out_of_domain.items()}),
        )
        object.__setattr__(self, "mapped_to_missing", _frozen(self.mapped_to_missing))
        object.__setattr__(self, "renamed", _frozen(self.renamed))

    def render(self) -> str:
        """A plain-text report for the custodian."""
        mode = "strict" if self.strict else "lenient"
        lines = [
            data_file.RESTRICTED_NOTICE,
            f"Loaded {self.rows:,} row{'' if self.rows == 1 else 's'} from {self.source}",
            f"  into          {self.database}",
            f"  data version  {self.data_version}",
            f"  dataset       {self.dataset} (its versions share one dataset budget)",
            f"  codebook      {self.codebook} ({mode} mode)",
            f"  columns       {len(self.missing) - len(self.absent)} read, "
            f"{len(self.skipped)} skipped, {len(self.absent)} absent from the file",
        ]
        if self.renamed:
            lines += ["", "Headers read as codebook names:"]
            lines += [f"  {_short(h)} -> {name}" for h, name in self.renamed.items()]
        if self.skipped:
            lines += ["", "Skipped columns:"]
            lines += [
                f"  column {s.position + 1} {_short(s.header)}: {s.reason}" for s in self.skipped
            ]
        if self.empty_records:
            lines += [
                "",
                f"Records with every cell empty: {self.empty_records:,} "
                "(loaded, every variable missing)",
            ]
        if self.absent:
            lines += ["", "Codebook variables absent from the file (stored as missing):"]
            lines += [f"  {name}" for name in self.absent]
        if self.out_of_domain:
            lines += ["", "Values outside the codebook domain (stored as missing):"]
            for name, values in self.out_of_domain.items():
                lines.append(f"  {name}: {_describe_values(values, shown=len(values))}")
        width = max((len(name) for name in self.missing), default=0)
        lines += ["", "Missing cells per stored column:"]
        for name, count in self.missing.items():
            mapped = self.mapped_to_missing.get(name, 0)
            share = f"{100 * count / self.rows:5.1f}%" if self.rows else "    -"
            extra = f"  (+{mapped:,} out of domain)" if mapped else ""
            lines.append(f"  {name:<{width}}  {count:>12,}  {share}{extra}")
        return "\n".join(lines) + "\n"


def load(
    source: str | Path,
    database: str | Path,
    *,
    codebook: Codebook,
    strict: bool = True,
    overwrite: bool = False,
    data_version: str | None = None,
    dataset: str | None = None,
    progress: bool = False,
) -> LoadReport:
    """Load a CSV (`.csv`, `.csv.gz`) or Parquet file into a new data file at `database`.

    Strict mode (the default) refuses a file with a codebook variable missing, a column outside
    the codebook that holds data, a value outside a variable's domain, or a CSV record with
    every cell empty, raising LoadError that names the columns and values. Lenient mode stores
    such values as missing, loads an absent variable as all-missing and an empty record as a
    record with every variable missing, ignores unknown columns, and reports all of it. Both
    refuse a CSV record whose number of fields is not the header's, naming its line. `data_version`
    defaults to the codebook fingerprint and 16 random hex digits (see `new_data_version`).
    `dataset` names the people the file describes and must stay the same across their versions
    (a corrected file, next year's update): the ledger pays for every version of a dataset from
    one cap. It defaults to the codebook's name.
    """
    source = Path(source)
    database = Path(database)
    source_format = _format_of(source)
    if not source.is_file():
        raise LoadError(f"source file {source} does not exist")
    data_file.check_free(database, overwrite=overwrite)
    if database.exists() and database.resolve() == source.resolve():
        raise LoadError(f"the database path {database} is the source file")

    headers, skip = _read_headers(source, source_format)
    layout = _Layout.of(codebook, headers)
    if not layout.columns and not layout.skipped:
        _refuse_other_delimiter(source, headers)
    # Before the absent check: a header short of one name says so as a row too long for it.
    shape = _read_records(source, len(headers), progress) if source_format == "csv" else None
    if layout.absent and strict:
        # A header that differs only in case is the usual cause; name it, or lenient mode
        # would be taken as the fix and store the column as missing.
        unknown = {headers[p].strip().casefold(): headers[p] for p in layout.unknown}
        named = [
            f"{name} (the file has {unknown[name.casefold()]!r}: headers must match the "
            f"codebook's names)" if name.casefold() in unknown else name
            for name in layout.absent
        ]
        raise LoadError(
            f"{source.name}: codebook variables absent from the file: "
            f"{', '.join(named)} (load lenient to store them as missing)"
        )
    if not layout.columns:
        raise LoadError(f"{source.name}: no column of the file is a stored codebook variable")
    missing_codes = _missing_spellings(codebook.missing_codes)
    reader = SourceFile(str(source), source_format, len(headers), skip)
    if shape is not None and shape.empty and strict:
        raise LoadError(
            f"{source.name}: {_count(shape.empty, 'record')} with every cell empty, the first "
            f"on line {shape.first_empty:,} (a spreadsheet's blank rows?); delete them, or "
            "load lenient to store each as a record with every variable missing"
        )
    if data_version is None:
        data_version = new_data_version(codebook)
    elif not data_version.strip():
        raise LoadError("the data version must not be empty")
    version = data_version
    dataset = data_file.check_dataset_name(codebook.name if dataset is None else dataset)

    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{database.name}.", dir=database.parent))
    except OSError as exc:
        raise LoadError(f"cannot write in {database.parent}: {exc.strerror}") from exc
    partial = workdir / database.name
    try:
        connection = _connect(partial, codebook)
        with contextlib.closing(connection):
            row = _run(
                connection,
                load_check(reader, layout.columns, layout.unknown, missing_codes),
                progress=progress,
                description="checking",
                source=source,
            ).fetchone()
            assert row is not None
            counts = _Counts.of(row, layout)
            if shape is not None and counts.rows != shape.records:
                raise LoadError(
                    f"{source.name} holds {shape.records:,} records "
                    f"but DuckDB read {counts.rows:,}"
                )
            dirty = tuple(c for c in layout.columns if counts.out_of_domain[c.variable.name])
            values = _out_of_domain(connection, reader, dirty, missing_codes, progress, source)
            report = _report(
                counts, values, source, database, codebook, strict, layout,
                version=version, dataset=dataset, empty=0 if shape is None else shape.empty,
            )
            if strict:
                _refuse(report, counts.filled, source, codebook)
            inserted = _run(
                connection,
                load_insert(reader, layout.columns, missing_codes),
                progress=progress,
                description="loading",
                source=source,
            ).fetchone()
            if inserted is None or inserted[0] != report.rows:
                raise LoadError(f"{source} changed while it was being loaded")
            data_file.finish(
                connection, codebook=codebook, data_version=version, dataset=dataset
            )
        try:
            os.replace(partial, database)
        except OSError as exc:
            raise LoadError(f"cannot move the loaded file to {database}: {exc.strerror}") from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


# ---- reading the file's shape ----


def _format_of(source: Path) -> str:
    name = source.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise LoadError(f"{source.name}: expected a .csv, .csv.gz or .parquet file")


def _read_headers(source: Path, source_format: str) -> tuple[tuple[str, ...], int]:
    """The column headers, and the number of CSV rows DuckDB skips to reach the data."""
    if source_format == "parquet":
        statement = describe_parquet(str(source))
        try:
            with contextlib.closing(duckdb.connect()) as connection:
                rows = connection.execute(statement.text, list(statement.parameters)).fetchall()
        except duckdb.Error as exc:
            raise LoadError(f"cannot read {source}: {_duckdb_message(exc)}") from exc
        # DuckDB renames a repeated column (gender, gender_1); the file's own names, in the same
        # order, let a repeat be refused as it is in a CSV header.
        import pyarrow.parquet as pq

        names = tuple(pq.read_schema(source).names)
        if len(names) != len(rows):
            names = tuple(str(row[0]) for row in rows)
        return names, 0
    # Read with Python's csv module rather than DuckDB's sniffer: DuckDB renames duplicate and
    # empty headers, and a byte-order mark before a quoted header trips its dialect detection.
    opener: Any = gzip.open if source.name.lower().endswith(".gz") else open
    try:
        with opener(source, "rt", encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
    except UnicodeDecodeError as exc:
        raise LoadError(f"{source.name} is not UTF-8 text: {exc.reason}") from exc
    except (OSError, csv.Error) as exc:
        raise LoadError(f"cannot read the header of {source.name}: {exc}") from exc
    if not header:
        raise LoadError(f"{source.name} has no header row")
    # DuckDB's `skip` counts CSV rows, not lines: a quoted header cell with a line break in it
    # (a terms-of-use sentence edited in a spreadsheet) is still one row to skip.
    return tuple(header), 1


@dataclass(frozen=True)
class _Records:
    """What the csv module found below a CSV file's header."""

    records: int
    empty: int  # records whose every cell is empty or blank
    first_empty: int | None  # the line the first of them is on


def _read_records(source: Path, width: int, progress: bool) -> _Records:
    """Count a CSV file's records, refusing one whose field count is not the header's.

    DuckDB drops empty fields past the last column without an error, so a record with a stray
    comma in it and an empty last cell would load shifted by one column; Python's csv module
    counts every field. The count is checked against the rows DuckDB reads, so a record either
    loads or the load is refused. Bytes that are not UTF-8 pass here: DuckDB names their line.
    """
    opener: Any = gzip.open if source.name.lower().endswith(".gz") else open
    records = empty = 0
    first_empty = None
    try:
        with (
            opener(
                source, "rt", encoding="utf-8-sig", errors="surrogateescape", newline=""
            ) as handle,
            tqdm(desc="counting", unit=" rows", disable=not progress) as bar,
        ):
            reader = csv.reader(handle)
            next(reader, None)  # the header
            end = reader.line_num
            for fields in reader:
                start, end = end + 1, reader.line_num
                if not fields:
                    continue  # a blank line; DuckDB skips it too
                if len(fields) != width:
                    raise LoadError(_ragged(source, start, fields, width))
                records += 1
                if not any(cell.strip() for cell in fields):
                    empty += 1
                    first_empty = first_empty or start
                bar.update()
    except (OSError, EOFError, csv.Error) as exc:
        raise LoadError(f"cannot read {source.name}: {exc}") from exc
    return _Records(records, empty, first_empty)


def _ragged(source: Path, line: int, fields: list[str], width: int) -> str:
    message = (
        f"{source.name}: the record on line {line:,} has {_count(len(fields), 'field')} "
        f"where the header has {width}"
    )
    extra = fields[width:]
    if extra and not any(cell.strip() for cell in extra):
        message += (
            "; the extra fields are empty, but whether a comma was added at the end or inside "
            "the record (which moves every later value one column) cannot be told"
        )
    return message


def _refuse_other_delimiter(source: Path, headers: tuple[str, ...]) -> None:
    """Name the delimiter of a file in which no header is a codebook name, if it has one."""
    text = ",".join(headers)
    counts = {sep: text.count(sep) for sep in (";", "\t", "|")}
    sep, count = max(counts.items(), key=lambda item: item[1])
    if count:
        raise LoadError(
            f"{source.name} is not comma-separated: no header is a codebook name, and the "
            f"header holds {sep!r} {count:,} times; save it with commas between the columns"
        )


@dataclass(frozen=True)
class _Layout:
    """How the file's columns map to the codebook."""

    columns: tuple[LoadColumn, ...]  # stored variables present, with their positions
    unknown: tuple[int, ...]  # positions of headers that are no codebook name or alias
    skipped: tuple[SkippedColumn, ...]  # codebook columns that are not stored
    absent: tuple[str, ...]  # stored variables with no column in the file
    renamed: Mapping[str, str]  # header -> variable, where the header is an alias
    headers: tuple[str, ...]

    @classmethod
    def of(cls, codebook: Codebook, headers: tuple[str, ...]) -> _Layout:
        by_header = codebook.column_for_header()
        seen: dict[str, str] = {}
        columns, unknown, skipped = [], [], []
        renamed: dict[str, str] = {}
        for position, header in enumerate(headers):
            variable = by_header.get(header.strip())
            if variable is None:
                unknown.append(position)
                continue
            if variable.name in seen:
                raise LoadError(
                    f"columns {seen[variable.name]!r} and {header!r} are both "
                    f"codebook variable {variable.name}"
                )
            seen[variable.name] = header
            if header.strip() != variable.name:
                renamed[header] = variable.name
            if not variable.stored:
                skipped.append(
                    SkippedColumn(
                        position,
                        header,
                        f"concatenated labels, derived from flag set {variable.flag_set}; "
                        "queries use its flags",
                    )
                )
                continue
            columns.append(LoadColumn(variable, position, _spellings(variable)))
        absent = tuple(v.name for v in codebook.stored_variables if v.name not in seen)
        return cls(tuple(columns), tuple(unknown), tuple(skipped), absent, renamed, headers)


def _missing_spellings(codes: tuple[str, ...]) -> tuple[str, ...]:
    """The codebook's missing codes, and each whole-number code as a float column writes it.

    A copy whose flags went through a float column (pandas writes `1.0`) writes `-99` as
    `-99.0`: the same code, not a value outside the domain.
    """
    floats = tuple(f"{code}.0" for code in codes if re.fullmatch(r"[+-]?[0-9]+", code))
    return codes + tuple(code for code in floats if code not in codes)


def _spellings(variable: Variable) -> tuple[tuple[str, str], ...]:
    """Every source spelling of a category variable's codes: code, label and aliases."""
    if variable.kind is not Kind.CATEGORY:
        return ()
    return tuple((spelling, str(code)) for spelling, code in variable.spellings.items())


# ---- running the two scans ----


def _connect(path: Path, codebook: Codebook) -> duckdb.DuckDBPyConnection:
    try:
        connection = data_file.create(path, codebook)
        for setting in load_settings():
            connection.execute(setting)
    except duckdb.Error as exc:
        raise LoadError(f"cannot create {path.name}: {_duckdb_message(exc)}") from exc
    return connection


def _run(
    connection: duckdb.DuckDBPyConnection,
    statement: Statement,
    *,
    progress: bool,
    description: str,
    source: Path,
) -> duckdb.DuckDBPyConnection:
    try:
        with _polled(connection, description, enabled=progress):
            return connection.execute(statement.text, list(statement.parameters))
    except duckdb.Error as exc:
        raise LoadError(f"cannot read {source}: {_duckdb_message(exc)}") from exc


@contextlib.contextmanager
def _polled(
    connection: duckdb.DuckDBPyConnection, description: str, *, enabled: bool
) -> Iterator[None]:
    """Show a statement's progress (DuckDB's own estimate, in percent) while it runs."""
    if not enabled:
        yield
        return
    bar = tqdm(total=100, desc=description, unit="%", bar_format="{l_bar}{bar}| {elapsed}")
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.25):
            percent = connection.query_progress()
            if percent > bar.n:
                bar.update(min(percent, 100) - bar.n)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
        bar.update(100 - bar.n)
    finally:
        done.set()
        watcher.join()
        bar.close()


def new_data_version(codebook: Codebook) -> str:
    """A data version no one can compute from the records: the codebook and 16 random hex digits.

    Every client is told the data version. Were it a digest of the file, anyone holding the two
    candidate files, with and without one person's record (the adversary differential privacy
    guards against), could hash both and see which the server holds. So loading the same file
    twice gives two versions, whose releases are drawn, and paid for, apart: both come out of
    the one dataset budget. A custodian who wants a stable name passes `--data-version`.
    """
    return f"{codebook.fingerprint_text}:{secrets.token_hex(8)}"


def _duckdb_message(exc: duckdb.Error) -> str:
    # DuckDB appends advice about its own reader options and a list of their values, which a
    # custodian cannot pass here.
    kept = []
    for line in str(exc).splitlines():
        if line.startswith("Possible ") or line.strip().startswith("file = "):
            break
        kept.append(line)
    return "\n".join(kept).strip()


# ---- the report ----


def _out_of_domain(
    connection: duckdb.DuckDBPyConnection,
    reader: SourceFile,
    dirty: tuple[LoadColumn, ...],
    missing_codes: tuple[str, ...],
    progress: bool,
    source: Path,
) -> dict[str, dict[str, int]]:
    """The out-of-domain texts of the columns that have some, with their counts (one scan)."""
    if not dirty:
        return {}
    rows = _run(
        connection,
        load_out_of_domain(reader, dirty, missing_codes),
        progress=progress,
        description="listing out-of-domain values",
        source=source,
    ).fetchall()
    found: dict[str, dict[str, int]] = {}
    for row in rows:
        for k, column in enumerate(dirty):
            if row[k] is not None:
                found.setdefault(column.variable.name, {})[str(row[k])] = int(row[-1])
    return {
        name: dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        for name, counts in found.items()
    }


@dataclass(frozen=True)
class _Counts:
    """The check's row, by name."""

    rows: int
    missing: dict[str, int]  # per present column: cells the source marks missing
    out_of_domain: dict[str, int]  # per present column: cells outside the domain
    filled: dict[int, int]  # per unknown column position: non-empty cells

    @classmethod
    def of(cls, row: tuple[Any, ...], layout: _Layout) -> _Counts:
        names = [c.variable.name for c in layout.columns]
        offset = 1 + 2 * len(names)
        return cls(
            rows=int(row[0]),
            missing={name: int(row[1 + 2 * k]) for k, name in enumerate(names)},
            out_of_domain={name: int(row[2 + 2 * k]) for k, name in enumerate(names)},
            filled={p: int(row[offset + j]) for j, p in enumerate(layout.unknown)},
        )


def _report(
    counts: _Counts,
    out_of_domain: Mapping[str, Mapping[str, int]],
    source: Path,
    database: Path,
    codebook: Codebook,
    strict: bool,
    layout: _Layout,
    *,
    version: str,
    dataset: str,
    empty: int,
) -> LoadReport:
    rows = counts.rows
    skipped = list(layout.skipped)
    for position, count in counts.filled.items():
        reason = (
            "not in the codebook; every cell is empty"
            if count == 0
            else f"not in the codebook; {_cells(count)} with data ignored"
        )
        skipped.append(SkippedColumn(position, layout.headers[position], reason))
    skipped.sort(key=lambda s: s.position)
    stored = codebook.stored_variables
    missing = {v.name: counts.missing.get(v.name, rows) for v in stored}
    ordered = {v.name: out_of_domain[v.name] for v in stored if v.name in out_of_domain}
    mapped = {} if strict else {name: sum(values.values()) for name, values in ordered.items()}
    return LoadReport(
        rows=rows,
        source=source.resolve(),
        database=database.resolve(),
        data_version=version,
        dataset=dataset,
        codebook=codebook.identity,
        strict=strict,
        missing=missing,
        out_of_domain=ordered,
        mapped_to_missing=mapped,
        skipped=tuple(skipped),
        absent=layout.absent,
        renamed=layout.renamed,
        empty_records=empty,
    )


def _refuse(
    report: LoadReport, filled: Mapping[int, int], source: Path, codebook: Codebook
) -> None:
    """Strict mode: refuse a file with data outside the codebook, naming columns and values."""
    problems = []
    holding = [s for s in report.skipped if filled.get(s.position, 0) > 0]
    if holding:
        problems.append(
            "columns not in the codebook hold data: "
            + "; ".join(f"column {s.position + 1} {_short(s.header)}" for s in holding)
        )
    if report.out_of_domain:
        problems.append(
            "values outside the codebook domain: "
            + "; ".join(
                f"{name}: {_describe_values(values, shown=_SHOWN_VALUES)}"
                for name, values in report.out_of_domain.items()
            )
        )
        if any(len(v) > _SHOWN_VALUES for v in report.out_of_domain.values()):
            problems.append("a lenient load's report lists every value")
    if problems:
        raise LoadError(
            f"{source.name} refused in strict mode ("
            + "; ".join(problems)
            + "); load lenient to store such values as missing and ignore such columns"
            + _beyond_range(report, codebook)
        )


def _beyond_range(report: LoadReport, codebook: Codebook) -> str:
    """Advice for whole numbers past an integer variable's range (a year after the codebook's
    last): stored as missing, they would move all their records into the missing value."""
    beyond = []
    for name, values in report.out_of_domain.items():
        variable = codebook.variable(name)  # only the codebook's variables are checked
        if variable.kind is Kind.INTEGER and any(v.strip().lstrip("-").isdigit() for v in values):
            beyond.append(f"{name} ({variable.low} to {variable.high})")
    if not beyond:
        return ""
    return (
        f"; but a lenient load would store every record outside the range of {', '.join(beyond)} "
        "as missing: to serve those values, load under a codebook of your own whose range "
        "admits them (--codebook; the README's loading section says how)"
    )


def _describe_values(values: Mapping[str, int], *, shown: int) -> str:
    listed = [f"{value!r} ({_cells(count)})" for value, count in list(values.items())[:shown]]
    if len(values) > shown:
        listed.append(f"and {len(values) - shown:,} more values")
    return ", ".join(listed)


def _cells(count: int) -> str:
    return _count(count, "cell")


def _count(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def _short(header: str) -> str:
    text = repr(header)
    return text if len(text) <= _HEADER_WIDTH else text[: _HEADER_WIDTH - 4] + "...'"
