"""veil's server as a custodian runs it: `veil serve --config FILE` in a process of its own.

Used for throughput (clients in this process, the server in that one, as in a deployment) and for
the server's memory. The config is the benchmark's deployment (see
`benchmarks.systems.veil_grpc.server_config`); an administrator is registered at start
(`--init-admin`) and registers researchers through the Admin service, as a custodian would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from benchmarks.memory import tree_memory
from protos.veil.v1 import veil_pb2 as pb
from protos.veil.v1 import veil_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin"


def write_config(path: Path, *, data: Path, ledger: Path, log: Path) -> Path:
    path.write_text(
        "\n".join(
            [
                f"data = {json.dumps(str(data))}",
                f"ledger = {json.dumps(str(ledger))}",
                "[caps]",
                'dataset = "100"',
                'client = "100"',
                "[server]",
                'listen = "127.0.0.1:0"',
                "grace_seconds = 1",
                "[limits]",
                "rate_per_second = 1000000.0",
                "rate_burst = 1000000",
                "max_concurrent_calls = 64",
                "[log]",
                'level = "info"',
                f"file = {json.dumps(str(log))}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return path


class ServerProcess:
    def __init__(self, *, data: Path, work: Path, name: str = "server") -> None:
        work.mkdir(parents=True, exist_ok=True)
        config = write_config(
            work / f"{name}.toml",
            data=data,
            ledger=work / f"{name}-ledger.sqlite",
            log=work / f"{name}.log",
        )
        self._stderr = (work / f"{name}.stderr").open("w", encoding="utf-8")
        launched = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "veil_cli", "serve", "--config", str(config),
             "--init-admin", ADMIN],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.port = 0
        self.admin_token = ""
        assert self.process.stdout is not None
        deadline = time.monotonic() + 600
        while not (self.port and self.admin_token):
            line = self.process.stdout.readline()
            if not line:
                self.stop()
                raise RuntimeError(
                    f"the server exited before listening; see {work / (name + '.stderr')}"
                )
            if line.startswith("veil is listening on "):
                self.port = int(line.rsplit(":", 1)[1])
            elif line.startswith(f"token for {ADMIN}: "):
                self.admin_token = line.split(": ", 1)[1].strip()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start within 10 minutes")
        self.startup_seconds = time.monotonic() - launched  # process start to listening

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 << 20)]
        )

    def register_researchers(self, count: int, *, budget: str = "100") -> list[str]:
        """Register `count` researchers through the Admin service; their tokens."""
        tokens = []
        with self.channel() as channel:
            admin = pb_grpc.AdminStub(channel)
            metadata = (("authorization", f"Bearer {self.admin_token}"),)
            for index in range(count):
                response = admin.RegisterClient(
                    pb.RegisterClientRequest(
                        client_id=f"researcher-{index}",
                        role=pb.ROLE_RESEARCHER,
                        budget=budget,
                    ),
                    metadata=metadata,
                )
                tokens.append(response.token)
        return tokens

    def memory(self) -> dict[str, int]:
        """The server's memory (see `benchmarks.memory.tree_memory`): its own, and its
        children's, in bytes."""
        return tree_memory(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()

