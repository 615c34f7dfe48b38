"""The only module that writes SQL text.

One statement per query. Identifiers come from the codebook (checked to be plain names) and every
value is a bound parameter. The statement groups by the stored columns the plan's dimensions read
(`group_columns`), as a hand-written GROUP BY would, and returns for each non-empty group the raw
key of each column (k0, k1, ...: the ENUM's code, the flag, or the integer; NULL for missing) and
one integer per block of each component, in the plan's order (c0, c1, ...). The engine maps keys
to cells of the public domain and densifies, so the set of rows DuckDB returns never shapes the
release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.codebook import Codebook, Kind, Variable
from engine.planner import AllOf, AnyOf, Atom, CanonicalFilter, Component, Constant, Plan

TABLE = "records"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Statement:
    text: str
    parameters: tuple[Any, ...]


def quote(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return f'"{name}"'


class _Builder:
    def __init__(self, codebook: Codebook) -> None:
        self.codebook = codebook
        self.parameters: list[Any] = []

    def bind(self, value: Any) -> str:
        self.parameters.append(value)
        return "?"

    def key(self, variable: Variable) -> str:
        """The raw key of a grouped column: an ENUM's code, or the stored integer."""
        column = quote(variable.name)
        if variable.kind in (Kind.CATEGORY, Kind.COUNTRY):
            return f"enum_code({column})::INTEGER"
        return f"{column}::INTEGER"

    def condition(self, f: CanonicalFilter) -> str:
        if isinstance(f, Constant):
            return "TRUE" if f.value else "FALSE"
        if isinstance(f, Atom):
            return self.atom(f)
        joiner = " AND " if isinstance(f, AllOf) else " OR "
        assert isinstance(f, (AllOf, AnyOf))
        return "(" + joiner.join(self.condition(o) for o in f.operands) + ")"

    def atom(self, atom: Atom) -> str:
        variable = self.codebook.variable(atom.variable)
        column = quote(variable.name)
        codes = sorted(atom.codes, key=_order(variable))
        complement = sorted(set(variable.codes) - atom.codes, key=_order(variable))
        # Write whichever list is shorter; NOT IN is false on missing, IN is too, and so are
        # = and <>, which stand for a list of one. A run of integers (what a Range selects) is
        # written as a BETWEEN, false on missing as well: two comparisons scan faster than a
        # list (a 15-year IN took 1.7 times as long).
        if not codes:
            present = "FALSE"
        elif not complement:
            present = f"{column} IS NOT NULL"
        elif variable.kind is Kind.INTEGER and len(codes) > 1 and _consecutive(codes):
            present = f"{column} BETWEEN {self.bind(codes[0])} AND {self.bind(codes[-1])}"
        elif variable.kind is Kind.INTEGER and len(complement) > 1 and _consecutive(complement):
            low, high = self.bind(complement[0]), self.bind(complement[-1])
            present = f"{column} NOT BETWEEN {low} AND {high}"
        elif len(codes) == 1:
            # DuckDB evaluates `IN (x)` inside a CASE (a proportion's condition) as a list:
            # 1.1x the scan of `= x` over 1M rows.
            present = f"{column} = {self.bind(codes[0])}"
        elif len(complement) == 1:
            present = f"{column} <> {self.bind(complement[0])}"
        elif len(codes) <= len(complement):
            present = f"{column} IN ({', '.join(self.bind(c) for c in codes)})"
        else:
            present = f"{column} NOT IN ({', '.join(self.bind(c) for c in complement)})"
        if atom.missing:
            return f"({column} IS NULL OR {present})"
        return f"({present})"

    def aggregates(self, component: Component) -> list[str]:
        """One expression per block of the component's vector."""
        if component.aggregate == "count_split":

            def meets() -> str:  # written (and its values bound) where it stands, each time
                return _count_where(self.condition(component.argument))

            # The rest as count(*) minus the matches: exact whatever the condition makes of
            # missing values, where counting NOT (condition) would skip rows it finds NULL.
            return [meets(), f"count(*) - {meets()}"]
        return [self.aggregate(component)]

    def aggregate(self, component: Component) -> str:
        if component.aggregate == "count":
            return "count(*)"
        if component.aggregate == "flag":
            return _count_where(f"{quote(component.argument)} = 1")
        variable: Variable = component.argument
        column = quote(variable.name)
        if component.aggregate == "count_present":
            return f"count({column})"
        low, high = self.bind(variable.low), self.bind(variable.high)
        shift = self.bind(component.shift)
        # Clamp to the public bounds, then shift: the plan's sensitivity is the farthest a
        # clamped value lies from the shift. Missing values are left out, as count(column)
        # leaves them out: DuckDB's greatest() skips a NULL, so a missing value would clamp to
        # `low` and add low - shift. A CASE leaves it NULL, which sum skips; a FILTER clause
        # would do the same about 1.3x slower (one filtered aggregate each, as for counts).
        clamped = f"least(greatest({column}, {low}), {high}) - {shift}"
        return f"coalesce(sum(CASE WHEN {column} IS NOT NULL THEN {clamped} END), 0)::BIGINT"


