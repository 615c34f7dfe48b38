"""Table packs against a real server on port 0: priced as a whole, refused whole when they do
not fit, released in order, pinned and resumed by their manifest, and `veil pack`."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

import client
import veil_cli
from client import Retry
from client.pack import (
    Manifest,
    ManifestConflict,
    Pack,
    PackDoesNotFit,
    PackSpecError,
    dry_run_pack,
    release_pack,
)
from tests.client_harness import ResponseLost, add_researcher, address, start_server
from tests.server_harness import LiveServer

ROOT = Path(__file__).resolve().parents[2]
FAST = Retry(attempts=4, initial_backoff=0.01, max_backoff=0.05)

# Every test asks queries of its own (a filter on the year no other test uses): a query any
# client released before comes back free, which would change what a test's pack costs.
_YEARS = itertools.count(2003)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("client-pack"))
    yield server
    server.stop()


def researcher(live: LiveServer, cap: str) -> tuple[str, client.Client]:
    client_id, token = add_researcher(live, cap=cap)
    return client_id, client.connect(address(live), token=token, retry=FAST)


def committed(live: LiveServer, client_id: str) -> list[Any]:
    return [c for c in live.ledger.charges(client=client_id) if c.state == "committed"]


def tables(n: int) -> list[str]:
    """`n` distinct queries that no other test asks."""
    year = next(_YEARS)
    dimensions = ["gender", "ageBroad", "majorityStatus", "Datasource", "citizenshipRegion",
                  "CountryOfExploitationRegion", "yearOfRegistration"]
    assert n <= len(dimensions)
    return [f"SELECT {d}, COUNT(*) FROM records WHERE yearOfRegistration <= {year} GROUP BY {d}"
            for d in dimensions[:n]]


def pack_of(sqls: list[str], losses: list[str]) -> Pack:
    return Pack.of({f"t{i}": (sql, loss) for i, (sql, loss) in enumerate(zip(sqls, losses,
                                                                              strict=True))},
                   loss_name="epsilon")


def write_spec(path: Path, sqls: list[str], *, default: str = "0.1",
               extra: str = "") -> Path:
    body = [f"epsilon = {default}", extra]
    for i, sql in enumerate(sqls):
        body += [f"[tables.t{i}]", f"sql = {json.dumps(sql)}"]
    path.write_text("\n".join(body) + "\n")
    return path


# ---- pricing and refusing ------------------------------------------------------------------------


def test_a_pack_that_fits_releases_every_table_and_charges_their_sum(live: LiveServer) -> None:
    client_id, veil_client = researcher(live, cap="1")
    pack = pack_of(tables(3), ["0.1", "0.2", "0.1"])
    pricing = dry_run_pack(veil_client, pack)
    assert pricing.total == Fraction(2, 5) and pricing.fits and pricing.first_short is None
    assert [t.remaining_after for t in pricing.tables] == [
        Fraction(9, 10), Fraction(7, 10), Fraction(3, 5)]
    assert veil_client.budget().spent == 0  # pricing is free

    releases = release_pack(veil_client, pack)
    assert list(releases) == ["t0", "t1", "t2"]
    assert [str(r.metadata.loss) for r in releases.values()] == ["0.1", "0.2", "0.1"]
    assert [r.charged for r in releases.values()] == [
        Fraction(1, 10), Fraction(1, 5), Fraction(1, 10)]
    assert veil_client.budget().spent == Fraction(2, 5)  # exactly the sum
    assert len(committed(live, client_id)) == 3
    veil_client.close()


def test_a_pack_that_does_not_fit_is_refused_whole_and_charges_nothing(
    live: LiveServer, tmp_path: Path
) -> None:
    client_id, veil_client = researcher(live, cap="0.5")
    pack = pack_of(tables(6), ["0.1"] * 6)
    # Each table alone fits what remains now: the reason a pack is priced as a whole.
    assert all(veil_client.dry_run(t.query, epsilon=t.loss).fits_budget for t in pack)
    pricing = dry_run_pack(veil_client, pack)
    assert pricing.total == Fraction(3, 5) and pricing.fits is False
    assert pricing.first_short == "t5" and pricing.limiting_scope == "client"
    assert pricing["t4"].remaining_after == 0 and pricing["t5"].remaining_after == Fraction(-1, 10)
    # The text says what is missing; it showed -0.1 remaining, a budget that cannot go below 0.
    last = pricing.to_text().splitlines()[7]
    assert last.startswith("t5") and "short 0.1" in last and "-0.1" not in last
    assert pricing.rows()[5][6] == "-0.1"  # CSV keeps the number

    manifest = tmp_path / "manifest.json"
    with pytest.raises(PackDoesNotFit) as error:
        release_pack(veil_client, pack, manifest=manifest)
    assert isinstance(error.value, client.BudgetExhausted)
    assert error.value.first_short == "t5" and error.value.total == Fraction(3, 5)
    assert error.value.remaining == Fraction(1, 2) and error.value.scope == "client"
    message = str(error.value)
    assert "0.6" in message and "0.5 remains" in message and "table t5" in message
    assert "Nothing was charged" in message
    assert veil_client.budget().spent == 0 and veil_client.budget().remaining == Fraction(1, 2)
    assert committed(live, client_id) == [] and veil_client.releases() == []
    assert not manifest.exists()  # no request id was handed out either
    veil_client.close()


def test_a_dry_run_counts_tables_already_released_as_free(live: LiveServer) -> None:
    _, other = researcher(live, cap="1")
    _, veil_client = researcher(live, cap="1")
    first, second = tables(2)
    other.sql(first, epsilon="0.2")  # released by someone else, at a larger loss
    pack = Pack.of({"released": (first, "0.1"), "new": (second, "0.1"),
                    "repeat": (second, "0.1"), "larger": (second, "0.3")}, loss_name="epsilon")
    pricing = dry_run_pack(veil_client, pack)
    assert [t.cost for t in pricing.tables] == [0, Fraction(1, 10), 0, Fraction(3, 10)]
    assert pricing["released"].free_because == "already released"
    assert pricing["repeat"].free_because == "the same query as table new"
    assert pricing["larger"].free_because is None  # a larger loss is a new draw
    assert pricing.total == Fraction(2, 5) and pricing.fits
    document = pricing.to_dict()
    assert document["total"] == "0.4" and document["tables"][0]["cost"] == "0"
    assert "already released" in pricing.to_text() and "it fits" in pricing.to_text()

    releases = release_pack(veil_client, pack)
    assert releases["released"].replayed and releases["repeat"].replayed
    assert veil_client.budget().spent == Fraction(2, 5)
    other.close()
    veil_client.close()


def test_a_table_that_is_not_valid_is_named_and_nothing_is_charged(
    live: LiveServer, tmp_path: Path
) -> None:
    client_id, veil_client = researcher(live, cap="1")
    good = tables(2)
    unknown = good[0].replace("GROUP BY gender", "GROUP BY genderr").replace(
        "SELECT gender", "SELECT genderr")
    pack = Pack.of({"a": (good[0], "0.1"), "b": (good[1], "0.1"), "bad": (unknown, "0.1")},
                   loss_name="epsilon")
    with pytest.raises(client.InvalidQuery, match="table bad") as error:
        release_pack(veil_client, pack, manifest=tmp_path / "manifest.json")
    assert error.value.variable == "genderr"
    assert committed(live, client_id) == [] and veil_client.budget().spent == 0

    with pytest.raises(client.UnsupportedSQL, match="table broken"):
        Pack.of({"broken": ("SELECT gender, COUNT(*) FROM records ORDER BY gender", "0.1")})
    with pytest.raises(client.InvalidQuery, match="table t: epsilon must be a positive"):
        Pack.of({"t": (good[0], "-1")}, loss_name="epsilon")
    veil_client.close()


def test_a_spec_with_an_unknown_key_or_bad_sql_is_refused_before_anything_is_asked(
    tmp_path: Path,
) -> None:
    sqls = tables(2)
    spec = write_spec(tmp_path / "top.toml", sqls, extra="epsilom = 0.1")
    with pytest.raises(PackSpecError, match="unknown key epsilom; the keys it takes are"):
        Pack.from_toml(spec)
    text = write_spec(tmp_path / "table.toml", sqls).read_text()
    spec.write_text(text.replace("[tables.t1]", "[tables.t1]\nsqll = 'x'\nnote = 'y'"))
    with pytest.raises(PackSpecError, match="table t1 has unknown keys note, sqll") as error:
        Pack.from_toml(spec)
    assert error.value.table == "t1"
    spec.write_text(text.replace("FROM records", "FROM records JOIN other", 1))
    with pytest.raises(client.UnsupportedSQL, match="table t0"):
        Pack.from_toml(spec)
    spec.write_text(text.replace("epsilon = 0.1", "rho = 0.1").replace(
        "[tables.t1]", "[tables.t1]\nepsilon = 0.2"))
    with pytest.raises(PackSpecError, match="both epsilon and rho"):
        Pack.from_toml(spec)
    spec.write_text(text.replace("epsilon = 0.1", ""))
    with pytest.raises(PackSpecError, match="table t0 has no loss"):
        Pack.from_toml(spec)
    spec.write_text("epsilon = 0.1\n[tables\n")
    with pytest.raises(PackSpecError, match="not valid TOML"):
        Pack.from_toml(spec)
    spec.write_text(text.replace("[tables.t1]", "[tables.\"../t1\"]"))
    with pytest.raises(PackSpecError, match=r"table name '\.\./t1'"):
        Pack.from_toml(spec)
    spec.write_text(text.replace("[tables.t1]", "[tables.t1]\nepsilon = 0.25"))
    pack = Pack.from_toml(spec)
    assert pack.loss_name == "epsilon" and [str(t.loss) for t in pack] == ["0.1", "0.25"]


def test_the_example_spec_prices_against_the_synthetic_data(live: LiveServer) -> None:
    _, veil_client = researcher(live, cap="1")
    pack = Pack.from_toml(ROOT / "examples" / "standard_tables.toml")
    assert len(pack) == 6 and pack["gender_by_year"].half_width == 25
    pricing = dry_run_pack(veil_client, pack)
    by_year = veil_client.dry_run(pack["gender_by_year"].query, half_width=25).loss
    assert pricing["gender_by_year"].loss == by_year and 0 < by_year < 1
    assert pricing.total == Fraction(3, 5) + by_year and pricing.fits
    assert {t.dry_run.measure for t in pricing.tables} == {"Count", "FlagCounts", "Proportion"}
    veil_client.close()


# ---- tables that give a half-width ---------------------------------------------------------------


def half_width_spec(path: Path, sqls: list[str], *, half_width: int = 25, extra: str = "") -> Path:
    """A spec whose first table gives epsilon 0.1 and whose others give `half_width`."""
    body = ["epsilon = 0.1", f"[tables.t0]\nsql = {json.dumps(sqls[0])}"]
    body += [f"[tables.t{i}]\nsql = {json.dumps(sql)}\nhalf_width = {half_width}\n{extra}"
             for i, sql in enumerate(sqls[1:], 1)]
    path.write_text("\n".join(body) + "\n")
    return path


def test_a_half_width_table_is_released_at_the_loss_the_server_prices_it_at(
    live: LiveServer, tmp_path: Path
) -> None:
    client_id, veil_client = researcher(live, cap="1")
    sqls = [s.replace("GROUP BY gender", "GROUP BY gender, ageBroad").replace(
        "SELECT gender", "SELECT gender, ageBroad") for s in tables(2)]
    pack = Pack.from_toml(half_width_spec(tmp_path / "spec.toml", sqls, half_width=25))
    assert pack["t1"].loss is None and pack["t1"].half_width == 25
    priced = veil_client.dry_run(pack["t1"].query, half_width=25)
    assert not priced.already_released and priced.half_width <= 25
    resolved = priced.loss

    pricing = dry_run_pack(veil_client, pack)
    assert pricing["t1"].loss == resolved and pricing["t1"].cost == resolved
    assert pricing.total == Fraction(1, 10) + resolved and pricing.loss_name == "epsilon"
    assert pricing.to_dict()["tables"][1]["loss"] == str(resolved)

    manifest = tmp_path / "manifest.json"
    releases = release_pack(veil_client, pack, manifest=manifest)
    t1 = releases["t1"]
    assert t1.metadata.loss == resolved and t1.charged == resolved
    published = [c for c in t1 if c.status == "published"]
    assert published and all(c.ci_high - c.value <= 25 for c in published)  # type: ignore[operator]
    recorded = json.loads(manifest.read_text())["tables"]
    assert recorded["t1"]["loss"] == str(resolved) and recorded["t1"]["half_width"] == 25
    assert "half_width" not in recorded["t0"]  # a loss table's entry is written as before
    assert recorded["t1"]["charged"] == str(resolved)
    assert veil_client.budget().spent == Fraction(1, 10) + resolved
    assert len(committed(live, client_id)) == 2
    veil_client.close()


def test_a_half_width_table_is_asked_again_at_the_manifests_loss(
    live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, veil_client = researcher(live, cap="2")
    spec = half_width_spec(tmp_path / "spec.toml", tables(3), half_width=30)
    pack = Pack.from_toml(spec)
    manifest = tmp_path / "manifest.json"
    real_release = veil_client.release

    def stopped_before_t2(query: Any, **kw: Any) -> client.Release:
        if kw["request_id"] == Manifest.read(manifest).tables["t2"].request_id:
            raise KeyboardInterrupt  # t2's request id is on disk, and was never sent
        return real_release(query, **kw)

    monkeypatch.setattr(veil_client, "release", stopped_before_t2)
    with pytest.raises(KeyboardInterrupt):
        release_pack(veil_client, pack, manifest=manifest)
    monkeypatch.undo()
    halfway = json.loads(manifest.read_text())
    assert halfway["tables"]["t1"]["release_id"] and not halfway["tables"]["t2"]["release_id"]
    # Priced again now, the half-width could cost another loss (other settings, a server that
    # rounds otherwise): here the manifest says 0.5, and a resumed run asks what it says.
    assert halfway["tables"]["t2"]["loss"] != "0.5"
    halfway["tables"]["t2"]["loss"] = "0.5"
    manifest.write_text(json.dumps(halfway))

    def no_half_width(query: Any, **kw: Any) -> client.DryRun:
        assert "half_width" not in kw, "a half-width the manifest records was priced again"
        return real_dry_run(query, **kw)

    real_dry_run = veil_client.dry_run
    monkeypatch.setattr(veil_client, "dry_run", no_half_width)
    pricing = dry_run_pack(veil_client, pack, manifest=manifest)
    assert pricing["t1"].cost == 0 and pricing["t2"].cost == Fraction(1, 2)
    spent = veil_client.budget().spent
    resumed = release_pack(veil_client, pack, manifest=manifest)
    assert str(resumed["t2"].metadata.loss) == "0.5" and resumed["t2"].charged == Fraction(1, 2)
    assert resumed["t1"].charged == 0
    assert str(resumed["t1"].metadata.loss) == halfway["tables"]["t1"]["loss"]
    assert veil_client.budget().spent == spent + Fraction(1, 2)

    # Again: every table replayed free, at the losses the manifest records.
    again = release_pack(veil_client, pack, manifest=manifest)
    assert [r.charged for r in again.values()] == [0, 0, 0]
    assert [r.metadata.release_id for r in again.values()] == [
        r.metadata.release_id for r in resumed.values()]
    assert veil_client.budget().spent == spent + Fraction(1, 2)
    monkeypatch.undo()

    # Another half-width, or a loss in its place, is another table: the manifest is refused.
    text = spec.read_text()
    for changed in (text.replace("half_width = 30", "half_width = 40", 1),
                    text.replace("half_width = 30", "epsilon = 0.2", 1)):
        spec.write_text(changed)
        with pytest.raises(ManifestConflict, match="table t1 has changed") as error:
            release_pack(veil_client, Pack.from_toml(spec), manifest=manifest)
        assert "+/- 30" in str(error.value)
    assert veil_client.budget().spent == spent + Fraction(1, 2)
    veil_client.close()


def test_a_half_width_is_given_in_place_of_a_loss_or_refused_by_name(
    live: LiveServer, tmp_path: Path
) -> None:
    sqls = tables(2)
    spec = tmp_path / "spec.toml"
    refused = {
        "epsilon = 0.2\nhalf_width = 25": "table t1 gives both epsilon and half_width",
        "half_width = 0": "half_width is how far .* got 0",
        "half_width = 2.5": "half_width is how far .* got 2.5",
        "half_width = '25'": "half_width is how far .* got '25'",
        "half_width = true": "half_width is how far .* got True",
        "confidence = 0.9": "confidence without half_width",
        "half_width = 25\nconfidence = 95": r"confidence is the level .* got 95",
    }
    for keys, message in refused.items():
        spec.write_text(f"epsilon = 0.1\n[tables.t0]\nsql = {json.dumps(sqls[0])}\n"
                        f"[tables.t1]\nsql = {json.dumps(sqls[1])}\n{keys}\n")
        with pytest.raises(PackSpecError, match=message) as error:
            Pack.from_toml(spec)
        assert error.value.table == "t1", keys
    spec.write_text(f"half_width = 25\n[tables.t0]\nsql = {json.dumps(sqls[0])}\n")
    with pytest.raises(PackSpecError, match="unknown key half_width"):
        Pack.from_toml(spec)  # a table's target, not the spec's default

    # Without any loss, every table giving a half-width: priced under the deployment's name.
    _, veil_client = researcher(live, cap="1")
    spec.write_text(f"[tables.t0]\nsql = {json.dumps(sqls[0])}\nhalf_width = 40\n"
                    f"confidence = 0.95\n")
    pack = Pack.from_toml(spec)
    assert pack.loss_name == "loss" and pack["t0"].confidence == 0.95
    pricing = dry_run_pack(veil_client, pack)
    assert pricing.loss_name == "epsilon" and pricing["t0"].cost > 0
    assert "total: epsilon" in pricing.verdict() and " for 1 table;" in pricing.verdict()
    # The server states every interval at its own level: another one is refused, by name.
    spec.write_text(spec.read_text().replace("0.95", "0.9"))
    with pytest.raises(client.InvalidQuery, match=re.escape(
            "table t0: half_width 40 is asked at confidence 0.9, and this server states every "
            "interval at 0.95")):
        dry_run_pack(veil_client, Pack.from_toml(spec))
    assert veil_client.budget().spent == 0
    veil_client.close()


# ---- pinning and resuming ------------------------------------------------------------------------


def test_the_manifest_pins_the_releases_even_after_a_larger_release_by_another(
    live: LiveServer, tmp_path: Path
) -> None:
    client_id, veil_client = researcher(live, cap="1")
    pack = pack_of(tables(2), ["0.1", "0.1"])
    manifest = tmp_path / "manifest.json"
    first = release_pack(veil_client, pack, manifest=manifest)
    recorded = Manifest.read(manifest)
    assert recorded.client_id == client_id
    for name, release in first.items():
        entry = recorded.tables[name]
        assert entry.release_id == release.metadata.release_id
        assert entry.data_version == release.metadata.data_version
        assert entry.fingerprint == release.metadata.fingerprint and entry.charged == "0.1"
    spent = veil_client.budget().spent
    assert spent == Fraction(1, 5)

    # Another client releases the same query at a larger loss: the server now serves that.
    _, other = researcher(live, cap="1")
    larger = other.sql(pack["t0"].sql or "", epsilon="0.5")
    served = veil_client.release(pack["t0"].query, epsilon="0.1")
    assert served.metadata.release_id == larger.metadata.release_id

    pricing = dry_run_pack(veil_client, pack, manifest=manifest)
    assert pricing.total == 0 and pricing["t0"].free_because.startswith("pinned")
    again = release_pack(veil_client, pack, manifest=manifest)
    for name in pack.names:
        assert again[name].metadata.release_id == first[name].metadata.release_id
        assert again[name].charged == 0 and again[name].replayed
        assert again[name].table.equals(first[name].table)
    assert veil_client.budget().spent == spent
    assert Manifest.read(manifest) == recorded
    other.close()
    veil_client.close()


def test_a_manifest_that_cannot_pin_the_pack_is_refused_before_anything_is_charged(
    live: LiveServer, tmp_path: Path
) -> None:
    client_id, veil_client = researcher(live, cap="1")
    sqls = tables(2)
    pack = pack_of(sqls, ["0.1", "0.1"])
    manifest = tmp_path / "manifest.json"
    release_pack(veil_client, pack, manifest=manifest)
    charges = len(committed(live, client_id))

    changed = pack_of([sqls[0], sqls[0].replace("<=", "<")], ["0.1", "0.1"])
    with pytest.raises(ManifestConflict, match="table t1 has changed") as error:
        release_pack(veil_client, changed, manifest=manifest)
    assert error.value.table == "t1"
    with pytest.raises(ManifestConflict, match="table t0 has changed"):
        release_pack(veil_client, pack_of(sqls, ["0.2", "0.1"]), manifest=manifest)

    # The server refuses a request id kept from one data version on the next; the manifest is
    # refused before that, and before the tables that would have fitted are charged.
    document = json.loads(manifest.read_text())
    document["tables"]["t1"]["data_version"] = "an-earlier-load"
    old = tmp_path / "old.json"
    old.write_text(json.dumps(document))
    with pytest.raises(ManifestConflict, match="data version an-earlier-load"):
        release_pack(veil_client, pack_of([*sqls, tables(1)[0]], ["0.1"] * 3), manifest=old)
    # Data loaded under another codebook changes every fingerprint too (they name the
    # codebook): the spec is not what changed, and the advice is the new data's.
    document["tables"]["t1"]["fingerprint"] = "0" * 64
    old.write_text(json.dumps(document))
    with pytest.raises(ManifestConflict, match="data version an-earlier-load"):
        release_pack(veil_client, pack, manifest=old)

    stranger_id, stranger = researcher(live, cap="1")
    with pytest.raises(ManifestConflict, match=f"written by client {client_id}"):
        release_pack(stranger, pack, manifest=manifest)
    assert committed(live, stranger_id) == []
    assert len(committed(live, client_id)) == charges
    stranger.close()
    veil_client.close()


def test_an_interrupted_pack_resumes_and_nothing_is_charged_twice(
    live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_id, veil_client = researcher(live, cap="1")
    pack = pack_of(tables(4), ["0.1", "0.2", "0.1", "0.1"])
    manifest = tmp_path / "manifest.json"
    real_release = veil_client.release
    calls: list[str] = []

    def stopped_after_the_server_answered(query: Any, **kw: Any) -> client.Release:
        release = real_release(query, **kw)
        calls.append(kw["request_id"])
        if len(calls) == 2:  # the server committed it; the run stops before recording it
            raise KeyboardInterrupt
        return release

    monkeypatch.setattr(veil_client, "release", stopped_after_the_server_answered)
    with pytest.raises(KeyboardInterrupt):
        release_pack(veil_client, pack, manifest=manifest)
    monkeypatch.undo()
    halfway = Manifest.read(manifest)
    assert halfway.tables["t0"].released and not halfway.tables["t1"].released
    assert halfway.tables["t1"].request_id == calls[1]  # on disk before it was asked
    assert set(halfway.tables) == {"t0", "t1", "t2", "t3"}
    assert veil_client.budget().spent == Fraction(3, 10)

    pricing = dry_run_pack(veil_client, pack, manifest=manifest)
    assert [t.cost for t in pricing.tables] == [0, 0, Fraction(1, 10), Fraction(1, 10)]
    releases = release_pack(veil_client, pack, manifest=manifest)
    assert releases["t0"].metadata.release_id == halfway.tables["t0"].release_id
    assert releases["t0"].charged == 0
    assert releases["t1"].charged == 0  # paid by the run that stopped
    assert [r.charged for r in (releases["t2"], releases["t3"])] == [Fraction(1, 10)] * 2
    assert veil_client.budget().spent == Fraction(1, 2)  # each table paid once
    assert len(committed(live, client_id)) == 4
    done = Manifest.read(manifest)
    assert all(e.released for e in done.tables.values())
    assert done.tables["t1"].charged == "0.2"  # what its request cost, from the ledger's list
    veil_client.close()


def listing_calls(veil_client: client.Client, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The limits of the ListMyReleases calls `veil_client` makes from now on."""
    calls: list[int] = []
    real = veil_client._stub.ListMyReleases

    def spy(request: Any, **kwargs: Any) -> Any:
        calls.append(request.limit)
        return real(request, **kwargs)

    monkeypatch.setattr(veil_client._stub, "ListMyReleases", spy)
    return calls


