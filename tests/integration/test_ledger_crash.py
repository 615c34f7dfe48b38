"""Crash points: a client process dies after reserve, after compute, after commit, after hand-out,
or at a random moment (SIGKILL from here), over and over. After every death the ledger is opened
again, as a restarted server would, and:

- no hold is left: reservations abandoned by the crash are cancelled, and audited;
- 0 <= spent <= cap for every client, institution and the data version;
- every release the client received is stored, byte for byte, with its charge committed, and
  each client's (and the dataset's) spending covers the releases it holds;
- the ledger and its hash chain verify;
- a retry of the interrupted request returns the stored release if one was made (the very bytes
  the client received, if it received them), and otherwise is computed and charged once: no
  release was ever handed out for it, so no earlier noise exists to be averaged with.

Each death is a real process: forked from a driver that imported the engine once (so a death
costs milliseconds, not an interpreter start), killed by os._exit at a hook point or by SIGKILL
from its parent at a random moment. The default run makes 40 deaths in two independent lanes;
VEIL_SLOW=1 makes 400.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import BudgetExceededError
from engine.ledger import Ledger
from engine.loss import Accounting, PrivacyLoss, format_amount
from tests.conftest import write_database
from tests.integration.ledger_driver import CRASH_EXIT, QUERIES, read_journal, workload

ROOT = Path(__file__).resolve().parents[2]
SLOW = bool(os.environ.get("VEIL_SLOW"))
DEATHS = 400 if SLOW else 40
LANES = 2
POINTS = ("after_reserve", "after_compute", "after_commit", "after_handout", "sigkill")
# Caps that run out about two thirds of the way through a lane's workload, so that charges,
# replays and refusals all happen; they grow with the number of deaths.
SCALE = Fraction(DEATHS, 40)
CAPS = {
    "alice": Fraction(2, 5) * SCALE,
    "bob": Fraction(2, 5) * SCALE,
    "carol": Fraction(3, 10) * SCALE,
}
INSTITUTION_CAP = Fraction(7, 10) * SCALE
DATASET_CAP = Fraction(1) * SCALE
ROWS = [{"gender": "Male", "yearOfRegistration": 2004, "ageBroad": "18--20"}] * 30 + [
    {"gender": "Female", "yearOfRegistration": 2012}
] * 25


@dataclass
class Lane:
    """One ledger and one client journal, driven through a sequence of deaths."""

    number: int
    directory: Path
    data: Path
    engine: Engine
    seed: int
    size: int
    received: dict[str, tuple[str, Fraction, str]] = field(default_factory=dict)  # by release
    deaths: Counter[str] = field(default_factory=Counter)

    @property
    def ledger_path(self) -> Path:
        return self.directory / "ledger.sqlite"

    @property
    def journal(self) -> Path:
        return self.directory / "journal.jsonl"

    def open(self) -> Ledger:
        return Ledger.open(
            self.ledger_path,
            accounting=Accounting.PURE_DP,
            dataset_cap=DATASET_CAP,
            dataset=self.engine.dataset,
            data_version=self.engine.data_version,
        )


class ForkServer:
    """The driver's fork server: the engine imported once, one forked child process per run."""

    def __init__(self, stderr: Path) -> None:
        self.stderr = stderr
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
        with stderr.open("w") as errors:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.ledger_driver", "--fork-server"],
                cwd=ROOT,
                env=environment,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        assert self.read() == "fork-server", self.errors()

    def errors(self) -> str:
        return self.stderr.read_text()

    def read(self) -> str:
        assert self.process.stdout is not None
        # A watchdog: a child that hangs fails the test instead of stalling it.
        watchdog = threading.Timer(120, self.process.kill)
        watchdog.start()
        try:
            return self.process.stdout.readline().strip()
        finally:
            watchdog.cancel()

    def run(self, argv: list[str], kill_after: float | None) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"argv": argv, "kill_after": kill_after}) + "\n")
        self.process.stdin.flush()
        line = self.read()
        assert line.startswith("exit "), (line, self.errors())
        return int(line.split()[1])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def run_child(
    lane: Lane,
    server: ForkServer,
    start: int,
    count: int,
    point: str,
    crash_at: int,
    rng: random.Random,
) -> int:
    argv = [
        "--data", str(lane.data),
        "--ledger", str(lane.ledger_path),
        "--journal", str(lane.journal),
        "--seed", str(lane.seed),
        "--size", str(lane.size),
        "--start", str(start),
        "--count", str(count),
        "--dataset-cap", format_amount(DATASET_CAP),
    ]  # fmt: skip
    kill_after = None
    if point == "sigkill":
        kill_after = rng.uniform(0.0, 0.15)
    else:
        argv += ["--crash-point", point, "--crash-at", str(crash_at)]
    status = server.run(argv, kill_after)
    assert status in (0, CRASH_EXIT, -signal.SIGKILL), (status, server.errors())
    return status


