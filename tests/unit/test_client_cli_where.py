"""How the shell reads --where and --proportion: NAME=VALUE for codebook values (which may hold
spaces), a SQL condition otherwise, and a value that holds SQL refused with what to write."""

from __future__ import annotations

import pytest

import client
from client import Eq, In, Missing, Or
from client.cli import _condition
from client.codebook import Codebook
from engine.codebook import default_codebook
from protos.veil.v1 import veil_pb2 as pb
from server.convert import codebook_to_pb


@pytest.fixture(scope="module")
def book() -> Codebook:
    return Codebook.from_pb(pb.GetCodebookResponse(codebook=codebook_to_pb(default_codebook())))


def _unused() -> Codebook:
    raise AssertionError("a plain NAME=VALUE needs no codebook")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("majorityStatus=Minor", Eq("majorityStatus", "Minor")),
        ("majorityStatus = Minor", Eq("majorityStatus", "Minor")),
        ("majorityStatus=Minor, Adult", In("majorityStatus", ["Minor", "Adult"])),
        ("Datasource=Case Management", Eq("Datasource", "Case Management")),
        ("citizenship=IN,IS,NA", In("citizenship", ["IN", "IS", "NA"])),
        ("isSexualExploit=1", Eq("isSexualExploit", "1")),
    ],
)
def test_name_value_pairs_are_read_without_the_codebook(text: str, expected: object) -> None:
    assert _condition(text, codebook=_unused) == expected


def test_a_code_holding_a_sql_word_is_read_as_the_code(book: Codebook) -> None:
    assert _condition(
        "citizenshipSubregion=Australia and New Zealand", codebook=lambda: book
    ) == Eq("citizenshipSubregion", "Australia and New Zealand")
    assert _condition(
        "citizenshipsubregion=Western Europe,Australia and New Zealand", codebook=lambda: book
    ) == In("citizenshipsubregion", ["Western Europe", "Australia and New Zealand"])


@pytest.mark.parametrize(
    ("text", "value", "says"),
    [
        ("majorityStatus = Minor OR", "Minor OR", "the SQL keyword OR"),
        ("majorityStatus=Minor AND", "Minor AND", "the SQL keyword AND"),
        ("majorityStatus = Minor or Adult", "Minor or Adult", "the SQL keyword OR"),
        ("majorityStatus = NOT Minor", "NOT Minor", "the SQL keyword NOT"),
        ("majorityStatus=Minor; DROP TABLE x", "Minor; DROP TABLE x", "';', which ends"),
        ("majorityStatus=Adult,Minor OR", "Minor OR", "the SQL keyword OR"),
    ],
)
def test_a_value_holding_sql_is_refused_with_what_to_write(
    book: Codebook, text: str, value: str, says: str
) -> None:
    with pytest.raises(client.InvalidQuery) as error:
        _condition(text, codebook=lambda: book, command="dry-run")
    message = str(error.value)
    assert error.value.variable == "majorityStatus"
    assert message.startswith(f"--where {text!r}: {value!r} is not a value of majorityStatus")
    assert says in message
    assert "--where \"majorityStatus = 'Minor' ...\"" in message or "'Adult'" in message
    assert 'veil dry-run "SELECT ... FROM victims WHERE ..."' in message
    assert "\n" not in message


def test_null_as_a_value_points_to_is_null(book: Codebook) -> None:
    with pytest.raises(client.InvalidQuery) as error:
        _condition("gender=NULL", "--proportion", codebook=lambda: book)
    assert str(error.value) == (
        "--proportion 'gender=NULL': 'NULL' is not a value of gender; for records where gender "
        'is missing write --proportion "gender IS NULL"'
    )


def test_sql_conditions_stay_sql() -> None:
    assert _condition("majorityStatus = 'Minor' OR gender IS NULL", codebook=_unused) == Or(
        Eq("majorityStatus", "Minor"), Missing("gender")
    )
    assert _condition("ageBroad IN ('0--8', '9--17')", codebook=_unused) == In(
        "ageBroad", ["0--8", "9--17"]
    )


def test_a_comment_in_a_where_is_refused_naming_the_option() -> None:
    with pytest.raises(client.UnsupportedSQL) as error:
        _condition("gender='Male' -- AND gender='Female'", codebook=_unused)
    assert error.value.reason.startswith("--where \"gender='Male' -- AND gender='Female'\": ")
    assert "cannot hold a comment" in error.value.reason
