"""The custodian's commands on the records themselves: `veil load`, `veil synth`, `veil risk`.

Each `add_..._command(subparsers)` declares a command's arguments and sets its handler, which
prints what the command made and returns the exit status; `veil_cli` hands the commands here. A
command the engine refuses prints the reason to stderr and exits with status 2. (`veil ledger`
is `engine.ledger_cli`; `veil demo`, the main job, is `engine.demo`.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from engine.codebook import load_codebook
from engine.data_file import RESTRICTED_NOTICE
from engine.errors import DataFileExistsError, VeilError
from engine.loader import load
from engine.risk import assess_path
from engine.synthetic import generate

EXIT_OK = 0
EXIT_REFUSED = 2


def add_load_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """`veil load SOURCE DATABASE`: load a CSV or Parquet file into a new data file."""
    parser = subparsers.add_parser(
        "load",
        help="load a CSV or Parquet source file into a new data file",
        description=(
            "Load a CSV (.csv, .csv.gz) or Parquet file into a new DuckDB data file typed from "
            "the codebook, and print the load report. Strict mode (the default) refuses a file "
            "with values outside the codebook domain, a codebook variable missing or an unknown "
            "column holding data; --lenient stores such values as missing and reports them."
        ),
    )
    parser.add_argument("source", type=Path, help="the source file (.csv, .csv.gz, .parquet)")
    parser.add_argument("database", type=Path, help="the DuckDB data file to create")
    parser.add_argument(
        "--codebook",
        default="ctdc_v7",
        help="a shipped codebook name or a codebook YAML path (default: ctdc_v7)",
    )
    parser.add_argument(
        "--lenient",
        action="store_true",
        help="store out-of-domain values as missing, load absent variables as missing, and "
        "ignore unknown columns, reporting all of it",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DATABASE if it exists")
    parser.add_argument(
        "--data-version",
        default=None,
        help="the data version to record; every client is told it (default: codebook@version: "
        "and 16 random hex digits, new at every load: a digest of SOURCE would identify it)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="the dataset the records belong to, the same for every version of them: all its "
        "versions are paid for from one dataset budget (default: the codebook's name)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars on stderr (default: when stderr is a terminal)",
    )
    parser.set_defaults(handler=run_load)
    return parser


def run_load(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        report = load(
            args.source,
            args.database,
            codebook=load_codebook(args.codebook),
            strict=not args.lenient,
            overwrite=args.overwrite,
            data_version=args.data_version,
            dataset=args.dataset,
            progress=progress,
        )
    except DataFileExistsError as exc:
        print(exc.for_shell("veil load"), file=sys.stderr)
        return EXIT_REFUSED
    except VeilError as exc:  # a refused load: the reason, not a traceback
        print(f"veil load: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    sys.stdout.write(report.render())
    return EXIT_OK


# ---- `veil synth` ----------------------------------------------------------------------------


def add_synth_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """`veil synth DATABASE --rows N [--seed S] [--overwrite]`; sets `handler(args) -> status`."""
    parser = subparsers.add_parser(
        "synth",
        help="write a data file of synthetic CTDC-like records (demo, tests, benchmarks)",
        description=(
            "Write a new DuckDB data file of synthetic CTDC-like records, typed from the codebook, "
            "and print its data version and the time taken. The same rows and seed always give "
            "the same records."
        ),
    )
    parser.add_argument("database", type=Path, help="the DuckDB data file to create")
    parser.add_argument("--rows", type=_count, required=True, help="number of records")
    parser.add_argument("--seed", type=_count, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--codebook",
        default="ctdc_v7",
        help="a shipped codebook name or a codebook YAML path (default: ctdc_v7)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DATABASE if it exists")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    parser.set_defaults(handler=run_synth)
    return parser


def run_synth(args: argparse.Namespace) -> int:
    """Handler of `veil synth`: 0 on success, 2 when the engine refuses (file exists, ...)."""
    started = time.perf_counter()
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        version = generate(
            args.database,
            rows=args.rows,
            seed=args.seed,
            codebook=load_codebook(args.codebook),
            overwrite=args.overwrite,
            progress=progress,
        )
    except DataFileExistsError as exc:
        print(exc.for_shell("veil synth"), file=sys.stderr)
        return 2
    except VeilError as exc:
        print(f"veil synth: {exc}", file=sys.stderr)
        return 2
    print(f"{version} ({time.perf_counter() - started:.1f} s)")
    return 0


def _count(text: str) -> int:
    """A non-negative integer; underscores are allowed (10_000_000)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


# ---- `veil risk` ---------------------------------------------------------------------------------


def add_risk_command(subparsers: Any) -> argparse.ArgumentParser:
    """`veil risk DATA`: k-anonymity, uniques, l-diversity and drivers of a record-level file."""
    parser = subparsers.add_parser(
        "risk",
        help="disclosure-risk report of a data file or a file about to be published",
        description=(
            "Report the k-anonymity level, the records in classes smaller than k, the sample "
            "uniques and the l-diversity of sensitive variables for a set of quasi-identifiers, "
            "and which quasi-identifiers drive the risk. DATA is a veil data file (.duckdb) or a "
            "CSV/Parquet file, which is loaded leniently (values outside the codebook count as "
            "missing, and the report says how many). Exits 0 when the file is k-anonymous, 1 "
            "when it is not, 2 when it cannot be assessed."
        ),
    )
    parser.add_argument("data", type=Path, help="a veil data file, or a .csv/.csv.gz/.parquet")
    parser.add_argument(
        "--qi",
        default=None,
        help="comma-separated quasi-identifiers (default: the codebook's disclosure_risk list; "
        "ctdc_v7's is gender,ageBroad,citizenship,CountryOfExploitation,yearOfRegistration,"
        "Datasource)",
    )
    parser.add_argument(
        "--sensitive",
        default=None,
        help="comma-separated sensitive variables for l-diversity; empty for none (default: the "
        "codebook's; ctdc_v7's is isForcedLabour,isSexualExploit)",
    )
    parser.add_argument(
        "--k", type=int, default=None, help="minimum class size (default: the codebook's, 10)"
    )
    parser.add_argument(
        "--codebook", default="ctdc_v7", help="a shipped codebook name or a codebook YAML path"
    )
    parser.add_argument("--format", choices=("text", "json", "csv"), default="text")
    parser.set_defaults(handler=run_risk)
    return parser  # type: ignore[no-any-return]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run_risk(args: argparse.Namespace) -> int:
    try:
        codebook = load_codebook(args.codebook)
        k = args.k if args.k is not None else codebook.min_cell_size
        report = assess_path(
            args.data,
            codebook=codebook,
            qis=codebook.quasi_identifiers if args.qi is None else _names(args.qi),
            sensitive=codebook.sensitive if args.sensitive is None else _names(args.sensitive),
            k=k,
        )
    except VeilError as exc:
        print(f"veil risk: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
    elif args.format == "csv":
        print(RESTRICTED_NOTICE, file=sys.stderr)  # on its own stream: the CSV stays plain
        sys.stdout.write(report.to_csv())
    else:
        sys.stdout.write(report.render())
    return 0 if report.k_anonymous else 1
