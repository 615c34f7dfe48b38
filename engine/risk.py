"""Disclosure-risk report on a record-level file: k-anonymity, sample uniques, l-diversity, drivers.

`veil risk DATA` answers the custodian's question before anything is published: for a chosen set
of quasi-identifiers (variables an intruder may know about a person from elsewhere), how many
records share their combination with fewer than k - 1 others, how many are alone, and which
variables drive that. DATA is a veil data file, or a CSV or Parquet file about to be published
(a k-anonymised extract, say), loaded leniently into a temporary data file first.

    report = assess_data_file("ctdc.duckdb", codebook=ctdc, sensitive=("isSexualExploit",), k=10)
    print(report.render())

Definitions, as used throughout:

- An equivalence class is the set of records sharing one combination of the quasi-identifiers.
  A missing value is a value of its own: blanks are what a k-anonymised extract suppresses to,
  and an intruder sees them just as they see any other value.
- The k-anonymity level is the size of the smallest class. Records at risk are the records in
  classes smaller than k; sample uniques are the records alone in their class.
- Distinct l-diversity of a sensitive variable is the fewest distinct values (missing counted as
  one) in any class. A homogeneous class (one value) discloses that value for every member, even
  when the class is k-anonymous.
- Drivers: the same statistics with each quasi-identifier left out, and each pair; the
  combination whose removal lowers the records at risk the most is named.

Why not a library: pyCANON (the maintained Python library for these checks) groups a pandas
DataFrame in memory, iterates over the classes in Python for l-diversity, and drops rows with a
missing quasi-identifier from every class (pandas' default), which hides exactly the records a
k-anonymised extract has blanked. On 10 million records the data alone is several GB as a
DataFrame. Here every statistic is one DuckDB aggregate over the typed file (the 22 subsets of
the drivers in one GROUPING SETS scan): about 10 s and 0.6 GB for 10 million records on two
cores. tests/unit/test_risk.py checks the numbers against pyCANON when it is installed.

The report shows counts and shares only, never a class's values or a row.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import itertools
import math
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.backend import DuckDBBackend
from engine.codebook import Codebook
from engine.data_file import RESTRICTED_NOTICE
from engine.errors import VeilError
from engine.loader import load
from engine.loss import Accounting, epsilon_equivalent
from engine.sql import risk_diversity, risk_profile, risk_sizes, risk_subsets

MAX_QIS = 12  # GROUPING() in DuckDB and the pair drivers stay small well below this

# Class sizes are shown in these bands (lower bounds).
_SIZE_BANDS = (1, 2, 3, 5, 10, 20, 50, 100)


class RiskError(VeilError):
    """The risk report cannot be computed: an unknown variable, an unreadable file."""


# ---- the privacy bound an attacker faces ---------------------------------------------------------


def binary_guess_bound(accounting: Accounting, amount: float) -> float:
    """The highest chance of guessing one person's binary secret (prior 1/2) after `amount`.

    Under epsilon-DP: e^eps / (1 + e^eps). Under rho-zCDP the release is (eps(delta), delta)-DP
    for every delta, with eps(delta) = rho + 2 sqrt(rho ln(1/delta)), and an (eps, delta)-DP
    release bounds the chance by (e^eps + delta) / (1 + e^eps); the bound is the least of these
    over delta (a grid from 1e-12 to 0.3, each point of which is a valid bound).
    """
    if amount <= 0:
        return 0.5
    if accounting is Accounting.PURE_DP:
        return _logistic(amount)
    best = 1.0
    for exponent in range(-120, -5):  # delta = 10^-12 ... 10^-0.6
        delta = 10 ** (exponent / 10)
        epsilon = epsilon_equivalent(Accounting.ZCDP, amount, delta)
        # (e^eps + delta) / (1 + e^eps), written to stay finite for large eps
        best = min(best, (1.0 + delta * math.exp(-epsilon)) / (1.0 + math.exp(-epsilon)))
    return best


def _logistic(x: float) -> float:
    """e^x / (1 + e^x), without overflow."""
    return 1.0 / (1.0 + math.exp(-x))


# ---- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassStats:
    """Equivalence-class statistics for one set of quasi-identifiers."""

    qis: tuple[str, ...]
    dropped: tuple[str, ...]
    rows: int
    classes: int
    k_anonymity: int  # size of the smallest class; 0 when there are no records
    small_classes: int  # classes smaller than k
    records_at_risk: int  # records in classes smaller than k
    sample_uniques: int  # records alone in their class

    @property
    def share_at_risk(self) -> float:
        return self.records_at_risk / self.rows if self.rows else 0.0

    @property
    def share_uniques(self) -> float:
        return self.sample_uniques / self.rows if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["qis"], out["dropped"] = list(self.qis), list(self.dropped)
        out["share_at_risk"] = self.share_at_risk
        out["share_uniques"] = self.share_uniques
        return out


@dataclass(frozen=True)
class Diversity:
    """Distinct l-diversity of one sensitive variable over the classes of the full QI set."""

    variable: str
    l_diversity: int
    homogeneous_classes: int
    records_in_homogeneous: int
    records_in_homogeneous_k_anonymous: int  # in homogeneous classes of at least k records
    values_disclosed: tuple[str, ...] = ()  # the values those classes share, as text


@dataclass(frozen=True)
class VariableProfile:
    name: str
    distinct: int  # non-missing values present
    missing: int  # missing cells


@dataclass(frozen=True)
class RiskReport:
    source: str
    rows: int
    k: int
    qis: tuple[str, ...]
    sensitive: tuple[str, ...]
    full: ClassStats
    class_sizes: tuple[tuple[int, int], ...]  # (class size, number of classes), ascending
    diversity: tuple[Diversity, ...]
    drop_one: tuple[ClassStats, ...]
    drop_two: tuple[ClassStats, ...]
    profile: tuple[VariableProfile, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def k_anonymous(self) -> bool:
        return self.rows == 0 or self.full.k_anonymity >= self.k

    def best(self, candidates: Sequence[ClassStats]) -> ClassStats | None:
        """The candidate with the fewest records at risk (then fewest uniques)."""
        if not candidates:
            return None
        return min(candidates, key=lambda c: (c.records_at_risk, c.sample_uniques, c.dropped))

    @property
    def best_single(self) -> ClassStats | None:
        return self.best(self.drop_one)

    @property
    def best_pair(self) -> ClassStats | None:
        return self.best(self.drop_two)

    def size_bands(self) -> list[tuple[str, int, int]]:
        """(band, classes, records) for the class-size bands 1, 2, 3-4, 5-9, ..., 100+."""
        bands = []
        for i, low in enumerate(_SIZE_BANDS):
            high = _SIZE_BANDS[i + 1] - 1 if i + 1 < len(_SIZE_BANDS) else None
            inside = [
                (n, c) for n, c in self.class_sizes if n >= low and (high is None or n <= high)
            ]
            label = f"{low}+" if high is None else (str(low) if low == high else f"{low}-{high}")
            bands.append((label, sum(c for _, c in inside), sum(n * c for n, c in inside)))
        return bands

    # -- output --

    def to_dict(self) -> dict[str, Any]:
        return {
            "restricted": RESTRICTED_NOTICE,
            "source": self.source,
            "rows": self.rows,
            "k": self.k,
            "quasi_identifiers": list(self.qis),
            "sensitive": list(self.sensitive),
            "k_anonymous": self.k_anonymous,
            "full": self.full.to_dict(),
            "class_sizes": [{"size": n, "classes": c} for n, c in self.class_sizes],
            "l_diversity": [asdict(d) for d in self.diversity],
            "drop_one": [c.to_dict() for c in self.drop_one],
            "drop_two": [c.to_dict() for c in self.drop_two],
            "best_single": None if self.best_single is None else self.best_single.to_dict(),
            "best_pair": None if self.best_pair is None else self.best_pair.to_dict(),
            "profile": [asdict(p) for p in self.profile],
            "notes": list(self.notes),
        }

    def to_csv(self) -> str:
        """One row per quasi-identifier set evaluated: the full set, then each drop."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [
                "quasi_identifiers",
                "dropped",
                "rows",
                "classes",
                "k_anonymity",
                "small_classes",
                "records_at_risk",
                "share_at_risk",
                "sample_uniques",
                "share_uniques",
            ]
        )
        for stats in (self.full, *self.drop_one, *self.drop_two):
            writer.writerow(
                [
                    "+".join(stats.qis),
                    "+".join(stats.dropped),
                    stats.rows,
                    stats.classes,
                    stats.k_anonymity,
                    stats.small_classes,
                    stats.records_at_risk,
                    f"{stats.share_at_risk:.6f}",
                    stats.sample_uniques,
                    f"{stats.share_uniques:.6f}",
                ]
            )
        return out.getvalue()

    def render(self) -> str:
        """A plain-text report for the custodian."""
        full = self.full
        lines = [
            RESTRICTED_NOTICE,
            f"Disclosure risk of {self.source}",
            f"  records              {self.rows:,}",
            f"  quasi-identifiers    {', '.join(self.qis)}",
            f"  minimum class size   k = {self.k}",
            "",
        ]
        if self.k_anonymous:
            lines.append(f"VERDICT: {self.k}-anonymous on these quasi-identifiers.")
        else:
            lines.append(
                f"VERDICT: NOT {self.k}-anonymous: {full.records_at_risk:,} records "
                f"({_pct(full.share_at_risk)}) are in {full.small_classes:,} classes smaller than "
                f"{self.k}; {full.sample_uniques:,} ({_pct(full.share_uniques)}) are unique."
            )
        for d in self.diversity:
            if d.records_in_homogeneous_k_anonymous:
                lines.append(
                    f"WARNING: {d.records_in_homogeneous_k_anonymous:,} records are in classes of "
                    f"at least {self.k} whose members all share one value of {d.variable} "
                    f"({_values(d.values_disclosed)}): knowing a person's class discloses it."
                )
        lines += [
            "",
            f"  equivalence classes  {full.classes:,}",
            f"  k-anonymity level    {full.k_anonymity}  (smallest class)",
            f"  records at risk      {full.records_at_risk:,}  ({_pct(full.share_at_risk)})",
            f"  sample uniques       {full.sample_uniques:,}  ({_pct(full.share_uniques)})",
            "",
            "Class sizes:",
            f"  {'size':<8} {'classes':>12} {'records':>14} {'share':>8}",
        ]
        for label, classes, records in self.size_bands():
            share = records / self.rows if self.rows else 0.0
            lines.append(f"  {label:<8} {classes:>12,} {records:>14,} {_pct(share):>8}")
        if self.diversity:
            lines += [
                "",
                "l-diversity of sensitive variables (over the classes above):",
                f"  {'variable':<28} {'l':>3} {'homogeneous classes':>20} "
                f"{'records':>10} {'of which in classes >= k':>26}",
            ]
            for d in self.diversity:
                lines.append(
                    f"  {d.variable:<28} {d.l_diversity:>3} {d.homogeneous_classes:>20,} "
                    f"{d.records_in_homogeneous:>10,} {d.records_in_homogeneous_k_anonymous:>26,}"
                )
        if self.drop_one:
            lines += ["", "Drivers: records at risk with quasi-identifiers left out:"]
            lines.append(_driver_header())
            ranked = sorted(self.drop_one, key=lambda c: c.records_at_risk)
            lines.extend(_driver_row(c) for c in ranked)
        if self.drop_two:
            lines += ["", "  pairs left out (the five that lower the risk most):"]
            lines.append(_driver_header())
            ranked = sorted(self.drop_two, key=lambda c: c.records_at_risk)[:5]
            lines.extend(_driver_row(c) for c in ranked)
        single, pair = self.best_single, self.best_pair
        if single is not None and full.records_at_risk:
            lines += [
                "",
                f"Leaving out {single.dropped[0]} lowers the records at risk most among single "
                f"variables: {full.records_at_risk:,} -> {single.records_at_risk:,} "
                f"({_pct(single.share_at_risk)}).",
            ]
            if pair is not None:
                lines.append(
                    f"Leaving out {' and '.join(pair.dropped)} lowers it most among pairs: "
                    f"-> {pair.records_at_risk:,} ({_pct(pair.share_at_risk)})."
                )
        lines += ["", "Quasi-identifier and sensitive variable profile:"]
        lines.append(f"  {'variable':<28} {'distinct values':>16} {'missing':>12}")
        for p in self.profile:
            share = p.missing / self.rows if self.rows else 0.0
            lines.append(
                f"  {p.name:<28} {p.distinct:>16,} {p.missing:>12,} ({_pct(share)})"
            )
        if self.notes:
            lines += ["", "Notes:"]
            lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines) + "\n"


