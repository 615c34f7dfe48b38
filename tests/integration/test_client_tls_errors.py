"""What the client says, and whether it retries, when TLS stands between it and a real server:
plaintext against TLS, an unknown CA, a missing or foreign client certificate under mutual TLS,
from Python and from the `veil` command. Certificates are made here with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import client
import veil_cli
from client.connection import TLS, Retry
from server.auth import hash_token, new_token
from tests.client_harness import start_server
from tests.server_harness import LiveServer


@dataclass(frozen=True)
class PKI:
    """PEM files: a CA, a server certificate for localhost and 127.0.0.1, client certificates
    signed by the CA (a researcher's, `client.crt`, and an auditor's), and a second CA with a
    client certificate of its own (one the server does not trust)."""

    root: Path

    def __getitem__(self, name: str) -> Path:
        return self.root / name


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, *, issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey, ca: bool = False,
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(root: Path, client_id: str) -> PKI:
    """The CA, server and client files under `root`; the client certificate names `client_id`."""
    pem = serialization.Encoding.PEM
    for prefix in ("", "other-"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = f"veil test {prefix}CA"
        ca = _certificate(ca_name, ca_key, issuer=ca_name, issuer_key=ca_key, ca=True)
        (root / f"{prefix}ca.crt").write_bytes(ca.public_bytes(pem))
        client_key = ec.generate_private_key(ec.SECP256R1())
        signed = _certificate(client_id, client_key, issuer=ca_name, issuer_key=ca_key)
        (root / f"{prefix}client.crt").write_bytes(signed.public_bytes(pem))
        _write_key(root / f"{prefix}client.key", client_key)
        if not prefix:
            auditor_key = ec.generate_private_key(ec.SECP256R1())
            auditor = _certificate(AUDITOR_ID, auditor_key, issuer=ca_name, issuer_key=ca_key)
            (root / "auditor.crt").write_bytes(auditor.public_bytes(pem))
            _write_key(root / "auditor.key", auditor_key)
            server_key = ec.generate_private_key(ec.SECP256R1())
            names: list[x509.GeneralName] = [
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
            server = _certificate("localhost", server_key, issuer=ca_name, issuer_key=ca_key,
                                  names=names)
            (root / "server.crt").write_bytes(server.public_bytes(pem))
            _write_key(root / "server.key", server_key)
    return PKI(root)


CLIENT_ID = "tls-researcher"
AUDITOR_ID = "tls-auditor"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"), CLIENT_ID)


def _server(root: Path, pki: PKI, *, mutual: bool) -> tuple[LiveServer, str]:
    """A TLS server (requiring client certificates when `mutual`) and a token of CLIENT_ID."""
    tls = {"cert": str(pki["server.crt"]), "key": str(pki["server.key"])}
    if mutual:
        tls["client_ca"] = str(pki["ca.crt"])
    live = start_server(root, tls=tls)
    token = new_token()
    live.ledger.register_client(CLIENT_ID, role="researcher", cap="5",
                                token_hash=hash_token(token))
    return live, token


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, pki: PKI
) -> Iterator[tuple[LiveServer, str]]:
    live, token = _server(tmp_path_factory.mktemp("tls"), pki, mutual=False)
    yield live, token
    live.stop()


@pytest.fixture(scope="module")
def mtls_server(
    tmp_path_factory: pytest.TempPathFactory, pki: PKI
) -> Iterator[tuple[LiveServer, str]]:
    live, token = _server(tmp_path_factory.mktemp("mtls"), pki, mutual=True)
    yield live, token
    live.stop()


FAST = Retry(attempts=5, initial_backoff=0.01, max_backoff=0.02)


def _failure(veil_client: client.Client) -> tuple[client.VeilError, list[str]]:
    """The error a budget call raises, and the retries made before it."""
    retries: list[str] = []
    veil_client.on_retry = lambda method, attempt, wait, reason: retries.append(reason)
    with veil_client, pytest.raises(client.VeilError) as raised:
        veil_client.budget()
    return raised.value, retries


def veil(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = veil_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_plaintext_against_tls_names_python_keyword_and_shell_options(
    tls_server: tuple[LiveServer, str], pki: PKI, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    live, token = tls_server
    monkeypatch.delenv("VEIL_CA_CERT", raising=False)
    error, _ = _failure(client.connect(f"127.0.0.1:{live.port}", token=token, retry=FAST))
    assert isinstance(error, client.ServerUnavailable)
    assert "Socket closed" in str(error) and "connect with tls=True" in str(error)

    code, out, err = veil(capsys, "budget", "--server", f"127.0.0.1:{live.port}",
                          "--token", token, "--retries", "1", "-q")
    assert code == 5 and out == ""
    assert "tls=True" not in err
    assert "pass --tls, with --ca-cert PEM or VEIL_CA_CERT for a private CA" in err
    # The shell's advice is right: with the CA, the same command succeeds.
    code, _, err = veil(capsys, "budget", "--server", f"localhost:{live.port}",
                        "--token", token, "--ca-cert", str(pki["ca.crt"]), "-q")
    assert code == 0, err


def test_a_missing_client_certificate_is_named(
    mtls_server: tuple[LiveServer, str], pki: PKI, capsys: pytest.CaptureFixture[str],
) -> None:
    live, token = mtls_server
    address = f"localhost:{live.port}"
    error, _ = _failure(client.connect(address, token=token, tls=TLS(ca_cert=pki["ca.crt"]),
                                       retry=FAST))
    assert isinstance(error, client.ServerUnavailable)
    assert "the server may require a client certificate" in str(error)
    assert "tls=client.TLS(ca_cert=..., client_cert=..., client_key=...)" in str(error)

    code, _, err = veil(capsys, "budget", "--server", address, "--token", token,
                        "--ca-cert", str(pki["ca.crt"]), "--retries", "1", "-q")
    assert code == 5
    assert "the server may require a client certificate: pass --client-cert PEM and " \
        "--client-key PEM" in err
    assert "client.TLS" not in err

    # A certificate from a CA the server does not trust is named as such.
    foreign = TLS(ca_cert=pki["ca.crt"], client_cert=pki["other-client.crt"],
                  client_key=pki["other-client.key"])
    error, _ = _failure(client.connect(address, token=token, tls=foreign, retry=FAST))
    assert "the server may not accept this client certificate" in str(error)
    code, _, err = veil(capsys, "budget", "--server", address, "--token", token,
                        "--ca-cert", str(pki["ca.crt"]), "--client-cert",
                        str(pki["other-client.crt"]), "--client-key",
                        str(pki["other-client.key"]), "--retries", "1", "-q")
    assert code == 5 and "check --client-cert and --client-key" in err

    # With the client's own certificate the call goes through.
    code, _, err = veil(capsys, "budget", "--server", address, "--token", token,
                        "--ca-cert", str(pki["ca.crt"]), "--client-cert",
                        str(pki["client.crt"]), "--client-key", str(pki["client.key"]), "-q")
    assert code == 0, err


def test_a_tls_file_that_cannot_be_read_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt --ca-cert, --client-cert or --client-key (or tls=, TLS(...)) says which file
    it could not read and what it was to be: it read "[Errno 2] No such file or directory:
    'ca.pem'", which names neither. It stays an OSError of the same kind for Python."""
    monkeypatch.delenv("VEIL_CA_CERT", raising=False)
    missing = tmp_path / "no-such.pem"
    with pytest.raises(FileNotFoundError, match=r"cannot read the CA certificate .*no-such\.pem"):
        client.connect("localhost:50051", token="veil_x", tls=str(missing))
    with pytest.raises(FileNotFoundError, match=r"cannot read the client key .*no-such\.pem"):
        TLS(client_cert=b"pem", client_key=missing).credentials()
    code, _, err = veil(capsys, "budget", "--server", "localhost:50051", "--token", "veil_x",
                        "--client-cert", str(missing), "--client-key", str(missing), "-q")
    assert code == 1
    assert f"cannot read the client certificate {missing}: No such file or directory" in err
    assert "[Errno" not in err


