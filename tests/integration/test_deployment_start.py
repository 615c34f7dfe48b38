"""A custodian starting `veil serve`: mistakes refused at start in one sentence, the log file.

Each mistake must end the start with exit status 2 and one line on standard error that names
the setting, never a traceback, and must leave nothing behind that blocks the corrected start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine.ledger import Ledger
from protos.veil.v1 import veil_pb2 as pb
from server.app import configure_logging
from server.config import ConfigError, load_config
from tests.conftest import write_database
from tests.server_harness import ROWS, count_query, start_live, stubs

ROOT = Path(__file__).resolve().parents[2]


def veil(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "veil_cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def refused(*args: str, cwd: Path) -> str:
    """Run `veil` expecting a refusal at start; its one line of standard error."""
    process = veil(*args, cwd=cwd)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2, (out, err)
    assert "Traceback" not in err and "token for" not in out
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---- certificates ----------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost, a key of no certificate, and the server key
    encrypted with a passphrase."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=custodian CA", cwd=d)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=veil",
             cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
             cwd=d)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-out", "other.key", cwd=d)
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret",
             "-out", "encrypted.key", cwd=d)
    return d


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    write_database(tmp_path / "data.duckdb", ROWS)
    return tmp_path


def write_config(root: Path, **sections: dict[str, str]) -> Path:
    text = 'data = "data.duckdb"\nledger = "ledger.sqlite"\n[caps]\ndataset = "5"\n'
    for name, values in sections.items():
        text += f"[{name}]\n" + "".join(f'{k} = "{v}"\n' for k, v in values.items())
    path = root / "veil.toml"
    path.write_text(text)
    return path


def test_tls_files_grpc_cannot_use_are_refused_naming_the_setting(
    deployment: Path, pki: Path
) -> None:
    """gRPC itself says only "Failed to bind to address", after a traceback."""
    tls = {"cert": str(pki / "server.crt"), "key": str(pki / "other.key")}
    config = write_config(deployment, server={"listen": "127.0.0.1:0"}, tls=tls)
    line = refused("serve", "--config", str(config), cwd=deployment)
    assert line == (
        f"error: tls.key: {pki / 'other.key'} is not the private key of the certificate "
        f"{pki / 'server.crt'}"
    )
    assert not (deployment / "ledger.sqlite").exists()  # refused before anything was opened

    for wrong, says in [
        ({"key": str(pki / "server.crt")}, "tls.key: .* holds no unencrypted PEM private key"),
        ({"key": str(pki / "encrypted.key")}, "tls.key: .* protected by a passphrase"),
        ({"cert": str(pki / "server.key")}, "tls.cert: .* holds no PEM certificate"),
        ({"client_ca": str(pki / "ca.key")}, "tls.client_ca: .* holds no PEM certificate"),
    ]:
        write_config(deployment, tls={"cert": str(pki / "server.crt"),
                                      "key": str(pki / "server.key"), **wrong})
        with pytest.raises(ConfigError, match=says):
            load_config(config)
    write_config(deployment, tls={"cert": str(pki / "server.crt"), "key": str(pki / "server.key"),
                                  "client_ca": str(pki / "ca.crt")})
    tls_config = load_config(config).tls
    assert tls_config is not None and tls_config.mutual


def test_an_address_in_use_is_refused_and_leaves_no_ledger_behind(
    deployment: Path,
) -> None:
    """The failed start must not register the administrator whose token it never showed, nor
    leave the ledger it created: the next start would open that one silently (without
    --init-admin, with no administrator at all). The corrected start creates it, and says so."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        config = write_config(deployment, server={"listen": f"127.0.0.1:{port}"})
        line = refused("serve", "--config", str(config), "--init-admin", "ops", cwd=deployment)
        assert line == (
            f"error: cannot listen on 127.0.0.1:{port}: 127.0.0.1 port {port} is already in "
            "use (another veil server, or another program)"
        )
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
        assert not (deployment / name).exists()
    line = refused("serve", "--config", str(config), cwd=deployment)
    assert line.startswith("error: there is no ledger at ")

    process = veil("serve", "--config", str(config), "--init-admin", "ops", cwd=deployment)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(f"veil is listening on 127.0.0.1:{port}")
        assert process.stdout.readline().startswith("token for ops: veil_")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        _, err = process.communicate()
    assert "there was no ledger at" in err and "a new one was created" in err
    with Ledger.open_readonly(deployment / "ledger.sqlite") as ledger:
        assert [c.client_id for c in ledger.list_clients()] == ["ops"]


def test_a_ledger_path_naming_no_file_needs_init_admin(deployment: Path) -> None:
    """A misspelt ledger file name must not start a second ledger with every budget unspent:
    a new ledger is created only with its first administrator."""
    config = write_config(deployment, server={"listen": "127.0.0.1:0"})
    line = refused("serve", "--config", str(config), cwd=deployment)
    assert line.startswith(f"error: there is no ledger at {deployment / 'ledger.sqlite'}; ")
    assert "--init-admin" in line
    assert not (deployment / "ledger.sqlite").exists()
    # With --init-admin (also how a lost administrator is replaced) it is created, and said so.
    process = veil("serve", "--config", str(config), "--init-admin", "ops", cwd=deployment)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("veil is listening on 127.0.0.1:")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert (
        f"veil serve: there was no ledger at {deployment / 'ledger.sqlite'}; a new one was "
        "created, every budget unspent"
    ) in err
    assert (deployment / "ledger.sqlite").exists()


