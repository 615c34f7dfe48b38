"""A release fetched again by its id, against a real server on port 0: its dimensions in the
order the caller names (`by=`), the same release otherwise, free; names it is not grouped by
refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import client
from client import Retry
from tests.client_harness import add_researcher, address, start_server
from tests.server_harness import LiveServer

FAST = Retry(attempts=4, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("client-fetch-order"))
    yield server
    server.stop()


@pytest.fixture
def researcher(live: LiveServer) -> Iterator[client.Client]:
    _, token = add_researcher(live, cap="10")
    veil_client = client.connect(address(live), token=token, retry=FAST)
    yield veil_client
    veil_client.close()


def cell_set(release: client.Release) -> set[tuple[Any, ...]]:
    return {(frozenset(c.keys.items()), c.value, c.ci_low, c.ci_high, c.suppressed, c.status)
            for c in release}


def test_a_fetched_release_comes_in_the_order_by_names(researcher: client.Client) -> None:
    made = (researcher.count().by("majorityStatus", "gender", "ageBroad")
            .where(yearOfRegistration=2011).release(epsilon="0.5"))
    assert made.keys == ["majorityStatus", "gender", "ageBroad"]
    spent = researcher.budget().spent
    release_id = made.metadata.release_id

    plain = researcher.get_release(release_id)
    assert plain.keys == ["ageBroad", "gender", "majorityStatus"]  # the server's order
    # The order the pipeline expects, names in any case: the release made, cell for cell.
    fetched = researcher.get_release(release_id, by=["MAJORITYSTATUS", "gender", "ageBroad"])
    assert fetched.keys == ["majorityStatus", "gender", "ageBroad"]
    assert fetched.table.equals(made.table)  # columns and rows in the order of the release made
    assert fetched.metadata == made.metadata and cell_set(fetched) == cell_set(plain)
    assert fetched.query is not None
    assert fetched.query.dimensions == ("majorityStatus", "gender", "ageBroad")
    assert fetched.request_id is None and fetched.charged is None and fetched.replayed is None
    assert fetched.to_dict()["dimensions"] == ["majorityStatus", "gender", "ageBroad"]

    # Through the caller's list, with the request id that received it.
    (record,) = [r for r in researcher.releases() if r.release_id == release_id]
    again = record.fetch(by=("majorityStatus", "gender", "ageBroad"))
    assert again.table.equals(made.table) and again.request_id == made.request_id
    # Names left out follow those named, in the order they had; a lone name is one name.
    first = record.fetch(by="gender")
    assert first.keys == ["gender", "ageBroad", "majorityStatus"]
    assert first.table.column("gender").to_pylist() == sorted(
        plain.table.column("gender").to_pylist(),
        key=plain.table.column("gender").to_pylist().index,
    )  # grouped, each key in its codebook order
    assert cell_set(first) == cell_set(plain)
    assert researcher.budget().spent == spent  # fetching is free, arranged or not


def test_by_refuses_a_dimension_the_release_is_not_grouped_by(
    researcher: client.Client,
) -> None:
    made = (researcher.count().by("gender", "ageBroad")
            .where(yearOfRegistration=2012).release(epsilon="0.5"))
    release_id = made.metadata.release_id
    with pytest.raises(client.InvalidQuery) as error:
        researcher.get_release(release_id, by=["gender", "ageBroad", "yearOfRegistration"])
    assert error.value.variable == "yearOfRegistration"
    message = str(error.value)
    assert "'yearOfRegistration', which this release is not grouped by" in message
    assert "it is grouped by ageBroad, gender" in message
    # `Release.arrange` gives the same refusal for a release in hand.
    with pytest.raises(client.InvalidQuery, match="which this release is not grouped by"):
        made.arrange(["yearOfRegistration"])
    with pytest.raises(client.InvalidQuery, match="by names 'gender' twice"):
        researcher.get_release(release_id, by=["gender", "Gender"])
    with pytest.raises(TypeError, match="by is the dimensions' order"):
        researcher.get_release(release_id, by=3)  # type: ignore[arg-type]

    flags = (researcher.flag_counts("meansOfControl").by("majorityStatus")
             .where(yearOfRegistration=2012).release(epsilon="0.5"))
    with pytest.raises(client.InvalidQuery, match=r"`flag`.* always comes first"):
        researcher.get_release(flags.metadata.release_id, by=["flag", "majorityStatus"])
    fetched = researcher.get_release(flags.metadata.release_id, by=["majorityStatus"])
    assert fetched.keys == ["flag", "majorityStatus"] and fetched.table.equals(flags.table)


def test_arranging_keeps_what_the_call_charged_and_whether_it_was_replayed(
    researcher: client.Client,
) -> None:
    query = researcher.count().by("gender", "ageBroad").where(yearOfRegistration=2013)
    paid = query.release(epsilon="0.5")
    replayed = query.release(epsilon="0.5")
    assert paid.charged == client.Amount("0.5") and replayed.replayed
    for release, charged in ((paid, client.Amount("0.5")), (replayed, client.Amount(0))):
        arranged = release.arrange(["ageBroad", "gender"])
        assert arranged.keys == ["ageBroad", "gender"] and release.keys == ["gender", "ageBroad"]
        assert arranged.charged == charged and arranged.replayed == release.replayed
        assert arranged.request_id == release.request_id
        assert arranged.metadata is release.metadata
        assert arranged.to_dict()["request"] == {
            **release.to_dict()["request"],
            "query": "count by ageBroad, gender where yearOfRegistration = 2013",
        }
        assert cell_set(arranged) == cell_set(release)
