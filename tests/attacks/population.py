"""A crafted population for the attack tests: every attack finds its targets in it.

- common: 10 countries holding 80 records in each of the 60 (year x gender) cells, half of them
  with the secret flag (isForcedLabour), so every tracker count is far above tau;
- uniques: `uniques` countries with one record each, spread one per cell (then a second round),
  whose flags are exactly half 1 and half 0 in random order: the targets;
- k cells: 30 countries with exactly k records and 30 with k - 1 (suppression membership);
- every other country is empty (key leakage: one record against none).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from engine.geography import iso_alpha2_codes
from tests.conftest import write_database

K = 10
YEARS = tuple(range(2002, 2022))
GENDERS = ("Female", "Male", "Transgender/NonConforming")
COMMON = ("UA", "MD", "PH", "ID", "KH", "BY", "UG", "RO", "CO", "HT")


def build(path: Path, *, uniques: int = 60, k_cells: int = 30, seed: int = 11) -> Path:
    rng = random.Random(seed)
    cells = [(y, g) for y in YEARS for g in GENDERS]
    rows: list[dict[str, Any]] = []
    for year, gender in cells:
        flags = [1] * 40 + [0] * 40
        rng.shuffle(flags)
        for i, flag in enumerate(flags):
            rows.append(_row(COMMON[i % len(COMMON)], year, gender, flag))
    spare = [c for c in iso_alpha2_codes() if c not in COMMON]
    rng.shuffle(spare)
    targets, spare = spare[:uniques], spare[uniques:]
    secrets = [1] * (uniques // 2) + [0] * (uniques - uniques // 2)
    rng.shuffle(secrets)
    for i, (code, secret) in enumerate(zip(targets, secrets, strict=True)):
        year, gender = cells[i % len(cells)]
        rows.append(_row(code, year, gender, secret))
    inside, outside = spare[:k_cells], spare[k_cells : 2 * k_cells]
    for code, size in [(c, K) for c in inside] + [(c, K - 1) for c in outside]:
        for _ in range(size):
            year, gender = rng.choice(cells)
            rows.append(_row(code, year, gender, rng.randrange(2)))
    rng.shuffle(rows)
    return write_database(path, rows, data_version="attack-population")


def _row(country: str, year: int, gender: str, flag: int) -> dict[str, Any]:
    return {
        "citizenship": country,
        "yearOfRegistration": year,
        "gender": gender,
        "isForcedLabour": flag,
        "CountryOfExploitation": "US",
    }
