"""The SQL subset: what it accepts becomes the same typed query as the fluent builder; what it
refuses is refused with a message that lists the subset; conditions keep SQL's meaning."""

from __future__ import annotations

import re

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import client
from client import And, Eq, In, Missing, Not, Or, Range
from client.query import (
    Count,
    Filter,
    FlagCounts,
    Mean,
    Proportion,
    Query,
    Sum,
    count,
    flag_counts,
    proportion,
)
from client.sql import parse_condition, parse_sql

ACCEPTED = [
    (
        "SELECT gender, ageBroad, COUNT(*) FROM victims WHERE majorityStatus = 'Minor' "
        "GROUP BY gender, ageBroad",
        count().by("gender", "ageBroad").where(majorityStatus="Minor"),
    ),
    ("select count(*) from anything", count()),
    ("SELECT COUNT(*) AS n FROM t;", count()),
    (
        'SELECT "ageBroad", COUNT(*) FROM t GROUP BY ALL',
        count().by("ageBroad"),
    ),
    (
        "SELECT majorityStatus, FLAG_COUNTS(meansOfControl) FROM t GROUP BY majorityStatus",
        flag_counts("meansOfControl").by("majorityStatus"),
    ),
    ("SELECT SUM(yearOfRegistration) FROM t", Query(Sum("yearOfRegistration"))),
    ("SELECT AVG(yearOfRegistration) FROM t", Query(Mean("yearOfRegistration"))),
    (
        "SELECT gender, AVG(CASE WHEN isSexualExploit = 1 THEN 1 ELSE 0 END) FROM t "
        "WHERE majorityStatus = 'Minor' GROUP BY gender",
        proportion(isSexualExploit=1).by("gender").where(majorityStatus="Minor"),
    ),
    (
        "SELECT gender, PROPORTION(isSexualExploit = 1) FROM t GROUP BY gender",
        proportion(isSexualExploit=1).by("gender"),
    ),
    ("SELECT AVG(IF(isForcedLabour, 1, 0)) FROM t", proportion(isForcedLabour=1)),
    (
        "SELECT COUNT(*) FROM t WHERE ageBroad IN ('0--8', '9--17') AND citizenship = 'NA'",
        count().where(In("ageBroad", ["0--8", "9--17"]), Eq("citizenship", "NA")),
    ),
    (
        "SELECT COUNT(*) FROM t WHERE yearOfRegistration BETWEEN 2010 AND 2015",
        count().where(Range("yearOfRegistration", 2010, 2015)),
    ),
    (
        "SELECT COUNT(*) FROM t WHERE yearOfRegistration > 2010 AND 2015 >= yearOfRegistration",
        count().where(Range("yearOfRegistration", 2011, None), Range("yearOfRegistration", None,
                                                                       2015)),
    ),
    (
        "SELECT COUNT(*) FROM t WHERE gender IS NULL OR isSexualExploit = TRUE",
        count().where(Or(Missing("gender"), Eq("isSexualExploit", 1))),
    ),
    (
        "SELECT COUNT(*) FROM t WHERE gender IS NOT NULL",
        count().where(Not(Missing("gender"))),
    ),
    (
        "SELECT COUNT(*) FROM t WHERE gender <> 'Male'",
        count().where(And(Not(Eq("gender", "Male")), Not(Missing("gender")))),
    ),
    (
        "SELECT COUNT(*) FROM t WHERE ageBroad NOT IN ('0--8', '9--17')",
        count().where(And(Not(In("ageBroad", ["0--8", "9--17"])), Not(Missing("ageBroad")))),
    ),
    ("SELECT COUNT(*) FROM victims v WHERE v.gender = 'Male'", count().where(gender="Male")),
    (  # names match regardless of case, in GROUP BY as elsewhere
        "SELECT GENDER, AgeBroad, count(*) FROM v GROUP BY gender, \"agebroad\"",
        count().by("GENDER", "AgeBroad"),
    ),
    (  # digits in quotes are cast to the integer column, in a bound as after =
        "SELECT COUNT(*) FROM t WHERE yearOfRegistration > '2014' AND "
        "yearOfRegistration BETWEEN '2010' AND '2020'",
        count().where(Range("yearOfRegistration", 2015, None),
                      Range("yearOfRegistration", 2010, 2020)),
    ),
    (  # read exactly, not through a float (which would give ...768)
        "SELECT COUNT(*) FROM t WHERE yearOfRegistration >= 1234567890123456789",
        count().where(Range("yearOfRegistration", 1234567890123456789, None)),
    ),
]

