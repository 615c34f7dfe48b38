"""examples/child_trafficking_brief.py against a real server on port 0: every statistic beside
its interval, plots saved, and a second run that costs nothing."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.client_harness import add_researcher, address, start_server
from tests.server_harness import LiveServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("client-example"))
    yield server
    server.stop()


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "child_trafficking_brief", ROOT / "examples" / "child_trafficking_brief.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_worked_example(live: LiveServer, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    client_id, token = add_researcher(live, cap="3")
    brief = example()
    arguments = ["--server", address(live), "--token", token, "--plots", str(tmp_path)]
    assert brief.main(arguments) == 0
    out = capsys.readouterr().out
    for title in ("Relationship to the recruiter", "family member involved",
                  "Type of exploitation of children, by gender",
                  "children trafficked for sexual exploitation", "Means of control"):
        assert title in out, title
    # Each DP answer is printed beside its interval.
    assert re.search(r"children +\d+\.\d% +95% CI \[\d+\.\d%, \d+\.\d%\]", out)
    assert re.search(r"recruiterRelationFamily +[\d,]+ \[[\d,]+, [\d,]+\] +[\d,]+ \[", out)
    assert re.search(r"isSexualExploit +Female +[\d,]+ +\[[\d,]+, [\d,]+\]", out)
    assert "charged now: epsilon 0.4" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "control.png", "exploitation.png", "family.png", "recruiter.png", "sexual.png"
    ]
    spent = live.ledger.spent(client_id)
    assert spent == pytest.approx(1.5)

    # Run again: every table is already released and comes back free.
    assert brief.main(arguments[:4]) == 0
    again = capsys.readouterr().out
    assert again.count("already released") == 5
    assert live.ledger.spent(client_id) == spent
