"""The client needs neither DuckDB nor OpenDP, and never the server or the engine; its own
distribution (client/pyproject.toml) holds only the client, the protos and the command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCKED = ("duckdb", "opendp", "engine", "server")

SCRIPT = f"""
import importlib.abc, sys

BLOCKED = {BLOCKED!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    if any(name == b or name.startswith(b + ".") for b in BLOCKED):
        del sys.modules[name]

import client, client.cli, client.sql, client.plot, client.codebook, client.results
from client import In, Missing
import veil_cli

query = (client.query.count().by("gender", "ageBroad")
         .where(majorityStatus="Minor").where(In("citizenship", ["PH", "US"]) | Missing("gender")))
assert query.to_pb().measure.HasField("count")
assert client.parse_sql(
    "SELECT gender, ageBroad, COUNT(*) FROM victims WHERE majorityStatus = 'Minor' "
    "GROUP BY gender, ageBroad"
) == client.query.count().by("gender", "ageBroad").where(majorityStatus="Minor")
veil_client = client.connect("127.0.0.1:1", token="veil_x")
assert veil_client.count().by("gender").to_pb().by == ["gender"]
veil_client.close()

parser = veil_cli.build_parser()
commands = set(parser._subparsers._group_actions[0].choices)
assert {{"query", "dry-run", "codebook", "budget", "releases"}} <= commands, commands
assert not {{"serve", "demo", "load"}} & commands, commands
loaded = [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
assert not loaded, loaded
print("ok")
"""


def test_client_imports_and_builds_queries_without_duckdb_opendp_engine_or_server() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_client_source_imports_nothing_of_the_engine_or_the_server() -> None:
    for path in (ROOT / "client").glob("*.py"):
        text = path.read_text()
        for forbidden in ("import engine", "from engine", "import server", "from server",
                          "import duckdb", "import opendp"):
            assert forbidden not in text, f"{path.name}: {forbidden}"


def test_the_client_distribution_holds_no_engine_and_requires_no_duckdb(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for name in ("client", "protos"):
        shutil.copytree(ROOT / name, tree / name,
                        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    shutil.copy(ROOT / "veil_cli.py", tree / "veil_cli.py")
    out = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(out), str(tree / "client")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("veil_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    tops = {n.split("/")[0] for n in names if not n.startswith("veil_client-")}
    assert tops == {"client", "protos", "veil_cli.py"}
    assert "protos/veil/v1/veil_pb2.pyi" in names and "client/py.typed" in names
    assert "protos/veil/v1/trailers.py" in names  # hand-written, beside the generated code
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not any(name in r.lower() for r in requires for name in ("duckdb", "opendp"))
    assert {r.split()[1].split(">")[0] for r in core} == {"grpcio", "protobuf", "pyarrow",
                                                          "sqlglot"}


def test_a_command_whose_package_is_missing_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a client-only install `veil load` names what is missing, not "invalid choice: 'load'
    (choose from )"; `veil --help` still offers only the commands that are installed."""
    import importlib

    import veil_cli

    real = importlib.import_module

    def client_only(name: str, package: str | None = None) -> object:
        if name.split(".")[0] in ("engine", "server", "audit"):
            raise ModuleNotFoundError("No module named 'duckdb'", name="duckdb")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", client_only)
    with pytest.raises(SystemExit) as exited:
        veil_cli.main(["load", "data.csv"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "veil load: this command needs duckdb" in err and "pip install -e PATH/TO/veil" in err
    assert "invalid choice" not in err
    with pytest.raises(SystemExit) as exited:
        veil_cli.main(["--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and "query" in out and "load" not in out
