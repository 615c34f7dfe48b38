"""The custodian's privacy and limit settings for one deployment."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import VeilError
from engine.loss import Accounting


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything that shapes a release and does not depend on the data.

    k is the minimum cell size; a cell is published only when its noisy count reaches
    tau = k + margin, where the margin makes a cell whose true count is below k publish with
    probability at most beta. k may be raised above k_floor, never lowered below it.
    """

    accounting: Accounting = Accounting.PURE_DP
    k: int = 10
    k_floor: int = 10
    beta: float = 0.05
    confidence: float = 0.95
    max_cells: int = 100_000
    max_dimensions: int = 4
    max_filter_depth: int = 8
    max_filter_terms: int = 64

    def __post_init__(self) -> None:
        if self.k_floor < 1:
            raise VeilError("k_floor must be at least 1")
        if self.k < self.k_floor:
            raise VeilError(f"k={self.k} is below the configured floor {self.k_floor}")
        if not 0 < self.beta < 0.5:
            raise VeilError(f"beta must lie in (0, 0.5), got {self.beta}")
        if not 0.5 <= self.confidence < 1:
            raise VeilError(f"confidence must lie in [0.5, 1), got {self.confidence}")
        for name in ("max_cells", "max_dimensions", "max_filter_depth", "max_filter_terms"):
            if getattr(self, name) < 1:
                raise VeilError(f"{name} must be positive")