def test_what_each_table_cost_is_read_from_its_release_call_not_a_listing(
    live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, other = researcher(live, cap="1")
    _, veil_client = researcher(live, cap="1")
    first, second, third = tables(3)
    other.sql(first, epsilon="0.3")  # released before: served free
    pack = Pack.of({"released": (first, "0.1"), "new": (second, "0.1"), "more": (third, "0.2")},
                   loss_name="epsilon")
    listed = listing_calls(veil_client, monkeypatch)
    manifest = tmp_path / "manifest.json"
    releases = release_pack(veil_client, pack, manifest=manifest)
    assert [r.charged for r in releases.values()] == [0, Fraction(1, 10), Fraction(1, 5)]
    assert releases["released"].replayed and not releases["new"].replayed
    assert [e.charged for e in Manifest.read(manifest).tables.values()] == ["0", "0.1", "0.2"]
    assert listed == []  # the release calls' own answers said it all
    assert veil_client.budget().spent == Fraction(3, 10)
    other.close()
    veil_client.close()


def test_a_try_lost_after_the_server_charged_it_is_read_from_the_list(
    live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, veil_client = researcher(live, cap="1")
    pack = pack_of(tables(2), ["0.1", "0.2"])
    real = veil_client._stub.Release
    sent: list[str] = []

    def first_answer_lost(request: Any, **kwargs: Any) -> Any:
        sent.append(request.request_id)
        response = real(request, **kwargs)
        if len(sent) == 2:  # t1 is charged and stored; its answer is lost, the retry replays
            raise ResponseLost()
        return response

    monkeypatch.setattr(veil_client._stub, "Release", first_answer_lost)
    listed = listing_calls(veil_client, monkeypatch)
    manifest = tmp_path / "manifest.json"
    releases = release_pack(veil_client, pack, manifest=manifest)
    assert sent[1] == sent[2] and len(sent) == 3  # t1 tried twice under one request id
    # The retry's answer says 0; the request was paid by the try whose answer was lost.
    assert releases["t1"].charged == Fraction(1, 5) and releases["t0"].charged == Fraction(1, 10)
    assert Manifest.read(manifest).tables["t1"].charged == "0.2"
    assert len(listed) == 1 and listed[0] > 100  # only for t1; as many as the server lists
    assert veil_client.budget().spent == Fraction(3, 10)
    veil_client.close()


def test_a_resumed_table_is_not_charged_twice_however_many_releases_came_since(
    live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, veil_client = researcher(live, cap="1")
    pack = pack_of(tables(2), ["0.1", "0.2"])
    manifest = tmp_path / "manifest.json"
    real_release = veil_client.release

    def stopped_after_the_server_answered(query: Any, **kw: Any) -> client.Release:
        release = real_release(query, **kw)
        if kw["request_id"] == Manifest.read(manifest).tables["t1"].request_id:
            raise KeyboardInterrupt  # t1 is charged; the run stops before recording it
        return release

    monkeypatch.setattr(veil_client, "release", stopped_after_the_server_answered)
    with pytest.raises(KeyboardInterrupt):
        release_pack(veil_client, pack, manifest=manifest)
    monkeypatch.undo()
    assert veil_client.budget().spent == Fraction(3, 10)
    # More than 100 releases since (one paid, the rest served free): the stopped request is
    # not among the caller's latest 100.
    busy = veil_client.count().by("gender").where(yearOfRegistration=next(_YEARS))
    for _ in range(101):
        busy.release(epsilon="0.1")
    assert veil_client.budget().spent == Fraction(2, 5)

    releases = release_pack(veil_client, pack, manifest=manifest)
    assert releases["t0"].charged == 0 and releases["t1"].charged == 0  # nothing paid twice
    assert releases["t1"].replayed
    assert Manifest.read(manifest).tables["t1"].charged == "0.2"  # what the stopped run paid
    assert veil_client.budget().spent == Fraction(2, 5)
    veil_client.close()


# ---- `veil pack` ---------------------------------------------------------------------------------


def test_veil_pack_prices_then_writes_each_table_and_the_manifest(
    live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client_id, token = add_researcher(live, cap="0.5")
    monkeypatch.setenv("VEIL_SERVER", address(live))
    monkeypatch.setenv("VEIL_TOKEN", token)
    spec = write_spec(tmp_path / "cycle.toml", tables(3))

    def veil(*args: str) -> tuple[int, str, str]:
        code = veil_cli.main(["pack", str(spec), *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = veil("--dry-run", "-q")
    assert code == 0 and "t0" in out and "t2" in out
    assert "total: epsilon 0.3 for 3 tables; it fits: 0.5 remaining now, 0.2 after" in out
    code, out, _ = veil("--dry-run", "-q", "-f", "json")
    assert code == 0 and json.loads(out)["total"] == "0.3"

    out_dir = tmp_path / "tables"
    code, out, err = veil("--out", str(out_dir))
    assert code == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["client_id"] == client_id and list(manifest["tables"]) == ["t0", "t1", "t2"]
    for name, entry in manifest["tables"].items():
        assert entry["release_id"] in out and entry["charged"] == "0.1"
        header = (out_dir / f"{name}.csv").read_text().splitlines()[0]
        assert header.endswith("value,ci_low,ci_high,suppressed,status")
    assert "charged epsilon 0.3 in this run" in out

    code, out, _ = veil("--out", str(out_dir), "-f", "json", "-q")  # again: replayed, free
    assert code == 0 and "charged epsilon 0 in this run" in out
    document = json.loads((out_dir / "t1.json").read_text())
    assert document["metadata"]["release_id"] == manifest["tables"]["t1"]["release_id"]
    assert json.loads((out_dir / "manifest.json").read_text()) == manifest
    assert len(committed(live, client_id)) == 3

    # What does not fit is refused with the budget's exit status, and writes nothing.
    big = write_spec(tmp_path / "big.toml", tables(3), default="0.2")
    code = veil_cli.main(["pack", str(big), "--out", str(tmp_path / "big"), "-q"])
    _, err = capsys.readouterr()
    assert code == 3 and "table t1 is the first that does not fit" in err
    assert not (tmp_path / "big").exists()  # not even an empty directory
    # Nor does a refusal with the manifest in a directory of its own within --out.
    code = veil_cli.main(["pack", str(big), "--out", str(tmp_path / "big" / "tables"),
                          "--manifest", str(tmp_path / "big" / "state" / "manifest.json"), "-q"])
    capsys.readouterr()
    assert code == 3 and not (tmp_path / "big").exists()
    assert out_dir.is_dir()  # directories with tables in them stay
    # A spec that cannot be read is refused before any server is asked (exit 2).
    bad = tmp_path / "bad.toml"
    bad.write_text(spec.read_text() + "\nextra = 1\n")
    code = veil_cli.main(["pack", str(bad), "--dry-run"])
    _, err = capsys.readouterr()
    assert code == 2 and "unknown key extra" in err
    assert len(committed(live, client_id)) == 3


def test_veil_pack_releases_a_half_width_table_at_its_priced_loss(
    live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, token = add_researcher(live, cap="1")
    monkeypatch.setenv("VEIL_SERVER", address(live))
    monkeypatch.setenv("VEIL_TOKEN", token)
    sql = tables(1)[0]
    spec = tmp_path / "cycle.toml"
    spec.write_text(f"[tables.t0]\nsql = {json.dumps(sql)}\nhalf_width = 40\n")

    assert veil_cli.main(["pack", str(spec), "--dry-run", "-q", "-f", "json"]) == 0
    priced = json.loads(capsys.readouterr().out)
    loss = priced["tables"][0]["loss"]
    assert priced["loss_name"] == "epsilon" and priced["total"] == loss and float(loss) > 0

    out_dir = tmp_path / "tables"
    code = veil_cli.main(["pack", str(spec), "--out", str(out_dir), "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    entry = json.loads((out_dir / "manifest.json").read_text())["tables"]["t0"]
    assert entry["loss"] == loss and entry["half_width"] == 40 and entry["charged"] == loss
    assert f"charged epsilon {loss} in this run" in out
    assert veil_cli.main(["pack", str(spec), "--out", str(out_dir), "-q"]) == 0
    assert "charged epsilon 0 in this run" in capsys.readouterr().out
