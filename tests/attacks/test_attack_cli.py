"""`veil attack` against a live server, and the attacker's client waiting out the rate limit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from audit import attacks
from tests.attacks.conftest import Attacker


def test_veil_attack_prints_rates_next_to_bounds(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import veil_cli

    attacker = attack()
    monkeypatch.setenv("VEIL_TOKEN", attacker.target.metadata[0][1].removeprefix("Bearer "))
    server = attacker.target.address
    argv = ["attack", "--server", server, "--truth", str(population_file)]
    status = veil_cli.main([*argv, "--attack", "suppression", "--attack", "injection"])
    out = capsys.readouterr().out
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["attack", "success", "95%", "upper"]
    assert lines[1].startswith("injection") and lines[3].startswith("suppression")
    assert "0.622" in lines[3]  # e^0.5 / (1 + e^0.5): the bound for the release's epsilon

    status = veil_cli.main(
        ["attack", "--server", server, "--attack", "differencing", "--json"]
    )
    (result,) = json.loads(capsys.readouterr().out)
    assert status == 0 and result["verdict"] == "skipped"  # no --truth: nothing to score


@pytest.mark.usefixtures("noise_off")
def test_veil_attack_exits_1_on_a_breach(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import veil_cli

    attacker = attack()
    monkeypatch.setenv("VEIL_TOKEN", attacker.target.metadata[0][1].removeprefix("Bearer "))
    argv = ["attack", "--server", attacker.target.address, "--truth", str(population_file)]
    assert veil_cli.main([*argv, "--attack", "differencing"]) == 1
    assert "BREACH" in capsys.readouterr().out


def test_the_attacker_waits_out_the_rate_limit(attack: Callable[..., Attacker]) -> None:
    attacker = attack(limits={"rate_per_second": 20, "rate_burst": 3})
    result = attacks.suppression(attacker.ctx)  # GetCodebook, then a release: past the burst
    for _ in range(4):
        attacker.target.budget()
    assert result.trials == 60
