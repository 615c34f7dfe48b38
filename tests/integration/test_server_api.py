"""The real server on port 0, over a real ledger, called through a real channel: the contract."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.release import Release
from protos.veil.v1 import status_pb2
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1.trailers import QUOTA_FAILURE_TYPE_URL
from server.accounts import LOCAL_ACTOR, LedgerAccounts
from server.cli import _start
from tests.conftest import write_database
from tests.server_harness import (
    ROWS,
    LiveServer,
    charges_settled,
    count_query,
    live_config,
    start_live,
    stubs,
)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = start_live(tmp_path)
    yield server
    server.stop()


def release(live: LiveServer, client: str, request_id: str, query: pb.Query, loss: str = "0.5"):  # type: ignore[no-untyped-def]
    with stubs(live.port) as s:
        return s.research.Release(
            pb.ReleaseRequest(request_id=request_id, query=query, loss=loss),
            metadata=live.auth(client),
        )


def test_codebook_browsing(live: LiveServer) -> None:
    with stubs(live.port) as s:
        response = s.research.GetCodebook(pb.GetCodebookRequest(), metadata=live.auth("alice"))
        names = {v.name for v in response.codebook.variables}
        assert {"gender", "ageBroad", "citizenship", "meansOfControlConcatenated"} <= names
        gender = next(v for v in response.codebook.variables if v.name == "gender")
        assert gender.kind == pb.VARIABLE_KIND_CATEGORY and gender.queryable
        assert [c.code for c in gender.categories] == [
            "Male",
            "Female",
            "Transgender/NonConforming",
        ]
        concatenated = next(
            v for v in response.codebook.variables if v.name == "meansOfControlConcatenated"
        )
        assert not concatenated.queryable and concatenated.flag_set == "meansOfControl"
        assert {f.name for f in response.codebook.flag_sets} >= {"meansOfControl", "labourType"}
        region = next(d for d in response.codebook.derived if d.name == "citizenshipRegion")
        assert region.group_of["PH"] == "Asia" and "Unknown" in region.groups
        deployment = response.deployment
        assert deployment.accounting == pb.ACCOUNTING_PURE_DP and deployment.k == 10
        assert deployment.data_version == "test" and deployment.max_cells == 100_000

        year = s.research.DescribeVariable(
            pb.DescribeVariableRequest(name="yearOfRegistration"), metadata=live.auth("alice")
        )
        assert year.variable.low == 2002 and year.variable.high == 2021
        flag_set = s.research.DescribeVariable(
            pb.DescribeVariableRequest(name="sexType"), metadata=live.auth("alice")
        )
        assert flag_set.WhichOneof("item") == "flag_set" and len(flag_set.flag_set.flags) == 4
        with pytest.raises(grpc.RpcError) as error:
            s.research.DescribeVariable(
                pb.DescribeVariableRequest(name="nope"), metadata=live.auth("alice")
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nope" in (error.value.details() or "")


def test_dry_run_costs_nothing(live: LiveServer) -> None:
    with stubs(live.port) as s:
        by_loss = s.research.DryRun(
            pb.DryRunRequest(query=count_query("gender"), loss="0.5"), metadata=live.auth("alice")
        )
        assert by_loss.loss == "0.5" and by_loss.cells == 4 and by_loss.tau >= 10
        assert (
            by_loss.mechanism == "discrete_laplace" and 0 <= by_loss.expected_suppressed_share <= 1
        )
        assert not by_loss.already_released
        by_width = s.research.DryRun(
            pb.DryRunRequest(query=count_query("gender"), half_width=5), metadata=live.auth("alice")
        )
        assert by_width.half_width <= 5 and Fraction(by_width.loss) > 0
    assert live.ledger.budget("client", "alice").used == 0
    assert live.ledger.charges() == []


def test_release_is_charged_and_replayed(live: LiveServer) -> None:
    first = release(live, "alice", "r-1", count_query("gender"))
    metadata = first.metadata
    assert (
        metadata.loss == "0.5"
        and metadata.cells == 4
        and metadata.accounting == pb.ACCOUNTING_PURE_DP
    )
    assert metadata.release_id and metadata.charge_id and metadata.fingerprint
    table = pa.ipc.open_stream(first.arrow_ipc).read_all()
    assert table.column_names == ["gender", "value", "ci_low", "ci_high", "suppressed", "status"]
    assert table.num_rows == 4
    # The bytes are the engine's release, metadata included.
    assert Release.from_bytes(first.arrow_ipc).metadata.release_id == metadata.release_id
    assert live.ledger.spent("alice") == Fraction(1, 2)

    # A retry with the same request id: the stored release, byte for byte, no second charge.
    again = release(live, "alice", "r-1", count_query("gender"))
    assert again.arrow_ipc == first.arrow_ipc
    # The same query from another client: reused at no charge.
    other = release(live, "bob", "b-1", count_query("gender"))
    assert other.metadata.release_id == metadata.release_id
    assert live.ledger.spent("alice") == Fraction(1, 2) and live.ledger.spent("bob") == 0

    with stubs(live.port) as s:
        dry = s.research.DryRun(
            pb.DryRunRequest(query=count_query("gender"), loss="0.5"), metadata=live.auth("bob")
        )
        assert dry.already_released
        # Asked at a smaller loss, the dry run prices the stored release that would be
        # returned (made at 0.5), not a fresh draw at 0.1.
        cheaper = s.research.DryRun(
            pb.DryRunRequest(query=count_query("gender"), loss="0.1"), metadata=live.auth("bob")
        )
        assert cheaper.already_released
        assert (cheaper.loss, cheaper.half_width) == (dry.loss, dry.half_width)
        assert cheaper.tau == dry.tau
        assert cheaper.noise_scale == metadata.noise_scale
        dearer = s.research.DryRun(
            pb.DryRunRequest(query=count_query("gender"), loss="0.75"), metadata=live.auth("bob")
        )
        assert not dearer.already_released and dearer.loss == "0.75"
        budget = s.research.GetBudget(pb.GetBudgetRequest(), metadata=live.auth("alice"))
    assert (budget.client_id, budget.role, budget.institution) == (
        "alice",
        pb.ROLE_RESEARCHER,
        "iom",
    )
    assert (budget.cap, budget.spent, budget.remaining) == ("2", "0.5", "1.5")
    assert budget.dataset_remaining == "4.5"


def test_request_id_reused_for_another_query(live: LiveServer) -> None:
    release(live, "alice", "r-1", count_query("gender"))
    with pytest.raises(grpc.RpcError) as error:
        release(live, "alice", "r-1", count_query("ageBroad"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert live.ledger.spent("alice") == Fraction(1, 2)


def test_budget_exceeded_carries_a_quota_failure(live: LiveServer) -> None:
    with pytest.raises(grpc.RpcError) as error:
        release(live, "bob", "b-1", count_query("gender"), loss="1.5")
    rpc = error.value
    assert rpc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "client budget of bob" in (rpc.details() or "")
    trailers = dict(rpc.trailing_metadata() or ())
    assert trailers["veil-budget-scope"] == "client"
    assert trailers["veil-budget-remaining"] == "1"
    status = status_pb2.RpcStatus.FromString(trailers["grpc-status-details-bin"])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    (detail,) = status.details
    assert detail.type_url == QUOTA_FAILURE_TYPE_URL
    quota = status_pb2.QuotaFailure.FromString(detail.value)
    assert quota.violations[0].subject == "client"
    assert live.ledger.spent("bob") == 0 and charges_settled(live.ledger)


def test_every_measure_releases(live: LiveServer) -> None:
    queries = {
        "flags": pb.Query(
            measure=pb.Measure(flag_counts=pb.FlagCountsMeasure(flag_set="exploitationType")),
            by=["gender"],
        ),
        "sum": pb.Query(measure=pb.Measure(sum=pb.SumMeasure(variable="yearOfRegistration"))),
        "mean": pb.Query(
            measure=pb.Measure(mean=pb.MeanMeasure(variable="yearOfRegistration")), by=["gender"]
        ),
        "share": pb.Query(
            measure=pb.Measure(
                proportion=pb.ProportionMeasure(
                    condition=pb.Filter(
                        equals=pb.Equals(variable="majorityFromAge", value=pb.Value(text="Minor"))
                    )
                )
            ),
            by=["citizenshipRegion"],
            where=pb.Filter(between=pb.Between(variable="yearOfRegistration", low=2010)),
        ),
    }
    for i, (name, query) in enumerate(queries.items()):
        response = release(live, "alice", f"m-{i}", query, loss="0.25")
        table = pa.ipc.open_stream(response.arrow_ipc).read_all()
        assert table.num_rows == response.metadata.cells, name
        assert {"value", "ci_low", "ci_high", "suppressed"} <= set(table.column_names)
    assert live.ledger.spent("alice") == 1


def test_admin_lifecycle(live: LiveServer) -> None:
    with stubs(live.port) as s:
        admin = live.auth("root")
        made = s.admin.RegisterClient(
            pb.RegisterClientRequest(
                client_id="carol", role=pb.ROLE_RESEARCHER, institution="unodc", budget="0.75"
            ),
            metadata=admin,
        )
        assert made.token.startswith("veil_") and made.client.cap == "0.75"
        carol = (("authorization", f"Bearer {made.token}"),)
        assert s.research.GetBudget(pb.GetBudgetRequest(), metadata=carol).remaining == "0.75"

        raised = s.admin.SetBudget(
            pb.SetBudgetRequest(client_id="carol", budget="1"), metadata=admin
        )
        assert raised.client.cap == "1"
        default = s.admin.RegisterClient(
            pb.RegisterClientRequest(client_id="dave", role=pb.ROLE_RESEARCHER), metadata=admin
        )
        assert default.client.cap == "1"  # caps.client from the config

        rotated = s.admin.RotateToken(pb.RotateTokenRequest(client_id="carol"), metadata=admin)
        with pytest.raises(grpc.RpcError) as old:
            s.research.GetBudget(pb.GetBudgetRequest(), metadata=carol)
        assert old.value.code() == grpc.StatusCode.UNAUTHENTICATED
        carol = (("authorization", f"Bearer {rotated.token}"),)
        assert s.research.GetBudget(pb.GetBudgetRequest(), metadata=carol).client_id == "carol"

        listed = s.admin.ListClients(pb.ListClientsRequest(), metadata=admin)
        assert {c.client_id for c in listed.clients} >= {"alice", "bob", "carol", "dave", "root"}

        revoked = s.admin.RevokeClient(
            pb.RevokeClientRequest(client_id="carol", reason="left the project"), metadata=admin
        )
        assert revoked.client.revoked
        with pytest.raises(grpc.RpcError) as gone:
            s.research.GetBudget(pb.GetBudgetRequest(), metadata=carol)
        assert gone.value.code() == grpc.StatusCode.UNAUTHENTICATED

        with pytest.raises(grpc.RpcError) as duplicate:
            s.admin.RegisterClient(
                pb.RegisterClientRequest(client_id="alice", role=pb.ROLE_RESEARCHER, budget="1"),
                metadata=admin,
            )
        assert duplicate.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as missing:
            s.admin.SetBudget(pb.SetBudgetRequest(client_id="nobody", budget="1"), metadata=admin)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as role:
            s.admin.RegisterClient(
                pb.RegisterClientRequest(client_id="erin", budget="1"), metadata=admin
            )
        assert role.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_admin_actions_record_the_acting_admin(live: LiveServer) -> None:
    first = int(live.ledger.head().partition(":")[0])
    with stubs(live.port) as s:
        root = live.auth("root")
        ops = s.admin.RegisterClient(
            pb.RegisterClientRequest(client_id="ops", role=pb.ROLE_ADMIN), metadata=root
        )
        by_ops = (("authorization", f"Bearer {ops.token}"),)
        s.admin.RegisterClient(
            pb.RegisterClientRequest(client_id="carol", role=pb.ROLE_RESEARCHER), metadata=by_ops
        )
        s.admin.SetBudget(pb.SetBudgetRequest(client_id="carol", budget="2"), metadata=root)
        s.admin.RotateToken(pb.RotateTokenRequest(client_id="carol"), metadata=by_ops)
        s.admin.RevokeClient(
            pb.RevokeClientRequest(client_id="carol", reason="left the project"), metadata=root
        )
    entries = [e.entry for e in live.ledger.audit_log(since=first)]
    assert [(e["event"], e["client"], e["detail"]["actor"]) for e in entries] == [  # type: ignore[index]
        ("register_client", "ops", "root"),
        ("register_client", "carol", "ops"),
        ("set_cap", "carol", "root"),
        ("set_token", "carol", "ops"),
        ("revoke", "carol", "root"),
    ]
    assert entries[-1]["detail"]["reason"] == "left the project"  # type: ignore[index]
    assert live.ledger.verify().ok


def test_changes_made_by_serve_itself_record_the_local_actor(tmp_path: Path) -> None:
    data = write_database(tmp_path / "data.duckdb", ROWS)
    config = live_config(tmp_path, data, caps={"institutions": {"iom": "3"}})
    running, _ = _start(config, init_admin="ops")
    try:
        assert isinstance(running.accounts, LedgerAccounts)
        entries = [e.entry for e in running.accounts.ledger.audit_log()]
    finally:
        running.stop(0)
    opening = ("create", "open")  # the ledger's own entries
    acted = [(e["event"], e["detail"]["actor"]) for e in entries if e["event"] not in opening]  # type: ignore[index]
    assert acted == [
        ("set_institution_cap", LOCAL_ACTOR),  # from the config
        ("register_client", LOCAL_ACTOR),  # --init-admin
    ]
    # A later start with another dataset cap changes the ledger's default, as serve.
    config = live_config(tmp_path, data, caps={"dataset": "7", "institutions": {"iom": "3"}})
    running, _ = _start(config)
    try:
        assert isinstance(running.accounts, LedgerAccounts)
        last = [e.entry for e in running.accounts.ledger.audit_log()][-2]
    finally:
        running.stop(0)
    assert (last["event"], last["detail"]["actor"]) == ("set_dataset_cap", LOCAL_ACTOR)  # type: ignore[index]


def test_auditor_calls(live: LiveServer) -> None:
    release(live, "alice", "r-1", count_query("gender"))
    release(live, "bob", "b-1", count_query("ageBroad"), loss="0.25")
    with stubs(live.port) as s:
        auditor = live.auth("audra")
        report = s.audit.GetLedgerReport(pb.LedgerReportRequest(), metadata=auditor)
        rows = {(r.scope, r.name): r for r in report.rows}
        assert rows[("client", "alice")].spent == "0.5" and rows[("client", "alice")].releases == 1
        assert rows[("institution", "iom")].spent == "0.5"
        assert rows[("dataset", "ctdc")].spent == "0.75"
        assert '"accounting": "pure_dp"' in report.report_json

        listed = s.audit.ListReleases(pb.ListReleasesRequest(), metadata=auditor)
        assert [(r.client_id, r.request_id) for r in listed.releases] == [
            ("alice", "r-1"),
            ("bob", "b-1"),
        ]
        only_bob = s.audit.ListReleases(pb.ListReleasesRequest(client_id="bob"), metadata=auditor)
        assert [r.loss for r in only_bob.releases] == ["0.25"]

        verified = s.audit.VerifyAuditLog(pb.VerifyAuditLogRequest(), metadata=auditor)
        assert verified.ok and verified.entries > 0 and not verified.problem
        # Administrators may audit too; researchers may not.
        assert s.audit.VerifyAuditLog(pb.VerifyAuditLogRequest(), metadata=live.auth("root")).ok
        with pytest.raises(grpc.RpcError) as error:
            s.audit.VerifyAuditLog(pb.VerifyAuditLogRequest(), metadata=live.auth("alice"))
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_ledger_that_cannot_write_gives_unavailable(live: LiveServer) -> None:
    live.ledger.close()
    with pytest.raises(grpc.RpcError) as error:
        release(live, "alice", "r-1", count_query("gender"))
    # Authentication reads the ledger: the call fails closed, and says why.
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "ledger is closed" in (error.value.details() or "")


def test_ledger_unavailable_during_release(tmp_path: Path) -> None:
    from engine.errors import LedgerUnavailableError

    server = start_live(tmp_path)
    try:
        ledger = server.ledger
        original = ledger.reserve

        def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise LedgerUnavailableError(
                "cannot reserve the charge: the disk holding the ledger is full"
            )

        ledger.reserve = failing  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as error:
            release(server, "alice", "r-1", count_query("gender"))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "disk" in (error.value.details() or "")
        ledger.reserve = original  # type: ignore[method-assign]
        assert release(server, "alice", "r-2", count_query("gender")).metadata.loss == "0.5"
    finally:
        server.stop()


def test_health_needs_no_token(live: LiveServer) -> None:
    with stubs(live.port) as s:
        health = health_pb2_grpc.HealthStub(s.channel)
        for service in ("", "veil.v1.Research", "veil.v1.Admin", "veil.v1.Audit"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_only_when_configured(tmp_path: Path) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    plain = start_live(tmp_path / "plain")
    try:
        with stubs(plain.port) as s, pytest.raises(grpc.RpcError):
            list(ProtoReflectionDescriptorDatabase(s.channel).get_services())
    finally:
        plain.stop()
    reflecting = start_live(tmp_path / "reflecting", server={"reflection": True})
    try:
        with stubs(reflecting.port) as s:
            services = set(ProtoReflectionDescriptorDatabase(s.channel).get_services())
        assert {"veil.v1.Research", "veil.v1.Admin", "veil.v1.Audit"} <= services
    finally:
        reflecting.stop()


def test_logs_are_json_lines_without_values_or_tokens(tmp_path: Path) -> None:
    import io
    import json
    import logging

    from server.app import configure_logging

    stream = io.StringIO()
    handler = configure_logging("info", stream=stream)
    server = start_live(tmp_path)
    try:
        response = release(server, "alice", "r-1", count_query("gender"))
        with stubs(server.port) as s, pytest.raises(grpc.RpcError):
            s.research.GetBudget(pb.GetBudgetRequest(), metadata=(("authorization", "Bearer x"),))
    finally:
        server.stop()
        handler.close()
        for name in ("veil", "grpc"):  # give the loggers back to pytest
            logging.getLogger(name).handlers = []
            logging.getLogger(name).propagate = True
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    calls = [line for line in lines if line.get("event") == "call"]
    assert calls and calls[-1]["method"] == "/veil.v1.Research/Release"
    assert calls[-1]["release_id"] == response.metadata.release_id
    allowed = {
        "ts",
        "level",
        "logger",
        "msg",
        "event",
        "method",
        "client",
        "code",
        "ms",
        "request_id",
        "fingerprint",
        "release_id",
    }
    assert all(set(call) <= allowed for call in calls)
    assert any(line.get("event") == "auth_denied" for line in lines)
    text = stream.getvalue()
    assert all(token not in text for token in server.tokens.values())
    # No cell value of the release appears in any log line.
    table = pa.ipc.open_stream(response.arrow_ipc).read_all()
    assert '"value"' not in text and "ci_low" not in text and len(table) == 4
