"""A dry run on a new data version names the caller's own release of the same query on an
earlier one: the custodian loads next year's data, the modeler dry-runs last year's table, and
is told that a fresh draw is priced (releases belong to their data version) and where last
year's table is. Never another client's release, and never one on the version served.

Real servers on port 0, one after the other, over two data files of the same dataset and one
ledger, as a custodian serves a new load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import client
import veil_cli
from client import Retry
from client.pack import Pack, dry_run_pack, release_pack
from server.accounts import LedgerAccounts
from server.app import build_engine, start
from tests.conftest import write_database
from tests.server_harness import ROWS, LiveServer, live_config, start_live

FAST = Retry(attempts=4, initial_backoff=0.01, max_backoff=0.05)
CAPS = {"dataset": "10", "client": "1"}


def _serve(root: Path, data: Path, tokens: dict[str, str]) -> LiveServer:
    """A server over `data` with the ledger `start_live` made under `root`: its clients and
    tokens, and every release made so far."""
    config = live_config(root, data, caps=CAPS)
    engine = build_engine(config)
    accounts = LedgerAccounts.for_config(config, engine, create=False)
    return LiveServer(start(config, engine=engine, accounts=accounts), config, tokens, root)


def _connect(live: LiveServer, name: str) -> client.Client:
    return client.connect(f"127.0.0.1:{live.port}", token=live.tokens[name], retry=FAST)


@pytest.fixture
def two_loads(tmp_path: Path) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """Served on 2024 data, after alice released gender counts twice on 2023's (at 0.25, then
    at 0.5: a fresh draw) and bob a table of his own; returns the 2024 server and the release
    ids made on 2023."""
    first = start_live(tmp_path, data=write_database(
        tmp_path / "2023.duckdb", ROWS, data_version="2023"), caps=CAPS)
    try:
        with _connect(first, "alice") as alice, _connect(first, "bob") as bob:
            small = alice.count().by("gender").release(epsilon=0.25)
            large = alice.count().by("gender").release(epsilon=0.5)
            own = bob.count().by("ageBroad").release(epsilon=0.25)
    finally:
        first.stop()
    ids = {"small": small.metadata.release_id, "large": large.metadata.release_id,
           "bob": own.metadata.release_id}
    assert len(set(ids.values())) == 3  # the larger loss drew afresh
    assert small.metadata.data_version == "2023"
    second = _serve(tmp_path, write_database(
        tmp_path / "2024.duckdb", ROWS, data_version="2024"), first.tokens)
    try:
        yield second, ids
    finally:
        second.stop()


def test_a_new_data_version_prices_a_fresh_draw_and_names_the_callers_earlier_release(
    two_loads: tuple[LiveServer, dict[str, str]],
) -> None:
    live, ids = two_loads
    with _connect(live, "alice") as alice:
        dry = alice.count().by("gender").dry_run(epsilon=0.25)
        # A fresh draw from 2024, at the loss asked: not free.
        assert dry.data_version == "2024"
        assert not dry.already_released and dry.cost == dry.loss == 0.25
        earlier = dry.earlier_release
        assert earlier is not None
        # The newest of alice's releases of it on 2023: the one at 0.5, not the first.
        assert earlier.release_id == ids["large"]
        assert earlier.data_version == "2023" and earlier.loss == 0.5
        assert earlier.received_at
        text = " ".join(repr(dry).split())  # as one line, however it is wrapped
        assert f"on data version 2023: release {ids['large']}, at epsilon 0.5" in text
        assert f"get_release({ids['large']!r})" in text
        assert json.loads(json.dumps(dry.to_dict()))["earlier_release"] == {
            "release_id": ids["large"], "data_version": "2023", "loss": "0.5",
            "received_at": earlier.received_at,
        }
        # And it is where it says: last year's table, fetched again, free.
        spent = alice.budget().spent
        fetched = alice.get_release(earlier.release_id)
        assert fetched.metadata.data_version == "2023"
        assert alice.budget().spent == spent

        # A query alice never released names nothing.
        assert alice.count().by("ageBroad").dry_run(epsilon=0.25).earlier_release is None

        # Released on 2024 too: that one is the stored release `already_released` speaks of,
        # and it is not named as an earlier one; 2023's still is.
        now = alice.count().by("gender").release(epsilon=0.25)
        assert now.metadata.data_version == "2024"
        again = alice.count().by("gender").dry_run(epsilon=0.25)
        assert again.already_released
        assert again.earlier_release is not None
        assert again.earlier_release.release_id == ids["large"]
        assert now.metadata.release_id not in repr(again)


def test_another_clients_release_is_never_named(
    two_loads: tuple[LiveServer, dict[str, str]],
) -> None:
    live, ids = two_loads
    with _connect(live, "bob") as bob, _connect(live, "alice") as alice:
        # Alice released gender counts on 2023; bob, who did not, is told nothing of it.
        dry = bob.count().by("gender").dry_run(epsilon=0.25)
        assert not dry.already_released and dry.earlier_release is None
        assert ids["large"] not in repr(dry) and ids["small"] not in repr(dry)
        assert dry.to_dict()["earlier_release"] is None
        # Nor is alice of bob's table; bob is of his own.
        assert alice.count().by("ageBroad").dry_run(epsilon=0.25).earlier_release is None
        mine = bob.count().by("ageBroad").dry_run(half_width=40).earlier_release
        assert mine is not None and mine.release_id == ids["bob"]


def test_veil_dry_run_says_where_the_earlier_table_is(
    two_loads: tuple[LiveServer, dict[str, str]], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    live, ids = two_loads
    monkeypatch.setenv("VEIL_SERVER", f"127.0.0.1:{live.port}")
    monkeypatch.setenv("VEIL_TOKEN", live.tokens["alice"])
    assert veil_cli.main(["dry-run", "--count", "--by", "gender", "--epsilon", "0.25", "-q"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "data version 2023" in out and f"veil releases {ids['large']}" in out
    assert veil_cli.main(["dry-run", "--count", "--by", "gender", "--epsilon", "0.25", "-q",
                          "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["earlier_release"]["release_id"] == ids["large"]
    assert document["already_released"] is False


def test_a_packs_dry_run_names_the_tables_received_on_another_data_version(
    two_loads: tuple[LiveServer, dict[str, str]],
) -> None:
    live, ids = two_loads
    pack = Pack.of({
        "by_gender": ("SELECT gender, COUNT(*) FROM records GROUP BY gender", "0.25"),
        "by_age": ("SELECT ageBroad, COUNT(*) FROM records GROUP BY ageBroad", "0.25"),
    }, loss_name="epsilon")
    with _connect(live, "alice") as alice:
        pricing = dry_run_pack(alice, pack)
    # Last year's table is not free this year: the pack pays for both.
    assert pricing.total == 0.5 and pricing["by_gender"].free_because is None
    earlier = pricing["by_gender"].dry_run.earlier_release
    assert earlier is not None and earlier.release_id == ids["large"]
    assert pricing["by_age"].dry_run.earlier_release is None
    text = " ".join(pricing.to_text().split())
    assert f"by_gender: {ids['large']} (data version 2023)" in text
    assert "by_age:" not in text
    tables = pricing.to_dict()["tables"]
    assert tables[0]["dry_run"]["earlier_release"]["release_id"] == ids["large"]

    # Once this year's tables are released, the pack's dry run costs nothing, and still names
    # last year's table: it must not say the tables are priced afresh (they are free now).
    with _connect(live, "alice") as alice:
        release_pack(alice, pack)
        again = dry_run_pack(alice, pack)
    assert again.total == 0 and again["by_gender"].free_because is not None
    text = " ".join(again.to_text().split())
    assert f"by_gender: {ids['large']} (data version 2023)" in text
    assert "you also received these tables on another data version" in text
    assert "priced afresh" not in text
