"""Synthetic CTDC-like records for the demo, the tests and the benchmarks.

The generator writes a DuckDB file typed exactly like a loaded one (`engine.data_file.create`), so
everything downstream of the loader runs unchanged on it. The records are made up: every value is
drawn from the parameter tables below, which are set so that the shares CTDC has published (the
press release in `shared/seeds/004_*`) hold in the generated data, with the skew, the correlations
and the per-source missing values of the real files.

Output is a function of (rows, seed, codebook) and of numpy's PCG64 stream: the same arguments give
the same records (on the same numpy version). Rows are produced in chunks of `CHUNK_ROWS`, each
from its own child seed of `seed`, and appended through Arrow, so memory stays bounded at any size.
Synthetic data never passes through the release path, so numpy's generator is the right tool here;
noise for releases is drawn elsewhere, by OpenDP.

Where the published figures cannot all hold at once the tables say which one is kept: the press
release gives family involvement for 41% of child cases, but 61% for boys and 46% for girls, which
no mix of boys and girls averages to 41%; the generator keeps 41% and the boys-to-girls ratio.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from tqdm import tqdm

from engine import data_file
from engine.codebook import Codebook, Kind, Variable, default_codebook
from engine.errors import CodebookError
from engine.sql import generator_settings

CHUNK_ROWS = 1 << 20
MEMORY_LIMIT = "512MB"  # DuckDB's while writing; the process peaks near 0.7 GB at any size

# ==================================================================================================
# Parameters. Shares are probabilities; weights are normalised where they are used. `None` is a
# missing value (NULL). "CM" is Datasource Case Management, "HL" is Hotline. A comment citing a
# percentage names the published figure (CTDC press release) that the row reproduces; the tests in
# tests/unit/test_synthetic.py check those figures on 200,000 generated rows.
# ==================================================================================================
# fmt: off

DATASOURCE = {"Case Management": 0.62, "Hotline": 0.38}

# yearOfRegistration weights by source, skewed to recent years. The hotline contributes from 2015.
YEAR_WEIGHTS: Mapping[int, tuple[float, float]] = {
    #     CM     HL
    2002: (1.5, 0.0), 2003: (1.5, 0.0), 2004: (1.5, 0.0), 2005: (1.5, 0.0), 2006: (2.5, 0.0),
    2007: (2.5, 0.0), 2008: (2.5, 0.0), 2009: (2.5, 0.0), 2010: (2.5, 0.0), 2011: (3.0, 0.0),
    2012: (3.0, 0.0), 2013: (3.0, 0.0), 2014: (3.0, 0.0), 2015: (5.0, 10.0), 2016: (9.0, 18.0),
    2017: (12.0, 24.0), 2018: (9.0, 22.0), 2019: (7.0, 16.0), 2020: (5.0, 8.0), 2021: (3.0, 2.0),
}

# majorityStatus: ~25% minors, ~60% adults (brief), the rest Unknown or missing.
MAJORITY = {"Minor": 0.25, "Adult": 0.60, "Unknown": 0.10, None: 0.05}

# ageBroad given majorityStatus; Unknown or missing majority has no age band.
AGE_GIVEN_MAJORITY: Mapping[str, Mapping[str | None, float]] = {
    "Minor": {"0--8": 0.12, "9--17": 0.80, None: 0.08},
    "Adult": {"18--20": 0.17, "21--23": 0.15, "24--26": 0.13, "27--29": 0.11, "30--38": 0.21,
              "39--47": 0.10, "48+": 0.05, None: 0.08},
}

# gender given majorityStatus: ~70% female, ~28% male overall.
GENDER_GIVEN_MAJORITY: Mapping[str, Mapping[str | None, float]] = {
    "Minor": {"Female": 0.63, "Male": 0.34,  "Transgender/NonConforming": 0.01, None: 0.02},
    "Adult": {"Female": 0.73, "Male": 0.255, "Transgender/NonConforming": 0.01, None: 0.005},
    "other": {"Female": 0.69, "Male": 0.27,  "Transgender/NonConforming": 0.01, None: 0.03},
}

# majorityStatusAtExploit and majorityEntry: recorded for a minority of records (by source); the
# value given majorityStatus (adults are often exploited since childhood).
MAJORITY_AT_EXPLOIT_RECORDED = {"Case Management": 0.15, "Hotline": 0.25}
MAJORITY_ENTRY_RECORDED = {"Case Management": 0.10, "Hotline": 0.0}
MAJORITY_LATER_GIVEN_MAJORITY: Mapping[str, Mapping[str, float]] = {
    "Minor": {"Minor": 0.97, "Adult": 0.00, "Unknown": 0.03},
    "Adult": {"Minor": 0.25, "Adult": 0.70, "Unknown": 0.05},
    "other": {"Minor": 0.20, "Adult": 0.30, "Unknown": 0.50},
}

# Citizenship of Case Management records: a few countries dominate, then a Zipf-like tail over
# every other ISO code (rank k weighs 1 / (k + ZIPF_OFFSET) ** ZIPF_EXPONENT, in a fixed order).
ORIGIN_WEIGHTS = {
    "UA": 12.0, "MD": 9.0, "PH": 8.0, "ID": 7.0, "KH": 6.0, "BY": 5.0, "UG": 4.0, "RO": 3.0,
    "CO": 3.0, "HT": 3.0, "NG": 3.0, "GH": 2.5, "KG": 2.5, "MM": 2.0, "VN": 2.0, "BD": 2.0,
    "UZ": 1.5, "TH": 1.5, "NP": 1.0, "KZ": 1.0, "ET": 1.0, "LK": 1.0, "AF": 1.0, "MX": 1.0,
    "US": 1.0,
}
ORIGIN_TAIL = 12.0        # weight of all other countries together
ORIGIN_UNKNOWN = 4.0      # weight of "00", unknown country
ZIPF_EXPONENT = 1.1
ZIPF_OFFSET = 10

# CountryOfExploitation of Case Management records given citizenship: own country, one of the
# origin's corridors, or a general destination.
DOMESTIC = 0.50
CORRIDOR = 0.40           # to GENERAL_DESTINATIONS for origins without a corridor
CORRIDORS: Mapping[str, Mapping[str, float]] = {
    "UA": {"RU": 5, "PL": 2, "TR": 1, "CZ": 1, "IL": 1},
    "MD": {"RU": 4, "TR": 3, "AE": 1, "CY": 1},
    "PH": {"MY": 3, "SA": 2, "AE": 2, "KW": 1, "LB": 1},
    "ID": {"MY": 5, "SA": 2, "AE": 1},
    "KH": {"TH": 6, "MY": 2, "CN": 1},
    "BY": {"RU": 6, "PL": 1, "DE": 1},
    "UG": {"SA": 3, "KE": 2, "AE": 2},
    "RO": {"IT": 2, "GB": 2, "DE": 1, "ES": 1},
    "CO": {"MX": 2, "EC": 1, "ES": 1},
    "HT": {"DO": 5, "US": 1},
    "NG": {"IT": 3, "LY": 2, "GH": 1},
    "GH": {"NG": 1, "LB": 1, "KW": 1},
    "KG": {"RU": 4, "KZ": 3},
    "MM": {"TH": 5, "MY": 2, "CN": 1},
    "VN": {"CN": 3, "GB": 1, "RU": 1},
    "BD": {"IN": 3, "MY": 2, "AE": 1},
    "UZ": {"RU": 4, "KZ": 3},
    "NP": {"IN": 4, "MY": 2},
}
GENERAL_DESTINATIONS = {
    "RU": 3.0, "TH": 2.0, "MY": 2.0, "US": 2.0, "AE": 2.0, "SA": 2.0, "TR": 1.0, "PL": 1.0,
    "DE": 1.0, "IT": 1.0,
}

# Hotline records: exploited in the US almost always; citizenship mostly unknown ("00") or US.
HOTLINE_EXPLOITATION = {"US": 0.97, "MX": 0.01, "CA": 0.005}   # the rest over the general tail
HOTLINE_CITIZENSHIP = {
    "00": 0.60, "US": 0.22, "MX": 0.05, "PH": 0.01, "GT": 0.01, "HN": 0.01, "CN": 0.01,
    "SV": 0.005, "IN": 0.005, "TH": 0.005, "KR": 0.005,
}                                                             # the rest over the tail

# Share missing (NULL) by source: (CM, HL). CTDC's codebook notes IOM's country of exploitation
# has many missing values.
COUNTRY_MISSING = {"citizenship": (0.02, 0.01), "CountryOfExploitation": (0.30, 0.005)}

# Recruiter relationship. Known = recruiterRelationUnknown is 0. When unknown, Case Management
# writes 0 in the four relation flags and the hotline leaves them missing (as in the 2020 file).
RECRUITER_KNOWN = {"Case Management": 0.25, "Hotline": 0.35}
# The main relationship given known recruiter, by age and gender:
#   family, friend, intimate partner, other
RECRUITER: Mapping[tuple[str, str], tuple[float, float, float, float]] = {
    # children: family 41%, friend 11%, partner 14% (96% of them girls); family more often for
    # boys than girls (published 61% vs 46%; the ratio is kept, see the module docstring)
    ("child", "Female"): (0.37, 0.11, 0.22, 0.30),
    ("child", "Male"):   (0.49, 0.11, 0.01, 0.39),
    ("child", "other"):  (0.41, 0.11, 0.10, 0.38),
    # adults: family 9%, friend 8%, partner 15%
    ("adult", "Female"): (0.09, 0.08, 0.18, 0.65),
    ("adult", "Male"):   (0.09, 0.08, 0.06, 0.77),
    ("adult", "other"):  (0.09, 0.08, 0.12, 0.71),
}
RECRUITER_ALSO_OTHER = 0.04  # a family, friend or partner recruiter also has "other" set

# isSexualExploit. Children: 36% when family recruited, 84% when the recruiter is known and not
# family, 98% with an intimate partner; "unknown" (no recruiter information) is set so that 54% of
# all minors are. Intimate partner, children and adults together: 91%.
SEXUAL_CHILD = {"family": 0.36, "partner": 0.98, "friend or other": 0.80, "unknown": 0.50}
SEXUAL_ADULT_PARTNER = 0.89
SEXUAL_ADULT: Mapping[str, tuple[float, float]] = {
    #           CM    HL
    "Female": (0.45, 0.80),
    "Male":   (0.06, 0.25),
    "other":  (0.40, 0.70),
}
# isForcedLabour: children about a third. isSexAndLabour is set with both flags.
LABOUR_IF_SEXUAL = 0.04
LABOUR_IF_NOT_SEXUAL = {"child": 0.67, "adult": 0.85}
# Neither sexual nor labour: the other exploitation types (weights). Types a source does not
# record are missing for it; a drawn type that is not recorded becomes isOtherExploit, and the
# hotline (which records none of them, nor "other") writes all zeros.
OTHER_EXPLOIT = {"isOtherExploit": 0.45, "isForcedMarriage": 0.15, "isForcedMilitary": 0.03,
                 "isOrganRemoval": 0.01, "isSlaveryAndPractices": 0.08, None: 0.28}
CM_RECORDS_FROM_YEAR = {"isForcedMarriage": 2011, "isForcedMilitary": 2002, "isOrganRemoval": 2002,
                        "isSlaveryAndPractices": 2017}

# typeOfLabour* given isForcedLabour, by age and gender. Children: begging 19%, domestic work 18%
# and hospitality 8% of all child cases; boys beg and peddle more, girls do domestic work. Adults:
# construction and agriculture. NotSpecified is set when no sector is.
LABOUR_TYPES: Mapping[str, tuple[float, float, float, float]] = {
    #                               child:F     M  adult:F     M
    "typeOfLabourAgriculture":       (0.08, 0.14, 0.18, 0.32),
    "typeOfLabourAquafarming":       (0.02, 0.06, 0.02, 0.12),
    "typeOfLabourBegging":           (0.50, 0.72, 0.02, 0.04),
    "typeOfLabourConstruction":      (0.01, 0.08, 0.10, 0.35),
    "typeOfLabourDomesticWork":      (0.70, 0.28, 0.22, 0.05),
    "typeOfLabourHospitality":       (0.24, 0.22, 0.12, 0.07),
    "typeOfLabourIllicitActivities": (0.04, 0.08, 0.02, 0.04),
    "typeOfLabourManufacturing":     (0.04, 0.06, 0.12, 0.12),
    "typeOfLabourMiningOrDrilling":  (0.01, 0.05, 0.01, 0.06),
    "typeOfLabourPeddling":          (0.08, 0.20, 0.03, 0.03),
    "typeOfLabourTransportation":    (0.00, 0.01, 0.01, 0.03),
    "typeOfLabourOther":             (0.05, 0.05, 0.10, 0.10),
}
LABOUR_TYPES_ZERO_IF_NOT_LABOUR = 0.30   # otherwise the labour-type flags are missing

# typeOfSex* given isSexualExploit, recorded for a share of records by source; missing otherwise.
SEX_TYPES_RECORDED = {"Case Management": 0.60, "Hotline": 0.30}
SEX_TYPES: Mapping[str, tuple[float, float]] = {
    #                                      child  adult
    "typeOfSexProstitution":              (0.80, 0.90),
    "typeOfSexPornography":               (0.15, 0.06),
    "typeOfSexRemoteInteractiveServices": (0.04, 0.03),
    "typeOfSexPrivateSexualServices":     (0.05, 0.04),
}

# Means of control. A record has means-of-control information with the source's probability;
# Case Management then writes 0/1, the hotline writes 1 or leaves the flag missing, and without
# information the flags are missing with meansOfControlNotSpecified = 1 (as in the 2020 file).
MEANS_RECORDED = {"Case Management": 0.45, "Hotline": 0.80}
MEANS_CM_FROM_2015 = (  # missing in Case Management records before 2015
    "meansOfControlRestrictsFinancialAccess", "meansOfControlRestrictsMedicalCare",
    "meansOfControlUsesChildren", "meansOfControlThreatOfLawEnforcement",
    "meansOfControlWithholdsNecessities",
)
# Share of all records of the age group with the flag set, and how much more (or less) often it
# is set in sexual / labour / other exploitation (the lift keeps the age-group share). Minors use
# the child share, every other record the adult share.
MEANS: Mapping[str, tuple[float, float, float, float, float]] = {
    #                                       child  adult  sexual labour other
    "meansOfControlDebtBondage":             (0.05, 0.17, 0.8, 1.4, 0.8),  # adults 17%
    "meansOfControlTakesEarnings":           (0.12, 0.35, 0.8, 1.5, 0.8),  # adults 35%
    "meansOfControlRestrictsFinancialAccess": (0.04, 0.10, 1.0, 1.0, 1.0),
    "meansOfControlThreats":                 (0.15, 0.25, 1.0, 1.0, 1.0),
    "meansOfControlPsychologicalAbuse":      (0.24, 0.30, 1.0, 1.0, 1.0),  # children 24%
    "meansOfControlPhysicalAbuse":           (0.16, 0.18, 1.2, 0.9, 1.0),  # children 16%
    "meansOfControlSexualAbuse":             (0.10, 0.08, 2.0, 0.4, 0.6),  # children 10%
    "meansOfControlFalsePromises":           (0.20, 0.42, 0.9, 1.2, 1.0),  # adults 42%
    "meansOfControlPsychoactiveSubstances":  (0.09, 0.08, 2.0, 0.3, 0.5),  # children 9%
    "meansOfControlRestrictsMovement":       (0.20, 0.37, 1.0, 1.0, 1.0),  # adults 37%
    "meansOfControlRestrictsMedicalCare":    (0.03, 0.06, 1.0, 1.0, 1.0),
    "meansOfControlExcessiveWorkingHours":   (0.08, 0.20, 0.5, 2.0, 0.8),
    "meansOfControlUsesChildren":            (0.00, 0.02, 1.0, 1.0, 1.0),
    "meansOfControlThreatOfLawEnforcement":  (0.04, 0.11, 1.0, 1.0, 1.0),  # adults 11%
    "meansOfControlWithholdsNecessities":    (0.06, 0.10, 1.0, 1.0, 1.0),
    "meansOfControlWithholdsDocuments":      (0.03, 0.07, 0.5, 2.0, 0.8),  # adults 7%
    "meansOfControlOther":                   (0.08, 0.08, 1.0, 1.0, 1.0),
}

# isAbduction: Case Management records it for a share of records (0/1); the hotline writes 1 or
# leaves it missing.
ABDUCTION_RECORDED_CM = 0.60
ABDUCTION: Mapping[str, tuple[float, float]] = {
    #         child  adult
    "CM": (0.15, 0.06),
    "HL": (0.15, 0.10),
}

# fmt: on
# ==================================================================================================

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int16]
Mask = npt.NDArray[np.bool_]

_SOURCES = ("Case Management", "Hotline")
_MAJORITY = ("Minor", "Adult", "Unknown")
_GENDERS = ("Female", "Male", "Transgender/NonConforming")
_AGES = ("0--8", "9--17", "18--20", "21--23", "24--26", "27--29", "30--38", "39--47", "48+")
_EXPLOIT = ("isForcedLabour", "isSexualExploit", "isOtherExploit", "isSexAndLabour",
            "isForcedMarriage", "isForcedMilitary", "isOrganRemoval", "isSlaveryAndPractices")
_RECRUITER = ("recruiterRelationFamily", "recruiterRelationFriend",
              "recruiterRelationIntimatePartner", "recruiterRelationOther")

# Every stored column the generator writes, with its kind and (for categories) its codes.
_CATEGORY_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "Datasource": _SOURCES,
    "gender": _GENDERS,
    "ageBroad": _AGES,
    "majorityStatus": _MAJORITY,
    "majorityStatusAtExploit": _MAJORITY,
    "majorityEntry": _MAJORITY,
}
_COUNTRY_COLUMNS = ("citizenship", "CountryOfExploitation")
_FLAG_COLUMNS = (
    *MEANS, "meansOfControlNotSpecified", *_EXPLOIT, *LABOUR_TYPES, "typeOfLabourNotSpecified",
    *SEX_TYPES, "isAbduction", *_RECRUITER, "recruiterRelationUnknown",
)
_YEAR = "yearOfRegistration"


# Part of every data version: change it whenever the generator's parameters change, so stored
# releases made on the old records are never replayed as answers about the new ones.
GENERATOR = "gen-1"


def data_version(codebook: Codebook, *, rows: int, seed: int) -> str:
    """The data_version a generated file records, e.g. `synthetic:ctdc@7:gen-1:rows-200000:seed-0`.

    Written with `-` rather than `=` so that it is a valid name for the ledger.
    """
    return f"synthetic:{codebook.fingerprint_text}:{GENERATOR}:rows-{rows}:seed-{seed}"


def dataset_name(codebook: Codebook) -> str:
    """The dataset every generated file belongs to: made-up people, whatever the seed."""
    return f"synthetic-{codebook.name}"


def is_generated(path: str | Path, codebook: Codebook, *, rows: int, seed: int) -> bool:
    """Whether `path` is the file `generate` writes for these arguments and this codebook's
    content (a file made by an older build, or under an edited codebook, is not)."""
    if not Path(path).exists():
        return False
    version = data_version(codebook, rows=rows, seed=seed)
    return data_file.recorded(path) == {
        "data_version": version,
        "codebook": codebook.identity,
        "dataset": dataset_name(codebook),
        "load_id": version,
    }


def generate(
    database: str | Path,
    *,
    rows: int,
    seed: int = 0,
    codebook: Codebook | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Write `rows` synthetic records to a new DuckDB file; return its data_version.

    The file is written under a temporary name and moved into place when complete, so an
    interrupted run never leaves a half-filled file at `database`. Raises LoadError when the
    file exists and `overwrite` is false, CodebookError when `codebook` is not CTDC-shaped.
    """
    codebook = codebook or default_codebook()
    _check_arguments(rows, seed)
    world = _World(codebook)
    path = Path(database)
    data_file.check_free(path, overwrite=overwrite)
    partial = path.with_name(path.name + ".partial")
    version = data_version(codebook, rows=rows, seed=seed)
    connection = data_file.create(partial, codebook, overwrite=True)
    try:
        # DuckDB caches written blocks up to its memory limit (most of RAM by default); a small
        # limit keeps a 100M-row run at the footprint of a 1M-row one, at no cost in speed.
        for setting in generator_settings(MEMORY_LIMIT):
            connection.execute(setting)
        with tqdm(
            total=rows, unit="rows", unit_scale=True, file=sys.stderr, disable=not progress
        ) as bar:
            # The next chunk is drawn on a worker thread while DuckDB writes this one (both
            # release the GIL); rows are inserted in chunk order, so the content is fixed.
            for chunk in _prefetched(_chunks(world, rows=rows, seed=seed)):
                data_file.append(connection, chunk)
                bar.update(chunk.num_rows)
        data_file.finish(
            connection, codebook=codebook, data_version=version, dataset=dataset_name(codebook),
            load_id=version,  # the version fixes the records: every run writes the same ones
        )
    except BaseException:
        connection.close()
        partial.unlink(missing_ok=True)
        Path(f"{partial}.wal").unlink(missing_ok=True)
        raise
    # A write-ahead log left by the file being replaced must not be replayed into this one.
    Path(f"{path}.wal").unlink(missing_ok=True)
    os.replace(partial, path)
    return version


