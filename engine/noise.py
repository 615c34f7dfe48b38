"""The only module that draws noise. Every draw comes from an OpenDP measurement.

Counts and clamped sums are integers, so noise is integer too: OpenDP's discrete Laplace for
pure DP and discrete Gaussian for zCDP, both exact samplers with no floating-point attack
surface. The loss a mechanism costs is read from the measurement's own privacy map.
"""

from __future__ import annotations

import math
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
        noisy = self.measurement(values.astype(np.int64).tolist())
        return np.asarray(noisy, dtype=np.int64)


def _measurement(accounting: Accounting, scale: float) -> Any:
    if accounting is Accounting.PURE_DP:
        return dp.m.make_laplace(_INPUT_DOMAIN, dp.l1_distance(T="i64"), scale=scale)
    return dp.m.make_gaussian(_INPUT_DOMAIN, dp.l2_distance(T="i64"), scale=scale)


def calibrate(accounting: Accounting, *, sensitivity: int, budget: Fraction) -> Mechanism:
    """The least-noisy mechanism whose privacy map at `sensitivity` is at most `budget`.

    The analytic scale is a float; OpenDP's map rounds conservatively, so the scale is nudged up
    until the map, read exactly, does not exceed the budget. The budget is what is charged, and
    it is never less than what OpenDP says the release costs.
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