REFUSED = [
    ("SELECT * FROM victims", "SELECT *"),
    ("SELECT gender FROM t GROUP BY gender", "one aggregate"),
    ("SELECT COUNT(*), SUM(yearOfRegistration) FROM t", "one aggregate"),
    ("SELECT COUNT(*) FROM a JOIN b ON a.x = b.x", "JOIN"),
    ("SELECT COUNT(*) FROM victims AT (VERSION => 1)", "one table name, nothing more"),
    ("SELECT COUNT(*) FROM t WHERE yearOfRegistration NOT BETWEEN SYMMETRIC 2015 AND 2010",
     "BETWEEN SYMMETRIC is not supported"),
    # Read exactly, not through a float that would make it 2015.
    ("SELECT COUNT(*) FROM t WHERE yearOfRegistration < 2015.0000000000000001", "integers"),
    ("SELECT COUNT(*) FROM t WHERE yearOfRegistration = 2015.0000000000000001",
     "not a whole number"),
    ("SELECT COUNT(*) FROM a, b", "JOIN"),
    ("SELECT COUNT(*) FROM (SELECT * FROM t)", "subqueries"),
    ("SELECT COUNT(*) FROM t WHERE gender IN (SELECT gender FROM u)", "subqueries"),
    ("WITH x AS (SELECT 1) SELECT COUNT(*) FROM x", "WITH"),
    ("SELECT COUNT(*) FROM t UNION SELECT COUNT(*) FROM u", "UNION"),
    ("SELECT gender, COUNT(*) FROM t GROUP BY gender HAVING COUNT(*) > 10", "HAVING"),
    ("SELECT gender, COUNT(*) FROM t GROUP BY gender ORDER BY gender", "ORDER BY"),
    ("SELECT COUNT(*) FROM t LIMIT 5", "LIMIT"),
    ("SELECT DISTINCT gender, COUNT(*) FROM t GROUP BY gender", "DISTINCT"),
    ("SELECT COUNT(*) OVER () FROM t", "window"),
    ("SELECT LOWER(gender), COUNT(*) FROM t GROUP BY 1", "function"),
    ("SELECT COUNT(gender) FROM t", "COUNT(*)"),
    ("SELECT COUNT(DISTINCT gender) FROM t", "COUNT(*)"),
    ("SELECT gender, COUNT(*) FROM t", "GROUP BY"),
    ("SELECT gender, COUNT(*) FROM t GROUP BY ageBroad", "GROUP BY must list"),
    ("SELECT gender AS g, COUNT(*) FROM t GROUP BY gender", "alias"),
    ("SELECT gender, GENDER, COUNT(*) FROM t GROUP BY gender", "GENDER is selected twice"),
    ("SELECT COUNT(*) FROM t WHERE gender LIKE 'M%'", "pattern"),
    ("SELECT COUNT(*) FROM t WHERE gender = NULL", "IS NULL"),
    ("SELECT COUNT(*) FROM t WHERE yearOfRegistration < 2010.5", "integers"),
    ("SELECT COUNT(*) FROM t WHERE gender = ageBroad", "literals"),
    ("SELECT COUNT(*) FROM t WHERE LOWER(gender) = 'male'", "variable name"),
    ("SELECT AVG(CASE WHEN isSexualExploit = 1 THEN 1 END) FROM t", "ELSE 0"),
    ("SELECT COUNT(*) FROM t; SELECT COUNT(*) FROM t", "one SELECT"),
    ("DELETE FROM t", "only SELECT"),
    ("SELECT COUNT(*)", "FROM"),
    ("SELEC COUNT(*) FROM t", "could not be parsed"),
    ("", "empty"),
    ("-- a comment only", "no statement, only comments"),
    ("SELECT COUNT(*) FROM t WHERE isSexualExploit = 0.5", "0.5 is not a whole number"),
    ("SELECT COUNT(*) FROM t WHERE yearOfRegistration > '2015.5'", "integers, got '2015.5'"),
    ("SELECT COUNT(*) FROM t WHERE u.gender = 'Male'", "only the FROM table"),
]


