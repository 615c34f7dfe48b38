"""A small SELECT subset, parsed on the researcher's machine into the typed query.

    parse_sql("SELECT gender, ageBroad, COUNT(*) FROM victims "
              "WHERE majorityStatus = 'Minor' GROUP BY gender, ageBroad")
    # == count().by("gender", "ageBroad").where(majorityStatus="Minor")

The text is parsed with sqlglot (DuckDB's dialect) and walked into `client.query` objects; only
the typed query goes to the server, never SQL. Conditions keep SQL's meaning: `x <> 'a'`,
`x NOT IN (...)` and `NOT (...)` drop the records where x is missing, as they do in DuckDB (a
comparison with a missing value is not true). Anything outside the subset raises UnsupportedSQL,
whose message says what was refused and lists what is supported (`client.errors.SUPPORTED_SQL`:
kept beside UnsupportedSQL, which writes it into every message, because client.errors cannot
import this module, which imports it; keep its list in step with the walker here).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from client.errors import UnsupportedSQL
from client.query import (
    And,
    Count,
    Eq,
    Filter,
    FlagAlone,
    FlagCounts,
    In,
    Mean,
    Measure,
    Missing,
    Not,
    Or,
    Proportion,
    Query,
    Range,
    Sum,
    Value,
)

_CLAUSES = {
    "having": "HAVING",
    "order": "ORDER BY",
    "limit": "LIMIT",
    "offset": "OFFSET",
    "joins": "JOIN (one table only)",
    "laterals": "LATERAL",
    "distinct": "DISTINCT",
    "with": "WITH",
    "with_": "WITH",
    "qualify": "QUALIFY",
    "windows": "WINDOW",
    "sample": "TABLESAMPLE",
    "pivots": "PIVOT",
    "into": "INTO",
    "locks": "FOR UPDATE",
    "connect": "CONNECT BY",
    "prewhere": "PREWHERE",
    "cluster": "CLUSTER BY",
    "distribute": "DISTRIBUTE BY",
    "sort": "SORT BY",
    "match": "MATCH_RECOGNIZE",
}
_ALLOWED = {"expressions", "from", "from_", "where", "group", "kind"}
_FLIPPED: dict[type[Node], type[Node]] = {
    exp.EQ: exp.EQ, exp.NEQ: exp.NEQ, exp.LT: exp.GT, exp.GT: exp.LT,
    exp.LTE: exp.GTE, exp.GTE: exp.LTE,
}
_COMPARISONS = (exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE)
# Digits as the codebook reads them for an integer variable: ASCII only, a leading minus.
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,19}")
# A parsed SQL node. sqlglot's own base class has changed name across releases (Expression,
# Expr), so nodes are checked with isinstance at each step rather than typed statically.
Node = Any
T = TypeVar("T")


# What a condition nested past what Python's stack walks (hundreds of NOTs or parentheses) says;
# servers refuse far less deep ones (max_filter_depth, 8 by default).
_TOO_DEEP = (
    "the condition is nested too deeply (a server takes conditions a few levels deep: "
    "max_filter_depth, 8 by default, and max_filter_terms, 64); write it with fewer nested "
    "NOTs and parentheses, or as an IN list"
)


def _refuse_deep(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse`, with a condition nested too deeply for the parser refused as UnsupportedSQL
    rather than raised as RecursionError."""

    @functools.wraps(parse)
    def guarded(text: str) -> T:
        try:
            return parse(text)
        except RecursionError:
            raise UnsupportedSQL(_TOO_DEEP, malformed=True) from None

    return guarded


