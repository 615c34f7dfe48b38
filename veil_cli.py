"""The `veil` command: one entry point that hands each subcommand to the package that owns it.

Subcommand modules are imported only when used, so `veil query` (client) needs neither DuckDB
nor OpenDP, while `veil load` (engine) needs no gRPC. A command piped into `head` ends quietly
when `head` has read enough.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# What a command whose standard output was closed early (`| head`) exits with: it did not print
# all it had, and it says nothing more about it.
EXIT_BROKEN_PIPE = 1
# A command that cannot run here (its package is not installed), as argparse exits for usage.
EXIT_USAGE = 2

# command -> (module, function that adds the command's parser)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("engine.demo", "add_demo_command"),
    "load": ("engine.cli", "add_load_command"),
    "synth": ("engine.cli", "add_synth_command"),
    "ledger": ("engine.ledger_cli", "add_ledger_command"),
    "serve": ("server.cli", "add_serve_command"),
    "query": ("client.cli", "add_query_command"),
    "dry-run": ("client.cli", "add_dry_run_command"),
    "codebook": ("client.cli", "add_codebook_command"),
    "budget": ("client.cli", "add_budget_command"),
    "releases": ("client.cli", "add_releases_command"),
    "pack": ("client.pack", "add_pack_command"),
    "admin": ("client.admin_cli", "add_admin_command"),
    "risk": ("engine.cli", "add_risk_command"),
    "audit": ("audit.cli", "add_audit_command"),
    "attack": ("audit.cli", "add_attack_command"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, adder) in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            add = getattr(importlib.import_module(module), adder)
        except ImportError as exc:
            if only is None:
                continue  # a command whose package is not installed is simply not offered
            # The command was asked for by name: say what it lacks, not "invalid choice".
            missing = exc.name or str(exc)
            print(
                f"veil {name}: this command needs {missing}, which is not installed here (a "
                f"client-only install has query, dry-run, codebook, budget, releases, pack "
                f"and admin); install the full package from the veil repository: "
                f"pip install -e PATH/TO/veil",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_USAGE) from None
        add(subparsers)
    return parser


# What a command interrupted (Ctrl-C) exits with, as a shell reports a SIGINT: 128 + 2.
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = args_list[0] if args_list and not args_list[0].startswith("-") else None
    try:
        parser = build_parser(first if first in COMMANDS else None)
    except KeyboardInterrupt:  # while the command's modules load: nothing has been asked yet
        print("veil: interrupted; nothing was asked of any server", file=sys.stderr)
        return EXIT_INTERRUPTED
    args = parser.parse_args(args_list)
    try:
        result: int = args.handler(args)
        sys.stdout.flush()  # inside the guard: a reader gone early fails this flush too
    except BrokenPipeError:
        # The reader (`veil ledger report LEDGER | head`) took what it wanted and closed the
        # pipe. Python flushes standard output again at exit and would report that failure as
        # well, so it is pointed at devnull first (the recipe of Python's signal docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return result


if __name__ == "__main__":
    sys.exit(main())
