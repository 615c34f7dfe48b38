"""Run the benchmark: veil against raw DuckDB, OpenDP's Polars context and SmartNoise SQL.

    python3 -m benchmarks.run                              # 200k, 1M and 10M rows, every system
    python3 -m benchmarks.run --with-100m                  # and 100M rows
    python3 -m benchmarks.run --rows 200000 --repeats 3 --systems raw_duckdb,veil_engine

For each size, each workload query runs once on every system to warm up, then `--repeats` times,
interleaved (raw DuckDB, then each system, then raw DuckDB again ...), so that the ratio of a
system's i-th run to raw DuckDB's i-th run compares runs made moments apart. A slow system gets
fewer runs (as many as `--budget-seconds` allows, at least one); the table says how many. Then the
transport floor and throughput are measured against a server process, and the memory of a server
holding the largest file of at most 10M rows. Results go to `--out`: RESULTS.md (also printed),
latency.png and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.data import Dataset, dataset
from benchmarks.stats import median
from benchmarks.systems import MODULES, Options, Phased, System, load
from benchmarks.workload import EPSILON, WorkloadQuery, workload
from engine.codebook import default_codebook

HERE = Path(__file__).resolve().parent
DEFAULT_ROWS = (200_000, 1_000_000, 10_000_000)
# Systems that need the whole table in this process's memory stop at this size unless told.
POLARS_MAX_ROWS = 10_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rows", default=",".join(str(r) for r in DEFAULT_ROWS),
                        help="comma-separated table sizes (default 200000,1000000,10000000)")
    parser.add_argument("--with-100m", action="store_true", help="also run at 100,000,000 rows")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per query (default 7)")
    parser.add_argument("--budget-seconds", type=float, default=30.0,
                        help="time a slow system may spend on one query at one size (default 30)")
    parser.add_argument("--systems", default=",".join(MODULES),
                        help=f"comma-separated, from: {', '.join(MODULES)} (default all)")
    parser.add_argument("--queries", default="",
                        help="comma-separated workload query keys (default all)")
    parser.add_argument("--epsilon", type=float, default=EPSILON,
                        help=f"privacy loss of one query (default {EPSILON})")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")
    parser.add_argument("--data-dir", type=Path, default=HERE / "data",
                        help="where the synthetic files are cached (default benchmarks/data)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="where results are written (default benchmarks/results)")
    parser.add_argument("--polars-max-rows", type=int, default=POLARS_MAX_ROWS,
                        help="largest size OpenDP's Polars context runs at (it holds the table "
                             f"in memory; default {POLARS_MAX_ROWS:,})")
    parser.add_argument("--throughput-rows", default="200000,1000000",
                        help="comma-separated sizes for the floor and throughput runs (default "
                             "200000,1000000; the nearest sizes run are used)")
    parser.add_argument("--concurrency", default="1,8,32",
                        help="concurrent clients for throughput (default 1,8,32)")
    parser.add_argument("--throughput-seconds", type=float, default=10.0,
                        help="length of each throughput run (default 10)")
    parser.add_argument("--floor-calls", type=int, default=300,
                        help="sequential empty calls for the transport floor (default 300)")
    parser.add_argument("--memory-rows", type=int, default=10_000_000,
                        help="size for the server memory run (default 10000000; the nearest "
                             "size run is used)")
    parser.add_argument("--target-rows", type=int, default=1_000_000,
                        help="size at which the latency targets are judged (default 1000000)")
    parser.add_argument("--noise-threads", type=int, default=None,
                        help="threads the in-process engine draws a large table's noise on "
                             "(default: one per core, as the server does; 1: one core only)")
    parser.add_argument("--no-throughput", action="store_true", help="skip floor and throughput")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory run")
    args = parser.parse_args(argv)
    args.sizes = [int(r.replace("_", "")) for r in args.rows.split(",") if r.strip()]
    if args.with_100m and 100_000_000 not in args.sizes:
        args.sizes.append(100_000_000)
    args.sizes.sort()
    args.system_names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [name for name in args.system_names if name not in MODULES]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}; known: {', '.join(MODULES)}")
    if "raw_duckdb" not in args.system_names:
        args.system_names.insert(0, "raw_duckdb")  # every ratio is to raw DuckDB
    args.concurrency_levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def nearest(sizes: list[int], wanted: int) -> int:
    return min(sizes, key=lambda s: (abs(s - wanted), s))


def environment() -> dict[str, Any]:
    def package(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": _git(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "load_average_start": os.getloadavg(),
        "packages": {
            name: package(name)
            for name in ("duckdb", "opendp", "polars", "numpy", "pyarrow", "grpcio")
        },
    }


def _configure_noise(threads: int | None) -> int:
    """The threads the in-process engine draws a large table's noise on."""
    from engine import noise

    noise.set_noise_threads(threads)
    return noise.noise_threads()


