"""Attacks on a live veil server, each scored against the bound differential privacy allows.

Every attack talks to the server only through its public gRPC calls, with one client's token, and
scores its guesses against the truth (`audit.truth`), which the auditor reads in-process from the
data file. Each returns an `AttackResult`:

- success_rate: the share of the attacker's guesses that were right (or, for the attacks that are
  not guesses, the share of attempts that got something the server should have refused);
- bound: the highest success rate differential privacy allows a guess of one person's yes/no
  secret, with prior 1/2, after the privacy loss the attacker's releases carry about that person
  (`engine.risk.binary_guess_bound`: e^eps / (1 + e^eps) under pure DP); 0 for the attacks that
  differential privacy does not cover, where any success is a failure of the server;
- margin: the one-sided 95% Clopper-Pearson margin above the observed rate;
- dp_loss: the privacy loss the bound is computed from: what the releases the attacker holds
  carry about each target, each release at the loss it was made at, a stored release the server
  returned free included (empty for the attacks differential privacy does not cover);
- charged: what the attack cost the client, the sum of the server's own charges: a stored
  release returned again is free, so this can be less than dp_loss, and it is what the ledger
  booked;
- verdict: "BREACH" when the rate is above the bound beyond chance (an exact binomial test at
  level `alpha`, default 1e-3); "stopped" when the budget (the server's, or the attack's share of
  it) cut the attack short and it stayed within the bound; "defended" when it ran in full and
  stayed within the bound; "inconclusive" when it ran but could not have shown a breach (so few
  targets that even all of them guessed right would be within chance); "not run" when it could
  not run at all (no data file, no targets, no budget for its queries, a refused call). Only the
  first three mean the attack tested something (`AttackResult.ran`).

The attacks, and what each shows:

- differencing: two large counts that differ only by a unique target (a tracker); their difference
  is the target's flag. Noise on each count bounds it.
- averaging: one query and dozens of rewrites of it (reordered IN lists, split lists, double
  negation, always-true and always-false terms, repeated terms) averaged to cancel the noise.
  Canonical fingerprints make them one query, answered by one stored release.
- reconstruction: random subset counts over a small subpopulation, solved by linear programming
  (Dinur and Nissim), until the budget (or its share of it) ends it. Noise and the budget bound
  it.
- suppression: whether a cell holds k or k - 1 records, read from whether it is suppressed.
  Deciding suppression on the noisy count bounds it.
- key_leakage: a category absent from the codebook must be refused and never appear as a key,
  and a category with one record must look like one with none: every key of the public domain is
  released, zero cells included.
- budget_race: many concurrent releases whose total exceeds the remaining budget; none may get
  past the cap.
- injection: SQL-like strings in every field of every call, crosstabs far beyond the cell limit,
  deep and wide filters, oversized messages. Each must be refused cleanly and quickly, charge
  nothing, reveal no SQL engine text, and leave the server serving.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeVar

import grpc
import numpy as np

from audit.truth import Knowledge, Person, Truth, knowledge
from audit.wire import Answer, Call, Refused, Target
from engine.loss import Accounting, format_amount, parse_amount
from engine.query import And, Count, Eq, Filter, In, IsMissing, Not, Or, Query
from engine.risk import binary_guess_bound
from protos.veil.v1 import veil_pb2 as pb
from server.convert import filter_to_pb, query_to_pb

T = TypeVar("T")
DEFAULT_ALPHA = 1e-3

# The order `veil attack` runs them in: the two that spend a client's whole remaining budget last.
ATTACK_NAMES = (
    "injection",
    "key_leakage",
    "suppression",
    "differencing",
    "averaging",
    "reconstruction",
    "budget_race",
)
NEEDS_TRUTH = frozenset({"key_leakage", "suppression", "differencing", "averaging",
                         "reconstruction"})
# The attacks that spend budget; `run` gives each a share of what remains (see `run`).
SPENDS = ("key_leakage", "suppression", "differencing", "averaging", "reconstruction",
          "budget_race")
# An attack whose default loss does not fit its share runs at a smaller loss, down to this
# fraction of the default; below it the attack would show too little, and is not run.
MIN_LOSS_FRACTION = Fraction(1, 10)

BREACH, DEFENDED, STOPPED = "BREACH", "defended", "stopped"
INCONCLUSIVE, NOT_RUN = "inconclusive", "not run"
RAN = frozenset({BREACH, DEFENDED, STOPPED})


@dataclass(frozen=True)
class AttackResult:
    """One attack's outcome, scored against its bound (see the module docstring)."""

    name: str
    success_rate: float
    bound: float
    margin: float
    charged: str
    verdict: str
    detail: str
    trials: int = 0
    successes: int = 0
    p_value: float | None = None
    share: str = ""  # the most `run` let it spend, and of what
    dp_loss: str = ""

    @property
    def upper(self) -> float:
        return min(1.0, self.success_rate + self.margin)

    @property
    def ran(self) -> bool:
        """The attack tested something: its verdict says what the server did against it."""
        return self.verdict in RAN

    def row(self) -> str:
        scored = self.verdict != NOT_RUN
        rate = f"{self.success_rate:.3f}" if scored else "-"
        upper = f"{self.upper:.3f}" if scored else "-"
        bound = f"{self.bound:.3f}" if scored else "-"
        dp_loss = self.dp_loss if scored and self.dp_loss else "-"
        return (
            f"{self.name:<15} {rate:>8} {upper:>9} {bound:>9} {self.trials:>7} "
            f"{dp_loss:>14} {self.charged:>14}  "
            f"{self.verdict.upper() if self.verdict == NOT_RUN else self.verdict}"
        )


def not_run(name: str, detail: str, *, charged: str = "0") -> AttackResult:
    return AttackResult(name, 0.0, 0.5, 0.0, charged, NOT_RUN, detail)


HEADER = (
    f"{'attack':<15} {'success':>8} {'95% upper':>9} {'DP bound':>9} {'trials':>7} "
    f"{'DP loss':>14} {'charged':>14}  verdict"
)


# ---- statistics ----------------------------------------------------------------------------------


