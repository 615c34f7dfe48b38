"""`veil admin register|set-budget|revoke|rotate|list`: the custodian's client administration
in the shell, with an administrator's token (the same options and $VEIL_TOKEN as `veil query`).

    export VEIL_SERVER=localhost:50051 VEIL_TOKEN=<an administrator's token>
    TOKEN=$(veil admin register amina --role researcher --institution iom --budget 1)
    veil admin set-budget amina 2
    TOKEN=$(veil admin rotate amina)           # the old token stops working now
    veil admin revoke amina --reason "left the project"
    veil admin list --format csv

Standard output carries only the result: the new token (register, rotate) on one line, or the
list of clients; confirmations, progress and timing go to standard error. Exit status as for the
other client commands: 0 success, 2 invalid input, 4 token or role refused, 5 server unavailable,
1 otherwise (an unknown client, a client id already taken, a cap below what was spent).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from client import errors
from client.admin import ROLES, AdminClient, ClientInfo
from client.cli import (
    EXIT_AUTH,
    EXIT_ERROR,
    EXIT_INVALID,
    EXIT_OK,
    add_format_option,
    connection_options,
    csv_cell,
    csv_text,
    emit,
    progress,
    run_with_client,
)
from client.connection import Client

_COLUMNS = ("client_id", "role", "institution", "cap", "spent", "remaining", "revoked",
            "created_at", "revoked_at", "token_expires_at")


def add_admin_command(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "admin", help="register clients, set their caps, rotate and revoke tokens (administrators)",
        description="Administer a veil server's clients. Every subcommand needs an "
        "administrator's token ($VEIL_TOKEN, --token or --token-file).",
    )
    commands = parser.add_subparsers(dest="admin_command", required=True, metavar="SUBCOMMAND")
    connection = connection_options()
    roles = ", ".join(ROLES)

    register = commands.add_parser(
        "register", parents=[connection], help="register a client and print its new token",
        description="Register a client. Its token is printed once on standard output (and "
        "nothing else is), so TOKEN=$(veil admin register ...) keeps it; the server stores only "
        "its hash.",
    )
    register.add_argument("client_id", metavar="CLIENT_ID",
                          help="1 to 64 characters from A-Z a-z 0-9 . _ -")
    register.add_argument("--role", default="researcher", metavar="ROLE",
                          help=f"one of {roles} (default researcher)")
    register.add_argument("--institution", metavar="NAME",
                          help="the institution whose clients share its cap, if it has one")
    register.add_argument("--budget", metavar="X",
                          help="the client's cap, an exact decimal (0 for a client that never "
                          "queries; default the deployment's client cap)")
    register.set_defaults(handler=run_register)

    set_budget = commands.add_parser(
        "set-budget", parents=[connection], help="set a client's cap",
        description="Set a client's cap (never below what it has spent or holds).",
    )
    set_budget.add_argument("client_id", metavar="CLIENT_ID")
    set_budget.add_argument("budget", metavar="BUDGET", help="the new cap, an exact decimal")
    set_budget.set_defaults(handler=run_set_budget)

    revoke = commands.add_parser(
        "revoke", parents=[connection], help="stop serving a client",
        description="Revoke a client: its token fails from now on; its charges and releases "
        "stay on the ledger.",
    )
    revoke.add_argument("client_id", metavar="CLIENT_ID")
    revoke.add_argument("--reason", required=True, metavar="TEXT", type=_reason,
                        help="why, for the audit log")
    revoke.set_defaults(handler=run_revoke)

    rotate = commands.add_parser(
        "rotate", parents=[connection], help="issue a client a new token (the old one stops)",
        description="Replace a client's token. The new token is printed once on standard output; "
        "the old one stops working now.",
    )
    rotate.add_argument("client_id", metavar="CLIENT_ID")
    rotate.set_defaults(handler=run_rotate)

    listing = commands.add_parser(
        "list", parents=[connection], help="every client, with cap, spent and remaining",
    )
    add_format_option(listing, ("table", "csv", "json"))
    listing.set_defaults(handler=run_list)
    return parser


# ---- running them -------------------------------------------------------------------------------


def _reason(text: str) -> str:
    """--reason: required, so an empty one (an unset variable expanded) is no reason at all."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "give a reason: why the client is revoked, for the audit log"
        )
    return text


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"veil: {text}", file=sys.stderr)


