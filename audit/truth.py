"""The auditor's ground truth: exact counts from the data file, to score attacks against.

An attack on a live server learns only what the server releases. To say whether it succeeded,
the auditor compares its guesses with the truth, read here in-process from the same data file
the server serves (the custodian's internal auditor has it; nothing here goes over the wire).
The truth also supplies the attacker's background knowledge that differential privacy assumes
an attacker may have: everything about every record but the target's secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.backend import DuckDBBackend
from engine.codebook import Codebook, default_codebook
from engine.engine import Engine
from engine.loss import Accounting, PrivacyLoss
from engine.query import Count, Query
from engine.release import _key_columns
from engine.settings import Settings

Key = tuple[Any, ...]


class Truth:
    """Exact aggregates of a veil data file, keyed like the server's releases."""

    def __init__(self, data: str | Path, *, codebook: Codebook | None = None) -> None:
        self.codebook = codebook or default_codebook()
        settings = Settings(max_cells=5_000_000, max_filter_terms=100_000, max_filter_depth=100)
        self.engine = Engine(DuckDBBackend(data), codebook=self.codebook, settings=settings)

    @property
    def data_version(self) -> str:
        return self.engine.data_version

    def close(self) -> None:
        backend = self.engine.backend
        if isinstance(backend, DuckDBBackend):
            backend.close()

    def counts(self, query: Query) -> dict[Key, int]:
        """The exact value of every cell of a count query, keyed by its group-by values in the
        query's `by` order (None for the missing key)."""
        plan = self.engine.plan(query, loss=PrivacyLoss(Accounting.PURE_DP, _ONE))
        # The engine's own exact vectors (what it hands to the noise): the truth, in-process.
        (vector,) = self.engine._true_components(plan)
        columns = _key_columns(plan.dimensions, plan.group_cells)
        keys = [columns[name].to_pylist() for name in query.by]
        return {
            tuple(k[i] for k in keys): int(v) for i, v in enumerate(np.asarray(vector).tolist())
        }


_ONE = PrivacyLoss.pure(1).amount


@dataclass(frozen=True)
class Person:
    """A target: the only record with its key code in its cell. The attacker knows its code and
    cell, not its flag (`secret`); `alone` when no other record has its code at all."""

    code: str
    cell: Key
    secret: int
    alone: bool = True


@dataclass(frozen=True)
class Knowledge:
    """What the attacks may assume about the data, derived from the truth.

    `counts[code]` is the number of records with each code of the key variable, and
    `cell_counts[(code, cell)]` the number in each cell; `uniques` are the records alone with
    their code in their cell (with a present flag and cell), those alone in their code first;
    `empty` codes have no record; `common` codes have many.
    """

    key: str
    cells: tuple[str, ...]
    flag: str
    counts: dict[str, int]
    cell_counts: dict[tuple[str, Key], int]
    uniques: tuple[Person, ...]
    empty: tuple[str, ...]
    common: tuple[str, ...]

    def apart(self, a: Person, b: Person) -> bool:
        """Neither target's code has a record in the other's cell: a tracker can hold both."""
        return (
            a.cell != b.cell
            and not self.cell_counts.get((a.code, b.cell))
            and not self.cell_counts.get((b.code, a.cell))
        )


def knowledge(
    truth: Truth,
    *,
    key: str = "citizenship",
    cells: tuple[str, ...] = ("yearOfRegistration", "gender"),
    flag: str = "isForcedLabour",
    common_at_least: int = 100,
) -> Knowledge:
    full = truth.counts(Query(Count(), by=(key, *cells, flag)))
    counts: dict[str, int] = {}
    cell_counts: dict[tuple[str, Key], int] = {}
    flags: dict[tuple[str, Key], int | None] = {}
    for parts, n in full.items():
        code, cell, secret = parts[0], parts[1:-1], parts[-1]
        if code is None:
            continue
        counts.setdefault(code, 0)
        if not n:
            continue
        counts[code] += n
        cell_counts[(code, cell)] = cell_counts.get((code, cell), 0) + n
        flags[(code, cell)] = secret
    uniques = [
        Person(code, cell, int(secret), alone=counts[code] == 1)
        for (code, cell), n in cell_counts.items()
        if n == 1
        and (secret := flags[(code, cell)]) is not None
        and not any(part is None for part in cell)
    ]
    return Knowledge(
        key=key,
        cells=cells,
        flag=flag,
        counts=counts,
        cell_counts=cell_counts,
        uniques=tuple(sorted(uniques, key=lambda p: (not p.alone, p.code, str(p.cell)))),
        empty=tuple(sorted(code for code, n in counts.items() if n == 0)),
        common=tuple(sorted(code for code, n in counts.items() if n >= common_at_least)),
    )
