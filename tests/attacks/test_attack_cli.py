"""`veil attack` against a live server, and the attacker's client waiting out the rate limit."""

from __future__ import annotations

import json
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import duckdb
import pytest

from audit import attacks
from audit.cli import EXIT_FOUND, EXIT_INCOMPLETE
from audit.wire import Refused
from tests.attacks.conftest import ALPHA, Attacker


def _veil_attack(
    attacker: Attacker, monkeypatch: pytest.MonkeyPatch, *args: str, truth: Path | None = None
) -> int:
    """`veil attack` against the attacker's server with its token, at the tests' level."""
    import veil_cli

    monkeypatch.setenv("VEIL_TOKEN", attacker.target.metadata[0][1].removeprefix("Bearer "))
    argv = ["attack", "--server", attacker.target.address, "--alpha", str(ALPHA)]
    if truth is not None:
        argv += ["--truth", str(truth)]
    return veil_cli.main([*argv, *args])


def _rows(out: str) -> dict[str, tuple[str, str]]:
    """Each attack's table row and the detail line under it, by name."""
    lines = out.splitlines()
    return {
        line.split()[0]: (line, lines[i + 1].strip())
        for i, line in enumerate(lines[:-1])
        if line.split() and line.split()[0] in attacks.ATTACK_NAMES
    }


def _refused_for_budget(ctx: attacks.Context, **kwargs: object) -> attacks.AttackResult:
    """An attack the server stops by refusing it for budget."""
    import grpc

    raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the cap", budget=True)

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

    assert out.splitlines()[-1] == "2 of 2 attacks ran: 0 found a breach."

    status = veil_cli.main(
        ["attack", "--server", server, "--attack", "differencing", "--json"]
    )
    output = json.loads(capsys.readouterr().out)
    (result,) = output["attacks"]
    # No --truth: nothing to score, which is not a pass.
    assert result["verdict"] == "not run" and not result["ran"] and "--truth" in result["detail"]
    assert status == EXIT_INCOMPLETE == output["summary"]["exit_status"]
    assert output["summary"]["not_run"] == ["differencing"]


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
    assert veil_cli.main([*argv, "--attack", "differencing", "--attack", "budget_race"]) == 1
    out = capsys.readouterr().out
    assert "BREACH" in out
    assert out.splitlines()[-1] == "2 of 2 attacks ran: 1 found a breach (differencing)."


