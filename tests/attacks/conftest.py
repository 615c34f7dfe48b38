"""Live servers for the attack tests: the real configuration, and unsafe ones that exist only here.

Each unsafe configuration is the real server with one protection removed by monkeypatching in
this test process (the server runs in-process on port 0), so an attack can show that it works
where the protection is missing and fails where it is present:

- noise_off: every OpenDP mechanism returns the true values;
- fresh_noise_on_replay: a stored release is returned with freshly drawn noise, free;
- suppress_on_true_count: a cell is published when its TRUE count reaches k;
- keys_from_data: a release holds only the cells that have records;
- racy_budget: an in-memory ledger that checks the cap, pauses, then books the charge;
- open_door: query values are not checked against the codebook and the limits are lifted.

None of these is an option of the product.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from audit.attacks import Context
from audit.truth import Truth
from audit.wire import Target
from engine import engine as engine_module
from engine.backend import Cancellation
from engine.codebook import Variable
from engine.errors import BudgetExceededError
from engine.loss import format_amount
from engine.noise import Mechanism
from engine.planner import Plan
from engine.query import Count
from engine.release import Answer, Release, build_answer
from server.app import Running, build_engine, start
from server.auth import Role
from tests.attacks import population
from tests.server_harness import MemoryAccounts, MemoryReservation, live_config, start_live

# The level of the tests' binomial checks: a real server fails one by chance with probability at
# most this (its success rate is at most the bound), per check.
ALPHA = 1e-4
# The attacks run as fast as the server can answer, and the budget race runs more releases at
# once than a deployment lets one client run (the race is a property of the ledger, which the
# cap on calls running only makes harder to reach).
FAST_LIMITS = {"rate_per_second": 100_000, "rate_burst": 100_000, "calls_per_client": 64}


@pytest.fixture(scope="session")
def population_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return population.build(tmp_path_factory.mktemp("attack") / "population.duckdb")


@pytest.fixture(scope="session")
def large_population_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return population.build(
        tmp_path_factory.mktemp("attack-large") / "population.duckdb", uniques=120
    )


@pytest.fixture(scope="session")
def truth(population_file: Path) -> Iterator[Truth]:
    oracle = Truth(population_file)
    yield oracle
    oracle.close()


@dataclass
class Attacker:
    """A live server and the attacker's context against it (client alice, unless set)."""

    running: Running
    target: Target
    ctx: Context

    def close(self) -> None:
        self.target.close()
        self.running.stop(0)


@pytest.fixture
def attack(
    tmp_path: Path, population_file: Path, truth: Truth
) -> Iterator[Callable[..., Attacker]]:
    """Start a real server over the population; `cap` is the attacking client's budget."""
    started: list[Attacker] = []

    def make(
        *, cap: str = "50", seed: int = 0, data: Path | None = None, oracle: Truth | None = None,
        **sections: Any,
    ) -> Attacker:
        limits = {**FAST_LIMITS, **sections.pop("limits", {})}
        live = start_live(
            tmp_path / f"server{len(started)}",
            data=data or population_file,
            caps={"dataset": "100", "client": "1"},
            limits=limits,
            **sections,
        )
        live.ledger.set_cap("alice", cap)
        target = Target(f"127.0.0.1:{live.port}", live.tokens["alice"])
        attacker = Attacker(live.running, target, Context(target, oracle or truth, seed=seed,
                                                          alpha=ALPHA))
        started.append(attacker)
        return attacker

    yield make
    for attacker in started:
        attacker.close()


# ---- the unsafe configurations -------------------------------------------------------------------


@pytest.fixture
def noise_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def nothing(self: Mechanism, size: int) -> np.ndarray:
        return np.zeros(size, dtype=np.int64)

    monkeypatch.setattr(Mechanism, "noise", nothing)


@pytest.fixture
def fresh_noise_on_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    original = engine_module.Engine.release

    def leaky(self: engine_module.Engine, query: Any, **kwargs: Any) -> Release:
        release = original(self, query, **kwargs)
        fresh = self.answer(self.plan(query, loss=kwargs["loss"]))
        return Release(fresh.table, release.metadata)

    monkeypatch.setattr(engine_module.Engine, "release", leaky)


