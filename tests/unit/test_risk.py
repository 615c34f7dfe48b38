"""The disclosure-risk report on crafted data whose k-anonymity, uniques and l-diversity are known
by construction, on a CSV loaded leniently, and against pyCANON where it is installed."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from engine.codebook import Codebook, default_codebook, load_codebook
from engine.loss import Accounting
from engine.risk import (
    RiskError,
    assess_data_file,
    assess_path,
    binary_guess_bound,
)
from tests.conftest import write_database

CODEBOOK = default_codebook()
QIS = ("gender", "ageBroad", "citizenship")


def _rows(n: int, gender: Any, age: Any, country: Any, flags: list[Any]) -> list[dict[str, Any]]:
    assert len(flags) == n
    return [
        {"gender": gender, "ageBroad": age, "citizenship": country, "isSexualExploit": f}
        for f in flags
    ]


# Six classes on (gender, ageBroad, citizenship); None is missing, a value of its own.
#   A  Female 18--20 PH   12 records, sexual exploitation 6 x 1, 6 x 0      l = 2
#   B  Male   9--17  US   10 records, all 1                                l = 1, k-anonymous
#   C  Female 30--38 UA    3 records, 1, 0, missing                        l = 3
#   D  Male   18--20 PH    1 record,  0                                    unique
#   E  Female missing PH   2 records, 1, 1                                 l = 1
#   F  missing everywhere  1 record,  missing                              unique
CRAFTED = (
    _rows(12, "Female", "18--20", "PH", [1] * 6 + [0] * 6)
    + _rows(10, "Male", "9--17", "US", [1] * 10)
    + _rows(3, "Female", "30--38", "UA", [1, 0, None])
    + _rows(1, "Male", "18--20", "PH", [0])
    + _rows(2, "Female", None, "PH", [1, 1])
    + _rows(1, None, None, None, [None])
)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_database(tmp_path_factory.mktemp("risk") / "crafted.duckdb", CRAFTED)


def test_k_anonymity_uniques_and_records_at_risk_are_as_constructed(crafted: Path) -> None:
    report = assess_data_file(
        crafted, codebook=CODEBOOK, qis=QIS, sensitive=("isSexualExploit",), k=10
    )
    assert report.rows == 29
    full = report.full
    assert (full.classes, full.k_anonymity) == (6, 1)
    assert full.small_classes == 4  # C, D, E, F
    assert full.records_at_risk == 3 + 1 + 2 + 1
    assert full.sample_uniques == 2  # D and F
    assert not report.k_anonymous
    assert report.class_sizes == ((1, 2), (2, 1), (3, 1), (10, 1), (12, 1))
    bands = {label: (classes, records) for label, classes, records in report.size_bands()}
    assert bands["1"] == (2, 2) and bands["10-19"] == (2, 22) and bands["5-9"] == (0, 0)


def test_l_diversity_counts_missing_as_a_value_that_discloses_nothing(crafted: Path) -> None:
    report = assess_data_file(
        crafted, codebook=CODEBOOK, qis=QIS, sensitive=("isSexualExploit",), k=10
    )
    (diversity,) = report.diversity
    assert diversity.l_diversity == 1
    # B, D and E share one known value; F shares only a missing one, which discloses nothing
    # (a suppressed column of a k-anonymised extract is all missing).
    assert diversity.homogeneous_classes == 3
    assert diversity.records_in_homogeneous == 10 + 1 + 2
    # B is 10-anonymous, yet every member's value is disclosed: the homogeneity attack.
    assert diversity.records_in_homogeneous_k_anonymous == 10


def test_a_data_file_of_another_codebook_is_refused_in_one_line(
    crafted: Path, tmp_path: Path
) -> None:
    from engine.codebook import load_codebook

    other = load_codebook("ics_tip_victims")
    with pytest.raises(RiskError, match="loaded with codebook ctdc@7") as refused:
        assess_data_file(crafted, codebook=other, qis=("citizenship",), k=10)
    assert "--codebook" in str(refused.value)


def _people_codebook(classes: str, *, flags: tuple[str, ...] = ()) -> Codebook:
    """A codebook whose privacy unit is the person (personId, up to 10 rows each), with a
    category g of one code per letter of `classes`, and the given flags."""
    return Codebook.from_mapping({
        "name": "people", "version": "1",
        "privacy_unit": {"id_column": "personId", "max_rows_per_person": 10},
        "variables": [
            {"name": "personId", "type": "integer", "range": [1, 1000]},
            {"name": "g", "type": "category", "categories": [{"code": c} for c in classes]},
            *({"name": flag, "type": "flag"} for flag in flags),
        ],
    })

def test_with_records_of_people_classes_are_counted_in_people(tmp_path: Path) -> None:
    # Ten records of one person are one person: unique, however many rows hold them. Person 1
    # has ten identical records (class A); persons 2-11 one record each in class B; person 12
    # two records in class C, one of whose values of f1 differs.
    people = _people_codebook("ABC", flags=("f1",))
    rows = (
        [{"personId": 1, "g": "A", "f1": 1}] * 10
        + [{"personId": p, "g": "B", "f1": 1} for p in range(2, 12)]
        + [{"personId": 12, "g": "C", "f1": 0}, {"personId": 12, "g": "C", "f1": 1}]
    )
    path = write_database(tmp_path / "people.duckdb", rows, codebook=people)
    report = assess_data_file(path, codebook=people, qis=("g",), sensitive=("f1",), k=10)
    assert report.rows == 22
    full = report.full
    assert full.k_anonymity == 1 and not report.k_anonymous  # A and C hold one person each
    assert full.sample_uniques == 2  # persons 1 and 12
    assert full.records_at_risk == 10 + 2  # the records of A and C
    assert report.class_sizes == ((1, 2), (10, 1))  # in people
    (diversity,) = report.diversity
    # A and B each share one value; only B is ten people, so only its 10 records are disclosed
    # within a class that is k-anonymous.
    assert diversity.homogeneous_classes == 2
    assert diversity.records_in_homogeneous == 10 + 10
    assert diversity.records_in_homogeneous_k_anonymous == 10
    assert diversity.values_disclosed == ("1",)  # positive disclosure: B's members all have f1
    assert "share one value of f1 (1 in every such class)" in report.render()
    assert any("counted in people (personId" in note for note in report.notes)
    assert "counted in people" in report.render()


def test_records_without_a_person_id_are_each_a_person_of_their_own(tmp_path: Path) -> None:
    # Class A: three identified people and seven records with no id, ten people in all; class
    # B: ten identified people. Merging the records with no id would make A a class of three.
    people = _people_codebook("AB")
    rows = (
        [{"personId": p, "g": "A"} for p in (1, 2, 3)]
        + [{"personId": None, "g": "A"}] * 7
        + [{"personId": p, "g": "B"} for p in range(4, 14)]
    )
    path = write_database(tmp_path / "people.duckdb", rows, codebook=people)
    report = assess_data_file(path, codebook=people, qis=("g",), k=10)
    assert report.class_sizes == ((10, 2),)
    assert report.k_anonymous and report.full.records_at_risk == 0


def test_drivers_leave_out_each_variable_and_each_pair(crafted: Path) -> None:
    report = assess_data_file(crafted, codebook=CODEBOOK, qis=QIS, k=10)
    single = {c.dropped: (c.records_at_risk, c.sample_uniques, c.k_anonymity) for c in
              report.drop_one}
    assert single == {
        ("gender",): (6, 1, 1),  # (18--20, PH) merges A and D
        ("ageBroad",): (5, 2, 1),  # (Female, PH) merges A and E
        ("citizenship",): (7, 2, 1),  # nothing merges
    }
    pairs = {c.dropped: (c.records_at_risk, c.sample_uniques, c.k_anonymity) for c in
             report.drop_two}
    assert pairs == {
        ("gender", "ageBroad"): (4, 1, 1),  # by citizenship: 15, 10, 3, 1
        ("gender", "citizenship"): (6, 0, 3),  # by age: 13, 10, 3, 3
        ("ageBroad", "citizenship"): (1, 1, 1),  # by gender: 17, 11, 1
    }
    assert report.best_single is not None and report.best_single.dropped == ("ageBroad",)
    assert report.best_pair is not None and report.best_pair.dropped == ("ageBroad", "citizenship")
    text = report.render()
    assert text.startswith("RESTRICTED: exact counts from the records")  # never a release
    assert report.to_dict()["restricted"].startswith("RESTRICTED")
    assert "NOT 10-anonymous: 7 records" in text
    assert "Leaving out ageBroad lowers the records at risk most" in text


def test_a_file_that_is_k_anonymous_says_so(tmp_path: Path) -> None:
    rows = _rows(10, "Male", "9--17", "US", [1] * 5 + [0] * 5) + _rows(
        11, "Female", "9--17", "US", [1] * 11
    )
    path = write_database(tmp_path / "k.duckdb", rows)
    report = assess_data_file(path, codebook=CODEBOOK, qis=QIS, sensitive=("isSexualExploit",))
    assert report.k_anonymous and report.full.k_anonymity == 10
    assert report.full.records_at_risk == 0 and report.full.sample_uniques == 0
    assert report.diversity[0].records_in_homogeneous_k_anonymous == 11
    assert "VERDICT: 10-anonymous" in report.render()
    assert "WARNING: 11 records are in classes of at least 10" in report.render()


def test_a_class_one_record_short_of_k_is_at_risk(tmp_path: Path) -> None:
    rows = _rows(9, "Female", "18--20", "PH", [1] * 9) + _rows(10, "Male", "9--17", "US", [0] * 10)
    report = assess_data_file(write_database(tmp_path / "short.duckdb", rows), codebook=CODEBOOK,
                              qis=QIS, k=10)
    assert not report.k_anonymous and report.full.k_anonymity == 9
    assert (report.full.small_classes, report.full.records_at_risk) == (1, 9)


def test_a_class_sharing_one_known_value_has_l_diversity_one(tmp_path: Path) -> None:
    # No value is missing here, so none adds to any class's distinct values.
    rows = _rows(10, "Female", "18--20", "PH", [1] * 10) + _rows(
        10, "Male", "9--17", "US", [1] * 5 + [0] * 5
    )
    report = assess_data_file(write_database(tmp_path / "l.duckdb", rows), codebook=CODEBOOK,
                              qis=QIS, sensitive=("isSexualExploit",), k=10)
    (diversity,) = report.diversity
    assert (diversity.l_diversity, diversity.homogeneous_classes) == (1, 1)


def test_a_file_of_one_record_is_unique_and_discloses_its_class(tmp_path: Path) -> None:
    rows = _rows(1, "Male", "9--17", "US", [1])
    report = assess_data_file(write_database(tmp_path / "one.duckdb", rows), codebook=CODEBOOK,
                              qis=QIS, sensitive=("isSexualExploit",), k=10)
    assert not report.k_anonymous and report.full.sample_uniques == 1
    (diversity,) = report.diversity
    assert (diversity.l_diversity, diversity.records_in_homogeneous) == (1, 1)
    assert "VERDICT: NOT 10-anonymous" in report.render()


def test_outputs_are_json_and_csv(crafted: Path) -> None:
    report = assess_data_file(crafted, codebook=CODEBOOK, qis=QIS, k=10)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["full"]["records_at_risk"] == 7 and data["best_pair"]["dropped"] == [
        "ageBroad",
        "citizenship",
    ]
    rows = list(csv.DictReader(report.to_csv().splitlines()))
    assert len(rows) == 1 + 3 + 3
    assert rows[0]["dropped"] == "" and rows[0]["records_at_risk"] == "7"
    assert math.isclose(float(rows[0]["share_at_risk"]), 7 / 29, rel_tol=1e-5)


def test_a_published_csv_is_loaded_leniently_and_the_load_is_noted(tmp_path: Path) -> None:
    names = [v.name for v in CODEBOOK.variables]
    source = tmp_path / "extract.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for i in range(30):
            row = dict.fromkeys(names, "")
            row["gender"] = "Female" if i < 20 else "Male"
            row["ageBroad"] = "18--20" if i < 25 else "60+"  # "60+" is no codebook band
            row["citizenship"] = "PH"
            writer.writerow([row[n] for n in names])
    report = assess_path(source, codebook=CODEBOOK, qis=QIS, sensitive=(), k=10)
    assert report.rows == 30
    # Female/18--20: 20; Male/18--20: 5; Male/missing (was "60+"): 5
    assert report.full.records_at_risk == 10 and report.full.k_anonymity == 5
    assert any("ageBroad" in note and "understated" in note for note in report.notes)
    assert report.source == str(source)


def test_a_quasi_identifier_absent_from_the_file_is_noted(tmp_path: Path) -> None:
    source = tmp_path / "no-citizenship.csv"
    source.write_text("gender,ageBroad\n" + "Female,18--20\n" * 12 + "Male,9--17\n" * 3)
    report = assess_path(source, codebook=CODEBOOK, qis=QIS, sensitive=(), k=10)
    assert report.rows == 15 and report.full.records_at_risk == 3
    assert "citizenship: absent from the file, counted as missing throughout" in report.notes


def test_two_quasi_identifiers_have_a_driver_each(crafted: Path) -> None:
    report = assess_data_file(crafted, codebook=CODEBOOK, qis=("gender", "ageBroad"), k=10)
    assert {c.dropped for c in report.drop_one} == {("gender",), ("ageBroad",)}
    assert not report.drop_two


def test_variables_are_checked_against_the_codebook(crafted: Path) -> None:
    with pytest.raises(RiskError, match="not a stored codebook variable") as refused:
        assess_data_file(crafted, codebook=CODEBOOK, qis=("gender", "nope"))
    assert "did you mean" not in str(refused.value)  # nothing is close to "nope"
    with pytest.raises(RiskError, match=r"'agebraod' is not a stored .*did you mean ageBroad\?"):
        assess_data_file(crafted, codebook=CODEBOOK, qis=("gender", "agebraod"))
    with pytest.raises(RiskError, match="either QI or sensitive"):
        assess_data_file(crafted, codebook=CODEBOOK, qis=QIS, sensitive=("gender",))
    with pytest.raises(RiskError, match="listed twice"):
        assess_data_file(crafted, codebook=CODEBOOK, qis=("gender", "gender"))
    with pytest.raises(RiskError, match="k must be"):
        assess_data_file(crafted, codebook=CODEBOOK, qis=QIS, k=1)


def test_the_default_variables_are_the_codebooks(crafted: Path, tmp_path: Path) -> None:
    report = assess_data_file(crafted, codebook=CODEBOOK, sensitive=CODEBOOK.sensitive)
    assert report.qis == CODEBOOK.quasi_identifiers and len(report.qis) == 6
    assert len(report.drop_one) == 6 and len(report.drop_two) == 15
    assert report.full.rows == 29
    # Another codebook brings its own: ICS-TIP's records have sex and a numeric age.
    ics = load_codebook("ics_tip_victims")
    rows = [{"sex": "Female", "ageYears": 16, "citizenship": "NG", "isForcedLabour": 0}] * 12
    report = assess_data_file(write_database(tmp_path / "ics.duckdb", rows, codebook=ics),
                              codebook=ics, sensitive=ics.sensitive)
    assert report.qis == ics.quasi_identifiers and "sex" in report.qis
    assert [d.variable for d in report.diversity] == list(ics.sensitive)
    # A codebook naming none asks for them.
    bare = Codebook.from_mapping({"name": "b", "version": "1",
                                  "variables": [{"name": "a", "type": "flag"}]})
    with pytest.raises(RiskError, match="names none to assess by default"):
        assess_data_file(write_database(tmp_path / "b.duckdb", [{"a": 1}], codebook=bare),
                         codebook=bare)


def test_cli_exit_status_and_formats(
    crafted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import veil_cli

    assert veil_cli.main(["risk", str(crafted), "--qi", ",".join(QIS), "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["full"]["sample_uniques"] == 2
    safe = write_database(tmp_path / "safe.duckdb", _rows(3, "Male", "9--17", "US", [1, 0, 1]))
    assert veil_cli.main(["risk", str(safe), "--qi", "gender", "--k", "3", "--sensitive", ""]) == 0
    assert "VERDICT: 3-anonymous" in capsys.readouterr().out
    assert veil_cli.main(["risk", str(crafted), "--qi", "nope"]) == 2
    capsys.readouterr()
    # CSV stays plain CSV; its notice that the counts are restricted goes to standard error.
    assert veil_cli.main(["risk", str(crafted), "--qi", ",".join(QIS), "--format", "csv"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("quasi_identifiers,") and err.startswith("RESTRICTED")


def test_binary_guess_bound() -> None:
    assert binary_guess_bound(Accounting.PURE_DP, 0) == 0.5
    assert math.isclose(binary_guess_bound(Accounting.PURE_DP, 1.0), math.e / (1 + math.e))
    # zCDP: never below the pure-DP bound at the same number, grows with rho, stays below 1
    for rho in (0.01, 0.1, 1.0):
        bound = binary_guess_bound(Accounting.ZCDP, rho)
        assert 0.5 < bound < 1
    assert binary_guess_bound(Accounting.ZCDP, 0.01) < binary_guess_bound(Accounting.ZCDP, 0.1)


@pytest.mark.parametrize("rho", [0.01, 0.1, 1.0])
def test_the_zcdp_guess_bound_is_the_tightest_over_delta(rho: float) -> None:
    """Against a fine search of its own over delta (eps(delta) = rho + 2 sqrt(rho ln(1/delta))):
    the bound is within 0.005 of the least, so an attacker's success is not judged against a
    looser bound than the guarantee gives; and never below the pure-DP bound at the same number
    (0.767 at rho 0.1, where a search over too narrow a range of delta gives 0.959)."""
    finest = min(
        (math.exp(eps) + delta) / (1 + math.exp(eps))
        for i in range(1, 20_001)
        for delta in (10 ** (-12 + 11.5 * i / 20_000),)
        for eps in (rho + 2 * math.sqrt(rho * math.log(1 / delta)),)
    )
    bound = binary_guess_bound(Accounting.ZCDP, rho)
    assert abs(bound - finest) <= 0.005, (bound, finest)
    assert bound >= binary_guess_bound(Accounting.PURE_DP, rho)


def test_matches_pycanon_on_random_data(tmp_path: Path) -> None:
    """Cross-check with pyCANON's k-anonymity and l-diversity (missing filled with a marker,
    since pandas would drop those rows from every class)."""
    anonymity = pytest.importorskip("pycanon.anonymity")
    import pandas as pd

    rng = random.Random(7)
    rows = [
        {
            "gender": rng.choice(["Male", "Female", None]),
            "ageBroad": rng.choice(["9--17", "18--20", "21--23", None]),
            "citizenship": rng.choice(["PH", "UA", "US", "MD", None]),
            "isSexualExploit": rng.choice([0, 1, 1, None]),
        }
        for _ in range(400)
    ]
    path = write_database(tmp_path / "random.duckdb", rows)
    ours = assess_data_file(
        path, codebook=CODEBOOK, qis=QIS, sensitive=("isSexualExploit",), k=10
    )
    frame = pd.DataFrame(rows).astype(object).where(pd.DataFrame(rows).notna(), "<missing>")
    frame = frame.astype(str)
    assert ours.full.k_anonymity == anonymity.k_anonymity(frame, list(QIS))
    assert ours.diversity[0].l_diversity == anonymity.l_diversity(
        frame, list(QIS), ["isSexualExploit"]
    )
    sizes = frame.groupby(list(QIS)).size()
    assert ours.full.records_at_risk == int(sizes[sizes < 10].sum())
    assert ours.full.sample_uniques == int((sizes == 1).sum())
