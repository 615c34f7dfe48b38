"""Country codes and UN M49 regions, from maintained sources.

ISO 3166-1 alpha-2 codes come from pycountry. M49 regions come from country_converter's country
table, whose `UNregion` column names each country's M49 intermediate region where M49 defines one
(within Sub-Saharan Africa, Latin America and the Caribbean) and its sub-region elsewhere: the
sub-regions those intermediate regions belong to, and the two places the table differs from M49,
are written below. We read that table with the csv module rather than through country_converter's
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


# M49's intermediate regions (those of Sub-Saharan Africa and of Latin America and the
# Caribbean) and the sub-region each belongs to. The table has no sub-region
# column of its own, and no maintained package that does (with no network at run time) is light
# enough to import into the server, so the seven names are written here, from the M49 overview
# (unstats.un.org/unsd/methodology/m49).
SUBREGION_OF_INTERMEDIATE = {
    "Eastern Africa": "Sub-Saharan Africa",
    "Middle Africa": "Sub-Saharan Africa",
    "Southern Africa": "Sub-Saharan Africa",
    "Western Africa": "Sub-Saharan Africa",
    "Caribbean": "Latin America and the Caribbean",
    "Central America": "Latin America and the Caribbean",
    "South America": "Latin America and the Caribbean",
}

# Where the table's UNregion differs from M49: Nauru (M49 520) is in Micronesia (057), not
# Polynesia. (M49 also makes Guernsey and Jersey an intermediate region of Northern Europe, the
# Channel Islands; left out, so that "Northern Europe" names one set of countries at both levels.)
UNREGION_CORRECTIONS = {"NR": "Micronesia"}


@dataclass(frozen=True)
class CountryRegions:
    region: str
    subregion: str
    intermediate: str  # M49's intermediate region, or the sub-region where M49 defines none


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
    """M49 region, sub-region and intermediate region of every ISO alpha-2 code.

    The region of a sub-region is the continent most of its countries carry in the same table
    ("America" read as M49's "Americas"). A country M49 places in no region (Antarctica) is its
    own region, sub-region and intermediate region.
    """
    table = _country_table()
    found = {code: table.get(_alpha3(code)) for code in iso_alpha2_codes()}
    intermediate = {
        code: UNREGION_CORRECTIONS.get(code, row["UNregion"] if row else "")
        for code, row in found.items()
    }
    subregion = {
        code: SUBREGION_OF_INTERMEDIATE.get(level, level) for code, level in intermediate.items()
    }
    votes: dict[str, Counter[str]] = {}
    for code, row in found.items():
        if row is not None and subregion[code]:
            continent = "Americas" if row["continent"] == "America" else row["continent"]
            votes.setdefault(subregion[code], Counter())[continent] += 1
    region_of_subregion = {sub: counts.most_common(1)[0][0] for sub, counts in votes.items()}
    result: dict[str, CountryRegions] = {}
    for code in found:
        if subregion[code]:
            region = region_of_subregion[subregion[code]]
            result[code] = CountryRegions(region, subregion[code], intermediate[code])
        else:
            name = country_name(code)
            result[code] = CountryRegions(name, name, name)
    return result
