"""Release objects: Arrow and pandas, the readable table, JSON and CSV, the plot; and errors
decoded from a server's status."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from typing import Any

import grpc
import pyarrow as pa
import pytest

import client
from client.errors import from_rpc_error
from client.query import Present, count, flag_counts, proportion
from client.results import Budget, DryRun, Release, describe_canonical
from protos.veil.v1 import status_pb2
from protos.veil.v1 import veil_pb2 as pb


def response(table: pa.Table, measure: str = "Count", **meta: Any) -> pb.ReleaseResponse:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    metadata = pb.ReleaseMetadata(
        release_id="rel_1", charge_id="chg_1", measure=measure, mechanism="discrete_laplace",
        accounting=pb.ACCOUNTING_PURE_DP, loss="0.5", measured_loss="0.5", noise_scale=2.0,
        tau=15, k=10, beta=0.05, confidence=0.95, cells=table.num_rows,
        suppressed_cells=sum(table.column("suppressed").to_pylist()), **meta,
    )
    return pb.ReleaseResponse(metadata=metadata, arrow_ipc=sink.getvalue().to_pybytes())


def count_table() -> pa.Table:
    """As the server sends it: its own dimension order (ageBroad, then gender), row-major."""
    ages = ["0--8", "0--8", "0--8", None, None, None]
    genders = ["Male", "Female", None, "Male", "Female", None]
    values = [120, None, 30, None, 45, None]
    suppressed = [v is None for v in values]
    low = [None if v is None else float(max(v - 6, 0)) for v in values]
    high = [None if v is None else float(v + 6) for v in values]
    return pa.table({
        "ageBroad": pa.array(ages, pa.string()),
        "gender": pa.array(genders, pa.string()),
        "value": pa.array(values, pa.int64()),
        "ci_low": pa.array(low, pa.float64()),
        "ci_high": pa.array(high, pa.float64()),
        "suppressed": pa.array(suppressed),
    })


@pytest.fixture
def release() -> Release:
    query = count().by("gender", "ageBroad").where(majorityStatus="Minor")
    return Release.from_pb(response(count_table()), query=query, request_id="req-1")


def test_cells_follow_the_requested_dimension_order(release: Release) -> None:
    assert release.table.column_names == [
        "gender", "ageBroad", "value", "ci_low", "ci_high", "suppressed", "status"
    ]
    assert release.table.column("gender").to_pylist() == [
        "Male", "Male", "Female", "Female", None, None
    ]
    assert release.keys == ["gender", "ageBroad"] and release.dimensions == release.keys
    assert release.cell(gender="Female", ageBroad=None).value == 45
    assert len(release) == 6


def test_suppressed_is_null_with_a_flag_never_zero(release: Release) -> None:
    frame = release.to_pandas()
    hidden = frame[frame["suppressed"]]
    assert len(hidden) == 3 and hidden["value"].isna().all() and hidden["ci_low"].isna().all()
    assert str(frame["value"].dtype) == "Int64"  # counts stay integers
    assert str(frame["ci_low"].dtype) == "Int64"  # and so do their bounds
    assert (frame["value"].fillna(-1) != 0).all()
    assert release.df().equals(frame)
    assert release.arrow() is release.table
    assert pa.table(release).num_rows == 6  # the Arrow C stream interface


def test_text_keys_are_categoricals_in_the_codebooks_order_for_pivots() -> None:
    ages = ["9--17", "9--17", "18--20", "18--20", "0--8", "0--8", None, None]
    table = pa.table({
        "ageBroad": pa.array(ages, pa.string()),  # as the codebook orders them, not as text sorts
        "yearOfRegistration": pa.array([2020, 2021] * 4, pa.int64()),
        "value": pa.array([11, 12, 13, 14, 15, 16, 17, 18], pa.int64()),
        "ci_low": pa.array([1.0] * 8),
        "ci_high": pa.array([30.0] * 8),
        "suppressed": pa.array([False] * 8),
    })
    frame = Release.from_pb(response(table)).to_pandas()
    ages_column = frame["ageBroad"]
    assert list(ages_column.cat.categories) == ["9--17", "18--20", "0--8"]
    assert ages_column.cat.ordered and ages_column.isna().sum() == 2  # missing stays <NA>
    assert str(frame["yearOfRegistration"].dtype) == "Int64"  # integer keys stay integers
    pivot = frame.pivot_table(index="ageBroad", columns="yearOfRegistration", values="value",
                              observed=True, aggfunc="sum")
    assert list(pivot.index) == ["9--17", "18--20", "0--8"]
    assert frame.sort_values("ageBroad")["value"].tolist()[:2] == [11, 12]


def test_readable_table_and_html(release: Release) -> None:
    text = repr(release)
    header = text.splitlines()[0]
    assert header.split() == ["gender", "ageBroad", "value", "95%", "CI", "status"]
    assert "[114, 126]" in text and "(missing)" in text and "suppressed" in text.splitlines()[3]
    assert "epsilon 0.5" in text and "3 of 6 cells suppressed" in text
    html = release._repr_html_()
    assert "<table" in html and "font-style:italic" in html and "95% CI" in html


def test_json_document(release: Release) -> None:
    document = json.loads(release.to_json())
    assert document["format"] == "veil.release/1"
    assert document["dimensions"] == ["gender", "ageBroad"]
    assert document["metadata"]["loss"] == "0.5" and document["metadata"]["tau"] == 15
    assert document["request"]["request_id"] == "req-1"
    first, second = document["cells"][:2]
    assert first == {"keys": {"gender": "Male", "ageBroad": "0--8"}, "value": 120,
                     "ci_low": 114, "ci_high": 126, "suppressed": False, "status": "published"}
    assert second["keys"] == {"gender": "Male", "ageBroad": None}
    assert second["value"] is None and second["suppressed"] is True
    assert client.results.cells_from_json(document) == release.cells


def test_csv(release: Release, tmp_path: Any) -> None:
    text = release.to_csv(tmp_path / "cells.csv")
    assert (tmp_path / "cells.csv").read_text() == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["gender", "ageBroad", "value", "ci_low", "ci_high", "suppressed",
                             "status"]
    assert rows[0]["value"] == "120" and rows[0]["suppressed"] == "false"
    assert rows[0]["status"] == "published"
    assert rows[1]["value"] == "" and rows[1]["suppressed"] == "true"
    assert rows[1]["status"] == "suppressed"
    assert rows[4]["gender"] == ""  # the missing key


def test_flag_counts_put_the_flag_first() -> None:
    table = pa.table({
        "majorityStatus": ["Minor", "Adult", "Minor", "Adult"],
        "flag": ["a", "a", "b", "b"],
        "value": pa.array([20, 30, None, 40], pa.int64()),
        "ci_low": [10.0, 20.0, None, 30.0],
        "ci_high": [30.0, 40.0, None, 50.0],
        "suppressed": [False, False, True, False],
    })
    release = Release.from_pb(response(table, "FlagCounts"),
                              query=flag_counts("x").by("majorityStatus"))
    assert release.keys == ["flag", "majorityStatus"]
    assert release.dimensions == ["majorityStatus"]


def test_plot_marks_suppressed_cells(release: Release) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = release.plot()
    try:
        texts = [t.get_text() for t in ax.texts]
        assert texts.count("suppressed") == 3
        drawn = [p for p in ax.patches if p.get_fill()]
        assert sorted(round(p.get_height()) for p in drawn) == [30, 45, 120]
        # Each suppressed cell is a band across the whole value axis, which no value can be
        # mistaken for: not a bar of some height.
        bands = [p for p in ax.patches if not p.get_fill()]
        assert len(bands) == 3
        for band in bands:
            (_, bottom), (_, top) = band.get_transform().transform([[0, 0], [0, 1]])
            (_, axis_bottom), (_, axis_top) = ax.transAxes.transform([[0, 0], [0, 1]])
            assert (bottom, top) == pytest.approx((axis_bottom, axis_top))
        assert "suppressed" in [t.get_text() for t in ax.get_legend().get_texts()]
        with pytest.raises(ValueError, match="not a key"):
            release.plot(x="nope")
    finally:
        plt.close("all")


def test_plot_draws_part_of_a_release_and_refuses_an_unreadable_chart() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A corridor-sized release: 251 x 251 cells.
    codes = [f"C{i:03d}" for i in range(251)]
    n = len(codes) ** 2
    table = pa.table({
        "citizenship": pa.array([c for c in codes for _ in codes], pa.string()),
        "CountryOfExploitation": pa.array(codes * len(codes), pa.string()),
        "value": pa.array([20] * n, pa.int64()),
        "ci_low": pa.array([10.0] * n, pa.float64()),
        "ci_high": pa.array([30.0] * n, pa.float64()),
        "suppressed": pa.array([False] * n),
    })
    corridor = Release.from_pb(
        response(table), query=count().by("citizenship", "CountryOfExploitation")
    )
    try:
        with pytest.raises(ValueError, match="63001 bars are too many") as refused:
            corridor.plot()
        assert "only=" in str(refused.value)
        ax = corridor.plot(only={"citizenship": "C007", "CountryOfExploitation": codes[:5]})
        assert len([p for p in ax.patches if p.get_fill()]) == 5
        with pytest.raises(ValueError, match="not a key"):
            corridor.plot(only={"gender": "Male"})
        with pytest.raises(ValueError, match="no cell"):
            corridor.plot(only={"citizenship": "ZZZ"})
    finally:
        plt.close("all")


def test_the_release_list_names_data_versions_once_they_differ() -> None:
    from client.results import ReceivedRelease, ReleaseList

    def received(release_id: str, version: str) -> ReceivedRelease:
        return ReceivedRelease.from_pb(pb.MyRelease(
            release_id=release_id, request_id="r", fingerprint="f" * 64,
            canonical_query='{"measure": "count", "by": ["gender"], "where": true}',
            charged="0.5", release_loss="0.5", received_at="2026-11-22T10:00:00Z",
            data_version=version,
        ))

    one = ReleaseList([received("rel_a", "ctdc@7:aaaa"), received("rel_b", "ctdc@7:aaaa")])
    assert "data_version" not in repr(one) and "count by gender" in repr(one)
    # After a reload the same query's releases differ only in their data version: shown.
    two = ReleaseList([received("rel_a", "ctdc@7:aaaa"), received("rel_c", "ctdc@7:bbbb")])
    text = repr(two)
    assert "data_version" in text and "ctdc@7:aaaa" in text and "ctdc@7:bbbb" in text
    assert "ctdc@7:bbbb" in two._repr_html_()


def test_dry_run_budget_and_canonical_text() -> None:
    dry = DryRun.from_pb(pb.DryRunResponse(
        loss="0.25", accounting=pb.ACCOUNTING_PURE_DP, cells=4, mechanism="discrete_laplace",
        noise_scale=4, tau=19, half_width=12, confidence=0.95, assumed_count=20,
        expected_suppressed_share=0.3, fingerprint="ab" * 32, already_released=True,
    ))
    assert dry.cost == 0 and "already released" in repr(dry)
    assert json.loads(json.dumps(dry.to_dict()))["cost"] == "0"
    budget = Budget.from_pb(pb.Budget(
        client_id="alice", role=pb.ROLE_RESEARCHER, accounting=pb.ACCOUNTING_PURE_DP,
        cap="2", spent="1/3", reserved="0", remaining="5/3", dataset_remaining="4.5",
    ))
    assert budget.remaining == Fraction(5, 3) and budget.institution_cap is None
    assert "remaining 5/3" in repr(budget) and budget.to_dict()["dataset_remaining"] == "4.5"
    canonical = json.dumps({
        "by": ["gender"], "codebook": "ctdc@7", "measure": {"flag_counts": "sexType"},
        "where": {"and": [{"in": ["Minor"], "missing": False, "var": "majorityStatus"},
                          {"in": [], "missing": True, "var": "gender"}]},
    })
    assert describe_canonical(canonical) == (
        "flag counts of sexType by gender where majorityStatus = 'Minor' AND gender IS NULL"
    )
    assert describe_canonical("not json") == "not json"


def test_a_suppressed_share_reads_as_na_not_nan() -> None:
    pd = pytest.importorskip("pandas")
    table = pa.table({
        "gender": ["Male", "Female", None],
        "value": pa.array([0.25, None, None], pa.float64()),
        "ci_low": pa.array([0.1, None, None], pa.float64()),
        "ci_high": pa.array([0.4, None, None], pa.float64()),
        "suppressed": [False, True, True],
    })
    frame = Release.from_pb(response(table, "Proportion")).to_pandas()
    hidden = frame[frame["suppressed"]]
    for name in ("value", "ci_low", "ci_high"):
        assert str(frame[name].dtype) == "Float64"
        assert all(v is pd.NA for v in hidden[name])  # <NA>, as for counts, not a float NaN
    assert frame["value"][0] == 0.25


def test_the_summary_says_what_the_call_cost(release: Release) -> None:
    # Asked at 0.2 and given a stored release made at 0.5: the line says why the loss is not the
    # one asked for, and that nothing was paid.
    stored = response(count_table())
    stored.charged = "0"
    replay = Release.from_pb(stored)
    assert replay.replayed
    assert replay.summary().endswith(
        "epsilon 0.5, discrete_laplace scale 2, tau 15 (k 10); 3 of 6 cells suppressed; "
        "released before, so free of charge; release rel_1"
    )
    paid = response(count_table())
    paid.charged = "0.5"
    assert not Release.from_pb(paid).replayed
    assert "free" not in Release.from_pb(paid).summary()
    # Fetched again, the server does not say what the first call cost: nothing is claimed.
    assert not release.replayed and "free" not in release.summary()


def test_the_summary_and_the_dry_run_state_the_empty_cells_expected_by_chance(
    release: Release,
) -> None:
    assert "expected to be empty" not in release.summary()  # not recorded: nothing is claimed
    chance = {"empty_pass_probability": 0.01936, "expected_empty_published_bound": 6.196}
    stated = Release.from_pb(response(count_table(), **chance))
    assert stated.metadata.expected_empty_published_bound == 6.196
    line = ("published cells expected to be empty ones passing by chance: at most 6.2 "
            "(each empty cell passes with probability 2.0%)")
    assert line in stated.summary() and "\n" not in stated.summary()
    assert line in repr(stated) and line in stated._repr_html_()
    assert json.loads(stated.to_json())["metadata"]["expected_empty_published_bound"] == 6.196
    wire = pb.DryRunResponse(
        loss="0.1", accounting=pb.ACCOUNTING_PURE_DP, cells=320, mechanism="discrete_laplace",
        noise_scale=10, tau=33, half_width=30, confidence=0.95, assumed_count=20,
        expected_suppressed_share=0.86, fingerprint="ab" * 32, **chance,
    )
    dry = DryRun.from_pb(wire)
    assert line in repr(dry)
    assert dry.to_dict()["expected_empty_published_bound"] == 6.196
    assert dry.to_dict()["empty_pass_probability"] == 0.01936
    wire.ClearField("expected_empty_published_bound")
    older = DryRun.from_pb(wire)  # a server older than the field
    assert older.expected_empty_published_bound is None and "by chance" not in repr(older)


@pytest.mark.parametrize(("value", "text"), [
    (6.196, "6.2"), (6.2, "6.2"), (6.21, "6.3"), (0.0123, "0.013"), (123.4, "124"),
    (1936.2, "1,937"), (2.0e-7, "2.0e-07"), (0.0, "0"),
])
def test_ceilings_are_rounded_up(value: float, text: str) -> None:
    assert client.display.rounded_up(value) == text


# ---- errors from a status -----------------------------------------------------------------------


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str,
                 trailers: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailers


def test_a_refusal_to_slow_down_is_retried_with_growing_waits() -> None:
    # Threads of one client refused together (its rate, or its calls running) and told the same
    # short wait would come back together and be refused together again: each retry waits at
    # least the server's hint and backs off as a server that is down is backed off.
    from client.connection import Client

    retry = client.Retry(attempts=6, initial_backoff=0.25, max_backoff=8.0, jitter=0.2)
    veil_client = Client("127.0.0.1:1", token="veil_x", retry=retry)
    slow_down = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls running",
                          (("retry-after", "0.100"),))
    waits = [veil_client._transient(slow_down, a, patience=120) for a in range(1, 9)]
    for attempt, wait in enumerate(waits, start=1):
        base = min(8.0, 0.25 * 2 ** (attempt - 1))
        assert wait is not None and base <= wait <= base * 1.2, (attempt, wait)
    # Not a failure: waited out past the tries a failure gets, while the call's deadline allows
    # (a client's calls beyond its cap wait for the ones running, which may take a minute).
    assert veil_client._transient(slow_down, 20, patience=120) is not None
    assert veil_client._transient(slow_down, 20, patience=5) is None  # past the deadline
    # A hint longer than the backoff is waited out as given; one far beyond it is not waited.
    later = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (("retry-after", "3"),))
    assert veil_client._transient(later, 1, patience=120) == 3.0
    never = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (("retry-after", "60"),))
    assert veil_client._transient(never, 1, patience=120) is None
    # A failure (the server down) still stops when the tries are spent.
    down = FakeError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    assert veil_client._transient(down, 5, patience=120) is not None
    assert veil_client._transient(down, 6, patience=120) is None
    # A host name that does not exist is not retried (it took 4 s to say so), and is named as
    # such; a lookup that failed for a while is retried.
    for details in (
        "errors resolving nohost.invalid:50051: [field:hostname lookup error:address lookup "
        "failed for nohost.invalid:50051: Domain name not found]",
        "DNS resolution failed for nohost.invalid:50051: C-ares status is not ARES_SUCCESS "
        "qtype=A name=nohost.invalid is_balancer=0: Domain name not found",
        "errors resolving nohost.invalid:50051: [field:hostname lookup error:address lookup "
        "failed for nohost.invalid:50051: Misformatted domain name]",
    ):
        unknown = FakeError(grpc.StatusCode.UNAVAILABLE, details)
        assert veil_client._transient(unknown, 1, patience=120) is None
        error = from_rpc_error(unknown, address="nohost.invalid:50051")
        assert isinstance(error, client.ServerUnavailable)
        assert str(error).startswith(
            "cannot reach the veil server at nohost.invalid:50051: no host has that name ("
        )
    for details in ("errors resolving veil.example.org:50051: Timeout while contacting DNS "
                    "servers", "DNS resolution failed for veil.example.org:50051"):
        flaky = FakeError(grpc.StatusCode.UNAVAILABLE, details)
        assert veil_client._transient(flaky, 1, patience=120) is not None
        error = from_rpc_error(flaky, address="veil.example.org:50051")
        assert str(error).startswith("cannot reach the veil server at veil.example.org:50051: ")
        assert "no host has that name" not in str(error)
    # With retries off, a refusal to slow down is reported at once.
    hasty = Client("127.0.0.1:1", token="veil_x", retry=client.Retry(attempts=1))
    assert hasty._transient(slow_down, 1, patience=120) is None
    hasty.close()
    veil_client.close()


def test_waiting_to_be_let_in_uses_neither_a_failures_tries_nor_more_than_the_timeout() -> None:
    import itertools

    from client.connection import Client

    fast = client.Retry(attempts=3, initial_backoff=0.001, max_backoff=0.002, jitter=0.0)
    veil_client = Client("127.0.0.1:1", token="veil_x", retry=fast, timeout=5.0)
    slow_down = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls running",
                          (("retry-after", "0.001"),))
    down = FakeError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    outcomes: list[Any] = [slow_down] * 5 + [down, down, pb.Budget(client_id="x")]
    deadlines: list[float] = []

    class Stub:
        def GetBudget(self, request: Any, *, metadata: Any, timeout: float) -> Any:
            deadlines.append(timeout)
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

    veil_client._stub = Stub()
    # Five refusals to slow down, then two failures: the failures still have their third try.
    assert veil_client._call("GetBudget", pb.GetBudgetRequest()).client_id == "x"
    assert len(deadlines) == 8
    # Every try is given what is left of the call's 5 s, not 5 s again.
    assert deadlines[0] <= 5.0 and all(b < a for a, b in itertools.pairwise(deadlines))
    veil_client.close()


def test_errors_a_researcher_can_read() -> None:
    failure = status_pb2.QuotaFailure(violations=[
        status_pb2.QuotaFailure.Violation(subject="institution", description="0.1 remains")
    ])
    status = status_pb2.RpcStatus(code=8, message="over budget")
    detail = status.details.add()
    detail.type_url = "type.googleapis.com/google.rpc.QuotaFailure"
    detail.value = failure.SerializeToString()
    budget = from_rpc_error(FakeError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "over budget",
        (("grpc-status-details-bin", status.SerializeToString()),
         ("veil-budget-remaining", "0.1")),
    ))
    assert isinstance(budget, client.BudgetExhausted)
    assert budget.scope == "institution" and budget.remaining == Decimal("0.1")
    assert isinstance(budget.remaining, client.Amount) and str(budget.remaining) == "0.1"
    for text, expected in (("0.300000000000001", Fraction(300000000000001, 10**15)),
                           ("a lot", None), ("1/3", Fraction(1, 3))):
        other = from_rpc_error(FakeError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "over budget",
            (("grpc-status-details-bin", status.SerializeToString()),
             ("veil-budget-remaining", text)),
        ))
        assert isinstance(other, client.BudgetExhausted)
        assert other.remaining == expected and other.remaining_text == text  # exact, or None

    invalid = from_rpc_error(FakeError(grpc.StatusCode.INVALID_ARGUMENT, "gender: no",
                                       (("veil-variable", "gender"),)))
    assert isinstance(invalid, client.InvalidQuery) and invalid.variable == "gender"
    limited = from_rpc_error(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down",
                                       (("retry-after", "1.500"),)))
    assert isinstance(limited, client.RateLimited) and limited.retry_after == 1.5
    assert str(limited) == "slow down; retry in 1.50 s"
    # The server's own message already says when (veil's rate limiter does): said once.
    told = from_rpc_error(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    "rate limit reached; retry in 0.40 s",
                                    (("retry-after", "0.400"),)))
    assert str(told) == "rate limit reached; retry in 0.40 s" and told.retry_after == 0.4
    timeout = from_rpc_error(FakeError(grpc.StatusCode.DEADLINE_EXCEEDED, "late"),
                             request_id="req-9")
    assert isinstance(timeout, client.QueryTimeout) and "req-9" in str(timeout)
    down = from_rpc_error(FakeError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all "
                                    "addresses"), address="h:1", tls=False)
    assert isinstance(down, client.ServerUnavailable) and "cannot reach" in str(down)
    # A release lost on its way back (the connection broken, the call cancelled) may have been
    # charged: the message must not say it was not, and must say how to get it back free.
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        lost = from_rpc_error(FakeError(code, "Socket closed"), request_id="req-7")
        assert "nothing was charged" not in str(lost)
        assert "retry with request_id='req-7' to be charged at most once" in str(lost)
        assert "--request-id req-7" in lost.shell_message
    # A channel that has answered a call before lost its connection, not its security: no
    # hint about TLS, which before the first answer may be the trouble.
    first = from_rpc_error(FakeError(grpc.StatusCode.UNAVAILABLE, "Socket closed"), tls=False)
    later = from_rpc_error(FakeError(grpc.StatusCode.UNAVAILABLE, "Socket closed"), tls=False,
                           answered=True)
    assert "tls=True" in str(first) and "TLS" not in str(later)
    table = {
        grpc.StatusCode.UNAUTHENTICATED: client.AuthenticationError,
        grpc.StatusCode.PERMISSION_DENIED: client.PermissionDenied,
        grpc.StatusCode.FAILED_PRECONDITION: client.RequestConflict,
        grpc.StatusCode.NOT_FOUND: client.NotFound,
        grpc.StatusCode.CANCELLED: client.Cancelled,
        grpc.StatusCode.INTERNAL: client.ServerFault,
    }
    for code, cls in table.items():
        error = from_rpc_error(FakeError(code, "why"))
        assert type(error) is cls and error.code == code.name


@pytest.mark.parametrize("series", [4, 14, 25])
def test_plot_gives_every_series_a_colour_of_its_own(series: int) -> None:
    """Each hue category gets its own colour, in the bars and in the legend, however many there
    are; a category whose every cell is suppressed (no bar drawn) included."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    groups = [f"group {g}" for g in range(series)]
    flags = ["a", "b"]
    rows = [(f, g) for f in flags for g in groups]
    # The second group is suppressed everywhere, as (missing) often is.
    values = [None if g == groups[1] else 20 + i for i, (f, g) in enumerate(rows)]
    table = pa.table({
        "flag": [f for f, _ in rows],
        "caseGroup": [g for _, g in rows],
        "value": pa.array(values, pa.int64()),
        "ci_low": [None if v is None else v - 5.0 for v in values],
        "ci_high": [None if v is None else v + 5.0 for v in values],
        "suppressed": [v is None for v in values],
    })
    release = Release.from_pb(response(table, "FlagCounts"), query=flag_counts("x").by("caseGroup"))
    ax = release.plot(horizontal=True)
    try:
        legend = ax.get_legend()
        shown = {
            text.get_text(): to_hex(handle.get_facecolor())
            for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)
            if text.get_text() != "suppressed"
        }
        assert list(shown) == groups
        assert len(set(shown.values())) == series, shown
        drawn: dict[str, set[str]] = {}
        for container in ax.containers:
            label = container.get_label()
            if label in shown:
                drawn[label] = {to_hex(p.get_facecolor()) for p in container.patches}
        for label, colours in drawn.items():
            assert colours <= {shown[label]}, label  # bars in the legend's colour
    finally:
        plt.close("all")