def _pct(share: float) -> str:
    return f"{100 * share:.2f}%"


def _driver_header() -> str:
    return (
        f"  {'left out':<44} {'k':>5} {'records at risk':>16} {'share':>8} {'uniques':>9}"
    )


def _driver_row(stats: ClassStats) -> str:
    return (
        f"  {' + '.join(stats.dropped):<44} {stats.k_anonymity:>5} "
        f"{stats.records_at_risk:>16,} {_pct(stats.share_at_risk):>8} {stats.sample_uniques:>9,}"
    )


# ---- computing it --------------------------------------------------------------------------------


def _check_variables(codebook: Codebook, names: Sequence[str], what: str) -> tuple[str, ...]:
    stored = {v.name: v for v in codebook.stored_variables}
    out: list[str] = []
    for name in names:
        if name not in stored:
            if name in {v.name for v in codebook.variables}:
                known = "a stored variable (concatenated label columns are derived from flags)"
                hint = ""
            else:
                known, hint = "a stored codebook variable", _closest(name, stored)
            raise RiskError(
                f"{what} {name!r} is not {known} of {codebook.fingerprint_text}{hint}"
            )
        if name in out:
            raise RiskError(f"{what} {name!r} is listed twice")
        out.append(name)
    return tuple(out)


def _closest(name: str, names: Iterable[str]) -> str:
    """"; did you mean X?" naming the closest of `names` to `name`, case folded (as a custodian
    types names from the codebook's prose), or "" when none is close."""
    by_folded = {known.lower(): known for known in names}
    close = difflib.get_close_matches(name.lower(), list(by_folded), n=3)
    return f"; did you mean {', '.join(by_folded[c] for c in close)}?" if close else ""


