"""Protobuf <-> engine conversion and the checks made on every value read from a request."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codebook import default_codebook
from engine.errors import InvalidLossError, InvalidQueryError, LimitExceededError, VeilError
from engine.loss import Accounting, PrivacyLoss
from engine.planner import plan_query
from engine.query import (
    And,
    Count,
    Eq,
    FlagCounts,
    In,
    IsMissing,
    Mean,
    Not,
    Or,
    Proportion,
    Query,
    Range,
    Sum,
)
from engine.settings import Settings
from protos.veil.v1 import veil_pb2 as pb
from server import convert
from server.errors import MalformedRequestError

SETTINGS = Settings()
CODEBOOK = default_codebook()

QUERIES = [
    Query(Count(), by=("gender", "ageBroad")),
    Query(FlagCounts("meansOfControl"), by=("citizenshipRegion",)),
    Query(Sum("yearOfRegistration")),
    Query(Mean("yearOfRegistration"), by=("gender",), where=IsMissing("ageBroad")),
    Query(
        Proportion(Or(Eq("gender", "Female"), Not(In("citizenship", ["PH", "US"])))),
        by=("majorityFromAge",),
        where=And(Range("yearOfRegistration", 2010, None), Eq("isForcedLabour", 1)),
    ),
]


@pytest.mark.parametrize("query", QUERIES)
def test_queries_round_trip(query: Query) -> None:
    wire = convert.query_to_pb(query)
    again = convert.query_from_pb(pb.Query.FromString(wire.SerializeToString()), SETTINGS)
    assert again == query


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5", Fraction(1, 2)),
        ("1", Fraction(1)),
        ("0.1", Fraction(1, 10)),
        ("100", Fraction(100)),
        ("0.000001", Fraction(1, 10**6)),
    ],
)
def test_amounts_are_exact(text: str, expected: Fraction) -> None:
    assert convert.amount(text, "loss") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "NaN",
        "nan",
        "inf",
        "-inf",
        "-1",
        "-0.5",
        "+1",
        "1e-99999999",
        "1e3",
        "0x10",
        "1/2",
        " 1",
        "1 ",
        "1.",
        ".5",
        "\u0661",  # ARABIC-INDIC DIGIT ONE
        "0.5\x00",
        "0.5\n",
        "9" * 40,
    ],
)
def test_amounts_refused_before_any_arithmetic(text: str) -> None:
    start = time.perf_counter()
    with pytest.raises((MalformedRequestError, InvalidLossError)):
        convert.amount(text, "loss")
    assert time.perf_counter() - start < 0.05


@pytest.mark.parametrize("text", ["0", "1000", "0.0000001"])
def test_amounts_out_of_range(text: str) -> None:
    with pytest.raises((InvalidLossError, MalformedRequestError)):
        convert.amount(text, "loss")
    assert convert.amount("0", "budget", allow_zero=True) == 0


def test_loss_uses_the_deployment_accounting() -> None:
    assert convert.loss("0.5", Settings(accounting=Accounting.ZCDP)).accounting is Accounting.ZCDP


@pytest.mark.parametrize("value", ["", "a" * 129, "a b", "-x", "x\n", "é", "' OR 1=1--"])
def test_request_ids(value: str) -> None:
    with pytest.raises(MalformedRequestError):
        convert.request_id(value)
    assert convert.request_id("r-1.2:3_x") == "r-1.2:3_x"


def test_filter_shapes_are_bounded_without_recursion() -> None:
    deep = pb.Filter(is_missing=pb.IsMissing(variable="gender"))
    for _ in range(SETTINGS.max_filter_depth):
        deep = pb.Filter(negation=pb.Negation(operand=deep))
    with pytest.raises(LimitExceededError, match="depth"):
        convert.query_from_pb(
            pb.Query(measure=pb.Measure(count=pb.CountMeasure()), where=deep), SETTINGS
        )
    wide = pb.Filter(
        all_of=pb.AllOf(operands=[pb.Filter(is_missing=pb.IsMissing(variable="gender"))] * 65)
    )
    with pytest.raises(LimitExceededError, match="terms"):
        convert.query_from_pb(
            pb.Query(measure=pb.Measure(count=pb.CountMeasure()), where=wide), SETTINGS
        )
    values = pb.Filter(
        in_set=pb.InSet(variable="citizenship", values=[pb.Value(text="PH")] * 10_001)
    )
    with pytest.raises(LimitExceededError, match="values"):
        convert.query_from_pb(
            pb.Query(measure=pb.Measure(count=pb.CountMeasure()), where=values), SETTINGS
        )
    by = pb.Query(measure=pb.Measure(count=pb.CountMeasure()), by=["gender"] * 5)
    with pytest.raises(LimitExceededError, match="dimensions"):
        convert.query_from_pb(by, SETTINGS)


def test_long_values_are_not_echoed() -> None:
    where = pb.Filter(equals=pb.Equals(variable="gender", value=pb.Value(text="x" * 300)))
    with pytest.raises(MalformedRequestError) as error:
        convert.query_from_pb(
            pb.Query(measure=pb.Measure(count=pb.CountMeasure()), where=where), SETTINGS
        )
    assert "x" * 100 not in str(error.value)


@pytest.mark.parametrize("value", ["²", "\u0661\u0662"])  # SUPERSCRIPT TWO, ARABIC-INDIC 12
def test_non_ascii_digits_are_not_integers(value: str) -> None:
    where = pb.Filter(equals=pb.Equals(variable="yearOfRegistration", value=pb.Value(text=value)))
    query = convert.query_from_pb(
        pb.Query(measure=pb.Measure(count=pb.CountMeasure()), where=where), SETTINGS
    )
    with pytest.raises(InvalidQueryError, match="not an integer"):
        plan_query(query, CODEBOOK, SETTINGS, PrivacyLoss.pure("0.5"))


def test_codebook_round_trip_keeps_every_name_and_domain() -> None:
    wire = convert.codebook_to_pb(CODEBOOK)
    assert [v.name for v in wire.variables] == [v.name for v in CODEBOOK.variables]
    citizenship = next(v for v in wire.variables if v.name == "citizenship")
    assert citizenship.unknown_code == "00" and len(citizenship.categories) == 250
    assert citizenship.categories[0].label == "Unknown country"
    assert [d.name for d in wire.derived] == [d.name for d in CODEBOOK.derived]
    assert convert.describe(CODEBOOK, "majorityFromAge").derived.groups == ["Minor", "Adult"]


# Any query message the server can be sent either converts or raises one of the engine's or the
# server's own errors: nothing else escapes (anything else would be a fault, INTERNAL).
names = st.sampled_from(
    [
        "gender",
        "ageBroad",
        "yearOfRegistration",
        "citizenship",
        "nope",
        "citizenshipRegion",
        "isForcedLabour",
        "",
        "meansOfControlConcatenated",
    ]
)
values = st.one_of(
    st.builds(pb.Value, text=st.text(max_size=8)),
    st.builds(pb.Value, integer=st.integers(-(2**63), 2**63 - 1)),
    st.just(pb.Value()),
)
leaves = st.one_of(
    st.builds(lambda n, v: pb.Filter(equals=pb.Equals(variable=n, value=v)), names, values),
    st.builds(
        lambda n, vs: pb.Filter(in_set=pb.InSet(variable=n, values=vs)),
        names,
        st.lists(values, max_size=3),
    ),
    st.builds(
        lambda n, lo, hi: pb.Filter(between=pb.Between(variable=n, low=lo, high=hi)),
        names,
        st.one_of(st.none(), st.integers(-5000, 5000)),
        st.one_of(st.none(), st.integers(-5000, 5000)),
    ),
    st.builds(lambda n: pb.Filter(is_missing=pb.IsMissing(variable=n)), names),
    st.just(pb.Filter()),
)
filters = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(lambda f: pb.Filter(negation=pb.Negation(operand=f)), inner),
        st.builds(lambda fs: pb.Filter(all_of=pb.AllOf(operands=fs)), st.lists(inner, max_size=3)),
        st.builds(lambda fs: pb.Filter(any_of=pb.AnyOf(operands=fs)), st.lists(inner, max_size=3)),
    ),
    max_leaves=10,
)
measures = st.one_of(
    st.just(pb.Measure(count=pb.CountMeasure())),
    st.builds(
        lambda n: pb.Measure(flag_counts=pb.FlagCountsMeasure(flag_set=n)),
        st.sampled_from(["meansOfControl", "sexType", "gender", ""]),
    ),
    st.builds(lambda n: pb.Measure(sum=pb.SumMeasure(variable=n)), names),
    st.builds(lambda n: pb.Measure(mean=pb.MeanMeasure(variable=n)), names),
    st.builds(lambda f: pb.Measure(proportion=pb.ProportionMeasure(condition=f)), filters),
    st.just(pb.Measure()),
)


@settings(max_examples=400, deadline=None)
@given(measure=measures, by=st.lists(names, max_size=5), where=st.one_of(st.none(), filters))
def test_any_query_message_converts_or_is_refused_plainly(
    measure: pb.Measure, by: list[str], where: pb.Filter | None
) -> None:
    from engine.loss import PrivacyLoss
    from engine.planner import plan_query

    message = pb.Query(measure=measure, by=by)
    if where is not None:
        message.where.CopyFrom(where)
    try:
        query = convert.query_from_pb(message, SETTINGS)
        plan_query(query, CODEBOOK, SETTINGS, PrivacyLoss.pure("1"))
    except (VeilError, MalformedRequestError):
        pass
