"""`veil serve` config files: TOML and YAML, strict keys, safe defaults."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from engine.loss import Accounting
from server.config import ConfigError, config_from_mapping, load_config

TOML = """
data = "data/ctdc.duckdb"
codebook = "ctdc_v7"
ledger = "var/ledger.sqlite"

[privacy]
accounting = "zcdp"
k = 12
beta = 0.01

[caps]
dataset = "20"
client = "0.5"
institutions = { IOM = "5" }

[server]
listen = "127.0.0.1:6000"
reflection = true

[limits]
max_cells = 5000
max_concurrent_calls = 4
rate_per_second = 2.5

[log]
level = "debug"
"""


def test_toml(tmp_path: Path) -> None:
    path = tmp_path / "veil.toml"
    path.write_text(TOML)
    (tmp_path / "var").mkdir()  # the ledger's directory must exist
    config = load_config(path)
    assert config.data == tmp_path / "data/ctdc.duckdb"
    assert config.ledger == tmp_path / "var/ledger.sqlite"
    assert config.settings.accounting is Accounting.ZCDP and config.settings.k == 12
    assert config.caps.dataset == "20" and config.caps.client == "0.5"
    assert config.caps.institutions == {"IOM": "5"}
    assert config.reflection and config.listen == "127.0.0.1:6000"
    assert config.limits.max_concurrent_calls == 4 and config.limits.rate_per_second == 2.5
    settings = config.engine_settings(min_cell_size=10)
    assert settings.max_cells == 5000 and settings.k == 12 and settings.beta == 0.01


def test_yaml_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "veil.yaml"
    path.write_text("data: d.duckdb\ncaps:\n  dataset: 10\n")
    config = load_config(path)
    assert config.settings.accounting is Accounting.PURE_DP
    assert config.listen == "127.0.0.1:50051" and config.tls is None and not config.reflection
    assert config.engine_settings(min_cell_size=11).k == 11  # the codebook's k by default
    assert config.limits.max_request_bytes == 1 << 20
    assert config.token_lifetime == timedelta(days=365)  # tokens expire unless told otherwise
    never = config_from_mapping({"data": "d", "server": {"token_days": 0}})
    assert never.token_lifetime is None


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({}, "needs `data`"),
        ({"data": "d", "limit": {}}, "unknown setting(s) limit"),
        ({"data": "d", "limits": {"max_cels": 1}}, "max_cels"),
        ({"data": "d", "limits": {"max_cells": 0}}, "positive"),
        ({"data": "d", "limits": {"max_cells": True}}, "number"),
        ({"data": "d", "limits": {"rate_per_second": float("nan")}}, "positive"),
        ({"data": "d", "privacy": {"accounting": "renyi"}}, "accounting"),
        ({"data": "d", "privacy": {"k": 5}}, "below the configured floor"),
        ({"data": "d", "privacy": {"beta": 0.7}}, "beta"),
        ({"data": "d", "caps": {"dataset": "-1"}}, "positive"),
        ({"data": "d", "caps": {"dataset": "NaN"}}, "finite"),
        ({"data": "d", "server": {"listen": "0.0.0.0:50051"}}, "without TLS"),
        ({"data": "d", "server": {"listen": "nohost"}}, "host:port"),
        ({"data": "d", "tls": {"cert": "c.pem"}}, "both"),
        ({"data": "d", "tls": {"cert": "c.pem", "key": "k.pem"}}, "no such file"),
        (
            {"data": "d", "tls": {"cert": "c", "key": "k", "bind_client_ids": "yes"}},
            "tls.bind_client_ids must be true or false",
        ),
        (
            {"data": "d", "tls": {"cert": "c", "key": "k", "bind_client_ids": True}},
            "needs tls.client_ca",
        ),
        ({"data": "d", "log": {"level": "loud"}}, "log.level"),
        ({"data": "d", "server": {"reflection": "yes"}}, "true or false"),
        ({"data": "d", "server": {"token_days": -1}}, "server.token_days must lie between"),
        ({"data": "d", "server": {"token_days": 1.5}}, "server.token_days"),
    ],
)
def test_refused(raw: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=None) as error:
        config_from_mapping(raw)
    assert says in str(error.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "veil.toml"
    bad.write_text("data = [")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(bad)
    other = tmp_path / "veil.ini"
    other.write_text("x")
    with pytest.raises(ConfigError, match=r"\.toml"):
        load_config(other)


def test_a_listen_override_is_checked_as_the_file_is() -> None:
    config = config_from_mapping({"data": "d.duckdb", "caps": {"dataset": 10}})
    assert config.listening_on("127.0.0.1:0").listen == "127.0.0.1:0"
    with pytest.raises(ConfigError, match="clear text"):
        config.listening_on("0.0.0.0:50051")  # no [tls]: tokens would travel in clear text
    # Only ASCII digits make a port: a superscript two once escaped as a bare ValueError, and
    # Arabic-Indic "50" was read as port 50.
    for address in ("nowhere", "127.0.0.1:\u00b2", "127.0.0.1:\u0665\u0660", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="host:port"):
            config.listening_on(address)


@pytest.mark.parametrize("zero", [0, 0.0, "0", "0.00", " 0 "])
def test_a_zero_client_cap_is_read_as_the_ledger_reads_it(zero: object) -> None:
    config = config_from_mapping({"data": "d.duckdb", "caps": {"dataset": 10, "client": zero}})
    assert config.caps.client == "0"
    with pytest.raises(ConfigError, match="positive"):
        config_from_mapping({"data": "d.duckdb", "caps": {"dataset": zero}})


def test_the_ledger_is_a_file_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "ledger").mkdir()
    with pytest.raises(ConfigError, match="not a directory"):
        config_from_mapping({"data": "d", "ledger": "ledger"}, base=tmp_path)
    assert config_from_mapping({"data": "d", "ledger": "ledger/ledger.sqlite"}, base=tmp_path)


def test_the_ledger_directory_must_exist(tmp_path: Path) -> None:
    """A misspelt directory would otherwise start a new ledger, every budget unspent."""
    with pytest.raises(ConfigError, match=r"the directory .*ledgr does not exist"):
        config_from_mapping({"data": "d", "ledger": "ledgr/ledger.sqlite"}, base=tmp_path)
    assert not (tmp_path / "ledgr").exists()


@pytest.mark.parametrize(
    ("limits", "says"),
    [
        ({"workers": 2.5}, "limits.workers must be a whole number"),
        ({"rate_burst": 0.5}, "limits.rate_burst must be a whole number"),
        ({"max_cells": 1000.0}, "limits.max_cells must be a whole number"),
        ({"max_request_bytes": 10**10}, "limits.max_request_bytes must be at most 2147483647"),
        ({"max_concurrent_calls": 2**31}, "at most"),
    ],
)
def test_counts_and_sizes_are_whole_numbers_grpc_can_take(
    limits: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_mapping({"data": "d", "limits": limits})
    assert says in str(error.value)
    # Rates and durations may be fractions.
    fractional = {"rate_per_second": 0.5, "max_query_seconds": 2.5}
    assert config_from_mapping({"data": "d", "limits": fractional}).limits.rate_per_second == 0.5


def test_an_empty_client_ca_is_refused_rather_than_dropping_mutual_tls() -> None:
    tls = {"cert": "c.pem", "key": "k.pem", "client_ca": ""}
    with pytest.raises(ConfigError, match=r"tls\.client_ca must be a path"):
        config_from_mapping({"data": "d", "tls": tls})


def test_paths_are_absolute_when_the_config_is_named_relatively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages then name the file the server looked for, wherever it was started from."""
    (tmp_path / "veil.toml").write_text('data = "d.duckdb"\nledger = "ledger.sqlite"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config("veil.toml")
    assert config.data == tmp_path / "d.duckdb" and config.ledger == tmp_path / "ledger.sqlite"


def test_the_module_documents_every_key_it_accepts() -> None:
    # The README sends custodians to this docstring for "the full list of keys".
    import re
    from dataclasses import fields

    from server import config

    doc = config.__doc__ or ""
    documented = set(re.findall(r"^\s*([a-z_]+) = ", doc, flags=re.MULTILINE))
    sections = set(re.findall(r"^\s*\[([a-z]+)\]", doc, flags=re.MULTILINE))
    accepted = (
        config._PRIVACY | config._CAPS | config._SERVER | config._TLS | config._LOG
        | {f.name for f in fields(config.Limits)} | (config._TOP - sections)
    )
    assert accepted - documented == set()
    assert sections == config._TOP - {"data", "codebook", "ledger", "head_file"}