@_refuse_deep
def parse_sql(text: str) -> Query:
    """The typed query one SELECT in veil's subset describes (not bound to a client)."""
    if not isinstance(text, str):
        raise TypeError(f"the SQL text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise UnsupportedSQL("the SQL text is empty")
    _refuse_glued_comment(text)
    try:
        statements = [s for s in sqlglot.parse(text, read="duckdb") if s is not None]
    except (ParseError, TokenError) as exc:
        raise UnsupportedSQL(
            f"the SQL could not be parsed: {_syntax_error(exc, text)}", malformed=True
        ) from None
    if len(statements) != 1:
        if not statements:
            raise UnsupportedSQL("the SQL text holds no statement, only comments or ';'")
        raise UnsupportedSQL(f"give one SELECT statement, not {len(statements)}")
    return _Translator().select(statements[0])


@_refuse_deep
def parse_condition(text: str) -> Filter:
    """A WHERE condition alone, in the same subset: "majorityStatus = 'Minor' AND ..."."""
    if not isinstance(text, str):
        raise TypeError(f"a condition's text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise UnsupportedSQL(
            "the condition is empty; give one, such as isSexualExploit = 1", malformed=True
        )
    _refuse_glued_comment(text)
    _refuse_comment(text)
    try:
        statements = sqlglot.parse(_CONDITION_PREFIX + text, read="duckdb")
    except (ParseError, TokenError) as exc:
        raise UnsupportedSQL(
            f"the condition could not be parsed: {_syntax_error(exc, text, _CONDITION_PREFIX)}",
            malformed=True,
        ) from None
    if len(statements) != 1 or not isinstance(statements[0], exp.Select):
        raise UnsupportedSQL("give one condition")
    query = _Translator().select(statements[0])
    assert query.filter is not None
    return query.filter


def _refuse_glued_comment(text: str) -> None:
    """Refuse a `--` between two words outside quotes: an age band such as 0--8 written without
    quotes reads as 0 and a comment, which would drop the rest of the line without a word."""
    try:
        tokens = sqlglot.Dialect.get_or_raise("duckdb").tokenize(text)
    except TokenError:
        return  # parsing reports it
    for token in tokens:
        after = token.end + 1  # where a comment glued to the token would begin
        glued_to_word = _word(text[token.end]) and _word(text[after + 2 : after + 3])
        if not (glued_to_word and text.startswith("--", after)):
            continue
        start, end = token.start, after + 2
        while end < len(text) and (_word(text[end]) or text[end] == "+"):
            end += 1
        glued = text[start:end]
        raise UnsupportedSQL(
            f"{glued} reads as {text[start:after]} and a comment (-- starts a comment in SQL, "
            f"which drops the rest of the line); write the value in single quotes: "
            f"{_quoted_text(glued)}",
            malformed=True,
        )


def _refuse_comment(text: str) -> None:
    """Refuse a comment in a condition given alone (--where, --proportion): parsing drops it, and
    with it whatever it holds ("gender = 'Male' -- AND gender = 'Female'" would release the
    males). In a whole query, over several lines, a comment keeps its SQL meaning."""
    try:
        tokens = sqlglot.Dialect.get_or_raise("duckdb").tokenize(text)
    except TokenError:
        return  # parsing reports it
    for token in tokens:
        if token.comments:
            dropped = " ".join(c.strip() for c in token.comments if c.strip())
            raise UnsupportedSQL(
                "a condition cannot hold a comment (-- or /* */), which SQL drops"
                + (f" with what it holds ({_quoted(dropped)})" if dropped else "")
                + "; take it out, quote a value that holds -- ('0--8'), or give the whole "
                "query as SQL",
                malformed=True,
            )


def _word(char: str) -> bool:
    return char.isalnum() or char == "_"


_CONDITION_PREFIX = "SELECT COUNT(*) FROM t WHERE "
# sqlglot's "Required keyword: 'x' missing for <class '...EQ'>", by the node that is incomplete.
_INCOMPLETE = re.compile(r"missing for <class '(?:[\w.]*\.)?(\w+)'>")
_NEEDS = {
    "Where": "WHERE needs a condition after it",
    "And": "AND needs a condition on each side",
    "Or": "OR needs a condition on each side",
    "Not": "NOT needs a condition after it",
    "Between": "BETWEEN needs two bounds: BETWEEN low AND high",
    "In": "IN needs a list of values in parentheses",
    "Is": "IS needs NULL or NOT NULL after it",
    "Group": "GROUP BY needs the selected dimensions after it",
}


def _syntax_error(error: Exception, text: str, prefix: str = "") -> str:
    """One sentence saying what is wrong with `text` and where, from sqlglot's error (whose
    own wording names its classes). `prefix` is what was parsed ahead of `text`."""
    if isinstance(error, TokenError):
        for quote in ("'", '"'):
            if text.count(quote) % 2:
                return f"a {quote} quote is not closed"
        return f"{_quoted(text)} holds a character that is not SQL"
    details = getattr(error, "errors", None) or [{}]
    first = details[0]
    description = str(first.get("description") or "")
    highlight = str(first.get("highlight") or "")
    before = str(first.get("start_context") or "")
    after = str(first.get("end_context") or "")
    if prefix and before.startswith(prefix):
        before = before[len(prefix):]
    if len(before) > 30:  # the last few words before the fault
        before = before[-30:].split(" ", 1)[-1]
    near = (before + highlight).strip()
    where = f" in {_quoted(near)}" if near else ""
    if not prefix and text.split() and text.split()[0].upper() not in ("SELECT", "WITH", "("):
        return f"a query starts with SELECT, not {_quoted(text.split()[0])}"
    incomplete = _INCOMPLETE.search(description)
    if incomplete:
        kind = incomplete.group(1)
        if kind in _NEEDS:
            return f"{_NEEDS[kind]}{where}"
        if highlight and not after.strip():
            return f"nothing follows {_quoted(highlight)}{where}"
        return f"{_quoted(highlight)} is incomplete{where}"
    if description.startswith("Expecting )"):
        return f"a '(' is not closed{where}"
    if highlight:
        return f"unexpected {_quoted(highlight)}{where}"
    return description or type(error).__name__


def _quoted(text: str) -> str:
    return f"'{text}'" if "'" not in text else f'"{text}"'


def _quoted_text(text: str) -> str:
    """`text` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _sql(node: Node) -> str:
    try:
        text = str(node.sql(dialect="duckdb"))
    except Exception:  # printing is for the message only
        text = type(node).__name__
    return text if len(text) <= 80 else text[:77] + "..."


class _Translator:
    def __init__(self) -> None:
        self.table: str | None = None
        self.alias: str | None = None

    # -- the statement --
    def select(self, statement: Node) -> Query:
        if isinstance(statement, (exp.Union, exp.Intersect, exp.Except)):
            raise UnsupportedSQL(f"{type(statement).__name__.upper()} is not supported")
        if not isinstance(statement, exp.Select):
            raise UnsupportedSQL(
                f"only SELECT is supported, got {statement.key.upper()}"
            )
        for key, value in statement.args.items():
            if key in _ALLOWED or not value:
                continue
            clause = _CLAUSES.get(key, key.upper())
            raise UnsupportedSQL(f"{clause} is not supported")
        self._from(statement.args.get("from_") or statement.args.get("from"))

        dimensions: list[str] = []
        measures: list[Measure] = []
        for item in statement.expressions:
            node = item.this if isinstance(item, exp.Alias) else item
            if isinstance(node, exp.Star):
                raise UnsupportedSQL(
                    "SELECT * is not supported: veil releases aggregates, never rows; "
                    "select dimensions and one aggregate"
                )
            if isinstance(node, exp.Column):
                if isinstance(item, exp.Alias):
                    raise UnsupportedSQL(
                        f"an alias on a dimension ({_sql(item)}) is not supported: results are "
                        "keyed by codebook names"
                    )
                name = self._column(node)
                if name.lower() in (d.lower() for d in dimensions):
                    raise UnsupportedSQL(f"{name} is selected twice", variable=name)
                dimensions.append(name)
            else:
                measures.append(self._aggregate(node))
        if len(measures) != 1:
            raise UnsupportedSQL(
                f"select exactly one aggregate, got {len(measures)}"
                + ("" if measures else " (a SELECT of dimensions only would release rows)")
            )

        group = statement.args.get("group")
        if group is not None:
            if group.args.get("all"):
                grouped = list(dimensions)
            else:
                extra = [k for k in group.args if k != "expressions" and group.args.get(k)]
                if extra:
                    raise UnsupportedSQL(f"GROUP BY {extra[0].upper()} is not supported")
                grouped = []
                for node in group.expressions:
                    if not isinstance(node, exp.Column):
                        raise UnsupportedSQL(
                            f"GROUP BY takes dimension names, got {_sql(node)}"
                        )
                    grouped.append(self._column(node))
            # Names are matched regardless of case, as SQL and the codebook match them.
            if sorted(g.lower() for g in grouped) != sorted(d.lower() for d in dimensions):
                raise UnsupportedSQL(
                    "GROUP BY must list exactly the selected dimensions "
                    f"(selected: {', '.join(dimensions) or 'none'}; "
                    f"grouped: {', '.join(grouped) or 'none'})"
                )
        elif dimensions:
            raise UnsupportedSQL(
                f"selected dimensions ({', '.join(dimensions)}) need a GROUP BY listing them"
            )

        where = statement.args.get("where")
        condition = self.true(where.this) if where is not None else None
        return Query(measures[0], tuple(dimensions), condition, spelling="sql")

    def _from(self, clause: Any) -> None:
        if clause is None:
            raise UnsupportedSQL("a FROM clause is needed: FROM any one table name")
        table = clause.this
        if not isinstance(table, exp.Table):
            raise UnsupportedSQL(
                f"FROM takes one table name, not {_sql(table)} (subqueries are not supported)"
            )
        # Anything beyond a name and an alias (a join, a sample, time travel with AT ...) would
        # change which records are counted, and must not be dropped silently.
        if any(v for k, v in table.args.items() if k not in ("this", "alias", "db", "catalog")):
            raise UnsupportedSQL("FROM takes one table name, nothing more")
        if not isinstance(table.this, exp.Identifier):
            raise UnsupportedSQL(f"FROM takes one table name, not {_sql(table)}")
        self.table = table.name
        self.alias = table.alias or None

    def _column(self, node: exp.Column) -> str:
        qualifier = node.table
        if qualifier and qualifier not in (self.table, self.alias):
            raise UnsupportedSQL(
                f"{_sql(node)} names table {qualifier!r}; only the FROM table may be used"
            )
        if node.args.get("db") or node.args.get("catalog"):
            raise UnsupportedSQL(f"{_sql(node)}: qualified names are not supported")
        if not isinstance(node.this, exp.Identifier):
            raise UnsupportedSQL(f"{_sql(node)} is not a variable name")
        return str(node.name)

    # -- the aggregate --
    def _aggregate(self, node: Node) -> Measure:
        if isinstance(node, exp.Count):
            if isinstance(node.this, exp.Star):
                return Count()
            raise UnsupportedSQL(
                f"{_sql(node)} is not supported: use COUNT(*) (add WHERE x IS NOT NULL to count "
                "records where x is present)"
            )
        if isinstance(node, exp.Sum):
            return Sum(self._argument(node, "SUM"))
        if isinstance(node, exp.Avg):
            inner = node.this
            if isinstance(inner, exp.Paren):
                inner = inner.this
            if isinstance(inner, (exp.Case, exp.If)):
                return Proportion(self._indicator(inner))
            return Mean(self._argument(node, "AVG"))
        if isinstance(node, exp.Anonymous):
            name = str(node.this).upper()
            args = list(node.expressions)
            if name == "PROPORTION":
                if len(args) != 1:
                    raise UnsupportedSQL("PROPORTION takes one condition")
                return Proportion(self.true(args[0]))
            if name == "FLAG_COUNTS":
                if len(args) != 1 or not isinstance(args[0], exp.Column):
                    raise UnsupportedSQL("FLAG_COUNTS takes the name of one flag set")
                return FlagCounts(self._column(args[0]))
            if name == "MEAN":
                if len(args) != 1 or not isinstance(args[0], exp.Column):
                    raise UnsupportedSQL("MEAN takes one variable")
                return Mean(self._column(args[0]))
        if isinstance(node, exp.Window):
            raise UnsupportedSQL(f"window functions are not supported ({_sql(node)})")
        if isinstance(node, exp.Func):
            raise UnsupportedSQL(f"the function in {_sql(node)} is not supported")
        if isinstance(node, (exp.Subquery, exp.Select)):
            raise UnsupportedSQL("subqueries are not supported")
        raise UnsupportedSQL(
            f"{_sql(node)} is not supported in SELECT: select dimension names and one aggregate"
        )

    def _argument(self, node: Node, name: str) -> str:
        argument = node.this
        if isinstance(argument, exp.Distinct):
            raise UnsupportedSQL(f"{name}(DISTINCT ...) is not supported")
        if not isinstance(argument, exp.Column):
            raise UnsupportedSQL(f"{name} takes one integer variable, got {_sql(node)}")
        return self._column(argument)

    def _indicator(self, node: Node) -> Filter:
        """AVG(CASE WHEN c THEN 1 ELSE 0 END) and AVG(IF(c, 1, 0)) are proportions of c."""
        if isinstance(node, exp.Case):
            ifs = node.args.get("ifs") or []
            if node.this is not None or len(ifs) != 1:
                raise UnsupportedSQL(
                    "use AVG(CASE WHEN <condition> THEN 1 ELSE 0 END), with one WHEN"
                )
            condition, then, otherwise = ifs[0].this, ifs[0].args.get("true"), node.args.get(
                "default"
            )
        else:
            condition, then, otherwise = node.this, node.args.get("true"), node.args.get("false")
        if _number(then) != 1 or _number(otherwise) != 0:
            raise UnsupportedSQL(
                "a proportion is AVG(CASE WHEN <condition> THEN 1 ELSE 0 END); other values "
                "are not supported (an ELSE NULL would change the denominator)"
            )
        return self.true(condition)

    # -- conditions, with SQL's meaning --
    def true(self, node: Node) -> Filter:
        """The records for which the SQL condition is TRUE (not FALSE, not NULL)."""
        return self._condition(node, positive=True)

    def _condition(self, node: Node, *, positive: bool) -> Filter:
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, exp.Not):
            return self._condition(node.this, positive=not positive)
        if isinstance(node, (exp.And, exp.Or)):
            # A chain (a OR b OR c ...) is walked in a loop, not a call for each link: sqlglot
            # nests it one level per operator, and a long one would exhaust the stack.
            operands: list[Node] = []
            pending: list[Node] = [node]
            while pending:
                current = pending.pop()
                while isinstance(current, exp.Paren):
                    current = current.this
                if type(current) is type(node):
                    pending += [current.right, current.left]  # the left one is walked first
                else:
                    operands.append(current)
            parts = [self._condition(operand, positive=positive) for operand in operands]
            # NOT (a AND b) is TRUE when either is FALSE: De Morgan, with SQL's three values.
            conjunction = isinstance(node, exp.And) == positive
            return _all(parts) if conjunction else _any(parts)
        if isinstance(node, exp.Is):
            if isinstance(node.expression, exp.Boolean):
                # c IS TRUE (or IS FALSE) is never NULL: the records where c is TRUE (FALSE),
                # and its negation all the others, those where c is NULL included.
                held = self._condition(node.this, positive=bool(node.expression.this))
                return held if positive else Not(held)
            name = self._operand_column(node.this, node)
            if not isinstance(node.expression, exp.Null):
                raise UnsupportedSQL(
                    f"{_sql(node)}: only IS [NOT] NULL, IS [NOT] TRUE and IS [NOT] FALSE are "
                    "supported"
                )
            return Missing(name) if positive else Not(Missing(name))
        if isinstance(node, exp.In):
            if node.args.get("query") is not None or node.args.get("unnest") is not None:
                raise UnsupportedSQL("IN takes a list of literals; subqueries are not supported")
            name = self._operand_column(node.this, node)
            values = [self._literal(v, node, name) for v in node.expressions]
            if not values:
                raise UnsupportedSQL(f"{_sql(node)}: IN needs at least one value")
            leaf: Filter = Eq(name, values[0]) if len(values) == 1 else In(name, values)
            return leaf if positive else _absent(leaf, name)
        if isinstance(node, exp.Between):
            if node.args.get("symmetric"):
                # PostgreSQL swaps reversed bounds; DuckDB refuses the word. Not guessed here.
                raise UnsupportedSQL(
                    f"{_sql(node)}: BETWEEN SYMMETRIC is not supported; write BETWEEN low AND high"
                )
            name = self._operand_column(node.this, node)
            low = self._integer(node.args["low"], node)
            high = self._integer(node.args["high"], node)
            leaf = Range(name, low, high)
            return leaf if positive else _absent(leaf, name)
        if isinstance(node, _COMPARISONS):
            return self._comparison(node, positive=positive)
        if isinstance(node, exp.Column):
            # A flag alone, as DuckDB reads an integer as a boolean: TRUE when 1, FALSE when 0.
            name = self._column(node)
            return FlagAlone(name, 1 if positive else 0)
        if isinstance(node, (exp.Like, exp.ILike, exp.RegexpLike, exp.SimilarTo)):
            raise UnsupportedSQL(f"{_sql(node)}: pattern matching is not supported; use IN")
        if isinstance(node, (exp.Subquery, exp.Select, exp.Exists)):
            raise UnsupportedSQL("subqueries are not supported")
        if isinstance(node, exp.Func):
            raise UnsupportedSQL(f"functions are not supported in conditions ({_sql(node)})")
        raise UnsupportedSQL(f"the condition {_sql(node)} is not supported")

    def _comparison(self, node: Node, *, positive: bool) -> Filter:
        left, right = node.this, node.expression
        kind: type[Node] = type(node)
        if not isinstance(left, exp.Column) and isinstance(right, exp.Column):
            left, right, kind = right, left, _FLIPPED[kind]
        name = self._operand_column(left, node)
        if isinstance(right, exp.Null):
            raise UnsupportedSQL(
                f"{_sql(node)} is never true in SQL; write {name} IS NULL or IS NOT NULL",
                variable=name,
            )
        if kind in (exp.EQ, exp.NEQ):
            leaf: Filter = Eq(name, self._literal(right, node, name))
            if kind is exp.NEQ:  # x <> v is FALSE where x = v is TRUE, and NULL where it is NULL
                positive = not positive
        else:
            bound = self._integer(right, node)
            if kind is exp.LT:
                leaf = Range(name, None, bound - 1)
            elif kind is exp.LTE:
                leaf = Range(name, None, bound)
            elif kind is exp.GT:
                leaf = Range(name, bound + 1, None)
            else:
                leaf = Range(name, bound, None)
        return leaf if positive else _absent(leaf, name)

    def _operand_column(self, node: Node, context: Node) -> str:
        if not isinstance(node, exp.Column):
            raise UnsupportedSQL(
                f"{_sql(context)}: compare a variable with literals (a variable name on one side)"
            )
        return self._column(node)

    def _literal(self, node: Node, context: Node, variable: str | None = None) -> Value:
        if isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier):
            # The usual slip: Minor or "Minor" for 'Minor'. Both are names in SQL.
            word = str(node.name)
            how = "in double quotes" if node.this.args.get("quoted") else "without quotes"
            raise UnsupportedSQL(
                f"{_sql(context)}: {word} {how} is read as a variable name, and a variable is "
                f"compared with literals; write a text value in single quotes: "
                f"{_quoted_text(word)}",
                variable=variable,
                malformed=True,
            )
        if isinstance(node, exp.Boolean):
            return 1 if node.this else 0
        if isinstance(node, exp.Literal):
            if node.is_string:
                return str(node.this)
            return self._integer(node, context, compared=False)
        if isinstance(node, exp.Neg):
            return self._integer(node, context, compared=False)
        if isinstance(node, exp.Null):
            raise UnsupportedSQL(f"{_sql(context)}: NULL is not a value; use IS NULL")
        raise UnsupportedSQL(
            f"{_sql(context)}: values must be literals ('text' in single quotes, integers, TRUE, "
            f"FALSE), got {_sql(node)}",
            variable=variable,
        )

    def _integer(self, node: Any, context: Node, *, compared: bool = True) -> int:
        """An integer literal. A bound (`compared`) may also be digits in quotes, which DuckDB
        casts to the integer column it is compared with, as `=` reads them for a flag or year."""
        value = _number(node)
        if value is None and compared and isinstance(node, exp.Literal) and node.is_string:
            text = str(node.this).strip()
            value = int(text) if _INTEGER_TEXT.fullmatch(text) else None
        if value is None or value != int(value):
            got = _sql(node) if node is not None else "nothing"
            if not compared:
                raise UnsupportedSQL(
                    f"{_sql(context)}: {got} is not a whole number; values are 'text' in single "
                    "quotes, integers, TRUE or FALSE"
                )
            raise UnsupportedSQL(
                f"{_sql(context)}: <, <=, >, >= and BETWEEN compare integer variables with "
                f"integers, got {got}"
            )
        return int(value)


def _number(node: Any) -> int | Decimal | None:
    negative = False
    while isinstance(node, (exp.Neg, exp.Paren)):
        negative ^= isinstance(node, exp.Neg)
        node = node.this
    if isinstance(node, exp.Literal) and not node.is_string:
        text = str(node.this)
        try:
            # Read exactly: a float would round 2015.0000000000000001 to a whole number.
            value = int(text) if text.isascii() and text.isdigit() else Decimal(text)
        except (ValueError, ArithmeticError):
            return None
        if isinstance(value, Decimal) and not value.is_finite():
            return None
        return -value if negative else value
    if isinstance(node, exp.Boolean) and not negative:
        return 1 if node.this else 0
    return None


def _absent(leaf: Filter, name: str) -> Filter:
    """Where `leaf` is FALSE in SQL: the variable is present and the leaf does not hold."""
    return And(Not(leaf), Not(Missing(name)))


def _unique(filters: list[Filter]) -> list[Filter]:
    out: list[Filter] = []
    for f in filters:
        if f not in out:
            out.append(f)
    return out


def _all(filters: list[Filter]) -> Filter:
    parts = _unique(list(And(*filters).operands))
    return parts[0] if len(parts) == 1 else And(*parts)


def _any(filters: list[Filter]) -> Filter:
    parts = _unique(list(Or(*filters).operands))
    return parts[0] if len(parts) == 1 else Or(*parts)


__all__ = ["parse_condition", "parse_sql"]
