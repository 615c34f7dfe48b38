"""Answers and releases: densified over the public domain, suppressed on noisy counts."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import release as release_module
from engine.accuracy import bonferroni_level
from engine.backend import DuckDBBackend
from engine.codebook import default_codebook
from engine.engine import Engine
from engine.errors import CodebookError, InvalidLossError, InvalidQueryError
from engine.loss import MAX_AMOUNT, MIN_AMOUNT, Accounting, PrivacyLoss
from engine.query import Count, Eq, FlagCounts, Mean, Proportion, Query, Sum
from engine.release import Answer, Release, build_answer, interval_quantiles
from engine.settings import Settings
from tests.conftest import write_database

CODEBOOK = default_codebook()
# A large epsilon keeps the noise within a few units, so assertions on values are safe: at
# epsilon = 20 the discrete Laplace scale is 0.05 and P(|noise| >= 1) < 1e-8 per cell.
SHARP = PrivacyLoss.pure("20")

ROWS = (
    [
        {
            "gender": "Female",
            "ageBroad": "9--17",
            "majorityStatus": "Minor",
            "isSexualExploit": 1,
            "yearOfRegistration": 2010,
            "citizenship": "NA",
        }
    ]
    * 40
    + [
        {
            "gender": "Male",
            "ageBroad": "30--38",
            "majorityStatus": "Adult",
            "isSexualExploit": 0,
            "yearOfRegistration": 2020,
            "citizenship": "00",
            "meansOfControlDebtBondage": 1,
        }
    ]
    * 25
    + [{"gender": "Female", "ageBroad": "18--20", "majorityStatus": "Adult", "isSexualExploit": 1}]
    * 3
)


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine(ROWS)


def answer(engine: Engine, query: Query, loss: PrivacyLoss = SHARP) -> Answer:
    return engine.answer(engine.plan(query, loss=loss))


def cell(table: pa.Table, **keys: Any) -> dict[str, Any]:
    rows = [r for r in table.to_pylist() if all(r[k] == v for k, v in keys.items())]
    assert len(rows) == 1, keys
    found: dict[str, Any] = rows[0]
    return found


def test_every_cell_of_the_domain_is_answered_zero_cells_included(engine: Engine) -> None:
    table = answer(engine, Query(Count(), by=("gender", "ageBroad"))).table
    genders = [*CODEBOOK.variable("gender").codes, None]
    ages = [*CODEBOOK.variable("ageBroad").codes, None]
    assert table.num_rows == len(genders) * len(ages)
    assert set(zip(table["ageBroad"].to_pylist(), table["gender"].to_pylist(), strict=True)) == set(
        itertools.product(ages, genders)
    )
    assert table.column_names == [
        "ageBroad", "gender", "value", "ci_low", "ci_high", "suppressed", "status"
    ]


def test_large_cells_publish_near_truth_and_small_ones_are_suppressed(engine: Engine) -> None:
    table = answer(engine, Query(Count(), by=("gender", "ageBroad"))).table
    big = cell(table, gender="Female", ageBroad="9--17")
    assert big["value"] == 40 and not big["suppressed"]
    assert big["ci_low"] <= 40 <= big["ci_high"]
    small = cell(table, gender="Female", ageBroad="18--20")  # true count 3 < k
    assert small["suppressed"] and small["value"] is None and small["ci_low"] is None
    empty = cell(table, gender="Male", ageBroad="0--8")  # true count 0: suppressed, not zero
    assert empty["suppressed"] and empty["value"] is None


def test_missing_is_its_own_key(engine: Engine) -> None:
    table = answer(engine, Query(Count(), by=("citizenship",))).table
    assert cell(table, citizenship=None)["value"] is None  # 3 missing rows: suppressed
    assert cell(table, citizenship="NA")["value"] == 40  # Namibia, not missing
    assert cell(table, citizenship="00")["value"] == 25  # unknown country, not missing


def test_flag_counts_release_one_cell_per_flag(engine: Engine) -> None:
    result = answer(engine, Query(FlagCounts("meansOfControl"), by=("gender",)))
    table = result.table
    assert table.num_rows == 4 * 18
    assert table.column_names[:2] == ["gender", "flag"]
    # 18 flags share epsilon = 20: scale 0.9, and P(|noise| > 10) < 1e-4.
    assert cell(table, gender="Male", flag="meansOfControlDebtBondage")["value"] == pytest.approx(
        25, abs=10
    )


def test_proportion_needs_numerator_and_denominator_to_pass(engine: Engine) -> None:
    table = answer(engine, Query(Proportion(Eq("isSexualExploit", 1)), by=("gender",))).table
    female = cell(table, gender="Female")
    assert female["value"] == pytest.approx(1.0, abs=0.02) and not female["suppressed"]
    male = cell(table, gender="Male")  # numerator 0: suppressed even though 25 men
    assert male["suppressed"] and male["value"] is None


def test_mean_and_sum_use_the_group_count(engine: Engine) -> None:
    table = answer(engine, Query(Mean("yearOfRegistration"), by=("gender",))).table
    female = cell(table, gender="Female")  # 40 rows with 2010, 3 rows missing the year
    assert female["value"] == pytest.approx(2010, abs=1.0)
    assert female["ci_low"] <= female["value"] <= female["ci_high"]
    total = answer(engine, Query(Sum("yearOfRegistration"), by=("gender",))).table
    assert cell(total, gender="Male")["value"] == pytest.approx(25 * 2020, rel=0.01)


def test_metadata_describes_the_release_without_true_values(engine: Engine) -> None:
    result = answer(engine, Query(Count(), by=("gender",), where=Eq("majorityStatus", "Adult")))
    meta = result.metadata
    assert meta.mechanism == "discrete_laplace" and meta.loss == "20"
    assert meta.tau >= meta.k == 10
    assert meta.cells == 4 and meta.suppressed_cells == 3  # Female (3), Trans (0), missing (0)
    assert meta.data_version == "test" and len(meta.fingerprint) == 64
    assert not meta.charge_id  # an answer is not charged


def test_a_release_needs_a_charge_id_and_a_release_id(engine: Engine) -> None:
    result = answer(engine, Query(Count()))
    with pytest.raises(ValueError, match="charge id"):
        Release(result.table, result.metadata)
    with pytest.raises(ValueError, match="release id"):  # charged, yet never stored
        Release.from_answer(result, release_id="", charge_id="c1", created_at="t")
    release = Release.from_answer(result, release_id="r1", charge_id="c1", created_at="t")
    again = Release.from_bytes(release.to_bytes())
    assert again.metadata == release.metadata and again.table.equals(release.table)
    assert again.to_bytes() == release.to_bytes()


def test_a_release_sends_the_bytes_it_was_read_from_and_no_stale_ones(engine: Engine) -> None:
    result = answer(engine, Query(Count()))
    data = Release.from_answer(result, release_id="r1", charge_id="c1", created_at="t").to_bytes()
    stored = Release.from_bytes(data)
    assert stored.to_bytes() is data  # sent as stored, not encoded again
    changed = dataclasses.replace(
        stored, metadata=dataclasses.replace(stored.metadata, release_id="r2")
    )
    assert Release.from_bytes(changed.to_bytes()).metadata.release_id == "r2"


def test_dry_run_costs_and_accuracy_need_no_data(engine: Engine) -> None:
    dry = engine.dry_run(Query(Count(), by=("gender",)), half_width=5)
    assert dry.half_width <= 5
    cheaper = engine.dry_run(
        Query(Count(), by=("gender",)), loss=PrivacyLoss.pure(dry.loss.amount * 0.9)
    )
    assert cheaper.half_width > 5 or cheaper.loss.amount >= dry.loss.amount
    noisy = engine.dry_run(
        Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("0.05"), assumed_count=10
    )
    sharp = engine.dry_run(
        Query(Count(), by=("gender",)), loss=PrivacyLoss.pure("5"), assumed_count=200
    )
    assert noisy.expected_suppressed_share > 0.5 > sharp.expected_suppressed_share


def test_the_engine_answers_another_codebook(make_engine: Callable[..., Engine]) -> None:
    from engine.codebook import load_codebook

    ics = load_codebook("ics_tip_victims")
    rows = [
        {"sex": "Female", "ageYears": 15, "isForcedBegging": 1, "countryOfExploitation": "NG"}
    ] * 30
    rows += [
        {"sex": "Male", "ageYears": 40, "isForcedLabour": 1, "countryOfExploitation": "TH"}
    ] * 30
    engine = make_engine(rows, codebook=ics)
    mean = answer(engine, Query(Mean("ageYears"), by=("sex",))).table
    assert cell(mean, sex="Female")["value"] == pytest.approx(15, abs=3)
    assert cell(mean, sex="Male")["value"] == pytest.approx(40, abs=3)
    forms = answer(
        engine, Query(FlagCounts("formOfExploitation"), by=("countryOfExploitationRegion",))
    )
    table = forms.table
    assert set(table["flag"].to_pylist()) == set(ics.flag_set("formOfExploitation").flags)
    africa = cell(table, countryOfExploitationRegion="Africa", flag="isForcedBegging")
    assert africa["value"] == pytest.approx(30, abs=10)
    # The same file served with another codebook would place its codes in the wrong cells.
    backend = engine.backend
    with pytest.raises(CodebookError, match="loaded with codebook ics_tip_victims"):
        Engine(backend, codebook=default_codebook())


def test_a_codebook_edited_under_the_same_version_is_another_codebook(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    ctdc = default_codebook()
    # The gender codes listed in another order: every gender cell would move.
    edited = dataclasses.replace(
        ctdc,
        variables=tuple(
            dataclasses.replace(v, categories=tuple(reversed(v.categories)))
            if v.name == "gender"
            else v
            for v in ctdc.variables
        ),
    )
    assert edited.fingerprint_text == ctdc.fingerprint_text
    assert edited.identity != ctdc.identity
    assert dataclasses.replace(ctdc).identity == ctdc.identity  # content, not the object
    with pytest.raises(CodebookError, match="different name, version or content"):
        Engine(engine.backend, codebook=edited)
    # A query's fingerprint carries the content, so no release of one is replayed for the other.
    query = Query(Count(), by=("gender",))
    other = make_engine([], codebook=edited)
    assert other.plan(query, loss=SHARP).fingerprint != engine.plan(query, loss=SHARP).fingerprint
    assert answer(other, query).metadata.codebook == edited.identity


def test_a_data_file_that_names_its_codebook_only_must_be_loaded_again(
    engine: Engine, tmp_path: Path
) -> None:
    assert isinstance(engine.backend, DuckDBBackend)
    path = tmp_path / "named-only.duckdb"
    shutil.copy(engine.backend.path, path)
    with duckdb.connect(str(path)) as connection:
        connection.execute("UPDATE veil_metadata SET value = 'ctdc@7' WHERE key = 'codebook'")
    with pytest.raises(CodebookError, match=r"by name and version only.*load it again"):
        Engine(DuckDBBackend(path), codebook=default_codebook())


@pytest.mark.parametrize(
    ("statement", "strays"),
    [
        # A value outside its range would have raised, or wrapped into another cell, only when a
        # query read it: a free signal about the data. The file is refused before any query.
        (
            "UPDATE records SET yearOfRegistration = 1990 WHERE gender = 'Male'",
            "yearOfRegistration",
        ),
        ("UPDATE records SET isForcedLabour = 2", "isForcedLabour"),
        # Cells are placed by ENUM position: members in another order would mislabel them.
        (
            "ALTER TABLE records ALTER gender TYPE "
            "ENUM ('Female', 'Male', 'Transgender/NonConforming')",
            "gender",
        ),
    ],
)
def test_a_data_file_outside_its_codebook_is_refused_before_any_query(
    tmp_path: Path, statement: str, strays: str
) -> None:
    path = write_database(tmp_path / "d.duckdb", [{"gender": "Male", "yearOfRegistration": 2010}])
    Engine(DuckDBBackend(path), codebook=default_codebook())  # as written, it keeps to it
    with duckdb.connect(str(path)) as connection:
        connection.execute(statement)
    with pytest.raises(
        CodebookError, match=rf"does not keep to codebook .*: {strays} has"
    ) as error:
        Engine(DuckDBBackend(path), codebook=default_codebook())
    assert "1990" not in str(error.value) and "2 " not in str(error.value)


@pytest.mark.parametrize("accounting", ["pure_dp", "zcdp"])
def test_loss_for_half_width_is_the_smallest_that_reaches_it(
    make_engine: Callable[..., Engine], accounting: str
) -> None:
    settings = Settings(accounting=Accounting(accounting))
    engine = make_engine(ROWS, settings=settings)
    query = Query(Count(), by=("gender",))
    for half_width, confidence in [(3, 0.95), (50, 0.95), (20, 0.99), (5000, 0.9)]:
        loss = engine.loss_for_half_width(query, half_width=half_width, confidence=confidence)
        plan = engine.plan(query, loss=loss)
        distribution = plan.count_mechanism.distribution
        assert distribution.quantile_abs(confidence) <= half_width
        if loss.amount == MIN_AMOUNT:
            continue  # no smaller loss is accepted (rho for +/-5000 is below it)
        # Three significant digits: 2% less loss misses the target.
        smaller = engine.plan(query, loss=PrivacyLoss(loss.accounting, loss.amount * 98 / 100))
        assert smaller.count_mechanism.distribution.quantile_abs(confidence) > half_width


@pytest.mark.parametrize("accounting", list(Accounting))
@pytest.mark.parametrize(
    "measure", [Proportion(Eq("isSexualExploit", 1)), Mean("yearOfRegistration")],
    ids=["proportion", "mean"],
)
def test_a_target_for_a_ratio_is_what_its_counts_get_in_the_release(
    make_engine: Callable[..., Engine], accounting: str, measure: Proportion | Mean
) -> None:
    """A share's two counts (a mean's sum and count) share the confidence by the union bound:
    the target half-width is what each count's interval in the release is, and the dry run
    states that, not the whole confidence's quantile, which no interval in the release has."""
    engine = make_engine(ROWS, settings=Settings(accounting=Accounting(accounting)))
    query = Query(measure, by=("gender",))
    dry = engine.dry_run(query, half_width=25)
    plan = engine.plan(query, loss=dry.loss)
    assert dry.half_width == interval_quantiles(plan)[0] <= 25
    smaller = engine.plan(query, loss=PrivacyLoss(dry.loss.accounting, dry.loss.amount * 98 / 100))
    assert interval_quantiles(smaller)[0] > 25


