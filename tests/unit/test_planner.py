"""Planning: validation before data, canonical fingerprints, sensitivity from shape, tau."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from engine.codebook import default_codebook
from engine.errors import InvalidLossError, InvalidQueryError, LimitExceededError
from engine.loss import Accounting, PrivacyLoss
from engine.planner import Plan, plan_query
from engine.query import (
    And,
    Count,
    Eq,
    FlagCounts,
    In,
    IsMissing,
    Mean,
    Not,
    Or,
    Proportion,
    Query,
    Range,
    Sum,
)
from engine.settings import Settings

CODEBOOK = default_codebook()
SETTINGS = Settings()
EPS = PrivacyLoss.pure("1")


def plan(query: Query, *, settings: Settings = SETTINGS, loss: PrivacyLoss = EPS) -> Plan:
    return plan_query(query, CODEBOOK, settings, loss)


def test_a_codebook_spelling_asks_the_same_question_as_the_code() -> None:
    """One fingerprint, so one charge: the label 9\u201317 is the code '9--17'."""
    spellings = ("9--17", "9\u201317")
    spelled = [plan(Query(Count(), by=("gender",), where=Eq("ageBroad", s))) for s in spellings]
    assert spelled[0].fingerprint == spelled[1].fingerprint


# ---- validation names the variable and the reason ----


@pytest.mark.parametrize(
    ("query", "variable", "reason"),
    [
        (Query(Count(), by=("nationality",)), "nationality", "unknown variable"),
        (Query(Count(), where=Eq("gender", "Alien")), "gender", "not in the codebook domain"),
        (
            Query(Count(), where=In("citizenship", ["US", "XK"])),
            "citizenship",
            "not in the codebook",
        ),
        (
            Query(Count(), where=Eq("citizenshipRegion", "Atlantis")),
            "citizenshipRegion",
            "not one of",
        ),
        (Query(Count(), where=Range("gender", 1, 2)), "gender", "needs an integer"),
        (Query(Sum("gender")), "gender", "integer variable"),
        (Query(FlagCounts("notASet")), "notASet", "unknown flag set"),
        (Query(Count(), where=Eq("isSexualExploit", 2)), "isSexualExploit", "not in the codebook"),
        (
            Query(Count(), where=Eq("yearOfRegistration", "twenty")),
            "yearOfRegistration",
            "not an integer",
        ),
    ],
)
def test_invalid_queries_name_variable_and_reason(query: Query, variable: str, reason: str) -> None:
    with pytest.raises(InvalidQueryError, match=reason) as info:
        plan(query)
    assert info.value.variable == variable


def test_too_many_cells_is_rejected_from_the_codebook_alone() -> None:
    corridor = Query(Count(), by=("citizenship", "CountryOfExploitation"))
    assert plan(corridor).cells == 251 * 251
    with pytest.raises(LimitExceededError, match="63001 cells, more than the maximum of 1000"):
        plan(corridor, settings=Settings(max_cells=1000))
    # A flag set multiplies the cells by its flags.
    with pytest.raises(LimitExceededError):
        plan(
            Query(FlagCounts("meansOfControl"), by=("citizenship",)),
            settings=Settings(max_cells=4000),
        )


def test_dimension_depth_and_term_limits() -> None:
    with pytest.raises(LimitExceededError, match="group-by dimensions"):
        plan(
            Query(Count(), by=("gender", "ageBroad", "Datasource", "majorityStatus", "isAbduction"))
        )
    deep: object = Eq("gender", "Male")
    for _ in range(20):
        deep = Not(deep)  # type: ignore[arg-type]
    with pytest.raises(LimitExceededError, match="depth"):
        plan(Query(Count(), where=deep))  # type: ignore[arg-type]
    wide = Or(*(Eq("yearOfRegistration", 2002 + i % 20) for i in range(100)))
    with pytest.raises(LimitExceededError, match="terms"):
        plan(Query(Count(), where=wide))


def test_hostile_nesting_does_not_overflow_the_stack() -> None:
    deep: object = Eq("gender", "Male")
    for _ in range(100_000):
        deep = Not(deep)  # type: ignore[arg-type]
    with pytest.raises(LimitExceededError):
        plan(Query(Count(), where=deep))  # type: ignore[arg-type]


def test_accounting_must_match_the_deployment() -> None:
    with pytest.raises(InvalidQueryError, match="accounts in pure_dp"):
        plan(Query(Count()), loss=PrivacyLoss.zcdp("0.1"))


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "0", "1e-30", "1e30", "abc", float("nan")])
def test_invalid_losses_are_refused(bad: object) -> None:
    with pytest.raises(InvalidLossError):
        PrivacyLoss.pure(bad)  # type: ignore[arg-type]


def test_losses_are_exact_decimals() -> None:
    from fractions import Fraction

    assert PrivacyLoss.pure(0.1).amount == Fraction(1, 10)
    assert PrivacyLoss.pure("0.1").amount * 10 == 1


# ---- canonical fingerprints: same meaning, same fingerprint ----


def fp(query: Query) -> str:
    return plan(query).fingerprint


def test_fingerprint_ignores_in_list_order_and_duplicates() -> None:
    a = Query(Count(), by=("gender",), where=In("citizenship", ["US", "PH", "UA"]))
    b = Query(Count(), by=("gender",), where=In("citizenship", ["UA", "US", "PH", "US"]))
    assert fp(a) == fp(b)


def test_fingerprint_ignores_and_order_and_redundant_terms() -> None:
    x, y = Eq("gender", "Female"), Eq("majorityStatus", "Minor")
    base = fp(Query(Count(), where=And(x, y)))
    assert fp(Query(Count(), where=And(y, x))) == base
    assert fp(Query(Count(), where=And(y, x, x))) == base
    assert fp(Query(Count(), where=And(And(y), x))) == base
    assert fp(Query(Count(), where=And(x, Or(y, y)))) == base
    assert fp(Query(Count(), where=Not(Not(And(x, y))))) == base


def test_fingerprint_sees_through_dummy_conditions() -> None:
    x = Eq("gender", "Female")
    always = Or(IsMissing("ageBroad"), Not(IsMissing("ageBroad")))
    every_year = Or(Range("yearOfRegistration", 2002, 2021), IsMissing("yearOfRegistration"))
    base = fp(Query(Count(), where=x))
    assert fp(Query(Count(), where=And(x, always))) == base
    assert fp(Query(Count(), where=And(x, every_year))) == base
    assert (
        fp(Query(Count(), where=And(x, Range("yearOfRegistration", 1900, None), every_year)))
        != base
    )


def test_fingerprint_merges_region_and_its_countries() -> None:
    region = CODEBOOK.dimension("citizenshipRegion")
    africa = sorted(
        c for c, r in (region.derived.mapping.items() if region.derived else ()) if r == "Africa"
    )
    assert fp(Query(Count(), where=Eq("citizenshipRegion", "Africa"))) == fp(
        Query(Count(), where=In("citizenship", africa))
    )


def test_fingerprint_ignores_group_by_order_but_not_meaning() -> None:
    assert fp(Query(Count(), by=("gender", "ageBroad"))) == fp(
        Query(Count(), by=("ageBroad", "gender"))
    )
    assert fp(Query(Count(), by=("gender",))) != fp(Query(Count(), by=("ageBroad",)))
    assert fp(Query(Count(), where=Eq("gender", "Male"))) != fp(
        Query(Count(), where=Eq("gender", "Female"))
    )
    assert fp(Query(Count())) != fp(Query(FlagCounts("sexType")))


def test_negation_is_complement_including_missing() -> None:
    # NOT (gender = Male) admits Female, Transgender/NonConforming and missing.
    assert fp(Query(Count(), where=Not(Eq("gender", "Male")))) == fp(
        Query(
            Count(),
            where=Or(In("gender", ["Female", "Transgender/NonConforming"]), IsMissing("gender")),
        )
    )


def test_a_filter_that_admits_no_record_is_refused_before_any_charge() -> None:
    # Known from the codebook alone: every cell would be noise around zero.
    for contradiction in (
        And(Eq("gender", "Male"), Eq("gender", "Female")),
        And(Eq("majorityStatus", "Minor"), Not(In("majorityStatus", ["Minor"]))),
    ):
        with pytest.raises(InvalidQueryError, match="admits no record"):
            plan(Query(Count(), by=("gender",), where=contradiction))
    # A proportion's condition may still be one no record meets: its share is then zero.
    assert plan(Query(Proportion(And(Eq("gender", "Male"), Eq("gender", "Female")))))


# ---- sensitivity follows the shape ----


def test_sensitivity_and_charge_follow_the_shape() -> None:
    count = plan(Query(Count(), by=("gender",)))
    assert [c.sensitivity for c in count.components] == [1]
    flags = plan(Query(FlagCounts("meansOfControl"), by=("gender",)))
    assert len(flags.components) == 18 and all(c.sensitivity == 1 for c in flags.components)
    # 18 histograms share epsilon: each flag's noise is 18 times a lone count's.
    assert flags.mechanisms[0].scale == pytest.approx(18 * count.mechanisms[0].scale)
    proportion = plan(Query(Proportion(Eq("isSexualExploit", 1)), by=("gender",)))
    # One vector [N, cell count - N], two blocks over the cells, moved by a person as a count is:
    # drawn at the whole loss, with a lone count's noise.
    (split,) = proportion.components
    assert (split.aggregate, split.blocks, split.sensitivity) == ("count_split", 2, 1)
    assert proportion.vector_sizes == (2 * proportion.group_cells,)
    assert proportion.mechanisms[0].scale == count.mechanisms[0].scale
    mean = plan(Query(Mean("yearOfRegistration")))
    # A mean's values are summed from the middle of the range (2011), so a record moves the sum
    # by at most 10; a sum's from the point nearest zero (2002), by at most 19.
    assert (mean.components[0].shift, mean.components[0].sensitivity) == (2011, 10)
    total = plan(Query(Sum("yearOfRegistration")))
    assert (total.components[0].shift, total.components[0].sensitivity) == (2002, 19)
    for p in (count, flags, proportion, mean):
        assert p.measured_loss <= p.loss.amount
        assert p.measured_loss >= p.loss.amount * (1 - 1e-9)


def test_tau_exceeds_k_by_a_margin_set_from_the_noise() -> None:
    p = plan(Query(Count()))
    distribution = p.count_mechanism.distribution
    margin = p.tau - SETTINGS.k
    assert distribution.tail(margin + 1) <= SETTINGS.beta < distribution.tail(margin)
    noisier = plan(Query(Count()), loss=PrivacyLoss.pure("0.1"))
    assert noisier.tau > p.tau


def test_k_cannot_go_below_its_floor() -> None:
    from engine.errors import VeilError

    with pytest.raises(VeilError, match="below the configured floor"):
        Settings(k=5, k_floor=10)
    assert plan(Query(Count()), settings=Settings(k=20)).tau >= 20


def test_zcdp_plans_use_the_discrete_gaussian() -> None:
    settings = Settings(accounting=Accounting.ZCDP)
    p = plan(Query(Count(), by=("gender",)), settings=settings, loss=PrivacyLoss.zcdp("0.05"))
    assert p.count_mechanism.distribution.mechanism == "discrete_gaussian"
    assert p.measured_loss <= p.loss.amount


# ---- cells no record can reach ----


def test_cells_the_where_clause_rules_out_are_unreachable() -> None:
    p = plan(Query(Count(), by=("majorityStatus",), where=Eq("majorityStatus", "Minor")))
    assert p.dimensions[0].keys == ("Minor", "Adult", "Unknown")
    assert p.unreachable.tolist() == [False, True, True, True]  # the last cell is missing
    p = plan(Query(Count(), by=("yearOfRegistration",), where=Range("yearOfRegistration", 2015)))
    assert p.unreachable.tolist() == [True] * 13 + [False] * 7 + [True]
    # A country beside a region it is not in: one reachable region per country, and missing.
    p = plan(Query(Count(), by=("citizenship", "citizenshipRegion")))
    assert p.group_cells - int(p.unreachable.sum()) == len(p.dimensions[0].keys) + 1
    # A region filter on countries, and a country filter on regions.
    p = plan(Query(Count(), by=("citizenship",), where=Eq("citizenshipRegion", "Africa")))
    africa = CODEBOOK.dimension("citizenshipRegion").source_codes_for(frozenset({"Africa"}))
    keys = [*p.dimensions[0].keys, None]
    assert [keys[i] for i in (~p.unreachable).nonzero()[0]] == [
        k for k in keys if k in africa
    ]
    p = plan(Query(Count(), by=("citizenshipRegion",), where=In("citizenship", ["NG", "US"])))
    assert sorted(
        p.dimensions[0].keys[i] for i in (~p.unreachable).nonzero()[0]
    ) == ["Africa", "Americas"]
    assert not plan(Query(Count(), by=("gender", "ageBroad"))).unreachable.any()


def _holds(f: object, record: dict[str, object]) -> bool:
    """A canonical filter, evaluated on one record as the SQL does."""
    from engine.planner import AllOf, AnyOf, Atom, Constant

    if isinstance(f, Constant):
        return f.value
    if isinstance(f, Atom):
        value = record[f.variable]
        return f.missing if value is None else value in f.codes
    assert isinstance(f, (AllOf, AnyOf))
    results = [_holds(o, record) for o in f.operands]
    return all(results) if isinstance(f, AllOf) else any(results)


def _atoms_on(f: object, name: str) -> int:
    from engine.planner import AllOf, AnyOf, Atom

    if isinstance(f, Atom):
        return int(f.variable == name)
    if isinstance(f, (AllOf, AnyOf)):
        return sum(_atoms_on(o, name) for o in f.operands)
    return 0


def _python_calls_finding(p: Plan, attribute: str) -> tuple[int, Any]:
    """The Python calls made finding `p`'s `attribute` (a cached property) afresh, and its
    value. Planning finds it already (to refuse a query whose terms rule out every cell), so
    the value cached then is dropped first."""
    import sys

    p.__dict__.pop("unreachable", None)
    p.__dict__.pop("unreachable_row_mask", None)
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        value = getattr(p, attribute)
    finally:
        sys.setprofile(None)
    return calls, value


def test_finding_unreachable_cells_does_not_walk_the_cells_in_python() -> None:
    # Planning is free (every dry run plans), so its work must not grow with the cells times the
    # filter's terms: 21 OR-ed groups on citizenship over citizenship x its intermediate region
    # x its region (50,200 cells, 63 terms) once made millions of Python calls, over a second of a
    # server thread for each free dry run. Counted, not timed: a bound on Python calls holds on
    # any machine.
    codes = [c for c in CODEBOOK.dimension("citizenship").keys if c != "00"]
    groups = [
        And(In("citizenship", codes[8 * i:8 * i + 5]),
            Or(In("citizenship", codes[8 * i + 5:8 * i + 8]), Eq("gender", "Male")))
        for i in range(21)
    ]
    query = Query(Count(), by=("citizenship", "citizenshipIntermediateRegion",
                               "citizenshipRegion"), where=Or(*groups))
    p = plan(query)
    calls, unreachable = _python_calls_finding(p, "unreachable")
    assert p.cells == 50_200
    # Only the cells of the 105 countries named (each beside its own regions) can
    # be reached; every other combination is stated empty.
    assert int((~unreachable).sum()) == 105
    assert calls < 2_000, calls


def _every_record(names: tuple[str, ...]) -> list[dict[str, object]]:
    """Every combination of the variables' codes and missing: one record of each."""
    import itertools

    domains = [[*CODEBOOK.variable(n).codes, None] for n in names]
    return [dict(zip(names, v, strict=True)) for v in itertools.product(*domains)]


