"""The benchmark's report: a markdown file with tables and targets, and a latency plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.stats import iqr, median, paired_ratio, paired_ratios

SMALL_TABLE = 1_000  # cells: the "small table" of the latency targets
PHASES = ("scan", "reserve", "commit")  # the timed parts of a fresh release, in order


def _opendp_library_bytes() -> int:
    try:
        import opendp

        path = Path(opendp.__file__).parent / "lib"
        return sum(f.stat().st_size for f in path.glob("*.so"))
    except (ImportError, OSError):
        return 0


OPENDP_LIBRARY = _opendp_library_bytes()
# (system, reference) pairs shown in the summary tables, in order, when present.
ORDER = (
    "raw_duckdb",
    "veil_answer",
    "veil_release",
    "veil_replay",
    "veil_grpc",
    "veil_grpc_replay",
    "opendp_polars",
    "smartnoise_sql",
    "grpc_floor",
    "opendp_sampler",
)


def _runs(results: dict[str, Any], rows: int, query: str, system: str) -> list[float]:
    for record in results["timings"]:
        if record["rows"] == rows and record["query"] == query and record["system"] == system:
            runs: list[float] = record["runs"]
            return runs
    return []


def _record(results: dict[str, Any], rows: int, query: str, system: str) -> dict[str, Any] | None:
    for record in results["timings"]:
        if record["rows"] == rows and record["query"] == query and record["system"] == system:
            return record  # type: ignore[no-any-return]
    return None


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"x{value:.2f}" if value < 10 else f"x{value:.0f}"


def _sum_pairs(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x + y for x, y in zip(a, b, strict=False)]


def _systems(results: dict[str, Any]) -> list[str]:
    present = {r["system"] for r in results["timings"]}
    names = [s for s in ORDER if s in present]
    names.extend(sorted(present - set(names)))
    return names


def _sizes(results: dict[str, Any]) -> list[int]:
    return sorted({r["rows"] for r in results["timings"]})


def _release_cells(results: dict[str, Any], rows: int, query: str) -> int | None:
    for system in ("veil_release", "veil_answer", "veil_grpc"):
        record = _record(results, rows, query, system)
        if record is not None and record.get("cells") is not None:
            cells: int = record["cells"]
            return cells
    return None


# ---- targets -----------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target of the benchmark; met is None when the
    measurement is missing."""
    out: list[tuple[str, str, bool | None]] = []
    rows = results["settings"]["target_rows"]
    queries = [q["key"] for q in results["queries"]]
    at = f"{rows:,} rows"

    def line(name: str, measured: str, met: bool | None) -> None:
        out.append((name, measured, met))

    for query in queries:
        raw = _runs(results, rows, query, "raw_duckdb")
        cells = _release_cells(results, rows, query)
        if cells is None or cells > SMALL_TABLE:
            continue
        release = _runs(results, rows, query, "veil_release")
        ratio = paired_ratio(release, raw)
        line(
            f"engine release, {query} ({cells} cells, {at}) <= 1.3x raw DuckDB",
            f"{_ratio(ratio)} ({_ms(median(release) if release else None)} vs "
            f"{_ms(median(raw) if raw else None)})",
            None if ratio is None else ratio <= 1.3,
        )
    for query in queries:
        raw = _runs(results, rows, query, "raw_duckdb")
        cells = _release_cells(results, rows, query)
        if cells is None or cells > SMALL_TABLE:
            continue
        grpc = _runs(results, rows, query, "veil_grpc")
        floor = _runs(results, rows, query, "grpc_floor")
        ratio = paired_ratio(grpc, _sum_pairs(raw, floor))
        line(
            f"gRPC end to end, {query} ({cells} cells, {at}) <= 1.3x (raw DuckDB + empty call)",
            f"{_ratio(ratio)} ({_ms(median(grpc) if grpc else None)} vs "
            f"{_ms(median(raw) if raw else None)} + {_ms(median(floor) if floor else None)})",
            None if ratio is None else ratio <= 1.3,
        )
    if "corridor" in queries:
        raw = _runs(results, rows, "corridor", "raw_duckdb")
        release = _runs(results, rows, "corridor", "veil_release")
        sampler = _runs(results, rows, "corridor", "opendp_sampler")
        cells = _release_cells(results, rows, "corridor")
        ratio = paired_ratio(release, _sum_pairs(raw, sampler))
        line(
            f"engine release, corridor ({cells} cells, {at}) <= 1.2x (raw DuckDB + OpenDP "
            f"sampler on one core)",
            f"{_ratio(ratio)} ({_ms(median(release) if release else None)} vs "
            f"{_ms(median(raw) if raw else None)} + {_ms(median(sampler) if sampler else None)})",
            None if ratio is None else ratio <= 1.2,
        )
        grpc = _runs(results, rows, "corridor", "veil_grpc")
        floor = _runs(results, rows, "corridor", "grpc_floor")
        if grpc:
            ratio = paired_ratio(grpc, _sum_pairs(_sum_pairs(raw, sampler), floor))
            line(
                f"gRPC end to end, corridor ({at}) <= 1.2x (raw DuckDB + sampler + empty call)",
                f"{_ratio(ratio)} ({_ms(median(grpc))})",
                None if ratio is None else ratio <= 1.2,
            )
    for library, factor, label in (("opendp_polars", 10.0, "OpenDP's Polars context"),
                                   ("smartnoise_sql", 1.0, "SmartNoise SQL")):
        for size in _sizes(results):
            for query in queries:
                record = _record(results, size, query, library)
                if record is None:
                    continue  # not run at this size (not chosen, or past --polars-max-rows)
                theirs = record["runs"]
                ours = _runs(results, size, query, "veil_release")
                need = factor
                if library == "smartnoise_sql" and query in ("means_of_control", "corridor"):
                    need = 10.0
                faster = "faster" if need == 1.0 else f"{need:.0f}x faster"
                name = f"veil release {faster} than {label}, {query}, {size:,} rows"
                if not theirs or not ours:
                    # Run, and failed: said so, rather than the target left out of the table.
                    failed = record.get("error") if not theirs else "veil_release has no runs"
                    line(name, f"not measured ({failed or 'no runs'})", None)
                    continue
                ratio = paired_ratio(theirs, ours)
                line(
                    name,
                    f"{_ratio(ratio)} ({_ms(median(theirs))} vs {_ms(median(ours))})",
                    None if ratio is None else ratio >= need if need > 1 else ratio > 1,
                )
    memory = results.get("memory")
    if memory:
        server = memory["server"]["total_VmHWM"]
        table_peak = memory["duckdb_table"]["VmHWM"]
        file_peak = memory["duckdb_file"]["VmHWM"]
        line(
            f"server peak memory, {memory['rows']:,} rows <= 1.5x DuckDB's footprint for the "
            f"table (a DuckDB process holding the whole table in memory)",
            f"x{server / table_peak:.2f}: server {server / 2**20:.0f} MiB, DuckDB "
            f"{table_peak / 2**20:.0f} MiB",
            server / table_peak <= 1.5,
        )
        line(
            f"stricter: server peak memory, {memory['rows']:,} rows <= 1.5x a DuckDB process "
            f"answering the same six queries from the same file",
            f"x{server / file_peak:.2f}: server {server / 2**20:.0f} MiB, DuckDB "
            f"{file_peak / 2**20:.0f} MiB",
            server / file_peak <= 1.5,
        )
        own = memory["server"]["VmHWM"] - memory["python_baseline"]["VmHWM"]
        theirs = file_peak - memory["duckdb_baseline"]["VmHWM"]
        line(
            "stricter, counting only the memory each process adds once its libraries are "
            "loaded: the server's <= 1.5x DuckDB's",
            f"x{own / theirs:.2f}: server {own / 2**20:.0f} MiB over its "
            f"{memory['python_baseline']['VmHWM'] / 2**20:.0f} MiB of libraries"
            f"{_children_text(memory['server'])}, DuckDB "
            f"{theirs / 2**20:.0f} MiB over {memory['duckdb_baseline']['VmHWM'] / 2**20:.0f} MiB",
            own <= 1.5 * theirs,
        )
    for throughput in results.get("throughput") or []:
        fresh = {r["clients"]: r for r in throughput["fresh"]}
        replay = {r["clients"]: r for r in throughput["replay"]}
        alone = {r["clients"]: r for r in throughput.get("duckdb_alone", [])}
        if 8 in fresh:
            rate = fresh[8]["per_second"]
            replays = replay.get(8, {}).get("per_second")
            bound = alone.get(8, {}).get("per_second")
            line(
                f"throughput, 8 clients, small fresh releases ({throughput['rows']:,} rows) "
                f">= 200/s",
                f"{rate:.0f}/s (replays: "
                f"{'-' if replays is None else f'{replays:.0f}/s'}; DuckDB alone, no privacy: "
                f"{'-' if bound is None else f'{bound:.0f} statements/s'})",
                rate >= 200,
            )
    return out


