"""Protobuf <-> engine types. Every value read from a request is checked here first.

Reading a request: strings have length caps and may not hold control characters, loss amounts
must be plain decimals (no sign, exponent, NaN or infinity), filter trees are measured without
recursion before they are built, so no request can make the server spend more than a bounded
amount of work before the engine's own, codebook-only checks run. The errors raised here name the
field that was rejected and why; they quote a value only when it is short.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from engine.audit_report import TABLE_NAMES
from engine.codebook import Codebook, DerivedDimension, FlagSet, Kind, Variable
from engine.engine import DryRun
from engine.errors import InvalidQueryError, LimitExceededError
from engine.loss import (
    Accounting,
    PrivacyLoss,
    exact_amount,
    exact_cap,
    format_amount,
    parse_amount,
)
from engine.query import (
    And,
    Count,
    Eq,
    Filter,
    FlagCounts,
    In,
    IsMissing,
    Mean,
    Measure,
    Not,
    Or,
    Proportion,
    Query,
    Range,
    Sum,
)
from engine.release import Release
from engine.settings import Settings
from protos.veil.v1 import veil_pb2 as pb
from server.auth import Role, is_token, without_tokens
from server.errors import MalformedRequestError

MAX_NAME_LENGTH = 128
MAX_VALUE_LENGTH = 256
MAX_TEXT_LENGTH = 1024
MAX_IN_VALUES = 10_000
# Filter messages in one query, however nested: far above any useful query, far below harm.
MAX_FILTER_NODES = 4_096

_DECIMAL = re.compile(r"^[0-9]{1,15}(\.[0-9]{1,15})?$")
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_INSTITUTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+/-]{0,127}$")

ACCOUNTING_TO_PB = {
    Accounting.PURE_DP: pb.ACCOUNTING_PURE_DP,
    Accounting.ZCDP: pb.ACCOUNTING_ZCDP,
}
ROLE_TO_PB = {
    Role.RESEARCHER: pb.ROLE_RESEARCHER,
    Role.AUDITOR: pb.ROLE_AUDITOR,
    Role.ADMIN: pb.ROLE_ADMIN,
}
ROLE_FROM_PB = {value: key for key, value in ROLE_TO_PB.items()}
_KIND_TO_PB = {
    Kind.INTEGER: pb.VARIABLE_KIND_INTEGER,
    Kind.CATEGORY: pb.VARIABLE_KIND_CATEGORY,
    Kind.COUNTRY: pb.VARIABLE_KIND_COUNTRY,
    Kind.FLAG: pb.VARIABLE_KIND_FLAG,
    Kind.CONCATENATED: pb.VARIABLE_KIND_CONCATENATED,
}


# ---- checked scalars ---------------------------------------------------------------------------


def _shown(text: str) -> str:
    """A value quoted in an error message: short values whole, long ones by length only."""
    return repr(text) if len(text) <= 64 else f"a {len(text)}-character string"


def text(value: str, field: str, *, limit: int = MAX_TEXT_LENGTH, required: bool = False) -> str:
    """A free-text field: bounded length, no control characters."""
    if required and not value:
        raise MalformedRequestError(f"{field} is required")
    if len(value) > limit:
        raise MalformedRequestError(f"{field} is longer than {limit} characters")
    if not value.isprintable():
        raise MalformedRequestError(f"{field} contains control characters")
    return value


def note(value: str, field: str, *, limit: int = MAX_TEXT_LENGTH) -> str:
    """Free text kept in the audit log (a revocation's reason): as `text`, with anything shaped
    like a bearer token redacted, since the hash-chained log cannot be edited afterwards and a
    reason quoting a leaked token would keep it there for every auditor."""
    return without_tokens(text(value, field, limit=limit))


def _not_a_token(value: str, field: str) -> None:
    """Refuse an id that is a bearer token: ids are shown in every listing and audit table and
    kept in the audit log for good, so a token pasted into one must not be stored."""
    if is_token(value):
        raise MalformedRequestError(
            f"{field} is a bearer token (was one pasted here?); a token must never be stored "
            "where it would be shown, choose another name"
        )


def name(value: str, field: str) -> str:
    """A codebook name (variable, flag set, derived dimension)."""
    return text(value, field, limit=MAX_NAME_LENGTH, required=True)


def request_id(value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise MalformedRequestError(
            "request_id must be 1 to 128 characters from A-Z a-z 0-9 . _ : - "
            f"(starting with a letter or digit), got {_shown(value)}"
        )
    _not_a_token(value, "request_id")
    return value


def release_id(value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise MalformedRequestError(
            "release_id must be 1 to 128 characters from A-Z a-z 0-9 . _ : - "
            f"(starting with a letter or digit), got {_shown(value)}"
        )
    return value


def client_id(value: str, field: str = "client_id") -> str:
    if not _CLIENT_ID.fullmatch(value):
        raise MalformedRequestError(
            f"{field} must be 1 to 64 characters from A-Z a-z 0-9 . _ - "
            f"(starting with a letter or digit), got {_shown(value)}"
        )
    _not_a_token(value, field)
    return value


def institution(value: str) -> str:
    """An institution name, or "" for none."""
    if value and not _INSTITUTION.fullmatch(value):
        raise MalformedRequestError(
            "institution must be 1 to 128 characters from A-Z a-z 0-9 . _ @ : + / - "
            f"(starting with a letter or digit), got {_shown(value)}"
        )
    _not_a_token(value, "institution")
    return value


def audit_table(value: str) -> str:
    """The name of one of the auditor's tables."""
    if value not in TABLE_NAMES:
        raise MalformedRequestError(
            f"tables: {_shown(value)} is not an audit table; known: {', '.join(TABLE_NAMES)}"
        )
    return value


def amount(value: str, field: str, *, allow_zero: bool = False) -> Fraction:
    """A privacy-loss amount written as a plain decimal, exactly."""
    if not value:
        raise MalformedRequestError(f"{field} is required: a decimal number such as 0.5")
    if not _DECIMAL.fullmatch(value):
        raise MalformedRequestError(
            f"{field} must be a plain positive decimal number such as 0.5 "
            f"(no sign, exponent, NaN or infinity), got {_shown(value)}"
        )
    return exact_cap(value, what=field) if allow_zero else exact_amount(value, what=field)


def loss(value: str, settings: Settings, field: str = "loss") -> PrivacyLoss:
    return PrivacyLoss(settings.accounting, amount(value, field))


# ---- queries -----------------------------------------------------------------------------------


def _value(message: pb.Value, variable: str) -> str | int:
    kind = message.WhichOneof("kind")
    if kind == "integer":
        return int(message.integer)
    if kind == "text":
        # Whether the text is a code ("²" is not an integer) is the codebook's rule, applied
        # to every value when the query is planned.
        return text(message.text, f"value of {variable}", limit=MAX_VALUE_LENGTH)
    raise MalformedRequestError(f"a value of {variable} is empty: set text or integer")


def _measure_filter_trees(query: pb.Query) -> list[pb.Filter]:
    trees = []
    if query.HasField("where"):
        trees.append(query.where)
    if query.measure.WhichOneof("kind") == "proportion":
        trees.append(query.measure.proportion.condition)
    return trees


def _check_shape(trees: Iterable[pb.Filter], settings: Settings) -> None:
    """Bound a filter tree's depth, terms and size without recursion, before building it."""
    nodes = 0
    values = 0
    for tree in trees:
        terms = 0
        stack: list[tuple[pb.Filter, int]] = [(tree, 1)]
        while stack:
            node, depth = stack.pop()
            nodes += 1
            if nodes > MAX_FILTER_NODES:
                raise LimitExceededError(f"the query holds more than {MAX_FILTER_NODES} filters")
            if depth > settings.max_filter_depth:
                raise LimitExceededError.filter_depth(settings.max_filter_depth)
            kind = node.WhichOneof("kind")
            if kind == "negation":
                stack.append((node.negation.operand, depth + 1))
            elif kind in ("all_of", "any_of"):
                operands = getattr(node, kind).operands
                stack.extend((child, depth + 1) for child in operands)
            else:
                terms += 1
                if kind == "in_set":
                    values += len(node.in_set.values)
            if terms > settings.max_filter_terms:
                raise LimitExceededError.filter_terms(settings.max_filter_terms)
            if values > MAX_IN_VALUES:
                raise LimitExceededError(f"filters list more than {MAX_IN_VALUES} values")


def filter_from_pb(message: pb.Filter) -> Filter:
    """A filter (its shape already bounded by `_check_shape`)."""
    kind = message.WhichOneof("kind")
    if kind == "equals":
        variable = name(message.equals.variable, "equals.variable")
        if not message.equals.HasField("value"):
            raise MalformedRequestError(f"equals on {variable} has no value")
        return Eq(variable, _value(message.equals.value, variable))
    if kind == "in_set":
        variable = name(message.in_set.variable, "in_set.variable")
        return In(variable, [_value(v, variable) for v in message.in_set.values])
    if kind == "between":
        variable = name(message.between.variable, "between.variable")
        low = message.between.low if message.between.HasField("low") else None
        high = message.between.high if message.between.HasField("high") else None
        return Range(variable, low, high)
    if kind == "is_missing":
        return IsMissing(name(message.is_missing.variable, "is_missing.variable"))
    if kind == "negation":
        if not message.negation.HasField("operand"):
            raise MalformedRequestError("a negation has no operand")
        return Not(filter_from_pb(message.negation.operand))
    if kind == "all_of":
        return And(*(filter_from_pb(o) for o in message.all_of.operands))
    if kind == "any_of":
        return Or(*(filter_from_pb(o) for o in message.any_of.operands))
    raise MalformedRequestError("a filter is empty: set one of its kinds")


def _measure_from_pb(message: pb.Measure) -> Measure:
    kind = message.WhichOneof("kind")
    if kind == "count":
        return Count()
    if kind == "flag_counts":
        return FlagCounts(name(message.flag_counts.flag_set, "flag_counts.flag_set"))
    if kind == "sum":
        return Sum(name(message.sum.variable, "sum.variable"))
    if kind == "mean":
        return Mean(name(message.mean.variable, "mean.variable"))
    if kind == "proportion":
        if not message.proportion.HasField("condition"):
            raise MalformedRequestError("a proportion needs a condition")
        return Proportion(filter_from_pb(message.proportion.condition))
    raise MalformedRequestError(
        "the query has no measure: set count, flag_counts, sum, mean or proportion"
    )


def query_from_pb(message: pb.Query, settings: Settings) -> Query:
    """The engine's query for a wire query, after bounded checks of its size."""
    if len(message.by) > settings.max_dimensions:
        raise LimitExceededError(
            f"{len(message.by)} group-by dimensions exceed the maximum of {settings.max_dimensions}"
        )
    _check_shape(_measure_filter_trees(message), settings)
    by = [name(b, "by") for b in message.by]
    measure = _measure_from_pb(message.measure)
    where = filter_from_pb(message.where) if message.HasField("where") else None
    return Query(measure, by=by, where=where)


def filter_to_pb(f: Filter) -> pb.Filter:
    """The wire form of an engine filter (used by clients' tests and round-trip checks)."""
    if isinstance(f, Eq):
        return pb.Filter(equals=pb.Equals(variable=f.variable, value=value_to_pb(f.value)))
    if isinstance(f, In):
        return pb.Filter(
            in_set=pb.InSet(variable=f.variable, values=[value_to_pb(v) for v in f.values])
        )
    if isinstance(f, Range):
        return pb.Filter(between=pb.Between(variable=f.variable, low=f.low, high=f.high))
    if isinstance(f, IsMissing):
        return pb.Filter(is_missing=pb.IsMissing(variable=f.variable))
    if isinstance(f, Not):
        return pb.Filter(negation=pb.Negation(operand=filter_to_pb(f.operand)))
    if isinstance(f, And):
        return pb.Filter(all_of=pb.AllOf(operands=[filter_to_pb(o) for o in f.operands]))
    return pb.Filter(any_of=pb.AnyOf(operands=[filter_to_pb(o) for o in f.operands]))


def value_to_pb(value: str | int) -> pb.Value:
    return pb.Value(integer=value) if isinstance(value, int) else pb.Value(text=value)


def query_to_pb(query: Query) -> pb.Query:
    measure = query.measure
    if isinstance(measure, Count):
        m = pb.Measure(count=pb.CountMeasure())
    elif isinstance(measure, FlagCounts):
        m = pb.Measure(flag_counts=pb.FlagCountsMeasure(flag_set=measure.flag_set))
    elif isinstance(measure, Sum):
        m = pb.Measure(sum=pb.SumMeasure(variable=measure.variable))
    elif isinstance(measure, Mean):
        m = pb.Measure(mean=pb.MeanMeasure(variable=measure.variable))
    else:
        m = pb.Measure(proportion=pb.ProportionMeasure(condition=filter_to_pb(measure.condition)))
    out = pb.Query(measure=m, by=list(query.by))
    if query.where is not None:
        out.where.CopyFrom(filter_to_pb(query.where))
    return out


# ---- the codebook ------------------------------------------------------------------------------


def variable_to_pb(variable: Variable) -> pb.Variable:
    out = pb.Variable(
        name=variable.name,
        kind=_KIND_TO_PB[variable.kind],
        definition=variable.definition,
        missing=variable.missing,
        unknown_code=variable.unknown_code or "",
        flag_set=variable.flag_set or "",
        queryable=variable.stored,
    )
    if variable.number is not None:
        out.number = int(variable.number)
    if variable.low is not None and variable.high is not None:
        out.low, out.high = variable.low, variable.high
    if variable.kind is Kind.CATEGORY:
        out.categories.extend(
            pb.Category(code=c.code, label=c.label, description=c.description)
            for c in variable.categories
        )
    elif variable.kind is Kind.COUNTRY:
        out.categories.extend(
            pb.Category(code=str(code), label=variable.label_of(code)) for code in variable.codes
        )
    return out


def flag_set_to_pb(flag_set: FlagSet) -> pb.FlagSet:
    return pb.FlagSet(
        name=flag_set.name, label=flag_set.label, flags=list(flag_set.flags),
        definition=flag_set.definition,
    )


def derived_to_pb(derived: DerivedDimension) -> pb.DerivedDimension:
    return pb.DerivedDimension(
        name=derived.name,
        source=derived.source,
        kind=derived.kind.value,
        definition=derived.definition,
        groups=list(derived.groups),
        group_of={str(code): group for code, group in derived.mapping.items()},
    )


def codebook_to_pb(codebook: Codebook) -> pb.Codebook:
    unit = codebook.privacy_unit
    return pb.Codebook(
        name=codebook.name,
        version=codebook.version,
        title=codebook.title,
        description=codebook.description,
        privacy_unit=pb.PrivacyUnit(
            description=unit.description,
            id_column=unit.id_column or "",
            max_rows_per_person=unit.max_rows_per_person,
        ),
        min_cell_size=codebook.min_cell_size,
        variables=[variable_to_pb(v) for v in codebook.variables],
        flag_sets=[flag_set_to_pb(f) for f in codebook.flag_sets],
        derived=[derived_to_pb(d) for d in codebook.derived],
    )


def describe(codebook: Codebook, item: str) -> pb.DescribeVariableResponse:
    item = name(item, "name")
    for variable in codebook.variables:
        if variable.name == item:
            return pb.DescribeVariableResponse(variable=variable_to_pb(variable))
    for flag_set in codebook.flag_sets:
        if flag_set.name == item:
            return pb.DescribeVariableResponse(flag_set=flag_set_to_pb(flag_set))
    for derived in codebook.derived:
        if derived.name == item:
            return pb.DescribeVariableResponse(derived=derived_to_pb(derived))
    raise InvalidQueryError(
        f"unknown variable, flag set or derived dimension {_shown(item)}", variable=item
    )


def deployment_to_pb(
    settings: Settings, *, data_version: str, max_request_bytes: int, max_response_bytes: int
) -> pb.Deployment:
    return pb.Deployment(
        accounting=ACCOUNTING_TO_PB[settings.accounting],
        k=settings.k,
        beta=settings.beta,
        confidence=settings.confidence,
        max_cells=settings.max_cells,
        max_dimensions=settings.max_dimensions,
        max_filter_depth=settings.max_filter_depth,
        max_filter_terms=settings.max_filter_terms,
        data_version=data_version,
        max_request_bytes=max_request_bytes,
        max_response_bytes=max_response_bytes,
    )


# ---- dry runs and releases ---------------------------------------------------------------------


def dry_run_to_pb(
    dry: DryRun, *, already_released: bool, earlier_release: pb.EarlierRelease | None = None
) -> pb.DryRunResponse:
    """A dry run on the wire; `earlier_release`, the caller's newest release of the same query
    on another data version, is left absent when None."""
    return pb.DryRunResponse(
        loss=format_amount(dry.loss.amount),
        accounting=ACCOUNTING_TO_PB[dry.loss.accounting],
        cells=dry.cells,
        mechanism=dry.mechanism,
        noise_scale=dry.noise_scale,
        tau=dry.tau,
        half_width=dry.half_width,
        confidence=dry.confidence,
        assumed_count=dry.assumed_count,
        expected_suppressed_share=dry.expected_suppressed_share,
        fingerprint=dry.fingerprint,
        already_released=already_released,
        measure=dry.measure,
        value_half_width=dry.value_half_width,
        data_version=dry.data_version,
        # None leaves an optional field absent: a stored release made before these were recorded
        # is what would be returned.
        empty_pass_probability=dry.empty_pass_probability,
        expected_empty_published_bound=dry.expected_empty_published_bound,
        unreachable_cells=dry.unreachable_cells,
        earlier_release=earlier_release,
    )


def release_to_pb(release: Release, *, charged: str = "") -> pb.ReleaseResponse:
    m = release.metadata
    metadata = pb.ReleaseMetadata(
        release_id=m.release_id,
        charge_id=m.charge_id,
        created_at=m.created_at,
        fingerprint=m.fingerprint,
        canonical_query=m.canonical_query,
        data_version=m.data_version,
        codebook=m.codebook,
        measure=m.measure,
        mechanism=m.mechanism,
        accounting=ACCOUNTING_TO_PB[Accounting(m.accounting)],
        loss=m.loss,
        measured_loss=m.measured_loss,
        noise_scale=m.noise_scale,
        tau=m.tau,
        k=m.k,
        beta=m.beta,
        confidence=m.confidence,
        cells=m.cells,
        suppressed_cells=m.suppressed_cells,
        # None leaves an optional field absent: a release stored before these were recorded is
        # sent as it was made.
        sum_noise_scale=m.sum_noise_scale,
        unreachable_cells=m.unreachable_cells,
        empty_pass_probability=m.empty_pass_probability,
        expected_empty_published_bound=m.expected_empty_published_bound,
    )
    return pb.ReleaseResponse(metadata=metadata, arrow_ipc=release.to_bytes(), charged=charged)


def amount_text(value: Fraction | str | None) -> str:
    """An exact amount as text ("" for none)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return format_amount(parse_amount(value)) if value else ""
    return format_amount(value)


def role_from_pb(value: Any) -> Role:
    try:
        return ROLE_FROM_PB[value]
    except KeyError:
        raise MalformedRequestError(
            "role must be ROLE_RESEARCHER, ROLE_AUDITOR or ROLE_ADMIN"
        ) from None