def _filters_over(names: tuple[str, ...], rng: random.Random) -> Callable[[int], object]:
    """Random filters over `names`, `depth` deep at most: equalities, IN lists, IS NULL, under
    AND, OR and NOT."""

    def leaf() -> object:
        name = rng.choice(names)
        codes = list(CODEBOOK.variable(name).codes)
        kind = rng.randrange(3)
        if kind == 0:
            return Eq(name, rng.choice(codes))
        if kind == 1:
            return In(name, rng.sample(codes, rng.randint(1, len(codes))))
        return IsMissing(name)

    def random_filter(depth: int) -> object:
        if depth == 0 or rng.random() < 0.3:
            f = leaf()
        else:
            combine = And if rng.random() < 0.5 else Or
            f = combine(*(random_filter(depth - 1) for _ in range(rng.randint(2, 3))))
        return Not(f) if rng.random() < 0.2 else f

    return random_filter


def test_unreachable_cells_are_those_no_record_reaches() -> None:
    # Every record over four variables, against random filters and groupings: a cell called
    # unreachable is one no record meeting the filter falls into, always; and every such cell
    # is called unreachable when each variable left ungrouped appears in the filter at most once
    # (else two conditions on it may contradict each other, which is not looked for).
    import numpy as np

    names = ("gender", "majorityStatus", "isSexualExploit", "ageBroad")
    records = _every_record(names)
    rng = random.Random(7)
    random_filter = _filters_over(names, rng)

    checked = exact = 0
    for _ in range(300):
        by = tuple(rng.sample(names, rng.randint(1, 3)))
        try:
            p = plan(Query(Count(), by=by, where=random_filter(3)))  # type: ignore[arg-type]
        except InvalidQueryError:
            continue  # a filter no record meets is refused before any cell is considered
        sizes = [d.size for d in p.dimensions]
        reached = np.zeros(sizes, dtype=bool)
        for record in records:
            if _holds(p.where, record):
                index = tuple(
                    len(d.keys) if record[d.name] is None else d.keys.index(record[d.name])
                    for d in p.dimensions
                )
                reached[index] = True
        assert not (p.unreachable & reached.ravel()).any(), (by, p.where)
        if all(_atoms_on(p.where, n) <= 1 for n in names if n not in by):
            assert (p.unreachable == ~reached.ravel()).all(), (by, p.where)
            exact += 1
        checked += 1
    assert checked > 200 and exact > 100