def _count_where(condition: str) -> str:
    """The rows of a group meeting `condition` (a NULL does not meet it), never NULL itself.

    Not count_if, which gives NULL over a group where the condition is NULL in every record (a
    masked float in numpy, its hidden value whatever lies there); and not count(*) FILTER,
    which DuckDB evaluates as one filtered aggregate per condition (1.5x slower over the 18
    means-of-control flags). A sum of 0/1 never meets a NULL, and the coalesce covers an
    ungrouped query over no rows."""
    return f"coalesce(sum(CASE WHEN {condition} THEN 1 ELSE 0 END), 0)::BIGINT"


def _consecutive(codes: list[Any]) -> bool:
    """Whether sorted integer codes are every integer from the first to the last."""
    return bool(codes[-1] - codes[0] == len(codes) - 1)


def _order(variable: Variable) -> Any:
    index = variable.code_index
    return lambda code: index[code]


def group_columns(plan: Plan) -> tuple[Variable, ...]:
    """The stored columns a plan groups by, once each (a derived dimension reads its source)."""
    seen: dict[str, Variable] = {}
    for dimension in plan.dimensions:
        seen.setdefault(dimension.variable.name, dimension.variable)
    return tuple(seen.values())


def build(plan: Plan) -> Statement:
    """The statement that computes every component of `plan` for every non-empty group."""
    builder = _Builder(plan.codebook)
    columns = group_columns(plan)
    # Parameters bind in text order: keys, aggregates, then the WHERE clause.
    keys = [f"{builder.key(v)} AS k{i}" for i, v in enumerate(columns)]
    expressions = [e for c in plan.components for e in builder.aggregates(c)]
    aggregates = [f"{e} AS c{i}" for i, e in enumerate(expressions)]
    where = builder.condition(plan.where)
    text = f"SELECT {', '.join([*keys, *aggregates])} FROM {_source(plan.codebook)}"
    if where != "TRUE":
        text += f" WHERE {where}"
    if columns:
        text += " GROUP BY " + ", ".join(quote(v.name) for v in columns)
    return Statement(text, tuple(builder.parameters))


def _source(codebook: Codebook) -> str:
    unit = codebook.privacy_unit
    if unit.id_column is None:
        return TABLE
    # Bound each person's contribution before aggregating: keep at most max_rows_per_person
    # rows per id, chosen by a fixed hash so the choice does not depend on row order. A record
    # with no id is a person of its own: grouped together, the NULL ids would form one
    # "person" whose kept rows change with any one of them, a change of two rows where the
    # noise is calibrated for max_rows_per_person.
    # The hash names every column: `hash(records)`, the row, would read a variable named
    # `records` instead, and a person's rows that tie on it would be kept by physical order.
    column = quote(unit.id_column)
    row = ", ".join(quote(v.name) for v in codebook.stored_variables)
    return (
        f"(SELECT * FROM {TABLE} QUALIFY {column} IS NULL OR row_number() OVER "
        f"(PARTITION BY {column} ORDER BY hash({row})) <= {int(unit.max_rows_per_person)})"
    )


