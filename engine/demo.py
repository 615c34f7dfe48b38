"""`veil demo`: the whole engine on the embedded synthetic dataset, in one process.

It generates the seeded synthetic CTDC-like dataset, opens a ledger, registers a researcher, and
releases the tables of CTDC's child-trafficking brief through `Engine.release`, so each table is
charged durably before it is printed. A repeated table is replayed from the ledger at no charge.
It ends with the budget report and a verification of the audit log.
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from engine import synthetic
from engine.backend import DuckDBBackend
from engine.codebook import CELL_COLUMNS, default_codebook
from engine.engine import Engine
from engine.errors import BudgetExceededError
from engine.ledger import Ledger
from engine.loss import Accounting, PrivacyLoss, format_amount
from engine.query import Count, Eq, FlagCounts, Proportion, Query
from engine.release import Release

RESEARCHER = "demo-researcher"

TABLES: list[tuple[str, Query, str]] = [
    (
        "Relationship to recruiter, children and adults (flag counts)",
        Query(FlagCounts("recruiterRelation"), by=("majorityStatus",)),
        "1",
    ),
    (
        "Share of cases with family involvement in recruitment, by majority status",
        Query(
            Proportion(Eq("recruiterRelationFamily", 1)),
            by=("majorityStatus",),
            where=Eq("recruiterRelationUnknown", 0),
        ),
        "0.5",
    ),
    (
        "Type of exploitation of children, by gender (flag counts)",
        Query(FlagCounts("exploitationType"), by=("gender",), where=Eq("majorityStatus", "Minor")),
        "1",
    ),
    (
        "Share of children trafficked for sexual exploitation, by gender",
        Query(
            Proportion(Eq("isSexualExploit", 1)),
            by=("gender",),
            where=Eq("majorityStatus", "Minor"),
        ),
        "0.5",
    ),
    (
        "Means of control, children and adults (flag counts)",
        Query(FlagCounts("meansOfControl"), by=("majorityStatus",)),
        "1",
    ),
    (
        "Victims by citizenship region and year of registration",
        Query(Count(), by=("citizenshipRegion", "yearOfRegistration")),
        "0.5",
    ),
]


def add_demo_command(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="release the standard tables from the embedded synthetic dataset"
    )
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", type=Path, default=Path("var/demo"),
        help="where the data file and the ledger are kept (default var/demo); a rerun there "
        "gets the stored releases back, free",
    )
    parser.set_defaults(handler=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    codebook = default_codebook()
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"synthetic-{args.rows}-{args.seed}.duckdb"
    version = synthetic.data_version(codebook, rows=args.rows, seed=args.seed)
    if not synthetic.is_generated(data, codebook, rows=args.rows, seed=args.seed):
        started = time.perf_counter()
        synthetic.generate(data, rows=args.rows, seed=args.seed, codebook=codebook, overwrite=True)
        print(f"generated {args.rows:,} synthetic records in {time.perf_counter() - started:.1f} s")
    engine = Engine(DuckDBBackend(data), codebook=codebook)
    assert engine.data_version == version
    ledger = Ledger.open(
        workdir / "ledger.sqlite",
        accounting=Accounting.PURE_DP,
        dataset_cap=50,
        dataset=engine.dataset,
        data_version=engine.data_version,
        load_id=engine.load_id,
    )
    try:
        if RESEARCHER not in {c.client_id for c in ledger.list_clients()}:
            ledger.register_client(RESEARCHER, role="researcher", cap=20)
        print(
            f"dataset {engine.data_version}; "
            f"k = {engine.settings.k}, beta = {engine.settings.beta}\n"
        )
        for title, query, epsilon in TABLES:
            loss = PrivacyLoss.pure(epsilon)
            spent = ledger.spent(RESEARCHER)
            try:
                release = _release(engine, ledger, query, loss, epsilon)
            except BudgetExceededError as exc:
                print(
                    f"veil demo: {exc}. The ledger in {workdir} keeps the demo's budget over "
                    "every --rows and --seed run there (each is a new data version, paid for "
                    "afresh); give a new --workdir to start with a fresh budget",
                    file=sys.stderr,
                )
                return 1
            _print_release(title, release, charged=ledger.spent(RESEARCHER) - spent)
        # Asking again is free: the stored release comes back, with the same noise.
        title, query, epsilon = TABLES[0]
        again = engine.release(
            query,
            loss=PrivacyLoss.pure(epsilon),
            charger=ledger,
            client=RESEARCHER,
            request_id=f"demo:again:{time.time_ns()}",
        )
        print(
            f"asked again: release {again.metadata.release_id}, "
            "the stored one, replayed at no charge\n"
        )
        _print_report(ledger)
        verdict = ledger.verify()
        print(f"\naudit log: {verdict.message}")
        return 0 if verdict.ok else 1
    finally:
        ledger.close()


def _release(
    engine: Engine, ledger: Ledger, query: Query, loss: PrivacyLoss, epsilon: str
) -> Release:
    """`query` released to the demo's researcher at `loss`, charged to `ledger`."""
    return engine.release(
        query,
        loss=loss,
        charger=ledger,
        client=RESEARCHER,
        # Named by what is asked (the fingerprint carries the codebook and the suppression
        # rule) and of which data, so that a rerun replays, a ledger left by another build never
        # holds the id for another question, and a run at another --rows or --seed in the same
        # directory (another data version: a request id names one release on one data version)
        # is not refused as a conflict.
        request_id=(
            f"demo:{engine.data_version}:{engine.plan(query, loss=loss).fingerprint}:{epsilon}"
        ),
    )


def _print_release(title: str, release: Release, *, charged: Fraction) -> None:
    import pandas as pd  # here, not at the top: `veil --help` imports every command's module

    meta = release.metadata
    frame = release.table.to_pandas()
    proportion = meta.measure == "Proportion"
    shown = pd.DataFrame(
        {
            name: ["(missing)" if k is None else k for k in release.table[name].to_pylist()]
            for name in frame.columns
            if name not in CELL_COLUMNS
        }
    )
    shown["value"] = [
        _format(v, s, proportion) for v, s in zip(frame["value"], frame["suppressed"], strict=True)
    ]
    shown["95% interval"] = [
        "" if s else f"[{_number(lo, proportion)}, {_number(hi, proportion)}]"
        for lo, hi, s in zip(frame["ci_low"], frame["ci_high"], frame["suppressed"], strict=True)
    ]
    print(f"== {title}")
    print(shown.to_string(index=False))
    # A rerun in the same directory finds its ledger (--workdir) and gets the stored releases.
    cost = (
        f"charged epsilon {format_amount(charged)} (charge {meta.charge_id})"
        if charged
        else f"released before at epsilon {meta.loss}: returned free of charge"
    )
    print(
        f"   {meta.mechanism}, scale {meta.noise_scale:.3g}, tau {meta.tau}, "
        f"{meta.suppressed_cells} of {meta.cells} cells suppressed; {cost}\n"
    )


def _number(value: float, proportion: bool) -> str:
    return f"{100 * value:.1f}%" if proportion else f"{value:,.0f}"


def _format(value: Any, suppressed: bool, proportion: bool) -> str:
    return "suppressed" if suppressed else _number(float(value), proportion)


def _print_report(ledger: Ledger) -> None:
    report = ledger.report()
    print("== Budget (epsilon)")
    for scope in (*report.clients, report.dataset):
        cap = "no cap" if scope.cap is None else f"cap {format_amount(scope.cap)}"
        print(f"   {scope.kind} {scope.name}: spent {format_amount(scope.spent)}, {cap}")
