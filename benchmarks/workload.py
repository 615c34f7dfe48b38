"""The benchmark's workload: six aggregate questions a custodian is asked every cycle.

Each question is described once, as data: its group-by dimensions, an optional equality filter
and its measure. Every system builds its own statement from that description (veil a typed
`Query`, raw DuckDB and SmartNoise SQL text, OpenDP a Polars plan), so the systems answer the
same question over the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.codebook import Codebook, Kind
from engine.query import Count, Eq, FlagCounts, Proportion, Query

EPSILON = 1.0  # privacy loss of one query in every private system (pure DP where offered)
FLAG_SET = "meansOfControl"


@dataclass(frozen=True)
class WorkloadQuery:
    key: str  # short name used in tables, plots and files
    title: str  # what the question is, in words
    by: tuple[str, ...]  # group-by dimensions (stored codebook variables)
    where: tuple[str, str] | None  # an equality filter (variable, code), or none
    measure: str  # "count", "flags" or "proportion"
    flags: tuple[str, ...] = ()  # the flag variables of a "flags" measure
    condition: tuple[str, int] | None = None  # the numerator's condition of a "proportion"

    def veil_query(self) -> Query:
        where = Eq(*self.where) if self.where is not None else None
        if self.measure == "count":
            return Query(Count(), by=self.by, where=where)
        if self.measure == "flags":
            return Query(FlagCounts(FLAG_SET), by=self.by, where=where)
        assert self.condition is not None
        return Query(Proportion(Eq(*self.condition)), by=self.by, where=where)

    def columns(self) -> tuple[str, ...]:
        """Every stored column the question reads."""
        names = [*self.by]
        if self.where is not None:
            names.append(self.where[0])
        names.extend(self.flags)
        if self.condition is not None:
            names.append(self.condition[0])
        return tuple(dict.fromkeys(names))


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def raw_sql(query: WorkloadQuery, codebook: Codebook, *, table: str = "records") -> str:
    """The same aggregation written by hand for DuckDB: no privacy, present keys only.

    Written in the fastest form measured, so that the ratios to it are what privacy costs and
    nothing else: an ENUM column's keys fetched as their codes (`enum_code`, a small integer;
    as labels, about 10% slower, which a script that maps codes to labels afterwards need not
    pay), and a flag or a condition counted as a sum of CASE (`sum(flag)` and
    `count(*) FILTER` are 10-25% slower). It is written here, not taken from veil's planner,
    so that a slower statement from veil shows in the ratios rather than in both sides.
    """
    keys = []
    for name in query.by:
        kind = codebook.variable(name).kind
        enum = kind in (Kind.CATEGORY, Kind.COUNTRY)
        keys.append(f"enum_code({quote(name)}) AS {quote(name)}" if enum else quote(name))

    def count_where(column: str, value: str | int) -> str:
        return f"sum(CASE WHEN {quote(column)} = {literal(value)} THEN 1 ELSE 0 END)"

    if query.measure == "count":
        aggregates = ["count(*) AS n"]
    elif query.measure == "flags":
        aggregates = [f"{count_where(f, 1)} AS {quote(f)}" for f in query.flags]
    else:
        assert query.condition is not None
        aggregates = [f"{count_where(*query.condition)} AS numerator", "count(*) AS denominator"]
    text = f"SELECT {', '.join(keys)}, {', '.join(aggregates)} FROM {table}"
    if query.where is not None:
        text += f" WHERE {quote(query.where[0])} = {literal(query.where[1])}"
    return text + f" GROUP BY {', '.join(quote(b) for b in query.by)}"


def workload(codebook: Codebook) -> tuple[WorkloadQuery, ...]:
    flags = codebook.flag_set(FLAG_SET).flags
    return (
        WorkloadQuery("gender_age", "count by gender x ageBroad", ("gender", "ageBroad"), None,
                      "count"),
        WorkloadQuery(
            "exploit_minors",
            "count by CountryOfExploitation x isSexualExploit, minors",
            ("CountryOfExploitation", "isSexualExploit"),
            ("majorityStatus", "Minor"),
            "count",
        ),
        WorkloadQuery(
            "means_of_control",
            f"all {len(flags)} means-of-control flags by majorityStatus",
            ("majorityStatus",),
            None,
            "flags",
            flags=tuple(flags),
        ),
        WorkloadQuery(
            "corridor",
            "count by citizenship x CountryOfExploitation",
            ("citizenship", "CountryOfExploitation"),
            None,
            "count",
        ),
        WorkloadQuery(
            "year_source",
            "count by yearOfRegistration x Datasource",
            ("yearOfRegistration", "Datasource"),
            None,
            "count",
        ),
        WorkloadQuery(
            "sexual_share_minors",
            "proportion isSexualExploit among minors, by gender",
            ("gender",),
            ("majorityStatus", "Minor"),
            "proportion",
            condition=("isSexualExploit", 1),
        ),
    )