@pytest.mark.parametrize(("text", "expected"), ACCEPTED, ids=[t for t, _ in ACCEPTED])
def test_accepted_sql_is_the_typed_query(text: str, expected: Query) -> None:
    assert parse_sql(text) == expected


@pytest.mark.parametrize(("text", "why"), REFUSED, ids=[t or "empty" for t, _ in REFUSED])
def test_refused_sql_says_what_is_supported(text: str, why: str) -> None:
    with pytest.raises(client.UnsupportedSQL) as error:
        parse_sql(text)
    message = str(error.value)
    assert why in error.value.reason, error.value.reason
    # Every refusal lists the subset.
    assert "COUNT(*)" in message and "FLAG_COUNTS" in message and "GROUP BY" in message
    assert isinstance(error.value, client.InvalidQuery)


def test_measures_map_one_to_one() -> None:
    assert isinstance(parse_sql("SELECT COUNT(*) FROM t").measure, Count)
    assert isinstance(parse_sql("SELECT FLAG_COUNTS(sexType) FROM t").measure, FlagCounts)
    assert isinstance(parse_sql("SELECT PROPORTION(isForcedLabour) FROM t").measure, Proportion)
    assert parse_condition("majorityStatus = 'Minor' AND isSexualExploit") == And(
        Eq("majorityStatus", "Minor"), Eq("isSexualExploit", 1)
    )


# ---- the subset as every refusal lists it --------------------------------------------------------
#
# Each form client.SUPPORTED_SQL lists, as it spells it, with a query written in it and the typed
# query that is: what the list promises, the parser accepts (and reads as it says).

LISTED = {
    "COUNT(*)": ("SELECT gender, COUNT(*) FROM t GROUP BY gender", count().by("gender")),
    "SUM(x)": ("SELECT SUM(yearOfRegistration) FROM t", Query(Sum("yearOfRegistration"))),
    "AVG(x)": ("SELECT AVG(yearOfRegistration) FROM t", Query(Mean("yearOfRegistration"))),
    "PROPORTION(<condition>)": (
        "SELECT PROPORTION(gender = 'Male') FROM t", proportion(gender="Male"),
    ),
    "AVG(CASE WHEN <condition> THEN 1 ELSE 0 END)": (
        "SELECT AVG(CASE WHEN gender = 'Male' THEN 1 ELSE 0 END) FROM t",
        proportion(gender="Male"),
    ),
    "FLAG_COUNTS(flag_set)": ("SELECT FLAG_COUNTS(sexType) FROM t", flag_counts("sexType")),
    "=": ("gender = 'Male'", Eq("gender", "Male")),
    "<>": ("gender <> 'Male'", And(Not(Eq("gender", "Male")), Not(Missing("gender")))),
    "!=": ("gender != 'Male'", And(Not(Eq("gender", "Male")), Not(Missing("gender")))),
    "<": ("yearOfRegistration < 2015", Range("yearOfRegistration", None, 2014)),
    "<=": ("yearOfRegistration <= 2015", Range("yearOfRegistration", None, 2015)),
    ">": ("yearOfRegistration > 2015", Range("yearOfRegistration", 2016, None)),
    ">=": ("yearOfRegistration >= 2015", Range("yearOfRegistration", 2015, None)),
    "IN (...)": ("gender IN ('Male', 'Female')", In("gender", ["Male", "Female"])),
    "NOT IN (...)": (
        "gender NOT IN ('Male', 'Female')",
        And(Not(In("gender", ["Male", "Female"])), Not(Missing("gender"))),
    ),
    "BETWEEN a AND b": (
        "yearOfRegistration BETWEEN 2010 AND 2015", Range("yearOfRegistration", 2010, 2015),
    ),
    "IS NULL": ("gender IS NULL", Missing("gender")),
    "IS NOT NULL": ("gender IS NOT NULL", Not(Missing("gender"))),
    "AND": ("gender = 'Male' AND isForcedLabour = 1",
            And(Eq("gender", "Male"), Eq("isForcedLabour", 1))),
    "OR": ("gender = 'Male' OR isForcedLabour = 1",
           Or(Eq("gender", "Male"), Eq("isForcedLabour", 1))),
    "NOT": ("NOT (gender = 'Male')", And(Not(Eq("gender", "Male")), Not(Missing("gender")))),
    "(parentheses)": ("(gender = 'Male' OR gender IS NULL) AND isForcedLabour = 1",
                      And(Or(Eq("gender", "Male"), Missing("gender")), Eq("isForcedLabour", 1))),
    # Never NULL: IS NOT TRUE keeps the records where the condition is NULL, as the builder's Not.
    "(<condition>) IS [NOT] TRUE": ("(gender = 'Male') IS NOT TRUE", Not(Eq("gender", "Male"))),
    "(<condition>) IS [NOT] FALSE": (
        "(gender = 'Male' OR isForcedLabour = 1) IS FALSE",
        And(Not(Eq("gender", "Male")), Not(Missing("gender")),
            Not(Eq("isForcedLabour", 1)), Not(Missing("isForcedLabour"))),
    ),
    "a flag alone": ("isForcedLabour", Eq("isForcedLabour", 1)),
}
# The other halves of the [NOT]s, each as SQL reads it.
IS_TRUE_FALSE = [
    ("(gender = 'Male') IS TRUE", Eq("gender", "Male")),
    ("gender = 'Male' IS TRUE", Eq("gender", "Male")),
    ("(gender = 'Male') IS FALSE", And(Not(Eq("gender", "Male")), Not(Missing("gender")))),
    ("(gender = 'Male') IS NOT FALSE",
     Not(And(Not(Eq("gender", "Male")), Not(Missing("gender"))))),
    ("isForcedLabour IS NOT FALSE", Not(Eq("isForcedLabour", 0))),
]


