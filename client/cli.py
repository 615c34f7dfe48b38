"""`veil query`, `veil dry-run`, `veil codebook`, `veil budget`, `veil releases`: the client
in the shell.

    export VEIL_SERVER=localhost:50051 VEIL_TOKEN=veil_...
    veil codebook                       # every variable; `veil codebook gender` for one
    veil query "SELECT gender, COUNT(*) FROM victims GROUP BY gender" --epsilon 0.5
    veil query --count --by gender,ageBroad --where majorityStatus=Minor --epsilon 0.5 -f csv
    veil dry-run --flag-counts meansOfControl --by majorityStatus --half-width 25
    veil budget
    veil releases                       # `veil releases REL_ID [--by DIMS]` prints one again, free

Results go to standard output as an aligned table, or as CSV or JSON (`--format`); progress,
timing and retries go to standard error. Exit status: 0 success, 1 other error, 2 invalid query
or usage, 3 budget exhausted, 4 authentication or permission, 5 server unavailable or timeout,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

from client import errors
from client.codebook import Codebook, DerivedDimension
from client.connection import ADDRESS_ENV, DEFAULT_ADDRESS, TLS, Client, Retry, check_token
from client.errors import CA_CERT_ENV, TOKEN_ENV
from client.query import Filter, In, Query, conditions
from client.results import Release

EXIT_OK, EXIT_ERROR, EXIT_INVALID, EXIT_BUDGET, EXIT_AUTH, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a command ended by SIGINT (128 + 2)
# NAME=VALUE[,VALUE...]; the value may be missing, so that the message can say what to write.
_SIMPLE_WHERE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*([^'\"=<>!()\s][^'\"=<>!()]*)?$")
# Words that make a NAME=VALUE value read as SQL ("majorityStatus = Minor OR"). Codes may hold
# spaces and such words ("Australia and New Zealand"), so a value with one of them is looked up
# in the codebook before it is refused.
_SQL_WORDS = frozenset({"AND", "OR", "NOT", "IN", "IS", "NULL", "BETWEEN", "LIKE", "ILIKE"})


# ---- the commands' parsers ----------------------------------------------------------------------


def add_server_options(
    group: argparse._ActionsContainer, *, server_help: str | None = None
) -> None:
    """--server, --token, --token-file, --ca-cert, --client-cert, --client-key and --timeout,
    the options every command that calls a server shares (these, `veil admin`, `veil audit`,
    `veil attack`); read them back with `token_of`, `ca_cert_of` and `tls_of`. --server
    defaults to None: $VEIL_SERVER is read when it is used."""
    group.add_argument(
        "--server", metavar="HOST:PORT",
        help=server_help or f"the veil server (default ${ADDRESS_ENV}, else {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--token", help=f"bearer token (default ${TOKEN_ENV}; prefer the variable or --token-file)"
    )
    group.add_argument("--token-file", type=Path, metavar="FILE", help="read the token from FILE")
    group.add_argument("--ca-cert", type=Path, metavar="PEM",
                       help=f"CA certificate of the server (default ${CA_CERT_ENV})")
    group.add_argument("--client-cert", type=Path, metavar="PEM",
                       help="this client's certificate, for a server that requires mutual TLS")
    group.add_argument("--client-key", type=Path, metavar="PEM",
                       help="the private key of --client-cert")
    group.add_argument("--timeout", type=_seconds, default=120.0, metavar="SECONDS",
                       help="deadline of each call (default 120)")


def _seconds(text: str) -> float:
    """--timeout: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a positive number of seconds, such as 120"
        )
    return value


def _count_between(low: int, high: int) -> Callable[[str], int]:
    """An option's whole number from `low` to `high` (what the wire carries), refused by
    argparse in the option's own words rather than by the client in the Python argument's."""

    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text}: give a number from {low} to {high:,}")
        return value

    return read


def _not_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("it is empty; give a value or leave the option out")
    return text


