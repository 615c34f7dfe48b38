"""veil's engine: codebooks, queries, planning, SQL, noise, suppression, releases, budgets.

Imports nothing of gRPC or protobuf; usable in-process.
"""

from engine.codebook import Codebook, default_codebook, load_codebook
from engine.engine import DryRun, Engine
from engine.loss import Accounting, PrivacyLoss
from engine.query import (
    And,
    Count,
    Eq,
    FlagCounts,
    In,
    IsMissing,
    Mean,
    Not,
    Or,
    Proportion,
    Query,
    Range,
    Sum,
)
from engine.release import Release
from engine.settings import Settings

__all__ = [
    "Accounting",
    "And",
    "Codebook",
    "Count",
    "DryRun",
    "Engine",
    "Eq",
    "FlagCounts",
    "In",
    "IsMissing",
    "Mean",
    "Not",
    "Or",
    "PrivacyLoss",
    "Proportion",
    "Query",
    "Range",
    "Release",
    "Settings",
    "Sum",
    "default_codebook",
    "load_codebook",
]
