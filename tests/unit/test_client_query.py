"""The client's query builder: immutable, fluent, and the wire form it sends."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

import client
from client import And, Eq, In, Missing, Not, Or, Present, Range
from client.codebook import Codebook
from client.connection import decimal_text, is_loopback
from client.query import Count, FlagCounts, Proportion, Query, count, flag_counts, proportion
from engine.codebook import default_codebook
from protos.veil.v1 import veil_pb2 as pb
from server.convert import codebook_to_pb


@pytest.fixture(scope="module")
def book() -> Codebook:
    response = pb.GetCodebookResponse(
        codebook=codebook_to_pb(default_codebook()),
        deployment=pb.Deployment(accounting=pb.ACCOUNTING_PURE_DP, k=10, confidence=0.95),
    )
    return Codebook.from_pb(response)


def test_builder_is_immutable_and_accumulates() -> None:
    base = count()
    grouped = base.by("gender")
    both = grouped.by("ageBroad").where(majorityStatus="Minor").where(isSexualExploit=1)
    assert base.dimensions == () and grouped.dimensions == ("gender",)
    assert both.dimensions == ("gender", "ageBroad")
    assert both.filter == And(Eq("majorityStatus", "Minor"), Eq("isSexualExploit", 1))
    assert count().by("gender, ageBroad") == count().by("gender", "ageBroad")
    assert count().by(["gender", "ageBroad"]) == count().by("gender").by("ageBroad")
    with pytest.raises(client.InvalidQuery) as error:
        count().by("gender").by("gender")
    assert error.value.variable == "gender"
    with pytest.raises(client.InvalidQuery, match="GENDER appears twice in by"):
        count().by("gender", "GENDER")


def test_keyword_conditions() -> None:
    query = count().where(
        ageBroad=["0--8", "9--17"], gender=None, isForcedLabour=True, citizenship="PH"
    )
    assert query.filter == And(
        In("ageBroad", ["0--8", "9--17"]),
        Missing("gender"),
        Eq("isForcedLabour", 1),
        Eq("citizenship", "PH"),
    )
    assert count().where() == count()
    with pytest.raises(TypeError):
        count().where(gender=Eq("gender", "Male"))
    with pytest.raises(TypeError):
        count().where("gender = 'Male'")  # type: ignore[arg-type]


def test_operators_and_helpers() -> None:
    a, b = Eq("gender", "Male"), Range("yearOfRegistration", 2010, 2015)
    assert a & b == And(a, b)
    assert a | b == Or(a, b)
    assert ~a == Not(a)
    assert Present("gender") == Not(Missing("gender"))
    assert And(And(a, b), a).operands == (a, b, a)  # nested ANDs flatten
    assert str(Range("yearOfRegistration", low=2010)) == "yearOfRegistration >= 2010"
    assert str(Not(Missing("gender"))) == "gender IS NOT NULL"
    assert repr(In("ageBroad", ["0--8"])) == "In('ageBroad', ['0--8'])"
    with pytest.raises(client.InvalidQuery):
        Range("yearOfRegistration")
    with pytest.raises(client.InvalidQuery):
        In("gender", [])
    with pytest.raises(client.InvalidQuery):
        Eq("gender", 1.5)  # type: ignore[arg-type]


def test_wire_form() -> None:
    query = (
        flag_counts("meansOfControl")
        .by("majorityStatus")
        .where(In("majorityStatus", ["Minor", "Adult"]) | Missing("gender"))
    )
    message = query.to_pb()
    assert message.measure.flag_counts.flag_set == "meansOfControl"
    assert list(message.by) == ["majorityStatus"]
    operands = message.where.any_of.operands
    assert [v.text for v in operands[0].in_set.values] == ["Minor", "Adult"]
    assert operands[1].is_missing.variable == "gender"

    share = proportion(isSexualExploit=1).by("gender").to_pb()
    assert share.measure.proportion.condition.equals.value.integer == 1
    between = count().where(Range("yearOfRegistration", None, 2015)).to_pb()
    assert not between.where.between.HasField("low") and between.where.between.high == 2015
    assert client.Query(client.Sum("yearOfRegistration")).to_pb().measure.sum.variable
    assert client.Query(client.Mean("yearOfRegistration")).to_pb().measure.mean.variable
    with pytest.raises(client.InvalidQuery):
        proportion()


def test_text_forms() -> None:
    query = count().by("gender").where(majorityStatus="Minor", ageBroad=["0--8", "9--17"])
    assert str(query) == (
        "count by gender where majorityStatus = 'Minor' AND ageBroad IN ('0--8', '9--17')"
    )
    assert repr(query).startswith("<veil query count().by('gender').where(")
    assert str(Query(Proportion(Eq("isSexualExploit", 1)))) == (
        "proportion with isSexualExploit = 1"
    )
    assert str(Query(FlagCounts("sexType"))) == "flag counts of sexType"


def test_missing_in_a_list_says_what_to_write() -> None:
    with pytest.raises(client.InvalidQuery) as error:
        count().where(ageBroad=["0--8", None])
    assert error.value.variable == "ageBroad"
    assert str(error.value) == (
        "ageBroad: None (missing) cannot be one of a list's values; for these values or "
        "missing, write Or(In('ageBroad', ['0--8']), Missing('ageBroad'))"
    )


def test_sql_text_as_a_condition_points_to_parse_condition() -> None:
    with pytest.raises(TypeError, match=r"for SQL text, pass client.parse_condition\(\"gender"):
        count().where("gender = 'Male'")


def test_a_dimension_that_is_not_a_name_is_named() -> None:
    with pytest.raises(TypeError, match="a dimension is a codebook name, got 3"):
        count().by(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "by", [("",), (" ",), (",",), ("gender,",), ("gender", ""), (["gender", ""],)]
)
def test_an_empty_dimension_name_is_refused_not_dropped(by: tuple[str, ...]) -> None:
    """Dropped, it would release (and charge for) a table grouped by less than was written."""
    with pytest.raises(client.InvalidQuery, match="an empty name in the list of dimensions"):
        count().by(*by)


def test_unbound_queries_say_how_to_run_them() -> None:
    with pytest.raises(TypeError, match="not bound to a client"):
        count().release(epsilon=0.5)
    with pytest.raises(TypeError, match="not bound to a client"):
        count().dry_run(epsilon=0.5)


def test_normalised_names_and_values(book: Codebook) -> None:
    query = (
        count()
        .by("GENDER")
        .where(majoritystatus="Minor", isSexualExploit="1", yearOfRegistration="2015")
        .where(In("citizenshipregion", ["Asia"]))
    )
    fixed = query.normalized(book)
    assert fixed.dimensions == ("gender",)
    assert fixed.filter == And(
        Eq("majorityStatus", "Minor"),
        Eq("isSexualExploit", 1),
        Eq("yearOfRegistration", 2015),
        In("citizenshipRegion", ["Asia"]),
    )
    # Unknown names are left for the server to refuse, with the variable named.
    assert count().by("nope").normalized(book).dimensions == ("nope",)
    # A category value written as an integer becomes text.
    assert count().where(gender=3).normalized(book).filter == Eq("gender", "3")
    assert Query(Count()).normalized(book) == Query(Count())


@pytest.mark.parametrize(
    "text",
    [
        "\u0662\u0660\u0661\u0665",  # 2015 in Arabic-Indic digits
        "\uff12\uff10\uff11\uff15",  # 2015 in fullwidth digits
        "\u00b2",  # SUPERSCRIPT TWO
        "--5",
        "2015.0",
        "1" * 19,
        "abc",
    ],
)
def test_integer_text_is_ascii_digits_only(book: Codebook, text: str) -> None:
    for query in (
        count().where(yearOfRegistration=text),
        count().where(In("isSexualExploit", [text])),
    ):
        with pytest.raises(client.InvalidQuery, match="digits 0-9") as error:
            query.normalized(book)
        assert error.value.variable in ("yearOfRegistration", "isSexualExploit")
    assert count().where(yearOfRegistration=" -7 ").normalized(book).filter == Eq(
        "yearOfRegistration", -7
    )


def test_an_integer_the_wire_cannot_carry_is_refused_naming_the_variable() -> None:
    from client.sql import parse_sql

    too_large = 2**63
    for build in (
        lambda: count().where(yearOfRegistration=too_large),
        lambda: count().where(In("yearOfRegistration", [2015, -too_large - 1])),
        lambda: count().where(Range("yearOfRegistration", too_large, None)),
        lambda: parse_sql(f"SELECT COUNT(*) FROM t WHERE yearOfRegistration = {too_large}"),
        # > the largest int64 is a range from one above it
        lambda: parse_sql(f"SELECT COUNT(*) FROM t WHERE yearOfRegistration > {too_large - 1}"),
    ):
        with pytest.raises(client.InvalidQuery, match="out of range") as error:
            build()
        assert error.value.variable == "yearOfRegistration"
    assert count().where(yearOfRegistration=too_large - 1).to_pb().where.equals.value.integer == (
        too_large - 1)


def test_codebook_browsing(book: Codebook) -> None:
    gender = book["gender"]
    assert isinstance(gender, client.Variable) and gender.kind == "category"
    assert gender.codes == ["Male", "Female", "Transgender/NonConforming"]
    assert book["Gender"] is gender
    assert isinstance(book["meansOfControl"], client.FlagSet)
    assert isinstance(book["citizenshipRegion"], client.DerivedDimension)
    assert "gender" in book and "nope" not in book
    with pytest.raises(KeyError, match="did you mean gender"):
        book["gendr"]
    assert {item.name for item in book.search("recruit")} >= {
        "recruiterRelation", "recruiterRelationFamily"
    }
    assert "meansOfControl" in repr(book) and "<table" in book._repr_html_()
    assert "Transgender/NonConforming" in repr(gender)
    frame = book.to_pandas()
    assert {"name", "kind", "domain", "definition"} <= set(frame.columns)
    assert book.deployment.loss_name == "epsilon"
    # A region lists the countries it holds: what a filter or a roll-up by it means.
    region = book["citizenshipRegion"]
    assert isinstance(region, client.DerivedDimension)
    assert "FR" in region.members["Europe"] and "KE" in region.members["Africa"]
    assert sum(len(codes) for codes in region.members.values()) == len(region.group_of)
    shown = repr(region)
    assert f"Europe ({len(region.members['Europe'])}): AD, AL," in shown
    assert "  Unknown (1): 00" in shown


def test_losses_travel_as_exact_decimals() -> None:
    assert decimal_text(0.1) == "0.1"
    assert decimal_text(1e-5) == "0.00001"
    assert decimal_text(2) == "2"
    assert decimal_text("0.50") == "0.5"
    assert decimal_text(Decimal("0.125")) == "0.125"
    assert decimal_text(Fraction(1, 4)) == "0.25"
    for bad in (Fraction(1, 3), 0, -1, float("nan"), float("inf"), "abc", True, None):
        with pytest.raises(client.InvalidQuery):
            decimal_text(bad)


def test_numpy_numbers_are_read_as_the_numbers_they_are() -> None:
    # A loss split computed with numpy: np.float64 is a float whose repr is "np.float64(0.5)",
    # and numpy's integers are not ints at all.
    import numpy as np

    from client.connection import _half_width

    assert decimal_text(np.float64(0.5)) == "0.5"
    assert decimal_text(np.float64(0.1)) == "0.1"
    assert decimal_text(np.int64(2)) == "2"
    assert decimal_text(np.float32(0.25)) == "0.25"  # exact in binary
    with pytest.raises(client.InvalidQuery, match="15"):
        decimal_text(np.float32(0.1))  # 0.100000001490116...: not what anyone asked for
    assert _half_width(np.int64(5)) == 5 and type(_half_width(np.int64(5))) is int
    with pytest.raises(client.InvalidQuery, match="value_half_width"):
        _half_width(0.05)  # type: ignore[arg-type]


def test_loopback_detection_decides_the_default_tls() -> None:
    for address in ("localhost:50051", "127.0.0.1:1", "[::1]:50051", "unix:/tmp/veil.sock",
                    "dns:///localhost:50051", "ipv4:///127.0.0.1:1,127.0.0.2:2",
                    "ipv6:///[::1]:50051", "dns:localhost:50051", "ipv4:127.0.0.1:1"):
        assert is_loopback(address), address
    for address in ("veil.example.org:443", "10.0.0.1:50051", "[2001:db8::1]:50051",
                    "dns:///veil.example.org:443", "ipv4:///127.0.0.1:1,10.0.0.1:2",
                    "dns://127.0.0.1/veil.example.org:443", "xds:///veil-service",
                    "dns://8.8.8.8/localhost:50051"):
        assert not is_loopback(address), address


def test_a_loss_is_sent_in_the_one_form_the_server_reads() -> None:
    from server.convert import amount

    # Exponent notation is read as the number it writes; the wire gets plain decimal text.
    for value, exact in (("1e-1", Fraction(1, 10)), (1e-6, Fraction(1, 10**6)),
                         ("1E+2", Fraction(100)), (Decimal("2.50E+1"), Fraction(25)),
                         (Fraction(3, 10), Fraction(3, 10)),
                         ("0.300000000000000", Fraction(3, 10))):
        assert amount(decimal_text(value), "loss") == exact, value


def test_float_arithmetic_is_refused_with_what_to_pass_instead() -> None:
    with pytest.raises(client.InvalidQuery) as error:
        decimal_text(0.1 + 0.2, "epsilon")
    message = str(error.value)
    assert "0.30000000000000004" in message and "float arithmetic" in message
    assert "decimal text such as '0.3' or a Fraction" in message and "exponent" not in message
    with pytest.raises(client.InvalidQuery, match="at most 15 decimal places"):
        decimal_text("0.30000000000000004")
    with pytest.raises(client.InvalidQuery, match="decimal places"):
        decimal_text("1e-999999999")  # refused before it is written out
    with pytest.raises(client.InvalidQuery, match="too large"):
        decimal_text("1e20")


def test_a_flag_set_where_a_variable_belongs_names_the_flag_set_count(book: Codebook) -> None:
    with pytest.raises(client.InvalidQuery) as error:
        count().by("meansOfControl").normalized(book)
    assert error.value.variable == "meansOfControl"
    assert 'veil_client.flag_counts("meansOfControl")' in str(error.value)
    with pytest.raises(client.InvalidQuery) as error:
        count().by("gender", "MEANSOFCONTROL").normalized(book)
    assert 'flag_counts("meansOfControl").by("gender")' in str(error.value)
    with pytest.raises(client.InvalidQuery, match="put one of its flags in the condition"):
        count().where(meansOfControl=1).normalized(book)
    with pytest.raises(client.InvalidQuery, match="not an integer variable"):
        client.query.sum_of("sexType").normalized(book)
    from dataclasses import replace

    with pytest.raises(client.InvalidQuery, match="--flag-counts meansOfControl --by gender"):
        replace(count().by("meansOfControl", "gender"), spelling="cli").normalized(book)
    # A flag of the set is a variable, and stays one.
    assert count().by("isSexualExploit").normalized(book).dimensions == ("isSexualExploit",)


def test_a_misspelt_name_in_a_query_names_the_close_ones(book: Codebook) -> None:
    for query in (
        count().where(majorityStatuss="Minor"),
        count().by("gender", "majoritystatuss"),
        proportion(In("majorityStatuss", ["Minor"])),
    ):
        with pytest.raises(client.InvalidQuery) as error:
            query.normalized(book)
        assert error.value.variable is not None
        assert error.value.variable.lower() == "majoritystatuss"
        assert "did you mean majorityStatus" in str(error.value)
    with pytest.raises(client.InvalidQuery, match="did you mean meansOfControl"):
        flag_counts("meansOfControll").normalized(book)


def test_unknown_names_suggest_the_closest_regardless_of_case(book: Codebook) -> None:
    with pytest.raises(KeyError, match="did you mean gender"):
        book["GENDR"]
    assert book.suggest("AGEBROAD") == ["ageBroad"]
    assert book.suggest("zzzz") == []


def test_a_canonical_query_reads_back_as_a_researcher_writes_it() -> None:
    import json

    from client.query import query_of_canonical

    def back(measure: object, where: object = True, by: tuple[str, ...] = ()) -> str:
        text = json.dumps({"measure": measure, "by": list(by), "where": where, "codebook": "c"})
        return str(query_of_canonical(text))

    def atom(var: str, codes: list[object], missing: bool = False) -> dict[str, object]:
        return {"var": var, "in": codes, "missing": missing}

    assert back("count", by=("ageBroad", "gender")) == "count by ageBroad, gender"
    assert back("count", atom("gender", ["Female", "Transgender/NonConforming"], True)) == (
        "count where gender IN ('Female', 'Transgender/NonConforming') OR gender IS NULL"
    )
    assert back({"mean": "yearOfRegistration"}, atom("yearOfRegistration", [2011, 2010, 2012])) == (
        "mean of yearOfRegistration where yearOfRegistration BETWEEN 2010 AND 2012"
    )
    assert back({"sum": "age"}, atom("age", [30, 4, 10])) == "sum of age where age IN (4, 10, 30)"
    nested = {"and": [atom("gender", ["Male"]), {"or": [atom("isForcedLabour", [1]),
                                                         atom("ageBroad", [], True)]}]}
    assert back({"proportion": atom("isSexualExploit", [1])}, nested) == (
        "proportion with isSexualExploit = 1 where gender = 'Male' AND "
        "(isForcedLabour = 1 OR ageBroad IS NULL)"
    )
    assert back({"flag_counts": "meansOfControl"}) == "flag counts of meansOfControl"
    assert query_of_canonical(json.dumps({"measure": "count", "by": [], "where": False})) is None
    assert query_of_canonical("not json") is None


def test_a_name_or_condition_of_the_wrong_type_is_a_type_error_naming_it(book: Codebook) -> None:
    from client.query import mean, sum_of

    for build, says in (
        (lambda: flag_counts(None), "flag_counts' flag set is a codebook name"),  # type: ignore[arg-type]
        (lambda: sum_of(None), "sum's variable is a codebook name"),  # type: ignore[arg-type]
        (lambda: mean(None), "mean's variable is a codebook name"),  # type: ignore[arg-type]
        (lambda: Not(None), "expected a condition"),  # type: ignore[arg-type]
        (lambda: Missing(3), "a condition's variable is a codebook name"),  # type: ignore[arg-type]
        (lambda: book.find(None), "a codebook name is text"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=says):
            build()
    with pytest.raises(client.InvalidQuery, match="flag set is empty"):
        flag_counts(" ")


def test_arguments_the_wire_cannot_carry_are_refused_before_any_call() -> None:
    from client.connection import _half_width

    # A server nobody listens on: every refusal here comes before a call is made.
    veil_client = client.Client("127.0.0.1:1", token="veil_x", retry=client.Retry(attempts=1))
    checks: list[tuple[object, type[Exception], str]] = [
        (lambda: veil_client.releases(limit=2**40), client.InvalidQuery,
         "limit is .* an integer from 0 to 2147483647"),
        (lambda: veil_client.releases(limit=-1), client.InvalidQuery, "limit is"),
        (lambda: veil_client.releases(limit=1.5), client.InvalidQuery, "limit is"),
        (lambda: veil_client.get_release(123), TypeError, "release_id is .* got int"),
        (lambda: veil_client.release(count(), epsilon=1, request_id=123), TypeError,
         "request_id is .* got int"),
        (lambda: veil_client.release(count(), epsilon=1, request_id=""), client.InvalidQuery,
         "request_id is empty"),
        (lambda: veil_client.dry_run(count(), epsilon=1, assumed_count=1.5), client.InvalidQuery,
         "assumed_count is .* from 0 to 9223372036854775807, got 1.5"),
        (lambda: veil_client.dry_run(count(), epsilon=1, assumed_count="5"), client.InvalidQuery,
         "assumed_count is"),
        (lambda: veil_client.dry_run(count(), epsilon=1, assumed_count=2**63),
         client.InvalidQuery, "assumed_count is"),
        (lambda: _half_width(2**63), client.InvalidQuery, "half_width .*at most"),
        (lambda: client.connect("127.0.0.1:1", token=123), TypeError,  # type: ignore[arg-type]
         "token must be text"),
    ]
    for call, kind, says in checks:
        with pytest.raises(kind, match=says):
            call()  # type: ignore[operator]


def test_a_server_port_a_timeout_or_a_token_that_cannot_work_is_refused_at_once() -> None:
    from client.connection import check_token

    for address in ("127.0.0.1:99999", "localhost:0", "[::1]:65536", "ipv4:///127.0.0.1:0"):
        with pytest.raises(ValueError, match="a port is a number from 1 to 65535"):
            client.Client(address, token="veil_x")
    # With no port, gRPC dialled 443 without a word.
    for address in ("veil.example.org", "localhost", "[::1]", "dns:///veil.example.org",
                    "ipv4:///127.0.0.1:50051,127.0.0.2", "dns://8.8.8.8/veil.example.org"):
        with pytest.raises(ValueError, match=r"has no port; give HOST:PORT \(.* on port 50051"):
            client.Client(address, token="veil_x")
    # A bare IPv6 address: gRPC dialled ::1 on 443, and read ::1:50051 as a malformed name.
    for address in ("::1", "::1:50051", "2001:db8::1:50051"):
        with pytest.raises(ValueError, match=r"without brackets; give \[ADDRESS\]:PORT"):
            client.Client(address, token="veil_x")
    # What the client does not read is left to gRPC; the forms it reads are taken.
    for address in ("xds:///veil-service", "dns:localhost:50051", "ipv4:127.0.0.1:1",
                    "dns://8.8.8.8/veil.example.org:443", "[::1]:50051"):
        client.Client(address, token="veil_x").close()
    for timeout in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            client.Client("127.0.0.1:1", token="veil_x", timeout=timeout)
    for token in ("veil_caf\u00e9", "\ufeffveil_x", "veil_a\x00b"):
        with pytest.raises(client.AuthenticationError, match="printable ASCII") as error:
            client.Client("127.0.0.1:1", token=token)
        assert token.strip("\ufeff") not in str(error.value)  # the token is not shown
    assert check_token(" veil_x\n") == "veil_x"
    client.Client("[::1]:50051", token="veil_x", timeout=0.5).close()


def test_a_call_timeout_is_checked_as_the_client_one_is() -> None:
    # 0 is not "the default", and a negative or nan one is not a 1 ms deadline: each is refused
    # before anything is sent, as connect(timeout=) refuses it; None is the client's timeout.
    veil_client = client.Client("127.0.0.1:1", token="veil_x", timeout=7.0)
    deadlines: list[float] = []

    class Stub:
        def GetBudget(self, request: object, *, metadata: object, timeout: float) -> pb.Budget:
            deadlines.append(timeout)
            return pb.Budget(client_id="x")

    veil_client._stub = Stub()
    query = count().by("gender")
    for timeout in (0, -1, float("nan"), float("inf")):
        for call in (veil_client.release, veil_client.dry_run):
            with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
                call(query, epsilon="0.3", timeout=timeout)
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            veil_client._call("GetBudget", pb.GetBudgetRequest(), timeout=timeout)
    with pytest.raises(TypeError, match="timeout is a number of seconds, got str"):
        veil_client.release(query, epsilon="0.3", timeout="5")  # type: ignore[arg-type]
    assert deadlines == []
    veil_client._call("GetBudget", pb.GetBudgetRequest())
    veil_client._call("GetBudget", pb.GetBudgetRequest(), timeout=2)
    assert 6.9 < deadlines[0] <= 7.0 and 1.9 < deadlines[1] <= 2.0
    veil_client.close()


def test_a_call_on_a_closed_client_raises_a_veil_error() -> None:
    with client.Client("127.0.0.1:1", token="veil_x") as veil_client:
        pass
    for call in (veil_client.budget, veil_client.codebook, lambda: veil_client.releases(5)):
        with pytest.raises(client.ClientClosed, match="this client is closed") as error:
            call()
        assert isinstance(error.value, client.VeilError)
    veil_client.close()  # closing again does nothing


def test_a_mean_or_sum_of_a_flag_says_what_asks_for_it(book: Codebook) -> None:
    from client.query import mean
    from client.sql import parse_sql

    codebook = book
    with pytest.raises(client.InvalidQuery, match=r"isAbduction is a flag \(0/1\).*share of "
                       r"records with it set: ask for PROPORTION\(isAbduction = 1\)") as error:
        parse_sql("SELECT AVG(isAbduction) FROM victims").normalized(codebook)
    assert error.value.variable == "isAbduction"
    with pytest.raises(client.InvalidQuery, match=r"ask for proportion\(isAbduction=1\)"):
        mean("ISABDUCTION").normalized(codebook)
    with pytest.raises(client.InvalidQuery, match=r"ask for COUNT\(\*\) ... WHERE isAbduction = 1"):
        parse_sql("SELECT gender, SUM(isAbduction) FROM victims GROUP BY gender").normalized(
            codebook)
    assert mean("yearOfRegistration").normalized(codebook).measure == client.Mean(
        "yearOfRegistration")