def _listed_forms() -> list[str]:
    """The forms SUPPORTED_SQL lists: the aggregates' first column, the conditions' operator
    lines (forms set apart by two spaces), and the forms a sentence names."""
    lines = client.SUPPORTED_SQL.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("aggregates:"))
    middle = next(i for i, line in enumerate(lines) if line.lstrip().startswith("conditions:"))
    forms: list[str] = []
    for line in lines[start:middle]:
        first = re.split(r"\s{2,}", line.split(":", 1)[-1].strip())[0]
        forms.extend(first.split(", "))
    for line in lines[middle:middle + 3]:
        forms.extend(re.split(r"\s{2,}", line.split("conditions:")[-1].strip()))
    forms.append("a flag alone")
    return forms


def test_the_listed_subset_is_what_the_parser_accepts() -> None:
    forms = _listed_forms()
    assert "(<condition>) IS [NOT] TRUE" in forms and "IS NOT NULL" in forms, forms
    assert sorted(forms) == sorted(LISTED)  # every form listed is tried below, and no other
    for form, (text, expected) in LISTED.items():
        assert form in client.SUPPORTED_SQL
        if text.startswith("SELECT"):
            assert parse_sql(text) == expected, form
        else:
            assert parse_condition(text) == expected, form
            assert parse_sql(f"SELECT COUNT(*) FROM t WHERE {text}") == count().where(expected)
    for text, expected in IS_TRUE_FALSE:
        assert parse_condition(text) == expected, text


def test_the_builders_not_is_written_in_a_listed_form_and_reads_back() -> None:
    for negated in (Not(Eq("gender", "Male")), Not(Or(Eq("gender", "Male"), Range("x", 1, 2)))):
        written = str(negated)
        assert written.endswith(" IS NOT TRUE"), written
        assert parse_condition(written) == negated


# ---- SQL's meaning, checked against DuckDB ------------------------------------------------------
#
# A random condition over a text column (with NULLs) and an integer column (with NULLs) selects
# the same rows in DuckDB as the typed filter it is translated to selects under veil's rules
# (a leaf is false on a missing value; Not is the plain complement; Missing is IS NULL).

ROWS = [
    (i, a, b)
    for i, (a, b) in enumerate(
        (a, b) for a in ("x", "y", "z", None) for b in (0, 1, 2, 3, None)
    )
]


