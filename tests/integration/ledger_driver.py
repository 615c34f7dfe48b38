"""A client process for the crash test: runs a slice of a fixed workload against a real ledger and
dies at a chosen point of the release sequence.

One run, in a process of its own:

    python -m tests.integration.ledger_driver --data D --ledger L --journal J --seed S \\
        --size 120 --start 5 --count 3 --dataset-cap 1 --crash-point after_commit --crash-at 2

Many runs, cheaply: `--fork-server` imports the engine once, then reads one JSON request per line
on stdin ({"argv": [...], "kill_after": seconds or null}), forks a child process for each, and
writes "exit CODE" when the child is gone. With "kill_after" it sends the child SIGKILL that many
seconds after the child has opened its ledger (unless it has already exited; the child is not
reaped before, so its pid cannot have been reused).

The journal is the client's side of the story, written (and fsynced) as it happens: "begin" before
a request is sent, "received" once its release is in hand (then the "after_handout" point),
"refused" when the budget said no. The parent reads it after each death and checks the ledger
against it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.loss import Accounting, PrivacyLoss
from engine.query import Count, Query, Range

CRASH_EXIT = 77
CLIENTS = ("alice", "bob", "carol")
LOSSES = ("0.01", "0.02", "0.05")
# 1050 queries with distinct fingerprints: five shapes times every year range.
QUERIES = [
    Query(Count(), by=by, where=Range("yearOfRegistration", low=2002 + low, high=2002 + high))
    for by in ((), ("gender",), ("ageBroad",), ("Datasource",), ("majorityStatus",))
    for low in range(20)
    for high in range(low, 20)
]


def workload(seed: int, size: int) -> list[tuple[str, str, int, str]]:
    """(client, request id, query index, loss): the same list in the parent and every child.

    Queries come from a pool as large as the workload, so about a third of the requests repeat
    an earlier query (a replay when its stored release is accurate enough).
    """
    rng = random.Random(seed)
    pool = list(range(len(QUERIES)))
    rng.shuffle(pool)
    pool = pool[: max(1, min(size, len(pool)))]
    return [
        (rng.choice(CLIENTS), f"req-{i}", rng.choice(pool), rng.choice(LOSSES)) for i in range(size)
    ]


def append(journal: Path, record: dict[str, Any]) -> None:
    with journal.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_journal(journal: Path) -> list[dict[str, Any]]:
    if not journal.exists():
        return []
    lines = journal.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run(argv: list[str], ready: Callable[[], None]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--dataset-cap", required=True)
    parser.add_argument("--crash-point", default="")
    parser.add_argument("--crash-at", type=int, default=0)
    args = parser.parse_args(argv)

    # Imported here so that `workload` is cheap to import for the parent.
    from engine.backend import DuckDBBackend
    from engine.codebook import default_codebook
    from engine.engine import Engine
    from engine.errors import BudgetExceededError
    from engine.ledger import Ledger

    seen = 0

    def hook(point: str) -> None:
        nonlocal seen
        if point == args.crash_point:
            seen += 1
            if seen == args.crash_at:
                os._exit(CRASH_EXIT)  # no cleanup, no flush, no settling: a dead process

    engine = Engine(DuckDBBackend(args.data), codebook=default_codebook())
    ledger = Ledger.open(
        args.ledger,
        accounting=Accounting.PURE_DP,
        dataset_cap=args.dataset_cap,
        dataset=engine.dataset,
        data_version=engine.data_version,
        hooks=hook,
    )
    journal = Path(args.journal)
    ready()
    work = workload(args.seed, args.size)
    for index in range(args.start, min(args.start + args.count, len(work))):
        client, request_id, query, loss = work[index]
        append(journal, {"event": "begin", "index": index})
        try:
            release = engine.release(
                QUERIES[query],
                loss=PrivacyLoss.pure(loss),
                charger=ledger,
                client=client,
                request_id=request_id,
            )
        except BudgetExceededError:
            append(journal, {"event": "refused", "index": index})
            continue
        data = release.to_bytes()
        append(
            journal,
            {
                "event": "received",
                "index": index,
                "client": client,
                "release_id": release.metadata.release_id,
                "loss": release.metadata.loss,
                "sha256": hashlib.sha256(data).hexdigest(),
            },
        )
        hook("after_handout")
    ledger.close()
    return 0


def fork_server() -> int:
    """Import once, then fork one child per request read from stdin."""
    from engine.codebook import default_codebook
    from engine.engine import Engine  # noqa: F401  (imported before forking, on purpose)
    from engine.ledger import Ledger  # noqa: F401

    default_codebook()  # parsed once, shared by every child
    print("fork-server", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        readiness, signal_ready = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(readiness)

            def opened(fd: int = signal_ready) -> None:
                with contextlib.suppress(BrokenPipeError):  # nobody is waiting for it
                    os.write(fd, b"r")

            status = 1
            try:
                status = run(request["argv"], opened)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        os.close(signal_ready)
        kill_after = request.get("kill_after")
        reaped, status = 0, 0
        if kill_after is not None:
            signalled = os.read(readiness, 1)  # empty if the child died before opening its ledger
            if signalled:
                time.sleep(kill_after)
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped == 0:  # still running, and not reaped: its pid is still its own
                    os.kill(pid, signal.SIGKILL)
        os.close(readiness)
        if reaped == 0:
            _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--fork-server"]:
        return fork_server()
    return run(argv, lambda: print("ready", flush=True))


if __name__ == "__main__":
    sys.exit(main())