def check_after_restart(lane: Lane, interrupted: int | None) -> None:
    work = workload(lane.seed, lane.size)
    records = read_journal(lane.journal)
    for record in records:
        if record["event"] == "received":
            lane.received[record["release_id"]] = (
                record["client"],
                Fraction(record["loss"]),
                record["sha256"],
            )

    ledger = lane.open()  # the restart: abandoned holds are cancelled here
    try:
        result = ledger.verify()
        assert result.ok, result.problems
        assert not [c for c in ledger.charges() if c.state == "reserved"]
        report = ledger.report()
        for scope in (*report.clients, *report.institutions, report.dataset):
            assert scope.held == 0
            assert scope.spent >= 0
            if scope.cap is not None:
                assert scope.spent <= scope.cap, scope

        # Every release the client holds is stored, unchanged, and paid for.
        stored = {r.release_id: r for r in ledger.releases()}
        paid: dict[str, Fraction] = {}
        total = Fraction(0)
        for release_id, (_, loss, digest) in lane.received.items():
            kept = stored[release_id]
            assert kept.sha256 == digest
            assert kept.loss == loss
            paid[kept.client] = paid.get(kept.client, Fraction(0)) + loss
            total += loss
        for client, amount in paid.items():
            assert ledger.spent(client) >= amount
        assert ledger.budget("dataset", lane.engine.dataset).spent >= total

        if interrupted is not None:
            retry_interrupted(lane, ledger, work[interrupted], interrupted, records)
        assert ledger.verify().ok
    finally:
        ledger.close()


def retry_interrupted(
    lane: Lane,
    ledger: Ledger,
    request: tuple[str, str, int, str],
    index: int,
    records: list[dict[str, object]],
) -> None:
    client, request_id, query, loss = request
    live = [c for c in ledger.charges(client=client) if c.request_id == request_id]
    live = [c for c in live if c.state != "cancelled"]
    received = [r for r in records if r["event"] == "received" and r["index"] == index]
    stored_bytes = None
    if live:
        (row,) = live
        assert row.state == "committed" and row.release_id is not None
        stored_bytes = ledger.release(row.release_id).to_bytes()
    else:
        # Nothing was stored, so nothing can have been handed out.
        assert not received
    try:
        release = lane.engine.release(
            QUERIES[query],
            loss=PrivacyLoss.pure(loss),
            charger=ledger,
            client=client,
            request_id=request_id,
        )
    except BudgetExceededError:
        assert stored_bytes is None
        return
    data = release.to_bytes()
    if stored_bytes is not None:
        assert data == stored_bytes
    for record in received:
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
    after = [c for c in ledger.charges(client=client) if c.request_id == request_id]
    after = [c for c in after if c.state != "cancelled"]
    assert len(after) == 1
    lane.received[release.metadata.release_id] = (
        client,
        Fraction(release.metadata.loss),
        hashlib.sha256(data).hexdigest(),
    )


def drive(lane: Lane, deaths: int) -> Lane:
    server = ForkServer(lane.directory / "driver.stderr")
    try:
        return drive_with(lane, server, deaths)
    finally:
        server.close()


def drive_with(lane: Lane, server: ForkServer, deaths: int) -> Lane:
    rng = random.Random(lane.seed)
    with lane.open() as ledger:
        for client, cap in CAPS.items():
            institution = None if client == "carol" else "iom"
            ledger.register_client(client, role="researcher", institution=institution, cap=cap)
        ledger.set_institution_cap("iom", INSTITUTION_CAP)
    position = 0
    for death in range(deaths):
        point = POINTS[death % len(POINTS)]
        # Die at the crash_at-th time the point is reached, with room for it to be reached.
        crash_at = rng.randint(1, 3)
        count = crash_at + rng.randint(0, 3)
        before = len(read_journal(lane.journal))
        status = run_child(lane, server, position % lane.size, count, point, crash_at, rng)
        if status != 0:
            lane.deaths[point] += 1
        new = read_journal(lane.journal)[before:]
        begun = [r["index"] for r in new if r["event"] == "begin"]
        finished = {r["index"] for r in new if r["event"] in ("received", "refused")}
        interrupted = begun[-1] if begun and begun[-1] not in finished else None
        if status == 0:
            assert interrupted is None
        check_after_restart(lane, interrupted)
        position = (begun[-1] + 1) if begun else position
    return lane


def test_crash_points_never_release_uncharged(tmp_path: Path) -> None:
    data = write_database(tmp_path / "data.duckdb", ROWS, data_version="v1")
    engine = Engine(DuckDBBackend(data), codebook=default_codebook())
    lanes = []
    for number in range(LANES):
        directory = tmp_path / f"lane{number}"
        directory.mkdir()
        lanes.append(Lane(number, directory, data, engine, seed=1000 + number, size=DEATHS * 2))
    per_lane = DEATHS // LANES
    with ThreadPoolExecutor(LANES) as pool:
        done = list(pool.map(lambda lane: drive(lane, per_lane), lanes))
    deaths: Counter[str] = Counter()
    for lane in done:
        deaths.update(lane.deaths)
        assert lane.received  # the workload did hand releases out
    # Every hook point killed a process at least once (a SIGKILL may land after the work).
    for point in POINTS[:4]:
        assert deaths[point] >= 1, deaths