def assess(
    backend: DuckDBBackend,
    *,
    codebook: Codebook,
    qis: Sequence[str] | None = None,
    sensitive: Sequence[str] = (),
    k: int = 10,
    source: str = "",
    notes: Sequence[str] = (),
) -> RiskReport:
    """The risk report of the records table behind `backend`; `qis` left out: the codebook's
    (`Codebook.quasi_identifiers`)."""
    qi_names = _check_variables(
        codebook, codebook.quasi_identifiers if qis is None else qis, "quasi-identifier"
    )
    sensitive_names = _check_variables(codebook, sensitive, "sensitive variable")
    if not qi_names:
        raise RiskError(
            "give at least one quasi-identifier"
            + (f" ({codebook.fingerprint_text} names none to assess by default)" if qis is None
               else "")
        )
    if len(qi_names) > MAX_QIS:
        raise RiskError(f"at most {MAX_QIS} quasi-identifiers, got {len(qi_names)}")
    if overlap := set(qi_names) & set(sensitive_names):
        raise RiskError(f"{', '.join(sorted(overlap))}: a variable is either QI or sensitive")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise RiskError(f"k must be an integer of at least 2, got {k!r}")

    profile_names = qi_names + sensitive_names
    raw = backend.run(risk_profile(profile_names))
    rows = int(raw["rows"][0])
    profile = tuple(
        VariableProfile(name, int(raw[f"v{j}"][0]), int(raw[f"m{j}"][0]))
        for j, name in enumerate(profile_names)
    )

    # With records of people (the codebook's id column), a class is as large as its people: ten
    # records of one person are one person, and unique.
    person = codebook.privacy_unit.id_column
    if person is not None:
        notes = (
            *notes,
            f"classes are counted in people ({person}, the codebook's privacy unit), not records",
        )
    sizes_raw = backend.run(risk_sizes(qi_names, person))
    class_sizes = tuple(
        (int(n), int(c)) for n, c in zip(sizes_raw["n"], sizes_raw["classes"], strict=True)
    )

    subsets: list[tuple[str, ...]] = [qi_names]
    drops: list[tuple[str, ...]] = [()]
    if len(qi_names) >= 2:
        for name in qi_names:
            drops.append((name,))
            subsets.append(tuple(q for q in qi_names if q != name))
    if len(qi_names) >= 3:
        for pair in itertools.combinations(qi_names, 2):
            drops.append(pair)
            subsets.append(tuple(q for q in qi_names if q not in pair))
    stats = _subset_stats(backend, qi_names, tuple(subsets), tuple(drops), k, rows, person)
    full = stats[()]

    diversity: tuple[Diversity, ...] = ()
    if sensitive_names and rows:
        d = backend.run(risk_diversity(qi_names, sensitive_names, k, person))
        diversity = tuple(
            Diversity(
                variable=name,
                l_diversity=int(d[f"l{j}"][0]),
                homogeneous_classes=int(d[f"h{j}"][0]),
                records_in_homogeneous=int(d[f"r{j}"][0]),
                records_in_homogeneous_k_anonymous=int(d[f"rk{j}"][0]),
                values_disclosed=tuple(str(v) for v in (d[f"kv{j}"][0] or ())),
            )
            for j, name in enumerate(sensitive_names)
        )
    return RiskReport(
        source=source or str(backend.path),
        rows=rows,
        k=k,
        qis=qi_names,
        sensitive=sensitive_names,
        full=full,
        class_sizes=class_sizes,
        diversity=diversity,
        drop_one=tuple(stats[d] for d in drops if len(d) == 1),
        drop_two=tuple(stats[d] for d in drops if len(d) == 2),
        profile=profile,
        notes=tuple(notes),
    )


