"""Every attack of `audit.attacks`, twice: against an unsafe configuration (one protection
removed, in this test process only), where it must succeed, and against the real server, where
it must stay within the bound differential privacy allows for the releases it holds, or be
stopped.

How often these fail by chance:
- real server, guessing attacks: the verdict is BREACH only when an exact binomial test rejects
  "success rate <= bound" at level ALPHA = 1e-4; differential privacy guarantees the rate is at
  most the bound (the targets' secrets are balanced, prior 1/2), so each such test fails by
  chance with probability at most 1e-4;
- unsafe configurations: differencing, reconstruction, suppression and key leakage are exact
  there (success 1 by construction); averaging succeeds per target with probability about
  0.998 (65 draws of scale 1 averaged), and needs 56 of 60 for a BREACH: it fails by chance
  with probability below 1e-7; the budget race and the injection probes do not depend on chance
  beyond thread scheduling (a 50 ms window against 12 concurrent callers).
The larger runs (--run-slow) repeat the guessing attacks on more targets and fresh servers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from audit import attacks
from audit.truth import Truth
from server.accounts import LedgerAccounts
from tests.attacks.conftest import Attacker, memory_spent


def _print(result: attacks.AttackResult) -> None:
    print(f"\n{attacks.HEADER}\n{result.row()}\n  {result.detail}")


# ---- differencing --------------------------------------------------------------------------------


@pytest.mark.usefixtures("noise_off")
def test_differencing_succeeds_without_noise(attack: Callable[..., Attacker]) -> None:
    result = attacks.differencing(attack().ctx)
    _print(result)
    assert result.trials == 60 and result.success_rate == 1.0
    assert result.verdict == "BREACH"


def test_differencing_fails_within_its_bound(attack: Callable[..., Attacker]) -> None:
    result = attacks.differencing(attack().ctx)
    _print(result)
    assert result.trials == 60
    assert result.verdict == "defended"
    assert result.success_rate < 1.0


def test_differencing_is_judged_by_what_it_holds_about_each_target_not_all_it_spent(
    attack: Callable[..., Attacker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches: four releases charged, but each target is in only two of them, so the
    bound its guesses are held to is the one at epsilon 1 (0.731), not at 2 (0.881), which
    would let a breach pass as within the bound."""
    whole = attacks._batches
    monkeypatch.setattr(  # a half of a batch is a batch: its targets are still apart
        attacks, "_batches",
        lambda people, know: [b[i::2] for b in whole(people, know) for i in (0, 1)],
    )
    result = attacks.differencing(attack().ctx)
    assert result.trials == 60
    assert result.charged == "epsilon=2" and result.dp_loss == "epsilon=1"
    assert result.bound == pytest.approx(math.e / (1 + math.e))


def test_a_single_success_of_an_attack_privacy_does_not_cover_is_a_breach() -> None:
    """One injection accepted, or one release past the cap, is a breach: not a rate to test."""
    assert attacks._count_result("injection", 1, 40, "0", "").verdict == "BREACH"
    assert attacks._count_result("injection", 0, 40, "0", "").verdict == "defended"
    assert attacks._count_result("injection", 0, 0, "0", "").verdict == "not run"


def test_a_breach_is_tested_on_the_chance_of_at_least_as_many_right_guesses() -> None:
    """The p-value counts the observed successes themselves: twelve right guesses of twelve,
    where the bound is a coin toss, happen by chance once in 4096 times, a breach at 1e-3."""
    assert attacks.binomial_p_value(12, 12, 0.5) == pytest.approx(0.5**12)
    assert attacks.binomial_p_value(2, 3, 0.5) == pytest.approx(0.5)  # 3 of 8, and 1 of 8
    assert attacks.binomial_p_value(1, 1, 0.7) == pytest.approx(0.7)
    assert attacks.binomial_p_value(0, 10, 0.9) == 1.0
    result = attacks._guess_result(
        "differencing", 12, 12, 0.5, "epsilon=0", "", alpha=1e-3, dp_loss="epsilon=0"
    )
    assert result.verdict == "BREACH"


# ---- averaging -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_noise_on_replay")
def test_averaging_succeeds_when_a_replay_draws_fresh_noise(
    attack: Callable[..., Attacker],
) -> None:
    result = attacks.averaging(attack().ctx)
    _print(result)
    assert result.success_rate >= 0.9
    assert result.verdict == "BREACH"


def test_averaging_rewrites_reach_one_release(attack: Callable[..., Attacker]) -> None:
    attacker = attack()
    result = attacks.averaging(attacker.ctx)
    _print(result)
    assert "answered by 1 distinct releases" in result.detail
    assert result.verdict == "defended"
    assert result.charged == result.dp_loss == "epsilon=1"  # 65 requests, one charge


# ---- reconstruction ------------------------------------------------------------------------------