@pytest.mark.parametrize(("value", "text"), [
    (0.073, "7.3%"), (0.00046, "0.046%"), (0.9995, "99.950%"), (0.005, "0.50%"),
    (0.0, "0.0%"), (1.0, "100.0%"), (0.5, "50.0%"),
])
def test_a_rare_share_keeps_two_significant_figures(value: float, text: str) -> None:
    # At one decimal a share of 0.046% and its interval [0.01%, 0.09%] all read 0.0%.
    assert client.results.share_text(value) == text


def share_table() -> pa.Table:
    return pa.table({
        "gender": ["Female"],
        "value": pa.array([0.00046], pa.float64()),
        "ci_low": pa.array([0.0001], pa.float64()),
        "ci_high": pa.array([0.0009], pa.float64()),
        "suppressed": [False],
    })


def test_a_share_says_the_records_missing_its_condition_are_in_its_base() -> None:
    asked = proportion(isAbduction=1).by("gender")
    shown = Release.from_pb(response(share_table(), "Proportion"), query=asked)
    assert "0.046%  [0.010%, 0.090%]" in shown.to_text()
    assert (
        "each share is of all the cell's records, those whose isAbduction is missing included "
        '(add .where(Present("isAbduction")) for the share among the records that have it)'
    ) in shown.summary()
    from_sql = replace(asked, spelling="sql")
    assert "(add isAbduction IS NOT NULL for" in Release.from_pb(
        response(share_table(), "Proportion"), query=from_sql
    ).summary()
    # A filter on the variable is the researcher's own choice of base: nothing to add.
    among = asked.where(Present("isAbduction"))
    assert "share is of" not in Release.from_pb(
        response(share_table(), "Proportion"), query=among
    ).summary()
    assert "share is of" not in Release.from_pb(response(count_table()), query=count()).summary()