def _subset_stats(
    backend: DuckDBBackend,
    qis: tuple[str, ...],
    subsets: tuple[tuple[str, ...], ...],
    drops: tuple[tuple[str, ...], ...],
    k: int,
    rows: int,
    person: str | None = None,
) -> dict[tuple[str, ...], ClassStats]:
    if rows == 0:
        return {d: ClassStats(s, d, 0, 0, 0, 0, 0, 0) for s, d in zip(subsets, drops, strict=True)}
    raw = backend.run(risk_subsets(qis, subsets, k, person))
    by_mask = {
        int(g): (int(c), int(m), int(a), int(s), int(u))
        for g, c, m, a, s, u in zip(
            raw["g"], raw["classes"], raw["k_min"], raw["at_risk"], raw["small"], raw["uniques"],
            strict=True,
        )
    }
    width = len(qis)
    out = {}
    for subset, dropped in zip(subsets, drops, strict=True):
        # DuckDB's GROUPING(a, b, c) sets the highest bit for a when a is left out.
        mask = sum(1 << (width - 1 - qis.index(name)) for name in dropped)
        classes, k_min, at_risk, small, uniques = by_mask[mask]
        out[dropped] = ClassStats(subset, dropped, rows, classes, k_min, small, at_risk, uniques)
    return out