@pytest.mark.usefixtures("noise_off")
def test_reconstruction_recovers_every_bit_without_noise(
    attack: Callable[..., Attacker],
) -> None:
    result = attacks.reconstruction(attack(cap="1").ctx)
    _print(result)
    assert result.success_rate == 1.0 and result.trials == 40
    assert result.verdict == "BREACH"


def test_reconstruction_is_stopped_by_the_budget_within_its_bound(
    attack: Callable[..., Attacker],
) -> None:
    result = attacks.reconstruction(attack(cap="1").ctx)
    _print(result)
    assert "the budget refused more" in result.detail
    assert result.charged == result.dp_loss == "epsilon=1"
    assert result.verdict == "stopped"


# ---- suppression membership ----------------------------------------------------------------------


@pytest.mark.usefixtures("suppress_on_true_count")
def test_suppression_membership_succeeds_when_suppressing_on_the_true_count(
    attack: Callable[..., Attacker],
) -> None:
    result = attacks.suppression(attack().ctx)
    _print(result)
    assert result.success_rate == 1.0 and result.verdict == "BREACH"


def test_suppression_membership_fails_within_its_bound(attack: Callable[..., Attacker]) -> None:
    result = attacks.suppression(attack().ctx)
    _print(result)
    assert result.trials == 60 and result.verdict == "defended"


# ---- key leakage ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("keys_from_data")
def test_key_leakage_succeeds_when_keys_come_from_the_data(
    attack: Callable[..., Attacker],
) -> None:
    result = attacks.key_leakage(attack().ctx)
    _print(result)
    assert result.success_rate == 1.0 and result.verdict == "BREACH"


def test_key_leakage_fails_within_its_bound(attack: Callable[..., Attacker]) -> None:
    result = attacks.key_leakage(attack().ctx)
    _print(result)
    assert "every key of the public domain" in result.detail
    assert "FOUND" not in result.detail
    assert result.verdict == "defended"


def test_canary_values_are_refused_by_the_codebook(
    attack: Callable[..., Attacker], monkeypatch: pytest.MonkeyPatch, open_door: Any
) -> None:
    """With codebook checks removed, a canary value is no longer refused: the probe sees it."""
    result = attacks.key_leakage(attack().ctx)
    _print(result)
    assert "FOUND" in result.detail and result.verdict == "BREACH"


# ---- budget race ---------------------------------------------------------------------------------


def test_budget_race_overspends_a_racy_ledger(racy_attack: Callable[..., Attacker]) -> None:
    attacker = racy_attack(cap="1")
    result = attacks.budget_race(attacker.ctx)
    _print(result)
    assert result.verdict == "BREACH"
    assert memory_spent(attacker) > 1


def test_budget_race_never_passes_the_cap(attack: Callable[..., Attacker]) -> None:
    attacker = attack(cap="1")
    result = attacks.budget_race(attacker.ctx)
    _print(result)
    assert result.verdict == "defended" and result.success_rate == 0
    budget = attacker.target.budget()
    assert budget.remaining == "0" and budget.spent == "1"