def test_a_flags_rows_the_query_rules_out_are_unreachable() -> None:
    # A flag's row counts the records meeting the filter whose flag is set. Every record over
    # four variables (two of them flags of the set), against random filters and groupings: a
    # row called unreachable is one no such record falls into, always; and every such row is
    # called unreachable when each variable left ungrouped appears in the filter at most once.
    import numpy as np

    names = ("gender", "majorityStatus", "isSexualExploit", "isForcedLabour")
    records = _every_record(names)
    rng = random.Random(11)
    random_filter = _filters_over(names, rng)

    checked = exact = ruled_out = 0
    for _ in range(300):
        by = tuple(rng.sample(names, rng.randint(0, 2)))
        query = Query(FlagCounts("exploitationType"), by=by, where=random_filter(3))  # type: ignore[arg-type]
        try:
            p = plan(query)
        except InvalidQueryError:
            continue
        flags = p.flag_names
        sizes = [d.size for d in p.dimensions]
        reached = np.zeros([len(flags), *sizes], dtype=bool)
        for record in records:
            if not _holds(p.where, record):
                continue
            index = tuple(
                len(d.keys) if record[d.name] is None else d.keys.index(record[d.name])
                for d in p.dimensions
            )
            for i, flag in enumerate(flags):
                # A flag outside the four may be set in any record.
                if record.get(flag, 1) == 1:
                    reached[(i, *index)] = True
        mask = p.unreachable_row_mask
        assert mask.shape == (p.cells,) and p.unreachable_rows == int(mask.sum())
        # Each flag's block holds at least its cells' unreachable ones.
        assert (mask.reshape(len(flags), -1) >= p.unreachable).all()
        assert not (mask & reached.ravel()).any(), (by, p.where)
        if all(_atoms_on(p.where, n) <= 1 for n in names if n not in by):
            assert (mask == ~reached.ravel()).all(), (by, p.where)
            exact += 1
        ruled_out += int(mask.sum()) - len(flags) * int(p.unreachable.sum())
        checked += 1
    assert checked > 200 and exact > 100 and ruled_out > 0


