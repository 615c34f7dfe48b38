"""`veil ledger verify LEDGER` and `veil ledger report LEDGER`: the auditor's commands.

Both open the ledger read-only, so they can run while the server holds it for writing. The report
verifies the ledger first: totals read from a ledger that does not verify are not to be trusted.

    parser = argparse.ArgumentParser(prog="veil")
    add_ledger_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    sys.exit(args.handler(args))
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from engine.audit_report import describe_query
from engine.errors import VeilError
from engine.ledger import ClientRecord, Ledger, LedgerReport, ScopeBudget
from engine.loss import Accounting, format_amount


def add_ledger_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `ledger verify` and `ledger report`; each sets `handler(args) -> exit status`."""
    ledger = subparsers.add_parser(
        "ledger",
        help="verify or report on a privacy-budget ledger",
        description="Verify a privacy-budget ledger or report on its budgets and releases.",
    )
    commands = ledger.add_subparsers(dest="ledger_command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="check the audit log's hash chain and reconcile it with the ledger",
        description=(
            "Walk the audit log's hash chain, replay the budget movements and administrative "
            "changes it records and reconcile them with the totals, the charges, the stored "
            "release bytes, the client registry, the institution caps and the dataset cap. Exits 0 "
            "when everything verifies, 1 when something does not (the first broken or missing "
            "entry is named), 2 when the ledger cannot be read."
        ),
    )
    verify.add_argument("ledger", help="path of the ledger database")
    verify.add_argument(
        "--expect-head",
        metavar="SEQ:HASH",
        help="a head recorded earlier (from `report`); catches a log rewritten since then",
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=run_verify)

    report = commands.add_parser(
        "report",
        help="spent and remaining budget per client and institution, and the dataset's",
        description=(
            "Print spent and remaining budget per client (with its status: active, or revoked "
            "and when), per institution and for the dataset over all its data versions (exact "
            "amounts, and the (epsilon, delta) equivalent under zCDP), and optionally every "
            "stored release with its charge. The ledger is verified first, as by `verify`: "
            "exits 0 when it verifies, 1 when it does not (the report is printed, with a "
            "warning), 2 when the ledger cannot be read."
        ),
    )
    report.add_argument("ledger", help="path of the ledger database")
    report.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the verification (it reads the whole audit log and every stored release); "
        "the report then says it is unverified",
    )
    report.add_argument("--releases", action="store_true", help="also list the stored releases")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(handler=run_report)
    return ledger  # type: ignore[no-any-return]


def run_verify(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        with Ledger.open_readonly(args.ledger) as ledger:
            result = ledger.verify(expect_head=args.expect_head)
    except VeilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2), file=out)
    else:
        print(result.message, file=out)
        for problem in result.problems[1:]:
            print(f"  also: {problem}", file=out)
    return 0 if result.ok else 1


def run_report(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        with Ledger.open_readonly(args.ledger) as ledger:
            verified = None if args.no_verify else ledger.verify()
            report = ledger.report()
            clients = {c.client_id: c for c in ledger.list_clients()}
            releases = ledger.releases() if args.releases else []
    except VeilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = 1 if verified is not None and not verified.ok else 0
    note = (
        f"not verified: run `veil ledger verify {args.ledger}`"
        if verified is None
        else verified.message
    )
    if status:
        print(
            "warning: these totals are read from a ledger that does not verify; "
            f"`veil ledger verify {args.ledger}` lists every problem",
            file=sys.stderr,
        )
    if args.json:
        data = report.to_dict()
        data["verification"] = None if verified is None else verified.to_dict()
        for row in data["clients"]:
            client = clients.get(row["name"])
            row["status"] = None if client is None else client.status
            row["revoked_at"] = None if client is None else client.revoked_at
        if args.releases:
            data["releases"] = [
                {
                    "release_id": r.release_id,
                    "charge_id": r.charge_id,
                    "client": r.client,
                    "fingerprint": r.fingerprint,
                    "canonical_query": r.canonical_query,
                    "data_version": r.data_version,
                    "loss": format_amount(r.loss),
                    "created_at": r.created_at,
                    "sha256": r.sha256,
                    "replays": r.replays,
                }
                for r in releases
            ]
        print(json.dumps(data, indent=2), file=out)
        return status
    print(note, file=out)  # first: a report of a ledger that does not verify says so at once
    print(format_report(report, clients), file=out)
    if args.releases:
        print("", file=out)
        print(f"releases ({len(releases)})", file=out)
        for r in releases:
            print(
                f"  {r.created_at}  {r.release_id}  {r.client:<16} "
                f"{format_amount(r.loss):>10}  replays {r.replays:<4} {r.data_version}  "
                f"{describe_query(r.canonical_query)}",
                file=out,
            )
    return status


def format_report(
    report: LedgerReport, clients: Mapping[str, ClientRecord] | None = None
) -> str:
    """The report as aligned text, exact amounts first; with `clients` (by id), each client's
    row ends with its status: active, or revoked and when."""
    unit = report.accounting.unit
    zcdp = report.accounting is Accounting.ZCDP
    lines = [f"accounting: {report.accounting.value} (amounts in {unit})"]
    if zcdp:
        lines[0] += f"; epsilon equivalents at delta={report.delta:g}"
    header = f"  {'name':<24} {'cap':>12} {'spent':>12} {'held':>10} {'remaining':>12}"
    if zcdp:
        header += f" {'spent eps':>10} {'cap eps':>10}"
    for title, scopes in (
        ("clients", report.clients),
        ("institutions", report.institutions),
        ("dataset (all its data versions)", (report.dataset,)),
    ):
        lines.append("")
        lines.append(title)
        marks = clients if title == "clients" else None
        lines.append(header if marks is None else f"{header} status")
        for scope in scopes:
            row = _row(scope, report)
            lines.append(row if marks is None else f"{row} {_status(marks.get(scope.name))}")
    lines.append("")
    lines.append(f"audit head: {report.head_seq}:{report.head_hash}")
    return "\n".join(lines)


def _status(client: ClientRecord | None) -> str:
    if client is None:
        return "-"
    if client.status == "revoked":
        return f"revoked {client.revoked_at}" if client.revoked_at else "revoked"
    return client.status


def _row(scope: ScopeBudget, report: LedgerReport) -> str:
    def text(value: Any) -> str:
        return "-" if value is None else format_amount(value)

    line = (
        f"  {scope.name:<24} {text(scope.cap):>12} {text(scope.spent):>12} "
        f"{text(scope.held):>10} {text(scope.remaining):>12}"
    )
    if report.accounting is Accounting.ZCDP:
        data = scope.to_dict(report.accounting, report.delta)
        cap_eps = "-" if data["cap_epsilon"] is None else f"{data['cap_epsilon']:.4g}"
        line += f" {data['spent_epsilon']:>10.4g} {cap_eps:>10}"
    return line


def main(argv: list[str] | None = None) -> int:
    """Run the ledger commands on their own: `python -m engine.ledger_cli ledger verify PATH`."""
    parser = argparse.ArgumentParser(prog="veil")
    add_ledger_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