def domain_check(codebook: Codebook) -> Statement:
    """One row, one boolean per stored variable (d0, d1, ...): does its column keep to the
    codebook, in type (an ENUM of exactly the codebook's codes, in order) and in values
    (integers within the range, flags 0 or 1)?

    Cells are placed by position in the codebook's domain: a value outside it would raise, or
    wrap into another cell, only when a query happens to read it, and that would itself say
    something about the data. The engine checks the whole file once, before any query.
    """
    parameters: list[Any] = []
    parts = []
    for position, variable in enumerate(codebook.stored_variables):
        column = quote(variable.name)
        check = f"typeof(any_value({column})) = typeof(CAST(NULL AS {code_literal_type(variable)}))"
        if variable.kind is Kind.FLAG:
            check += f" AND coalesce(max({column}) <= 1, TRUE)"
        elif variable.kind is Kind.INTEGER:
            check += f" AND coalesce(min({column}) >= ? AND max({column}) <= ?, TRUE)"
            parameters += [variable.low, variable.high]
        parts.append(f"({check}) AS d{position}")
    return Statement(f"SELECT {', '.join(parts)} FROM {TABLE}", tuple(parameters))


def code_literal_type(variable: Variable) -> str:
    """The DuckDB type of a stored variable (used by the loader when it creates the table)."""
    if variable.kind in (Kind.CATEGORY, Kind.COUNTRY):
        return "ENUM (" + ", ".join(_string_literal(str(c)) for c in variable.codes) + ")"
    if variable.kind is Kind.FLAG:
        return "UTINYINT"
    assert variable.low is not None and variable.high is not None
    return "SMALLINT" if variable.low >= -(2**15) and variable.high < 2**15 else "INTEGER"


def _string_literal(value: str) -> str:
    # ENUM members cannot be bound parameters in DDL; codebook values are escaped here, once.
    return "'" + value.replace("'", "''") + "'"


def append_records(view: str) -> str:
    """Append every row of a registered view whose columns match the records table."""
    return f"INSERT INTO {TABLE} SELECT * FROM {quote(view)}"


def create_table(codebook: Codebook) -> str:
    """DDL for the records table, typed from the codebook."""
    columns = ", ".join(
        f"{quote(v.name)} {code_literal_type(v)}" for v in codebook.stored_variables
    )
    return f"CREATE TABLE {TABLE} ({columns})"


# ---- data file statements ----
# Statements for `engine.data_file`, which creates a data file, and for the backend, which reads
# what the file records about itself: the metadata table (one value per key) beside the records.

METADATA = "veil_metadata"
# What a data file records about itself: its data version, its codebook's identity, its dataset,
# and its load: an id of the one load that wrote these records (random, or for the generator its
# data version, which fixes its records), so that a ledger can tell two files under one version.
METADATA_KEYS = ("data_version", "codebook", "dataset", "load_id")
# A DuckDB memory size as the generator's settings write it ("512MB", "1.5GiB").
_MEMORY_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?\s*[KMGT]i?B$")


def metadata_table() -> str:
    """DDL for the table in which a data file records what it holds."""
    return f"CREATE TABLE {METADATA} (key VARCHAR PRIMARY KEY, value VARCHAR)"


def record_metadata(*, data_version: str, codebook: str, dataset: str, load_id: str) -> Statement:
    """Record (or replace) a data file's data version, codebook identity, dataset name and load."""
    values = {
        "data_version": data_version, "codebook": codebook, "dataset": dataset, "load_id": load_id,
    }
    rows = ", ".join("(?, ?)" for _ in METADATA_KEYS)
    parameters = tuple(item for key in METADATA_KEYS for item in (key, values[key]))
    return Statement(f"INSERT OR REPLACE INTO {METADATA} VALUES {rows}", parameters)


def read_metadata() -> Statement:
    """Rows (key, value) of what a data file records about itself (see `METADATA_KEYS`)."""
    keys = ", ".join("?" for _ in METADATA_KEYS)
    return Statement(f"SELECT key, value FROM {METADATA} WHERE key IN ({keys})", METADATA_KEYS)


