"""The auditor's commands: `veil audit report|tables` and `veil attack`.

    veil audit report ledger.sqlite --out report.html      # from the ledger file, read-only
    veil audit report --server HOST:PORT --out report.html # from a live server (auditor token)
    veil audit tables ledger.sqlite --out audit-tables/    # the same tables as CSV
    veil audit report ledger.sqlite --expect-head SEQ:HASH --out report.html  # head pinned
    veil attack --server HOST:PORT --truth data.duckdb     # the attack suite against a server

The connection options are those of `veil query` and `veil admin`: --server (default
$VEIL_SERVER), the token from --token-file or VEIL_TOKEN (or --token, which the shell history
keeps), --ca-cert (default $VEIL_CA_CERT) for a TLS server (--tls-ca is its earlier name),
--client-cert and --client-key for one that requires mutual TLS, and --timeout for each call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.cli import add_server_options, tls_of, token_of, write_replacing
from client.connection import ADDRESS_ENV, TLS
from client.errors import CA_CERT_ENV, AuthenticationError, unavailable_message
from engine.audit_report import TABLE_NAMES, AuditTables, build_tables, render_html
from engine.errors import LedgerIntegrityError, VeilError
from engine.ledger import Ledger

if TYPE_CHECKING:
    from audit.attacks import Summary
    from audit.wire import Refused

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2
# `veil attack`: no breach found, but some selected attack did not run or could not have shown one.
EXIT_INCOMPLETE = 3


def _token(args: argparse.Namespace) -> str:
    try:
        return token_of(args)
    except (AuthenticationError, OSError) as exc:
        print(f"veil {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None  # not 1, which says a breach or a failed check


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection options of `veil query` and `veil admin` (client.cli's), but that the
    server has no default beyond $VEIL_SERVER: an auditor names the server they audit."""
    group = parser.add_argument_group("connection")
    add_server_options(group, server_help=f"a live veil server (default ${ADDRESS_ENV})")
    # The earlier name of --ca-cert, kept for the scripts that use it.
    group.add_argument("--tls-ca", dest="ca_cert", type=Path, help=argparse.SUPPRESS)


def _refusal(exc: Refused, server: str, args: argparse.Namespace) -> str:
    """What a call to `server` that failed with `exc` means, in the shell's words: a server
    that cannot be reached (down, a wrong port, TLS on one side only), that did not answer in
    time or whose ledger fails verification is not a server that refused."""
    import grpc

    from audit.wire import uses_tls

    if exc.code == grpc.StatusCode.UNAVAILABLE:
        return unavailable_message(
            exc.message,
            server,
            tls=uses_tls(server, tls_of(args)),
            client_certificate=args.client_cert is not None,
            # No --tls here: to a loopback address, naming the CA is what turns TLS on.
            turn_on_tls=f"pass --ca-cert PEM or set {CA_CERT_ENV}, naming the CA that signed "
            "its certificate",
        )
    if exc.code == grpc.StatusCode.DATA_LOSS:
        return f"the veil server's ledger fails verification: {exc.message}"
    if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"the veil server at {server} did not answer within {args.timeout:g} s "
            f"(--timeout): {exc.message}"
        )
    return f"the server refused: {exc}"


def _server(args: argparse.Namespace) -> str | None:
    """--server, else $VEIL_SERVER, else None."""
    return args.server or os.environ.get(ADDRESS_ENV) or None


# ---- veil audit ----------------------------------------------------------------------------------