def test_veil_attack_json_ends_with_the_summary_the_text_ends_with(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same run as text and as JSON: the JSON summary holds the text's last line, what it
    counts by name, and the exit status with its reason. 4 targets are too few to show a
    breach of differencing or suppression, so those two are inconclusive."""
    attacker = attack()
    argv = ("--attack", "injection", "--attack", "differencing", "--attack", "suppression",
            "--trials", "4")
    text_status = _veil_attack(attacker, monkeypatch, *argv, truth=population_file)
    text = capsys.readouterr().out
    json_status = _veil_attack(attacker, monkeypatch, *argv, "--json", truth=population_file)
    output = json.loads(capsys.readouterr().out)
    assert set(output) == {"attacks", "summary"}
    assert [r["name"] for r in output["attacks"]] == ["injection", "suppression", "differencing"]
    summary = output["summary"]
    assert summary == {
        "selected": 3,
        "ran": 1,
        "not_run": [],
        "inconclusive": ["suppression", "differencing"],
        "breaches": [],
        "complete": False,
        "text": text.splitlines()[-1],
        "exit_status": EXIT_INCOMPLETE,
        "exit_reason": "no attack found a breach, but some did not run or were inconclusive: "
                       "the run tested less than was asked",
    }
    assert text_status == json_status == EXIT_INCOMPLETE
    # Every field each attack had before the summary was added is still there.
    for result in output["attacks"]:
        assert {"name", "success_rate", "bound", "margin", "spent", "verdict", "detail",
                "trials", "successes", "p_value", "share", "upper", "ran"} <= set(result)


@pytest.mark.usefixtures("noise_off")
def test_veil_attack_json_summary_names_the_breach(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status = _veil_attack(
        attack(), monkeypatch, "--json", "--attack", "differencing", truth=population_file
    )
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["breaches"] == ["differencing"] and summary["ran"] == summary["selected"] == 1
    assert status == summary["exit_status"] == 1
    assert summary["exit_reason"] == "an attack found a breach"
    assert summary["text"] == "1 of 1 attacks ran: 1 found a breach (differencing)."


def test_the_attacker_waits_out_the_rate_limit(attack: Callable[..., Attacker]) -> None:
    attacker = attack(limits={"rate_per_second": 20, "rate_burst": 3})
    result = attacks.suppression(attacker.ctx)  # GetCodebook, then a release: past the burst
    for _ in range(4):
        attacker.target.budget()
    assert result.trials == 60


def test_a_small_cap_reports_the_attacks_it_cannot_afford_as_not_run(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """epsilon=0.05 shared by six attacks that spend: four cannot afford even a tenth of their
    default loss. They must say so, and the exit status must say the run was incomplete."""
    status = _veil_attack(attack(cap="0.05"), monkeypatch, truth=population_file)
    out = capsys.readouterr().out
    rows = _rows(out)
    assert status == EXIT_INCOMPLETE
    for name in ("key_leakage", "suppression", "differencing", "averaging"):
        row, detail = rows[name]
        assert row.split()[1:] == ["-", "-", "-", "0", "-", "0", "NOT", "RUN"], row
        assert "more than its share of the budget" in detail and "larger cap" in detail
    for name in ("injection", "reconstruction", "budget_race"):
        assert rows[name][0].split()[-1] in ("defended", "stopped"), rows[name][0]
    assert "its share: epsilon=0.025 of 0.05 left" in rows["reconstruction"][1]
    assert out.splitlines()[-1].startswith(
        "3 of 7 attacks ran: 0 found a breach; 4 did not run (key_leakage, suppression, "
        "differencing, averaging)."
    )


def test_each_attack_spends_at_most_its_share(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With epsilon=1 for three attacks, differencing (which alone could spend it all at its
    default loss) runs at a smaller loss within a third, and the two after it still run."""
    attacker = attack(cap="1")
    status = _veil_attack(
        attacker, monkeypatch, "--json", "--attack", "differencing", "--attack",
        "reconstruction", "--attack", "budget_race", "--trials", "40", truth=population_file,
    )
    results = {r["name"]: r for r in json.loads(capsys.readouterr().out)["attacks"]}
    assert status == 0
    assert all(r["ran"] for r in results.values()), results
    differencing = results["differencing"]
    assert differencing["share"] == "epsilon=0.333 of 1 left"
    # two releases of 0.166, both made for it
    assert differencing["charged"] == differencing["dp_loss"] == "epsilon=0.332"
    assert differencing["spent"] == differencing["charged"]  # the earlier name, still written
    assert "instead of its default 0.5" in differencing["detail"]
    assert results["reconstruction"]["share"] == "epsilon=0.334 of 0.668 left"
    # budget_race raced for the rest (less what its loss, rounded down, leaves over)
    assert Fraction(attacker.target.budget().remaining) < Fraction("0.01")


def test_reconstruction_in_a_default_run_asks_what_half_of_the_rest_allows(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`veil attack` with its defaults, for a client with a deployment's default cap of 1.
    Reconstruction shares what is left with budget_race, so it may spend half of it; it never
    lowers its loss of 0.01 a query, so it asks as many subset counts as that half allows (at
    most 4 per target). Here suppression's release is the one key_leakage made, returned free,
    so 0.418 is left: 20 counts, stopped by its share, within a bound of 0.550."""
    status = _veil_attack(attack(cap="1"), monkeypatch, truth=population_file)
    row, detail = _rows(capsys.readouterr().out)["reconstruction"]
    assert status == 0
    assert "its share: epsilon=0.209 of 0.418 left" in detail
    assert detail.startswith(
        "20 random subset counts over 40 unique targets (epsilon=0.01 each) before its share of "
        "the budget was spent"
    )
    # name, success, 95% upper, DP bound, trials, DP loss, charged, verdict
    assert row.split()[3:] == ["0.550", "40", "epsilon=0.2", "epsilon=0.2", "stopped"], row


def test_budget_race_with_nothing_left_is_not_run(
    attack: Callable[..., Attacker],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A race for a budget of 0 cannot pass the cap whatever the ledger does: it tests nothing."""
    status = _veil_attack(attack(cap="0"), monkeypatch, "--attack", "budget_race")
    out = capsys.readouterr().out
    row, detail = _rows(out)["budget_race"]
    assert row.endswith("NOT RUN") and "defended" not in out
    assert "no budget to race for" in detail
    assert status == EXIT_INCOMPLETE
    assert out.splitlines()[-1].startswith("0 of 1 attacks ran: 0 found a breach; 1 did not run")


def test_reconstruction_without_targets_says_why_and_which_key_has_them(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every record has CountryOfExploitation US: none is unique on it; citizenship has some."""
    status = _veil_attack(
        attack(), monkeypatch, "--attack", "reconstruction", "--key", "CountryOfExploitation",
        truth=population_file,
    )
    row, detail = _rows(capsys.readouterr().out)["reconstruction"]
    assert status == EXIT_INCOMPLETE and row.endswith("NOT RUN")
    assert detail.startswith(
        "no targets: it guesses the --flag (isForcedLabour) of records that are the only record "
        "with its value of --key (CountryOfExploitation)"
    )
    assert "Choose another --key: citizenship would offer targets" in detail


def test_too_few_targets_to_show_a_breach_is_inconclusive(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """4 guesses against a bound of 0.731: even 4 of 4 right is within chance."""
    status = _veil_attack(
        attack(), monkeypatch, "--attack", "differencing", "--trials", "4", truth=population_file
    )
    out = capsys.readouterr().out
    row, detail = _rows(out)["differencing"]
    assert row.split()[-1] == "inconclusive" and "4 guesses are too few" in detail
    assert status == EXIT_INCOMPLETE
    assert "0 of 1 attacks ran: 0 found a breach; 1 ran too little" in out


def test_a_refusal_that_ends_an_attack_is_not_a_defence(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(attacks.ATTACKS, "suppression", _refused_for_budget)
    status = _veil_attack(
        attack(), monkeypatch, "--attack", "suppression", "--attack", "injection",
        truth=population_file,
    )
    out = capsys.readouterr().out
    row, detail = _rows(out)["suppression"]
    assert row.endswith("NOT RUN") and detail.startswith("the server refused it for budget")
    assert status == EXIT_INCOMPLETE
    assert "1 of 2 attacks ran" in out


@pytest.mark.usefixtures("noise_off")
def test_a_breach_exits_1_even_when_another_attack_did_not_run(
    attack: Callable[..., Attacker],
    population_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exit status says a breach before anything else: an attack beside it that could not
    run does not turn a run that found one into a run that merely tested less."""

    monkeypatch.setitem(attacks.ATTACKS, "suppression", _refused_for_budget)
    status = _veil_attack(
        attack(), monkeypatch, "--attack", "suppression", "--attack", "differencing",
        truth=population_file,
    )
    rows = _rows(capsys.readouterr().out)
    assert rows["suppression"][0].endswith("NOT RUN")
    assert rows["differencing"][0].endswith("BREACH")
    assert status == EXIT_FOUND


def test_a_missing_token_is_an_error_not_a_breach(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import veil_cli

    monkeypatch.delenv("VEIL_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_:
        veil_cli.main(["attack", "--server", "127.0.0.1:1", "--attack", "injection"])
    assert exit_.value.code == 2 and "VEIL_TOKEN" in capsys.readouterr().err


def test_a_truth_file_of_other_data_is_refused_before_anything_is_spent(
    attack: Callable[..., Attacker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.attacks import population

    attacker = attack()
    other = population.build(tmp_path / "other.duckdb", seed=12)
    with duckdb.connect(str(other)) as connection:  # as another seed's file records itself
        connection.execute(
            "UPDATE veil_metadata SET value = 'attack-population-seed-12' "
            "WHERE key = 'data_version'"
        )
    status = _veil_attack(attacker, monkeypatch, "--attack", "differencing", truth=other)
    captured = capsys.readouterr()
    assert status == 2 and "differencing" not in captured.out
    assert "'attack-population-seed-12'" in captured.err and "'attack-population'" in captured.err
    assert "nothing was spent" in captured.err
    assert attacker.target.budget().spent == "0"
