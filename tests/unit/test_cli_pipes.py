"""`veil ... | head`: a command whose reader closes standard output early ends quietly, with no
traceback and no second error when Python flushes standard output at exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]


def run_into_closed_pipe(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `veil ARGS` with standard output a pipe whose reader is already gone (as `| head`
    leaves it once it has its lines); returns the exit status and standard error."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "veil_cli.py", *args], cwd=ROOT, stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=120, env=env,
        )
    finally:
        os.close(write_end)
    return result.returncode, result.stderr


def assert_quiet(status: int, stderr: str) -> None:
    assert status == 1, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert "Broken pipe" not in stderr and "Exception ignored" not in stderr, stderr


def test_ledger_report_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, accounting="pure_dp", dataset_cap="10", dataset="d") as ledger:
        for i in range(50):
            ledger.register_client(f"client-{i:03d}", role="researcher", cap="1")
    for extra in ([], ["--releases"], ["--json"]):
        assert_quiet(*run_into_closed_pipe("ledger", "report", str(path), *extra))
    assert_quiet(*run_into_closed_pipe("ledger", "verify", str(path)))