def checkpoint() -> str:
    """Write a data file's write-ahead log into the file itself."""
    return "CHECKPOINT"


def generator_settings(memory_limit: str) -> tuple[str, ...]:
    """Settings for the synthetic generator's writable connection: no progress bar (it keeps
    its own), and DuckDB's memory capped at `memory_limit` (a size such as "512MB")."""
    # SET takes no bound parameter in DuckDB 1.x: the size is checked, then escaped.
    if not _MEMORY_SIZE.match(memory_limit):
        raise ValueError(f"not a memory size: {memory_limit!r}")
    return (
        "SET enable_progress_bar = false",
        f"SET memory_limit = {_string_literal(memory_limit)}",
    )


# ---- load statements ----
# Statements for `engine.loader`, the custodian's tool that writes a data file. Every source
# column is read as text and renamed by position (c0, c1, ...), so no header text from a file
# ever enters SQL. The file path, missing codes and integer bounds are bound parameters; category
# spellings and ENUM member lists are literals escaped by `_string_literal`. One subquery turns
# source text into typed values; the check and the insert both read it, so a cell counted as out
# of the domain is exactly a cell that would be stored as missing.

# An integer as source files write it: optional sign, digits, an all-zero fraction ("2018",
# "1.0"). DuckDB's own VARCHAR -> BIGINT cast is looser ("1.5" -> 2, "0x10" -> 16, "1_0" -> 10).
_INTEGER_TEXT = r"[+-]?[0-9]{1,18}(\.0*)?"


@dataclass(frozen=True)
class SourceFile:
    """A source file as the loader reads it: `width` columns, data after `skip` lines (CSV)."""

    path: str
    format: str  # "csv" or "parquet"
    width: int
    skip: int = 0

    def __post_init__(self) -> None:
        if self.format not in ("csv", "parquet"):
            raise ValueError(f"unknown source format {self.format!r}")


@dataclass(frozen=True)
class LoadColumn:
    """A stored variable read from the source column at `position`.

    `spellings` maps each accepted source spelling of a category variable to its code.
    """

    variable: Variable
    position: int
    spellings: tuple[tuple[str, str], ...] = ()


class _Parameters:
    def __init__(self) -> None:
        self.values: list[Any] = []

    def bind(self, value: Any) -> str:
        self.values.append(value)
        return "?"


def source_column(position: int) -> str:
    """The name the loader gives the source column at `position`."""
    return f"c{position}"


def describe_parquet(path: str) -> Statement:
    """Column names and types of a Parquet file."""
    return Statement("DESCRIBE SELECT * FROM read_parquet(?)", (path,))


def load_settings() -> tuple[str, ...]:
    """Settings for the loader's own writable connection: progress is polled, never printed."""
    return (
        "SET enable_progress_bar = true",
        "SET enable_progress_bar_print = false",
        "SET progress_bar_time = 0",
    )


def load_check(
    source: SourceFile,
    columns: tuple[LoadColumn, ...],
    unknown: tuple[int, ...],
    missing: tuple[str, ...],
) -> Statement:
    """One row: the row count `n`; per listed column k, its numbers of missing cells `m{k}` and
    of out-of-domain cells `x{k}`; per unknown column position j, its non-empty cells `u{j}`."""
    parts = ["count(*) AS n"]
    for k in range(len(columns)):
        parts.append(f"count(*) FILTER (WHERE m{k}) AS m{k}")
        parts.append(f"count(*) FILTER (WHERE NOT m{k} AND v{k} IS NULL) AS x{k}")
    parts.extend(f"count(*) FILTER (WHERE u{j} <> '') AS u{j}" for j in range(len(unknown)))
    parameters = _Parameters()
    cells = _load_cells(parameters, source, columns, unknown, missing)
    return Statement(f"SELECT {', '.join(parts)} FROM {cells}", tuple(parameters.values))


