"""`veil serve --config` in a process of its own, stopped with SIGTERM under load.

Calls in flight get the grace period; slow queries still running after it are interrupted. When
the process has exited, no charge is left held, every release a caller received is committed,
and the audit log verifies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from engine.ledger import Ledger
from engine.loss import Accounting
from protos.veil.v1 import veil_pb2 as pb
from server.auth import hash_token, new_token
from tests.conftest import write_database
from tests.server_harness import bearer, build_slow_data, count_query, slow_query, stubs

ROOT = Path(__file__).resolve().parents[2]
SERVE = (
    "import argparse, sys\n"
    "from server.cli import add_serve_command\n"
    "parser = argparse.ArgumentParser(prog='veil')\n"
    "add_serve_command(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.handler(args))\n"
)
# SERVE, sending itself SIGTERM the moment it logs `serving`, as a supervisor may.
SERVE_STOPPED_AT_ONCE = (
    "import logging, os, signal\n"
    "class StopWhenServing(logging.Filter):\n"
    "    def filter(self, record):\n"
    "        if getattr(record, 'event', None) == 'serving':\n"
    "            os.kill(os.getpid(), signal.SIGTERM)\n"
    "        return True\n"
    "logging.getLogger('veil.server').addFilter(StopWhenServing())\n"
) + SERVE
# SERVE, holding a DuckDB connection nothing ever frees: DuckDB's bindings report it at the
# interpreter's teardown, as they at times do for their own objects.
SERVE_LEAKING = (
    "import ctypes, duckdb\n"
    "ctypes.pythonapi.Py_IncRef(ctypes.py_object(duckdb.connect()))\n"
) + SERVE


def start_process(
    config: Path, script: str = SERVE, *options: str
) -> tuple[subprocess.Popen[str], int, list[str], threading.Thread]:
    """The server process, its port, its log so far and the thread reading the rest (join it
    after the process has exited: its last lines may still be in the pipe)."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--config", str(config), *options],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    port = None
    while port is None and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        log.append(line)
        entry = json.loads(line)
        if entry.get("event") == "serving":
            port = int(entry["port"])
    if port is None:
        process.kill()
        raise AssertionError("the server did not start:\n" + "".join(log))

    def drain() -> None:
        assert process.stderr is not None
        log.extend(process.stderr)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return process, port, log, reader


