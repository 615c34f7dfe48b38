"""`veil serve`: start the server from one config file, or on synthetic data with `--demo`.

    veil serve --config veil.toml --init-admin ops # first start: create the ledger, register
                                                   # admin `ops` and print its token
    veil serve --config veil.toml                  # later starts: the ledger must exist
    veil serve --demo                              # synthetic records, demo tokens printed

Logs go to standard error (or the config's log file) as JSON lines; tokens are printed to
standard output only, once, and never logged. SIGTERM or SIGINT drains calls in flight and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn, TextIO

from engine.errors import VeilError
from server.accounts import LOCAL_ACTOR, LedgerAccounts
from server.app import Running, StopSignals, build_engine, configure_logging, serve, start
from server.auth import Role, hash_token, new_token
from server.config import ConfigError, ServerConfig, config_from_mapping, load_config

DEMO_ROWS = 100_000
DEMO_CLIENTS = (
    ("demo-researcher", Role.RESEARCHER, "3"),
    ("demo-auditor", Role.AUDITOR, "1"),
    ("demo-admin", Role.ADMIN, "0"),
)


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` to a `veil` command's subparsers; it sets `handler(args) -> exit status`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="start the gRPC server",
        description=(
            "Start veil's gRPC server from a config file (TOML or YAML), or with --demo on "
            "synthetic records. SIGTERM or SIGINT drains calls in flight and stops."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, metavar="FILE", help="the deployment's config file")
    source.add_argument(
        "--demo", action="store_true",
        help="serve synthetic records from a temporary directory and print demo tokens",
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help="override the listen address")
    parser.add_argument(
        "--init-admin", metavar="CLIENT_ID",
        help="register a new administrator with this id and print its token once; a "
        "ledger file that does not exist yet is created only with this option",
    )
    parser.add_argument(
        "--token-file", type=Path, metavar="FILE",
        help="write the tokens shown once (--init-admin, --demo) to FILE, a new file readable by "
        "its owner only, rather than to standard output, which a service manager keeps in its "
        "journal",
    )
    parser.add_argument(
        "--rows", type=int, default=DEMO_ROWS,
        help=f"--demo: synthetic records (default {DEMO_ROWS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="--demo: synthetic seed (default 0)")
    parser.set_defaults(handler=serve_process)
    return parser


def serve_process(args: argparse.Namespace) -> NoReturn:
    """`veil serve` as its own process: serve, then end it without the interpreter's teardown.

    Once the server has stopped, the ledger and the data are closed and the log is written: the
    teardown would only free memory. DuckDB's bindings may print a leak report to standard error
    during it (nanobind's, at random), the one line of the JSON log that would not be JSON; and
    a call still running past the drain timeout would hold the process open on its thread.
    """
    status = run_serve(args)
    logging.shutdown()  # flushes and closes the log's handlers
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone, a stream closed
            stream.flush()
    os._exit(status)


def run_serve(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    scratch: Path | None = None
    # Caught from before the server starts: a signal sent as soon as it logs `serving` must
    # drain and stop it, not kill it with calls in flight.
    signals = StopSignals()
    token_fd: int | None = None
    if args.token_file is not None:
        # Created before any token is issued (new, private, not through a link): a token that
        # could not be written afterwards would be lost, its client registered all the same.
        try:
            token_fd = os.open(
                args.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
        except OSError as exc:
            print(f"error: --token-file {args.token_file}: {exc.strerror}; name a new file",
                  file=sys.stderr)
            return 2
    written = False
    try:
        try:
            if args.demo:
                scratch = Path(tempfile.mkdtemp(prefix="veil-demo-"))
                config = _demo_config(scratch, rows=args.rows, seed=args.seed, listen=args.listen)
                configure_logging(config.log_level, config.log_file)
                signals.install()
                running, tokens = _start(config, demo=True)
            else:
                config = load_config(args.config)
                if args.listen:
                    config = config.listening_on(args.listen)
                configure_logging(config.log_level, config.log_file)
                signals.install()
                running, tokens = _start(config, init_admin=args.init_admin)
        except (VeilError, OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            print(f"veil is listening on {_shown_address(config.listen, running.port)}", file=out)
            lines = [f"token for {client}: {token}" for client, token in tokens.items()]
            if lines and token_fd is not None:
                with os.fdopen(token_fd, "w", encoding="ascii") as private:
                    token_fd = None
                    private.write("\n".join(lines) + "\n")
                written = True
                print(f"the token{'s' if len(lines) > 1 else ''} shown only once: in "
                      f"{args.token_file}", file=out)
            elif lines:
                print("\n".join(lines), file=out)
                print("send it as call metadata `authorization: Bearer <token>`; "
                      "it is shown only now", file=out)
            out.flush()
        except BaseException:
            running.stop()  # nobody was told where it listens: stop it rather than leave it
            raise
        return serve(running, signals=signals)
    finally:
        signals.restore()  # whatever ended the start-up; after `serve` it has nothing to do
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if token_fd is not None:  # no token went into it: leave no empty file behind
            os.close(token_fd)
        if args.token_file is not None and not written:
            with contextlib.suppress(OSError):
                if args.token_file.stat().st_size == 0:
                    args.token_file.unlink()


def _start(
    config: ServerConfig, *, demo: bool = False, init_admin: str | None = None
) -> tuple[Running, dict[str, str]]:
    if not config.data.is_file():
        raise ConfigError(f"no data file at {config.data}")
    # An empty file is no ledger either (a `touch`, or a copy that failed): it must not be
    # started afresh, every budget unspent, without the administrator a new ledger needs.
    creating = not demo and (not config.ledger.exists() or config.ledger.stat().st_size == 0)
    if creating and not init_admin:
        # A misspelt ledger path would otherwise start a new ledger, every budget unspent.
        raise ConfigError(
            f"there is no ledger at {config.ledger}; a new ledger starts with every budget "
            "unspent, so it is created only with its first administrator (--init-admin "
            "CLIENT_ID). If this deployment has a ledger already, correct the path."
        )
    engine = build_engine(config)
    # What a failed start must take back: the files the new ledger brings into being.
    new_files = [
        path
        for path in (config.ledger, Path(f"{config.ledger}-wal"), Path(f"{config.ledger}-shm"))
        if creating and not path.exists()
    ]
    accounts = LedgerAccounts.for_config(config, engine, create=demo or creating)
    tokens: dict[str, str] = {}
    try:
        registered = {c.client_id for c in accounts.ledger.list_clients()}
        wanted = list(DEMO_CLIENTS) if demo else []
        if init_admin:
            wanted.append((init_admin, Role.ADMIN, "0"))
        for client, _, _ in wanted:
            if client in registered:
                raise ConfigError(
                    f"client {client} is already registered; to replace a lost administrator's "
                    f"token, start once with --init-admin and a new id, then rotate or revoke "
                    f"{client} (veil admin rotate {client})"
                )
        # Listening first: a start that fails (the port in use, say) must not leave a client
        # registered whose token was never shown, blocking the next --init-admin with that id.
        running = start(config, engine=engine, accounts=accounts)
        if creating:
            # Said plainly: --init-admin also replaces a lost administrator, and a misspelt path
            # there would otherwise start a second ledger, every budget unspent, unnoticed.
            print(
                f"veil serve: there was no ledger at {config.ledger}; a new one was created, "
                "every budget unspent (if this deployment has a ledger, stop now and correct "
                "the path)",
                file=sys.stderr,
            )
    except BaseException:
        accounts.close()
        if creating:
            _undo_creation(config.ledger, new_files)
        raise
    try:
        for client, role, cap in wanted:
            token = new_token()
            accounts.ledger.register_client(
                client,
                role=role.value,
                cap=cap,
                token_hash=hash_token(token),
                token_expires_at=accounts.token_expiry(),
                actor=LOCAL_ACTOR,
            )
            tokens[client] = token
    except BaseException:
        running.stop()
        raise
    return running, tokens


def _undo_creation(ledger: Path, new_files: list[Path]) -> None:
    """Take back a ledger this start created and never served from (its port was in use, say):
    left behind, it would let the next start, --init-admin or not, open it as the deployment's
    ledger without the warning that a new ledger was created."""
    for path in new_files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if ledger not in new_files:  # an empty file was there: leave it as empty as it was
        with contextlib.suppress(OSError):
            os.truncate(ledger, 0)


def _write_demo_data(path: Path, *, rows: int, seed: int) -> None:
    """The embedded synthetic dataset."""
    from engine import synthetic

    synthetic.generate(path, rows=rows, seed=seed, overwrite=True)


def _demo_config(directory: Path, *, rows: int, seed: int, listen: str | None) -> ServerConfig:
    data = directory / "synthetic.duckdb"
    _write_demo_data(data, rows=rows, seed=seed)
    return config_from_mapping(
        {
            "data": str(data),
            "ledger": str(directory / "ledger.sqlite"),
            "caps": {"dataset": "10", "client": "1"},
            "server": {"listen": listen or "127.0.0.1:50051", "grace_seconds": 5},
        }
    )


def _shown_address(listen: str, port: int) -> str:
    host = listen.rpartition(":")[0]
    return f"{host}:{port}"