def test_the_share_base_note_is_given_where_it_holds_and_helps() -> None:
    from client.query import Eq, Missing, Not, Or
    from client.results import share_base_text

    # A condition about missingness: leaving the missing out would make every share 0 or 1.
    assert share_base_text(proportion(Missing("ageBroad")).by("gender")) == ""
    assert share_base_text(proportion(Not(Missing("ageBroad")))) == ""
    # A filter that names the variable but keeps its missing records: the note still holds.
    for where in (
        Or(Missing("ageBroad"), Eq("gender", "Male")),
        Not(Eq("ageBroad", "9--17")),
    ):
        note = share_base_text(proportion(ageBroad="0--8").where(where))
        assert "those whose ageBroad is missing included" in note, where
    # One that keeps only records with a value: nothing to say.
    assert share_base_text(proportion(ageBroad="0--8").where(ageBroad=["0--8", "9--17"])) == ""
    assert share_base_text(proportion(ageBroad="0--8").where(Present("ageBroad"))) == ""


def test_a_share_dry_run_forecasts_suppression_from_the_records_meeting_its_condition() -> None:
    wire = pb.DryRunResponse(
        loss="0.3", accounting=pb.ACCOUNTING_PURE_DP, cells=16, mechanism="discrete_laplace",
        noise_scale=3.3, tau=21, half_width=10, confidence=0.95, assumed_count=3000,
        expected_suppressed_share=0.0, fingerprint="ab" * 32, measure="Proportion",
    )
    text = repr(DryRun.from_pb(wire, proportion(isOrganRemoval=1).by("gender")))
    assert (
        "a share is published when the noisy count of its records that meet the condition "
        "reaches tau = 21, whatever the cell's size; if 3000 of a cell's records meet it"
    ) in text
    assert "a cell of 3000 records is suppressed" not in text
    assert "those whose isOrganRemoval is missing included" in text
    wire.measure = "Count"
    assert "a cell of 3000 records is suppressed with probability 0.0%" in repr(
        DryRun.from_pb(wire, count().by("gender"))
    )


