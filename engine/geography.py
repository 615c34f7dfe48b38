"""Country codes and UN M49 regions, from maintained sources.

ISO 3166-1 alpha-2 codes come from pycountry. M49 sub-regions come from country_converter's
country table. We read that table with the csv module rather than through country_converter's
pandas loader because pandas' default NA handling turns Namibia's code "NA" into a missing value
(the very trap real CTDC files set). The package is found, not imported: importing it imports
pandas, which would add half a second and tens of megabytes to every engine command and to the
server.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pycountry

UNKNOWN_REGION = "Unknown"


@dataclass(frozen=True)
class CountryRegions:
    region: str
    subregion: str


@functools.cache
def iso_alpha2_codes() -> tuple[str, ...]:
    """Every ISO 3166-1 alpha-2 code, sorted."""
    return tuple(sorted(country.alpha_2 for country in pycountry.countries))


@functools.cache
def country_name(code: str) -> str:
    country = pycountry.countries.get(alpha_2=code)
    return str(country.name) if country is not None else code


@functools.cache
def _alpha3(code: str) -> str:
    country = pycountry.countries.get(alpha_2=code)
    if country is None:
        raise KeyError(code)
    return str(country.alpha_3)


@functools.cache
def _country_table() -> dict[str, dict[str, str]]:
    spec = importlib.util.find_spec("country_converter")  # a top-level package: not imported
    if spec is None or spec.origin is None:
        raise ImportError("country_converter is not installed; install veil's dependencies")
    path = Path(spec.origin).with_name("country_data.tsv")
    with path.open(encoding="utf-8", newline="") as handle:
        # Keyed by ISO3: the ISO2 column holds patterns for a few countries (Greece: ^GR$|^EL$).
        return {row["ISO3"]: row for row in csv.DictReader(handle, delimiter="\t")}


@functools.cache
def m49_regions() -> dict[str, CountryRegions]:
    """M49 region and sub-region of every ISO alpha-2 code.

    The table names each country's M49 sub-region; the region of a sub-region is the continent
    most of its countries carry in the same table ("America" read as M49's "Americas"). A country
    with no sub-region (Antarctica) is its own region and sub-region.
    """
    table = _country_table()
    votes: dict[str, Counter[str]] = {}
    for row in table.values():
        if row["UNregion"]:
            continent = "Americas" if row["continent"] == "America" else row["continent"]
            votes.setdefault(row["UNregion"], Counter())[continent] += 1
    region_of_subregion = {sub: counts.most_common(1)[0][0] for sub, counts in votes.items()}
    result: dict[str, CountryRegions] = {}
    for code in iso_alpha2_codes():
        found = table.get(_alpha3(code))
        subregion = found["UNregion"] if found else ""
        if subregion:
            result[code] = CountryRegions(region_of_subregion[subregion], subregion)
        else:
            name = country_name(code)
            result[code] = CountryRegions(name, name)
    return result