def upper_margin(successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper confidence limit minus the observed rate."""
    if trials == 0:
        return 0.0
    from scipy.stats import beta

    rate = successes / trials
    if successes == trials:
        return 1.0 - rate
    upper = float(beta.ppf(confidence, successes + 1, trials - successes))
    return max(0.0, upper - rate)


def binomial_p_value(successes: int, trials: int, bound: float) -> float:
    """P(at least `successes` of `trials`) when each succeeds with probability `bound`."""
    if trials == 0:
        return 1.0
    from scipy.stats import binom

    return float(binom.sf(successes - 1, trials, bound))


def _guess_result(
    name: str,
    successes: int,
    trials: int,
    bound: float,
    charged: str,
    detail: str,
    *,
    alpha: float,
    dp_loss: str,
    stopped: bool = False,
) -> AttackResult:
    """Score `successes` of `trials` guesses against `bound`, the bound for `dp_loss`."""
    if trials == 0:
        return AttackResult(name, 0.0, bound, 0.0, charged, NOT_RUN, detail, dp_loss=dp_loss)
    p = binomial_p_value(successes, trials, bound)
    if p < alpha:
        verdict = BREACH
    elif binomial_p_value(trials, trials, bound) >= alpha:
        # Even every guess right would be within chance: the attack could not have found a breach.
        verdict = INCONCLUSIVE
        detail += (
            f"; INCONCLUSIVE: {trials} guesses are too few to show a breach of a bound of "
            f"{bound:.3f} at level {alpha:g}, even if all were right"
        )
    else:
        verdict = STOPPED if stopped else DEFENDED
    return AttackResult(
        name,
        successes / trials,
        bound,
        upper_margin(successes, trials),
        charged,
        verdict,
        detail,
        trials,
        successes,
        p,
        dp_loss=dp_loss,
    )


def _count_result(name: str, bad: int, attempts: int, charged: str, detail: str) -> AttackResult:
    """For attacks differential privacy does not cover: any success is a failure."""
    rate = bad / attempts if attempts else 0.0
    verdict = BREACH if bad else (DEFENDED if attempts else NOT_RUN)
    return AttackResult(name, rate, 0.0, 0.0, charged, verdict, detail, attempts, bad)


# ---- context -------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every attack works with: the server, the truth, randomness and the test level."""

    target: Target
    truth: Truth | None = None
    seed: int = 0
    alpha: float = DEFAULT_ALPHA
    key: str = "citizenship"
    cells: tuple[str, ...] = ("yearOfRegistration", "gender")
    flag: str = "isForcedLabour"
    # The most the running attack may spend (set by `run`; None: no limit but the server's).
    share: Fraction | None = None
    notes: list[str] = field(default_factory=list)  # what the running attack changed to fit it
    rng: random.Random = field(init=False)
    _knowledge: Knowledge | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def deployment(self) -> pb.Deployment:
        return self.target.codebook().deployment

    @property
    def accounting(self) -> Accounting:
        value = self.deployment.accounting
        return Accounting.ZCDP if value == pb.ACCOUNTING_ZCDP else Accounting.PURE_DP

    @property
    def unit(self) -> str:
        return self.accounting.unit

    def bound(self, amount: Fraction) -> float:
        return binary_guess_bound(self.accounting, float(amount))

    def spent_text(self, amount: Fraction) -> str:
        return f"{self.unit}={format_amount(amount)}" if amount else "0"

    def charged_since(self, mark: Fraction) -> str:
        """What the server has charged for this context's releases since the tally was `mark`
        (`Target.charged` when the attack started)."""
        return self.spent_text(self.target.charged - mark)

    def knowledge(self) -> Knowledge:
        if self._knowledge is None:
            if self.truth is None:
                raise ValueError("this attack needs the truth (the data file) to score against")
            self._knowledge = knowledge(self.truth, key=self.key, cells=self.cells, flag=self.flag)
        return self._knowledge

    def coin(self) -> int:
        return self.rng.randrange(2)

    def affords(self, amount: Fraction) -> bool:
        """Whether the running attack may spend `amount` in all, within its share."""
        return self.share is None or amount <= self.share

    def fit(self, loss: str, releases: int) -> str | None:
        """The loss per release that lets `releases` releases fit the attack's share: `loss`
        when it fits, else the most that does (three significant digits, rounded down), but
        no less than MIN_LOSS_FRACTION of `loss`; None when even that does not fit."""
        wanted = parse_amount(loss)
        if self.affords(wanted * releases):
            return loss
        assert self.share is not None
        fitted = _round_down(self.share / releases)
        if fitted < wanted * MIN_LOSS_FRACTION:
            return None
        self.notes.append(
            f"run at {self.unit}={format_amount(fitted)} per release instead of its default "
            f"{loss}, to fit its share"
        )
        return format_amount(fitted)

    def unaffordable(
        self, name: str, loss: str, releases: int, *, shrinks: bool = True
    ) -> AttackResult:
        """The result of an attack whose releases do not fit its share even at the least loss
        (a tenth of `loss`; `loss` itself for an attack that asks fewer queries instead)."""
        if shrinks:
            least = parse_amount(loss) * MIN_LOSS_FRACTION * releases
            why = f"a tenth of its default loss of {loss} each"
        else:
            least = parse_amount(loss) * releases
            why = "it keeps its loss per query and asks fewer queries"
        return not_run(
            name,
            f"its {releases} release(s) need at least {self.unit}={format_amount(least)} "
            f"({why}), more than its share of the budget: give the client a larger cap, or run "
            f"fewer attacks (--attack)",
        )

    def no_targets(self, name: str, *, alone: bool) -> AttackResult:
        """Not run, for want of targets: says why, and which other --key would offer some.
        Only variable names are printed (read from the data file the auditor holds), no counts."""
        which = (
            "the only record with its value" if alone
            else "the only record with its value in its cell (--cells)"
        )
        detail = (
            f"no targets: it guesses the --flag ({self.flag}) of records that are {which} of "
            f"--key ({self.key}), with {self.flag} known, as many with it as without it; this "
            f"data file has no such records for --key {self.key}. "
        )
        candidates = self.key_candidates(alone=alone)
        if candidates:
            detail += f"Choose another --key: {', '.join(candidates)} would offer targets"
        else:
            detail += "No other category or country variable offers any either"
        return not_run(name, detail)

    def key_candidates(self, *, alone: bool, limit: int = 5) -> list[str]:
        """The category and country variables that would offer targets as --key, most first."""
        if self.truth is None:
            return []
        kinds = (pb.VARIABLE_KIND_CATEGORY, pb.VARIABLE_KIND_COUNTRY)
        names = [
            v.name for v in self.target.codebook().codebook.variables
            if v.kind in kinds and v.queryable and v.name not in (self.key, self.flag, *self.cells)
        ]
        offered: list[tuple[int, str]] = []
        for name in names:
            know = knowledge(self.truth, key=name, cells=self.cells, flag=self.flag)
            people = [p for p in know.uniques if p.alone or not alone]
            ones = sum(p.secret for p in people)
            pairs = min(ones, len(people) - ones)
            if pairs:
                offered.append((-pairs, name))
        return [name for _, name in sorted(offered)[:limit]]


def _balanced(people: Sequence[Person], limit: int, rng: random.Random) -> list[Person]:
    """Equal numbers of targets whose secret is 0 and 1 (prior 1/2), at most `limit` in all;
    targets alone with their code come first (they constrain a tracker least)."""
    ones = [p for p in people if p.secret == 1]
    zeros = [p for p in people if p.secret == 0]
    for group in (ones, zeros):
        rng.shuffle(group)
        group.sort(key=lambda p: not p.alone)
    half = max(0, min(len(ones), len(zeros), limit // 2))  # a limit below 2 chooses none
    chosen = ones[:half] + zeros[:half]
    rng.shuffle(chosen)
    return chosen


def _batches(people: Sequence[Person], know: Knowledge) -> list[list[Person]]:
    """Groups in which each target is the only difference its code makes in its cell: one
    target per cell, and no target's code has a record in another's cell."""
    batches: list[list[Person]] = []
    for person in people:
        for batch in batches:
            if all(know.apart(person, other) for other in batch):
                batch.append(person)
                break
        else:
            batches.append([person])
    return batches


def _targets(know: Knowledge) -> list[Person]:
    """Every record a tracker can single out: alone with its code in its cell."""
    return list(know.uniques)


def _base(know: Knowledge, batch: int, targets: Sequence[Person] = ()) -> list[str]:
    """The large population every query of a batch includes (the common codes, less the
    targets'); a different empty code per batch makes each batch's queries different (same
    counts, independent noise)."""
    own = {p.code for p in targets}
    base = [code for code in know.common if code not in own]
    if (batch or not base) and know.empty:
        base.append(know.empty[(batch - 1) % len(know.empty)])
    return base


# ---- differencing --------------------------------------------------------------------------------


def differencing(ctx: Context, *, trials: int = 60, loss: str = "0.5") -> AttackResult:
    """A tracker: count(flag, base + targets) - count(flag, base) is each target's flag."""
    know = ctx.knowledge()
    people = _balanced(_targets(know), trials, ctx.rng)
    if not people:
        return ctx.no_targets("differencing", alone=False)
    batches = _batches(people, know)
    fitted = ctx.fit(loss, 2 * len(batches))
    if fitted is None:
        return ctx.unaffordable("differencing", loss, 2 * len(batches))
    loss = fitted
    mark = ctx.target.charged
    successes = tried = 0
    spent = Fraction(0)
    # What the attacker holds about a target: the losses its two releases were made at, which
    # exceed the loss asked when the server returns a stored release made at a larger one.
    per_target = Fraction(0)
    stopped = False
    ended_by = "the server's budget refused more"
    for number, batch in enumerate(batches):
        if not ctx.affords(spent + 2 * parse_amount(loss)):
            stopped, ended_by = True, "its share of the budget was spent"
            break
        base = _base(know, number, batch)
        codes = sorted({p.code for p in batch})
        flagged = Eq(know.flag, 1)
        with_targets = Query(Count(), by=know.cells, where=And(flagged, In(know.key, base + codes)))
        without = Query(Count(), by=know.cells, where=And(flagged, In(know.key, base)))
        try:
            first = ctx.target.release(with_targets, loss=loss)
            second = ctx.target.release(without, loss=loss)
        except Refused as exc:
            if exc.budget:
                stopped = True
                break
            raise
        held = parse_amount(first.loss) + parse_amount(second.loss)
        spent += held
        per_target = max(per_target, held)
        for person in batch:
            a, b = first.value(person.cell), second.value(person.cell)
            guess = ctx.coin() if a is None or b is None else int(a - b >= 0.5)
            successes += guess == person.secret
            tried += 1
    if not tried:
        return not_run("differencing", f"the server's budget refused its first release "
                                       f"({ctx.unit}={loss})", charged=ctx.charged_since(mark))
    detail = (
        f"{tried} unique targets, each the only difference between two counts of "
        f"{ctx.unit}={loss} each ({ctx.spent_text(per_target)} about each target)"
        + (f"; {ended_by} after {tried} of {len(people)}" if stopped else "")
    )
    return _guess_result(
        "differencing", successes, tried, ctx.bound(per_target), ctx.charged_since(mark), detail,
        alpha=ctx.alpha, dp_loss=ctx.spent_text(per_target), stopped=stopped,
    )


# ---- averaging -----------------------------------------------------------------------------------


def rewrites(flag: str, key: str, codes: Sequence[str], count: int, rng: random.Random) -> list[
    Filter
]:
    """`count` different spellings of `flag = 1 AND key IN codes`: reordered and split IN lists,
    swapped operands, double negation, always-true and always-false terms, repeated terms."""
    always_true: list[Filter] = [
        Or(Eq(flag, 0), Eq(flag, 1), IsMissing(flag)),
        Not(And(Eq(flag, 0), Eq(flag, 1))),
    ]
    always_false: list[Filter] = [And(Eq(flag, 1), Eq(flag, 0)), And(Eq(flag, 0), Not(Eq(flag, 0)))]
    flag_is_one: list[Filter] = [
        Eq(flag, 1),
        In(flag, [1]),
        And(Not(Eq(flag, 0)), Not(IsMissing(flag))),
        Not(Not(Eq(flag, 1))),
    ]
    out: list[Filter] = []
    seen: set[bytes] = set()
    for attempt in range(count * 20):
        shuffled = list(codes)
        rng.shuffle(shuffled)
        membership: Filter
        if len(shuffled) > 1 and rng.random() < 0.5:
            cut = rng.randrange(1, len(shuffled))
            membership = Or(In(key, shuffled[:cut]), In(key, shuffled[cut:]))
        else:
            membership = In(key, shuffled)
        parts: list[Filter] = [rng.choice(flag_is_one), membership]
        if rng.random() < 0.4:
            parts.append(Eq(flag, 1))  # a repeated term
        if rng.random() < 0.4:
            parts.append(rng.choice(always_true))  # a dummy condition that is always true
        rng.shuffle(parts)
        condition: Filter = And(*parts)
        if rng.random() < 0.4:
            condition = Or(condition, rng.choice(always_false))  # or one that never holds
        if rng.random() < 0.3:
            condition = Not(Not(condition))
        text = query_to_pb(Query(Count(), where=condition)).SerializeToString(deterministic=True)
        if text in seen and attempt < count * 19:
            continue
        seen.add(text)
        out.append(condition)
        if len(out) == count:
            break
    return out


def averaging(
    ctx: Context, *, trials: int = 60, loss: str = "1", repeats: int = 64, variants: int = 0
) -> AttackResult:
    """Ask one count and `repeats` rewrites of it, plus `variants` semantically different
    versions (an empty country added: new queries, charged), and average the answers."""
    assert ctx.truth is not None
    know = ctx.knowledge()
    people = _balanced(_targets(know), trials, ctx.rng)
    if not people:
        return ctx.no_targets("averaging", alone=False)
    batches = _batches(people, know)
    # Each batch should cost one release (and one per variant): the rewrites are free replays.
    fitted = ctx.fit(loss, len(batches) * (1 + variants))
    if fitted is None:
        return ctx.unaffordable("averaging", loss, len(batches) * (1 + variants))
    loss = fitted
    mark = ctx.target.charged
    successes = tried = 0
    spent = Fraction(0)
    distinct: set[str] = set()
    asked = 0
    per_target = Fraction(0)
    stopped = False
    ended_by = ""
    for number, batch in enumerate(batches):
        codes = _base(know, number, batch) + sorted({p.code for p in batch})
        query = Query(Count(), by=know.cells, where=And(Eq(know.flag, 1), In(know.key, codes)))
        exact = ctx.truth.counts(query)
        conditions = rewrites(know.flag, know.key, codes, repeats, ctx.rng)
        extra = [c for c in know.empty if c not in codes][:variants]
        conditions += [And(Eq(know.flag, 1), In(know.key, [*codes, e])) for e in extra]
        answers: list[Answer] = []
        batch_spent = Fraction(0)
        try:
            for condition in [query.where, *conditions]:
                assert condition is not None
                asking = Query(Count(), by=know.cells, where=condition)
                # A request that would pass the share if charged is sent only when the server
                # says it would be a free replay (as every rewrite should be).
                if not ctx.affords(
                    spent + batch_spent + parse_amount(loss)
                ) and not ctx.target.already_released(asking, loss=loss):
                    stopped, ended_by = True, "its share of the budget was spent"
                    break
                answer = ctx.target.release(asking, loss=loss)
                answers.append(answer)
                if answer.release_id not in distinct:
                    distinct.add(answer.release_id)
                    batch_spent += parse_amount(answer.loss)
        except Refused as exc:
            if not exc.budget:
                raise
            stopped, ended_by = True, "the server's budget refused more"  # score what was answered
        if not answers:
            break
        asked += len(answers)
        spent += batch_spent
        per_target = max(per_target, batch_spent)
        for person in batch:
            values = [a.value(person.cell) for a in answers]
            published = [float(v) for v in values if v is not None]
            if not published:
                guess = ctx.coin()
            else:
                others = exact[person.cell] - person.secret  # the attacker's background knowledge
                guess = int(sum(published) / len(published) - others >= 0.5)
            successes += guess == person.secret
            tried += 1
        if stopped:
            break
    if not tried:
        return not_run("averaging", f"{ended_by} before its first release ({ctx.unit}={loss})",
                       charged=ctx.charged_since(mark))
    detail = (
        f"{asked} requests ({repeats} rewrites of each query, {variants} variants with an empty "
        f"country added) were answered by {len(distinct)} distinct releases; "
        f"{ctx.spent_text(per_target)} about each target"
        + (f"; {ended_by}" if stopped else "")
    )
    return _guess_result(
        "averaging", successes, tried, ctx.bound(per_target), ctx.charged_since(mark), detail,
        alpha=ctx.alpha, dp_loss=ctx.spent_text(per_target), stopped=stopped,
    )


# ---- reconstruction ------------------------------------------------------------------------------


def solve_subset_sums(masks: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """Dinur-Nissim reconstruction: x in [0, 1]^n and an unknown offset c >= 0 minimising the
    total absolute error of c + masks @ x against the answers, by linear programming."""
    from scipy.optimize import linprog

    m, n = masks.shape
    # variables: x (n), c (1), e+ (m), e- (m)
    cost = np.concatenate([np.zeros(n + 1), np.ones(2 * m)])
    equality = np.hstack([masks, np.ones((m, 1)), np.eye(m), -np.eye(m)])
    bounds = [(0.0, 1.0)] * n + [(0.0, None)] + [(0.0, None)] * (2 * m)
    result = linprog(cost, A_eq=equality, b_eq=answers, bounds=bounds, method="highs")
    if not result.success:
        return np.full(n, 0.5)
    return np.asarray(result.x[:n])


def reconstruction(
    ctx: Context, *, people: int = 40, loss: str = "0.01", max_queries: int | None = None
) -> AttackResult:
    """Random subset counts over a subpopulation of unique targets, until the budget stops it,
    then every target's flag from a linear program."""
    know = ctx.knowledge()
    group = _balanced([p for p in _targets(know) if p.alone], people, ctx.rng)
    if not group:
        return ctx.no_targets("reconstruction", alone=True)
    if not ctx.affords(parse_amount(loss)):
        return ctx.unaffordable("reconstruction", loss, 1, shrinks=False)
    n = len(group)
    limit = max_queries or 4 * n
    base = list(know.common)
    mark = ctx.target.charged
    masks: list[list[int]] = []
    ys: list[float] = []
    seen: set[tuple[int, ...]] = set()
    spent = Fraction(0)
    stopped = False
    ended_by = "the budget refused more"
    asked = 0
    while asked < limit:
        mask = tuple(ctx.rng.randrange(2) for _ in range(n))
        if mask in seen:
            continue
        seen.add(mask)
        if not ctx.affords(spent + parse_amount(loss)):
            stopped, ended_by = True, "its share of the budget was spent"
            break
        chosen = [p.code for p, bit in zip(group, mask, strict=True) if bit]
        query = Query(Count(), where=And(Eq(know.flag, 1), In(know.key, base + chosen)))
        try:
            answer = ctx.target.release(query, loss=loss)
        except Refused as exc:
            if exc.budget:
                stopped = True
                break
            raise
        asked += 1
        spent += parse_amount(answer.loss)
        value = answer.value(())
        if value is not None:
            masks.append(list(mask))
            ys.append(float(value))
    if not asked:
        return not_run("reconstruction", f"the server's budget refused its first query "
                                         f"({ctx.unit}={loss})")
    if masks:
        estimate = solve_subset_sums(np.array(masks, dtype=float), np.array(ys))
        guesses = [int(x >= 0.5) for x in estimate]
    else:
        guesses = [ctx.coin() for _ in group]
    successes = sum(g == p.secret for g, p in zip(guesses, group, strict=True))
    why = ended_by if stopped else f"it reached its limit of {limit} queries"
    detail = (
        f"{asked} random subset counts over {n} unique targets ({ctx.unit}={loss} each) before "
        f"{why}; {len(masks)} were published; bits recovered by linear programming"
    )
    return _guess_result(
        "reconstruction", successes, n, ctx.bound(spent), ctx.charged_since(mark), detail,
        alpha=ctx.alpha, dp_loss=ctx.spent_text(spent), stopped=stopped,
    )


# ---- suppression membership ----------------------------------------------------------------------


def _sized_cells(
    ctx: Context, know: Knowledge, sizes: tuple[int, int], trials: int
) -> tuple[tuple[str, ...], list[Person]]:
    """Cells holding sizes[0] records (secret 1) and sizes[1] (secret 0), half each, grouped by
    the key alone or by the key and the cells, whichever offers more."""
    assert ctx.truth is not None
    best: tuple[tuple[str, ...], list[Person]] = ((know.key,), [])
    for by in ((know.key,), (know.key, *know.cells)):
        counts = ctx.truth.counts(Query(Count(), by=by))
        candidates = [
            Person(str(k[0]), k, 1 if n == sizes[0] else 0)
            for k, n in counts.items()
            if n in sizes and k[0] is not None
        ]
        sample = _balanced(candidates, trials, ctx.rng)
        if len(sample) > len(best[1]):
            best = (by, sample)
    return best


def suppression(ctx: Context, *, trials: int = 60, loss: str = "0.5") -> AttackResult:
    """Cells of k records against cells of k - 1: is the cell published?"""
    know = ctx.knowledge()
    k = int(ctx.deployment.k)
    by, cells = _sized_cells(ctx, know, (k, k - 1), trials)
    if not cells:
        return not_run(
            "suppression",
            f"no targets: it needs cells of {k} and of {k - 1} records by --key ({know.key}), "
            f"alone or with --cells, and this data file has none",
        )
    fitted = ctx.fit(loss, 1)
    if fitted is None:
        return ctx.unaffordable("suppression", loss, 1)
    mark = ctx.target.charged
    answer = ctx.target.release(Query(Count(), by=by), loss=fitted)
    successes = sum(int(answer.published(p.cell)) == p.secret for p in cells)
    amount = parse_amount(answer.loss)
    detail = (
        f"{len(cells)} cells by {' x '.join(by)} of {k} or {k - 1} records (half each); guess "
        f"{k} when the cell is published (tau = {answer.tau})"
    )
    return _guess_result(
        "suppression", successes, len(cells), ctx.bound(amount), ctx.charged_since(mark), detail,
        alpha=ctx.alpha, dp_loss=ctx.spent_text(amount),
    )


# ---- key leakage ---------------------------------------------------------------------------------

CANARY_TEXT = "Canary-7f3a"
CANARY_COUNTRY = "QQ"  # user-assigned in ISO 3166-1: never a country


def _domain(ctx: Context, name: str) -> set[Any]:
    codebook = ctx.target.codebook().codebook
    for variable in codebook.variables:
        if variable.name == name:
            if variable.kind == pb.VARIABLE_KIND_INTEGER:
                return set(range(variable.low, variable.high + 1))
            if variable.kind == pb.VARIABLE_KIND_FLAG:
                return {0, 1}
            return {c.code for c in variable.categories}
    for derived in codebook.derived:
        if derived.name == name:
            return set(derived.groups)
    raise ValueError(f"{name} is not in the server's codebook")


def key_leakage(ctx: Context, *, trials: int = 60, loss: str = "0.5") -> AttackResult:
    """Canary categories must be refused and never be keys; a one-record category must look
    like an empty one."""
    know = ctx.knowledge()
    fitted = ctx.fit(loss, 1)
    if fitted is None:
        return ctx.unaffordable("key_leakage", loss, 1)
    loss = fitted
    mark = ctx.target.charged  # a canary query answered is charged too
    findings: list[str] = []
    codebook = ctx.target.codebook().codebook
    text_variables = [
        v.name
        for v in codebook.variables
        if v.kind in (pb.VARIABLE_KIND_CATEGORY, pb.VARIABLE_KIND_COUNTRY) and v.queryable
    ]
    canaries = 0
    for name in text_variables:
        kind = next(v.kind for v in codebook.variables if v.name == name)
        value = CANARY_COUNTRY if kind == pb.VARIABLE_KIND_COUNTRY else CANARY_TEXT
        canaries += 1
        try:
            ctx.target.release(Query(Count(), where=Eq(name, value)), loss=loss)
            findings.append(f"a query naming {value!r} in {name} was answered")
        except Refused as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                findings.append(f"{name} = {value!r} was refused with {exc.code.name}")

    by, sample = _sized_cells(ctx, know, (1, 0), trials)
    answer = ctx.target.release(Query(Count(), by=by), loss=loss)
    domains = [_domain(ctx, name) | {None} for name in by]
    present = set(answer.cells)
    foreign = {key for key in present if any(p not in d for p, d in zip(key, domains, strict=True))}
    if foreign:
        findings.append(f"{len(foreign)} released keys are not in the codebook")
    complete = len(present) == math.prod(len(d) for d in domains) and not foreign

    def guess(person: Person) -> int:
        if person.cell not in present:
            return 0
        return 1 if not complete else int(answer.published(person.cell))

    successes = sum(guess(p) == p.secret for p in sample)
    amount = parse_amount(answer.loss)
    cells_total = math.prod(len(d) for d in domains)
    holds = "every key of the public domain" if complete else (
        f"{len(present)} of {cells_total} keys"
    )
    detail = (
        f"{canaries} canary queries (a value outside the codebook for each category and "
        f"country variable); the release by {' x '.join(by)} holds {holds}; {len(sample)} "
        f"cells of one record or none (half each)"
    )
    if findings:
        detail += ". FOUND: " + "; ".join(findings)
    result = _guess_result(
        "key_leakage", successes, len(sample), ctx.bound(amount), ctx.charged_since(mark), detail,
        alpha=ctx.alpha, dp_loss=ctx.spent_text(amount),
    )
    if findings and result.verdict != BREACH:
        result = AttackResult(**{**result.__dict__, "verdict": BREACH})
    elif result.verdict == NOT_RUN:
        # The canaries and the domain check ran; the one-record-or-none guesses did not.
        result = AttackResult(**{
            **result.__dict__,
            "verdict": INCONCLUSIVE,
            "detail": f"{detail}; INCONCLUSIVE: no cell by {know.key} holds one record or none, "
                      f"so the one-or-none guesses did not run",
        })
    return result


# ---- budget race ---------------------------------------------------------------------------------


def remaining_budget(budget: pb.Budget) -> Fraction:
    """What the client may still spend: the least of its own, its institution's and the
    dataset's remaining budget (those the server reports)."""
    values = [budget.remaining, budget.institution_remaining, budget.dataset_remaining]
    return min((parse_amount(v) for v in values if v), default=Fraction(0))


def _round_down(value: Fraction) -> Fraction:
    """Three significant decimal digits, rounded down."""
    if value <= 0:
        return Fraction(0)
    exponent = math.floor(math.log10(value)) - 2
    unit = Fraction(10) ** exponent
    return math.floor(value / unit) * unit


def budget_race(ctx: Context, *, threads: int = 12, factor: int = 3) -> AttackResult:
    """Concurrent releases asking, together, `factor` times the remaining budget."""
    before = ctx.target.budget()
    remaining = remaining_budget(before)
    loss = max(_round_down(remaining / 8), Fraction(1, 1000))
    allowed = math.floor(remaining / loss)
    if allowed == 0:
        # Every release would be refused whatever the ledger does: a race for nothing tests nothing.
        return not_run(
            "budget_race",
            f"no budget to race for: the client has {ctx.unit}={format_amount(remaining)} left, "
            f"less than one release of {format_amount(loss)}; run it with budget left (alone, "
            f"or with a larger cap)",
        )
    attempts = max(factor * allowed, 2 * threads)
    domain = sorted(c for c in _domain(ctx, ctx.key) if c is not None)
    queries = [Query(Count(), where=Eq(ctx.key, code)) for code in domain[:attempts]]
    text = format_amount(loss)

    def one(query: Query) -> str:
        try:
            # A stored release returned free (the query was released before, by this client or
            # another, at a loss at least this one) reserves nothing: it races for nothing.
            return "replayed" if ctx.target.release(query, loss=text).replayed else "released"
        except Refused as exc:
            return "budget" if exc.budget else exc.code.name

    with ThreadPoolExecutor(max_workers=threads) as pool:
        outcomes = list(pool.map(one, queries))
    after = ctx.target.budget()
    spent = parse_amount(after.spent or "0") - parse_amount(before.spent or "0")
    released = outcomes.count("released")
    over = max(0, released - allowed)
    if spent > remaining and not over:
        over = 1
    others = {o: outcomes.count(o) for o in set(outcomes) - {"released", "replayed", "budget"}}
    detail = (
        f"{len(queries)} concurrent releases of {ctx.unit}={text} ({threads} at a time) against "
        f"{format_amount(remaining)} remaining, which allows {allowed}: {released} released "
        f"(stored ones returned free aside), {outcomes.count('budget')} refused for budget"
        + (f", other refusals {others}" if others else "")
        + f"; the ledger charged {format_amount(spent)}"
    )
    return _count_result("budget_race", over, len(queries), ctx.spent_text(spent), detail)


# ---- injection and denial of service -------------------------------------------------------------

SQL_STRINGS = (
    "x' OR '1'='1",
    "'; DROP TABLE records; --",
    "gender\" FROM records; --",
    "1) UNION SELECT * FROM records --",
    "read_csv('/etc/passwd')",
    "'; ATTACH '/tmp/veil.db' AS x; --",
    "%' AND 1=1 --",
    "NULL OR 1=1",
    "\u0000\u0007",
    "\u202egender",
)
# Text an SQL engine's error would carry; none may reach a caller.
_SQL_ERROR = re.compile(
    r"(?i)(parser error|binder error|catalog error|conversion error|syntax error|duckdb|sqlite"
    r"|traceback)"
)
_CLEAN = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }
)
_RELEASE = "/veil.v1.Research/Release"


_probe_ids = itertools.count()


def _release_bytes(query: pb.Query, *, loss: str = "0.001", request_id: str | None = None) -> bytes:
    """A release request; each gets a request id of its own, so no probe is refused for reusing
    another's (which would hide whether its own content is refused)."""
    rid = request_id if request_id is not None else f"probe-{time.time_ns()}-{next(_probe_ids)}"
    return pb.ReleaseRequest(request_id=rid, query=query, loss=loss).SerializeToString()


def _count(by: Sequence[str] = (), where: pb.Filter | None = None) -> pb.Query:
    query = pb.Query(measure=pb.Measure(count=pb.CountMeasure()), by=list(by))
    if where is not None:
        query.where.CopyFrom(where)
    return query


def _nested_negations(depth: int) -> bytes:
    """A ReleaseRequest whose filter is `depth` nested negations, written as raw bytes (a
    protobuf library would refuse to build it)."""

    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    leaf = field(1, field(1, b"gender") + field(2, field(1, b"Female")))  # Filter.equals
    node = leaf
    for _ in range(depth):
        node = field(5, field(1, node))  # Filter.negation -> Negation.operand
    query = field(1, field(1, b"")) + field(3, node)  # measure.count, where
    request_id = f"probe-deep-{time.time_ns()}".encode()
    return field(1, request_id) + field(2, query) + field(3, b"0.001")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _huge_crosstab(ctx: Context, cells: int) -> list[str] | None:
    """The smallest combination of at most four dimensions with more than `cells` cells."""
    codebook = ctx.target.codebook().codebook
    sizes: dict[str, int] = {}
    for v in codebook.variables:
        if not v.queryable:
            continue
        if v.kind == pb.VARIABLE_KIND_INTEGER:
            sizes[v.name] = v.high - v.low + 2
        elif v.kind == pb.VARIABLE_KIND_FLAG:
            sizes[v.name] = 3
        else:
            sizes[v.name] = len(v.categories) + 1
    for d in codebook.derived:
        sizes[d.name] = len(d.groups) + 1
    largest = sorted(sizes, key=lambda n: -sizes[n])[:12]
    best: tuple[int, list[str]] | None = None
    for r in (2, 3, 4):
        for combo in itertools.combinations(largest, r):
            product = math.prod(sizes[n] for n in combo)
            if product > cells and (best is None or product < best[0]):
                best = (product, list(combo))
    return None if best is None else best[1]


def injection(ctx: Context, *, slow: float = 2.0, dos_cells: int = 100_000) -> AttackResult:
    """Hostile strings in every field, oversized and deeply nested requests."""
    probes: list[tuple[str, str, bytes]] = []
    for s in SQL_STRINGS:
        text = pb.Value(text=s)
        female = pb.Value(text="Female")
        probes += [
            ("group by", _RELEASE, _release_bytes(_count(by=[s]))),
            ("filter variable", _RELEASE,
             _release_bytes(_count(where=pb.Filter(equals=pb.Equals(variable=s, value=female))))),
            ("category value", _RELEASE,
             _release_bytes(_count(where=pb.Filter(equals=pb.Equals(variable="gender",
                                                                    value=text))))),
            ("country value", _RELEASE,
             _release_bytes(_count(where=pb.Filter(in_set=pb.InSet(variable="citizenship",
                                                                   values=[text, female]))))),
            ("flag set", _RELEASE, _release_bytes(pb.Query(measure=pb.Measure(
                flag_counts=pb.FlagCountsMeasure(flag_set=s))))),
            ("sum variable", _RELEASE, _release_bytes(pb.Query(measure=pb.Measure(
                sum=pb.SumMeasure(variable=s))))),
            ("mean variable", _RELEASE, _release_bytes(pb.Query(measure=pb.Measure(
                mean=pb.MeanMeasure(variable=s))))),
            ("proportion", _RELEASE, _release_bytes(pb.Query(measure=pb.Measure(
                proportion=pb.ProportionMeasure(condition=pb.Filter(
                    equals=pb.Equals(variable="gender", value=text))))))),
            ("request id", _RELEASE, _release_bytes(_count(by=["gender"]), request_id=s)),
            ("loss", _RELEASE, _release_bytes(_count(by=["gender"]), loss=s)),
            ("describe", "/veil.v1.Research/DescribeVariable",
             pb.DescribeVariableRequest(name=s).SerializeToString()),
            ("dry run loss", "/veil.v1.Research/DryRun",
             pb.DryRunRequest(query=_count(by=["gender"]), loss=s).SerializeToString()),
            ("release list", "/veil.v1.Audit/ListReleases",
             pb.ListReleasesRequest(client_id=s).SerializeToString()),
        ]
    huge = _huge_crosstab(ctx, dos_cells)
    if huge is not None:
        probes.append((f"crosstab {'x'.join(huge)}", _RELEASE, _release_bytes(_count(by=huge))))
    deep: Filter = Eq("gender", "Female")
    for _ in range(40):
        deep = Not(deep)
    wide = And(*[Eq("yearOfRegistration", 2002 + i % 20) for i in range(1000)])
    probes += [
        ("filter 40 deep", _RELEASE, _release_bytes(_count(where=filter_to_pb(deep)))),
        ("filter 1000 wide", _RELEASE, _release_bytes(_count(where=filter_to_pb(wide)))),
        ("IN of 20000 values", _RELEASE, _release_bytes(_count(where=pb.Filter(
            in_set=pb.InSet(variable="citizenship",
                            values=[pb.Value(text="UA")] * 20_000))))),
        ("filter 5000 deep", _RELEASE, _nested_negations(5000)),
        ("4 MB message", _RELEASE, _release_bytes(_count(by=["x" * (4 << 20)]))),
        ("not a message", _RELEASE, b"\xff\xff\xff\xff\x0f" * 8),
    ]
    before = ctx.target.budget()
    failures: list[str] = []
    slowest = 0.0
    for label, method, payload in probes:
        call: Call = ctx.target.raw(method, payload, timeout=max(slow * 5, 10.0))
        slowest = max(slowest, call.seconds)
        if call.code == grpc.StatusCode.OK:
            failures.append(f"{label}: accepted")
        elif call.code not in _CLEAN:
            failures.append(f"{label}: {call.code.name}")
        elif _SQL_ERROR.search(call.message):
            failures.append(f"{label}: the message carries SQL engine text")
        elif call.seconds > slow:
            failures.append(f"{label}: took {call.seconds:.1f} s")
    after = ctx.target.budget()
    spent = parse_amount(after.spent or "0") - parse_amount(before.spent or "0")
    extra = []
    if spent:
        extra.append(f"the hostile requests were charged {format_amount(spent)}")
    if not ctx.target.healthy():
        extra.append("the server stopped serving")
    try:
        ctx.target.call(ctx.target.research.DryRun, pb.DryRunRequest(
            query=_count(by=["gender"]), loss="0.1"))
    except Refused as exc:
        extra.append(f"a plain dry run fails afterwards ({exc.code.name})")
    bad = len(failures) + len(extra)
    kinds = {f: failures.count(f) for f in dict.fromkeys(failures)}
    shown = [f if n == 1 else f"{f} (x{n})" for f, n in kinds.items()] + extra
    detail = (
        f"{len(probes)} hostile requests ({len(SQL_STRINGS)} SQL-like strings in 13 fields, "
        f"{len(probes) - 13 * len(SQL_STRINGS)} oversized or deep); slowest answer "
        f"{slowest:.2f} s" + (f". FOUND: {'; '.join(shown)}" if bad else "")
    )
    return _count_result("injection", bad, len(probes) + len(extra), ctx.spent_text(spent),
                         detail)


# ---- running them --------------------------------------------------------------------------------

ATTACKS: dict[str, Callable[..., AttackResult]] = {
    "injection": injection,
    "key_leakage": key_leakage,
    "suppression": suppression,
    "differencing": differencing,
    "averaging": averaging,
    "reconstruction": reconstruction,
    "budget_race": budget_race,
}
assert tuple(ATTACKS) == ATTACK_NAMES


def run(
    ctx: Context,
    names: Sequence[str] = ATTACK_NAMES,
    *,
    trials: int | None = None,
    on_result: Callable[[AttackResult], None] | None = None,
) -> list[AttackResult]:
    """Run the named attacks in the canonical order; `trials` overrides each one's default.

    The budget is planned so that no attack starves the ones after it: each attack that spends
    may spend at most an equal share of what the client has left when it starts (what one leaves
    unspent passes to the next), except budget_race, which runs last and needs all that is
    left. An attack that cannot run, or runs with nothing to spend, says so ("not run")."""
    if trials is not None and (isinstance(trials, bool) or trials < 2):
        # Targets come in pairs (one with the flag, one without): fewer would run nothing.
        raise ValueError(f"trials must be at least 2 (targets come in pairs), got {trials!r}")
    selected = [name for name in ATTACK_NAMES if name in names]
    runnable = [n for n in selected if n not in NEEDS_TRUTH or ctx.truth is not None]
    results = []
    for name in selected:
        started = time.perf_counter()
        ctx.share, ctx.notes = None, []
        share_text = ""
        mark, replays = ctx.target.charged, ctx.target.replays
        try:
            if name not in runnable:
                result = not_run(name, "needs the data file to score against (--truth)")
            else:
                if name in SPENDS:
                    left = remaining_budget(ctx.target.budget())
                    spenders = [n for n in runnable[runnable.index(name):] if n in SPENDS]
                    ctx.share = left if name == "budget_race" else left / len(spenders)
                    share_text = (
                        f"{ctx.unit}={format_amount(_round_down(ctx.share))} of "
                        f"{format_amount(left)} left"
                    )
                result = _attack(ctx, name, trials)
        except Refused as exc:
            # A refusal the attack did not expect: it was not scored, so it tested nothing.
            why = "it for budget" if exc.budget else "one of its calls"
            result = not_run(name, f"the server refused {why}: {exc}",
                             charged=ctx.charged_since(mark))
        except Exception as exc:  # one attack failing must not hide what the others show
            result = not_run(name, f"it failed: {type(exc).__name__}: {exc}",
                             charged=ctx.charged_since(mark))
        finally:
            share, ctx.share = ctx.share, None
        detail = result.detail
        if ctx.notes:
            detail += "; " + "; ".join(ctx.notes)
        free = ctx.target.replays - replays
        if free:
            # Why its charge is less than the loss its bound counts.
            detail += (
                "; 1 release was a stored one, returned free" if free == 1
                else f"; {free} releases were stored ones, returned free"
            )
        if share is not None:
            detail += f"; its share: {share_text}"
        detail += f" ({time.perf_counter() - started:.1f} s)"
        result = AttackResult(**{**result.__dict__, "detail": detail, "share": share_text})
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _attack(ctx: Context, name: str, trials: int | None) -> AttackResult:
    kwargs: dict[str, Any] = {}
    if trials is not None and name in ("differencing", "averaging", "suppression", "key_leakage"):
        kwargs["trials"] = trials
    if trials is not None and name == "reconstruction":
        kwargs["people"] = trials
    return ATTACKS[name](ctx, **kwargs)


@dataclass(frozen=True)
class Summary:
    """How many of the selected attacks ran, and what they showed."""

    selected: int
    ran: int
    breaches: tuple[str, ...]
    not_run: tuple[str, ...]
    inconclusive: tuple[str, ...]

    @classmethod
    def of(cls, results: Sequence[AttackResult]) -> Summary:
        def named(*verdicts: str) -> tuple[str, ...]:
            return tuple(r.name for r in results if r.verdict in verdicts)

        return cls(len(results), sum(r.ran for r in results), named(BREACH), named(NOT_RUN),
                   named(INCONCLUSIVE))

    @property
    def complete(self) -> bool:
        return self.ran == self.selected

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values: counts, the names behind each, and `text()`."""
        return {
            "selected": self.selected,
            "ran": self.ran,
            "not_run": list(self.not_run),
            "inconclusive": list(self.inconclusive),
            "breaches": list(self.breaches),
            "complete": self.complete,
            "text": self.text(),
        }

    def text(self) -> str:
        line = f"{self.ran} of {self.selected} attacks ran"
        parts = [f"{len(self.breaches)} found a breach" + (
            f" ({', '.join(self.breaches)})" if self.breaches else "")]
        if self.not_run:
            parts.append(f"{len(self.not_run)} did not run ({', '.join(self.not_run)})")
        if self.inconclusive:
            parts.append(
                f"{len(self.inconclusive)} ran too little to show a breach "
                f"({', '.join(self.inconclusive)})"
            )
        text = f"{line}: {'; '.join(parts)}."
        if not self.complete:
            text += " The others could not have shown a breach: see why above."
        return text