def test_a_cell_is_named_by_the_release_keys_in_any_case(release: Release) -> None:
    assert release.cell(GENDER="Female", AgeBroad=None).value == 45
    with pytest.raises(KeyError, match="citizenship is not a key of this release; its keys are: "
                                       "gender, ageBroad"):
        release.cell(gender="Female", ageBroad=None, citizenship=None)
    by_gender = Release.from_pb(response(pa.table({
        "gender": pa.array(["Male", "Female", None], pa.string()),
        "value": pa.array([120, None, 30], pa.int64()),
        "ci_low": [114.0, None, 24.0], "ci_high": [126.0, None, 36.0],
        "suppressed": [False, True, False],
    })), query=count().by("gender"))
    assert by_gender.cell(gender="Male").value == 120
    # A dimension the release is not grouped by is not its missing key.
    with pytest.raises(KeyError, match="ageBroad is not a key"):
        by_gender.cell(gender="Male", ageBroad=None)
    with pytest.raises(KeyError, match="named twice"):
        release.cell(gender="Male", GENDER="Female")


def test_every_amount_is_an_exact_amount_that_prints_as_the_server_wrote_it() -> None:
    pd = pytest.importorskip("pandas")
    from client.results import ReceivedRelease, ReleaseList

    budget = Budget.from_pb(pb.Budget(
        client_id="alice", role=pb.ROLE_RESEARCHER, accounting=pb.ACCOUNTING_PURE_DP,
        cap="3", spent="0.4", reserved="0", remaining="2.6", dataset_remaining="4.5",
    ))
    sent = response(count_table())
    sent.charged = "0.5"
    release = Release.from_pb(sent)
    listed = ReceivedRelease.from_pb(pb.MyRelease(
        release_id="rel_1", request_id="r", fingerprint="f" * 64,
        canonical_query='{"measure": "count", "by": ["gender"], "where": true}',
        charged="0.5", release_loss="0.5", received_at="2026-11-22T10:00:00Z",
    ))
    refused = from_rpc_error(FakeError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "over budget",
        (("veil-budget-scope", "client"), ("veil-budget-remaining", "2.6")),
    ))
    assert isinstance(refused, client.BudgetExhausted)
    dry = DryRun.from_pb(pb.DryRunResponse(loss="0.5", fingerprint="ab" * 32), budget=budget)
    amounts = [budget.cap, budget.spent, budget.remaining, budget.dataset_remaining,
               release.charged, release.metadata.loss, listed.charged, listed.release_loss,
               refused.remaining, dry.loss, dry.cost, dry.remaining_after,
               *budget.scopes_remaining().values()]
    for value in amounts:
        assert type(value) is client.Amount, value
    # str() is the server's exact text, not a ratio; arithmetic stays exact and an Amount.
    assert str(budget.remaining) == "2.6" and repr(budget.remaining) == "Amount('2.6')"
    assert budget.remaining == refused.remaining == Fraction(13, 5) == Decimal("2.6")
    left = budget.remaining - release.charged
    assert type(left) is client.Amount and str(left) == "2.1" and left > 2
    assert str(dry.remaining_after) == "2.1" and budget.spent + Fraction(1, 10) == Fraction(1, 2)
    assert json.loads(json.dumps(release.metadata.to_dict()))["loss"] == "0.5"
    assert json.loads(json.dumps(dry.to_dict()))["loss"] == "0.5"
    frame = ReleaseList([listed]).to_pandas()
    for name in ("charged", "release_loss"):
        assert pd.api.types.is_float_dtype(frame[name]) and frame[name][0] == 0.5
    assert list(ReleaseList().to_pandas().columns) == list(frame.columns)


