"""Authentication and roles through a real channel: tokens, revocation, roles, audit, TLS."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc
from server.auth import hash_token
from tests.server_harness import LiveServer, bearer, count_query, start_live, stubs
from tests.unit.test_server_auth import EXPECTED_ROLES


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = start_live(tmp_path)
    yield server
    server.stop()


OK = grpc.StatusCode.OK


def denied_entries(live: LiveServer) -> list[dict[str, object]]:
    return [e.entry for e in live.ledger.audit_log() if e.entry["event"] == "auth_denied"]


def code_of(call, request, metadata):  # type: ignore[no-untyped-def]
    try:
        call(request, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def test_no_token_wrong_token_and_bad_scheme(live: LiveServer) -> None:
    with stubs(live.port) as s:
        cases = [
            ((), "missing credential"),
            (bearer("veil_not-a-real-token"), "not valid"),
            ((("authorization", f"Basic {live.tokens['alice']}"),), "missing credential"),
            ((("authorization", "Bearer"),), "missing credential"),
            ((("authorization", "Bearer " + "x" * 300),), "missing credential"),
        ]
        for metadata, says in cases:
            code, details = code_of(s.research.GetCodebook, pb.GetCodebookRequest(), metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED and says in details
            code, _ = code_of(
                s.research.Release,
                pb.ReleaseRequest(request_id="r", query=count_query("gender"), loss="0.5"),
                metadata,
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED
    entries = denied_entries(live)
    assert len(entries) == 2 * len(cases)
    assert all(e["outcome"] == "refused" for e in entries)
    assert {e["detail"]["method"] for e in entries} == {  # type: ignore[index]
        "/veil.v1.Research/GetCodebook",
        "/veil.v1.Research/Release",
    }
    # No token, and nothing about any token, is written to the audit log.
    assert all(live.tokens["alice"] not in str(e) for e in entries)
    assert live.ledger.charges() == []


def test_revoked_and_rotated_tokens(live: LiveServer) -> None:
    with stubs(live.port) as s:
        alice = live.auth("alice")
        assert code_of(s.research.GetBudget, pb.GetBudgetRequest(), alice)[0] == grpc.StatusCode.OK
        live.ledger.revoke("alice", reason="test")
        code, details = code_of(s.research.GetBudget, pb.GetBudgetRequest(), alice)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details

        bob = live.auth("bob")
        rotated = s.admin.RotateToken(
            pb.RotateTokenRequest(client_id="bob"), metadata=live.auth("root")
        )
        assert (
            code_of(s.research.GetBudget, pb.GetBudgetRequest(), bob)[0]
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            code_of(s.research.GetBudget, pb.GetBudgetRequest(), bearer(rotated.token))[0]
            == grpc.StatusCode.OK
        )
    revoked, rotated_away = denied_entries(live)
    # A revoked client still calling is named in the log (the caller is told no more than
    # before); a token rotated away names nobody: it is no longer any client's.
    assert revoked["client"] == "alice"
    assert revoked["detail"]["reason"] == "revoked client's token"  # type: ignore[index]
    assert rotated_away["client"] in (None, "")
    assert rotated_away["detail"]["reason"] == "unknown or rotated token"  # type: ignore[index]
    assert live.ledger.verify().ok


def test_tokens_expire(tmp_path: Path) -> None:
    """Tokens issued or rotated with `server.token_days` set are refused once expired, with a
    message that says so and an audited refusal."""
    live = start_live(tmp_path, server={"token_days": 30})
    try:
        with stubs(live.port) as s:
            root = live.auth("root")
            before = datetime.now(UTC)
            rotated = s.admin.RotateToken(pb.RotateTokenRequest(client_id="bob"), metadata=root)
            expires = datetime.fromisoformat(rotated.expires_at.replace("Z", "+00:00"))
            assert timedelta(days=30) <= expires - before <= timedelta(days=30, minutes=1)
            listed = {c.client_id: c for c in s.admin.ListClients(pb.ListClientsRequest(),
                                                                  metadata=root).clients}
            assert listed["bob"].token_expires_at == rotated.expires_at
            assert listed["alice"].token_expires_at == ""  # issued without an expiry
            fresh = bearer(rotated.token)
            assert code_of(s.research.GetBudget, pb.GetBudgetRequest(), fresh)[0] == OK

            live.ledger.set_token_hash(
                "bob", hash_token(rotated.token), expires_at=datetime.now(UTC) - timedelta(0, 1)
            )
            code, details = code_of(s.research.GetBudget, pb.GetBudgetRequest(), fresh)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "expired at" in details and "veil admin rotate bob" in details
            assert code_of(s.research.GetBudget, pb.GetBudgetRequest(), live.auth("alice"))[0] == OK
        (entry,) = denied_entries(live)
        assert (entry["client"], entry["detail"]["reason"]) == ("bob", "expired token")  # type: ignore[index]
    finally:
        live.stop()


def test_roles_decide_the_calls(live: LiveServer) -> None:
    requests = {
        "/veil.v1.Research/GetCodebook": pb.GetCodebookRequest(),
        "/veil.v1.Research/DescribeVariable": pb.DescribeVariableRequest(name="gender"),
        "/veil.v1.Research/DryRun": pb.DryRunRequest(query=count_query("gender"), loss="0.5"),
        "/veil.v1.Research/Release": pb.ReleaseRequest(
            request_id="roles", query=count_query("gender"), loss="0.25"
        ),
        "/veil.v1.Research/GetBudget": pb.GetBudgetRequest(),
        "/veil.v1.Admin/ListClients": pb.ListClientsRequest(),
        "/veil.v1.Admin/SetBudget": pb.SetBudgetRequest(client_id="bob", budget="1"),
        "/veil.v1.Audit/GetLedgerReport": pb.LedgerReportRequest(),
        "/veil.v1.Audit/ListReleases": pb.ListReleasesRequest(),
        "/veil.v1.Audit/VerifyAuditLog": pb.VerifyAuditLogRequest(),
    }
    roles = {"alice": "researcher", "audra": "auditor", "root": "admin"}
    with stubs(live.port) as s:
        for client, role in roles.items():
            for method, request in requests.items():
                call = s.channel.unary_unary(
                    method,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=lambda b: b,
                )
                code, details = code_of(call, request, live.auth(client))
                # The table written out by hand, not server.auth's own: a role wrongly let in
                # must show up here as a call that succeeds where it should be refused.
                allowed = role in {r.value for r in EXPECTED_ROLES[method]}
                if allowed:
                    assert code == grpc.StatusCode.OK, (client, method, details)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (client, method, code)
                    assert method in details and role in details
    refused = denied_entries(live)
    assert refused and all(e["client"] in roles for e in refused)
    assert any(
        e["client"] == "alice" and e["detail"]["method"] == "/veil.v1.Admin/ListClients"  # type: ignore[index]
        for e in refused
    )


def test_identity_comes_from_the_credential_only(live: LiveServer) -> None:
    # No request of the researcher's service names its caller.
    for service in ("Research",):
        for method in pb.DESCRIPTOR.services_by_name[service].methods:
            names = {f.name for f in method.input_type.fields}
            assert not any("client" in n or "user" in n or "role" in n for n in names), method.name
    with stubs(live.port) as s:
        spoofed = (
            *live.auth("bob"),
            ("x-client-id", "alice"),
            ("x-veil-client", "root"),
            ("x-role", "admin"),
        )
        assert s.research.GetBudget(pb.GetBudgetRequest(), metadata=spoofed).client_id == "bob"
        code, _ = code_of(s.admin.ListClients, pb.ListClientsRequest(), spoofed)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        s.research.Release(
            pb.ReleaseRequest(request_id="who", query=count_query("ageBroad"), loss="0.25"),
            metadata=spoofed,
        )
    assert live.ledger.spent("bob") == 0.25 and live.ledger.spent("alice") == 0


def test_refused_attempts_are_audited_at_a_bounded_rate(live: LiveServer) -> None:
    start = time.monotonic()
    with stubs(live.port) as s:
        for _ in range(90):
            code_of(s.research.GetCodebook, pb.GetCodebookRequest(), bearer("veil_guess"))
    elapsed = time.monotonic() - start
    # Every attempt is refused; the audit log records them at up to 60 a minute per peer
    # (a burst of 60, then one a second).
    assert 60 <= len(denied_entries(live)) <= 61 + elapsed
    # One more, once the peer may be recorded again: its entry counts those left out.
    time.sleep(1.1)
    with stubs(live.port) as s:
        code_of(s.research.GetCodebook, pb.GetCodebookRequest(), bearer("veil_guess"))
    entries = denied_entries(live)
    counted = [1 + int(dict(e["detail"]).get("unrecorded_before", 0)) for e in entries]  # type: ignore[call-overload]
    assert sum(counted) == 91 and counted[-1] > 1
    assert live.ledger.verify().ok


def test_a_flood_of_bad_tokens_does_not_keep_a_known_clients_refusals_out_of_the_log(
    live: LiveServer,
) -> None:
    # Garbage from one address spends that address's allowance; a registered client's attempt
    # on an administrator's method, from the same address, is still recorded under its name.
    with stubs(live.port) as s:
        for _ in range(70):
            code_of(s.research.GetCodebook, pb.GetCodebookRequest(), bearer("veil_garbage"))
        for target in ("mallory1", "mallory2", "mallory3"):
            request = pb.RegisterClientRequest(client_id=target, role=pb.ROLE_ADMIN)
            code, _ = code_of(s.admin.RegisterClient, request, live.auth("bob"))
            assert code == grpc.StatusCode.PERMISSION_DENIED
    named = [e for e in denied_entries(live) if e["client"] == "bob"]
    assert len(named) == 3
    assert all(e["detail"]["method"] == "/veil.v1.Admin/RegisterClient" for e in named)  # type: ignore[index]


def test_health_and_unknown_methods_without_a_token(live: LiveServer) -> None:
    """A health check needs no credential; a method the server does not have is refused as
    unimplemented, not as unauthenticated, and reaches no servicer."""
    with stubs(live.port) as s:
        health = health_pb2_grpc.HealthStub(s.channel)
        response = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        call = s.channel.unary_unary("/veil.v1.Research/DropTables")
        with pytest.raises(grpc.RpcError) as error:
            call(b"", timeout=5)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- TLS -----------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost and client certificates for alice (by common
    name) and bob (by a subject alternative name), made with openssl."""
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=veil test CA",
        cwd=d,
    )
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "bob.ext").write_text("subjectAltName=DNS:bob\n")
    for name, subject, extra in (
        ("server", "server", ["-extfile", "server.ext"]),
        ("alice", "alice", []),
        ("bob", "a researcher", ["-extfile", "bob.ext"]),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={subject}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            *extra,
            cwd=d,
        )
    return d