def add_audit_command(subparsers: Any) -> argparse.ArgumentParser:
    """`veil audit report` and `veil audit tables`."""
    parser = subparsers.add_parser(
        "audit",
        help="the auditor's report and tables of spending and releases",
        description=(
            "Build the auditor's tables (budgets, spending over time, releases with their "
            "charge, mechanism, tau and suppressed share, repeated queries, replays, refusals, "
            "administrative changes and who made them, and the audit log's verification) from a "
            "ledger file, opened read-only, or from a "
            "live server with an auditor's token; write them as CSV or as a one-page HTML report. "
            "Exit status 1 when the ledger fails verification or a stored release is altered or "
            "unreadable (the tables and report are still written), 2 on an error."
        ),
    )
    commands = parser.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("report", "a one-page HTML report with plots of spending over time"),
        ("tables", "every table as CSV, plus summary.json"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("ledger", nargs="?", type=Path, help="the ledger file")
        _connection_arguments(command)
        command.add_argument(
            "--out",
            type=Path,
            required=True,
            help="the HTML file to write" if name == "report" else "the directory to write",
        )
        if name == "tables":
            command.add_argument(
                "--table", action="append", choices=TABLE_NAMES, help="only these tables"
            )
        command.add_argument(
            "--expect-head",
            type=_head,
            metavar="SEQ:HASH",
            help="a head of the audit log recorded earlier outside the ledger (`veil ledger "
            "report`); catches a log rewritten since then. A ledger file only: the Audit "
            "service does not take one",
        )
        command.set_defaults(handler=run_audit)
    return parser  # type: ignore[no-any-return]


def _head(text: str) -> str:
    """An audit head as `veil ledger report` prints it: a mistyped one is not a rewritten log."""
    if not re.fullmatch(r"[0-9]+:[0-9a-fA-F]{64}", text.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an audit head: SEQ:HASH, the entry number and its 64 hex digits, "
            "as `veil ledger report` prints it"
        )
    return text.strip().lower()


def fetch_tables(
    server: str,
    token: str,
    *,
    names: list[str] | None = None,
    tls: TLS | None = None,
    timeout: float = 120.0,
) -> AuditTables:
    """The auditor's tables from a live server (Audit.GetAuditTables)."""
    from audit.wire import Target
    from protos.veil.v1 import veil_pb2 as pb

    with Target(server, token, tls=tls, timeout=timeout) as target:
        response = target.call(
            target.audit.GetAuditTables, pb.GetAuditTablesRequest(tables=names or [])
        )
    return AuditTables.from_ipc({t.name: t.arrow_ipc for t in response.tables})


def run_audit(args: argparse.Namespace) -> int:
    names = getattr(args, "table", None)
    try:
        # $VEIL_SERVER is --server's default: a ledger file named on the line comes first.
        server = _server(args)
        if args.ledger is not None:
            if args.server is not None:
                print("veil audit: give a ledger file or --server, not both", file=sys.stderr)
                return EXIT_ERROR
            with Ledger.open_readonly(args.ledger) as ledger:
                try:
                    tables = build_tables(
                        ledger, names=names or TABLE_NAMES, expect_head=args.expect_head
                    )
                except LedgerIntegrityError:
                    # A value the ledger never writes (an amount that is not a number) leaves
                    # no table to build; verification names what is wrong with the file.
                    verification = ledger.verify(expect_head=args.expect_head)
                    if verification.ok:
                        raise
                    print(
                        f"veil audit: no table can be built from {args.ledger}: "
                        f"{verification.message}; run `veil ledger verify {args.ledger}` for "
                        "every problem",
                        file=sys.stderr,
                    )
                    return EXIT_FOUND
        elif server is None:
            print(
                f"veil audit: give a ledger file or --server HOST:PORT (or set {ADDRESS_ENV}): "
                "one of them is needed",
                file=sys.stderr,
            )
            return EXIT_ERROR
        elif args.expect_head is not None:
            # GetAuditTables takes no head: the server would verify against its own, unpinned.
            print(
                "veil audit: --expect-head needs the ledger file; the Audit service cannot check "
                "a pinned head (copy the ledger file and audit the copy, or run `veil ledger "
                "verify --expect-head` where the ledger is)",
                file=sys.stderr,
            )
            return EXIT_ERROR
        else:
            from audit.wire import Refused

            try:
                tables = fetch_tables(
                    server, _token(args), names=names, tls=tls_of(args), timeout=args.timeout
                )
            except Refused as exc:
                import grpc

                print(f"veil audit: {_refusal(exc, server, args)}", file=sys.stderr)
                # As from a ledger file that fails verification: found, not an error.
                return EXIT_FOUND if exc.code == grpc.StatusCode.DATA_LOSS else EXIT_ERROR
            except (OSError, ValueError) as exc:  # a TLS file, or an address without a port
                print(f"veil audit: {exc}", file=sys.stderr)
                return EXIT_ERROR
    except VeilError as exc:
        print(f"veil audit: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.audit_command == "report":
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_replacing(args.out, render_html(tables))
            written = [args.out]
        else:
            written = _write_tables(tables, args.out)
    except OSError as exc:
        print(f"veil audit: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    for path in written:
        print(f"wrote {path}")
    verified = tables.summary.get("verified")
    if verified is not None:
        print(tables.summary.get("verification", ""))
    unreadable = int(tables.summary.get("unreadable_releases") or 0)
    if unreadable:  # found even when the verification table was not asked for
        print(f"{unreadable} stored release(s) altered or unreadable: see the releases table")
    return EXIT_FOUND if verified == "false" or unreadable else EXIT_OK


def _write_tables(tables: AuditTables, out: Path) -> list[Path]:
    """The tables' files in the directory `out`, each whole or not at all: written first into a
    temporary directory beside `out`, then each renamed into place, so that a write that fails
    (a full disk) leaves no truncated table, and the earlier files it would have replaced."""
    import shutil
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".veil-audit-"))
    try:
        staged = tables.write_csv(staging)
        written = []
        for path in staged:
            final = out / path.name
            os.replace(path, final)
            written.append(final)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- veil attack ---------------------------------------------------------------------------------


def add_attack_command(subparsers: Any) -> argparse.ArgumentParser:
    """`veil attack --server HOST:PORT`: the attack suite against a live server."""
    from audit.attacks import ATTACK_NAMES, DEFAULT_ALPHA

    parser = subparsers.add_parser(
        "attack",
        help="run the disclosure attack suite against a live server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Attack a live veil server with one client's token: differencing, averaging,\n"
            "reconstruction, suppression membership, key leakage, a budget race and injection\n"
            "or denial-of-service probes. Each prints the attacker's success rate next to the\n"
            "bound differential privacy allows for the privacy loss of the releases it holds\n"
            "(DP loss), with a 95% upper margin, and what the attack was charged. The two\n"
            "differ when the server returns a stored release free: the bound counts it at the\n"
            "loss it was made at, the ledger books nothing. The guessing attacks are scored\n"
            "against the data file the server serves (--truth), read in-process.\n"
            "\n"
            "Budget: the attacks spend the client's budget; use a client registered for\n"
            "auditing. So that one attack cannot starve the others, each attack that spends\n"
            "may spend at most an equal share of what the client has left when it starts\n"
            "(what one leaves unspent passes on); budget_race, last, races for all that is\n"
            "left. An attack whose default loss does not fit its share runs at a smaller loss,\n"
            "down to a tenth of the default, except reconstruction, which keeps its 0.01 a\n"
            "query and asks fewer queries (at most 4 per target); each line states its share\n"
            "and what it was charged.\n"
            "\n"
            "Verdicts: BREACH (success above the bound beyond chance, at --alpha); defended\n"
            "(ran in full, within the bound); stopped (the budget or its share ended it early,\n"
            "within the bound); inconclusive (ran, but too little to show a breach even had\n"
            "every guess been right); NOT RUN (could not run: no --truth, no targets for\n"
            "--key, no budget for its queries, a refused call; the line says why). Only the\n"
            "first three count as run in the summary.\n"
            "\n"
            "Exit status: 0 every selected attack ran and none found a breach; 1 an attack\n"
            "found a breach; 2 an error (an unreadable --truth file, or one of another data\n"
            "version than the server serves; a bad option);\n"
            f"{EXIT_INCOMPLETE} no breach found, but some attack did not run or was inconclusive: "
            "the\nrun tested less than was asked."
        ),
    )
    _connection_arguments(parser)
    parser.add_argument(
        "--truth", type=Path, default=None, help="the server's data file, to score guesses"
    )
    parser.add_argument(
        "--codebook", default="ctdc_v7", help="the codebook of the data file (default ctdc_v7)"
    )
    parser.add_argument(
        "--attack",
        action="append",
        choices=ATTACK_NAMES,
        help="run only these attacks (repeatable; default: all)",
    )
    parser.add_argument(
        "--trials",
        type=_trials,
        default=None,
        metavar="N",
        help="targets per attack: half with the --flag, half without (at least 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the attacker's random seed")
    parser.add_argument(
        "--alpha",
        type=_alpha,
        default=DEFAULT_ALPHA,
        help=f"level of the test that declares a breach (default {DEFAULT_ALPHA:g})",
    )
    parser.add_argument("--key", default="citizenship", help="the variable targets are unique on")
    parser.add_argument(
        "--cells",
        default="yearOfRegistration,gender",
        help="the cells the trackers count in (comma-separated)",
    )
    parser.add_argument("--flag", default="isForcedLabour", help="the targets' secret (a flag)")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print the results as one JSON object: "attacks" (one object per attack) and '
        '"summary" (what ran, what did not, the breaches, and the exit status with its reason)',
    )
    parser.set_defaults(handler=run_attack)
    return parser  # type: ignore[no-any-return]