def test_sigterm_under_load_leaves_nothing_half_charged(tmp_path: Path) -> None:
    data = build_slow_data(tmp_path / "data.duckdb", rows=1_000_000)
    ledger_path = tmp_path / "ledger.sqlite"
    token = new_token()
    with Ledger.open(
        ledger_path,
        accounting=Accounting.PURE_DP,
        dataset_cap="100",
        dataset="ctdc",
        data_version="slow-test-data",
    ) as ledger:
        ledger.register_client("alice", role="researcher", cap="50", token_hash=hash_token(token))
    config = tmp_path / "veil.toml"
    config.write_text(
        f'data = "{data}"\nledger = "{ledger_path}"\n'
        '[caps]\ndataset = "100"\n'
        '[server]\nlisten = "127.0.0.1:0"\ngrace_seconds = 0.5\n'
        "[limits]\nrate_per_second = 1000.0\nrate_burst = 1000\ncalls_per_client = 16\n"
        # Above the 8 callers: gRPC counts a call until its worker is done, a moment after the
        # response is sent, so a caller's next call can find 8 running and be refused.
        "max_concurrent_calls = 16\nworkers = 8\n"
    )
    process, port, log, reader = start_process(config)

    def request(i: int) -> pb.ReleaseRequest:
        if i % 4 == 0:
            return pb.ReleaseRequest(
                request_id=f"slow-{i}", query=slow_query(), loss=f"0.{i + 1:03d}"
            )
        year = pb.Filter(
            equals=pb.Equals(variable="yearOfRegistration", value=pb.Value(integer=2002 + i % 20))
        )
        by = ("gender", "ageBroad", "isForcedLabour")[i % 3]
        return pb.ReleaseRequest(
            request_id=f"fast-{i}", query=count_query(by, where=year), loss=f"0.{i + 1:03d}"
        )

    received: dict[str, str] = {}
    failed: dict[str, grpc.StatusCode] = {}
    lock = threading.Lock()
    first_received = threading.Event()
    with stubs(port) as s:

        def call(i: int) -> None:
            r = request(i)
            try:
                response = s.research.Release(r, metadata=bearer(token), timeout=20)
            except grpc.RpcError as error:
                with lock:
                    failed[r.request_id] = error.code()
                return
            with lock:
                received[r.request_id] = response.metadata.release_id
            first_received.set()

        with futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(call, i) for i in range(60)]
            # Stop once some call has finished, with slow ones running and most still to come,
            # however long the first calls take on a loaded machine.
            assert first_received.wait(60), "no call finished"
            process.send_signal(signal.SIGTERM)
            for c in calls:
                c.result()
    assert process.wait(timeout=30) == 0, "".join(log)
    reader.join(10)
    events = [json.loads(line).get("event") for line in log]
    assert "signal" in events and "stopped" in events
    stopped = json.loads(next(x for x in log if '"stopped"' in x))
    assert stopped["clean"] is True
    # Eight clients called at once (slow queries among them); the server admits at most 16.
    assert 2 <= stopped["most_calls_at_once"] <= 16, stopped

    assert received, "no call finished before the stop"
    assert failed, "the stop interrupted nothing; the test proves nothing"
    assert set(failed.values()) <= {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }, failed
    with Ledger.open_readonly(ledger_path) as ledger:
        charges = ledger.charges()
        assert all(c.state in ("committed", "cancelled") for c in charges), "a charge is held"
        committed = {c.request_id: c.release_id for c in charges if c.state == "committed"}
        # Every release a caller received is committed, with its charge.
        for request_id, release_id in received.items():
            assert committed.get(request_id) == release_id
        # A charge without a caller to receive it would need the response to be lost after the
        # commit; the grace period is there so that this does not happen.
        assert set(committed) <= set(received) | set(failed)
        assert ledger.verify().ok
        assert ledger.spent("alice") == sum(c.amount for c in charges if c.state == "committed")


def test_a_stop_signal_as_soon_as_serving_is_logged_drains_and_stops(tmp_path: Path) -> None:
    data = write_database(tmp_path / "data.duckdb", [{"gender": "Female"}] * 20)
    config = tmp_path / "veil.toml"
    config.write_text(
        f'data = "{data}"\nledger = "{tmp_path / "ledger.sqlite"}"\n[caps]\ndataset = "1"\n'
        '[server]\nlisten = "127.0.0.1:0"\ngrace_seconds = 0.5\n'
    )
    process, _, log, reader = start_process(
        config, SERVE_STOPPED_AT_ONCE, "--init-admin", "ops"  # a new ledger needs its admin
    )
    assert process.wait(timeout=30) == 0, "".join(log)
    reader.join(10)
    assert json.loads(next(x for x in log if '"stopped"' in x))["clean"] is True


def test_the_log_stays_json_to_its_end_whatever_a_library_prints_at_teardown(
    tmp_path: Path,
) -> None:
    data = write_database(tmp_path / "data.duckdb", [{"gender": "Female"}] * 20)
    ledger_path = tmp_path / "ledger.sqlite"
    with Ledger.open(ledger_path, accounting=Accounting.PURE_DP, dataset_cap="1",
                     dataset="ctdc", data_version="v1") as ledger:
        ledger.register_client("alice", role="researcher", cap="1", token_hash=hash_token("x"))
    config = tmp_path / "veil.toml"
    config.write_text(
        f'data = "{data}"\nledger = "{ledger_path}"\n[caps]\ndataset = "1"\n'
        '[server]\nlisten = "127.0.0.1:0"\ngrace_seconds = 0.5\n'
    )
    process, _, log, reader = start_process(config, SERVE_LEAKING)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, "".join(log)
    reader.join(10)
    # A log shipper parses every line; the server's last words are its `stopped` entry.
    assert [json.loads(line)["event"] for line in log][-1] == "stopped", "".join(log)