def token_of(args: argparse.Namespace) -> str:
    """The token of `add_server_options`: --token-file's, else --token's, else $VEIL_TOKEN's.
    Raises AuthenticationError, in the shell's words, when there is none or the token file
    cannot be read."""
    token = args.token
    if args.token_file is not None:
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the token.
            text = args.token_file.expanduser().read_text(encoding="utf-8-sig")
        except OSError as exc:  # a credential missing, as an empty file is: exit status 4
            raise errors.AuthenticationError(
                f"cannot read the token file {args.token_file}: {exc.strerror or exc}"
            ) from exc
        token = _token_in_file(args.token_file, text)
    # An empty --token (an unset variable expanded) is no token, not a cue to read VEIL_TOKEN.
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if not token:
        # The library's own message speaks of token=...; here the shell's ways are the ones.
        raise errors.AuthenticationError(
            f"no token: set {TOKEN_ENV} or pass --token-file FILE, with the token the custodian "
            f"issued"
        )
    return check_token(str(token))


def _token_in_file(path: Path, text: str) -> str:
    """The token a token file holds: the token alone, or the one line `veil serve --token-file`
    writes (`token for CLIENT: TOKEN`). A file of several such lines (`veil serve --demo`'s)
    names several clients, and which one is meant is not guessed."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise errors.AuthenticationError(f"the token file {path} is empty")
    labelled = [line for line in lines if line.startswith(_TOKEN_LABEL)]
    if len(labelled) > 1:
        clients = ", ".join(line[len(_TOKEN_LABEL):].split(":", 1)[0] for line in labelled)
        raise errors.AuthenticationError(
            f"the token file {path} holds the tokens of several clients ({clients}); copy the "
            f"one to use into a file of its own"
        )
    if labelled and len(lines) == 1:
        return labelled[0].split(":", 1)[1].strip()
    return text.strip()


_TOKEN_LABEL = "token for "  # how `veil serve --token-file` labels the token it writes


def ca_cert_of(args: argparse.Namespace) -> Path | None:
    """The CA certificate of `add_server_options`: --ca-cert, else $VEIL_CA_CERT, else None."""
    ca: Path | None = args.ca_cert
    return ca or (Path(os.environ[CA_CERT_ENV]) if os.environ.get(CA_CERT_ENV) else None)


def tls_of(args: argparse.Namespace) -> TLS | None:
    """The TLS files of `add_server_options` (the CA as `ca_cert_of` reads it, the client's
    certificate and key), or None when none is given."""
    ca = ca_cert_of(args)
    if ca is None and args.client_cert is None and args.client_key is None:
        return None
    return TLS(ca_cert=ca, client_cert=args.client_cert, client_key=args.client_key)


def connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    add_server_options(group)
    tls = group.add_mutually_exclusive_group()
    tls.add_argument("--tls", dest="tls", action="store_true", default=None,
                     help="use TLS (the default for every host but a loopback one)")
    tls.add_argument("--no-tls", dest="tls", action="store_false",
                     help="plaintext (only loopback servers accept it)")
    group.add_argument("--retries", type=_count_between(1, 100), default=5, metavar="N",
                       help="tries in all when the server is unavailable (default 5)")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress or timing on standard error")
    return parent


def _query_options(parser: argparse.ArgumentParser, *, dry_run: bool) -> None:
    parser.add_argument(
        "sql", nargs="?", metavar="SQL",
        help="a SELECT in veil's SQL subset (or build the query with the options below)",
    )
    measure = parser.add_argument_group("the query, without SQL").add_mutually_exclusive_group()
    measure.add_argument("--count", action="store_true", help="records in each cell")
    measure.add_argument("--flag-counts", metavar="FLAG_SET",
                         help="records with each flag of a flag set")
    measure.add_argument("--sum", metavar="VARIABLE", help="sum of an integer variable")
    measure.add_argument("--mean", metavar="VARIABLE", help="mean of an integer variable")
    measure.add_argument("--proportion", metavar="CONDITION",
                         help="share of records satisfying CONDITION (as --where), of all "
                         "records, those missing its variables included (--where \"VAR IS NOT "
                         "NULL\" for the share among those recorded)")
    parser.add_argument("--by", action="append", default=[], metavar="DIM[,DIM...]",
                        help="group-by dimensions (repeat or separate with commas)")
    parser.add_argument(
        "--where", action="append", default=[], metavar="CONDITION",
        help="NAME=VALUE (VALUE,VALUE... for IN; values as the codebook writes them, spaces "
        "included) or a SQL condition, text values in single quotes, such as "
        "\"ageBroad IN ('0--8', '9--17')\"; repeated conditions are ANDed",
    )
    loss = parser.add_argument_group("privacy loss").add_mutually_exclusive_group(required=True)
    loss.add_argument("--epsilon", metavar="X", help="pure-DP loss, as a decimal")
    loss.add_argument("--rho", metavar="X", help="zCDP loss, as a decimal")
    loss.add_argument("--loss", metavar="X", help="the loss in this server's accounting")
    loss.add_argument("--half-width", type=_count_between(1, 2**63 - 1), metavar="N",
                      help="pay what makes count intervals at most N on each side")
    if dry_run:
        parser.add_argument("--assumed-count", type=_count_between(0, 2**63 - 1), metavar="N",
                            help="true count assumed for the expected suppressed share")
    else:
        parser.add_argument("--max-loss", metavar="X",
                            help="with --half-width: refuse, charging nothing, if it costs more")
        parser.add_argument("--request-id", type=_not_empty, metavar="ID",
                            help="reuse the id of an interrupted release to get it free")
        parser.add_argument("-o", "--output", type=Path, metavar="FILE",
                            help="write the result to FILE instead of standard output")


def add_format_option(parser: argparse.ArgumentParser, choices: tuple[str, ...]) -> None:
    parser.add_argument("-f", "--format", choices=choices, default="table",
                        help=f"output format (default table; one of {', '.join(choices)})")


def add_query_command(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "query", parents=[connection_options()],
        help="release a table (charged to your budget)",
        description="Release one aggregate table with its confidence intervals. Give SQL in "
        "veil's subset, or build the query with --count/--flag-counts/--sum/--mean/--proportion, "
        "--by and --where. A query released before comes back free.",
        epilog=errors.SUPPORTED_SQL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _query_options(parser, dry_run=False)
    add_format_option(parser, ("table", "csv", "json"))
    parser.set_defaults(handler=run_query)
    return parser


def add_dry_run_command(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dry-run", parents=[connection_options()],
        help="price a query without releasing it (free)",
        description="What a release would cost (for --half-width) or how accurate it would be "
        "(for a loss), its suppression threshold, and whether it is already released.",
        epilog=errors.SUPPORTED_SQL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _query_options(parser, dry_run=True)
    add_format_option(parser, ("table", "json"))
    parser.set_defaults(handler=run_dry_run)
    return parser


def add_codebook_command(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "codebook", parents=[connection_options()],
        help="browse the codebook: variables, domains, flag sets",
        description="List the codebook's variables, flag sets and derived dimensions, or "
        "describe one of them.",
    )
    parser.add_argument("name", nargs="?", help="a variable, flag set or derived dimension")
    parser.add_argument("--search", metavar="TEXT",
                        help="only items whose name, definition or labels mention TEXT")
    add_format_option(parser, ("table", "csv", "json"))
    parser.set_defaults(handler=run_codebook)
    return parser


def add_budget_command(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "budget", parents=[connection_options()], help="your privacy budget: spent and left",
    )
    add_format_option(parser, ("table", "json"))
    parser.set_defaults(handler=run_budget)
    return parser


def add_releases_command(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "releases", parents=[connection_options()],
        help="the releases you received; one of them again, free",
    )
    parser.add_argument("release_id", nargs="?", metavar="RELEASE_ID",
                        help="print this release's table again (free)")
    parser.add_argument("--by", action="append", default=[], metavar="DIM[,DIM...]",
                        help="with RELEASE_ID: its dimensions in this order (those left out "
                             "follow), as the query that made it named them")
    parser.add_argument("--limit", type=_count_between(0, 2**31 - 1), default=100,
                        help="the most recent N (default 100)")
    add_format_option(parser, ("table", "csv", "json"))
    parser.set_defaults(handler=run_releases)
    return parser


# ---- running them -------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    token = token_of(args)
    tls: bool | TLS | None = args.tls
    files = tls_of(args)
    if tls is not False and files is not None:
        tls = files
    retry = Retry(attempts=max(1, args.retries))
    client = Client(args.server, token=token, tls=tls, timeout=args.timeout, retry=retry)
    if not args.quiet:
        client.on_retry = _report_retry
    return client


class _StatusLine:
    """The spinner's line on standard error, shared with the retry reports: a report first
    clears what the spinner drew, so each retry is one clean line (the spinner redraws below)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stream: TextIO | None = None  # where the spinner draws, while it does
        self.drawn = 0  # characters the spinner has on its line

    def draw(self, stream: TextIO, text: str) -> None:
        with self.lock:
            stream.write("\r" + text.ljust(self.drawn))
            stream.flush()
            self.stream, self.drawn = stream, len(text)

    def clear(self) -> None:
        with self.lock:
            self._clear()
            self.stream = None

    def _clear(self) -> None:
        if self.stream is not None and self.drawn:
            self.stream.write("\r" + " " * self.drawn + "\r")
            self.stream.flush()
        self.drawn = 0

    def line(self, text: str) -> None:
        with self.lock:
            stream = self.stream or sys.stderr
            self._clear()
            stream.write(text + "\n")
            stream.flush()