def _run_admin(args: argparse.Namespace, body: Callable[[AdminClient], int]) -> int:
    """`run_with_client` (connection, errors, exit statuses), with the messages an
    administrator needs: a refused argument is not an "invalid query", a change the registry
    refuses left the registry as it was, and a refused role is most likely the wrong token."""

    def admin_body(connection: Client) -> int:
        try:
            return body(AdminClient(connection))
        except errors.InvalidQuery as exc:
            print(f"veil: {exc}", file=sys.stderr)
            return EXIT_INVALID
        except errors.RegistryConflict as exc:
            print(f"veil: refused, nothing changed: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except errors.PermissionDenied as exc:
            print(f"veil: `veil admin` needs an administrator's token ({exc})", file=sys.stderr)
            return EXIT_AUTH

    return run_with_client(args, admin_body)


def _emit_token(token: str) -> None:
    # Alone on standard output, so that TOKEN=$(veil admin ...) holds the token and nothing else.
    emit(token)


def run_register(args: argparse.Namespace) -> int:
    def body(admin: AdminClient) -> int:
        with progress("register", quiet=args.quiet):
            info, token = admin.register(
                args.client_id, role=args.role, institution=args.institution,
                budget=args.budget,
            )
        _say(args, f"registered {info}")
        _say(args, "its token, on standard output, is shown only this once (the server keeps "
                   "only its hash)")
        _emit_token(token)
        return EXIT_OK

    return _run_admin(args, body)


def run_set_budget(args: argparse.Namespace) -> int:
    def body(admin: AdminClient) -> int:
        with progress("set budget", quiet=args.quiet):
            info = admin.set_budget(args.client_id, args.budget)
        _say(args, f"cap set: {info}")
        return EXIT_OK

    return _run_admin(args, body)


def run_revoke(args: argparse.Namespace) -> int:
    def body(admin: AdminClient) -> int:
        with progress("revoke", quiet=args.quiet):
            info = admin.revoke(args.client_id, args.reason)
        if info.already_revoked:
            # Not an error: the client is revoked, as asked; but this call did not revoke it.
            when = f" at {info.revoked_at}" if info.revoked_at else ""
            _say(args, f"client {info.client_id} was already revoked{when}; nothing changed")
        else:
            _say(args, f"revoked {info}")
        return EXIT_OK

    return _run_admin(args, body)


def run_rotate(args: argparse.Namespace) -> int:
    def body(admin: AdminClient) -> int:
        with progress("rotate token", quiet=args.quiet):
            token = admin.rotate_token(args.client_id)
        _say(args, f"{args.client_id}'s old token no longer works; the new one, on standard "
                   "output, is shown only this once")
        _emit_token(token)
        return EXIT_OK

    return _run_admin(args, body)


def run_list(args: argparse.Namespace) -> int:
    def body(admin: AdminClient) -> int:
        with progress("list clients", quiet=args.quiet):
            clients = admin.clients()
        emit(clients_text(clients, args.format))
        return EXIT_OK

    return _run_admin(args, body)


def clients_text(clients: list[ClientInfo], fmt: str) -> str:
    """The clients as an aligned table, CSV (amounts exact, booleans true/false, none empty) or
    JSON."""
    rows = [c.to_dict() for c in clients]
    if fmt == "json":
        return json.dumps({"clients": rows}, indent=2, ensure_ascii=False)
    if fmt == "csv":
        return csv_text([list(_COLUMNS)] + [[csv_cell(r[n]) for n in _COLUMNS] for r in rows])
    from client.display import text_table

    # What is left of the client's own cap: an institution's or the dataset's cap may leave less
    # (the auditor's tables give what each client can spend).
    headers = ["client_id", "role", "institution", "cap", "spent", "left_of_cap", "status",
               "created_at", "token_expires"]
    table = [
        [r["client_id"], r["role"], r["institution"] or "", r["cap"], r["spent"],
         r["remaining"], f"revoked {_seconds(r['revoked_at'])}" if r["revoked"] else "active",
         _seconds(r["created_at"]),
         _seconds(r["token_expires_at"]) if r["token_expires_at"] else "never"]
        for r in rows
    ]
    right = [h in ("cap", "spent", "left_of_cap") for h in headers]
    if not table:
        return "no clients"
    note = ("\nleft_of_cap: of the client's own cap; its institution's and the dataset's caps may "
            "leave less (veil audit tables: can_spend)")
    return text_table(headers, table, right=right) + note


def _seconds(timestamp: str | None) -> str:
    """An ISO timestamp to the second, for the table (CSV and JSON keep it whole)."""
    if not timestamp:
        return ""
    whole, dot, _ = timestamp.partition(".")
    return f"{whole}Z" if dot and timestamp.endswith("Z") else timestamp


__all__ = ["add_admin_command", "clients_text"]