@pytest.mark.parametrize("accounting", list(Accounting))
@pytest.mark.parametrize(
    "measure",
    [Count(), FlagCounts("meansOfControl"), Proportion(Eq("isSexualExploit", 1)),
     Sum("yearOfRegistration"), Mean("yearOfRegistration")],
    ids=lambda m: type(m).__name__,
)
def test_a_ratio_or_sum_takes_each_noise_at_the_union_bounds_level(
    make_engine: Callable[..., Engine], accounting: Accounting, measure: Any
) -> None:
    # A count's interval is the only quantity its release states, so it takes the whole
    # confidence; a share's two counts, and a sum's or mean's sum and count, are two noisy
    # quantities each, so each is taken at 1 - (1 - confidence) / 2 for the pair to hold jointly.
    engine = make_engine(ROWS, settings=Settings(accounting=accounting))
    loss = PrivacyLoss.pure("0.5") if accounting is Accounting.PURE_DP else PrivacyLoss.zcdp("0.1")
    plan = engine.plan(Query(measure, by=("gender",)), loss=loss)
    confidence = plan.settings.confidence
    split = not isinstance(measure, (Count, FlagCounts))
    level = bonferroni_level(confidence, 2) if split else confidence
    count_dist = plan.count_mechanism.distribution
    q_count, q_sum = interval_quantiles(plan)
    assert q_count == count_dist.quantile_abs(level)
    if split:
        assert q_count > count_dist.quantile_abs(confidence)  # the two levels differ here
    if isinstance(measure, (Sum, Mean)):
        sum_dist = plan.mechanisms[0].distribution
        assert q_sum == sum_dist.quantile_abs(level) > sum_dist.quantile_abs(confidence)
    else:
        assert q_sum == 0