def veil_holds(f: Filter, row: dict[str, object]) -> bool:
    if isinstance(f, Eq):
        return row[f.variable] == f.value
    if isinstance(f, In):
        return row[f.variable] in f.values and row[f.variable] is not None
    if isinstance(f, Range):
        value = row[f.variable]
        if not isinstance(value, int):
            return False
        return (f.low is None or value >= f.low) and (f.high is None or value <= f.high)
    if isinstance(f, Missing):
        return row[f.variable] is None
    if isinstance(f, Not):
        return not veil_holds(f.operand, row)
    if isinstance(f, And):
        return all(veil_holds(o, row) for o in f.operands)
    assert isinstance(f, Or)
    return any(veil_holds(o, row) for o in f.operands)


text_values = st.sampled_from(["'x'", "'y'", "'z'"])
int_values = st.integers(min_value=-1, max_value=4).map(str)
leaves = st.one_of(
    st.builds(lambda op, v: f"a {op} {v}", st.sampled_from(["=", "<>", "!="]), text_values),
    st.builds(lambda vs: f"a IN ({', '.join(vs)})", st.lists(text_values, min_size=1,
                                                            max_size=3)),
    st.builds(lambda vs: f"a NOT IN ({', '.join(vs)})", st.lists(text_values, min_size=1,
                                                                max_size=3)),
    st.builds(lambda op, v: f"b {op} {v}",
              st.sampled_from(["=", "<>", "<", "<=", ">", ">="]), int_values),
    st.builds(lambda op, v: f"{v} {op} b", st.sampled_from(["<", ">="]), int_values),
    st.builds(lambda lo, hi: f"b BETWEEN {lo} AND {hi}", int_values, int_values),
    st.sampled_from(["a IS NULL", "a IS NOT NULL", "b IS NULL", "b IS NOT NULL"]),
)
conditions_sql = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(lambda x, y: f"({x}) AND ({y})", inner, inner),
        st.builds(lambda x, y: f"({x}) OR ({y})", inner, inner),
        st.builds(lambda x: f"NOT ({x})", inner),
        st.builds(lambda x, test: f"({x}) {test}", inner, st.sampled_from(
            ["IS TRUE", "IS NOT TRUE", "IS FALSE", "IS NOT FALSE"]
        )),
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def table() -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    connection.execute("CREATE TABLE t (id INTEGER, a VARCHAR, b INTEGER)")
    connection.executemany("INSERT INTO t VALUES (?, ?, ?)", ROWS)
    return connection


# Deterministic: no chance failure; 300 random conditions.
@settings(max_examples=300, deadline=None)
@given(condition=conditions_sql)
def test_conditions_keep_sql_meaning(table: duckdb.DuckDBPyConnection, condition: str) -> None:
    expected = {r[0] for r in table.execute(f"SELECT id FROM t WHERE {condition}").fetchall()}
    translated = parse_condition(condition)
    got = {i for i, a, b in ROWS if veil_holds(translated, {"a": a, "b": b})}
    assert got == expected, (condition, translated)
    # The filter as the client writes it (in a summary, a JSON export, a notebook caption) is
    # SQL that means the same thing, and reads back as the same filter.
    written = str(translated)
    again = {r[0] for r in table.execute(f"SELECT id FROM t WHERE {written}").fetchall()}
    assert again == expected, (condition, written)
    assert parse_condition(written) == translated, (condition, written)


MALFORMED = [
    # (text, what the one sentence says, the part of the text it quotes)
    ("SELECT COUNT(* FROM victims", "'(' is not closed", "COUNT(* FROM"),
    ("SELECT COUNT(*) FROM t WHERE", "WHERE needs a condition", "WHERE"),
    ("SELECT COUNT(*) FROM t WHERE gender = 'Male' AND", "AND needs a condition", "AND"),
    ("SELECT gender, COUNT(*) FROM t GROUP gender", "unexpected 'gender'", "GROUP gender"),
    ("SELECT COUNT(*) FROM t WHERE gender = 'Male", "quote is not closed", ""),
    ("SELEC COUNT(*) FROM t", "starts with SELECT, not 'SELEC'", "SELEC"),
]


