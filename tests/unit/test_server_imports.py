"""The server and the engine load no DataFrame library: pandas (which country_converter imports,
and pyarrow whenever an array is made with `pa.array`) would add half a second to every `veil`
command and tens of megabytes to the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import write_database

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


RELEASES = """
import sys
from fractions import Fraction

from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.ledger import Ledger
from engine.loss import Accounting, PrivacyLoss
from engine.query import Count, Eq, FlagCounts, Mean, Proportion, Query, Sum
from engine.release import Release
from server.convert import release_to_pb

engine = Engine(DuckDBBackend(sys.argv[1]), codebook=default_codebook())
ledger = Ledger.open(sys.argv[2], accounting=Accounting.PURE_DP, dataset_cap="10",
                     dataset="ctdc", data_version=engine.data_version)
ledger.register_client("alice", role="researcher", cap="10", token_hash="0" * 64)
loss = PrivacyLoss(Accounting.PURE_DP, Fraction(1))
for number, query in enumerate((
    Query(Count(), by=("gender", "yearOfRegistration")),  # string keys, integer keys
    Query(FlagCounts("meansOfControl"), by=("majorityStatus",)),
    Query(Proportion(Eq("isSexualExploit", 1)), by=("gender",)),
    Query(Mean("yearOfRegistration"), by=("ageBroad",)),
    Query(Sum("yearOfRegistration")),
)):
    release = engine.release(query, loss=loss, charger=ledger, client="alice",
                             request_id=str(number))
    assert Release.from_bytes(release_to_pb(release).arrow_ipc).table.equals(release.table)
loaded = sorted(m for m in ("pandas", "polars") if m in sys.modules)
assert not loaded, loaded
"""


def test_releases_of_every_measure_load_no_dataframe_library(tmp_path: Path) -> None:
    data = write_database(tmp_path / "data.duckdb", [
        {"gender": "Female", "yearOfRegistration": 2019, "majorityStatus": "Minor",
         "isSexualExploit": 1, "meansOfControlDebtBondage": 1, "ageBroad": "9--17"},
    ] * 30)
    done = subprocess.run(
        [sys.executable, "-c", RELEASES, str(data), str(tmp_path / "ledger.sqlite")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