def test_budget_race_finds_a_ledger_that_books_more_than_was_left(
    attack: Callable[..., Attacker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No more releases than the budget allows, but the ledger booked more than remained (each
    charge recorded at twice its loss, say): a breach all the same."""
    attacker = attack(cap="1")
    budget = attacker.target.budget
    calls: list[int] = []

    def booked_twice() -> Any:
        answer = budget()
        calls.append(1)
        if len(calls) > 1:  # after the race: the spent figure as a ledger booking double
            answer.spent = str(2 * Fraction(answer.spent or "0"))
        return answer

    monkeypatch.setattr(attacker.target, "budget", booked_twice)
    result = attacks.budget_race(attacker.ctx)
    assert result.verdict == "BREACH", result.detail
    assert "the ledger charged 2" in result.detail


def test_budget_race_finds_a_release_past_the_cap_that_the_ledger_did_not_book(
    attack: Callable[..., Attacker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger that lets one release more through than was left, and loses its booking: the
    spending it reports stays within what was left, and only the count of releases shows it."""
    attacker = attack(cap="1")
    budget = attacker.target.budget
    calls: list[int] = []

    def one_lost() -> Any:
        answer = budget()
        calls.append(1)
        if len(calls) == 1:  # before the race: 0.875 left, so 8 releases of 0.109 fit
            answer.remaining = "0.875"
        else:  # after it: the 9th release, past 0.875, booked nowhere
            answer.spent = str(Fraction(answer.spent or "0") - Fraction("0.109"))
        return answer

    monkeypatch.setattr(attacker.target, "budget", one_lost)
    result = attacks.budget_race(attacker.ctx)
    assert "which allows 8: 9 released" in result.detail, result.detail
    assert result.verdict == "BREACH" and result.successes == 1


def test_budget_race_does_not_count_stored_releases_returned_free(
    attack: Callable[..., Attacker],
) -> None:
    # A second race at the same loss meets the queries the first one released: those come back
    # free, reserving nothing, and are no sign that the ledger let the client past its cap.
    attacker = attack(cap="2")
    first = attacks.budget_race(attacker.ctx)
    assert first.verdict == "defended"
    accounts = attacker.running.accounts
    assert isinstance(accounts, LedgerAccounts)
    accounts.ledger.set_cap("alice", "4")
    replays = attacker.target.replays
    again = attacks.budget_race(attacker.ctx)
    _print(again)
    assert attacker.target.replays > replays  # the race did meet stored releases
    assert again.verdict == "defended" and again.success_rate == 0
    assert attacker.target.budget().spent == "4"


# ---- injection and denial of service -------------------------------------------------------------


def test_injection_gets_through_an_open_door(
    attack: Callable[..., Attacker], open_door: dict[str, Any]
) -> None:
    result = attacks.injection(attack(limits=open_door).ctx)
    _print(result)
    assert result.verdict == "BREACH"
    assert "crosstab" in result.detail and "filter 40 deep: accepted" in result.detail
    assert "INTERNAL" in result.detail  # unchecked values reach the planner and fault


@pytest.mark.parametrize(
    ("fault", "found"),
    [
        ("sql_text", "the message carries SQL engine text"),
        ("slow", "took 9.0 s"),
        ("charged", "the hostile requests were charged 0.1"),
        ("stopped", "the server stopped serving"),
    ],
)
def test_injection_calls_each_way_of_failing_a_breach(
    attack: Callable[..., Attacker], monkeypatch: pytest.MonkeyPatch, fault: str, found: str
) -> None:
    """A refusal that quotes the SQL engine, a probe that takes too long, hostile requests that
    were charged, a server that stops serving: each alone is a breach, named in the detail."""
    attacker = attack()
    target = attacker.ctx.target
    raw, budget, probes = target.raw, target.budget, [0]

    def faulty_raw(method: str, payload: bytes, *, timeout: float) -> Any:
        call = raw(method, payload, timeout=timeout)
        probes[0] += 1
        if probes[0] == 1 and fault == "sql_text":
            call = replace(call, message="Binder Error: Referenced column not found")
        if probes[0] == 1 and fault == "slow":
            call = replace(call, seconds=9.0)
        return call

    def charged_budget() -> Any:
        answer = budget()
        if probes[0] and fault == "charged":  # after the probes
            answer.spent = str(Fraction(answer.spent or "0") + Fraction(1, 10))
        return answer

    monkeypatch.setattr(target, "raw", faulty_raw)
    monkeypatch.setattr(target, "budget", charged_budget)
    if fault == "stopped":
        monkeypatch.setattr(target, "healthy", lambda: False)
    result = attacks.injection(attacker.ctx)
    assert result.verdict == "BREACH" and found in result.detail, result.detail


def test_injection_and_oversized_requests_are_refused_cleanly(
    attack: Callable[..., Attacker],
) -> None:
    result = attacks.injection(attack().ctx)
    _print(result)
    assert result.verdict == "defended", result.detail
    assert result.charged == "0" and result.dp_loss == ""


# ---- the whole suite, and larger runs ------------------------------------------------------------


def test_run_orders_attacks_and_skips_those_needing_the_truth(
    attack: Callable[..., Attacker],
) -> None:
    attacker = attack()
    attacker.ctx.truth = None
    results = attacks.run(attacker.ctx, ("differencing", "injection"))
    assert [r.name for r in results] == ["injection", "differencing"]
    assert results[1].verdict == "not run" and "--truth" in results[1].detail
    assert not results[1].ran and results[0].ran


@pytest.mark.slow
@pytest.mark.parametrize("name", ["differencing", "averaging", "suppression", "key_leakage"])
def test_larger_run_stays_within_the_bound(
    name: str, attack: Callable[..., Attacker], large_population_file: Path
) -> None:
    """Five fresh servers each (fresh noise), the larger population: 120 targets where it has
    them. The pooled successes are tested at level 1e-4, like the default run."""
    oracle = Truth(large_population_file)
    try:
        successes = trials = 0
        bound = 0.0
        for seed in range(5):
            attacker = attack(data=large_population_file, oracle=oracle, seed=seed)
            result = attacks.ATTACKS[name](attacker.ctx, trials=120)
            successes, trials, bound = successes + result.successes, trials + result.trials, \
                result.bound
            attacker.close()
        p = attacks.binomial_p_value(successes, trials, bound)
        print(f"\n{name}: {successes}/{trials} = {successes / trials:.3f}, bound {bound:.3f}, "
              f"p = {p:.3g}")
        assert p >= 1e-4
    finally:
        oracle.close()


@pytest.mark.slow
def test_larger_reconstruction_with_more_queries_stays_within_the_bound(
    attack: Callable[..., Attacker], large_population_file: Path
) -> None:
    oracle = Truth(large_population_file)
    try:
        attacker = attack(cap="2", data=large_population_file, oracle=oracle)
        result = attacks.reconstruction(attacker.ctx, people=100, loss="0.005", max_queries=1000)
        _print(result)
        assert result.verdict == "stopped"
    finally:
        oracle.close()