def test_a_saved_release_keeps_what_was_paid_and_reads_back_whole() -> None:
    canonical = json.dumps({
        "by": ["ageBroad", "gender"], "codebook": "ctdc@7", "measure": "count",
        "where": {"in": ["Minor"], "missing": False, "var": "majorityStatus"},
    })
    query = count().by("gender", "ageBroad").where(majorityStatus="Minor")
    stored = response(count_table(), canonical_query=canonical)
    stored.charged = "0"  # a stored release, returned free
    replayed = Release.from_pb(stored, query=query, request_id="r-2")
    paid = Release.from_pb(response(count_table(), canonical_query=canonical), query=query,
                           request_id="req-1")
    paid.charged = client.Amount("0.5")
    fetched = Release.from_pb(response(count_table(), canonical_query=canonical))
    for saved, charged, free in ((paid, "0.5", False), (replayed, "0", True),
                                 (fetched, None, None)):
        document = json.loads(saved.to_json())
        assert document["request"]["charged"] == charged
        assert document["request"]["replayed"] is free
        again = Release.from_json(saved.to_json())
        assert again.to_json() == saved.to_json()
        assert again.table.equals(saved.table) and again.table.schema == saved.table.schema
        assert again.cells == saved.cells and again.metadata == saved.metadata
        assert (again.charged, again.replayed) == (saved.charged, saved.replayed)
        assert again.request_id == saved.request_id and again.keys == saved.keys
        assert Release.from_json(document).to_dict() == document  # the parsed dict too
    share = Release.from_pb(response(pa.table({
        "gender": ["Male", None], "value": pa.array([0.25, None], pa.float64()),
        "ci_low": pa.array([0.1, None], pa.float64()),
        "ci_high": pa.array([0.4, None], pa.float64()), "suppressed": [False, True],
    }), "Proportion"))
    flags = Release.from_pb(response(pa.table({
        "majorityStatus": ["Minor", "Minor"], "flag": ["a", "b"],
        "value": pa.array([20, None], pa.int64()), "ci_low": [14.0, None],
        "ci_high": [26.0, None], "suppressed": [False, True],
    }), "FlagCounts"))
    for saved in (share, flags):
        again = Release.from_json(saved.to_json())
        assert again.to_json() == saved.to_json() and again.table.equals(saved.table)
        assert again.keys == saved.keys and again.dimensions == saved.dimensions
    with pytest.raises(ValueError, match="not a saved veil release"):
        Release.from_json('{"format": "something else"}')