def _trials(text: str) -> int:
    """--trials: a whole number of targets, at least 2 (the targets come in pairs, one with the
    --flag and one without; fewer would run nothing and blame the data file)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"{value} is too few: give at least 2 targets (as many with the --flag as without)"
        )
    return value


def _alpha(text: str) -> float:
    """--alpha: the level of the test, strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:  # nan fails both comparisons
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a test level: give a number between 0 and 1, such as 0.05"
        )
    return value


def run_attack(args: argparse.Namespace) -> int:
    from audit.attacks import ATTACK_NAMES, HEADER, AttackResult, Context, Summary, run
    from audit.truth import Truth
    from audit.wire import Refused, Target
    from engine.codebook import load_codebook

    cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
    if args.key in cells or args.flag in (args.key, *cells):
        print("veil attack: --key, --cells and --flag must name different variables",
              file=sys.stderr)
        return EXIT_ERROR
    truth = None
    if args.truth is not None:
        try:
            codebook = load_codebook(args.codebook)
        except Exception as exc:
            print(f"veil attack: cannot load the codebook {args.codebook}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        known = {v.name for v in codebook.variables} | {d.name for d in codebook.derived}
        unknown = [name for name in (args.key, *cells, args.flag) if name not in known]
        if unknown:
            print(f"veil attack: not in the codebook {args.codebook}: {', '.join(unknown)}",
                  file=sys.stderr)
            return EXIT_ERROR
        try:
            truth = Truth(args.truth, codebook=codebook)
        except Exception as exc:
            print(f"veil attack: cannot read {args.truth}: {exc}", file=sys.stderr)
            return EXIT_ERROR
    server = _server(args)
    if server is None:
        print(f"veil attack: give --server HOST:PORT or set {ADDRESS_ENV}", file=sys.stderr)
        return EXIT_ERROR
    results: list[AttackResult] = []
    try:
        target = Target(server, _token(args), tls=tls_of(args), timeout=args.timeout)
    except (OSError, ValueError) as exc:  # a TLS file, or an address without a port
        print(f"veil attack: {exc}", file=sys.stderr)
        return EXIT_ERROR
    with target:
        try:
            # Guesses scored against other data than the server's prove nothing: refuse before
            # anything is spent.
            if truth is not None:
                try:
                    served = target.codebook().deployment.data_version
                except Refused as exc:
                    print(
                        "veil attack: cannot read the server's data version: "
                        f"{_refusal(exc, server, args)}",
                        file=sys.stderr,
                    )
                    return EXIT_ERROR
                if served != truth.data_version:
                    print(
                        f"veil attack: --truth {args.truth} holds data version "
                        f"{truth.data_version!r}, but the server serves {served!r}: give the "
                        "data file the server serves; nothing was spent",
                        file=sys.stderr,
                    )
                    return EXIT_ERROR
            ctx = Context(
                target,
                truth,
                seed=args.seed,
                alpha=args.alpha,
                key=args.key,
                cells=cells,
                flag=args.flag,
            )
            if not args.json:
                print(HEADER)

            def show(result: AttackResult) -> None:
                if not args.json:
                    print(result.row())
                    print(f"    {result.detail}", flush=True)

            results = run(ctx, args.attack or ATTACK_NAMES, trials=args.trials, on_result=show)
        finally:
            if truth is not None:
                truth.close()
    summary = Summary.of(results)
    status, reason = _exit_status(summary)
    if args.json:
        # "spent" is the earlier name of "charged", kept for readers of that output.
        attacks = [
            {**r.__dict__, "spent": r.charged, "upper": r.upper, "ran": r.ran} for r in results
        ]
        totals = {**summary.as_dict(), "exit_status": status, "exit_reason": reason}
        print(json.dumps({"attacks": attacks, "summary": totals}, indent=2))
    else:
        print(
            "\nsuccess: the share of guesses that were right; 95% upper: its one-sided "
            "Clopper-Pearson limit; DP bound: the highest success differential privacy allows "
            "for the DP loss (0 where any success is a failure); DP loss: the privacy loss about "
            "each target of the releases the attacker holds, each at the loss it was made at, "
            "stored releases returned free included; charged: what the attack cost the client, "
            "the sum of the server's charges, which is what the ledger booked."
        )
        print(f"\n{summary.text()}")
    return status


def _exit_status(summary: Summary) -> tuple[int, str]:
    """`veil attack`'s exit status for a run's `audit.attacks.Summary`, and why."""
    if summary.breaches:
        return EXIT_FOUND, "an attack found a breach"
    if summary.complete:
        return EXIT_OK, "every selected attack ran and none found a breach"
    return EXIT_INCOMPLETE, (
        "no attack found a breach, but some did not run or were inconclusive: the run tested "
        "less than was asked"
    )


__all__ = ["add_attack_command", "add_audit_command", "fetch_tables"]