def _secure_call(port: int, pki: Path, token: str, *, cert: str | None) -> grpc.StatusCode:
    """A call with `token` over TLS, presenting the client certificate `cert` (or none)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / f"{cert}.key").read_bytes() if cert else None,
        certificate_chain=(pki / f"{cert}.crt").read_bytes() if cert else None,
    )
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        stub = pb_grpc.ResearchStub(channel)
        try:
            stub.GetBudget(pb.GetBudgetRequest(), metadata=bearer(token), timeout=5)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_tls_and_mutual_tls(tmp_path: Path, certificates: Path) -> None:
    tls = {"cert": str(certificates / "server.crt"), "key": str(certificates / "server.key")}
    server = start_live(tmp_path / "tls", tls=tls)
    try:
        assert (
            _secure_call(server.port, certificates, server.tokens["alice"], cert=None)
            == grpc.StatusCode.OK
        )
        with stubs(server.port) as s:  # plaintext to a TLS port fails
            with pytest.raises(grpc.RpcError) as error:
                s.research.GetBudget(
                    pb.GetBudgetRequest(), metadata=server.auth("alice"), timeout=3
                )
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
    mutual = start_live(tmp_path / "mtls", tls={**tls, "client_ca": str(certificates / "ca.crt")})
    try:
        alice, bob = mutual.tokens["alice"], mutual.tokens["bob"]
        # Each token works over its own client's certificate, named by CN or by SAN.
        assert _secure_call(mutual.port, certificates, alice, cert="alice") == grpc.StatusCode.OK
        assert _secure_call(mutual.port, certificates, bob, cert="bob") == grpc.StatusCode.OK
        assert (
            _secure_call(mutual.port, certificates, alice, cert=None) == grpc.StatusCode.UNAVAILABLE
        )
        # A token that leaked is useless over another client's certificate.
        assert (
            _secure_call(mutual.port, certificates, alice, cert="bob")
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            _secure_call(mutual.port, certificates, bob, cert="alice")
            == grpc.StatusCode.UNAUTHENTICATED
        )
        refused = denied_entries(mutual)
        assert [(e["client"], e["detail"]["reason"]) for e in refused] == [  # type: ignore[index]
            ("alice", "the client certificate does not name the token's client"),
            ("bob", "the client certificate does not name the token's client"),
        ]
    finally:
        mutual.stop()
    unbound = start_live(
        tmp_path / "unbound",
        tls={**tls, "client_ca": str(certificates / "ca.crt"), "bind_client_ids": False},
    )
    try:
        token = unbound.tokens["alice"]
        assert _secure_call(unbound.port, certificates, token, cert="bob") == grpc.StatusCode.OK
    finally:
        unbound.stop()


# ---- a file that is not a ledger -----------------------------------------------------------------


def test_a_file_that_is_not_a_ledger_is_named(tmp_path: Path) -> None:
    from engine.errors import LedgerUnavailableError

    notes = tmp_path / "ledger.sqlite"  # where start_live's config puts the ledger
    notes.write_text("these are notes, not a ledger\n" * 200)
    with pytest.raises(LedgerUnavailableError) as raised:
        start_live(tmp_path).stop()
    assert str(raised.value) == (
        f"cannot open the ledger {notes.absolute()}: the file is not a ledger database "
        "(SQLITE_NOTADB)"
    )


def test_the_ledger_commands_name_a_file_that_is_not_a_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import veil_cli

    (tmp_path / "notes.sqlite").write_text("these are notes, not a ledger\n" * 200)
    monkeypatch.chdir(tmp_path)
    for command in ("report", "verify"):
        assert veil_cli.main(["ledger", command, "notes.sqlite"]) == 2
        assert capsys.readouterr().err == (
            f"error: cannot read the ledger {tmp_path / 'notes.sqlite'}: the file is not a "
            "ledger database (SQLITE_NOTADB)\n"
        )