def reasons_table(status: bool = True) -> pa.Table:
    """A share by majorityFromAge where majorityFromAge = 'Minor': Minor published, Adult and
    missing empty by the query's terms (no value, marked suppressed), Unknown under tau."""
    columns: dict[str, Any] = {
        "majorityFromAge": pa.array(["Minor", "Adult", "Unknown", None], pa.string()),
        "value": pa.array([0.25, None, None, None], pa.float64()),
        "ci_low": pa.array([0.2, None, None, None], pa.float64()),
        "ci_high": pa.array([0.3, None, None, None], pa.float64()),
        "suppressed": [False, True, True, True],
    }
    if status:
        columns["status"] = ["published", "empty", "suppressed", "empty"]
    return pa.table(columns)


def test_a_cell_empty_by_the_query_is_told_from_one_suppressed_under_tau() -> None:
    pd = pytest.importorskip("pandas")
    share = Release.from_pb(response(reasons_table(), "Proportion", unreachable_cells=2),
                            query=proportion(isAbduction=1).by("majorityFromAge"))
    assert [c.status for c in share] == ["published", "empty", "suppressed", "empty"]
    assert [c.suppressed for c in share] == [False, True, True, True]  # kept as it was
    assert share.cell(majorityFromAge="Adult").status == "empty"
    frame = share.to_pandas()
    assert list(frame["status"]) == ["published", "empty", "suppressed", "empty"]
    assert frame[frame["status"] == "empty"]["value"].isna().all()
    assert pd.isna(frame["value"][2])
    rows = list(csv.DictReader(io.StringIO(share.to_csv())))
    assert [r["status"] for r in rows] == ["published", "empty", "suppressed", "empty"]
    document = json.loads(share.to_json())
    assert [c["status"] for c in document["cells"]] == ["published", "empty", "suppressed",
                                                         "empty"]
    assert client.results.cells_from_json(document) == share.cells
    assert Release.from_json(document).cells == share.cells
    lines = share.to_text().splitlines()
    assert lines[0].split()[-1] == "status"
    assert lines[3].split()[-1] == "empty" and lines[4].split()[-1] == "suppressed"
    # The metadata's suppressed_cells counts the cells marked (3); the summary, those withheld.
    assert share.metadata.suppressed_cells == 3 and share.metadata.suppressed_by_rule == 1
    assert "1 of 4 cells suppressed" in share.summary()
    assert "2 cells empty by the query's own terms (status empty" in share.summary()
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = share.plot()
    try:
        texts = [t.get_text() for t in ax.texts]
        assert texts.count("empty") == 2 and texts.count("suppressed") == 1
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["suppressed", "empty by the query's terms"]
    finally:
        plt.close("all")


