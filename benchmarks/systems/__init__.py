"""The systems the benchmark compares, behind one small protocol.

A system is opened on one data file, prepared for one workload query (work that a user would do
once, such as building a context, is done here, outside the timing), then run repeatedly; each
run returns the seconds it took, measured by the system itself around exactly the work a user
waits for. A module may offer several systems (veil's engine offers its answer, release and
replay paths). A module whose dependencies are missing is skipped with a note saying how to
install them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from benchmarks.data import Dataset
from benchmarks.workload import WorkloadQuery


class System(Protocol):
    name: str  # column name in the results
    label: str  # what it is, in words
    slow: bool  # a run takes seconds: repeats are limited by the time budget
    reference: bool  # not a system but a reference cost (the bare noise sampler)

    def open(self, data: Dataset) -> None: ...

    def prepare(self, query: WorkloadQuery) -> None: ...

    def run(self, query: WorkloadQuery) -> float: ...

    def cells(self, query: WorkloadQuery) -> int | None:
        """How many cells the last run released (None: not known)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Phased(Protocol):
    """A system that also says where each run's time went."""

    def phases(self) -> list[dict[str, float]]:
        """Seconds by phase ("total" and its parts) of every run since `prepare`, the warm-up
        run first."""
        ...


@dataclass
class Options:
    epsilon: float
    repeats: int  # the most timed runs of one query on one system
    work: str  # scratch directory for ledgers, logs and servers
    notes: list[str] = field(default_factory=list)


# module name -> what to install when it cannot be imported
MODULES: dict[str, str] = {
    "raw_duckdb": "",
    "veil_engine": "",
    "veil_grpc": "",
    "opendp_polars": "python3 -m pip install -r benchmarks/requirements.txt",
    "smartnoise": "bash benchmarks/setup_smartnoise.sh",
}


def load(name: str, options: Options) -> tuple[list[System], str | None]:
    """The systems a module offers, or none and a note saying why it was skipped."""
    if name not in MODULES:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(MODULES)}")
    try:
        module = importlib.import_module(f"benchmarks.systems.{name}")
        make: Callable[[Options], list[System]] = module.systems
        return make(options), None
    except (ImportError, Unavailable) as exc:
        hint = MODULES[name]
        note = f"{name}: skipped ({exc})"
        if hint:
            note += f"; to include it: {hint}"
        return [], note


class Unavailable(Exception):
    """A system cannot run on this machine (a dependency or a setup step is missing)."""