@pytest.mark.parametrize("accounting", list(Accounting))
def test_loss_for_half_width_stays_within_the_accepted_losses(
    make_engine: Callable[..., Engine], accounting: Accounting
) -> None:
    engine = make_engine(ROWS, settings=Settings(accounting=accounting))
    # So wide that the least accepted loss is narrower still: that least loss.
    query = Query(Count(), by=("gender",))
    loss = engine.loss_for_half_width(query, half_width=10**9)
    assert loss.amount == MIN_AMOUNT
    assert engine.plan(query, loss=loss).count_mechanism.distribution.quantile_abs(0.95) <= 10**9
    # So narrow that no accepted loss reaches it: refused, with the narrowest that can be had.
    flags = Query(FlagCounts("meansOfControl"), by=("majorityStatus",))
    level = 1 - 1e-12
    with pytest.raises(InvalidLossError, match="no accepted loss") as error:
        engine.loss_for_half_width(flags, half_width=1, confidence=level)
    largest = engine.plan(flags, loss=PrivacyLoss(accounting, MAX_AMOUNT))
    narrowest = largest.count_mechanism.distribution.quantile_abs(level)
    assert narrowest > 1 and f"at least {narrowest}" in str(error.value)
    loss = engine.loss_for_half_width(flags, half_width=narrowest, confidence=level)
    assert MIN_AMOUNT <= loss.amount <= MAX_AMOUNT


