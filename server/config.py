"""One config file for one deployment: data, codebook, privacy settings, caps, listener, limits.

The file is TOML (`.toml`) or YAML (`.yaml`, `.yml`). Relative paths are read relative to the
file. Unknown keys are refused, so a misspelt limit cannot silently fall back to its default.
The ledger's directory must exist, and `veil serve` creates the ledger file itself only with
`--init-admin`: a misspelt path would otherwise start an empty ledger, with every budget
unspent. The TLS files are read at load, so a key that is not the certificate's, or is
encrypted, is refused before the server starts.

    data = "ctdc.duckdb"          # the restricted data file (written by the loader)
    codebook = "ctdc_v7"          # a shipped codebook name or a path to a codebook YAML
    ledger = "ledger.sqlite"      # the budget ledger and audit log: one SQLite file
    head_file = "/var/lib/veil-head/head"  # optional, outside the ledger's directory: the audit
                                  # head, kept there each second; a ledger that does not hold it
                                  # (an older backup restored: budget spent given back) is refused

    [privacy]
    accounting = "pure_dp"        # or "zcdp"
    k = 10                        # minimum cell size (default: the codebook's; never below
                                  # k_floor)
    k_floor = 10                  # the least k any setting may give
    beta = 0.05                   # largest chance a cell below k is published
    confidence = 0.95

    [caps]                        # exact decimals
    dataset = "20"                # total loss the dataset may incur, all clients together
    client = "1"                  # default cap of a newly registered researcher
    institutions = { iom = "5" }  # per-institution caps, by the names given at registration

    [server]
    listen = "127.0.0.1:50051"
    reflection = false
    grace_seconds = 10            # how long SIGTERM waits for calls in flight
    token_days = 365              # a token issued or rotated is refused after this; 0: never

    [tls]                         # absent: plaintext (only for loopback)
    cert = "server.crt"
    key = "server.key"
    client_ca = "clients-ca.crt"  # present: mutual TLS, every client needs a certificate
    bind_client_ids = true        # with client_ca: a token is accepted only over a certificate
                                  # naming its client id (common name or alternative name)

    [limits]
    max_request_bytes = 1048576
    max_response_bytes = 67108864
    max_concurrent_calls = 16     # gRPC counts a call until its worker is free, a moment after
    workers = 16                  # its answer: a client keeping exactly this many calls open
                                  # is refused one now and then (RESOURCE_EXHAUSTED);
                                  # the `stopped` log line says how many ran at once
    rate_per_second = 10.0        # per client, sustained
    rate_burst = 20               # per client, at once
    calls_per_client = 4          # calls one client may have running at once: one researcher
                                  # cannot hold every worker
    max_query_seconds = 60        # a query still running after this is interrupted
    request_seconds = 10          # a call whose request has not arrived after this is cancelled:
                                  # calls that never send one must not hold the workers
    max_cells = 100000
    max_dimensions = 4
    max_filter_depth = 8
    max_filter_terms = 64
    max_list_releases = 1000      # most releases one listing call returns

    [log]
    level = "info"
    file = ""                     # empty: standard error; a file is created readable by its
                                  # owner only, and reopened when moved (logrotate)
"""

from __future__ import annotations

import ipaddress
import math
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from engine.errors import VeilError
from engine.loss import Accounting, exact_amount, exact_cap, format_amount
from engine.settings import Settings


class ConfigError(VeilError):
    """The config file cannot be read or holds a value out of range."""


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate signed by it
    # With mutual TLS, a token works only over a certificate that names its client: a token
    # that leaks is useless without that client's private key too.
    bind_client_ids: bool = True

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    @property
    def binds_client_ids(self) -> bool:
        return self.mutual and self.bind_client_ids


