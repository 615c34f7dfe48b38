"""`veil admin` and `client.admin` against a real server on port 0: registering, capping,
rotating, revoking and listing clients, each checked by what the affected client can then do,
and refusals (a researcher's token, bad input) that leave the registry as it was."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import pytest

import client
import veil_cli
from client.admin import AdminClient, ClientInfo, RegistryConflict, connect_admin
from engine.ledger import ClientRecord
from tests.client_harness import add_researcher, address, start_server
from tests.server_harness import LiveServer

ROOT = Path(__file__).resolve().parents[2]
SQL = "SELECT gender, COUNT(*) FROM victims GROUP BY gender"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("admin-cli"))
    yield server
    server.stop()


@pytest.fixture
def admin_env(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """VEIL_SERVER and VEIL_TOKEN name the server and its administrator; returns the token."""
    monkeypatch.setenv("VEIL_SERVER", address(live))
    monkeypatch.setenv("VEIL_TOKEN", live.tokens["root"])
    return live.tokens["root"]


def veil(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = veil_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def new_id() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def budget_of(capsys: pytest.CaptureFixture[str], token: str) -> tuple[int, dict[str, str]]:
    code, out, _ = veil(capsys, "budget", "--token", token, "-f", "json", "-q")
    return code, (json.loads(out) if code == 0 else {})


def registry(live: LiveServer) -> list[ClientRecord]:
    return sorted(live.ledger.list_clients(), key=lambda r: r.client_id)


def test_register_prints_only_the_token_and_the_token_queries(
    live: LiveServer, admin_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client_id = new_id()
    code, out, err = veil(capsys, "admin", "register", client_id, "--institution", "iom",
                          "--budget", "0.75")
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n" and token.startswith("veil_") and " " not in token
    assert f"registered {client_id} (researcher, iom): cap 0.75" in err
    assert "remaining 0.75 of its own cap" in err  # not of the institution's or the dataset's
    assert "shown only this once" in err and token not in err
    record = live.ledger.client(client_id)
    assert (record.role, record.institution, record.cap) == ("researcher", "iom",
                                                             Fraction(3, 4))

    code, _, err = veil(capsys, "query", SQL, "--epsilon", "0.5", "--token", token, "-q")
    assert code == 0, err
    code, budget = budget_of(capsys, token)
    assert code == 0
    assert (budget["client_id"], budget["cap"], budget["spent"], budget["remaining"]) == (
        client_id, "0.75", "0.5", "0.25")

    # A cap of 0 is a budget too (a client that only audits), not a refused loss.
    auditor = new_id()
    code, out, err = veil(capsys, "admin", "register", auditor, "--role", "Auditor",
                          "--budget", "0", "-q")
    assert code == 0, err
    assert err == "" and out.strip().startswith("veil_")
    record = live.ledger.client(auditor)
    assert (record.role, record.cap) == ("auditor", Fraction(0))


def test_token_captured_by_the_shell(live: LiveServer, tmp_path: Path) -> None:
    """As TOKEN=$(veil admin register ...) would: the real command, its stdout as the token."""
    admin_token = tmp_path / "admin-token"
    admin_token.write_text(live.tokens["root"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("VEIL_TOKEN", "VEIL_SERVER")}
    client_id = new_id()
    result = subprocess.run(
        [sys.executable, "veil_cli.py", "admin", "register", client_id, "--budget", "1",
         "--server", address(live), "--token-file", str(admin_token)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "register took" in result.stderr
    with client.connect(address(live), token=result.stdout.strip()) as researcher:
        assert researcher.budget().client_id == client_id


def test_set_budget_changes_the_cap_seen_by_veil_budget(
    live: LiveServer, admin_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client_id, token = add_researcher(live, cap="1")
    code, out, err = veil(capsys, "admin", "set-budget", client_id, "2.5")
    assert code == 0, err
    assert out == "" and f"cap set: {client_id} (researcher): cap 2.5" in err
    assert budget_of(capsys, token)[1]["cap"] == "2.5"

    # Never below what was spent: refused, and the cap stays. (A query of its own: one released
    # before would come back free.)
    by_age = SQL.replace("gender", "ageBroad")
    code, _, err = veil(capsys, "query", by_age, "--epsilon", "0.5", "--token", token, "-q")
    assert code == 0, err
    code, out, err = veil(capsys, "admin", "set-budget", client_id, "0.25", "-q")
    assert code == 1 and out == ""
    assert "0.5 is already spent or held" in err and len(err.splitlines()) == 1
    assert budget_of(capsys, token)[1]["cap"] == "2.5"


def test_rotate_stops_the_old_token_and_issues_a_new_one(
    live: LiveServer, admin_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client_id, old = add_researcher(live)
    code, out, err = veil(capsys, "admin", "rotate", client_id)
    assert code == 0, err
    new = out.strip()
    assert out == new + "\n" and new.startswith("veil_") and new != old
    assert "old token no longer works" in err
    code, _, err = veil(capsys, "budget", "--token", old)
    assert code == 4 and "token" in err
    code, budget = budget_of(capsys, new)
    assert code == 0 and budget["client_id"] == client_id


def test_revoke_stops_the_token(
    live: LiveServer, admin_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client_id, token = add_researcher(live)
    assert budget_of(capsys, token)[0] == 0
    code, out, err = veil(capsys, "admin", "revoke", client_id, "--reason", "left the project")
    assert code == 0, err
    assert out == "" and f"revoked {client_id}" in err
    code, _, err = veil(capsys, "budget", "--token", token)
    assert code == 4 and "token" in err
    record = live.ledger.client(client_id)
    assert not record.active and record.revoked_at
    # Again: the client is revoked as asked (status 0), but this call changed nothing, and says
    # so rather than "revoked"; the ledger writes nothing.
    head = live.ledger.head()
    code, out, err = veil(capsys, "admin", "revoke", client_id, "--reason", "twice")
    assert (code, out) == (0, ""), err
    assert (f"veil: client {client_id} was already revoked at {record.revoked_at}; "
            "nothing changed\n") in err
    assert f"revoked {client_id}" not in err
    assert live.ledger.head() == head and live.ledger.client(client_id) == record
    # A revoked client gets no new token; register a new client instead.
    code, out, err = veil(capsys, "admin", "rotate", client_id)
    assert code == 1 and out == "" and "is revoked" in err
    with pytest.raises(SystemExit):  # argparse: the audit log wants a reason
        veil_cli.main(["admin", "revoke", client_id])


def test_list_shows_the_clients(
    live: LiveServer, admin_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    active, _ = add_researcher(live, cap="1.5", institution="unodc")
    revoked, _ = add_researcher(live, cap="2")
    live.ledger.revoke(revoked, reason="test")

    code, out, err = veil(capsys, "admin", "list", "-f", "json")
    assert code == 0, err
    found = {c["client_id"]: c for c in json.loads(out)["clients"]}
    assert {"alice", "bob", "audra", "root", active, revoked} <= set(found)
    assert found[active] == {**found[active], "role": "researcher", "institution": "unodc",
                             "cap": "1.5", "spent": "0", "remaining": "1.5", "revoked": False,
                             "revoked_at": None}
    assert found[revoked]["revoked"] is True and found[revoked]["revoked_at"]
    assert found["root"]["role"] == "admin" and found["audra"]["role"] == "auditor"

    code, out, _ = veil(capsys, "admin", "list", "--format", "csv", "-q")
    assert code == 0
    rows = {r["client_id"]: r for r in csv.DictReader(io.StringIO(out))}
    assert set(rows) == set(found)
    assert (rows[active]["institution"], rows[active]["cap"], rows[active]["revoked"]) == (
        "unodc", "1.5", "false")
    assert rows["bob"]["institution"] == "" and rows[revoked]["revoked"] == "true"

    code, out, _ = veil(capsys, "admin", "list", "-q")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["client_id", "role", "institution", "cap", "spent",
                                "left_of_cap", "status", "created_at", "token_expires"]
    # What an institution's cap leaves may be less: the table says so, not "remaining".
    assert lines[-1].startswith("left_of_cap: of the client's own cap")
    by_id = {line.split()[0]: line for line in lines[2:-1]}
    assert set(by_id) == set(found)
    assert by_id[active].split()[1:7] == ["researcher", "unodc", "1.5", "0", "1.5", "active"]
    assert "revoked 20" in by_id[revoked]
    assert by_id["alice"].split()[-1] == "never"  # registered with no expiry

    # A token issued through the server expires after the deployment's token_days.
    code, _, err = veil(capsys, "admin", "rotate", active)
    assert code == 0, err
    code, out, _ = veil(capsys, "admin", "list", "-f", "json")
    expiry = {c["client_id"]: c["token_expires_at"] for c in json.loads(out)["clients"]}
    assert expiry["alice"] is None
    left = datetime.fromisoformat(expiry[active].replace("Z", "+00:00")) - datetime.now(UTC)
    assert timedelta(days=364) < left <= timedelta(days=365)


def test_a_researchers_token_is_refused(
    live: LiveServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VEIL_SERVER", address(live))
    before = registry(live)
    for token in (live.tokens["alice"], live.tokens["audra"]):
        monkeypatch.setenv("VEIL_TOKEN", token)
        for args in (["register", new_id()], ["set-budget", "bob", "9"], ["rotate", "bob"],
                     ["revoke", "bob", "--reason", "x"], ["list"]):
            code, out, err = veil(capsys, "admin", *args, "-q")
            assert code == 4 and out == "", args
            assert "needs an administrator's token" in err and len(err.splitlines()) == 1
    assert registry(live) == before
    assert budget_of(capsys, live.tokens["bob"])[0] == 0  # bob's token was not rotated


def test_bad_input_is_refused_and_changes_nothing(
    live: LiveServer, admin_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client_id, token = add_researcher(live, cap="1")
    live.ledger.register_client(new_id(), role="researcher", institution="iom", cap="1")
    before = registry(live)
    unknown = new_id()
    cases = [
        (["register", unknown, "--role", "boss"], 2, "role must be one of researcher"),
        (["register", unknown, "--budget", "lots"], 2, "budget must be a decimal number"),
        (["register", unknown, "--budget", "-1"], 2, "budget must be a positive"),
        (["register", "not ok!"], 2, "client_id must be 1 to 64 characters"),
        (["register", client_id], 1, f"client {client_id} is already registered"),
        (["register", unknown, "--institution", "I0M"], 1, "'I0M' is 'iom' spelt differently"),
        (["set-budget", client_id, "1/3"], 2, "budget must be a decimal number"),
        (["set-budget", unknown, "2"], 1, f"client {unknown} is not registered"),
        (["rotate", unknown], 1, f"client {unknown} is not registered"),
        (["revoke", unknown, "--reason", "x"], 1, f"client {unknown} is not registered"),
        (["revoke", "root", "--reason", "x"], 1, "cannot revoke its own registration"),
    ]
    for args, status, message in cases:
        code, out, err = veil(capsys, "admin", *args, "-q")
        assert (code, out) == (status, ""), (args, err)
        assert message in err and len(err.splitlines()) == 1, (args, err)
        assert "invalid query" not in err
    assert registry(live) == before
    assert budget_of(capsys, token)[1]["cap"] == "1"


def test_the_library(live: LiveServer) -> None:
    with connect_admin(address(live), token=live.tokens["root"]) as admin:
        info, token = admin.register(new_id(), role="researcher", budget=Decimal("0.3"))
        assert isinstance(info, ClientInfo) and info.cap == Fraction(3, 10)
        assert (info.spent, info.remaining, info.revoked, info.status) == (
            Fraction(0), Fraction(3, 10), False, "active")
        assert admin.set_budget(info.client_id, Fraction(1, 2)).cap == Fraction(1, 2)
        assert info.client_id in {c.client_id for c in admin.clients()}
        new = admin.rotate_token(info.client_id)
        assert new != token and live.ledger.client(info.client_id).active
        with pytest.raises(client.AuthenticationError):
            client.connect(address(live), token=token).budget()
        assert client.connect(address(live), token=new).budget().cap == Fraction(1, 2)
        revoked = admin.revoke(info.client_id, "done")
        assert isinstance(revoked, ClientInfo)  # what revoke returned before it said more
        assert revoked.revoked and revoked.revoked_at and not revoked.already_revoked
        again = admin.revoke(info.client_id, "done")
        assert again.already_revoked and again.revoked_at == revoked.revoked_at
        with pytest.raises(client.NotFound):
            admin.rotate_token(new_id())
        with pytest.raises(RegistryConflict, match="already registered"):
            admin.register("alice")
        with pytest.raises(client.InvalidQuery):
            admin.register(new_id(), role="owner")
        with pytest.raises(client.InvalidQuery):
            admin.set_budget("alice", Fraction(1, 3))  # no exact decimal
    not_admin = AdminClient(client.connect(address(live), token=live.tokens["bob"]))
    with not_admin, pytest.raises(client.PermissionDenied):
        not_admin.clients()


class _LostReply(grpc.RpcError):
    """UNAVAILABLE as a connection reset after the server has answered would raise it."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Connection reset by peer"