_status = _StatusLine()


def _report_retry(method: str, attempt: int, wait: float, reason: str) -> None:
    _status.line(f"veil: {method} failed ({reason}); retry {attempt} in {wait:.1f} s")


@contextmanager
def progress(label: str, *, quiet: bool, stream: TextIO | None = None) -> Iterator[None]:
    """Elapsed time on standard error: a spinner while the call runs (when it is a terminal),
    then one line with the time taken."""
    stream = stream or sys.stderr
    start = time.perf_counter()
    done = threading.Event()
    spinner: threading.Thread | None = None
    if not quiet and stream.isatty():

        def spin() -> None:
            frames = "|/-\\"
            i = 0
            while not done.wait(0.1):
                elapsed = time.perf_counter() - start
                _status.draw(stream, f"{frames[i % 4]} {label} {elapsed:5.1f} s")
                i += 1
            _status.clear()

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
    try:
        yield
    finally:
        done.set()
        if spinner is not None:
            spinner.join()
    if not quiet:  # only on success: a failure's message is the line that matters
        stream.write(f"veil: {label} took {time.perf_counter() - start:.2f} s\n")
        stream.flush()


def run_with_client(args: argparse.Namespace, body: Callable[[Client], int]) -> int:
    """Connect, run `body`, and turn the client's errors into messages and exit statuses."""
    made: list[Client] = []
    try:
        with _client(args) as client:
            made.append(client)
            return body(client)
    except KeyboardInterrupt:
        _status.clear()
        request_id = made[0].last_request_id if made else None
        if request_id is not None:
            # The server may have committed (and charged) the release before the interrupt.
            print(
                f"veil: interrupted; the release asked for (request id {request_id}) may have "
                f"been made and charged: `veil releases` lists it, or ask again with "
                f"--request-id {request_id} to get it free",
                file=sys.stderr,
            )
        elif getattr(args, "handler", None) is run_query:
            print("veil: interrupted before a release was asked for; nothing was charged",
                  file=sys.stderr)
        else:
            print("veil: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors.InvalidQuery as exc:
        print(f"veil: {invalid_query_text(exc)}", file=sys.stderr)
        return EXIT_INVALID
    except errors.BudgetExhausted as exc:
        # The server's message already says how much of which budget remains.
        print(f"veil: budget exhausted: {exc}", file=sys.stderr)
        return EXIT_BUDGET
    except (errors.AuthenticationError, errors.PermissionDenied) as exc:
        print(f"veil: {_shell_words(exc)}", file=sys.stderr)
        return EXIT_AUTH
    except (errors.ServerUnavailable, errors.QueryTimeout) as exc:
        print(f"veil: {_shell_words(exc)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except errors.VeilError as exc:
        print(f"veil: {_shell_words(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        raise  # standard output closed early (`| head`): the `veil` entry point ends quietly
    except (OSError, TypeError, ValueError) as exc:
        print(f"veil: {exc}", file=sys.stderr)
        return EXIT_INVALID if isinstance(exc, (TypeError, ValueError)) else EXIT_ERROR


def invalid_query_text(error: errors.InvalidQuery) -> str:
    """A refused query, as the shell reports it: a SQL typo by its one sentence (not the whole
    subset), SQL outside the subset with the subset, an invalid query with its variable."""
    if isinstance(error, errors.UnsupportedSQL):
        return error.reason if error.malformed else f"unsupported SQL: {error}"
    where = f" (variable {error.variable})" if error.variable else ""
    return f"invalid query{where}: {_shell_words(error)}"


def _shell_words(error: errors.VeilError) -> str:
    """The error's message with its advice in the shell's terms (--tls, --token-file) rather
    than the Python keywords the library's message names."""
    return error.shell_message or str(error)


def _condition(
    text: str,
    option: str = "--where",
    codebook: Callable[[], Codebook] | None = None,
    command: str = "query",
) -> Filter:
    """A --where or --proportion argument: NAME=VALUE[,VALUE...] or a SQL condition. Errors
    name the option and the argument.

    A NAME=VALUE value holding SQL (a keyword such as OR, or a ';') is refused, unless the
    `codebook` lists it as a value of NAME: read as one value, "majorityStatus = Minor OR" would
    be a query nobody meant."""
    simple = _SIMPLE_WHERE.fullmatch(text)
    if simple:
        name, raw = simple.group(1), (simple.group(2) or "").strip()
        values = [v.strip() for v in raw.split(",")]
        for value in values:
            sql = _sql_in_value(value)
            if sql is not None and not _is_code(codebook, name, value):
                raise errors.InvalidQuery(
                    f"{option} {text!r}: {value!r} is not a value of {name}; "
                    + _sql_value_hint(value, sql, name, option, command),
                    variable=name,
                )
        if all(values):
            condition = conditions([], {name: values[0]}) if len(values) == 1 else In(name, values)
            assert condition is not None
            return condition
        missing = "no value after '='" if not raw else "an empty value in the list"
        raise errors.InvalidQuery(
            f"{option} {text!r}: {missing}; write {name}=VALUE, {name}=VALUE,VALUE for any of "
            f"several, or \"{name} IS NULL\" for records where it is missing",
            variable=name,
        )
    from client.sql import parse_condition

    try:
        return parse_condition(text)
    except errors.UnsupportedSQL as exc:
        raise errors.UnsupportedSQL(
            f"{option} {text!r}: {exc.reason}", variable=exc.variable, malformed=exc.malformed
        ) from None


def _sql_in_value(value: str) -> str | None:
    """The SQL a NAME=VALUE value holds (a keyword, or ';'), or None."""
    if ";" in value:
        return ";"
    words = value.split()
    for word in words:
        if word.upper() in _SQL_WORDS and (len(words) > 1 or word.upper() == "NULL"):
            return word
    return None


def _is_code(codebook: Callable[[], Codebook] | None, name: str, value: str) -> bool:
    if codebook is None:
        return False
    item = codebook().find(name)
    return value in [str(code) for code in getattr(item, "codes", [])]


def _sql_value_hint(value: str, sql: str, name: str, option: str, command: str) -> str:
    """What to write instead of a NAME=VALUE whose value holds `sql`."""
    if value.upper() == "NULL":
        return f'for records where {name} is missing write {option} "{name} IS NULL"'
    holds = "';', which ends a SQL statement" if sql == ";" else f"the SQL keyword {sql.upper()}"
    plain = [w for w in value.replace(";", " ").split() if w.upper() not in _SQL_WORDS]
    example = plain[0] if plain else "VALUE"
    example = example if example.isdigit() else f"'{example}'"
    return (
        f"it holds {holds}. NAME=VALUE takes values only ({name}=VALUE, or "
        f"{name}=VALUE,VALUE for any of several); in a SQL condition put text values in single "
        f"quotes ({option} \"{name} = {example} ...\"), or give the whole query as SQL: "
        f'veil {command} "SELECT ... FROM victims WHERE ..."'
    )


def build_query(args: argparse.Namespace, client: Client) -> Query:
    """The query the command line describes: SQL, or the measure options with --by/--where."""
    measures = [args.count, args.flag_counts, args.sum, args.mean, args.proportion]
    command = getattr(args, "command", None) or "query"
    chosen = any(m not in (None, False) for m in measures)
    if args.sql is not None:
        if chosen or args.by or args.where:
            raise errors.InvalidQuery(
                "give SQL, or build the query with options, not both (put --by and --where "
                "into the SQL as GROUP BY and WHERE)"
            )
        from client.sql import parse_sql

        return parse_sql(args.sql).bind(client)
    # `is not None`: an empty argument (--proportion "") is a bad one, not a missing one.
    if args.flag_counts is not None:
        query = client.flag_counts(args.flag_counts)
    elif args.sum is not None:
        query = client.sum(args.sum)
    elif args.mean is not None:
        query = client.mean(args.mean)
    elif args.proportion is not None:
        query = client.proportion(
            _condition(args.proportion, "--proportion", client.codebook, command)
        )
    elif args.count:
        query = client.count()
    else:
        raise errors.InvalidQuery(
            "give a query: SQL text, or one of --count, --flag-counts SET, --sum VAR, "
            "--mean VAR, --proportion CONDITION"
        )
    if args.by:
        query = query.by(*_by_names(args.by))
    for text in args.where:
        query = query.where(_condition(text, "--where", client.codebook, command))
    return replace(query, spelling="cli")  # so that a message suggests options, not Python


def _by_names(texts: list[str]) -> list[str]:
    """The dimension names the --by options give, in order, each value split at commas."""
    names = []
    for text in texts:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            # Dropping it would group a table (or order one) by less than was written.
            raise errors.InvalidQuery(
                f"--by {text!r}: an empty value in the list; write --by DIM, or --by DIM,DIM "
                f"for several"
            )
        names.extend(parts)
    return names


def _loss(args: argparse.Namespace) -> dict[str, Any]:
    return {"epsilon": args.epsilon, "rho": args.rho, "loss": args.loss,
            "half_width": args.half_width}


def emit(text: str, output: Path | None = None) -> None:
    if output is not None:
        write_replacing(output, text if text.endswith("\n") else text + "\n")
        return
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def write_replacing(output: Path, text: str) -> None:
    """Write `text` to `output` whole or not at all: into a temporary file beside it, then
    renamed over it, so that a failed write (a full disk) leaves the file that was there, and no
    truncated one. A symlink is written through, to the file it points to; anything but a
    regular file (a pipe, a device such as /dev/stdout) is written straight into, never
    replaced. Raises OSError."""
    import stat
    import tempfile

    try:
        status: os.stat_result | None = os.stat(output)  # through links, /dev/stdout's too
    except FileNotFoundError:
        status = None
    if status is not None and not stat.S_ISREG(status.st_mode):
        with open(output, "w", encoding="utf-8") as stream:
            stream.write(text)
        return
    target = Path(os.path.realpath(output)) if output.is_symlink() else output
    # A new file gets the permissions a plain write would give it.
    mode = None if status is None else status.st_mode & 0o7777
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise


def _release_text(release: Release, fmt: str) -> str:
    if fmt == "json":
        return release.to_json()
    if fmt == "csv":
        return release.to_csv()
    return f"{release.to_text()}\n\n{release.summary()}"


def _writable(output: Path) -> str | None:
    """Why `output` cannot be written, or None when it seems it can; asked before a release is
    paid for, of the very path the write will open, without touching the file system (a write
    that still fails afterwards names the release to fetch again, free)."""
    try:
        if output.is_dir():
            return "it is a directory"
        if output.exists():
            return None if os.access(output, os.W_OK) else "permission denied"
        target = output
        if output.is_symlink():  # dangling: the write makes the file it points to
            target = output.parent / os.readlink(output)
            if target.is_symlink():
                return "it is a symlink to another symlink that leads nowhere"
        # The directory as the write will reach it: "~" unexpanded, "sub/.." through sub.
        if not target.parent.is_dir():
            return f"there is no directory {target.parent}"
        return None if os.access(target.parent, os.W_OK | os.X_OK) else "permission denied"
    except (OSError, RuntimeError) as exc:
        return str(exc)


def run_query(args: argparse.Namespace) -> int:
    if args.output is not None and (reason := _writable(args.output)) is not None:
        print(f"veil: cannot write {args.output}: {reason}; nothing was released or charged",
              file=sys.stderr)
        return EXIT_INVALID

    def body(client: Client) -> int:
        query = build_query(args, client)
        with progress("release", quiet=args.quiet):
            release = client.release(
                query, request_id=args.request_id, max_loss=args.max_loss, **_loss(args)
            )
        try:
            emit(_release_text(release, args.format), args.output)
        except OSError as exc:
            if args.output is None:
                raise  # standard output closed early (`| head`): ends quietly in run_with_client
            # Paid for and stored: say how to have it again, free.
            print(
                f"veil: release {release.metadata.release_id} was made, but {args.output} "
                f"could not be written ({exc.strerror or exc}); `veil releases "
                f"{release.metadata.release_id}` prints it again, free",
                file=sys.stderr,
            )
            return EXIT_ERROR
        return EXIT_OK

    return run_with_client(args, body)


def run_dry_run(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        query = build_query(args, client)
        with progress("dry run", quiet=args.quiet):
            dry = client.dry_run(query, assumed_count=args.assumed_count, **_loss(args))
        emit(json.dumps(dry.to_dict(), indent=2) if args.format == "json" else repr(dry))
        return EXIT_OK

    return run_with_client(args, body)


class _UnknownName(Exception):
    """A name `veil codebook NAME` does not find; the message says which names are close."""


def run_codebook(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        try:
            with progress("codebook", quiet=args.quiet):
                book = client.codebook()
                if args.name and book.find(args.name) is None:
                    raise _UnknownName(book.unknown(args.name))
                item = client.variable(args.name) if args.name else None
        except _UnknownName as exc:
            # A name looked up, not a query asked: no "invalid query", and no timing line.
            print(f"veil: {exc}", file=sys.stderr)
            return EXIT_INVALID
        if item is not None:
            if args.format == "json":
                emit(json.dumps(asdict(item), indent=2, ensure_ascii=False))
            elif args.format == "csv":
                emit(csv_text([["code", "label", "description"]]
                           + [[str(c) for c in code_row] for code_row in _codes(item)]))
            else:
                emit(repr(item))
            return EXIT_OK
        rows = book.rows()
        if args.search:
            found = {i.name for i in book.search(args.search)}
            rows = [r for r in rows if r["name"] in found]
        if args.format == "json":
            emit(json.dumps(
                {"codebook": {"name": book.name, "version": book.version, "title": book.title,
                              "min_cell_size": book.min_cell_size,
                              "privacy_unit": book.privacy_unit},
                 "deployment": asdict(book.deployment), "items": rows},
                indent=2, ensure_ascii=False))
        elif args.format == "csv":
            names = ["name", "kind", "queryable", "flag_set", "domain", "definition"]
            emit(csv_text([names] + [[csv_cell(r[n]) for n in names] for r in rows]))
        else:
            from client.display import shorten, text_table

            width = max(60, _terminal_width() - 90)
            table = text_table(
                ["name", "kind", "values", "definition"],
                [[r["name"], r["kind"], shorten(r["domain"], 42), shorten(r["definition"], width)]
                 for r in rows],
            )
            emit(f"{book.header()}\n{book.deployment.describe()}\n\n{table}")
        return EXIT_OK

    return run_with_client(args, body)


def _codes(item: Any) -> list[list[Any]]:
    categories = getattr(item, "categories", None)
    if categories:
        return [[c.code, c.label, c.description] for c in categories]
    if isinstance(item, DerivedDimension):  # a group, and the source codes it holds
        return [[group, "", " ".join(codes)] for group, codes in item.members.items()]
    return [[code, "", ""] for code in getattr(item, "codes", getattr(item, "flags", []))]


def run_budget(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        with progress("budget", quiet=args.quiet):
            budget = client.budget()
        emit(json.dumps(budget.to_dict(), indent=2) if args.format == "json" else repr(budget))
        return EXIT_OK

    return run_with_client(args, body)


def run_releases(args: argparse.Namespace) -> int:
    def body(client: Client) -> int:
        order = _by_names(args.by)
        if order and not args.release_id:
            raise errors.InvalidQuery("--by orders one release's dimensions: give its RELEASE_ID")
        if args.release_id:
            with progress("fetch release", quiet=args.quiet):
                release = client.get_release(args.release_id, by=order or None)
            if release.query is not None:  # its notes suggest options, as a fresh release's do
                release = Release(
                    release.table, release.metadata, request_id=release.request_id,
                    query=replace(release.query, spelling="cli"), charged=release.charged,
                )
            emit(_release_text(release, args.format))
            return EXIT_OK
        with progress("releases", quiet=args.quiet):
            found = client.releases(limit=args.limit)
        if args.format == "json":
            emit(json.dumps({"releases": [r.to_dict() for r in found]}, indent=2))
        elif args.format == "csv":
            dicts = [r.to_dict() for r in found]
            names = list(dicts[0]) if dicts else ["release_id"]
            emit(csv_text([names] + [[csv_cell(d[n]) for n in names] for d in dicts]))
        else:
            emit(repr(found))
        return EXIT_OK

    return run_with_client(args, body)


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def csv_text(rows: list[list[str]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 160


__all__ = [
    "add_budget_command",
    "add_codebook_command",
    "add_dry_run_command",
    "add_query_command",
    "add_releases_command",
    "add_server_options",
    "build_query",
    "ca_cert_of",
    "token_of",
]