_FRACTIONAL_LIMITS = {"rate_per_second", "max_query_seconds", "request_seconds"}
_MAX_C_INT = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 1 << 20
    max_response_bytes: int = 64 << 20
    max_concurrent_calls: int = 16
    workers: int = 16
    rate_per_second: float = 10.0
    rate_burst: int = 20
    calls_per_client: int = 4
    max_query_seconds: float = 60.0
    request_seconds: float = 10.0
    # The query-shape limits default to the engine's own, which remain their one source.
    max_cells: int = Settings().max_cells
    max_dimensions: int = Settings().max_dimensions
    max_filter_depth: int = Settings().max_filter_depth
    max_filter_terms: int = Settings().max_filter_terms
    max_list_releases: int = 1000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"limits.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"limits.{f.name} must be positive, got {value!r}")
            # Counts and sizes go to gRPC and thread pools as C ints: 2.5 workers or a burst of
            # 0.5 (which would refuse every call) is a mistake, and 2**31 bytes overflows.
            if f.name not in _FRACTIONAL_LIMITS:
                if not isinstance(value, int):
                    raise ConfigError(f"limits.{f.name} must be a whole number, got {value!r}")
                if value > _MAX_C_INT:
                    raise ConfigError(f"limits.{f.name} must be at most {_MAX_C_INT}, got {value}")
        if self.max_request_bytes < 1024:
            raise ConfigError("limits.max_request_bytes must be at least 1024")


@dataclass(frozen=True)
class Caps:
    dataset: str | None = None  # exact decimal text; None: no dataset-wide cap
    client: str = "1"  # default cap of a new researcher when none is given
    institutions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    data: Path
    codebook: str = "ctdc_v7"
    ledger: Path = Path("ledger")
    head_file: Path | None = None
    settings: Settings = field(default_factory=Settings)
    k_given: bool = False  # False: k is the codebook's min_cell_size
    caps: Caps = field(default_factory=Caps)
    listen: str = "127.0.0.1:50051"
    reflection: bool = False
    grace_seconds: float = 10.0
    token_days: int = 365  # 0: tokens never expire
    tls: TLSConfig | None = None
    limits: Limits = field(default_factory=Limits)
    log_level: str = "info"
    log_file: Path | None = None

    @property
    def token_lifetime(self) -> timedelta | None:
        """How long a token issued or rotated now stays valid; None: for ever."""
        return timedelta(days=self.token_days) if self.token_days else None

    def listening_on(self, listen: str) -> ServerConfig:
        """This config with another listen address, checked as the config file's is."""
        _check_listen(listen, self.tls)
        return replace(self, listen=listen)

    def engine_settings(self, *, min_cell_size: int) -> Settings:
        """The engine's settings with this config's limits applied.

        Without an explicit k, k is the codebook's minimum cell size (never below k_floor).
        """
        k = self.settings.k if self.k_given else max(min_cell_size, self.settings.k_floor)
        return replace(
            self.settings,
            k=k,
            max_cells=self.limits.max_cells,
            max_dimensions=self.limits.max_dimensions,
            max_filter_depth=self.limits.max_filter_depth,
            max_filter_terms=self.limits.max_filter_terms,
        )


_TOP = {
    "data", "codebook", "ledger", "head_file", "privacy", "caps", "server", "tls", "limits", "log"
}
_PRIVACY = {"accounting", "k", "k_floor", "beta", "confidence"}
_CAPS = {"dataset", "client", "institutions"}
_SERVER = {"listen", "reflection", "grace_seconds", "token_days"}
_TLS = {"cert", "key", "client_ca", "bind_client_ids"}
_LOG = {"level", "file"}
_LOG_LEVELS = {"debug", "info", "warning", "error"}