def load_out_of_domain(
    source: SourceFile, columns: tuple[LoadColumn, ...], missing: tuple[str, ...]
) -> Statement:
    """Each listed column's out-of-domain source texts and their counts, grouped per column in
    one scan: a row has its text in x{k} for column k and NULL in the others, then `count`.
    One row per column has every x NULL (the cells in the domain); skip it."""
    bad = ", ".join(
        f"CASE WHEN NOT m{k} AND v{k} IS NULL THEN r{k} END AS x{k}" for k in range(len(columns))
    )
    names = [f"x{k}" for k in range(len(columns))]
    sets = ", ".join(f"({name})" for name in names)
    parameters = _Parameters()
    cells = _load_cells(parameters, source, columns, (), missing)
    text = (
        f"SELECT {', '.join(names)}, count(*) AS count FROM (SELECT {bad} FROM {cells}) AS bad "
        f"GROUP BY GROUPING SETS ({sets})"
    )
    return Statement(text, tuple(parameters.values))


def load_insert(
    source: SourceFile, columns: tuple[LoadColumn, ...], missing: tuple[str, ...]
) -> Statement:
    """Insert every source row into the records table: each listed column's value, NULL when
    the cell is missing or outside the domain. Stored variables not listed are left NULL."""
    if not columns:
        raise ValueError("an insert needs at least one column")
    names = ", ".join(quote(c.variable.name) for c in columns)
    values = ", ".join(
        f"CAST(v{k} AS {code_literal_type(c.variable)})" for k, c in enumerate(columns)
    )
    parameters = _Parameters()
    cells = _load_cells(parameters, source, columns, (), missing)
    text = f"INSERT INTO {TABLE} ({names}) SELECT {values} FROM {cells}"
    return Statement(text, tuple(parameters.values))


def _load_cells(
    parameters: _Parameters,
    source: SourceFile,
    columns: tuple[LoadColumn, ...],
    unknown: tuple[int, ...],
    missing: tuple[str, ...],
) -> str:
    """A subquery with, per listed column k: r{k} its source text, m{k} whether it is missing,
    v{k} its value when it lies in the domain (NULL when missing or outside); per unknown
    column j: u{j}, its trimmed text ('' when empty)."""
    # Parameters bind in text order and each level reads the one written after it, so the
    # levels are written (and bind) from the outermost in.
    carried = [f"u{j}" for j in range(len(unknown))]
    levels: list[list[str]] = []
    # Level 4: range check of parsed integers; other values pass through.
    level = []
    for k, c in enumerate(columns):
        variable = c.variable
        if variable.kind is Kind.FLAG:
            level.append(f"r{k}, m{k}, CASE WHEN p{k} IN (0, 1) THEN p{k} END AS v{k}")
        elif variable.kind is Kind.INTEGER:
            low, high = parameters.bind(variable.low), parameters.bind(variable.high)
            in_range = f"CASE WHEN p{k} BETWEEN {low} AND {high} THEN p{k} END"
            level.append(f"r{k}, m{k}, {in_range} AS v{k}")
        else:
            level.append(f"r{k}, m{k}, p{k} AS v{k}")
    levels.append(level + carried)
    # Level 3: the value a present cell's text stands for, NULL when it stands for none.
    level = [
        f"r{k}, m{k}, CASE WHEN m{k} THEN NULL ELSE {_load_value(c, f't{k}')} END AS p{k}"
        for k, c in enumerate(columns)
    ]
    levels.append(level + carried)
    # Level 2: whether a cell is missing.
    level = []
    for k in range(len(columns)):
        codes = ", ".join(parameters.bind(code) for code in missing)
        listed = f" OR t{k} IN ({codes})" if missing else ""
        level.append(f"r{k}, t{k}, (r{k} IS NULL{listed}) AS m{k}")
    levels.append(level + carried)
    # Level 1: each cell's text and its trimmed text.
    level = []
    for k, c in enumerate(columns):
        text = _load_text(source, c.position)
        level.append(f"{text} AS r{k}, trim({text}) AS t{k}")
    for j, position in enumerate(unknown):
        column = quote(source_column(position))
        level.append(f"trim(coalesce(CAST({column} AS VARCHAR), '')) AS u{j}")
    levels.append(level)
    reader = _load_source(parameters, source)
    text = reader
    for depth, parts in enumerate(reversed(levels)):
        text = f"(SELECT {', '.join(parts)} FROM {text}) AS level{depth + 1}"
    return text


