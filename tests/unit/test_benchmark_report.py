"""The benchmark report's targets, from a saved run's results alone."""

from __future__ import annotations

from typing import Any

from benchmarks.report import _phases_section, targets


def _record(system: str, runs: list[float], error: str | None = None) -> dict[str, Any]:
    return {"rows": 1000, "query": "gender_age", "system": system, "warmup": None,
            "runs": runs, "cells": 40, "error": error}


def _results(*records: dict[str, Any]) -> dict[str, Any]:
    return {"settings": {"target_rows": 1000}, "queries": [{"key": "gender_age"}],
            "timings": list(records)}


def test_a_library_that_failed_is_a_target_not_measured_not_a_target_left_out() -> None:
    results = _results(
        _record("raw_duckdb", [0.010, 0.011]),
        _record("veil_release", [0.012, 0.013]),
        _record("smartnoise_sql", [], error="RuntimeError: its virtualenv is broken"),
    )
    (line,) = [t for t in targets(results) if "SmartNoise" in t[0]]
    assert line == ("veil release faster than SmartNoise SQL, gender_age, 1,000 rows",
                    "not measured (RuntimeError: its virtualenv is broken)", None)
    # A library not run at that size at all (not chosen, or past --polars-max-rows): no line.
    assert not [t for t in targets(results) if "Polars" in t[0]]


def test_a_library_measured_is_judged_on_the_paired_ratio() -> None:
    results = _results(
        _record("raw_duckdb", [0.010, 0.010]),
        _record("veil_release", [0.010, 0.020]),
        _record("opendp_polars", [0.5, 0.1]),
    )
    (line,) = [t for t in targets(results) if "Polars" in t[0]]
    # Paired: 0.5/0.010 = 50 and 0.1/0.020 = 5, median 27.5: met, though the second pair
    # alone would not be.
    assert line[0] == "veil release 10x faster than OpenDP's Polars context, gender_age, 1,000 rows"
    assert line[1].startswith("x28") and line[2] is True


def test_where_a_release_went_is_its_parts_and_the_rest_against_what_the_target_leaves() -> None:
    release = _record("veil_release", [0.014, 0.017])
    release["phases"] = [
        {"total": 0.014, "scan": 0.008, "reserve": 0.001, "commit": 0.002},
        {"total": 0.017, "scan": 0.010, "reserve": 0.001, "commit": 0.003},
    ]
    results = _results(_record("raw_duckdb", [0.010, 0.010]), release)
    row = _phases_section(results)[-1]
    # Medians: total 15.5 ms, scan 9, reserve 1, commit 2.5; the rest 3 ms in both runs; 5.5
    # ms over raw DuckDB's 10, where the 1.3x target leaves 3.
    assert row == ("| gender_age | 10.0 ms | 15.5 ms | 9.00 ms | 1.00 ms | 2.50 ms | 3.00 ms "
                   "| 5.50 ms | 3.00 ms |")
    # Results saved before releases said where their time went: no section, no error.
    del release["phases"]
    assert _phases_section(results) == []