@pytest.mark.parametrize(
    "query",
    [
        Query(Count(), by=("gender", "majorityStatus")),
        Query(FlagCounts("meansOfControl"), by=("majorityStatus",)),
        Query(Proportion(Eq("isSexualExploit", 1)), by=("gender",)),
        Query(Mean("yearOfRegistration"), by=("gender",)),
    ],
)
def test_suppressed_cells_carry_nothing_under_their_null(engine: Engine, query: Query) -> None:
    """A reader of the stored or sent bytes finds zeros under every null, not the noisy value a
    null mask alone would leave in the data buffer."""
    result = answer(engine, query)
    release = Release.from_answer(result, release_id="r1", charge_id="c1", created_at="t")
    sent = Release.from_bytes(release.to_bytes()).table
    suppressed = np.asarray(sent.column("suppressed").to_numpy(zero_copy_only=False))
    assert suppressed.any()  # the 3-row and empty cells are withheld
    for name in ("value", "ci_low", "ci_high"):
        column = sent.column(name).combine_chunks()
        width = column.type.bit_width // 8
        kind = np.int64 if pa.types.is_integer(column.type) else np.float64
        data = np.frombuffer(column.buffers()[1], dtype=kind)[
            column.offset : column.offset + len(column)
        ]
        assert width == 8 and not data[suppressed].any(), name


