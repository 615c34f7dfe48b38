"""The researcher client against a real server on port 0 over a real ledger and synthetic
records: every call, every error, retries that are never charged twice, the SQL subset."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

import client
from client import TLS, In, Missing, Not, Range, Retry
from client.display import rounded_up
from engine.errors import LedgerUnavailableError
from server.errors import ServerStoppingError
from server.servicer import ResearchServicer
from tests.client_harness import ResponseLost, add_researcher, address, start_server
from tests.server_harness import LiveServer

FAST = Retry(attempts=4, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("client-api"))
    yield server
    server.stop()


def researcher(live: LiveServer, *, cap: str = "10", **kw: Any) -> tuple[str, client.Client]:
    client_id, token = add_researcher(live, cap=cap)
    return client_id, client.connect(address(live), token=token, retry=FAST, **kw)


@pytest.fixture
def alice(live: LiveServer) -> Iterator[tuple[str, client.Client]]:
    client_id, veil_client = researcher(live)
    yield client_id, veil_client
    veil_client.close()


def charges(live: LiveServer, client_id: str) -> list[Any]:
    return [c for c in live.ledger.charges(client=client_id) if c.state == "committed"]


def cell_set(release: client.Release) -> set[tuple[Any, ...]]:
    return {(frozenset(c.keys.items()), c.value, c.ci_low, c.ci_high, c.suppressed)
            for c in release}


# ---- each call ----------------------------------------------------------------------------------


def test_codebook_and_variables(alice: tuple[str, client.Client]) -> None:
    _, veil_client = alice
    book = veil_client.codebook()
    assert book.name == "ctdc" and len(book.variables) == 63
    assert book.deployment.accounting == "pure_dp" and book.deployment.k == 10
    assert veil_client.codebook() is book  # fetched once
    gender = veil_client.variable("gender")
    assert isinstance(gender, client.Variable) and gender.codes == book["gender"].codes
    flags = veil_client.variable("recruiterRelation")
    assert isinstance(flags, client.FlagSet) and "recruiterRelationFamily" in flags.flags
    region = veil_client.variable("citizenshipRegion")
    assert isinstance(region, client.DerivedDimension) and "Asia" in region.groups
    year = veil_client.variable("yearOfRegistration")
    assert isinstance(year, client.Variable) and (year.low, year.high) == (2002, 2021)
    with pytest.raises(client.InvalidQuery) as error:
        veil_client.variable("nope")
    assert error.value.variable == "nope" and error.value.code == "INVALID_ARGUMENT"


def test_release_count_with_intervals_and_suppression(
    live: LiveServer, alice: tuple[str, client.Client]
) -> None:
    client_id, veil_client = alice
    release = (
        veil_client.count().by("gender", "ageBroad").where(majorityStatus="Minor")
        .release(epsilon=0.5)
    )
    table = release.table
    assert table.column_names == ["gender", "ageBroad", "value", "ci_low", "ci_high",
                                  "suppressed", "status"]
    assert table.num_rows == 4 * 10 == release.metadata.cells  # keys and the missing key
    published = [c for c in release.cells if not c.suppressed]
    hidden = [c for c in release.cells if c.suppressed]
    assert published and hidden  # adults' age bands are empty among minors
    for cell in published:
        assert cell.ci_low is not None and cell.ci_high is not None and cell.value is not None
        assert cell.ci_low <= cell.value <= cell.ci_high
        assert cell.value >= release.metadata.tau
    assert all(c.value is None and c.ci_low is None for c in hidden)
    assert release.metadata.suppressed_cells == len(hidden)
    frame = release.to_pandas()
    assert frame[frame["suppressed"]]["value"].isna().all()
    assert str(release.metadata.loss) == "0.5" and release.metadata.mechanism == "discrete_laplace"
    assert release.request_id and release.query is not None

    budget = veil_client.budget()
    assert budget.client_id == client_id and budget.spent == Fraction(1, 2)
    assert budget.remaining == Fraction(19, 2) and budget.loss_name == "epsilon"
    (mine,) = veil_client.releases()
    assert mine.release_id == release.metadata.release_id and mine.request_id == release.request_id
    assert mine.charged == Fraction(1, 2) and not mine.reused
    assert mine.query == "count by ageBroad, gender where majorityStatus = 'Minor'"
    again = mine.fetch()
    assert again.metadata == release.metadata and again.table.num_rows == table.num_rows
    assert cell_set(again) == cell_set(release)  # keys in the server's order, same cells
    # Fetched through its record, it carries the record's request id; the order the query named
    # its dimensions in is kept nowhere, so they come in the server's (as the docstring says).
    assert again.request_id == release.request_id == mine.request_id
    assert again.to_dict()["request"]["request_id"] == release.request_id
    assert again.keys == ["ageBroad", "gender"] and again.charged is None
    assert veil_client.get_release(release.metadata.release_id).request_id is None
    assert len(charges(live, client_id)) == 1


def test_a_released_query_comes_back_free(
    live: LiveServer, alice: tuple[str, client.Client]
) -> None:
    _, veil_client = alice
    query = veil_client.count().by("citizenshipRegion").where(gender="Female")
    priced = query.dry_run(epsilon=0.3)
    assert not priced.already_released
    # The dry run names the data it prices, as the release then states it was drawn from.
    assert priced.data_version and f"data version {priced.data_version}" in repr(priced)
    assert priced.to_dict()["data_version"] == priced.data_version
    first = query.release(epsilon=0.3)
    assert first.metadata.data_version == priced.data_version
    # Another client, another request id, the dimensions in another order: the stored release.
    _, other = researcher(live)
    assert other.count().by("citizenshipRegion").where(gender="Female").dry_run(
        epsilon=0.3).already_released
    second = other.count().where(gender="Female").by("citizenshipRegion").release(epsilon=0.3)
    assert second.metadata.release_id == first.metadata.release_id
    assert second.table.equals(first.table)
    assert other.budget().spent == 0
    (received,) = other.releases()
    assert received.reused and received.charged == 0
    assert received.release_loss == Fraction(3, 10)
    other.close()


def test_half_width_prices_then_releases(alice: tuple[str, client.Client]) -> None:
    _, veil_client = alice
    query = veil_client.count().by("majorityStatus")
    dry = query.dry_run(half_width=25)
    assert dry.half_width <= 25 and dry.cost == Fraction(dry.loss)
    release = query.release(half_width=25)
    assert release.metadata.loss == dry.loss
    assert veil_client.budget().spent == Fraction(dry.loss)
    for cell in release:
        if not cell.suppressed:
            assert cell.ci_high is not None and cell.value is not None
            assert cell.ci_high - cell.value <= 25


def test_every_measure(alice: tuple[str, client.Client]) -> None:
    _, veil_client = alice
    flags = veil_client.flag_counts("recruiterRelation").by("majorityStatus").release(epsilon=0.3)
    assert flags.keys == ["flag", "majorityStatus"] and flags.dimensions == ["majorityStatus"]
    assert flags.table.num_rows == 5 * 4
    assert flags.table.column("flag").to_pylist()[0] == "recruiterRelationIntimatePartner"
    share = veil_client.proportion(isSexualExploit=1).by("gender").release(epsilon=0.2)
    values = [c.value for c in share if not c.suppressed]
    assert values and all(0 <= v <= 1 for v in values)
    assert "%" in repr(share)
    mean = veil_client.mean("yearOfRegistration").by("majorityStatus").release(epsilon=0.2)
    assert all(2002 <= c.value <= 2021 for c in mean if c.value is not None)
    total = veil_client.sum("yearOfRegistration").where(gender="Male").release(epsilon=0.2)
    assert total.table.num_rows == 1 and total.metadata.sum_noise_scale is not None


def test_sql_is_the_fluent_query(alice: tuple[str, client.Client]) -> None:
    _, veil_client = alice
    text = (
        "SELECT gender, ageBroad, COUNT(*) FROM victims WHERE majorityStatus = 'Minor' "
        "GROUP BY gender, ageBroad"
    )
    query = veil_client.sql(text)
    assert isinstance(query, client.Query)
    fluent = veil_client.count().by("gender", "ageBroad").where(majorityStatus="Minor")
    assert query.dry_run(epsilon=0.1).fingerprint == fluent.dry_run(epsilon=0.1).fingerprint
    release = veil_client.sql(
        "select gender, avg(case when isSexualExploit = 1 then 1 else 0 end) from victims "
        "where majoritystatus = 'Minor' group by gender", epsilon=0.2,
    )
    assert isinstance(release, client.Release) and release.metadata.measure == "Proportion"
    with pytest.raises(client.UnsupportedSQL, match="ORDER BY is not supported"):
        veil_client.sql("SELECT gender, COUNT(*) FROM victims GROUP BY gender ORDER BY 2",
                        epsilon=0.1)
    assert veil_client.budget().spent == Fraction(1, 5)  # the refused SQL cost nothing


def test_sql_not_equal_means_what_it_means_in_sql(alice: tuple[str, client.Client]) -> None:
    _, veil_client = alice

    def fingerprint(query: client.Query) -> str:
        return query.dry_run(epsilon=0.1).fingerprint

    sql = veil_client.sql("SELECT COUNT(*) FROM victims WHERE gender <> 'Male'")
    listed = veil_client.count().where(In("gender", ["Female", "Transgender/NonConforming"]))
    negated = veil_client.count().where(Not(client.Eq("gender", "Male")))
    with_missing = veil_client.count().where(
        In("gender", ["Female", "Transgender/NonConforming"]) | Missing("gender")
    )
    assert fingerprint(sql) == fingerprint(listed)
    assert fingerprint(negated) == fingerprint(with_missing) != fingerprint(listed)
    years = veil_client.sql("SELECT COUNT(*) FROM t WHERE yearOfRegistration BETWEEN 2010 AND "
                            "2012")
    assert fingerprint(years) == fingerprint(
        veil_client.count().where(Range("yearOfRegistration", 2010, 2012)))


def test_names_and_values_are_read_as_the_codebook_writes_them(
    alice: tuple[str, client.Client],
) -> None:
    _, veil_client = alice
    loose = veil_client.count().by("GENDER").where(majoritystatus="Minor", isSexualExploit="1")
    exact = veil_client.count().by("gender").where(majorityStatus="Minor", isSexualExploit=1)
    assert loose.dry_run(epsilon=0.1).fingerprint == exact.dry_run(epsilon=0.1).fingerprint


# ---- each error ---------------------------------------------------------------------------------


def test_invalid_queries_name_the_variable(alice: tuple[str, client.Client]) -> None:
    _, veil_client = alice
    with pytest.raises(client.InvalidQuery) as error:
        veil_client.count().by("nope").release(epsilon=0.1)
    assert error.value.variable == "nope" and "nope" in str(error.value)
    with pytest.raises(client.InvalidQuery) as error:
        veil_client.count().where(gender="Robot").release(epsilon=0.1)
    assert error.value.variable == "gender" and "Robot" in str(error.value)
    with pytest.raises(client.InvalidQuery) as error:
        veil_client.mean("gender").release(epsilon=0.1)
    assert error.value.variable == "gender"
    with pytest.raises(client.InvalidQuery, match="pass epsilon="):
        veil_client.count().release(rho=0.1)
    with pytest.raises(TypeError, match="give a privacy loss"):
        veil_client.count().release()
    with pytest.raises(TypeError, match="one privacy loss"):
        veil_client.count().release(epsilon=0.1, loss=0.1)
    assert veil_client.budget().spent == 0


def test_budget_exhausted_says_how_much_is_left(live: LiveServer) -> None:
    _, veil_client = researcher(live, cap="1")
    veil_client.count().by("gender").release(epsilon=0.8)
    with pytest.raises(client.BudgetExhausted) as error:
        veil_client.count().by("ageBroad").release(epsilon=0.5)
    assert error.value.scope == "client"
    # As the message writes it, exactly: an Amount that prints "0.2", not 1/5.
    assert repr(error.value.remaining) == "Amount('0.2')" and str(error.value.remaining) == "0.2"
    assert error.value.remaining_text == "0.2"
    assert f"{error.value.remaining} of 1 remains" in str(error.value)
    # What is left can be asked for as it is.
    assert veil_client.count().by("ageBroad").dry_run(loss=error.value.remaining).fits_budget
    assert error.value.request_id  # nothing charged; the id may be reused
    assert veil_client.budget().spent == Fraction(4, 5)
    veil_client.close()


def test_authentication_and_permission(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    stranger = client.connect(address(live), token="veil_not-a-token", retry=FAST)
    with stranger, pytest.raises(client.AuthenticationError, match="VEIL_TOKEN"):
        stranger.budget()
    monkeypatch.delenv("VEIL_TOKEN", raising=False)
    with pytest.raises(client.AuthenticationError, match="no token: pass token="):
        client.connect(address(live))
    with client.connect(address(live), token=live.tokens["root"], retry=FAST) as admin:
        assert admin.codebook().name == "ctdc"  # browsing is open to every role
        with pytest.raises(client.PermissionDenied, match="researcher"):
            admin.count().release(epsilon=0.1)


def test_a_release_another_client_made_is_not_found(
    live: LiveServer, alice: tuple[str, client.Client]
) -> None:
    _, veil_client = alice
    made = veil_client.count().by("Datasource").release(epsilon=0.1)
    _, other = researcher(live)
    with pytest.raises(client.NotFound):
        other.get_release(made.metadata.release_id)
    with pytest.raises(client.NotFound):
        other.get_release("rel_doesnotexist")
    other.close()


def test_request_id_reused_for_another_query(alice: tuple[str, client.Client]) -> None:
    _, veil_client = alice
    query = veil_client.count().by("majorityStatusAtExploit")
    first = query.release(epsilon=0.1, request_id="mine-1")
    same = query.release(epsilon=0.1, request_id="mine-1")
    assert same.request_id == "mine-1" and same.metadata == first.metadata
    with pytest.raises(client.RequestConflict, match="mine-1"):
        veil_client.count().by("majorityEntry").release(epsilon=0.1, request_id="mine-1")
    assert veil_client.budget().spent == Fraction(1, 10)


def test_unreachable_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    veil_client = client.connect(f"127.0.0.1:{port}", token="veil_x", retry=FAST)
    with veil_client, pytest.raises(client.ServerUnavailable) as error:
        veil_client.budget()
    assert f"127.0.0.1:{port}" in str(error.value) and time.monotonic() - start < 10


def test_timeout_then_retry_with_the_same_request_id_is_charged_once(
    live: LiveServer, alice: tuple[str, client.Client]
) -> None:
    client_id, veil_client = alice
    query = veil_client.count().by("citizenship")
    veil_client.codebook()
    with pytest.raises(client.QueryTimeout) as error:
        query.release(epsilon=0.25, timeout=0.0001)
    request_id = error.value.request_id
    assert request_id and request_id in str(error.value)
    release = query.release(epsilon=0.25, request_id=request_id)
    assert release.request_id == request_id
    time.sleep(0.2)  # let a first attempt still running on the server settle
    committed = charges(live, client_id)
    assert [c.request_id for c in committed] == [request_id]
    assert veil_client.budget().spent == Fraction(1, 4)


# ---- retries ------------------------------------------------------------------------------------


def _flaky(monkeypatch: pytest.MonkeyPatch, *, after_work: bool) -> list[str]:
    """Make the server's first Release fail with UNAVAILABLE: after it charged and stored the
    release (a lost response), or before it did anything (a ledger that could not write)."""
    seen: list[str] = []
    original = ResearchServicer.Release

    def release(self: ResearchServicer, request: Any, context: Any) -> Any:
        seen.append(request.request_id)
        if len(seen) == 1 and not after_work:
            raise LedgerUnavailableError("the ledger cannot write: disk full")
        response = original(self, request, context)
        if len(seen) == 1:
            raise ServerStoppingError("the server is stopping; nothing was charged")
        return response

    monkeypatch.setattr(ResearchServicer, "Release", release)
    return seen


@pytest.mark.parametrize("after_work", [True, False], ids=["response-lost", "ledger-down"])
def test_transient_failure_is_retried_with_the_same_request_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_work: bool
) -> None:
    seen = _flaky(monkeypatch, after_work=after_work)
    server = start_server(tmp_path)  # the handlers are bound when it starts
    try:
        client_id, token = add_researcher(server, cap="2")
        retries: list[tuple[str, int]] = []
        with client.connect(address(server), token=token, retry=FAST) as veil_client:
            veil_client.on_retry = lambda method, attempt, wait, why: retries.append(
                (method, attempt))
            release = veil_client.count().by("gender").release(epsilon=0.5)
            assert veil_client.budget().spent == Fraction(1, 2)
        assert len(seen) == 2 and seen[0] == seen[1] == release.request_id
        assert retries == [("Release", 2)]
        committed = [c for c in server.ledger.charges(client=client_id) if c.state == "committed"]
        assert len(committed) == 1 and committed[0].kind == "charge"
        assert committed[0].release_id == release.metadata.release_id
        assert committed[0].request_id == release.request_id
    finally:
        server.stop()


def test_without_retries_the_error_carries_the_request_id_to_retry_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _flaky(monkeypatch, after_work=True)
    server = start_server(tmp_path)
    try:
        client_id, token = add_researcher(server, cap="2")
        with client.connect(address(server), token=token, retry=Retry(attempts=1)) as veil_client:
            with pytest.raises(client.ServerUnavailable) as error:
                veil_client.count().by("gender").release(epsilon=0.5)
            request_id = error.value.request_id
            assert request_id == seen[0] and f"request_id={request_id!r}" in str(error.value)
            release = veil_client.count().by("gender").release(epsilon=0.5, request_id=request_id)
            assert veil_client.budget().spent == Fraction(1, 2)
        (charge,) = [c for c in server.ledger.charges(client=client_id) if c.state == "committed"]
        assert charge.release_id == release.metadata.release_id
    finally:
        server.stop()


def test_rate_limits_are_waited_out_or_reported(tmp_path: Path) -> None:
    server = start_server(tmp_path, limits={"rate_per_second": 5, "rate_burst": 1})
    try:
        _, token = add_researcher(server)
        patient = client.connect(address(server), token=token,
                                 retry=Retry(attempts=3, initial_backoff=0.01, max_backoff=1))
        start = time.monotonic()
        patient.budget()
        patient.budget()  # over the rate: waits for the server's retry-after, then succeeds
        assert time.monotonic() - start >= 0.1
        patient.close()
        hasty = client.connect(address(server), token=token, retry=Retry(attempts=1))
        with pytest.raises(client.RateLimited) as error:
            hasty.budget()
            hasty.budget()
        assert error.value.retry_after is not None and error.value.retry_after > 0
        hasty.close()
    finally:
        server.stop()


def test_threads_of_one_client_wait_their_turn(tmp_path: Path) -> None:
    # Four threads of one client pull eight tables from a server that lets a client have one
    # call running and make 5 calls a second, with no burst: the refusals (RESOURCE_EXHAUSTED
    # with a wait) are waited out, and every pull succeeds. (That each retry backs off further is
    # tested without a server, in tests/unit/test_client_results.py.)
    from concurrent import futures

    server = start_server(
        tmp_path, limits={"rate_per_second": 5, "rate_burst": 1, "calls_per_client": 1}
    )
    try:
        _, token = add_researcher(server)
        veil_client = client.connect(address(server), token=token, retry=Retry(attempts=10))
        with veil_client, futures.ThreadPoolExecutor(4) as pool:
            budgets = list(pool.map(lambda _: veil_client.budget(), range(8)))
        assert len(budgets) == 8 and all(b.spent == 0 for b in budgets)
    finally:
        server.stop()


def test_calls_beyond_the_clients_cap_wait_for_the_slow_ones_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One call may run at a time, and each takes 3 s: the third of three threads waits some 6 s
    # for its turn, longer than a failure's tries would last, and is still served.
    from concurrent import futures

    from engine.engine import Engine

    dry_run = Engine.dry_run

    def slow_dry_run(self: Engine, *args: Any, **kwargs: Any) -> Any:
        time.sleep(3)
        return dry_run(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "dry_run", slow_dry_run)
    server = start_server(tmp_path, limits={"calls_per_client": 1, "rate_burst": 100})
    try:
        _, token = add_researcher(server)
        veil_client = client.connect(address(server), token=token)  # the default retries
        query = veil_client.count().by("gender")
        with veil_client, futures.ThreadPoolExecutor(3) as pool:
            priced = list(pool.map(lambda _: query.dry_run(epsilon="0.1"), range(3)))
        assert [str(p.loss) for p in priced] == ["0.1"] * 3
    finally:
        server.stop()


# ---- TLS ----------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def test_tls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    pki = tmp_path / "pki"
    pki.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=veil client test CA", cwd=pki)
    (pki / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", "/CN=server", cwd=pki)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
             cwd=pki)
    server = start_server(tmp_path / "srv", tls={"cert": str(pki / "server.crt"),
                                                  "key": str(pki / "server.key")})
    try:
        _, token = add_researcher(server)
        with client.connect(f"localhost:{server.port}", token=token, tls=pki / "ca.crt",
                            retry=FAST) as secure:
            assert secure.tls is not None and "TLS" in repr(secure)
            assert secure.count().by("gender").release(epsilon=0.1).table.num_rows == 4
        with client.connect(f"127.0.0.1:{server.port}", token=token,
                            tls=TLS(ca_cert=(pki / "ca.crt").read_bytes()), retry=FAST) as by_ip:
            assert by_ip.budget().spent == Fraction(1, 10)
        # Loopback defaults to plaintext, which a TLS server does not speak.
        plain = client.connect(f"127.0.0.1:{server.port}", token=token, retry=FAST)
        with plain, pytest.raises(client.ServerUnavailable):
            plain.budget()
        # A certificate from an unknown authority is refused.
        untrusted = client.connect(f"localhost:{server.port}", token=token, tls=True, retry=FAST)
        with untrusted, pytest.raises(client.ServerUnavailable):
            untrusted.budget()
    finally:
        server.stop()


def test_a_replayed_release_says_it_charged_nothing(alice: tuple[str, client.Client]) -> None:
    _, veil_client = alice
    query = veil_client.count().by("Datasource", "isAbduction")
    first = query.release(epsilon="0.25")
    again = query.release(epsilon="0.25")
    assert first.charged == Fraction(1, 4) and str(first.charged) == "0.25"
    assert again.charged == 0 and str(again.charged) == "0"
    assert again.metadata.release_id == first.metadata.release_id
    assert again.replayed and "released before, so free of charge" in again.summary()


def test_a_half_width_is_bought_only_up_to_max_loss(alice: tuple[str, client.Client]) -> None:
    _, veil_client = alice
    query = veil_client.count().by("gender", "isForcedLabour")
    spent = veil_client.budget().spent
    priced = query.dry_run(half_width=3)
    with pytest.raises(client.InvalidQuery) as refused:
        query.release(half_width=3, max_loss="0.1")
    assert f"would cost epsilon {priced.loss}, more than max_loss 0.1" in str(refused.value)
    assert "nothing was charged" in str(refused.value)
    assert veil_client.budget().spent == spent
    bought = query.release(half_width=40, max_loss="0.5")
    assert Fraction(bought.metadata.loss) <= Fraction(1, 2)
    # Released before at a loss above max_loss: it comes back free, so it is not refused.
    other = veil_client.count().by("gender", "isSexualExploit")
    other.release(epsilon="0.9")
    again = other.release(half_width=40, max_loss="0.5")
    assert str(again.metadata.loss) == "0.9" and again.replayed
    with pytest.raises(TypeError, match="give half_width too"):
        query.release(epsilon="0.1", max_loss="0.5")


def test_a_release_whose_first_response_was_lost_claims_nothing_about_its_cost(
    alice: tuple[str, client.Client],
) -> None:
    # The server charged and stored the release, the response was lost, and the client's retry
    # under the same request id got it back at no further charge: the request was paid for, so
    # the release must not say it was free.
    _, veil_client = alice
    real = veil_client._stub.Release

    calls = []

    def response_lost_once(request: Any, **kwargs: Any) -> Any:
        calls.append(request.request_id)
        response = real(request, **kwargs)
        if len(calls) == 1:
            raise ResponseLost()
        return response

    spent = veil_client.budget().spent
    veil_client._stub.Release = response_lost_once
    try:
        release = veil_client.count().by("Datasource", "isSexualExploit").release(epsilon="0.3")
    finally:
        veil_client._stub.Release = real
    assert len(calls) == 2 and calls[0] == calls[1]  # one request, tried twice
    assert veil_client.budget().spent == spent + Fraction(3, 10)
    assert release.charged is None and not release.replayed
    assert "free" not in release.summary()


def test_empty_cells_expected_by_chance_are_priced_then_released(
    alice: tuple[str, client.Client],
) -> None:
    _, veil_client = alice
    # The researcher's wide table: 320 cells, tau 33 at epsilon 0.1 (a year keeps it unique here).
    query = (veil_client.count().by("gender", "ageBroad", "citizenshipRegion")
             .where(yearOfRegistration=2006))
    priced = query.dry_run(epsilon="0.1")
    assert priced.cells == 320 and priced.tau == 33 and not priced.already_released
    assert priced.expected_empty_published_bound == pytest.approx(6.196, abs=1e-3)
    line = "published cells expected to be empty ones passing by chance: at most 6.2"
    assert line in repr(priced)
    release = query.release(epsilon="0.1")
    meta = release.metadata
    assert (meta.empty_pass_probability, meta.expected_empty_published_bound) == (
        priced.empty_pass_probability, priced.expected_empty_published_bound
    )
    assert line in release.summary()
    stored = query.dry_run(epsilon="0.1")  # the stored release's own numbers, as it was made
    assert stored.already_released
    assert stored.expected_empty_published_bound == meta.expected_empty_published_bound
    assert veil_client.get_release(meta.release_id).metadata == meta


def test_cells_the_query_rules_out_arrive_as_stated_zeros(
    alice: tuple[str, client.Client],
) -> None:
    _, veil_client = alice
    release = (veil_client.count().by("majorityStatus")
               .where(majorityStatus="Minor", yearOfRegistration=2007).release(epsilon="0.1"))
    assert release.metadata.unreachable_cells == 3  # Adult, Unknown and missing
    for status in ("Adult", "Unknown", None):
        ruled_out = release.cell(majorityStatus=status)
        assert (ruled_out.value, ruled_out.ci_low, ruled_out.ci_high) == (0, 0, 0)
        assert not ruled_out.suppressed
    assert all(release.cell(majorityStatus=s).status == "empty" for s in ("Adult", "Unknown", None))
    assert release.cell(majorityStatus="Minor").status in ("published", "suppressed")
    words = "3 cells empty by the query's own terms (status empty: stated as 0, not noised)"
    assert words in release.summary()
    assert veil_client.get_release(release.metadata.release_id).metadata == release.metadata
    # A share of no record has no value and is marked suppressed, but its status says it is
    # empty, not withheld, and the summary does not count it as suppressed; the dry run says so
    # first.
    shares = (veil_client.proportion(isSexualExploit=1).by("majorityStatus")
              .where(majorityStatus="Minor", yearOfRegistration=2007))
    priced = shares.dry_run(epsilon="0.1", assumed_count=400)
    assert priced.unreachable_cells == 3
    words = ("3 cells empty by the query's own terms (status empty: no value, not noised; marked "
             "suppressed, though no rule withheld them)")
    assert words in repr(priced)  # as the release will say
    # Its accuracy in points, for a cell of the count assumed.
    assert priced.measure == "Proportion" and priced.value_half_width is not None
    points = f"+/- {rounded_up(100 * priced.value_half_width)} points"
    assert f"a share's interval in a cell of 400 records: about {points}" in repr(priced)
    share = shares.release(epsilon="0.1")
    adult = share.cell(majorityStatus="Adult")
    assert adult.suppressed and adult.status == "empty" and adult.value is None
    assert words in share.summary()
    withheld = sum(c.status == "suppressed" for c in share)
    assert share.metadata.suppressed_cells == withheld + 3
    assert f"{withheld} of 4 cells suppressed" in share.summary()
    assert share.to_pandas()["status"].tolist()[1:] == ["empty"] * 3


def test_a_dry_run_says_whether_the_budget_covers_it(live: LiveServer) -> None:
    _, veil_client = researcher(live, cap="1")
    query = veil_client.count().by("majorityStatus").where(yearOfRegistration=2005)
    fits = query.dry_run(epsilon="0.4")
    assert fits.budget is not None and fits.budget.remaining == 1
    assert fits.fits_budget is True and fits.remaining_after == Fraction(3, 5)
    assert fits.limiting_scope is None
    assert fits.to_dict()["remaining_after"] == "0.6" and "it fits" in repr(fits)
    too_much = query.dry_run(epsilon="1.5")
    assert too_much.fits_budget is False and too_much.remaining_after is None
    assert too_much.limiting_scope == "client" and "does NOT fit" in repr(too_much)

    query.release(epsilon="0.4")
    again = query.dry_run(epsilon="0.2")
    assert again.already_released and again.cost == 0
    assert again.fits_budget is True and again.remaining_after == Fraction(3, 5)
    assert "stored release is returned free" in repr(again)
    assert veil_client.budget().spent == Fraction(2, 5)  # dry runs charge nothing
    veil_client.close()

    # Another researcher, with less left than the stored release's loss, is served it free.
    _, other = researcher(live, cap="0.3")
    with other:
        served = other.dry_run(query, epsilon="0.4")
    assert served.already_released and served.fits_budget is True
    assert served.remaining_after == Fraction(3, 10)


def test_a_dry_run_names_the_institution_when_its_budget_is_the_short_one(
    live: LiveServer,
) -> None:
    institution = f"inst-{time.monotonic_ns()}"
    live.ledger.set_institution_cap(institution, "0.3")
    _, token = add_researcher(live, cap="5", institution=institution)
    with client.connect(address(live), token=token, retry=FAST) as veil_client:
        query = veil_client.count().by("gender").where(yearOfRegistration=2003)  # never released
        priced = query.dry_run(epsilon="0.5")
        assert priced.fits_budget is False and priced.limiting_scope == "institution"
        assert "the institution budget has 0.3 left" in repr(priced)
        assert query.dry_run(epsilon="0.3").remaining_after == 0


def test_a_dry_run_by_a_role_without_a_budget_still_prices(live: LiveServer) -> None:
    with client.connect(address(live), token=live.tokens["root"], retry=FAST) as admin:
        priced = admin.count().by("gender").where(yearOfRegistration=2004).dry_run(epsilon="0.5")
    assert str(priced.loss) == "0.5" and priced.budget is None and priced.fits_budget is None
    assert "not known" in repr(priced)


def test_losses_are_refused_or_read_before_anything_is_sent(
    alice: tuple[str, client.Client],
) -> None:
    _, veil_client = alice
    with pytest.raises(client.InvalidQuery) as error:
        veil_client.count().by("gender").release(epsilon=0.1 + 0.2)
    assert "decimal text such as '0.3' or a Fraction" in str(error.value)
    # A query no test here releases, so that the dry run prices a fresh draw.
    unreleased = veil_client.count().by("ageBroad").where(gender="Female")
    assert str(unreleased.dry_run(epsilon="1e-1").loss) == "0.1"
    assert veil_client.budget().spent == 0


def test_a_flag_set_as_a_dimension_is_refused_before_it_is_sent(
    alice: tuple[str, client.Client],
) -> None:
    _, veil_client = alice
    with pytest.raises(client.InvalidQuery) as error:
        veil_client.count().by("meansOfControl").release(epsilon=0.1)
    assert 'flag_counts("meansOfControl")' in str(error.value)
    assert error.value.variable == "meansOfControl"
    assert veil_client.budget().spent == 0


def test_variables_are_described_by_any_case_of_their_names(
    alice: tuple[str, client.Client],
) -> None:
    _, veil_client = alice
    gender = veil_client.variable("GENDER")
    assert isinstance(gender, client.Variable) and gender.name == "gender"
    with pytest.raises(client.InvalidQuery) as error:
        veil_client.variable("GENDR")
    assert error.value.code == "INVALID_ARGUMENT" and "did you mean gender?" in str(error.value)
