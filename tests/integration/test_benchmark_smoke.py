"""A tiny run of the benchmark, so that it keeps working between full runs.

The full run (`python3 -m benchmarks.run`, see benchmarks/README.md) takes the better part of an
hour and is not part of the default test command. This one runs the same command on 2,000 rows,
once per query, with the systems that need nothing beyond veil's own dependencies: raw DuckDB,
veil's engine and veil over gRPC, with a short throughput run and the memory run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.report import targets
from benchmarks.throughput import BASE_LOSS, STEP
from benchmarks.workload import workload
from engine.codebook import default_codebook
from engine.loss import parse_amount

REPO = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_end_to_end_and_reports_every_query(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "benchmarks.run",
        "--rows", "2000",
        "--repeats", "1",
        "--systems", "raw_duckdb,veil_engine,veil_grpc",
        "--data-dir", str(tmp_path / "data"),
        "--out", str(out),
        "--target-rows", "2000",
        "--throughput-rows", "2000",
        "--concurrency", "1,2",
        "--throughput-seconds", "0.2",
        "--floor-calls", "5",
        "--memory-rows", "2000",
    ]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]

    markdown = (out / "RESULTS.md").read_text(encoding="utf-8")
    assert done.stdout.strip() == markdown.strip()  # the report is printed too
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    queries = workload(default_codebook())
    for query in queries:
        assert f"`{query.key}`" in markdown
        # A fresh path that got a replay, or a replay path a fresh release, fails its run.
        for system in ("raw_duckdb", "veil_answer", "veil_release", "veil_replay", "veil_grpc",
                       "veil_grpc_replay", "grpc_floor", "opendp_sampler"):
            (record,) = [
                r for r in results["timings"] if r["query"] == query.key and r["system"] == system
            ]
            assert record["error"] is None, record
            assert len(record["runs"]) == 1 and record["runs"][0] > 0
        # Each fresh release says where its time went; its timed parts fit inside its total.
        (release,) = [
            r for r in results["timings"]
            if r["query"] == query.key and r["system"] == "veil_release"
        ]
        (phases,) = release["phases"]
        assert phases["total"] == release["runs"][0]
        assert all(phases[part] > 0 for part in ("scan", "reserve", "commit")), phases
        assert phases["scan"] + phases["reserve"] + phases["commit"] < phases["total"], phases
    for section in ("## Targets", "## Latency at 2,000 rows",
                    "## Where a fresh release's time goes (2,000 rows, in-process)",
                    "## Transport floor and throughput", "## Memory"):
        assert section in markdown
    # Every target this run can measure is measured: one engine and one gRPC line per small
    # table, the corridor's two and three of memory (the throughput target is at 8 clients).
    verdicts = targets(results)
    assert all(met is not None for _, _, met in verdicts), verdicts
    small = len(queries) - 1  # the corridor's 63,001 cells are not a small table
    assert len(verdicts) == 2 * small + 2 + 3, [name for name, _, _ in verdicts]
    (throughput,) = results["throughput"]
    assert [r["clients"] for r in throughput["fresh"]] == [1, 2]
    assert all(r["releases"] > 0 and not r["errors"] for r in throughput["fresh"])
    assert all(r["releases"] > 0 and not r["errors"] for r in throughput["replay"])
    assert [r["clients"] for r in throughput["duckdb_alone"]] == [1, 2]
    assert all(r["statements"] > 0 for r in throughput["duckdb_alone"])
    assert "| DuckDB alone (the statements, no privacy, no server) | 2 |" in markdown
    for key in ("engine_alone", "engine_ledger"):
        assert [r["clients"] for r in throughput[key]] == [1, 2]
        assert all(r["releases"] > 0 for r in throughput[key])
    # Each of the engine's charged releases is recorded at its own loss, and nothing without one.
    assert all(r["charged"] == "0" for r in throughput["engine_alone"])
    for run in throughput["engine_ledger"]:
        releases = run["releases"]
        # client i's n-th release costs BASE_LOSS + n * STEP (see benchmarks.throughput)
        charged = parse_amount(run["charged"])
        assert releases * BASE_LOSS < charged, run
        assert charged <= releases * BASE_LOSS + releases * (releases + 1) // 2 * STEP, run
    assert "| veil's engine and ledger (fresh charged releases, no server) | 2 |" in markdown
    assert results["memory"]["server"]["VmHWM"] > 0
    # The report can be written again from the saved results alone.
    again = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(out / "results.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "RESULTS.md").read_text(encoding="utf-8") == markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latency.png").stat().st_size > 0
    else:
        assert "plot: skipped" in markdown


def test_an_unknown_system_or_query_is_refused_before_anything_runs(tmp_path: Path) -> None:
    for option, name in (("--systems", "veil_answer"), ("--queries", "gender")):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", option, name, "--out", str(tmp_path)],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert f"unknown {option[2:]}: {name}" in done.stderr and "Traceback" not in done.stderr
        assert not any(tmp_path.iterdir())