@pytest.mark.parametrize("problem", ["missing data", "bad config"])
def test_serve_refuses_to_start_with_a_clear_message(tmp_path: Path, problem: str) -> None:
    config = tmp_path / "veil.yaml"
    if problem == "missing data":
        config.write_text(f"data: {tmp_path / 'none.duckdb'}\ncaps: {{dataset: '1'}}\n")
        expected = "no data file"
    else:
        config.write_text("data: x.duckdb\nlimits: {max_cels: 10}\n")
        expected = "unknown setting(s) max_cels"
    result = subprocess.run(
        [sys.executable, "-c", SERVE, "serve", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert expected in result.stderr


def test_demo_serves_synthetic_records_with_printed_tokens() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVE,
            "serve",
            "--demo",
            "--rows",
            "3000",
            "--listen",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        port = int(lines[0].strip().rpartition(":")[2])
        tokens = dict(line.strip().removeprefix("token for ").split(": ") for line in lines[1:])
        assert set(tokens) == {"demo-researcher", "demo-auditor", "demo-admin"}
        with stubs(port) as s:
            researcher = bearer(tokens["demo-researcher"])
            response = s.research.Release(
                pb.ReleaseRequest(request_id="demo-1", query=count_query("gender"), loss="0.5"),
                metadata=researcher,
                timeout=20,
            )
            assert response.metadata.data_version.startswith("synthetic")
            budget = s.research.GetBudget(pb.GetBudgetRequest(), metadata=researcher)
            assert budget.spent == "0.5"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        _, stderr = process.communicate(timeout=5)
        # Tokens go to standard output once; the JSON log never holds one.
        assert all(token not in stderr for token in tokens.values())
        assert all(json.loads(line) for line in stderr.splitlines() if line.strip())
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("failure", [RuntimeError("gRPC could not bind"), KeyboardInterrupt()])
def test_a_start_that_fails_any_way_puts_the_signal_handlers_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    from server import cli

    def failing(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(cli, "_start", failing)
    parser = argparse.ArgumentParser()
    cli.add_serve_command(parser.add_subparsers())
    config = tmp_path / "veil.toml"
    config.write_text('data = "d.duckdb"\n[caps]\ndataset = "10"\n')
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(type(failure)):
        cli.run_serve(parser.parse_args(["serve", "--config", str(config)]))
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_release_charged_before_the_grace_ends_is_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call charged just before the grace period ends still has its answer to send; the stop
    must not cut it off (gRPC aborts every call open at the end of its own grace), or the
    client is charged for a release it never receives."""
    from server import servicer
    from tests.server_harness import start_live

    live = start_live(tmp_path)
    committed = threading.Event()
    to_pb = servicer.convert.release_to_pb

    def slow_to_pb(*args: object, **kwargs: object) -> pb.ReleaseResponse:
        committed.set()
        time.sleep(1.5)  # the grace (0.5 s) ends while the charged answer is on its way out
        return to_pb(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(servicer.convert, "release_to_pb", slow_to_pb)
    outcome: dict[str, object] = {}
    with stubs(live.port) as s:

        def call() -> None:
            request = pb.ReleaseRequest(request_id="r1", query=count_query("gender"), loss="0.1")
            try:
                outcome["release"] = s.research.Release(
                    request, metadata=live.auth("alice"), timeout=30
                )
            except grpc.RpcError as error:
                outcome["error"] = (error.code(), error.details())

        caller = threading.Thread(target=call)
        caller.start()
        assert committed.wait(30), "the release was never charged"
        assert live.stop(0.5)
        caller.join(30)
    assert "error" not in outcome, outcome
    release = outcome["release"]
    assert isinstance(release, pb.ReleaseResponse)
    with Ledger.open_readonly(tmp_path / "ledger.sqlite") as ledger:
        charged = {c.request_id: (c.state, c.release_id) for c in ledger.charges()}
    assert charged == {"r1": ("committed", release.metadata.release_id)}
