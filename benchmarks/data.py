"""The synthetic data files every system reads: one DuckDB file per (rows, seed), cached."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine import synthetic
from engine.codebook import default_codebook


@dataclass(frozen=True)
class Dataset:
    path: Path
    rows: int
    seed: int
    data_version: str
    file_bytes: int


def dataset(directory: Path, *, rows: int, seed: int, log: bool = True) -> Dataset:
    """The file for (rows, seed) in `directory`, generated on first use."""
    codebook = default_codebook()
    version = synthetic.data_version(codebook, rows=rows, seed=seed)
    path = directory / f"synthetic-{rows}-seed{seed}.duckdb"
    if not synthetic.is_generated(path, codebook, rows=rows, seed=seed):
        if log:
            print(
                f"generating {rows:,} synthetic rows into {path} ...", file=sys.stderr, flush=True
            )
        start = time.perf_counter()
        directory.mkdir(parents=True, exist_ok=True)
        synthetic.generate(path, rows=rows, seed=seed, codebook=codebook, overwrite=True)
        if log:
            print(f"  done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return Dataset(path, rows, seed, version, path.stat().st_size)