@pytest.mark.parametrize(("text", "says", "names"), MALFORMED, ids=[t for t, _, _ in MALFORMED])
def test_malformed_sql_gets_one_sentence_naming_the_bad_part(
    text: str, says: str, names: str
) -> None:
    with pytest.raises(client.UnsupportedSQL) as error:
        parse_sql(text)
    reason = error.value.reason
    assert error.value.malformed
    assert says in reason and names in reason, reason
    assert "\n" not in reason
    for internal in ("<class", "sqlglot", "Required keyword", "Col:"):
        assert internal not in reason, reason


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("ageBroad=", "nothing follows '=' in 'ageBroad='"),
        ("ageBroad IN ('0--8'", "'(' is not closed in \"ageBroad IN ('0--8'\""),
        ("yearOfRegistration BETWEEN 2010", "BETWEEN needs two bounds"),
        ("gender = 'Male' gender = 'Female'", "unexpected 'gender' in \"gender = 'Male' gender\""),
    ],
)
def test_a_malformed_condition_is_named_without_the_wrapper_it_is_parsed_in(
    text: str, says: str
) -> None:
    with pytest.raises(client.UnsupportedSQL) as error:
        parse_condition(text)
    assert says in error.value.reason, error.value.reason
    assert "FROM t WHERE" not in error.value.reason  # the text parsed around the condition


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("gender = Male", "gender = Male: Male without quotes is read as a variable name"),
        ('gender = "Male"', 'gender = "Male": Male in double quotes is read as a variable name'),
        ("majorityStatus <> Minor", "majorityStatus <> Minor: Minor without quotes"),
        ("gender IN (Male, 'Female')", "gender IN (Male, 'Female'): Male without quotes"),
    ],
)
def test_an_unquoted_text_value_is_named_with_how_to_quote_it(text: str, says: str) -> None:
    with pytest.raises(client.UnsupportedSQL) as error:
        parse_condition(text)
    assert error.value.malformed  # a slip: the one sentence, not the whole subset
    assert error.value.reason.startswith(says), error.value.reason
    assert error.value.reason.endswith("write a text value in single quotes: " + (
        "'Minor'" if "Minor" in text else "'Male'"))
    assert error.value.variable == text.split()[0]


@pytest.mark.parametrize(
    ("text", "glued"),
    [
        ("SELECT COUNT(*) FROM t WHERE ageBroad = 9--17 AND gender = 'Male'", "9--17"),
        ("SELECT gender, COUNT(*) FROM t WHERE ageBroad IN (0--8, 9--17) GROUP BY gender",
         "0--8"),
    ],
)
def test_an_unquoted_age_band_is_not_read_as_a_comment(text: str, glued: str) -> None:
    # Read as SQL, 9--17 is 9 and a comment that drops the rest of the line, gender included.
    with pytest.raises(client.UnsupportedSQL) as error:
        parse_sql(text)
    assert error.value.malformed
    assert error.value.reason.startswith(f"{glued} reads as {glued.split('-')[0]} and a comment")
    assert error.value.reason.endswith(f"write the value in single quotes: '{glued}'")


def test_comments_and_quoted_age_bands_are_still_read() -> None:
    assert parse_sql(
        "SELECT COUNT(*) FROM t WHERE ageBroad = '0--8' /* 0--8 */ -- children, 0--8\n"
        "AND gender = 'it''s 0--8'"
    ) == count().where(Eq("ageBroad", "0--8"), Eq("gender", "it's 0--8"))
    assert parse_sql("SELECT COUNT(*) FROM t WHERE yearOfRegistration >= 2015 -- since 2015") == (
        count().where(Range("yearOfRegistration", 2015, None))
    )


def test_sql_outside_the_subset_is_not_called_malformed() -> None:
    with pytest.raises(client.UnsupportedSQL) as error:
        parse_sql("SELECT * FROM victims")
    assert not error.value.malformed