def test_finding_a_flags_unreachable_rows_does_not_walk_the_flags_and_cells_in_python() -> None:
    # The flags' rows are found in one pass over the filter, as the cells are: a 63-term filter
    # like the one above, over 18 flags of means of control, costs no Python calls per flag or
    # per cell.
    codes = [c for c in CODEBOOK.dimension("citizenship").keys if c != "00"]
    groups = [
        And(In("citizenship", codes[8 * i:8 * i + 5]),
            Or(In("citizenship", codes[8 * i:8 * i + 2]), Eq("meansOfControlDebtBondage", 0)))
        for i in range(21)
    ]
    query = Query(FlagCounts("meansOfControl"), by=("citizenship", "citizenshipRegion"),
                  where=Or(*groups))
    p = plan(query)
    calls, mask = _python_calls_finding(p, "unreachable_row_mask")
    assert len(p.flag_names) == 18 and mask.size == p.cells
    rows = mask.reshape(18, -1)
    debt = p.flag_names.index("meansOfControlDebtBondage")
    # Only the named countries' cells (beside their own region) are reached, and for debt
    # bondage only the 2 of each 5 whose records need not have it unset.
    assert all(int((~r).sum()) == 105 for i, r in enumerate(rows) if i != debt)
    assert int((~rows[debt]).sum()) == 42
    assert calls < 2_000, calls
