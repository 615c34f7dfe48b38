"""`veil audit` and `veil attack` on the command line, up to the point they call a server."""

from __future__ import annotations

from pathlib import Path

import pytest

import veil_cli
from client.connection import TLS


def test_audit_with_neither_a_ledger_nor_a_server_says_one_is_needed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VEIL_SERVER", raising=False)
    status = veil_cli.main(["audit", "report", "--out", str(tmp_path / "x.html")])
    err = capsys.readouterr().err
    assert status == 2
    assert "give a ledger file or --server" in err and "not both" not in err
    assert not (tmp_path / "x.html").exists()


def test_audit_with_both_a_ledger_and_a_server_says_not_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["audit", "tables", str(tmp_path / "l.sqlite"), "--server", "127.0.0.1:1"]
    assert veil_cli.main([*argv, "--out", str(tmp_path / "t")]) == 2
    assert "not both" in capsys.readouterr().err


# ---- the connection options: the same as every other command that calls a server ----


class _Called(Exception):
    """Stands for the call to the server, with what it was given."""


@pytest.fixture
def connection_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """VEIL_SERVER set, VEIL_TOKEN and VEIL_CA_CERT unset; a token file in tmp_path."""
    monkeypatch.setenv("VEIL_SERVER", "audit.example:50051")
    monkeypatch.delenv("VEIL_TOKEN", raising=False)
    monkeypatch.delenv("VEIL_CA_CERT", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("veil_from-the-file\n")
    return token_file


def _fake_fetch(*args: object, **kwargs: object) -> None:
    raise _Called(args, kwargs)


def test_audit_reads_veil_server_token_file_and_ca_cert(
    tmp_path: Path, connection_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import audit.cli

    monkeypatch.setattr(audit.cli, "fetch_tables", _fake_fetch)
    ca = tmp_path / "ca.pem"
    out = str(tmp_path / "x.html")
    argv = ["audit", "report", "--token-file", str(connection_env), "--ca-cert", str(ca)]
    with pytest.raises(_Called) as called:
        veil_cli.main([*argv, "--out", out])
    args, kwargs = called.value.args
    assert args == ("audit.example:50051", "veil_from-the-file")
    assert kwargs["tls"] == TLS(ca_cert=ca) and kwargs["timeout"] == 120.0

    # VEIL_CA_CERT is --ca-cert's default; --tls-ca, the earlier name, still works.
    monkeypatch.setenv("VEIL_CA_CERT", str(tmp_path / "env.pem"))
    monkeypatch.setenv("VEIL_TOKEN", "veil_from-the-env")
    with pytest.raises(_Called) as called:
        veil_cli.main(["audit", "tables", "--out", out])
    assert called.value.args[0][1] == "veil_from-the-env"
    assert called.value.args[1]["tls"] == TLS(ca_cert=tmp_path / "env.pem")
    with pytest.raises(_Called) as called:
        veil_cli.main(["audit", "tables", "--tls-ca", str(ca), "--out", out])
    assert called.value.args[1]["tls"] == TLS(ca_cert=ca)

    # A client certificate for a server that requires mutual TLS, and a deadline per call.
    cert, key = tmp_path / "auditor.crt", tmp_path / "auditor.key"
    mutual = ["--client-cert", str(cert), "--client-key", str(key), "--timeout", "7"]
    with pytest.raises(_Called) as called:
        veil_cli.main(["audit", "tables", *mutual, "--out", out])
    kwargs = called.value.args[1]
    assert kwargs["tls"] == TLS(ca_cert=tmp_path / "env.pem", client_cert=cert, client_key=key)
    assert kwargs["timeout"] == 7.0


def test_audit_of_a_ledger_file_ignores_veil_server(
    tmp_path: Path, connection_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.ledger import Ledger

    ledger = tmp_path / "ledger.sqlite"
    Ledger.open(ledger, accounting="pure_dp", dataset_cap=1, dataset="ctdc").close()
    assert veil_cli.main(["audit", "report", str(ledger), "--out", str(tmp_path / "x.html")]) == 0
    assert "not both" not in capsys.readouterr().err


def test_audit_help_names_ca_cert_not_tls_ca(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["audit", "report"], ["attack"]):
        with pytest.raises(SystemExit):
            veil_cli.main([*command, "--help"])
        text = capsys.readouterr().out
        assert "--ca-cert" in text and "--token-file" in text and "VEIL_SERVER" in text
        assert "--client-cert" in text and "--client-key" in text and "--timeout" in text
        assert "--tls-ca" not in text


def test_attack_reads_veil_server_token_file_and_ca_cert(
    tmp_path: Path, connection_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import audit.wire

    monkeypatch.setattr(audit.wire, "Target", _fake_fetch)
    ca = tmp_path / "ca.pem"
    argv = ["attack", "--attack", "injection", "--token-file", str(connection_env)]
    with pytest.raises(_Called) as called:
        veil_cli.main([*argv, "--ca-cert", str(ca)])
    args, kwargs = called.value.args
    assert args == ("audit.example:50051", "veil_from-the-file")
    assert kwargs["tls"] == TLS(ca_cert=ca)
    with pytest.raises(_Called) as called:
        veil_cli.main([*argv, "--tls-ca", str(ca), "--server", "other:1"])
    assert called.value.args[0][0] == "other:1"
    assert called.value.args[1]["tls"] == TLS(ca_cert=ca)
    cert, key = tmp_path / "auditor.crt", tmp_path / "auditor.key"
    with pytest.raises(_Called) as called:
        veil_cli.main([*argv, "--client-cert", str(cert), "--client-key", str(key),
                       "--timeout", "9"])
    assert called.value.args[1]["tls"] == TLS(client_cert=cert, client_key=key)
    assert called.value.args[1]["timeout"] == 9.0


def test_attack_with_no_server_says_how_to_name_one(
    connection_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VEIL_SERVER")
    argv = ["attack", "--attack", "injection", "--token-file", str(connection_env)]
    assert veil_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--server" in err and "VEIL_SERVER" in err


@pytest.mark.parametrize("command", [["audit", "report", "--out", "x.html"], ["attack"]])
@pytest.mark.parametrize("option", ["--ca-cert", "--client-cert"])
def test_a_tls_file_that_does_not_exist_is_named_not_a_traceback(
    command: list[str],
    option: str,
    tmp_path: Path,
    connection_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A misspelt --ca-cert (or client certificate) is a message naming the file and what it
    was to be, exit 2: it was a FileNotFoundError's traceback."""
    missing = tmp_path / "no-such.pem"
    argv = [*command, "--token-file", str(connection_env), option, str(missing)]
    if option == "--client-cert":
        argv += ["--client-key", str(connection_env)]
    assert veil_cli.main(argv) == 2
    err = capsys.readouterr().err
    role = "CA certificate" if option == "--ca-cert" else "client certificate"
    assert f"cannot read the {role} {missing}: No such file or directory" in err
    assert "Traceback" not in err and "[Errno" not in err


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", [["audit", "report", "--out", "x.html"], ["attack"]])
def test_a_server_that_cannot_be_reached_is_not_said_to_have_refused(
    command: list[str],
    tmp_path: Path,
    connection_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No server on the port: `veil audit` said "the server refused: UNAVAILABLE", blaming a
    server that is not there. It now says, as `veil query` does, that it cannot reach it."""
    address = f"127.0.0.1:{_closed_port()}"
    argv = [*command, "--server", address, "--token-file", str(connection_env), "--timeout", "5"]
    if command[0] == "attack":
        truth = tmp_path / "truth.duckdb"
        assert veil_cli.main(["synth", str(truth), "--rows", "200"]) == 0
        capsys.readouterr()
        argv += ["--truth", str(truth)]
    assert veil_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the veil server at {address}" in err
    assert "refused:" not in err


@pytest.mark.parametrize("command", [["audit", "report", "--out", "x.html"], ["attack"]])
def test_an_address_grpc_would_dial_otherwise_is_refused_as_by_veil_query(
    command: list[str], connection_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No port (gRPC dialled 443) or a URL (looked up as a host name): refused at once, naming
    what to give, where these commands tried and then said the server could not be reached."""
    for address, says in (("localhost", "has no port; give HOST:PORT"),
                          ("http://127.0.0.1:50051", "is a URL; give HOST:PORT (127.0.0.1:50051)")):
        argv = [*command, "--server", address, "--token-file", str(connection_env)]
        assert veil_cli.main(argv) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"the server address {address} {says}" in err and "cannot reach" not in err


def test_a_plaintext_call_the_server_closes_says_how_these_commands_turn_tls_on() -> None:
    """`veil audit` and `veil attack` have no --tls: to a loopback server, naming a CA turns
    TLS on, and the hint says so rather than naming an option they do not take."""
    import argparse

    import grpc

    from audit.cli import _refusal
    from audit.wire import Refused

    args = argparse.Namespace(ca_cert=None, client_cert=None, client_key=None, timeout=120.0)
    closed = Refused(grpc.StatusCode.UNAVAILABLE, "failed to connect: Socket closed")
    text = _refusal(closed, "127.0.0.1:50051", args)
    assert text.startswith("cannot reach the veil server at 127.0.0.1:50051")
    assert "--ca-cert PEM or set VEIL_CA_CERT" in text and "--tls" not in text
    late = Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert "did not answer within 120 s (--timeout)" in _refusal(late, "h:1", args)
    denied = Refused(grpc.StatusCode.PERMISSION_DENIED, "for admin, auditor")
    assert _refusal(denied, "h:1", args) == (
        "the server refused: PERMISSION_DENIED: for admin, auditor"
    )


@pytest.mark.parametrize(
    "option",
    [
        ("--trials", "-5"), ("--trials", "0"), ("--trials", "1"),
        ("--alpha", "2"), ("--alpha", "nan"), ("--alpha", "-1"), ("--alpha", "0"),
        ("--alpha", "1"), ("--alpha", "inf"),
    ],
)
def test_attack_options_out_of_range_are_refused_before_any_call(
    option: tuple[str, str],
    connection_env: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad --trials or --alpha is a bad option (exit 2), not an attack run and paid for."""
    import audit.wire

    monkeypatch.setattr(audit.wire, "Target", _fake_fetch)
    argv = ["attack", "--attack", "differencing", "--token-file", str(connection_env)]
    with pytest.raises(SystemExit) as exited:
        veil_cli.main([*argv, *option])
    assert exited.value.code == 2
    assert f"argument {option[0]}" in capsys.readouterr().err


def test_a_limit_below_two_chooses_no_targets_and_run_refuses_it() -> None:
    import random

    from audit import attacks
    from audit.attacks import Person

    people = [Person(str(i), (str(i),), i % 2) for i in range(20)]
    for limit in (-5, -1, 0, 1):
        assert attacks._balanced(people, limit, random.Random(0)) == []
    assert len(attacks._balanced(people, 4, random.Random(0))) == 4
    with pytest.raises(ValueError, match="at least 2"):
        attacks.run(None, ["differencing"], trials=-5)  # type: ignore[arg-type]


def test_targets_are_balanced_whichever_secret_is_more_common() -> None:
    """The bound assumes a prior of one half: as many targets with the flag as without it, even
    when the data has three times as many of one."""
    import random

    from audit import attacks
    from audit.attacks import Person

    for common in (0, 1):
        people = [Person(str(i), (str(i),), common if i % 4 else 1 - common) for i in range(20)]
        chosen = attacks._balanced(people, 60, random.Random(0))
        assert sorted(p.secret for p in chosen) == [0] * 5 + [1] * 5


def test_a_tracker_batch_holds_only_targets_apart_from_every_other_in_it() -> None:
    """c is apart from a but not from b: it cannot join the batch holding both, where its own
    code would count in b's cell, and goes to a batch of its own."""
    from audit.attacks import _batches
    from audit.truth import Knowledge, Person

    a, b, c = (Person(code, (year,), 1) for code, year in (("UA", "2010"), ("PH", "2011"),
                                                          ("MD", "2012")))
    know = Knowledge("citizenship", ("yearOfRegistration",), "isSexualExploit", {},
                     {("MD", ("2011",)): 3}, (a, b, c), (), ())
    assert know.apart(a, b) and know.apart(a, c) and not know.apart(b, c)
    assert _batches([a, b, c], know) == [[a, b], [c]]


def test_audit_budgets_mark_revoked_clients(tmp_path: Path) -> None:
    import csv

    from engine.ledger import Ledger

    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, accounting="pure_dp", dataset_cap=5, dataset="ctdc") as ledger:
        ledger.register_client("amina", role="researcher", cap=1, institution="iom")
        ledger.register_client("bob", role="researcher", cap=1)
        ledger.revoke("bob", reason="left the project")
        revoked_at = ledger.client("bob").revoked_at
    argv = ["audit", "tables", str(path), "--table", "budgets", "--out", str(tmp_path / "t")]
    assert veil_cli.main(argv) == 0
    with (tmp_path / "t" / "budgets.csv").open() as handle:
        rows = {(r["kind"], r["name"]): r for r in csv.DictReader(handle)}
    assert rows["client", "amina"]["status"] == "active"
    assert rows["client", "bob"]["status"] == "revoked"
    assert revoked_at is not None
    assert rows["client", "bob"]["revoked_at"] == revoked_at.replace("T", " ")
    assert rows["client", "amina"]["revoked_at"] == ""
    assert rows["institution", "iom"]["status"] == rows["dataset", "ctdc"]["status"] == ""
    assert veil_cli.main(["audit", "report", str(path), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<th>status</th>" in page and "<td>revoked</td>" in page
    assert "<th>revoked</th>" in page and revoked_at[:19].replace("T", " ") in page


def test_audit_output_that_cannot_be_written_is_a_message_and_keeps_the_old_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import engine.audit_report
    from engine.ledger import Ledger

    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, accounting="pure_dp", dataset_cap=5, dataset="ctdc") as ledger:
        ledger.register_client("amina", role="researcher", cap=1)
    # A report into a directory, tables into a file: one line each, exit 2.
    (tmp_path / "a-directory").mkdir()
    status = veil_cli.main(["audit", "report", str(path), "--out", str(tmp_path / "a-directory")])
    err = capsys.readouterr().err
    assert status == 2 and f"veil audit: cannot write {tmp_path / 'a-directory'}" in err
    (tmp_path / "a-file").write_text("kept\n")
    status = veil_cli.main(["audit", "tables", str(path), "--out", str(tmp_path / "a-file")])
    err = capsys.readouterr().err
    assert status == 2 and "veil audit: cannot write" in err and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "kept\n"

    # A disk that fills during the write leaves the earlier report and tables whole.
    report, tables = tmp_path / "r.html", tmp_path / "tables"
    assert veil_cli.main(["audit", "report", str(path), "--out", str(report)]) == 0
    assert veil_cli.main(["audit", "tables", str(path), "--out", str(tables)]) == 0
    capsys.readouterr()
    before = report.read_text(), {p.name: p.read_bytes() for p in tables.iterdir()}

    def full(*args: object, **kwargs: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.audit_report.AuditTables, "write_csv",
                        lambda self, directory: [directory / "budgets.csv", full()])
    monkeypatch.setattr("audit.cli.render_html", lambda tables: "<html>" + "x" * 10)
    monkeypatch.setattr("os.fsync", full)
    for command, out in (("report", report), ("tables", tables)):
        status = veil_cli.main(["audit", command, str(path), "--out", str(out)])
        err = capsys.readouterr().err
        assert status == 2 and "No space left on device" in err, err
    assert report.read_text() == before[0]
    assert {p.name: p.read_bytes() for p in tables.iterdir()} == before[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_auditors_token_leaves_this_machine_only_over_tls() -> None:
    # Not a loopback address (this machine's name, as a remote server would be named): the
    # first bytes the server side reads are a TLS handshake, never the token in the clear.
    import socket
    import threading

    import grpc

    from audit.wire import Target
    from protos.veil.v1 import veil_pb2 as pb

    host = socket.gethostname()
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        pytest.skip("this machine's name does not resolve")
    listener = socket.create_server(("", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def read_first_bytes() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(5)
            received.append(connection.recv(4096))

    reader = threading.Thread(target=read_first_bytes)
    reader.start()
    target = Target(f"{host}:{port}", "veil_do-not-send-in-clear")
    with target, pytest.raises(grpc.RpcError):
        target.research.GetBudget(pb.GetBudgetRequest(), metadata=target.metadata, timeout=3)
    reader.join(10)
    listener.close()
    assert received and received[0][:1] == b"\x16"  # a TLS record: the handshake
    assert b"veil_do-not-send-in-clear" not in received[0]


# ---- the attacker's waits for the server's rate ------------------------------------------------


def _refusal(code_name: str, trailers: tuple[tuple[str, str | bytes], ...] = ()) -> Exception:
    """A refused call's error, its trailers items with `key` and `value` as gRPC's are."""
    from collections import namedtuple

    import grpc

    metadatum = namedtuple("metadatum", ["key", "value"])
    items = tuple(metadatum(key, value) for key, value in trailers)

    class Refusal(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode[code_name]

        def details(self) -> str:
            return f"refused: {code_name}"

        def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
            return items

    return Refusal()


def _scripted(outcomes: list[object]) -> tuple[list[int], object]:
    """A call that raises or returns each outcome in turn, and the list counting its tries."""
    tries: list[int] = []

    def call(request: object, *, metadata: object = None, timeout: object = None) -> object:
        tries.append(1)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return tries, call


def test_target_calls_wait_out_the_rate_limit_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import grpc

    import audit.wire
    from audit.wire import Refused, Target

    slept: list[float] = []
    monkeypatch.setattr(audit.wire.time, "sleep", slept.append)
    rate = _refusal("RESOURCE_EXHAUSTED", (("retry-after", "0.250"),))
    unnamed = _refusal("RESOURCE_EXHAUSTED")  # the rate, no wait named
    budget = _refusal("RESOURCE_EXHAUSTED", (("veil-budget-scope", "client"),
                                             ("veil-budget-remaining", "0.1")))
    too_long = _refusal("RESOURCE_EXHAUSTED", (("retry-after", "31"),))
    target = Target("127.0.0.1:1", "veil_x")
    try:
        # A typed call waits the wait named, or 0.05 s when none is, then succeeds.
        tries, call = _scripted([rate, unnamed, "answer"])
        assert target.call(call, object()) == "answer"
        assert (len(tries), slept) == (3, [0.25, 0.05])
        # A budget refusal, or a wait past the 30 s allowed, is refused at once.
        slept.clear()
        for refusal, is_budget in ((budget, True), (too_long, False)):
            tries, call = _scripted([refusal, "answer"])
            with pytest.raises(Refused) as refused:
                target.call(call, object())
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.budget is is_budget and refused.value.message.startswith("refused")
            assert len(tries) == 1 and not slept

        # A raw call waits only a wait the server names; any other status is its outcome.
        tries, call = _scripted([rate, unnamed])
        monkeypatch.setattr(target.channel, "unary_unary", lambda *a, **k: call)
        outcome = target.raw("/veil.v1.Research/GetBudget", b"")
        assert (outcome.code, outcome.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                   "refused: RESOURCE_EXHAUSTED")
        assert outcome.seconds >= 0 and len(tries) == 2 and slept == [0.25]
        tries, call = _scripted([rate, b"ok"])
        monkeypatch.setattr(target.channel, "unary_unary", lambda *a, **k: call)
        assert target.raw("/veil.v1.Research/GetBudget", b"").code == grpc.StatusCode.OK
        tries, call = _scripted([_refusal("INVALID_ARGUMENT", (("retry-after", "1"),))])
        monkeypatch.setattr(target.channel, "unary_unary", lambda *a, **k: call)
        assert target.raw("/veil.v1.Research/GetBudget", b"").code.name == "INVALID_ARGUMENT"
        assert len(tries) == 1
    finally:
        target.close()


@pytest.mark.parametrize(
    "names",
    [
        ("--key", "gender", "--cells", "gender,ageBroad"),
        ("--flag", "isSexualExploit", "--cells", "isSexualExploit,gender"),
        ("--key", "isAbduction", "--flag", "isAbduction"),
    ],
)
def test_attack_variables_must_differ(
    names: tuple[str, ...],
    connection_env: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flag that is also a cell (or the key) would make every tracker trivial or empty."""
    import audit.wire

    monkeypatch.setattr(audit.wire, "Target", _fake_fetch)
    argv = ["attack", "--attack", "differencing", "--token-file", str(connection_env), *names]
    assert veil_cli.main(argv) == 2
    assert "--key, --cells and --flag must name different variables" in capsys.readouterr().err


def test_a_charge_the_server_does_not_report_is_taken_as_the_whole_loss() -> None:
    """The attacker's tally may overstate its spending, never understate it."""
    from fractions import Fraction

    from audit.wire import Answer

    silent = Answer("r", "0.5", 10, {}, ("gender",))
    assert silent.charge == Fraction(1, 2) and not silent.replayed
    assert Answer("r", "0.5", 10, {}, ("gender",), charged="0").replayed


def test_two_targets_are_apart_only_if_neither_code_has_a_record_in_the_others_cell() -> None:
    from audit.truth import Knowledge, Person

    a, b = Person("UA", ("2010",), 1), Person("PH", ("2011",), 0)

    def know(cell_counts: dict[tuple[str, tuple[str, ...]], int]) -> Knowledge:
        return Knowledge("citizenship", ("yearOfRegistration",), "isSexualExploit", {},
                         cell_counts, (a, b), (), ())

    assert know({}).apart(a, b)
    assert not know({("UA", ("2011",)): 2}).apart(a, b)  # a's code in b's cell
    assert not know({("PH", ("2010",)): 1}).apart(a, b)  # b's code in a's cell
    assert not know({}).apart(a, Person("PH", ("2010",), 0))  # the same cell