def _git() -> str:
    """The commit measured, and whether veil's code differed from it."""
    import subprocess

    repo = HERE.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "engine", "server", "protos", "client"],
            cwd=repo, capture_output=True, text=True, check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if changed:
        return f"{commit} with uncommitted changes to {len(changed)} file(s) of veil"
    return commit


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_size(
    data: Dataset,
    systems: list[System],
    queries: tuple[WorkloadQuery, ...],
    args: argparse.Namespace,
    notes: list[str],
) -> list[dict[str, Any]]:
    """Every query on every system at one size; one record per (query, system)."""
    records: list[dict[str, Any]] = []
    active: list[System] = []
    for system in systems:
        if system.name == "opendp_polars" and data.rows > args.polars_max_rows:
            notes.append(
                f"opendp_polars: not run at {data.rows:,} rows (it holds the table in memory; "
                f"raise --polars-max-rows to include it)"
            )
            continue
        try:
            started = time.perf_counter()
            system.open(data)
            log(f"  opened {system.name} in {time.perf_counter() - started:.1f} s")
            active.append(system)
        except Exception as exc:
            notes.append(f"{system.name}: could not open at {data.rows:,} rows: {exc}")
            log(f"  {system.name}: could not open: {exc}")
    for query in queries:
        runs: dict[str, list[float]] = {}
        warm: dict[str, float] = {}
        errors: dict[str, str] = {}
        planned: dict[str, int] = {}
        for system in active:
            try:
                system.prepare(query)
                warm[system.name] = system.run(query)
            except Exception as exc:
                errors[system.name] = f"{type(exc).__name__}: {exc}"
                log(f"  {query.key} / {system.name}: {errors[system.name]}")
                continue
            runs[system.name] = []
            count = args.repeats
            if system.slow and warm[system.name] > 0:
                count = min(args.repeats, max(1, int(args.budget_seconds // warm[system.name])))
            planned[system.name] = count
        for index in range(args.repeats):
            for system in active:
                name = system.name
                if name in errors or index >= planned[name]:
                    continue
                try:
                    runs[name].append(system.run(query))
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    log(f"  {query.key} / {name}: {errors[name]}")
        for system in active:
            name = system.name
            cells = None
            if name not in errors:
                try:
                    cells = system.cells(query)
                except Exception:
                    cells = None
            record: dict[str, Any] = {
                "rows": data.rows,
                "query": query.key,
                "system": name,
                "warmup": warm.get(name),
                "runs": runs.get(name, []),
                "cells": cells,
                "error": errors.get(name),
            }
            if isinstance(system, Phased) and name not in errors:
                record["phases"] = system.phases()[1:]  # the timed runs, after the warm-up
            records.append(record)
        summary = ", ".join(
            f"{name} {median(times) * 1000:.1f}"
            for name, times in runs.items()
            if times
        )
        log(f"  {query.key}: {summary} (ms)")
    for system in active:
        try:
            system.close()
        except Exception as exc:
            notes.append(f"{system.name}: error while closing: {exc}")
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    codebook = default_codebook()
    queries = workload(codebook)
    if args.queries:
        wanted = {q.strip() for q in args.queries.split(",")}
        unknown = wanted - {q.key for q in queries}
        if unknown:
            known = ", ".join(q.key for q in queries)
            print(f"unknown queries: {', '.join(sorted(unknown))}; known: {known}", file=sys.stderr)
            return 2
        queries = tuple(q for q in queries if q.key in wanted)
    args.out.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="veil-bench-")
    notes: list[str] = []
    noise_threads = _configure_noise(args.noise_threads)
    notes.append(
        f"the in-process engine draws the noise of large tables on {noise_threads} thread(s) "
        f"(--noise-threads to change); the server on one per core"
    )
    options = Options(epsilon=args.epsilon, repeats=args.repeats, work=work, notes=notes)
    systems: list[System] = []
    for name in args.system_names:
        offered, note = load(name, options)
        systems.extend(offered)
        if note:
            notes.append(note)
            log(note)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "environment": environment(),
        "command": "python3 -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "sizes": args.sizes,
            "repeats": args.repeats,
            "budget_seconds": args.budget_seconds,
            "epsilon": args.epsilon,
            "seed": args.seed,
            "target_rows": nearest(args.sizes, args.target_rows),
            "noise_threads": noise_threads,
        },
        "systems": {s.name: {"label": s.label, "reference": s.reference} for s in systems},
        "queries": [{"key": q.key, "title": q.title} for q in queries],
        "notes": notes,
        "timings": [],
    }
    datasets: dict[int, Dataset] = {}
    for rows in args.sizes:
        data = dataset(args.data_dir, rows=rows, seed=args.seed)
        datasets[rows] = data
        log(f"{rows:,} rows ({data.file_bytes / 2**20:.0f} MiB file)")
        results["timings"].extend(run_size(data, systems, queries, args, notes))
    grpc_wanted = "veil_grpc" in args.system_names
    if not args.no_throughput and grpc_wanted:
        from benchmarks import throughput

        results["throughput"] = []
        wanted_sizes = [int(r.replace("_", "")) for r in args.throughput_rows.split(",") if r]
        for rows in sorted({nearest(args.sizes, r) for r in wanted_sizes}):
            log(f"floor and throughput at {rows:,} rows ...")
            try:
                results["throughput"].append(
                    throughput.measure(
                        datasets[rows],
                        work,
                        concurrency=args.concurrency_levels,
                        seconds=args.throughput_seconds,
                        floor_calls=args.floor_calls,
                    )
                )
            except Exception as exc:
                notes.append(f"throughput at {rows:,} rows: failed: {type(exc).__name__}: {exc}")
                log(notes[-1])
    if not args.no_memory and grpc_wanted:
        candidates = [s for s in args.sizes if s <= max(args.memory_rows, min(args.sizes))]
        rows = nearest(candidates, args.memory_rows)
        log(f"memory at {rows:,} rows ...")
        from benchmarks import memory

        try:
            results["memory"] = memory.measure(datasets[rows], work)
        except Exception as exc:
            notes.append(f"memory: failed: {type(exc).__name__}: {exc}")
            log(notes[-1])
    results["environment"]["load_average_end"] = os.getloadavg()
    results["environment"]["wall_seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    markdown = report.markdown(results)
    (args.out / "RESULTS.md").write_text(markdown, encoding="utf-8")
    try:
        report.plot(results, args.out / "latency.png")
    except ImportError as exc:
        notes.append(
            f"plot: skipped ({exc}); python3 -m pip install -r benchmarks/requirements.txt"
        )
        markdown = report.markdown(results)
        (args.out / "RESULTS.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    shutil.rmtree(work, ignore_errors=True)  # scratch ledgers, server logs and configs
    return 0


if __name__ == "__main__":
    sys.exit(main())
