"""The server and the engine load no DataFrame library: pandas (which country_converter imports)
would add half a second to every `veil` command and tens of megabytes to the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys

import veil_cli
from engine.codebook import default_codebook
from engine.geography import m49_regions
from server.app import build_engine, start

veil_cli.build_parser()  # imports every command's module, as `veil --help` does
assert m49_regions()["NA"].intermediate == "Southern Africa"  # Namibia, not a missing value
assert default_codebook().identity
loaded = sorted(m for m in ("pandas", "country_converter", "polars", "scipy") if m in sys.modules)
assert not loaded, loaded
"""


def test_the_server_and_every_command_load_without_pandas() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