# ---- markdown ----------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    settings = results["settings"]
    lines = ["# veil benchmark results", ""]
    load_start = ", ".join(f"{x:.2f}" for x in env["load_average_start"])
    load_end = ", ".join(f"{x:.2f}" for x in env.get("load_average_end", ()))
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    lines += [
        f"Run {env['started']} at commit {env.get('git', 'unknown')}, on "
        f"{env['cpu'] or 'an unknown CPU'}, {env['cores']} cores, "
        f"{env['memory_bytes'] / 2**30:.0f} GiB, Python {env['python']}; {packages}.",
        f"Load average at the start {load_start}, at the end {load_end or '-'}; the run took "
        f"{env.get('wall_seconds', 0) / 60:.1f} min.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Every figure is the median of the timed runs after one warm-up run, with the "
        f"interquartile range; xraw is the median over runs of (the system's i-th run / raw "
        f"DuckDB's i-th run), the runs made one right after the other. Up to "
        f"{settings['repeats']} runs per query; a slow system gets as many as "
        f"{settings['budget_seconds']:g} s allow (at least one): the detail tables give the "
        f"count. Privacy loss per query: epsilon {settings['epsilon']:g}.",
        "",
        "## Systems",
        "",
        "| name | what it measures |",
        "|---|---|",
    ]
    for name in _systems(results):
        label = results["systems"].get(name, {}).get("label", "")
        lines.append(f"| {name} | {label} |")
    lines += ["", "Workload:", ""]
    for index, query in enumerate(results["queries"], 1):
        lines.append(f"{index}. `{query['key']}`: {query['title']}")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, met in targets(results):
        verdict = "not measured" if met is None else ("met" if met else "**not met**")
        lines.append(f"| {name} | {measured} | {verdict} |")
    for size in _sizes(results):
        lines += _size_section(results, size)
    lines += _phases_section(results)
    lines += _throughput_section(results)
    lines += _memory_section(results)
    if results.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in dict.fromkeys(results["notes"])]
    lines += [
        "",
        "What each system releases differs: veil and OpenDP (joined with the codebook's keys) "
        "answer every cell of the public domain, zero cells included; raw DuckDB returns the "
        "keys present in the data; SmartNoise SQL returns the keys present in the data whose "
        "noisy count passes its delta-based threshold. The cells columns say how many.",
        "",
    ]
    return "\n".join(lines)