def _load_text(source: SourceFile, position: int) -> str:
    column = quote(source_column(position))
    if source.format == "csv":
        return f"coalesce({column}, '')"  # an empty CSV cell is the empty string
    return f"CAST({column} AS VARCHAR)"  # a Parquet null stays NULL: missing


def _load_value(column: LoadColumn, text: str) -> str:
    variable = column.variable
    if variable.kind is Kind.CATEGORY:
        cases = " ".join(
            f"WHEN {_string_literal(spelling)} THEN {_string_literal(code)}"
            for spelling, code in column.spellings
        )
        return f"CASE {text} {cases} END" if cases else "NULL"
    if variable.kind is Kind.COUNTRY:
        return f"TRY_CAST({text} AS {code_literal_type(variable)})"
    parsed = (
        f"CASE WHEN regexp_full_match({text}, {_string_literal(_INTEGER_TEXT)}) "
        f"THEN TRY_CAST(split_part({text}, '.', 1) AS BIGINT) END"
    )
    if variable.kind is Kind.FLAG:
        # Most flag cells are written "0" or "1": skip the pattern for those. A boolean column
        # (Parquet's BOOLEAN reads as "true"/"false"; pandas writes "True"/"False" to CSV) means
        # the same, and nothing else could be meant by it.
        return (
            f"CASE {text} WHEN '0' THEN 0 WHEN '1' THEN 1 ELSE "
            f"CASE lower({text}) WHEN 'true' THEN 1 WHEN 'false' THEN 0 ELSE {parsed} END END"
        )
    return parsed


def _load_source(parameters: _Parameters, source: SourceFile) -> str:
    names = ", ".join(quote(source_column(i)) for i in range(source.width))
    if source.format == "parquet":
        return f"read_parquet({parameters.bind(source.path)}) AS source({names})"
    # Every column is text and the dialect is fixed, so nothing is guessed from the data; the
    # header lines are skipped (the loader reads them itself); only an empty cell reads as NULL.
    path = parameters.bind(source.path)
    skip = parameters.bind(source.skip)
    types = parameters.bind({source_column(i): "VARCHAR" for i in range(source.width)})
    return (
        f"read_csv({path}, header = false, skip = {skip}, columns = {types}, "
        f"auto_detect = false, delim = ',', quote = '\"', escape = '\"') AS source({names})"
    )


# ---- risk statements ----
# Statements for `engine.risk`, the custodian's disclosure-risk report on a data file (or on a
# file about to be published). They read the records table on the report's own read-only
# connection and return equivalence-class statistics, never a row. Column names come from the
# codebook and are checked by `quote`; the minimum class size k is a bound parameter.


def _class_size(person: str | None) -> str:
    """A class's size: its records, or, when records belong to people (`person`, the codebook's
    id column), its people; a record without an id is a person of its own."""
    if person is None:
        return "count(*)"
    column = quote(person)
    return f"(count(DISTINCT {column}) + count(*) FILTER (WHERE {column} IS NULL))"


def risk_sizes(qis: tuple[str, ...], person: str | None = None) -> Statement:
    """The frequency of each class size: one row per size `n` with its number of `classes`.

    A class is the set of records sharing one combination of the quasi-identifiers; a missing
    value is a value of its own (GROUP BY puts NULLs together). Sizes count people when
    `person` names the id column (see `_class_size`)."""
    columns = ", ".join(quote(name) for name in qis)
    inner = f"SELECT {_class_size(person)} AS n FROM {TABLE}" + (
        f" GROUP BY {columns}" if qis else ""
    )
    return Statement(
        f"SELECT n, count(*) AS classes FROM ({inner}) AS sizes GROUP BY n ORDER BY n", ()
    )