def assess_data_file(
    path: str | Path,
    *,
    codebook: Codebook,
    qis: Sequence[str] | None = None,
    sensitive: Sequence[str] = (),
    k: int = 10,
    notes: Sequence[str] = (),
    source: str = "",
) -> RiskReport:
    """The risk report of a veil data file, opened read-only."""
    try:
        backend = DuckDBBackend(path)
    except Exception as exc:  # duckdb raises its own classes for unreadable files
        raise RiskError(f"cannot open {path} as a veil data file: {exc}") from exc
    refusal = codebook.refusal_of(backend.codebook())
    if refusal is not None:
        backend.close()
        raise RiskError(f"{path}: {refusal} (--codebook)")
    try:
        return assess(
            backend, codebook=codebook, qis=qis, sensitive=sensitive, k=k,
            source=source or str(path), notes=notes,
        )
    finally:
        backend.close()


@contextlib.contextmanager
def loaded(source: str | Path, *, codebook: Codebook) -> Iterator[tuple[Path, list[str]]]:
    """A CSV or Parquet file loaded leniently into a temporary data file; yields its path and
    notes on what the load changed (values outside the codebook are counted as missing)."""
    workdir = Path(tempfile.mkdtemp(prefix="veil-risk-"))
    try:
        database = workdir / "data.duckdb"
        report = load(source, database, codebook=codebook, strict=False, data_version="risk")
        notes = []
        for name, values in report.out_of_domain.items():
            cells = sum(values.values())
            notes.append(
                f"{name}: {cells:,} cells hold values outside the codebook and were counted as "
                f"missing ({len(values)} distinct values); if {name} is a quasi-identifier the "
                f"risk may be understated"
            )
        for name in report.absent:
            notes.append(f"{name}: absent from the file, counted as missing throughout")
        yield database, notes
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def assess_path(
    path: str | Path,
    *,
    codebook: Codebook,
    qis: Sequence[str] | None = None,
    sensitive: Sequence[str] = (),
    k: int = 10,
) -> RiskReport:
    """A veil data file (.duckdb) as it is, or a CSV / Parquet file loaded leniently first."""
    path = Path(path)
    if not path.is_file():
        raise RiskError(f"there is no file at {path}")
    if path.suffix.lower() in (".duckdb", ".db"):
        return assess_data_file(path, codebook=codebook, qis=qis, sensitive=sensitive, k=k)
    with loaded(path, codebook=codebook) as (database, notes):
        return assess_data_file(
            database, codebook=codebook, qis=qis, sensitive=sensitive, k=k, notes=notes,
            source=str(path),
        )


__all__ = [
    "ClassStats",
    "Diversity",
    "RiskError",
    "RiskReport",
    "assess",
    "assess_data_file",
    "assess_path",
    "binary_guess_bound",
]


def _values(values: tuple[str, ...]) -> str:
    """The values homogeneous classes disclose: a 0 of a flag is a negative disclosure (not
    sexually exploited), a 1 a positive one; the custodian weighs them differently."""
    if len(values) == 1:
        return f"{values[0]} in every such class"
    return "one of " + ", ".join(values) + ", by class"
