"""`veil load`, the custodian's command that loads a source file into a new data file.

`add_load_command(subparsers)` declares its arguments and sets its handler, `run_load`, which
prints the load report and returns the exit status; `veil_cli` hands the command here. A load
the engine refuses prints the reason to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.codebook import load_codebook
from engine.errors import DataFileExistsError, VeilError
from engine.loader import load

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