def risk_subsets(
    qis: tuple[str, ...], subsets: tuple[tuple[str, ...], ...], k: int, person: str | None = None
) -> Statement:
    """Class statistics for several subsets of `qis` in one scan (GROUPING SETS).

    One row per subset: `g`, the GROUPING() bit mask of the columns left out (bit i set when
    qis[len - 1 - i] is not in the subset, as DuckDB numbers them), `classes`, the smallest class
    `k_min`, the records in classes smaller than k `at_risk`, the classes smaller than k `small`,
    and the classes of one (records, or people when `person` is given: `uniques`)."""
    if not qis or not subsets or any(not s for s in subsets):
        raise ValueError("risk subsets need quasi-identifiers and non-empty subsets")
    columns = ", ".join(quote(name) for name in qis)
    sets = ", ".join("(" + ", ".join(quote(name) for name in s) + ")" for s in subsets)
    parameters = _Parameters()
    below = parameters.bind(k)
    below_again = parameters.bind(k)
    text = (
        f"SELECT g, count(*) AS classes, min(n) AS k_min, "
        f"coalesce(sum(r) FILTER (WHERE n < {below}), 0) AS at_risk, "
        f"count(*) FILTER (WHERE n < {below_again}) AS small, "
        f"count(*) FILTER (WHERE n = 1) AS uniques "
        f"FROM (SELECT GROUPING({columns}) AS g, {_class_size(person)} AS n, count(*) AS r "
        f"FROM {TABLE} GROUP BY GROUPING SETS ({sets})) AS classes GROUP BY g ORDER BY g"
    )
    return Statement(text, tuple(parameters.values))


def risk_diversity(
    qis: tuple[str, ...], sensitive: tuple[str, ...], k: int, person: str | None = None
) -> Statement:
    """Distinct l-diversity of each sensitive variable over the classes of `qis`.

    Per sensitive variable j: `l{j}` the fewest distinct values in any class (missing counts as
    a value), `h{j}` the classes whose members all hold one value that is not missing (a class
    all missing discloses nothing), `r{j}` the records in them, `rk{j}` the records in such
    classes of at least k records (k-anonymous, yet every member's value is known), and `kv{j}`
    the values those classes share, as text. Class sizes count people when `person` is given;
    records are records."""
    if not sensitive:
        raise ValueError("l-diversity needs at least one sensitive variable")
    inner = [f"{_class_size(person)} AS n", "count(*) AS records"]
    outer = []
    parameters = _Parameters()
    for j, name in enumerate(sensitive):
        column = quote(name)
        inner.append(
            f"count(DISTINCT {column}) + max(CASE WHEN {column} IS NULL THEN 1 ELSE 0 END) AS d{j}"
        )
        # One value shared by every member, and known: a class all missing discloses nothing.
        inner.append(f"count(DISTINCT {column}) = 1 AND count({column}) = count(*) AS s{j}")
        inner.append(f"min({column})::VARCHAR AS v{j}")
        at_least, again = parameters.bind(k), parameters.bind(k)
        outer.append(
            f"min(d{j}) AS l{j}, count(*) FILTER (WHERE s{j}) AS h{j}, "
            f"coalesce(sum(records) FILTER (WHERE s{j}), 0) AS r{j}, "
            f"coalesce(sum(records) FILTER (WHERE s{j} AND n >= {at_least}), 0) AS rk{j}, "
            f"list(DISTINCT v{j} ORDER BY v{j}) FILTER (WHERE s{j} AND n >= {again}) AS kv{j}"
        )
    group = (" GROUP BY " + ", ".join(quote(name) for name in qis)) if qis else ""
    text = (
        f"SELECT {', '.join(outer)} FROM "
        f"(SELECT {', '.join(inner)} FROM {TABLE}{group}) AS classes"
    )
    return Statement(text, tuple(parameters.values))


def risk_profile(names: tuple[str, ...]) -> Statement:
    """The record count `rows`, and per variable j its distinct non-missing values `v{j}` and
    missing cells `m{j}`."""
    parts = ["count(*) AS rows"]
    for j, name in enumerate(names):
        column = quote(name)
        parts.append(f"count(DISTINCT {column}) AS v{j}, count(*) - count({column}) AS m{j}")
    return Statement(f"SELECT {', '.join(parts)} FROM {TABLE}", ())