def _patch_answer(
    monkeypatch: pytest.MonkeyPatch, rewrite: Callable[[Plan, Answer, list[np.ndarray]], Answer]
) -> None:
    def answer(
        self: engine_module.Engine, plan: Plan, *, cancel: Cancellation | None = None
    ) -> Answer:
        exact = self._true_components(plan, cancel=cancel)
        noisy = [m.release(v) for m, v in zip(plan.mechanisms, exact, strict=True)]
        built = build_answer(plan, noisy, data_version=self.data_version)
        if not isinstance(plan.query.measure, Count):
            return built
        return rewrite(plan, built, exact)

    monkeypatch.setattr(engine_module.Engine, "answer", answer)


@pytest.fixture
def suppress_on_true_count(monkeypatch: pytest.MonkeyPatch) -> None:
    def rewrite(plan: Plan, answer: Answer, exact: list[np.ndarray]) -> Answer:
        hidden = exact[0] < plan.settings.k
        table = answer.table
        noisy = np.asarray(table.column("value").to_numpy(zero_copy_only=False), dtype=np.int64)
        table = table.set_column(
            table.schema.get_field_index("value"), "value", pa.array(noisy, mask=hidden)
        )
        table = table.set_column(
            table.schema.get_field_index("suppressed"), "suppressed", pa.array(hidden)
        )
        return Answer(table, answer.metadata)

    _patch_answer(monkeypatch, rewrite)
    # build_answer then publishes every noisy value, and the rewrite hides the true-small cells.
    monkeypatch.setattr(
        "engine.release.publishable", lambda counts, tau: np.ones_like(counts, dtype=bool)
    )


@pytest.fixture
def keys_from_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def rewrite(plan: Plan, answer: Answer, exact: list[np.ndarray]) -> Answer:
        return Answer(answer.table.filter(pa.array(exact[0] > 0)), answer.metadata)

    _patch_answer(monkeypatch, rewrite)


@pytest.fixture
def open_door(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Values reach the planner unchecked; the returned limits lift the size limits."""
    monkeypatch.setattr(Variable, "parse_value", lambda self, value: value)
    return {"max_cells": 400_000, "max_filter_depth": 64, "max_filter_terms": 100_000,
            "max_response_bytes": 128 << 20}


class RacyAccounts(MemoryAccounts):
    """Checks the cap, pauses, then books the charge: the race a transaction prevents."""

    def reserve(
        self, plan: Plan, *, client: str, request_id: str, data_version: str = ""
    ) -> MemoryReservation:
        record = self.records[client]
        amount = plan.loss.amount
        if record.spent + record.reserved + amount > record.cap:
            remaining = record.cap - record.spent - record.reserved
            raise BudgetExceededError(
                f"client {client!r} has {format_amount(remaining)} left",
                scope=f"client:{client}",
                remaining=format_amount(remaining),
            )
        time.sleep(0.05)
        with self.lock:
            record.reserved += amount
        return MemoryReservation(self, client, request_id, plan)


@pytest.fixture
def racy_attack(
    tmp_path: Path, population_file: Path, truth: Truth
) -> Iterator[Callable[..., Attacker]]:
    started: list[Attacker] = []

    def make(*, cap: str = "1") -> Attacker:
        config = live_config(
            tmp_path, population_file, caps={"dataset": "100", "client": "1"}, limits=FAST_LIMITS
        )
        engine = build_engine(config)
        accounts = RacyAccounts()
        token = accounts.add("alice", Role.RESEARCHER, cap=cap)
        running = start(config, engine=engine, accounts=accounts)
        target = Target(f"127.0.0.1:{running.port}", token)
        attacker = Attacker(running, target, Context(target, truth, alpha=ALPHA))
        started.append(attacker)
        return attacker

    yield make
    for attacker in started:
        attacker.close()


def memory_spent(attacker: Attacker) -> Fraction:
    accounts = attacker.running.accounts
    assert isinstance(accounts, MemoryAccounts)
    return accounts.total_spent()


__all__ = ["ALPHA", "Attacker", "memory_spent"]