# ---- cells the query's own terms leave empty ----

WIDE = PrivacyLoss.pure("0.05")  # noise of scale 20: a noised zero is seldom exactly 0


def test_cells_the_query_rules_out_are_stated_not_noised(engine: Engine) -> None:
    minors = Eq("majorityStatus", "Minor")
    outside = [{"majorityStatus": s} for s in ("Adult", "Unknown", None)]
    counts = answer(engine, Query(Count(), by=("majorityStatus",), where=minors), WIDE)
    flags = answer(engine, Query(FlagCounts("meansOfControl"), by=("majorityStatus",),
                                 where=minors), WIDE)
    sums = answer(engine, Query(Sum("yearOfRegistration"), by=("majorityStatus",),
                                where=minors), WIDE)
    for result, per_cell in ((counts, 1), (flags, 18), (sums, 1)):
        for keys in outside:
            rows = [r for r in result.table.to_pylist()
                    if r["majorityStatus"] == keys["majorityStatus"]]
            assert len(rows) == per_cell
            assert all((r["value"], r["ci_low"], r["ci_high"], r["suppressed"]) == (0, 0, 0, False)
                       for r in rows)
        assert result.metadata.unreachable_cells == 3 * per_cell
    # A share or a mean of no record is left out.
    for measure in (Proportion(Eq("isSexualExploit", 1)), Mean("yearOfRegistration")):
        table = answer(engine, Query(measure, by=("majorityStatus",), where=minors), WIDE).table
        for keys in outside:
            row = cell(table, **keys)
            assert row["suppressed"] and row["value"] is None
    # A country beside a region it is not in.
    table = answer(engine, Query(Count(), by=("citizenship", "citizenshipRegion")), WIDE).table
    assert cell(table, citizenship="NA", citizenshipRegion="Europe")["value"] == 0
    # The bound on empty cells published by chance counts only the cells that may hold records.
    full = answer(engine, Query(Count(), by=("majorityStatus",)), WIDE).metadata
    assert full.unreachable_cells == 0
    assert counts.metadata.expected_empty_published_bound == pytest.approx(
        full.expected_empty_published_bound / 4  # type: ignore[operator]
    )


@pytest.mark.parametrize(
    ("by", "where"),
    [
        (("majorityStatus", "gender"), Eq("majorityStatus", "Minor")),
        # A derived dimension: a filter on the age band rules out the other majority statuses.
        (("majorityFromAge",), Eq("ageBroad", "9--17")),
    ],
    ids=["grouped-and-filtered", "derived"],
)
def test_a_mean_the_query_rules_out_is_never_published_even_when_its_noisy_count_passes(
    engine: Engine, by: tuple[str, ...], where: Eq
) -> None:
    # A mean over no record has no value: its noisy count, however large, is noise around 0 and
    # its noisy sum pure noise. With every noisy count pinned far above tau, the cells the query
    # rules out must still be withheld and marked empty, while the others are published.
    plan = engine.plan(Query(Mean("yearOfRegistration"), by=by, where=where), loss=SHARP)
    unreachable = plan.unreachable_row_mask
    assert unreachable.any() and not unreachable.all()
    n = plan.group_cells
    present = np.full(n, plan.tau + 100, dtype=np.int64)
    shifted = present * 3  # a mean of shift + 3, inside the variable's bounds
    result = build_answer(plan, [shifted, present], data_version="pinned")
    rows = result.table.to_pylist()
    assert len(rows) == n
    for row, ruled_out in zip(rows, unreachable, strict=True):
        if ruled_out:
            assert row["status"] == "empty" and row["suppressed"], row
            assert (row["value"], row["ci_low"], row["ci_high"]) == (None, None, None), row
        else:
            assert row["status"] == "published" and not row["suppressed"], row
            assert row["value"] is not None
    assert result.metadata.unreachable_cells == int(unreachable.sum())
    assert result.metadata.suppressed_cells == int(unreachable.sum())


