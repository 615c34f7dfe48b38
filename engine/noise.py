"""The only module that draws noise. Every draw comes from an OpenDP measurement.

Counts and clamped sums are integers, so noise is integer too: OpenDP's discrete Laplace for
pure DP and discrete Gaussian for zCDP, both exact samplers with no floating-point attack
surface. The loss a mechanism costs is read from the measurement's own privacy map.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import opendp.prelude as dp

from engine.accuracy import NoiseDistribution, scale_for_share
from engine.loss import Accounting

dp.enable_features("contrib")

_INPUT_DOMAIN = dp.vector_domain(dp.atom_domain(T="i64"))


@dataclass(frozen=True)
class Mechanism:
    """A calibrated OpenDP measurement for integer vectors of a given sensitivity."""

    accounting: Accounting
    scale: float
    sensitivity: int
    loss: Fraction  # the measurement's privacy map at `sensitivity`, exactly as OpenDP states it
    measurement: Any = field(repr=False, compare=False)

    @property
    def distribution(self) -> NoiseDistribution:
        return NoiseDistribution(self.accounting, self.scale)

    def release(self, values: np.ndarray) -> np.ndarray:
        """True integer values in, noisy integer values out."""
        if values.size == 0:
            return values.astype(np.int64)
        workers = _pool_size()
        if workers > 1 and values.size >= PARALLEL_THRESHOLD:
            return _release_in_parallel(self.accounting, self.scale, values, workers)
        noisy = self.measurement(values.astype(np.int64).tolist())
        return np.asarray(noisy, dtype=np.int64)


# ---- both cores for large tables ----------------------------------------------------------------
#
# OpenDP's sampler holds the GIL, so a large vector (a 63,001-cell corridor) is noised on one
# core. Above the threshold the vector is split and each part is noised by the same OpenDP
# measurement (same scale) in a worker process. The noise is independent per coordinate, so the
# parts together have exactly the distribution of one draw over the whole vector, and the L1 (or
# squared L2) distances of the parts add up to the whole's: the privacy map is unchanged.

PARALLEL_THRESHOLD = 8192
_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


_workers = 1


def use_worker_processes(workers: int | None = None) -> None:
    """Noise large tables in `workers` processes (default: one per core, at most 4).

    Off by default: worker processes are spawned, and spawning re-imports the program's main
    module, which is only safe for programs whose main module is guarded (`veil serve` is).
    The environment variable VEIL_NOISE_WORKERS overrides this setting.
    """
    global _workers
    _workers = max(1, workers if workers is not None else min(os.cpu_count() or 1, 4))


def _pool_size() -> int:
    configured = os.environ.get("VEIL_NOISE_WORKERS")
    if configured is not None:
        return max(1, int(configured))
    return _workers


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn, not fork: the server has gRPC and DuckDB threads a fork would copy mid-state.
            _pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        return _pool


def _release_in_parallel(
    accounting: Accounting, scale: float, values: np.ndarray, workers: int
) -> np.ndarray:
    parts = np.array_split(values.astype(np.int64), workers)
    pool = _worker_pool(workers)
    noisy = pool.map(
        _noise_part,
        [accounting.value] * len(parts),
        [scale] * len(parts),
        [p.tolist() for p in parts],
    )
    return np.concatenate([np.asarray(n, dtype=np.int64) for n in noisy])


@functools.lru_cache(maxsize=32)
def _cached_measurement(accounting: str, scale: float) -> Any:
    return _measurement(Accounting(accounting), scale)


def _noise_part(accounting: str, scale: float, values: list[int]) -> list[int]:
    """Runs in a worker process: one OpenDP draw over one part of the vector."""
    noisy: list[int] = _cached_measurement(accounting, scale)(values)
    return noisy


def _measurement(accounting: Accounting, scale: float) -> Any:
    if accounting is Accounting.PURE_DP:
        return dp.m.make_laplace(_INPUT_DOMAIN, dp.l1_distance(T="i64"), scale=scale)
    return dp.m.make_gaussian(_INPUT_DOMAIN, dp.l2_distance(T="i64"), scale=scale)


@functools.lru_cache(maxsize=256)
def calibrate(accounting: Accounting, *, sensitivity: int, budget: Fraction) -> Mechanism:
    """The least-noisy mechanism whose privacy map at `sensitivity` is at most `budget`.

    The analytic scale is a float; OpenDP's map rounds conservatively, so the scale is nudged up
    until the map, read exactly, does not exceed the budget. The budget is what is charged, and
    it is never less than what OpenDP says the release costs. Cached: a flag-set plan asks for
    the same mechanism once per flag, and a mechanism holds no state between draws.
    """
    if sensitivity < 1:
        raise ValueError("sensitivity must be a positive integer")
    scale = scale_for_share(accounting, sensitivity, budget)
    for _ in range(64):
        measurement = _measurement(accounting, scale)
        loss = Fraction(measurement.map(sensitivity))
        if loss <= budget:
            return Mechanism(accounting, scale, sensitivity, loss, measurement)
        scale = math.nextafter(scale, math.inf) * (1 + 1e-12)
    raise ArithmeticError("could not calibrate a mechanism within the budget")