def test_a_refused_handshake_is_not_retried(
    tls_server: tuple[LiveServer, str], pki: PKI, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    live, token = tls_server
    # The server's certificate is not signed by the CA given: the same on every try.
    untrusted = TLS(ca_cert=pki["other-ca.crt"])
    error, retries = _failure(
        client.connect(f"localhost:{live.port}", token=token, tls=untrusted, retry=FAST)
    )
    assert isinstance(error, client.ServerUnavailable)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) and "check the CA certificate" in str(error)
    assert retries == []
    code, _, err = veil(capsys, "budget", "--server", f"localhost:{live.port}", "--token",
                        token, "--ca-cert", str(pki["other-ca.crt"]))
    assert code == 5 and "retry" not in err.lower()
    assert "--ca-cert PEM or VEIL_CA_CERT" in err and "tls=" not in err

    # A certificate that does not name the host the client asked for.
    renamed = TLS(ca_cert=pki["ca.crt"], server_name="elsewhere.example")
    error, retries = _failure(
        client.connect(f"localhost:{live.port}", token=token, tls=renamed, retry=FAST)
    )
    assert "does not name this host" in str(error) and retries == []

    # TLS against a plaintext server.
    plain = start_server(tmp_path / "plain")
    try:
        error, retries = _failure(client.connect(
            f"127.0.0.1:{plain.port}", token=token, tls=TLS(ca_cert=pki["ca.crt"]), retry=FAST
        ))
        assert "this server may not use TLS; connect with tls=False" in str(error)
        assert retries == []
    finally:
        plain.stop()