def test_the_first_administrators_token_can_go_to_a_private_file(deployment: Path) -> None:
    """A service manager keeps standard output in its journal: --token-file keeps the token out
    of it, in a new file only its owner can read."""
    config = write_config(deployment, server={"listen": "127.0.0.1:0"})
    tokens = deployment / "tokens"
    process = veil(
        "serve", "--config", str(config), "--init-admin", "ops", "--token-file", str(tokens),
        cwd=deployment,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("veil is listening on 127.0.0.1:")
        assert process.stdout.readline().strip() == f"the token shown only once: in {tokens}"
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert "veil_" not in out
    assert (tokens.stat().st_mode & 0o777) == 0o600
    (line,) = tokens.read_text().splitlines()
    assert line.startswith("token for ops: veil_")
    # Never written over: checked before any token is issued, so none is lost.
    line = refused(
        "serve", "--config", str(config), "--init-admin", "ops2", "--token-file", str(tokens),
        cwd=deployment,
    )
    assert "exists" in line
    dangling = deployment / "dangling"
    dangling.symlink_to(deployment / "nowhere" / "tokens")
    line = refused(
        "serve", "--config", str(config), "--init-admin", "ops3", "--token-file", str(dangling),
        cwd=deployment,
    )
    assert "name a new file" in line
    with Ledger.open_readonly(deployment / "ledger.sqlite") as ledger:
        assert [c.client_id for c in ledger.list_clients()] == ["ops"]


def test_an_empty_or_tableless_ledger_file_is_not_started_afresh(deployment: Path) -> None:
    """A `touch`ed ledger file, or a database that lost its tables, holds no budgets: serving
    it as a new ledger would start every budget unspent, so it needs --init-admin as a
    missing file does, and a database with no ledger in it is refused outright."""
    import sqlite3

    config = write_config(deployment, server={"listen": "127.0.0.1:0"})
    ledger = deployment / "ledger.sqlite"
    ledger.touch()
    line = refused("serve", "--config", str(config), cwd=deployment)
    assert line.startswith(f"error: there is no ledger at {ledger}; ") and "--init-admin" in line
    assert ledger.stat().st_size == 0
    ledger.unlink()
    with contextlib.closing(sqlite3.connect(ledger)) as conn:  # a header, no tables
        conn.execute("PRAGMA user_version = 1")
    line = refused("serve", "--config", str(config), cwd=deployment)
    assert "holds no ledger" in line and "every budget unspent" in line
    with contextlib.closing(sqlite3.connect(ledger)) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


def test_a_name_is_refused_when_any_of_its_addresses_is_in_use(tmp_path: Path) -> None:
    """gRPC binds `localhost` if ::1 alone is free: a second server would then share the name
    with the first, and clients would reach either."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1 port {port} is already in use"):
            start_live(tmp_path, server={"listen": f"localhost:{port}"}).stop()


# ---- the log file ----------------------------------------------------------------------------


def test_a_log_file_that_cannot_be_written_is_refused_naming_the_setting(
    deployment: Path,
) -> None:
    (deployment / "logs").write_text("")  # a file where the log's directory should be
    config = write_config(deployment, log={"file": "logs/veil.log"})
    line = refused("serve", "--config", str(config), cwd=deployment)
    assert line == f"error: log.file: {deployment / 'logs'} is a file, not a directory"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate,
                    logging.getLogger(name).level) for name in ("veil", "grpc")}
    umask = os.umask(0o022)  # a usual umask, under which open() makes files others can read
    try:
        yield
    finally:
        os.umask(umask)
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            for handler in logger.handlers:
                if handler not in handlers:
                    handler.close()
            logger.handlers, logger.propagate, logger.level = handlers, propagate, level


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _call_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if '"event":"call"' in line]


def test_the_log_file_is_private_and_reopened_when_rotated(
    tmp_path: Path, restore_logging: None
) -> None:
    """The log names clients and what they asked: only its owner may read it, including the
    file started after logrotate moved the old one away, and no line is lost to the moved file.
    """
    log_file = tmp_path / "logs" / "veil.log"
    configure_logging("info", log_file)
    live = start_live(tmp_path / "server")
    try:
        with stubs(live.port) as s:
            release = s.research.Release(
                pb.ReleaseRequest(request_id="r1", query=count_query("gender"), loss="0.5"),
                metadata=live.auth("alice"), timeout=20,
            )
            assert _mode(log_file) == 0o600 and _mode(log_file.parent) == 0o700
            assert len(_call_lines(log_file)) == 1  # one line per request

            log_file.rename(tmp_path / "logs" / "veil.log.1")  # as logrotate does
            s.research.GetBudget(pb.GetBudgetRequest(), metadata=live.auth("alice"), timeout=20)
            with pytest.raises(grpc.RpcError):
                s.research.GetBudget(pb.GetBudgetRequest(), metadata=(), timeout=20)
            time.sleep(0.1)  # the refusal's line is written as the call ends
    finally:
        live.stop()
    rotated = tmp_path / "logs" / "veil.log.1"
    assert len(_call_lines(rotated)) == 1 and len(_call_lines(log_file)) == 1
    assert _mode(log_file) == 0o600
    refusals = [line for line in log_file.read_text().splitlines() if "auth_denied" in line]
    assert len(refusals) == 1
    assert live.tokens["alice"] not in rotated.read_text() + log_file.read_text()
    assert release.metadata.release_id in rotated.read_text()