def generate_arrow(rows: int, seed: int = 0, codebook: Codebook | None = None) -> pa.Table:
    """The records `generate` would write, as one Arrow table (for tests and small sizes)."""
    codebook = codebook or default_codebook()
    _check_arguments(rows, seed)
    world = _World(codebook)
    chunks = list(_chunks(world, rows=rows, seed=seed))
    return pa.concat_tables(chunks) if chunks else world.to_arrow({}, 0)


def iter_chunks(rows: int, seed: int = 0, codebook: Codebook | None = None) -> Iterator[pa.Table]:
    """The records `generate` would write, chunk by chunk."""
    codebook = codebook or default_codebook()
    _check_arguments(rows, seed)
    return _chunks(_World(codebook), rows=rows, seed=seed)


def _check_arguments(rows: int, seed: int) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be a non-negative integer, not {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")


def _prefetched(chunks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """The same chunks, each drawn on a worker thread while the caller consumes the previous."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, chunks, None)
        while (chunk := pending.result()) is not None:
            pending = pool.submit(next, chunks, None)
            yield chunk


def _chunks(world: _World, *, rows: int, seed: int) -> Iterator[pa.Table]:
    root = np.random.SeedSequence(seed)
    for index, start in enumerate(range(0, rows, CHUNK_ROWS)):
        n = min(CHUNK_ROWS, rows - start)
        # Each chunk has its own child seed, so chunks could also be drawn in any order.
        rng = np.random.default_rng(np.random.SeedSequence(root.entropy, spawn_key=(index,)))
        yield world.to_arrow(_draw_records(world, rng, n), n)


# ---------------------------------------------------------------------------------------------
# Drawing from categorical distributions.


class _Choice:
    """Categorical distributions over the same outcomes, one per group, drawn by Walker's alias
    method: two lookups per row whatever the number of outcomes, vectorised over rows and groups.
    """

    def __init__(self, weights: Sequence[Sequence[float]] | FloatArray, values: Sequence[int]):
        table = np.asarray(weights, dtype=np.float64)
        if table.ndim == 1:
            table = table[np.newaxis, :]
        groups, k = table.shape
        if k != len(values) or (table < 0).any() or (table.sum(axis=1) <= 0).any():
            raise ValueError("each group needs non-negative weights with a positive sum")
        self.size = k
        self.values = np.asarray(values, dtype=np.int32)
        self.accept = np.ones((groups, k))
        self.alias = np.tile(np.arange(k, dtype=np.intp), (groups, 1))
        for g in range(groups):
            scaled = table[g] * (k / table[g].sum())
            small = [i for i in range(k) if scaled[i] < 1.0]
            large = [i for i in range(k) if scaled[i] >= 1.0]
            while small and large:
                few, many = small.pop(), large.pop()
                self.accept[g, few] = scaled[few]
                self.alias[g, few] = many
                scaled[many] -= 1.0 - scaled[few]
                (small if scaled[many] < 1.0 else large).append(many)
            # Whatever is left has weight 1 up to rounding: always accepted.

    def draw(
        self, rng: np.random.Generator, n: int, group: npt.NDArray[np.intp] | None = None
    ) -> npt.NDArray[np.int32]:
        spread = rng.random(n) * self.size
        slot = np.minimum(spread.astype(np.intp), self.size - 1)
        row: npt.NDArray[np.intp] | int = 0 if group is None else group
        keep = (spread - slot) < self.accept[row, slot]
        drawn: npt.NDArray[np.int32] = self.values[np.where(keep, slot, self.alias[row, slot])]
        return drawn


def _choice(
    tables: Sequence[Mapping[Any, float]], codes: Sequence[Any]
) -> _Choice:
    """One distribution per table over `codes` plus missing (a `None` key), as internal indices
    (-1 for missing)."""
    outcomes = [*codes, None]
    weights = [[float(table.get(code, 0.0)) for code in outcomes] for table in tables]
    return _Choice(weights, [*range(len(codes)), -1])


def _chance(rng: np.random.Generator, p: float | FloatArray, n: int) -> Mask:
    """One Bernoulli draw per row with probability `p` (a scalar or one per row)."""
    threshold = np.float32(p) if isinstance(p, float) else np.asarray(p, dtype=np.float32)
    return rng.random(n, dtype=np.float32) < threshold


def _flag(present: Mask, known: Mask) -> npt.NDArray[np.int8]:
    """0/1 where known, -1 (missing) elsewhere."""
    out = present.astype(np.int8)
    out[~known] = -1
    return out


# ---------------------------------------------------------------------------------------------
# The codebook side: code indices, the fixed distributions, Arrow conversion.


class _World:
    """Everything fixed by the codebook and the parameters, computed once per run."""

    def __init__(self, codebook: Codebook) -> None:
        self.codebook = codebook
        produced: dict[str, Kind] = {_YEAR: Kind.INTEGER}
        produced.update({name: Kind.CATEGORY for name in _CATEGORY_COLUMNS})
        produced.update({name: Kind.COUNTRY for name in _COUNTRY_COLUMNS})
        produced.update({name: Kind.FLAG for name in _FLAG_COLUMNS})
        stored = codebook.stored_variables
        for variable in stored:
            if produced.get(variable.name) is not variable.kind:
                raise CodebookError(
                    f"the synthetic generator writes CTDC records; codebook "
                    f"{codebook.fingerprint_text} has {variable.kind.value} variable "
                    f"{variable.name!r}, which it does not produce"
                )
        self.variables: tuple[Variable, ...] = stored
        names = {v.name for v in stored}
        missing = [name for name in produced if name not in names]
        if missing:
            raise CodebookError(
                f"codebook {codebook.fingerprint_text} lacks variables the synthetic generator "
                f"needs: {', '.join(missing)}"
            )
        year = codebook.variable(_YEAR)
        assert year.low is not None and year.high is not None
        years = [y for y in YEAR_WEIGHTS if year.low <= y <= year.high]
        if not years:
            raise CodebookError(f"{_YEAR}: no generated year lies in the codebook's range")
        self.year = _Choice([[YEAR_WEIGHTS[y][s] for y in years] for s in range(2)], years)
        # Internal category index -> the codebook's code index.
        self.category_lookup: dict[str, IntArray] = {}
        for name, internal in _CATEGORY_COLUMNS.items():
            variable = codebook.variable(name)
            try:
                self.category_lookup[name] = np.array(
                    [variable.code_index[code] for code in internal], np.int16
                )
            except KeyError as exc:
                raise CodebookError(f"{name}: codebook lacks code {exc.args[0]!r}") from None
        self.source = _choice([DATASOURCE], _SOURCES)
        self.majority = _choice([MAJORITY], _MAJORITY)
        self.age = _choice([AGE_GIVEN_MAJORITY["Minor"], AGE_GIVEN_MAJORITY["Adult"], {None: 1}],
                           _AGES)
        self.gender = _choice([GENDER_GIVEN_MAJORITY[m] for m in ("Minor", "Adult", "other")],
                              _GENDERS)
        self.later = _choice(
            [MAJORITY_LATER_GIVEN_MAJORITY[m] for m in ("Minor", "Adult", "other")], _MAJORITY
        )
        self.relation = _Choice(
            [RECRUITER[(a, g)] for a in ("child", "adult") for g in ("Female", "Male", "other")],
            range(4),
        )
        self.other_exploit = _choice([OTHER_EXPLOIT], [k for k in OTHER_EXPLOIT if k])
        self.countries = codebook.variable("citizenship")
        exploitation = codebook.variable("CountryOfExploitation")
        if exploitation.codes != self.countries.codes or not self.countries.unknown_code:
            raise CodebookError("citizenship and CountryOfExploitation need one country domain")
        self._build_countries()
        self.dictionaries = {
            v.name: pa.array([str(c) for c in v.codes], pa.string())
            for v in stored
            if v.kind in (Kind.CATEGORY, Kind.COUNTRY)
        }

    def _country(self, code: str) -> int:
        try:
            return int(self.countries.code_index[code])
        except KeyError:
            raise CodebookError(f"country {code!r} is not in the codebook's domain") from None

    def _weights(self, table: Mapping[str, float], tail_mass: float) -> FloatArray:
        """Named country weights plus `tail_mass` spread Zipf-like over every other country."""
        weights = np.zeros(self.n_countries)
        for code, weight in table.items():
            weights[self._country(code)] += weight
        unknown = self._country(str(self.countries.unknown_code))
        tail = [i for i in self._tail_order if weights[i] == 0 and i != unknown]
        zipf = 1.0 / (np.arange(1, len(tail) + 1) + ZIPF_OFFSET) ** ZIPF_EXPONENT
        weights[tail] += tail_mass * zipf / zipf.sum()
        normalised: FloatArray = weights / weights.sum()
        return normalised

    def _build_countries(self) -> None:
        codes = self.countries.codes
        n = self.n_countries = len(codes)
        # A fixed, seed-independent ranking of the long tail (so the tail is not alphabetical).
        self._tail_order = sorted(range(n), key=lambda i: zlib.crc32(str(codes[i]).encode()))
        unknown = self._country(str(self.countries.unknown_code))
        origin = self._weights(
            {**ORIGIN_WEIGHTS, str(self.countries.unknown_code): ORIGIN_UNKNOWN}, ORIGIN_TAIL
        )
        general = self._weights(GENERAL_DESTINATIONS, 0.1 * sum(GENERAL_DESTINATIONS.values()))
        # Case Management: joint (citizenship, country of exploitation).
        joint = np.zeros((n, n))
        for i in np.flatnonzero(origin):
            if i == unknown:
                destination = 0.5 * origin + 0.5 * general
                destination[unknown] = 0.0
            else:
                destination = (1 - DOMESTIC - CORRIDOR) * general
                destination[i] += DOMESTIC
                corridor = CORRIDORS.get(str(codes[i]))
                if corridor:
                    weights = np.zeros(n)
                    for code, weight in corridor.items():
                        weights[self._country(code)] = weight
                    destination += CORRIDOR * weights / weights.sum()
                else:
                    destination += CORRIDOR * general
            joint[i] = origin[i] * destination / destination.sum()
        # Hotline: citizenship and country of exploitation independent.
        citizenship = self._weights(HOTLINE_CITIZENSHIP, 1.0 - sum(HOTLINE_CITIZENSHIP.values()))
        place = self._weights(HOTLINE_EXPLOITATION, 1.0 - sum(HOTLINE_EXPLOITATION.values()))
        pairs = np.stack([joint.ravel(), np.outer(citizenship, place).ravel()])
        self.country_pair = _Choice(pairs, range(n * n))

    def to_arrow(self, columns: Mapping[str, npt.NDArray[Any]], rows: int) -> pa.Table:
        """One chunk as the records table's columns: code indices (-1 missing) for categories
        and countries, flags 0/1 (-1 missing), years."""
        arrays = []
        for variable in self.variables:
            values = columns[variable.name] if rows else np.zeros(0, np.int16)
            missing = values < 0
            mask = missing if missing.any() else None
            if variable.kind in (Kind.CATEGORY, Kind.COUNTRY):
                indices = pa.array(np.where(missing, 0, values).astype(np.int16), mask=mask)
                arrays.append(
                    pa.DictionaryArray.from_arrays(indices, self.dictionaries[variable.name])
                )
            elif variable.kind is Kind.FLAG:
                arrays.append(pa.array(np.where(missing, 0, values).astype(np.uint8), mask=mask))
            else:
                arrays.append(pa.array(values.astype(np.int16), mask=mask))
        return pa.Table.from_arrays(arrays, names=[v.name for v in self.variables])


# ---------------------------------------------------------------------------------------------
# Drawing one chunk. Internal category indices follow the tuples above (_SOURCES, _MAJORITY,
# _GENDERS, _AGES); -1 is missing.


def _draw_records(world: _World, rng: np.random.Generator, n: int) -> dict[str, npt.NDArray[Any]]:
    out: dict[str, npt.NDArray[Any]] = {}
    source = world.source.draw(rng, n).astype(np.intp)  # 0 Case Management, 1 Hotline
    hotline = source == 1
    cm = ~hotline

    def by_source(table: Mapping[str, float]) -> FloatArray:
        return np.array([table["Case Management"], table["Hotline"]])[source]

    year = world.year.draw(rng, n, source)
    out[_YEAR] = year

    # Countries: one joint draw of (citizenship, country of exploitation) per source.
    citizenship, exploited = np.divmod(world.country_pair.draw(rng, n, source), world.n_countries)
    for name, values in (("citizenship", citizenship), ("CountryOfExploitation", exploited)):
        missing = _chance(rng, np.array(COUNTRY_MISSING[name])[source], n)
        out[name] = np.where(missing, -1, values).astype(np.int16)

    # Age and gender. Groups: 0 minor, 1 adult, 2 unknown or missing majority.
    majority = world.majority.draw(rng, n)
    child = majority == 0
    majority_group = np.array([2, 0, 1, 2], np.intp)[majority + 1]
    out["majorityStatus"] = majority
    out["ageBroad"] = world.age.draw(rng, n, majority_group)
    gender = out["gender"] = world.gender.draw(rng, n, majority_group)
    for name, shares in (
        ("majorityStatusAtExploit", MAJORITY_AT_EXPLOIT_RECORDED),
        ("majorityEntry", MAJORITY_ENTRY_RECORDED),
    ):
        value = world.later.draw(rng, n, majority_group)
        value[~_chance(rng, by_source(shares), n)] = -1
        out[name] = value
    out["Datasource"] = source.astype(np.int16)
    gender_group = np.array([2, 0, 1, 2], np.intp)[gender + 1]  # Female, Male, other
    age_gender = np.where(child, 0, 3) + gender_group  # child F/M/other, adult F/M/other

    # Recruiter relationship.
    known = _chance(rng, by_source(RECRUITER_KNOWN), n)
    relation = np.where(known, world.relation.draw(rng, n, age_gender), -1)
    family, friend, partner, other = (relation == r for r in range(4))
    other |= known & ~other & _chance(rng, RECRUITER_ALSO_OTHER, n)
    relation_known = known | cm  # the hotline leaves the relation flags missing when unknown
    for name, present in zip(_RECRUITER, (family, friend, partner, other), strict=True):
        out[name] = _flag(present, relation_known)
    out["recruiterRelationUnknown"] = (~known).astype(np.int8)

    # Exploitation type. isSexualExploit's probability by recruiter (children) or by gender and
    # source (adults), the intimate partner overriding.
    child_sexual = np.array([SEXUAL_CHILD["unknown"], SEXUAL_CHILD["family"],
                             SEXUAL_CHILD["friend or other"], SEXUAL_CHILD["partner"],
                             SEXUAL_CHILD["friend or other"]])[relation + 1]
    adult_sexual = np.array([SEXUAL_ADULT[g] for g in ("Female", "Male", "other")])[
        gender_group, source
    ]
    adult_sexual[partner] = SEXUAL_ADULT_PARTNER
    sexual = _chance(rng, np.where(child, child_sexual, adult_sexual), n)
    not_sexual = np.where(child, LABOUR_IF_NOT_SEXUAL["child"], LABOUR_IF_NOT_SEXUAL["adult"])
    labour = _chance(rng, np.where(sexual, LABOUR_IF_SEXUAL, not_sexual), n)
    neither = ~sexual & ~labour
    other_type = world.other_exploit.draw(rng, n)
    other_names = [k for k in OTHER_EXPLOIT if k]
    other_exploit = neither & cm & (other_type == other_names.index("isOtherExploit"))
    for name, from_year in CM_RECORDS_FROM_YEAR.items():
        recorded = cm & (year >= from_year)
        drawn = neither & (other_type == other_names.index(name))
        out[name] = _flag(drawn & recorded, recorded)
        # A type this record's source does not record is written as "other" (CM only).
        other_exploit |= drawn & cm & ~recorded
    out["isForcedLabour"] = labour.astype(np.int8)
    out["isSexualExploit"] = sexual.astype(np.int8)
    out["isOtherExploit"] = other_exploit.astype(np.int8)
    out["isSexAndLabour"] = (sexual & labour).astype(np.int8)

    # Labour sectors, only with forced labour. Transgender or missing gender: mean of F and M.
    sector_known = labour | (~labour & _chance(rng, LABOUR_TYPES_ZERO_IF_NOT_LABOUR, n))
    any_sector = np.zeros(n, np.bool_)
    for name, (cf, cmale, af, am) in LABOUR_TYPES.items():
        p = np.array([cf, cmale, (cf + cmale) / 2, af, am, (af + am) / 2])[age_gender]
        present = labour & _chance(rng, p, n)
        any_sector |= present
        out[name] = _flag(present, sector_known)
    out["typeOfLabourNotSpecified"] = _flag(labour & ~any_sector, sector_known)

    # Sexual exploitation types, only with sexual exploitation.
    sex_known = sexual & _chance(rng, by_source(SEX_TYPES_RECORDED), n)
    for name, by_age in SEX_TYPES.items():
        present = _chance(rng, np.array(by_age)[np.where(child, 0, 1)], n)
        out[name] = _flag(present & sex_known, sex_known)

    # Means of control. p = share x lift / (mean of lift over the age group's rows, 0 where not
    # recorded), so each age group's share holds whatever its exploitation mix and the lifts
    # set the correlations. Groups: majorityStatus (missing last) x class (sexual, labour, other).
    informed = _chance(rng, by_source(MEANS_RECORDED), n)
    early_cm = informed & cm & (year < 2015)
    cell = np.where(majority < 0, 3, majority) * 3 + np.where(sexual, 0, np.where(labour, 1, 2))
    group_rows = np.maximum(np.bincount(cell // 3, minlength=4), 1).astype(np.float64)
    per_cell = {
        False: np.bincount(cell[informed], minlength=12).reshape(4, 3),
        True: np.bincount(cell[informed & ~early_cm], minlength=12).reshape(4, 3),
    }
    any_means = np.zeros(n, np.bool_)
    for name, (child_share, adult_share, *lifts) in MEANS.items():
        recent = name in MEANS_CM_FROM_2015
        available = informed & ~early_cm if recent else informed
        lift = np.asarray(lifts)
        mean_lift = per_cell[recent] @ lift / group_rows
        share = np.array([child_share, adult_share, adult_share, adult_share])
        p_cell = np.minimum(
            share[:, None] * lift[None, :] / np.maximum(mean_lift, 1e-12)[:, None], 1.0
        ).ravel()
        present = available & _chance(rng, p_cell[cell], n)
        any_means |= present
        # Case Management writes 0/1; the hotline writes only the 1s.
        out[name] = _flag(present, available & (cm | present))
    out["meansOfControlNotSpecified"] = (~any_means).astype(np.int8)

    # Abduction.
    abduction = np.array([ABDUCTION["CM"], ABDUCTION["HL"]])[source, np.where(child, 0, 1)]
    abducted = _chance(rng, abduction, n)
    abduction_known = np.where(hotline, abducted, _chance(rng, ABDUCTION_RECORDED_CM, n))
    out["isAbduction"] = _flag(abducted, abduction_known)

    # Categories: internal indices to the codebook's code indices.
    for name, lookup in world.category_lookup.items():
        values = out[name]
        out[name] = np.where(values < 0, -1, lookup[np.maximum(values, 0)]).astype(np.int16)
    return out