def test_a_server_that_is_down_is_still_retried(
    tls_server: tuple[LiveServer, str], pki: PKI
) -> None:
    live, token = tls_server
    # Nobody listening ("Connection refused"), over TLS and without: every try is made.
    for tls in (TLS(ca_cert=pki["ca.crt"]), False):
        error, retries = _failure(client.connect("127.0.0.1:1", token=token, tls=tls,
                                                 retry=FAST))
        assert isinstance(error, client.ServerUnavailable) and "cannot reach" in str(error)
        assert len(retries) == FAST.attempts - 1
    # "Socket closed" is also what a server stopping mid-connection gives: still retried.
    _, retries = _failure(client.connect(f"127.0.0.1:{live.port}", token=token, tls=False,
                                         retry=FAST))
    assert len(retries) == FAST.attempts - 1


def test_the_auditors_commands_speak_mutual_tls(
    mtls_server: tuple[LiveServer, str], pki: PKI, capsys: pytest.CaptureFixture[str],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    live, researcher = mtls_server
    auditor = new_token()
    live.ledger.register_client(AUDITOR_ID, role="auditor", cap="0",
                                token_hash=hash_token(auditor))
    monkeypatch.setenv("VEIL_TOKEN", auditor)
    monkeypatch.delenv("VEIL_CA_CERT", raising=False)
    report = tmp_path / "report.html"
    audit = ["audit", "report", "--server", f"localhost:{live.port}", "--ca-cert",
             str(pki["ca.crt"]), "--timeout", "10", "--out", str(report)]
    # Without a client certificate the handshake is refused: no report, an error's exit status.
    code, _, err = veil(capsys, *audit)
    assert code == 2 and "UNAVAILABLE" in err and not report.exists()
    # With the auditor's own certificate, the tables come back over the same channel.
    mutual = ["--client-cert", str(pki["auditor.crt"]), "--client-key", str(pki["auditor.key"])]
    code, out, err = veil(capsys, *audit, *mutual)
    assert code == 0, err
    assert "ledger verified" in report.read_text() and "wrote" in out
    # `veil attack` connects the same way, as the researcher whose token and certificate it
    # holds (its injection probes spend nothing).
    monkeypatch.setenv("VEIL_TOKEN", researcher)
    code, out, err = veil(capsys, "attack", "--server", f"localhost:{live.port}", "--ca-cert",
                          str(pki["ca.crt"]), "--client-cert", str(pki["client.crt"]),
                          "--client-key", str(pki["client.key"]), "--attack", "injection")
    assert code in (0, 3), err
    assert "injection" in out and "UNAVAILABLE" not in out + err
