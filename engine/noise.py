"""The only module that draws noise. Every draw comes from an OpenDP measurement.

Counts and clamped sums are integers, so noise is integer too: OpenDP's discrete Laplace for
pure DP and discrete Gaussian for zCDP, both exact samplers with no floating-point attack
surface. The loss a mechanism costs is read from the measurement's own privacy map.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from opendp.domains import atom_domain, vector_domain
from opendp.measurements import make_gaussian, make_laplace
from opendp.metrics import l1_distance, l2_distance
from opendp.mod import enable_features

from engine.accuracy import NoiseDistribution, scale_for_share
from engine.errors import QueryCancelledError
from engine.loss import Accounting

# The modules themselves, not opendp.prelude, which also imports scikit-learn, SciPy and Polars
# (about 1.3 s and 100 MiB in the server) for extras veil does not use.
enable_features("contrib")

_INPUT_DOMAIN = vector_domain(atom_domain(T="i64"))
# Built once, like the domain: constructing a metric costs about as much as the mechanism itself,
# and every calibration (one per new loss) needs one. Both are immutable descriptors.
_L1_DISTANCE = l1_distance(T="i64")
_L2_DISTANCE = l2_distance(T="i64")


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
        noisy: np.ndarray = np.ascontiguousarray(values, dtype=np.int64) + self.noise(values.size)
        return noisy

    def noise(self, size: int) -> np.ndarray:
        """`size` independent draws of this mechanism's noise, by its OpenDP measurement.

        OpenDP's integer mechanisms are additive: coordinate x comes out as x + Z, with Z drawn
        independently of x (then saturated to int64). Applied to zeros, the measurement returns
        the Z themselves, so noise can be drawn before the data is read and added to it after.
        Counts and clamped sums are nowhere near int64's bounds, so the sum never saturates.
        """
        zeros = np.zeros(size, dtype=np.int64)
        parts = min(_threads, size // PARALLEL_PART)
        if parts > 1:
            return self._draw_in_parts(zeros, parts)
        return self._draw(zeros)

    def _draw(self, zeros: np.ndarray) -> np.ndarray:
        # OpenDP takes an int64 numpy vector as it is, without a Python int per value.
        return np.asarray(self.measurement(zeros), dtype=np.int64)

    def _draw_in_parts(self, zeros: np.ndarray, parts: int) -> np.ndarray:
        split = np.array_split(zeros, parts)
        pool = _thread_pool()
        others = [pool.submit(self._draw, part) for part in split[1:]]
        first = self._draw(split[0])
        return np.concatenate([first, *(other.result() for other in others)])


class NoiseAhead:
    """The noise of one answer, drawn on another thread while the backend reads its data.

    Noise does not depend on the data, so it need not wait for it: DuckDB leaves part of the
    cores idle on a short scan, and the sampler, not the scan, is what a table of hundreds of
    cells waits for. Each draw is used once, by the answer it was started for. An answer that
    will not be made (its scan failed, its call was cancelled) discards its noise, and a large
    draw stops within one chunk of AHEAD_CHUNK values, so that a cancelled query cannot keep
    the cores busy drawing noise nobody receives.
    """

    def __init__(self, mechanisms: Sequence[Mechanism], sizes: Sequence[int]) -> None:
        if len(sizes) != len(mechanisms):
            raise ValueError("one vector size per mechanism")
        self._stop = threading.Event()
        self._taken = False
        self._future = _ahead_pool().submit(self._draw, tuple(mechanisms), tuple(sizes))

    def _draw(self, mechanisms: tuple[Mechanism, ...], sizes: tuple[int, ...]) -> list[np.ndarray]:
        out = []
        for mechanism, size in zip(mechanisms, sizes, strict=True):
            chunks = []
            for start in range(0, size, AHEAD_CHUNK):
                if self._stop.is_set():
                    raise QueryCancelledError("the answer was abandoned while its noise was drawn")
                chunks.append(mechanism.noise(min(AHEAD_CHUNK, size - start)))
            out.append(np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64))
        return out

    def add_to(self, exact: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each true vector plus its mechanism's noise (waiting for the draw to end). Once."""
        if self._stop.is_set():
            raise QueryCancelledError("the answer was abandoned; its noise was discarded")
        if self._taken:
            raise RuntimeError("this noise was already added to an answer")
        self._taken = True
        try:
            noise = self._future.result()
        except CancelledError as exc:  # discarded before its draw began
            raise QueryCancelledError("the answer was abandoned; its noise was discarded") from exc
        noisy = []
        for values, z in zip(exact, noise, strict=True):
            values = np.ascontiguousarray(values, dtype=np.int64)
            if values.shape != z.shape:
                # numpy would broadcast one draw over several entries: never share a draw.
                raise ValueError(f"{values.size} values for {z.size} draws of noise")
            noisy.append(values + z)
        return noisy

    def discard(self) -> None:
        """The answer will not be made: stop drawing, and never hand this noise out."""
        self._stop.set()
        self._future.cancel()


