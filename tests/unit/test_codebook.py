"""The codebook: the CTDC v7 transcription, country domains, regions, and format validation."""

from __future__ import annotations

import csv
from pathlib import Path

import pycountry
import pytest

from engine.codebook import Codebook, Kind, default_codebook, load_codebook
from engine.errors import CodebookError, InvalidQueryError

EXCERPT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ctdc_global_2020_excerpt.csv"


def test_ctdc_has_all_63_variables_in_file_order() -> None:
    codebook = default_codebook()
    assert len(codebook.variables) == 63
    assert [v.number for v in codebook.variables] == list(range(1, 64))
    if EXCERPT.exists():
        with EXCERPT.open(newline="") as handle:
            header = next(csv.reader(handle))
        assert [v.name for v in codebook.variables] == header


def test_every_variable_has_a_definition_and_a_type() -> None:
    for variable in default_codebook().variables:
        assert len(variable.definition) > 20, variable.name
        assert isinstance(variable.kind, Kind)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("meansOfControl", 18),
        ("exploitationType", 8),
        ("labourType", 13),
        ("sexType", 4),
        ("recruiterRelation", 5),
    ],
)
def test_flag_sets_are_first_class(name: str, size: int) -> None:
    flag_set = default_codebook().flag_set(name)
    assert len(flag_set.flags) == size
    for flag in flag_set.flags:
        assert default_codebook().variable(flag).kind is Kind.FLAG


def test_country_domain_is_iso_alpha2_plus_unknown_code() -> None:
    citizenship = default_codebook().variable("citizenship")
    assert citizenship.codes[0] == "00"
    assert set(citizenship.codes[1:]) == {c.alpha_2 for c in pycountry.countries}
    assert "NA" in citizenship.codes  # Namibia, not missing
    assert citizenship.label_of("NA") == "Namibia"
    assert citizenship.label_of("00") == "Unknown country"


def test_m49_regions_come_from_the_maintained_table() -> None:
    codebook = default_codebook()
    region = codebook.dimension("citizenshipRegion")
    subregion = codebook.dimension("citizenshipSubregion")
    assert set(region.keys) == {
        "Africa",
        "Americas",
        "Asia",
        "Europe",
        "Oceania",
        "Antarctica",
        "Unknown",
    }
    mapping = region.derived.mapping if region.derived else {}
    assert mapping["NA"] == "Africa" and mapping["GB"] == "Europe" and mapping["CO"] == "Americas"
    assert mapping["00"] == "Unknown"
    sub = subregion.derived.mapping if subregion.derived else {}
    assert sub["PH"] == "South-eastern Asia" and sub["MD"] == "Eastern Europe"
    # Every source code has a key; every key index is valid.
    assert len(region.source_to_key) == len(codebook.variable("citizenship").codes)
    assert max(region.source_to_key) < len(region.keys)


def test_regions_are_m49s_three_levels() -> None:
    """M49's sub-regions, with its intermediate regions as a level of their own (checked
    against the M49 overview: country_converter's table gives the intermediate region where
    there is one, and places Nauru in Polynesia). A key names one set of countries at every
    level it appears in."""
    codebook = default_codebook()
    levels = [
        codebook.dimension(f"citizenship{level}").derived
        for level in ("Region", "Subregion", "IntermediateRegion")
    ]
    region, subregion, intermediate = (d.mapping if d else {} for d in levels)
    expected = {
        "MZ": ("Africa", "Sub-Saharan Africa", "Eastern Africa"),
        "NG": ("Africa", "Sub-Saharan Africa", "Western Africa"),
        "NA": ("Africa", "Sub-Saharan Africa", "Southern Africa"),
        "EG": ("Africa", "Northern Africa", "Northern Africa"),
        "CO": ("Americas", "Latin America and the Caribbean", "South America"),
        "HT": ("Americas", "Latin America and the Caribbean", "Caribbean"),
        "MX": ("Americas", "Latin America and the Caribbean", "Central America"),
        "US": ("Americas", "Northern America", "Northern America"),
        "NR": ("Oceania", "Micronesia", "Micronesia"),
        "JE": ("Europe", "Northern Europe", "Northern Europe"),  # one set of countries by name
        "GB": ("Europe", "Northern Europe", "Northern Europe"),
        "00": ("Unknown", "Unknown", "Unknown"),
    }
    for code, levels_of_code in expected.items():
        assert (region[code], subregion[code], intermediate[code]) == levels_of_code, code
    # M49's 17 sub-regions, Antarctica (in none) and the unknown.
    assert len(set(subregion.values())) == 19
    for key in set(subregion.values()) & set(intermediate.values()):
        assert ({c for c, k in subregion.items() if k == key}
                == {c for c, k in intermediate.items() if k == key}), key
    # Each intermediate region lies in one sub-region, each sub-region in one region.
    for finer, coarser in ((intermediate, subregion), (subregion, region)):
        parents: dict[str, set[str]] = {}
        for code, key in finer.items():
            parents.setdefault(key, set()).add(coarser[code])
        assert all(len(p) == 1 for p in parents.values()), parents