def test_a_release_stored_before_the_status_still_reads_with_one_derived() -> None:
    from pathlib import Path

    from engine.release import Release as StoredRelease
    from server.convert import release_to_pb

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "release-before-empty-bound.arrows"
    stored = StoredRelease.from_bytes(fixture.read_bytes())
    assert "status" not in stored.table.column_names
    old = Release.from_pb(release_to_pb(stored), query=count().by("gender"))
    assert [c.status for c in old] == ["suppressed", "published", "suppressed", "suppressed"]
    assert old.table.column_names[-2:] == ["suppressed", "status"] and old.keys == ["gender"]
    assert json.loads(old.to_json())["cells"][1]["status"] == "published"
    assert "3 of 4 cells suppressed" in old.summary()
    # A count or sum stated as 0 [0, 0] was empty by the query's terms (a published count is at
    # least tau); an old share's empty cell was only marked suppressed, and reads so.
    stated = pa.table({
        "majorityStatus": ["Minor", "Adult"], "value": pa.array([40, 0], pa.int64()),
        "ci_low": [34.0, 0.0], "ci_high": [46.0, 0.0], "suppressed": [False, False],
    })
    assert [c.status for c in Release.from_pb(response(stated))] == ["published", "empty"]
    old_share = Release.from_pb(response(reasons_table(status=False), "Proportion"))
    assert [c.status for c in old_share] == ["published", "suppressed", "suppressed",
                                             "suppressed"]
    # When every cell an old share marked suppressed is one its query rules out (its count says
    # so), they are all empty; with others withheld beside them, which are is not known.
    two_empty = reasons_table(status=False).slice(0, 2)
    assert [c.status for c in Release.from_pb(
        response(two_empty, "Proportion", unreachable_cells=1))] == ["published", "empty"]
    assert [c.status for c in Release.from_pb(
        response(reasons_table(status=False), "Proportion", unreachable_cells=2)
    )] == ["published", "suppressed", "suppressed", "suppressed"]
    # A JSON document saved before cells had a status reads back with it derived too.
    document = json.loads(Release.from_pb(response(stated)).to_json())
    for c in document["cells"]:
        del c["status"]
    assert [c.status for c in Release.from_json(document)] == ["published", "empty"]
    assert [c.status for c in client.results.cells_from_json(document)] == ["published", "empty"]