def test_a_flag_set_grouped_by_in_sql_is_answered_in_sql() -> None:
    from client.codebook import Codebook
    from engine.codebook import default_codebook
    from protos.veil.v1 import veil_pb2 as pb
    from server.convert import codebook_to_pb

    book = Codebook.from_pb(pb.GetCodebookResponse(codebook=codebook_to_pb(default_codebook())))
    query = parse_sql(
        "SELECT majorityStatus, meansOfControl, COUNT(*) FROM victims "
        "GROUP BY majorityStatus, meansOfControl"
    )
    with pytest.raises(client.InvalidQuery) as error:
        query.normalized(book)
    assert error.value.variable == "meansOfControl"
    assert (
        "SELECT majorityStatus, FLAG_COUNTS(meansOfControl) FROM victims GROUP BY majorityStatus"
        in str(error.value)
    )


@pytest.mark.parametrize(
    "condition",
    [
        "NOT " * 200 + "isSexualExploit = 1",
        "(" * 100 + "isSexualExploit = 1" + ")" * 100,
        "NOT (" * 150 + "isSexualExploit = 1" + ")" * 150,
    ],
    ids=["200 NOTs", "100 parentheses", "150 NOT ("],
)
def test_a_condition_nested_too_deeply_is_refused_not_a_recursion_error(condition: str) -> None:
    for parse in (lambda: parse_sql(f"SELECT COUNT(*) FROM t WHERE {condition}"),
                  lambda: parse_condition(condition)):
        with pytest.raises(client.UnsupportedSQL, match="nested too deeply") as error:
            parse()
        assert error.value.malformed  # one sentence, not the subset's list


def test_a_long_flat_chain_of_or_and_and_is_read_without_recursing() -> None:
    years = [2000 + i for i in range(1000)]
    chain = " OR ".join(f"yearOfRegistration = {y}" for y in years)
    assert parse_condition(chain) == Or(*(Eq("yearOfRegistration", y) for y in years))
    both = " AND ".join(f"(gender = 'Male' OR yearOfRegistration = {y})" for y in years[:500])
    parsed = parse_sql(f"SELECT COUNT(*) FROM t WHERE NOT ({both})").filter
    assert isinstance(parsed, Or) and len(parsed.operands) == 500  # De Morgan: one per OR


@pytest.mark.parametrize("text", [b"SELECT COUNT(*) FROM t", None, 123])
def test_sql_text_that_is_not_a_str_is_a_type_error_saying_so(text: object) -> None:
    with pytest.raises(TypeError, match="must be a str, got"):
        parse_sql(text)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a str, got"):
        parse_condition(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("condition", "dropped"),
    [
        ("gender = 'Male' -- AND gender = 'Female'", "AND gender = 'Female'"),
        ("gender = 'Male' /* OR gender = 'Female' */", "OR gender = 'Female'"),
        ("yearOfRegistration >= 2015 -- since 2015", "since 2015"),
        ("gender = 'Male' --", ""),
    ],
)
def test_a_comment_in_a_condition_alone_is_refused_not_dropped(
    condition: str, dropped: str
) -> None:
    """--where "gender='Male' -- AND gender='Female'" would release (and charge for) the males."""
    with pytest.raises(client.UnsupportedSQL, match="cannot hold a comment") as error:
        parse_condition(condition)
    assert error.value.malformed and dropped in error.value.reason
    assert parse_condition("ageBroad = '0--8'") == Eq("ageBroad", "0--8")  # -- in quotes: a value


def test_a_bare_name_that_is_not_a_flag_is_refused_saying_so() -> None:
    from client.codebook import Codebook
    from engine.codebook import default_codebook
    from protos.veil.v1 import veil_pb2 as pb
    from server.convert import codebook_to_pb

    book = Codebook.from_pb(pb.GetCodebookResponse(codebook=codebook_to_pb(default_codebook())))
    for text in ("SELECT COUNT(*) FROM t WHERE gender", "SELECT PROPORTION(gender) FROM t",
                 "SELECT COUNT(*) FROM t WHERE NOT gender"):
        with pytest.raises(client.InvalidQuery) as error:
            parse_sql(text).normalized(book)
        assert "a bare name is a condition only for a flag (0/1) variable" in str(error.value)
        assert "gender is a category" in str(error.value) and error.value.variable == "gender"
    # A flag alone is still a condition, and the same one as flag = 1.
    query = parse_sql("SELECT COUNT(*) FROM t WHERE isSexualExploit").normalized(book)
    assert query == count().where(isSexualExploit=1)