def load_config(path: str | Path) -> ServerConfig:
    """Read and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    if path.suffix == ".toml":
        try:
            raw: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    elif path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    else:
        raise ConfigError(f"config {path} must end in .toml, .yaml or .yml")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config {path} must be a mapping of settings")
    # Absolute, so that every message names the file the server looked for.
    return config_from_mapping(raw, base=path.absolute().parent)


def config_from_mapping(raw: Mapping[str, Any], *, base: Path = Path(".")) -> ServerConfig:
    """Build a config from plain data; relative paths are taken relative to `base`."""
    _known(raw, _TOP, "")
    if "data" not in raw:
        raise ConfigError("config needs `data`, the path of the data file")
    privacy = _section(raw, "privacy", _PRIVACY)
    caps = _section(raw, "caps", _CAPS)
    server = _section(raw, "server", _SERVER)
    limits = _section(raw, "limits", {f.name for f in fields(Limits)})
    logging = _section(raw, "log", _LOG)
    tls = _section(raw, "tls", _TLS) if raw.get("tls") is not None else None

    try:
        accounting = Accounting(privacy.get("accounting", Accounting.PURE_DP.value))
    except ValueError:
        raise ConfigError(
            f"privacy.accounting must be one of {[a.value for a in Accounting]}, "
            f"got {privacy.get('accounting')!r}"
        ) from None
    settings_arguments: dict[str, Any] = {"accounting": accounting}
    for name in ("k", "k_floor"):
        if name in privacy:
            settings_arguments[name] = _integer(privacy[name], f"privacy.{name}")
    for name in ("beta", "confidence"):
        if name in privacy:
            settings_arguments[name] = _number(privacy[name], f"privacy.{name}")
    try:
        settings = Settings(**settings_arguments)
    except VeilError as exc:
        raise ConfigError(f"privacy: {exc}") from exc

    institutions = caps.get("institutions") or {}
    if not isinstance(institutions, Mapping):
        raise ConfigError("caps.institutions must map institution names to caps")
    caps_value = Caps(
        dataset=_cap(caps["dataset"], "caps.dataset") if caps.get("dataset") is not None else None,
        client=_cap(caps.get("client", "1"), "caps.client", allow_zero=True),
        institutions={
            str(name): _cap(cap, f"caps.institutions.{name}") for name, cap in institutions.items()
        },
    )

    limits_value = Limits(**dict(limits))
    listen = str(server.get("listen", "127.0.0.1:50051"))
    tls_value = None
    if tls is not None:
        if "cert" not in tls or "key" not in tls:
            raise ConfigError("tls needs both `cert` and `key`")
        # An empty client_ca (a template's unset variable) would quietly drop mutual TLS.
        tls_value = TLSConfig(
            cert=_path(tls["cert"], base, "tls.cert"),
            key=_path(tls["key"], base, "tls.key"),
            client_ca=(
                _path(tls["client_ca"], base, "tls.client_ca") if "client_ca" in tls else None
            ),
            bind_client_ids=_bool(tls.get("bind_client_ids", True), "tls.bind_client_ids"),
        )
        if "bind_client_ids" in tls and tls_value.client_ca is None:
            raise ConfigError("tls.bind_client_ids needs tls.client_ca (mutual TLS)")
        for name in ("cert", "key", "client_ca"):
            file = getattr(tls_value, name)
            if file is not None and not file.is_file():
                raise ConfigError(f"tls.{name}: no such file {file}")
        _check_tls_files(tls_value)
    _check_listen(listen, tls_value)
    level = str(logging.get("level", "info")).lower()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"log.level must be one of {sorted(_LOG_LEVELS)}, got {level!r}")
    grace = _number(server.get("grace_seconds", 10.0), "server.grace_seconds")
    if grace < 0:
        raise ConfigError("server.grace_seconds must not be negative")
    reflection = _bool(server.get("reflection", False), "server.reflection")
    token_days = _integer(server.get("token_days", 365), "server.token_days")
    if not 0 <= token_days <= 36500:
        raise ConfigError("server.token_days must lie between 0 (never expire) and 36500")
    return ServerConfig(
        data=_path(raw["data"], base, "data"),
        codebook=_codebook_source(raw.get("codebook", "ctdc_v7"), base),
        ledger=(ledger := _ledger_path(raw.get("ledger", "ledger"), base)),
        head_file=_head_file(raw["head_file"], base, ledger) if raw.get("head_file") else None,
        settings=settings,
        k_given="k" in privacy,
        caps=caps_value,
        listen=listen,
        reflection=reflection,
        grace_seconds=grace,
        token_days=token_days,
        tls=tls_value,
        limits=limits_value,
        log_level=level,
        log_file=_path(logging["file"], base, "log.file") if logging.get("file") else None,
    )


def _known(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        place = f"[{where}]" if where else "the top level"
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} in {place}; "
            f"known: {', '.join(sorted(allowed))}"
        )


def _section(raw: Mapping[str, Any], name: str, allowed: set[str]) -> Mapping[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table of settings")
    _known(value, allowed, name)
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false")
    return value


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _cap(value: Any, what: str, *, allow_zero: bool = False) -> str:
    # Where a zero cap is allowed, zero is read as the ledger reads it (engine.loss.exact_cap).
    parse = exact_cap if allow_zero else exact_amount
    text = str(value) if isinstance(value, float) else value
    try:
        return format_amount(parse(text, what=what))
    except VeilError as exc:
        raise ConfigError(str(exc)) from exc


def _path(value: Any, base: Path, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a path (a non-empty string), got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _ledger_path(value: Any, base: Path) -> Path:
    path = _path(value, base, "ledger")
    if path.is_dir():
        raise ConfigError(
            f"ledger is the ledger's own SQLite file, not a directory: {path} is a directory "
            f"(for example, ledger = \"{Path(str(value)) / 'ledger.sqlite'}\")"
        )
    # A misspelt directory must not start a new, unspent ledger beside the real one.
    if not path.parent.is_dir():
        raise ConfigError(
            f"ledger: the directory {path.parent} does not exist; create it, or correct the "
            f"path if the ledger is elsewhere"
        )
    return path


def _head_file(value: Any, base: Path, ledger: Path) -> Path:
    path = _path(value, base, "head_file")
    if not path.parent.is_dir():
        raise ConfigError(f"head_file: the directory {path.parent} does not exist; create it")
    # A backup of the ledger's directory restored whole would bring the old head back with it
    # (the ledger's directory is its file's, through any link: the ledger is opened there).
    if path.resolve().is_relative_to(ledger.resolve().parent):
        raise ConfigError(
            f"head_file must be outside the ledger's directory {ledger.parent}, where restoring "
            "the ledger's directory from a backup does not restore the head with it"
        )
    return path


def _check_tls_files(tls: TLSConfig) -> None:
    """Read the certificate, key and client CA as gRPC will, and refuse what it cannot use
    (gRPC itself reports only that the port could not be bound)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=str(tls.cert))
    except ssl.SSLError:
        raise ConfigError(f"tls.cert: {tls.cert} holds no PEM certificate") from None
    try:
        # A password callback that gives none: an encrypted key is refused, not prompted for.
        context.load_cert_chain(str(tls.cert), str(tls.key), password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"tls.key: {tls.key} is not the private key of the certificate {tls.cert}"
            ) from None
        raise ConfigError(
            f"tls.key: {tls.key} holds no unencrypted PEM private key (gRPC cannot use a "
            "key protected by a passphrase)"
        ) from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca))
        except ssl.SSLError:
            raise ConfigError(
                f"tls.client_ca: {tls.client_ca} holds no PEM certificate"
            ) from None


def _codebook_source(value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("codebook must be a shipped codebook name or a path")
    if value.endswith((".yaml", ".yml")) or "/" in value:
        return str(_path(value, base, "codebook"))
    return value


def _host(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"server.listen must be host:port, got {address!r}")
    return host.strip("[]")


def _check_listen(listen: str, tls: TLSConfig | None) -> None:
    """A host:port, and one that only a loopback address may serve without TLS."""
    _host(listen)
    if tls is None and not _is_loopback(listen):
        raise ConfigError(
            f"listening on {listen} without TLS would send tokens in clear text; "
            "configure [tls] or listen on a loopback address"
        )


def _is_loopback(address: str) -> bool:
    host = _host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