def test_the_status_column_has_one_type_whatever_the_release_came_from() -> None:
    """Dictionary-encoded over the statuses, as the server writes it: tables from the server,
    from an older server (derived) and from a saved document concatenate and compare."""
    sent = Release.from_pb(response(reasons_table(), "Proportion", unreachable_cells=2))
    derived = Release.from_pb(response(reasons_table(status=False), "Proportion"))
    saved = Release.from_json(json.loads(sent.to_json()))
    types = {r.table.column("status").type for r in (sent, derived, saved)}
    assert len(types) == 1 and pa.types.is_dictionary(types.pop())
    assert pa.concat_tables([sent.table, saved.table]).num_rows == 8
    assert saved.table.equals(sent.table)


def test_a_dimension_named_status_is_refused_not_read_as_the_cells_status() -> None:
    """An older server's codebook could name a variable `status`: its keys are not statuses."""
    table = pa.table({
        "status": ["open", "closed"], "value": pa.array([40, 50], pa.int64()),
        "ci_low": [34.0, 44.0], "ci_high": [46.0, 56.0], "suppressed": [False, False],
    })
    with pytest.raises(ValueError, match="groups by a variable named 'status'"):
        Release.from_pb(response(table))


def test_a_release_whose_cost_is_unknown_claims_nothing_in_its_document() -> None:
    fetched = Release.from_pb(response(count_table()))  # no charge sent: fetched again
    assert fetched.charged is None and fetched.replayed is None
    request = json.loads(fetched.to_json())["request"]
    assert request["charged"] is None and request["replayed"] is None
    sent = response(count_table())
    sent.charged = "0"
    request = json.loads(Release.from_pb(sent).to_json())["request"]
    assert request["charged"] == "0" and request["replayed"] is True


def test_an_amount_formats_as_its_exact_text() -> None:
    """f"{amount}" is "0.3", not "3/10" (Fraction formats itself so from Python 3.13); a width
    aligns the text; a float presentation type formats the number."""
    value = client.Amount(3, 10)
    assert f"{value}" == "0.3" and f"[{value:>5}]" == "[  0.3]" and f"{value:<4}|" == "0.3 |"
    assert f"{value:.2f}" == "0.30" and f"{value:.0%}" == "30%"


def test_the_clients_copies_of_the_release_columns_and_statuses_are_the_engines() -> None:
    """The client ships without the engine, so it names the columns and statuses again; they
    must not drift. A status column as the server writes it is taken as it is."""
    import numpy as np

    from client.results import STATUSES, VALUE_COLUMNS, with_status
    from engine.codebook import CELL_COLUMNS
    from engine.release import STATUSES as ENGINE_STATUSES
    from engine.release import cell_status

    assert (STATUSES, VALUE_COLUMNS) == (ENGINE_STATUSES, CELL_COLUMNS)
    table = pa.table({
        "gender": ["Male", "Female"], "value": pa.array([40, None], pa.int64()),
        "ci_low": [34.0, None], "ci_high": [46.0, None], "suppressed": [False, True],
        "status": cell_status(np.array([True, False]), np.array([False, False])),
    })
    assert with_status(table, "Count") is table