# ---- every core for large tables ----------------------------------------------------------------
#
# OpenDP's sampler runs in Rust behind ctypes, which lets go of the GIL for the call, so threads
# draw in parallel. A vector of at least two parts of PARALLEL_PART values is split, one part per
# core: the calling thread draws the first, pool threads the others, each with the same OpenDP
# measurement (same scale). The noise is independent per coordinate, so the parts together have
# exactly the distribution of one draw over the whole vector, and the L1 (or squared L2)
# distances of the parts add up to the whole's: the privacy map is unchanged.

PARALLEL_PART = 256  # values; a smaller part costs more to hand to a thread than it saves
_threads = os.cpu_count() or 1
AHEAD_THREADS = 64  # at most this many answers draw their noise at once; more queue
AHEAD_CHUNK = 32768  # values drawn between two looks at whether the answer was abandoned
_pool: ThreadPoolExecutor | None = None
_ahead: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def set_noise_threads(threads: int | None = None) -> None:
    """Draw a large vector's noise on at most `threads` threads (default: one per core).

    A setting for start-up: a draw already running on the old pool when it is replaced fails.
    """
    global _threads, _pool
    with _pool_lock:
        _threads = max(1, threads if threads is not None else os.cpu_count() or 1)
        old, _pool = _pool, None
    if old is not None:
        old.shutdown(wait=False)


def noise_threads() -> int:
    """The most threads a large vector's noise is drawn on."""
    return _threads


def _ahead_pool() -> ThreadPoolExecutor:
    global _ahead
    with _pool_lock:
        if _ahead is None:
            # A thread per request being answered (idle ones are reused), so a large table's
            # draw never holds up a small table's.
            _ahead = ThreadPoolExecutor(AHEAD_THREADS, thread_name_prefix="veil-noise-ahead")
        return _ahead


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # The calling thread draws one part itself.
            _pool = ThreadPoolExecutor(max(1, _threads - 1), thread_name_prefix="veil-noise")
        return _pool


def _measurement(accounting: Accounting, scale: float) -> Any:
    if accounting is Accounting.PURE_DP:
        return make_laplace(_INPUT_DOMAIN, _L1_DISTANCE, scale=scale)
    return make_gaussian(_INPUT_DOMAIN, _L2_DISTANCE, scale=scale)


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
    # OpenDP's map rounds up, so the analytic scale itself is refused about two times in three;
    # a relative step of 1e-12 (far below any accuracy that matters) passes at the first try.
    scale = scale_for_share(accounting, sensitivity, budget) * (1 + 1e-12)
    for _ in range(64):
        measurement = _measurement(accounting, scale)
        loss = Fraction(measurement.map(sensitivity))
        if loss <= budget:
            return Mechanism(accounting, scale, sensitivity, loss, measurement)
        scale = math.nextafter(scale, math.inf) * (1 + 1e-12)
    raise ArithmeticError("could not calibrate a mechanism within the budget")