@pytest.mark.parametrize(
    "measure",
    [Count(), FlagCounts("meansOfControl"), Proportion(Eq("isSexualExploit", 1)),
     Mean("yearOfRegistration"), Sum("yearOfRegistration")],
    ids=lambda m: type(m).__name__,
)
def test_each_cell_says_whether_it_was_published_suppressed_or_empty_by_the_query(
    engine: Engine, measure: Any
) -> None:
    # A cell suppressed under tau and a cell the query's terms leave empty both lack a value in
    # a share or mean: `status` tells them apart, for every measure alike, from the query's
    # terms and the noisy decision alone; `suppressed` stays as it was.
    query = Query(measure, by=("majorityStatus", "gender"), where=Eq("majorityStatus", "Minor"))
    plan = engine.plan(query, loss=SHARP)
    result = engine.answer(plan)
    table = result.table
    status = np.array(table.column("status").to_pylist())
    suppressed = np.array(table.column("suppressed").to_pylist())
    unreachable = plan.unreachable_row_mask
    # (No minor has a means of control recorded: every flag's count is withheld.)
    expected = {"suppressed", "empty"} | (set() if isinstance(measure, FlagCounts)
                                          else {"published"})
    assert set(status) == expected
    assert (unreachable == (status == "empty")).all()
    has_value = np.array([v is not None for v in table.column("value").to_pylist()])
    assert (has_value == ~suppressed).all()
    assert ((status == "published") == (has_value & ~unreachable)).all()
    assert ((status == "suppressed") == (~has_value & ~unreachable)).all()
    if isinstance(measure, (Proportion, Mean)):
        assert suppressed[unreachable].all()  # no value to show: marked, as before
    else:
        assert not suppressed[unreachable].any()  # stated as 0 [0, 0]
    meta = result.metadata
    assert meta.unreachable_cells == int((status == "empty").sum())
    assert meta.suppressed_cells == int(suppressed.sum())
    assert meta.suppressed_by_rule == int((status == "suppressed").sum())
    # Stored and sent as it is; a release stored before the column reads back without it.
    again = Release.from_bytes(
        Release.from_answer(result, release_id="r", charge_id="c", created_at="t").to_bytes()
    )
    assert again.table.column("status").to_pylist() == list(status)