def _size_section(results: dict[str, Any], size: int) -> list[str]:
    systems = _systems(results)
    queries = [q["key"] for q in results["queries"]]
    lines = ["", f"## Latency at {size:,} rows", ""]
    lines.append("| query | cells | " + " | ".join(systems) + " |")
    lines.append("|---|---:|" + "---:|" * len(systems))
    for query in queries:
        raw = _runs(results, size, query, "raw_duckdb")
        cells = _release_cells(results, size, query)
        row = [query, "-" if cells is None else f"{cells:,}"]
        for system in systems:
            record = _record(results, size, query, system)
            runs = record["runs"] if record else []
            if record is None:
                row.append("")
            elif not runs:
                row.append("error" if record.get("error") else "-")
            elif system == "raw_duckdb":
                row.append(_ms(median(runs)))
            else:
                row.append(f"{_ms(median(runs))} {_ratio(paired_ratio(runs, raw))}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "<details><summary>runs, spreads and cells released</summary>",
        "",
        "| query | system | runs | median | IQR | xraw (runs paired) | min-max xraw | cells |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for query in queries:
        raw = _runs(results, size, query, "raw_duckdb")
        for system in systems:
            record = _record(results, size, query, system)
            if record is None:
                continue
            runs = record["runs"]
            if not runs:
                error = str(record.get("error") or "no run").replace("|", "/")[:200]
                lines.append(f"| {query} | {system} | 0 | {error} | | | | |")
                continue
            q1, q3 = iqr(runs)
            ratios = paired_ratios(runs, raw)
            spread = f"{_ratio(min(ratios))} - {_ratio(max(ratios))}" if ratios else "-"
            cells = record.get("cells")
            lines.append(
                f"| {query} | {system} | {len(runs)} | {_ms(median(runs))} | "
                f"{_ms(q1)} - {_ms(q3)} | {_ratio(paired_ratio(runs, raw))} | {spread} | "
                f"{'-' if cells is None else f'{cells:,}'} |"
            )
    lines += ["", "</details>"]
    return lines


def _phases_section(results: dict[str, Any]) -> list[str]:
    """Where a fresh in-process release's time goes at the targets' size, small tables only,
    set against what the 1.3x target leaves beyond raw DuckDB."""
    rows = results["settings"]["target_rows"]
    body = []
    for query in (q["key"] for q in results["queries"]):
        record = _record(results, rows, query, "veil_release")
        raw = _runs(results, rows, query, "raw_duckdb")
        cells = _release_cells(results, rows, query)
        phases = (record or {}).get("phases")
        if not phases or not raw or cells is None or cells > SMALL_TABLE:
            continue
        parts = {name: median([p[name] for p in phases]) for name in PHASES}
        rest = median([p["total"] - sum(p[name] for name in PHASES) for p in phases])
        total = median([p["total"] for p in phases])
        body.append(
            f"| {query} | {_ms(median(raw))} | {_ms(total)} | "
            + " | ".join(_ms(parts[name]) for name in PHASES)
            + f" | {_ms(rest)} | {_ms(total - median(raw))} | {_ms(0.3 * median(raw))} |"
        )
    if not body:
        return []
    return [
        "",
        f"## Where a fresh release's time goes ({rows:,} rows, in-process)",
        "",
        "Each veil_release run timed at the engine's two seams: its backend (the scan) and its "
        "charger (the ledger's reservation, and its commit, which stores the release, turns the "
        "hold into a charge and syncs the ledger to disk before the release may leave). The rest "
        "is the plan, any noise still being drawn when the scan ends, suppression and the "
        "answer's table. Medians over the runs; the last column is what the 1.3x target leaves "
        "beyond raw DuckDB.",
        "",
        "| query | raw_duckdb | veil_release | scan | ledger: reserve | ledger: commit | the rest "
        "| over raw DuckDB | 1.3x leaves |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *body,
    ]


def _throughput_section(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for throughput in results.get("throughput") or []:
        lines += _throughput_table(throughput)
    return lines


def _throughput_table(throughput: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Transport floor and throughput ({throughput['rows']:,} rows, server in its own "
        f"process)",
        "",
        "| empty call | calls | median | p95 |",
        "|---|---:|---:|---:|",
    ]
    for name, figures in throughput["floor"].items():
        lines.append(
            f"| {name} | {figures['calls']} | {_ms(figures['median'])} | {_ms(figures['p95'])} |"
        )
    lines += [
        "",
        "| load | clients | releases | per second | median latency | p95 latency | errors |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind in ("fresh", "replay"):
        for run in throughput[kind]:
            errors = ", ".join(f"{k}: {v}" for k, v in run["errors"].items()) or "none"
            lines.append(
                f"| {kind} | {run['clients']} | {run['releases']} | {run['per_second']:.0f} | "
                f"{_ms(run['latency_median'])} | {_ms(run['latency_p95'])} | {errors} |"
            )
    for run in throughput.get("duckdb_alone", []):
        lines.append(
            f"| DuckDB alone (the statements, no privacy, no server) | {run['clients']} | "
            f"{run['statements']} | {run['per_second']:.0f} | - | - | - |"
        )
    for key, label in (
        ("engine_alone", "veil's engine alone (answers, no ledger, no server)"),
        ("engine_ledger", "veil's engine and ledger (fresh charged releases, no server)"),
    ):
        for run in throughput.get(key, []):
            lines.append(
                f"| {label} | {run['clients']} | {run['releases']} | "
                f"{run['per_second']:.0f} | - | - | - |"
            )
    memory = throughput.get("server_memory")
    if memory:
        lines += [
            "",
            f"Server memory after these runs: {memory['VmRSS'] / 2**20:.0f} MiB resident, "
            f"peak {memory['VmHWM'] / 2**20:.0f} MiB. From `veil serve` starting to listening: "
            f"{throughput.get('startup_seconds', 0):.1f} s.",
        ]
    return lines


def _memory_section(results: dict[str, Any]) -> list[str]:
    memory = results.get("memory")
    if not memory:
        return []

    def mib(value: int) -> str:
        return f"{value / 2**20:.0f} MiB"

    lines = [
        "",
        f"## Memory ({memory['rows']:,} rows; data file {mib(memory['file_bytes'])})",
        "",
        "| process | peak resident (VmHWM) | resident at the end (VmRSS) | DuckDB's own count |",
        "|---|---:|---:|---:|",
    ]
    rows = (
        ("veil server, idle after start", memory["server_idle"], None),
        ("veil server, after the workload twice", memory["server"], None),
        ("processes the server started, added up", {
            "VmHWM": memory["server"]["children_VmHWM"],
            "VmRSS": memory["server"]["children_VmRSS"],
        }, None),
        ("DuckDB on the file, same six queries twice", memory["duckdb_file"],
         memory["duckdb_file"].get("duckdb_memory")),
        ("DuckDB holding the whole table in memory", memory["duckdb_table"],
         memory["duckdb_table"].get("duckdb_memory")),
        ("Python with the server's imports, no data", memory["python_baseline"], None),
        ("Python with DuckDB imported, no data", memory["duckdb_baseline"], None),
    )
    for label, figures, own in rows:
        lines.append(
            f"| {label} | {mib(figures['VmHWM'])} | {mib(figures['VmRSS'])} | "
            f"{'' if own is None else mib(own)} |"
        )
    server = memory["server"]
    lines += [
        "",
        f"The server's figure in the targets is its own peak plus its {server['children']} "
        f"child process(es)' peaks: {mib(server['total_VmHWM'])}. Resident sizes count the "
        f"pages of shared libraries (OpenDP's is {mib(OPENDP_LIBRARY)} on disk) in every "
        f"process that maps them; counted once (PSS), the server and its children hold "
        f"{mib(server['total_Pss'])} at the end.",
    ]
    return lines


# ---- the plot ----------------------------------------------------------------------------------

COLOURS = {
    "raw_duckdb": "black",
    "veil_answer": "tab:cyan",
    "veil_release": "tab:blue",
    "veil_replay": "tab:purple",
    "veil_grpc": "tab:green",
    "veil_grpc_replay": "tab:olive",
    "opendp_polars": "tab:red",
    "smartnoise_sql": "tab:orange",
    "grpc_floor": "tab:gray",
    "opendp_sampler": "tab:brown",
}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = results["queries"]
    sizes = _sizes(results)
    systems = _systems(results)
    columns = 3
    rows = (len(queries) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.0 * rows), squeeze=False)
    palette = plt.get_cmap("tab20")
    for index, query in enumerate(queries):
        axis = axes[index // columns][index % columns]
        for number, system in enumerate(systems):
            xs, ys = [], []
            for size in sizes:
                runs = _runs(results, size, query["key"], system)
                if runs:
                    xs.append(size)
                    ys.append(median(runs) * 1000)
            if not xs:
                continue
            reference = results["systems"].get(system, {}).get("reference", False)
            axis.plot(
                xs, ys, marker="o", markersize=3, label=system,
                color=COLOURS.get(system, palette(number % 20)),
                linestyle="--" if reference else "-", linewidth=1.0 if reference else 1.6,
            )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(query["title"], fontsize=9)
        axis.set_xlabel("rows")
        axis.set_ylabel("latency (ms, median)")
        axis.grid(True, which="both", linewidth=0.3)
    for index in range(len(queries), rows * columns):
        axes[index // columns][index % columns].axis("off")
    seen: dict[str, Any] = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    labels = list(seen)
    handles = [seen[label] for label in labels]
    figure.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    figure.suptitle("veil and baselines: latency against table size (dashed: references)")
    figure.tight_layout(rect=(0, 0.07, 1, 0.96))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Rewrite RESULTS.md and latency.png from a results.json: `python3 -m benchmarks.report
    benchmarks/results/results.json`."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python3 -m benchmarks.report RESULTS_JSON", file=sys.stderr)
        return 2
    source = Path(args[0])
    results = json.loads(source.read_text(encoding="utf-8"))
    (source.parent / "RESULTS.md").write_text(markdown(results), encoding="utf-8")
    plot(results, source.parent / "latency.png")
    return 0


def _children_text(server: dict[str, Any]) -> str:
    """The server's child processes, if it started any (it draws noise on threads)."""
    if not server.get("children"):
        return ""
    return (
        f" (and {server['children_VmHWM'] / 2**20:.0f} MiB in {server['children']} child "
        f"processes)"
    )


if __name__ == "__main__":
    raise SystemExit(main())