class _LosesFirstReply:
    """The Admin stub, but the first RegisterClient's reply is lost after the server acted."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.calls = 0

    def RegisterClient(self, request: Any, **kw: Any) -> Any:
        self.calls += 1
        reply = self.stub.RegisterClient(request, **kw)
        if self.calls == 1:
            raise _LostReply()
        return reply


def test_a_retried_registration_says_how_to_get_a_token(live: LiveServer) -> None:
    connection = client.connect(address(live), token=live.tokens["root"],
                                retry=client.Retry(initial_backoff=0.01))
    with AdminClient(connection) as admin:
        flaky = _LosesFirstReply(admin._stub)
        admin._stub = flaky  # type: ignore[assignment]
        client_id = new_id()
        with pytest.raises(RegistryConflict, match="rotate its token") as refused:
            admin.register(client_id)
        assert flaky.calls == 2 and live.ledger.client(client_id).active
        assert refused.value.code == "FAILED_PRECONDITION"
        # Without a retry, "already registered" is only that.
        with pytest.raises(RegistryConflict) as plain:
            admin.register(client_id)
        assert "rotate" not in str(plain.value)


def test_registry_refusals_are_registry_conflicts_with_the_servers_words(
    live: LiveServer, admin_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """FAILED_PRECONDITION from the Admin service is the registry refusing a change, not a
    reused request id; a caller's `except RequestConflict` still catches it."""
    client_id, token = add_researcher(live, cap="1")
    with client.connect(address(live), token=token) as researcher:  # a query no test releases
        researcher.count().by("majorityStatus").release(epsilon=0.5, request_id=client_id)
        # A release's reused request id stays a RequestConflict, not a registry refusal.
        with pytest.raises(client.RequestConflict) as reused:
            researcher.count().release(epsilon=0.2, request_id=client_id)
        assert not isinstance(reused.value, RegistryConflict)
    revoked, _ = add_researcher(live)
    live.ledger.revoke(revoked, reason="test")
    refusals = [
        (lambda a: a.register(client_id), f"client {client_id} is already registered"),
        (lambda a: a.set_budget(client_id, "0.25"),
         f"cannot set the client cap of {client_id} to 0.25: 0.5 is already spent or held"),
        (lambda a: a.rotate_token(revoked),
         f"client {revoked} is revoked; register a new client instead"),
        (lambda a: a.revoke("root", "x"), "an administrator cannot revoke its own registration"),
    ]
    with connect_admin(address(live), token=live.tokens["root"]) as admin:
        for call, message in refusals:
            with pytest.raises(RegistryConflict) as refused:
                call(admin)
            assert str(refused.value) == refused.value.message == message
            assert refused.value.code == "FAILED_PRECONDITION"
            assert isinstance(refused.value, client.RequestConflict)

    code, out, err = veil(capsys, "admin", "register", client_id, "-q")
    assert (code, out) == (1, "")
    assert err == f"veil: refused, nothing changed: client {client_id} is already registered\n"

    # Each refused change is evidence for the auditor: in the audit log under the administrator
    # who asked, with the method and the reason, and in the refusals table.
    from engine.audit_report import build_tables

    logged = [e.entry for e in live.ledger.audit_log() if e.entry["event"] == "admin_refused"]
    reasons = [(e["client"], e["detail"]["method"], e["detail"]["reason"]) for e in logged]
    for (_, message), method in zip(
        refusals, ("RegisterClient", "SetBudget", "RotateToken", "RevokeClient"), strict=True
    ):
        assert ("root", method, message) in reasons, (method, reasons)
    assert ("root", "RegisterClient", f"client {client_id} is already registered") in reasons
    table = build_tables(live.ledger, names=["refusals"])["refusals"].to_pylist()
    assert sum(r["event"] == "admin_refused" for r in table) == len(logged) >= 5
    assert live.ledger.verify().ok