def test_the_status_reads_the_noisy_decision_not_the_true_count(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a rule that publishes every noisy count, the 3-record cell reads "published": what
    # withholds a cell is the rule on noisy counts, and the status follows it alone.
    query = Query(Count(), by=("gender", "ageBroad"))
    monkeypatch.setattr(
        "engine.release.publishable", lambda counts, tau: np.ones_like(counts, dtype=bool)
    )
    table = answer(engine, query).table
    assert set(table.column("status").to_pylist()) == {"published"}
    monkeypatch.setattr(
        "engine.release.publishable", lambda counts, tau: np.zeros_like(counts, dtype=bool)
    )
    table = answer(engine, query).table
    assert cell(table, gender="Female", ageBroad="9--17")["status"] == "suppressed"  # 40 records


def test_a_flag_the_filter_rules_out_is_stated_not_noised(engine: Engine) -> None:
    # `flag_counts("exploitationType") where isSexualExploit = 0`: the isSexualExploit row
    # counts records with the flag set among records the filter keeps, none whatever the data,
    # so it is stated as 0 [0, 0] in every cell and counted as unreachable, by the release, its
    # dry run and the bound on empty cells published by chance alike.
    from engine.query import And

    no_sexual = Eq("isSexualExploit", 0)
    query = Query(FlagCounts("exploitationType"), by=("gender",), where=no_sexual)
    result = answer(engine, query, WIDE)
    flags = CODEBOOK.flag_set("exploitationType").flags
    rows = result.table.to_pylist()
    assert len(rows) == 4 * len(flags)
    assert [r["flag"] for r in rows] == [f for f in flags for _ in range(4)]  # flag by flag
    for r in rows:
        stated = (r["value"], r["ci_low"], r["ci_high"], r["suppressed"]) == (0, 0, 0, False)
        assert stated == (r["flag"] == "isSexualExploit"), r
    meta = result.metadata
    assert meta.unreachable_cells == 4
    dry = engine.dry_run(query, loss=WIDE)
    assert dry.unreachable_cells == 4
    assert dry.expected_empty_published_bound == pytest.approx(
        (4 * len(flags) - 4) * dry.empty_pass_probability  # type: ignore[operator]
    )
    assert meta.expected_empty_published_bound == dry.expected_empty_published_bound
    # With cells the filter rules out as well: every flag's row in them, and the one flag's
    # row in the rest.
    minors = Query(FlagCounts("exploitationType"), by=("majorityStatus",),
                   where=And(no_sexual, Eq("majorityStatus", "Minor")))
    plan = engine.plan(minors, loss=WIDE)
    mask = plan.unreachable_row_mask.reshape(len(flags), 4)
    assert mask[flags.index("isSexualExploit")].all()
    assert mask[:, 1:].all() and int(mask[:, 0].sum()) == 1
    assert answer(engine, minors, WIDE).metadata.unreachable_cells == 3 * len(flags) + 1
    assert engine.dry_run(minors, loss=WIDE).unreachable_cells == 3 * len(flags) + 1
    # The data agree: every row stated empty holds no record.
    true_counts = np.concatenate(engine._true_components(plan))
    assert not true_counts[plan.unreachable_row_mask].any()


def test_a_query_whose_terms_rule_out_every_cell_is_refused_before_a_charge(
    engine: Engine,
) -> None:
    # Not FALSE as a filter (each flag = 0 admits records), yet no flag's row can hold one: the
    # table is known before any data is read, so it is refused as a contradiction is.
    from engine.query import And

    flags = CODEBOOK.flag_set("exploitationType").flags
    none_set = And(*(Eq(flag, 0) for flag in flags))
    query = Query(FlagCounts("exploitationType"), by=("gender",), where=none_set)
    with pytest.raises(InvalidQueryError, match=r"rule out every cell.*nothing was charged"):
        engine.plan(query, loss=WIDE)
    with pytest.raises(InvalidQueryError, match="rule out every cell"):
        engine.dry_run(query, loss=WIDE)
    # One flag left open keeps its rows: planned as before.
    some = And(*(Eq(flag, 0) for flag in flags[1:]))
    plan = engine.plan(Query(FlagCounts("exploitationType"), by=("gender",), where=some), loss=WIDE)
    assert plan.unreachable_rows == 4 * (len(flags) - 1)


def test_cells_called_unreachable_hold_no_record_in_the_data(
    make_engine: Callable[..., Engine],
) -> None:
    # Random records and random filters through the real SQL: every cell the planner calls
    # unreachable has a true count of 0.
    import random

    from engine.query import And, In, IsMissing, Not, Or

    rng = random.Random(3)
    values = {
        "gender": [*CODEBOOK.variable("gender").codes, None],
        "majorityStatus": [*CODEBOOK.variable("majorityStatus").codes, None],
        "isSexualExploit": [0, 1, None],
        "citizenship": ["NA", "US", "FR", "IN", "00", None],
    }
    rows = [{k: rng.choice(v) for k, v in values.items()} for _ in range(400)]
    engine = make_engine(rows)
    names = [*values, "citizenshipRegion"]
    regions = list(CODEBOOK.dimension("citizenshipRegion").keys)

    def leaf() -> Any:
        # Countries and regions most often: a region's cell holds several countries.
        name = rng.choice([*names, "citizenship", "citizenship", "citizenshipRegion"])
        domain = regions if name == "citizenshipRegion" else [v for v in values[name] if v]
        if name == "isSexualExploit":
            domain = [0, 1]
        pick = rng.sample(domain, rng.randint(1, min(3, len(domain))))
        return rng.choice([Eq(name, pick[0]), In(name, pick), IsMissing(name)])

    def random_filter(depth: int) -> Any:
        if depth == 0 or rng.random() < 0.35:
            f = leaf()
        else:
            f = rng.choice([And, Or])(random_filter(depth - 1), random_filter(depth - 1))
        return Not(f) if rng.random() < 0.2 else f

    found = 0
    for _ in range(200):
        by = tuple(rng.sample(names, rng.randint(1, 2)))
        try:
            plan = engine.plan(Query(Count(), by=by, where=random_filter(2)), loss=SHARP)
        except InvalidQueryError:
            continue
        (true_counts,) = engine._true_components(plan)
        assert not true_counts[plan.unreachable].any(), (by, plan.where)
        found += int(plan.unreachable.sum())
    assert found > 0


def test_a_dry_runs_value_half_width_is_what_a_cell_of_that_count_gets() -> None:
    # build_answer on noisy values that are a cell of `count` records: the share's, mean's and
    # sum's interval reach no farther than value_half_width states (a share's exactly as far,
    # away from 0 and 1), and a count's is its quantile.
    from engine.planner import plan_query
    from engine.release import build_answer, value_half_width

    def plan(measure: Any) -> Any:
        return plan_query(Query(measure, by=("gender",)), CODEBOOK, Settings(),
                          PrivacyLoss.pure("0.5"))

    def reach(p: Any, noisy: list[np.ndarray]) -> float:
        row = build_answer(p, noisy, data_version="t").table.to_pylist()[0]
        assert not row["suppressed"]
        return float(max(row["ci_high"] - row["value"], row["value"] - row["ci_low"]))

    count = 200
    share = plan(Proportion(Eq("isSexualExploit", 1)))
    stated = value_half_width(share, count)
    for meets in (100, 60, 30, 200):  # N' of 30 or more passes tau
        split = np.array([meets] + [0] * 3 + [count - meets] + [0] * 3, dtype=np.int64)
        measured = reach(share, [split])
        assert measured <= stated + 1e-12
        if 40 <= meets <= 160:  # both counts clear of their quantile: no clipping
            assert measured == pytest.approx(stated)
    mean = plan(Mean("yearOfRegistration"))
    stated = value_half_width(mean, count)
    shift = mean.components[0].shift
    for value in (2002, 2006, 2011, 2016, 2021):
        shifted = np.array([(value - shift) * count, 0, 0, 0], dtype=np.int64)
        present = np.array([count, 0, 0, 0], dtype=np.int64)
        assert reach(mean, [shifted, present]) <= stated + 1e-9
    assert value_half_width(mean, 1) == 19.0  # a cell of one record: the whole range
    total = plan(Sum("yearOfRegistration"))
    sums = np.array([2010 * count, 0, 0, 0], dtype=np.int64)
    stated = value_half_width(total, count)
    assert reach(total, [sums, np.array([count, 0, 0, 0], dtype=np.int64)]) == pytest.approx(
        stated
    )
    counts = plan(Count())
    assert value_half_width(counts, count) == counts.count_mechanism.distribution.quantile_abs(
        0.95
    )


def test_a_share_is_published_only_when_its_noisy_base_passes_tau_too() -> None:
    from engine.planner import plan_query

    share = plan_query(Query(Proportion(Eq("isSexualExploit", 1)), by=("gender",)),
                       default_codebook(), Settings(), PrivacyLoss.pure("0.5"))
    tau, n = share.tau, share.group_cells
    # Cell 0: N' at tau, C' negative, so N' + C' below tau; cell 1: both pass.
    meets = np.array([tau, tau] + [0] * (n - 2), dtype=np.int64)
    rest = np.array([-3, 5] + [0] * (n - 2), dtype=np.int64)
    rows = build_answer(share, [np.concatenate([meets, rest])], data_version="t").table
    first, second = rows.to_pylist()[:2]
    assert first["suppressed"] and first["value"] is None and first["status"] == "suppressed"
    assert not second["suppressed"] and second["status"] == "published"


@settings(deadline=None)  # the first pa.array() call imports pandas
@given(
    values=st.lists(st.integers(-(2**62), 2**62), max_size=70),
    data=st.data(),
)
def test_arrays_built_from_buffers_are_the_arrays_arrow_would_build(
    values: list[int], data: st.DataObject
) -> None:
    # Bitmaps pack eight cells to a byte: lengths across byte boundaries, every null pattern.
    null = np.array(data.draw(st.lists(st.booleans(), min_size=len(values),
                                       max_size=len(values))), dtype=bool)
    numbers = np.array(values, dtype=np.int64)
    mask = null if null.size else None
    for kind in (pa.int64(), pa.float64()):
        expected = pa.array(numbers.astype(kind.to_pandas_dtype()), type=kind, mask=mask)
        built = release_module._numbers(numbers, kind, null=null)
        built.validate(full=True)
        assert built.equals(expected) and built.null_count == expected.null_count
    small = (numbers % 3).astype(np.int8)
    assert release_module._numbers(small, pa.int8()).equals(pa.array(small))
    assert release_module._booleans(null).equals(pa.array(null, type=pa.bool_()))
    labels = [None if n else f"k{v % 5}é" for v, n in zip(values, null, strict=True)]
    strings = release_module._strings(labels)
    strings.validate(full=True)
    assert strings.equals(pa.array(labels, type=pa.string()))