def test_majority_from_age_is_a_derived_dimension() -> None:
    derived = default_codebook().dimension("majorityFromAge")
    assert derived.keys == ("Minor", "Adult")
    assert derived.source_codes_for(frozenset({"Minor"})) == {"0--8", "9--17"}


def test_concatenated_columns_are_not_queryable() -> None:
    with pytest.raises(InvalidQueryError, match="query its flags instead"):
        default_codebook().dimension("meansOfControlConcatenated")


def test_value_parsing_names_the_variable() -> None:
    gender = default_codebook().variable("gender")
    with pytest.raises(InvalidQueryError, match="gender: value 'Alien' is not in the codebook"):
        gender.parse_value("Alien")
    year = default_codebook().variable("yearOfRegistration")
    assert year.parse_value("2010") == 2010
    with pytest.raises(InvalidQueryError, match="integers 2002 to 2021"):
        year.parse_value(1990)


def test_second_codebook_is_not_ctdc() -> None:
    ics = load_codebook("ics_tip_victims")
    assert ics.name != "ctdc"
    assert any(v.kind is Kind.INTEGER for v in ics.variables)
    assert ics.flag_sets


def _minimal(**overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "name": "t",
        "version": "1",
        "variables": [{"name": "a", "type": "flag"}, {"name": "b", "type": "flag"}],
        "flag_sets": [{"name": "s", "flags": ["a", "b"]}],
    }
    raw.update(overrides)
    return raw


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"variables": [{"name": "a", "type": "flag"}, {"name": "a", "type": "flag"}]},
            "duplicate variable",
        ),
        ({"variables": [{"name": "a", "type": "weird"}]}, "unknown type"),
        ({"variables": [{"name": "a", "type": "integer", "range": [5, 1]}]}, "exceeds"),
        ({"variables": [{"name": "a", "type": "category"}]}, "needs categories"),
        ({"flag_sets": [{"name": "s", "flags": ["zzz"]}]}, "not a flag variable"),
        ({"min_cell_size": 0}, "min_cell_size"),
        ({"privacy_unit": {"id_column": "nobody"}}, "not a stored variable"),
        ({"privacy_unit": {"max_rows_per_person": 0}}, "max_rows_per_person"),
        ({"privacy_unit": {"max_rows_per_person": "2"}}, "max_rows_per_person"),
        # A release's own columns: a dimension so named would overwrite one.
        (
            {"variables": [{"name": "a", "type": "flag"}, {"name": "Status", "type": "flag"}],
             "flag_sets": []},
            "Status is the name of a column every release has",
        ),
        ({"flag_sets": [{"name": "value", "flags": ["a", "b"]}]}, "value is the name of a column"),
        # One spelling for two codes: a query or a source file could not say which it means.
        (
            {"variables": [{"name": "c", "type": "category", "categories": [
                {"code": "U", "aliases": ["Not recorded"]},
                {"code": "R", "aliases": ["Not recorded"]},
            ]}], "flag_sets": []},
            "'Not recorded' spells both 'U' and 'R'",
        ),
        (
            {"variables": [{"name": "c", "type": "category", "categories": [
                {"code": "U", "label": "R"}, {"code": "R"},
            ]}], "flag_sets": []},
            "'R' spells both 'R' and 'U'",
        ),
    ],
)
def test_malformed_codebooks_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(CodebookError, match=message):
        Codebook.from_mapping(_minimal(**overrides))


def test_unknown_codebook_name_is_refused() -> None:
    with pytest.raises(CodebookError, match="no codebook"):
        load_codebook("nonexistent_codebook")


def test_the_codebooks_own_spellings_name_the_same_code() -> None:
    """A label or alias the codebook lists (and source files may use) is the category's code."""
    codebook = default_codebook()
    assert codebook.dimension("Datasource").parse_value("Case management") == "Case Management"
    assert codebook.dimension("ageBroad").parse_value("9\u201317") == "9--17"  # the label
    assert codebook.dimension("ageBroad").parse_value("9-17") == "9--17"
    with pytest.raises(InvalidQueryError, match="not in the codebook domain"):
        codebook.dimension("ageBroad").parse_value("9 to 17")


def test_what_risk_checks_by_default_is_not_part_of_the_identity() -> None:
    """It places no cell and releases nothing: changing it must not refuse every data file."""
    import dataclasses

    codebook = default_codebook()
    assert codebook.quasi_identifiers[:2] == ("gender", "ageBroad")
    other = dataclasses.replace(codebook, quasi_identifiers=("gender",), sensitive=())
    assert other.identity == codebook.identity
    assert dataclasses.replace(codebook, min_cell_size=11).identity != codebook.identity