def test_a_token_pasted_into_a_refused_change_stays_out_of_the_audit_log(
    live: LiveServer,
) -> None:
    # An administrator pastes a researcher's live token where a client id or a budget goes: the
    # refusal quotes what it was given, and the audit entry must not carry the token.
    from engine.audit_report import build_tables
    from protos.veil.v1 import veil_pb2 as pb
    from tests.server_harness import stubs

    _, token = add_researcher(live)
    root = live.auth("root")
    with stubs(live.port) as s:
        for call, request in (
            (s.admin.RevokeClient, pb.RevokeClientRequest(client_id=token, reason="x")),
            (s.admin.RotateToken, pb.RotateTokenRequest(client_id=token)),
            (s.admin.SetBudget, pb.SetBudgetRequest(client_id="nobody", budget=token)),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, metadata=root, timeout=10)
            assert refused.value.code() in (
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            )
    logged = [e.entry for e in live.ledger.audit_log() if e.entry["event"] == "admin_refused"]
    assert len(logged) >= 3
    assert token not in str([e.entry for e in live.ledger.audit_log()])
    assert any("veil_<redacted>" in e["detail"]["reason"] for e in logged)
    table = build_tables(live.ledger, names=["refusals"])["refusals"]
    assert token not in str(table.to_pylist())


def test_a_token_pasted_into_a_change_that_succeeds_stays_out_of_the_audit_log(
    live: LiveServer,
) -> None:
    # A revocation's reason quoting the leaked token is stored redacted; a token offered as a
    # new client's id or institution is refused, since ids are kept and shown everywhere.
    from engine.audit_report import build_tables
    from protos.veil.v1 import veil_pb2 as pb
    from tests.server_harness import stubs

    leaked, token = add_researcher(live)
    root = live.auth("root")
    with stubs(live.port) as s:
        s.admin.RevokeClient(
            pb.RevokeClientRequest(client_id=leaked, reason=f"leaked token {token} in a repo"),
            metadata=root, timeout=10,
        )
        for request in (
            pb.RegisterClientRequest(client_id=token, role=pb.ROLE_RESEARCHER),
            pb.RegisterClientRequest(client_id="fine", role=pb.ROLE_RESEARCHER,
                                     institution=token),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                s.admin.RegisterClient(request, metadata=root, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is a bearer token" in (refused.value.details() or "")
        # Names that merely start as tokens do are ordinary ids, to register and to manage.
        s.admin.RegisterClient(
            pb.RegisterClientRequest(client_id="veil_team", role=pb.ROLE_RESEARCHER,
                                     institution="veil_lab"),
            metadata=root, timeout=10,
        )
        s.admin.RotateToken(pb.RotateTokenRequest(client_id="veil_team"), metadata=root,
                            timeout=10)
        s.admin.RevokeClient(pb.RevokeClientRequest(client_id="veil_team", reason="done"),
                             metadata=root, timeout=10)
    entries = [e.entry for e in live.ledger.audit_log()]
    assert token not in str(entries)
    (revoked,) = [e for e in entries if e["event"] == "revoke" and e["client"] == leaked]
    assert "leaked token veil_<redacted> in a repo" in str(revoked)
    tables = build_tables(live.ledger)
    assert token not in str({name: t.to_pylist() for name, t in tables.tables.items()})


@pytest.mark.parametrize("reason", ["", "  "])
def test_an_empty_revocation_reason_is_refused(
    reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--reason is required: an empty one (an unset variable expanded) is none at all."""
    with pytest.raises(SystemExit) as exited:
        veil_cli.main(["admin", "revoke", "amina", "--reason", reason,
                       "--server", "127.0.0.1:1", "--token", "veil_x"])
    assert exited.value.code == 2
    assert "argument --reason: give a reason" in capsys.readouterr().err
