"""`veil query`, `veil dry-run`, `veil codebook`, `veil budget`, `veil releases` against a real
server on port 0: tables for people, CSV and JSON that parse back, exit statuses for errors."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest

import client
import veil_cli
from tests.client_harness import add_researcher, address, start_server
from tests.server_harness import LiveServer

ROOT = Path(__file__).resolve().parents[2]
SQL = (
    "SELECT gender, ageBroad, COUNT(*) FROM victims WHERE majorityStatus = 'Minor' "
    "GROUP BY gender, ageBroad"
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("client-cli"))
    yield server
    server.stop()


@pytest.fixture
def env(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh researcher, named by VEIL_SERVER and VEIL_TOKEN; returns its token."""
    _, token = add_researcher(live, cap="5")
    monkeypatch.setenv("VEIL_SERVER", address(live))
    monkeypatch.setenv("VEIL_TOKEN", token)
    return token


def veil(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = veil_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_query_table_is_aligned_and_timed(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = veil(capsys, "query", SQL, "--epsilon", "0.5")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["gender", "ageBroad", "value", "95%", "CI", "status"]
    assert set(lines[1]) <= {"-", " "}
    value_end = lines[0].index("value") + len("value")
    rows = [line for line in lines[2:] if line and not line.startswith("count by")]
    assert len(rows) == 40
    assert all(line[value_end - 1] in "0123456789-" for line in rows)  # right-aligned values
    assert any(line.rstrip().endswith("suppressed") for line in rows)
    assert "epsilon 0.5" in out and "release rel_" in out
    assert "veil: release took" in err


def test_query_json_parses_back(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    adults = SQL.replace("'Minor'", "'Adult'")
    code, out, _ = veil(capsys, "query", adults, "--epsilon", "0.25", "--format", "json", "-q")
    assert code == 0
    document = json.loads(out)
    assert document["format"] == "veil.release/1"
    assert document["dimensions"] == ["gender", "ageBroad"]
    metadata = document["metadata"]
    assert metadata["loss"] == "0.25" and metadata["accounting"] == "pure_dp"
    assert {"release_id", "charge_id", "mechanism", "noise_scale", "tau", "k", "beta",
            "confidence", "cells", "suppressed_cells", "fingerprint", "data_version"} <= set(
        metadata)
    cells = document["cells"]
    assert len(cells) == metadata["cells"] == 40
    assert sum(c["suppressed"] for c in cells) == metadata["suppressed_cells"]
    for cell in cells:
        assert set(cell) == {"keys", "value", "ci_low", "ci_high", "suppressed", "status"}
        assert cell["status"] == ("suppressed" if cell["suppressed"] else "published")
        assert set(cell["keys"]) == {"gender", "ageBroad"}
        if cell["suppressed"]:
            assert cell["value"] is None and cell["ci_low"] is None and cell["ci_high"] is None
        else:
            assert cell["ci_low"] <= cell["value"] <= cell["ci_high"]
    # The same cells as the release the client fetches by id.
    with client.connect(token=env) as veil_client:
        fetched = veil_client.get_release(metadata["release_id"])
    by_keys = {tuple(sorted(c.keys.items(), key=str)): c for c in fetched}
    for cell in cells:
        same = by_keys[tuple(sorted(cell["keys"].items(), key=str))]
        assert (same.value, same.ci_low, same.ci_high, same.suppressed) == (
            cell["value"], cell["ci_low"], cell["ci_high"], cell["suppressed"])
    assert document["request"]["query"].startswith("count by gender, ageBroad")


def test_query_csv_from_options_parses_back(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = veil(
        capsys, "query", "--flag-counts", "meansOfControl", "--by", "majorityStatus",
        "--where", "majorityStatus=Minor,Adult", "--epsilon", "0.5", "--format", "csv", "-q",
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["flag", "majorityStatus", "value", "ci_low", "ci_high",
                             "suppressed", "status"]
    assert len(rows) == 18 * 4
    for row in rows:
        assert row["suppressed"] in ("true", "false")
        if row["suppressed"] == "true":
            assert row["value"] == row["ci_low"] == row["ci_high"] == ""
            assert row["status"] == "suppressed"
        else:
            assert int(row["ci_low"]) <= int(row["value"]) <= int(row["ci_high"])
        # The filter keeps minors and adults: Unknown's and missing's rows are empty by it.
        empty = row["majorityStatus"] in ("Unknown", "")
        assert (row["status"] == "empty") == empty
        if empty:
            assert (row["value"], row["ci_low"], row["ci_high"]) == ("0", "0", "0")
    assert {r["majorityStatus"] for r in rows} == {"Minor", "Adult", "Unknown", ""}
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_csv(io.StringIO(out))
    assert frame["value"].isna().sum() == sum(r["suppressed"] == "true" for r in rows)


def test_query_options_and_sql_conditions(env: str, capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    target = tmp_path / "share.json"
    code, out, _ = veil(
        capsys, "query", "--proportion", "isSexualExploit = 1", "--by", "gender",
        "--where", "ageBroad IN ('0--8', '9--17')", "--where", "citizenship IS NOT NULL",
        "--epsilon", "0.2", "-f", "json", "-o", str(target), "-q",
    )
    assert code == 0 and out == ""
    document = json.loads(target.read_text())
    assert document["metadata"]["measure"] == "Proportion"
    assert all(0 <= c["value"] <= 1 for c in document["cells"] if not c["suppressed"])


def test_dry_run_budget_and_releases(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = veil(capsys, "dry-run", "--count", "--by", "gender", "--half-width", "20",
                        "-f", "json", "-q")
    assert code == 0
    priced = json.loads(out)
    assert priced["half_width"] <= 20 and priced["already_released"] is False
    assert priced["query"] == "count by gender"
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert json.loads(out)["spent"] == "0"  # a dry run is free

    code, out, _ = veil(capsys, "query", "--count", "--by", "gender", "--loss", priced["loss"],
                        "-q")
    assert code == 0
    code, out, _ = veil(capsys, "budget", "-q")
    assert code == 0 and f"spent {priced['loss']}" in out and "remaining" in out
    code, out, _ = veil(capsys, "dry-run", "--count", "--by", "gender", "--loss", priced["loss"],
                        "-q")
    assert "already released" in out

    code, out, _ = veil(capsys, "releases", "-f", "json", "-q")
    (listed,) = json.loads(out)["releases"]
    assert listed["charged"] == priced["loss"] and listed["query"] == "count by gender"
    code, out, _ = veil(capsys, "releases", "-f", "csv", "-q")
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["release_id"] == listed["release_id"] and row["reused"] == "false"
    code, out, _ = veil(capsys, "releases", "-q")
    assert listed["release_id"] in out and "count by gender" in out
    code, out, _ = veil(capsys, "releases", listed["release_id"], "-f", "json", "-q")
    assert json.loads(out)["metadata"]["release_id"] == listed["release_id"]
    assert Fraction(json.loads(out)["metadata"]["loss"]) == Fraction(priced["loss"])


@pytest.mark.parametrize(
    "asked",
    [
        ["--count", "--by", "gender", "--where", "majorityStatus=Minor"],
        ["--count", "--where", "ageBroad=0--8,9--17", "--where", "yearOfRegistration=2015"],
        ["--count", "--by", "gender", "--where", "yearOfRegistration BETWEEN 2010 AND 2014"],
        ["--count", "--where", "majorityStatus = 'Minor' OR majorityStatus IS NULL"],
        ["--proportion", "isSexualExploit = 1", "--by", "gender"],
        ["--flag-counts", "meansOfControl", "--by", "majorityStatus"],
        ["--mean", "yearOfRegistration", "--by", "majorityStatus"],
        ["--sum", "yearOfRegistration"],
    ],
)
def test_a_release_fetched_again_names_its_query_as_a_fresh_one_does(
    env: str, capsys: pytest.CaptureFixture[str], asked: list[str]
) -> None:
    code, out, _ = veil(capsys, "query", *asked, "--epsilon", "0.1", "-q")
    assert code == 0
    fresh = out.splitlines()[-1]
    release_id = fresh.rsplit(" ", 1)[-1]
    code, out, _ = veil(capsys, "releases", release_id, "-q")
    assert code == 0
    assert out.splitlines()[-1] == fresh
    code, out, _ = veil(capsys, "releases", release_id, "-f", "json", "-q")
    assert json.loads(out)["request"]["query"] == fresh.split(":")[0]


def test_a_release_fetched_again_comes_in_the_order_by_names(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = veil(capsys, "query", "--count", "--by", "majorityStatus,gender",
                        "--epsilon", "0.1", "-f", "csv", "-q")
    assert code == 0 and out.startswith("majorityStatus,gender,")
    code, out, _ = veil(capsys, "releases", "-f", "json", "-q")
    release_id = json.loads(out)["releases"][-1]["release_id"]
    code, canonical, _ = veil(capsys, "releases", release_id, "-f", "csv", "-q")
    assert code == 0 and canonical.startswith("gender,majorityStatus,")  # the server's order
    code, ordered, _ = veil(capsys, "releases", release_id, "--by", "majorityStatus", "-f", "csv",
                            "-q")
    assert code == 0 and ordered.startswith("majorityStatus,gender,")
    rows = list(csv.DictReader(io.StringIO(ordered)))
    assert sorted(rows, key=lambda r: (r["gender"], r["majorityStatus"])) == sorted(
        csv.DictReader(io.StringIO(canonical)), key=lambda r: (r["gender"], r["majorityStatus"])
    )  # the same cells, arranged
    code, _, err = veil(capsys, "releases", release_id, "--by", "ageBroad", "-q")
    assert code == 2 and "ageBroad" in err
    code, _, err = veil(capsys, "releases", release_id, "--by", "majorityStatus,", "-q")
    assert code == 2 and "an empty value in the list" in err
    code, _, err = veil(capsys, "releases", "--by", "gender", "-q")
    assert code == 2 and "RELEASE_ID" in err


def test_codebook(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = veil(capsys, "codebook", "-q")
    assert code == 0 and "gender" in out and "meansOfControl" in out
    settings = out.splitlines()[1]
    assert settings.startswith("privacy loss: epsilon (pure_dp); a cell is suppressed when its "
                               "noisy count is below k = ") and "Deployment(" not in out
    code, out, _ = veil(capsys, "codebook", "--search", "recruit", "-f", "json", "-q")
    names = {item["name"] for item in json.loads(out)["items"]}
    assert "recruiterRelation" in names and "gender" not in names
    code, out, _ = veil(capsys, "codebook", "gender", "-q")
    assert "Transgender/NonConforming" in out and "missing" in out
    code, out, _ = veil(capsys, "codebook", "ageBroad", "-f", "csv", "-q")
    assert [r["code"] for r in csv.DictReader(io.StringIO(out))][:2] == ["0--8", "9--17"]
    code, out, _ = veil(capsys, "codebook", "sexType", "-f", "json", "-q")
    assert len(json.loads(out)["flags"]) == 4


def test_errors_have_messages_and_exit_statuses(
    live: LiveServer, env: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = veil(capsys, "query", "SELECT * FROM victims", "--epsilon", "0.1")
    assert code == 2 and out == ""
    assert "SELECT * is not supported" in err and "FLAG_COUNTS" in err
    code, _, err = veil(capsys, "query", "--count", "--by", "nope", "--epsilon", "0.1")
    assert code == 2 and "variable nope" in err
    code, _, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "9")
    assert code == 3 and "budget exhausted" in err
    # How much of which budget remains, said once.
    assert "the client budget of" in err and err.count("5 of 5 remains") == 1
    assert "left in the" not in err
    code, _, err = veil(capsys, "query", "--epsilon", "0.1")
    assert code == 2 and "give a query" in err
    code, _, err = veil(capsys, "query", SQL, "--by", "gender", "--epsilon", "0.1")
    assert code == 2 and "not both" in err
    code, _, err = veil(capsys, "budget", "--token", "veil_wrong")
    assert code == 4 and "token" in err
    monkeypatch.setenv("VEIL_SERVER", "127.0.0.1:1")
    code, _, err = veil(capsys, "budget", "--timeout", "2", "--retries", "2")
    assert code == 5 and "127.0.0.1:1" in err
    with pytest.raises(SystemExit):  # argparse: a loss is required
        veil_cli.main(["query", SQL])


def test_token_file_and_the_real_command(live: LiveServer, tmp_path: Path) -> None:
    _, token = add_researcher(live)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    result = subprocess.run(
        [sys.executable, "veil_cli.py", "query", SQL.replace("ageBroad", "Datasource"),
         "--epsilon", "0.3", "-f", "json",
         "--server", address(live), "--token-file", str(token_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("VEIL_TOKEN", "VEIL_SERVER")},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["metadata"]["loss"] == "0.3"  # stdout holds only the JSON
    assert "took" in result.stderr


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_malformed_conditions_and_sql_get_one_line_naming_the_bad_part(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = veil(capsys, "query", "--count", "--where", "ageBroad=", "--epsilon", "0.1")
    line = _one_line(err)
    assert code == 2 and out == ""
    assert "--where 'ageBroad='" in line and "no value after '='" in line
    assert '"ageBroad IS NULL"' in line and "took" not in err
    code, _, err = veil(capsys, "query", "--count", "--where", "ageBroad=0--8,", "--epsilon",
                        "0.1")
    assert code == 2 and "an empty value in the list" in _one_line(err)
    code, _, err = veil(capsys, "query", "--count", "--where", "ageBroad IN ('0--8'",
                        "--epsilon", "0.1")
    line = _one_line(err)
    assert code == 2 and "--where" in line and "'(' is not closed" in line
    code, _, err = veil(capsys, "dry-run", "--proportion", "(isSexualExploit = 1) OR",
                        "--epsilon", "0.1")
    line = _one_line(err)
    assert code == 2 and "--proportion" in line and "OR needs a condition" in line
    code, _, err = veil(capsys, "query", "SELECT COUNT(* FROM victims", "--epsilon", "0.1")
    assert code == 2 and "'(' is not closed in 'SELECT COUNT(* FROM'" in _one_line(err)
    for internal in ("<class", "Required keyword", "Col:"):
        assert internal not in err


def test_a_where_value_holding_sql_is_refused_before_anything_is_charged(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = veil(capsys, "query", "--count", "--by", "gender", "--where",
                          "majorityStatus = Minor OR", "--epsilon", "0.1")
    line = _one_line(err)
    assert code == 2 and out == ""
    assert "--where 'majorityStatus = Minor OR': 'Minor OR' is not a value of majorityStatus" in (
        line)
    assert "the SQL keyword OR" in line and 'veil query "SELECT' in line
    # A codebook value with spaces is still one value.
    code, out, _ = veil(capsys, "dry-run", "--count", "--by", "gender", "--where",
                        "citizenshipSubregion=Australia and New Zealand", "--epsilon", "0.1",
                        "-f", "json", "-q")
    assert code == 0 and "citizenshipSubregion = 'Australia and New Zealand'" in json.loads(
        out)["query"]
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert json.loads(out)["spent"] == "0"


@pytest.mark.parametrize("by", ["", ",", "gender,", " , gender"])
def test_an_empty_by_name_is_refused_before_anything_is_charged(
    by: str, env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = veil(capsys, "query", "--count", "--by", by, "--epsilon", "0.1", "-q")
    assert code == 2 and out == ""
    assert f"--by {by!r}: an empty value in the list" in _one_line(err)
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert json.loads(out)["spent"] == "0"


def test_numbers_the_wire_cannot_carry_get_a_message_naming_the_option_range(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    huge = "99999999999999999999"
    for argv, says in (
        (["releases", "--limit", "99999999999999"], "argument --limit"),
        (["dry-run", "--count", "--assumed-count", huge, "--epsilon", "0.1"],
         "argument --assumed-count"),
        (["dry-run", "--count", "--half-width", huge], "argument --half-width"),
        (["query", "--count", "--half-width", huge], "argument --half-width"),
    ):
        with pytest.raises(SystemExit) as exited:  # argparse's refusal, in the option's words
            veil_cli.main([*argv, "-q"])
        err = capsys.readouterr().err
        assert exited.value.code == 2, (argv, err)
        assert says in err and "give a number from" in err, (argv, err)
        assert "out of range" not in err.lower(), (argv, err)
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert code == 0 and json.loads(out)["spent"] == "0"


def test_a_token_file_with_a_byte_order_mark_is_read_and_a_non_ascii_token_refused(
    live: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, token = add_researcher(live)
    monkeypatch.delenv("VEIL_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("\ufeff" + token + "\r\n", encoding="utf-8")  # as Notepad saves it
    code, out, err = veil(capsys, "budget", "--server", address(live), "--token-file",
                          str(token_file), "-f", "json", "-q")
    assert code == 0, err
    token_file.write_text(token + "\u00e9\n", encoding="utf-8")
    code, out, err = veil(capsys, "budget", "--server", address(live), "--token-file",
                          str(token_file), "-q")
    assert code == 4 and out == ""
    assert "printable ASCII" in _one_line(err) and "Invalid metadata" not in err


def test_the_token_file_veil_serve_writes_is_a_token_file_the_client_reads(
    live: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client_id, token = add_researcher(live)
    monkeypatch.delenv("VEIL_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(f"token for {client_id}: {token}\n", encoding="ascii")  # --init-admin's
    code, out, err = veil(capsys, "budget", "--server", address(live), "--token-file",
                          str(token_file), "-f", "json", "-q")
    assert code == 0, err
    # --demo's file names several clients: which token is meant is not guessed.
    token_file.write_text(f"token for alice: {token}\ntoken for bob: {token}\n", encoding="ascii")
    code, out, err = veil(capsys, "budget", "--server", address(live), "--token-file",
                          str(token_file), "-q")
    assert code == 4 and out == ""
    assert "several clients (alice, bob)" in _one_line(err) and token not in err


def test_smaller_bad_options_are_refused_before_anything_is_charged(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = veil(capsys, "query", "--count", "--server", "127.0.0.1:99999",
                          "--epsilon", "0.1", "-q")
    assert code == 2 and "a port is a number from 1 to 65535" in _one_line(err)
    # An address written as a URL: gRPC looked "http://127.0.0.1:50051" up as a host name, and
    # the command said, after its retries, that the server was unavailable.
    for url in ("http://127.0.0.1:50051", "https://veil.example.org:443/"):
        code, out, err = veil(capsys, "query", "--count", "--server", url, "--epsilon", "0.1",
                              "-q")
        host_port = url.split("://")[1].rstrip("/")
        assert code == 2 and out == ""
        assert f"is a URL; give HOST:PORT ({host_port})" in _one_line(err)
        assert "unavailable" not in err
    with pytest.raises(ValueError, match="is a URL"):
        client.connect("grpc://localhost:50051", token="veil_x")
    for timeout in ("0", "-1", "nan"):
        with pytest.raises(SystemExit) as exited:
            veil_cli.main(["budget", "--timeout", timeout])
        assert exited.value.code == 2
        assert "argument --timeout" in capsys.readouterr().err
    code, out, err = veil(capsys, "query", "--proportion", "", "--epsilon", "0.1", "-q")
    assert code == 2 and "--proportion '': the condition is empty" in _one_line(err)
    with pytest.raises(SystemExit) as exited:
        veil_cli.main(["query", "--count", "--request-id", "", "--epsilon", "0.1", "-q"])
    assert exited.value.code == 2
    assert "argument --request-id: it is empty" in capsys.readouterr().err
    for where in (["--where", "gender"], ["--where", "NOT ageBroad"]):
        code, out, err = veil(capsys, "query", "--count", *where, "--epsilon", "0.1", "-q")
        line = _one_line(err)
        assert code == 2 and "a bare name is a condition only for a flag (0/1)" in line, line
    code, out, err = veil(capsys, "query", "--count", "--where", "citizenshipRegion",
                          "--epsilon", "0.1", "-q")
    assert code == 2 and "citizenshipRegion is a derived dimension" in _one_line(err)
    # A column that cannot be queried at all is refused as such, not offered a comparison.
    code, out, err = veil(capsys, "query", "--count", "--where", "meansOfControlConcatenated",
                          "--epsilon", "0.1", "-q")
    line = _one_line(err)
    assert code == 2 and "concatenated label column" in line and "IS NOT NULL" not in line, line
    code, out, err = veil(capsys, "query", "--count", "--by", "gender", "--where",
                          "gender='Male' -- AND gender='Female'", "--epsilon", "0.1", "-q")
    assert code == 2 and "cannot hold a comment" in _one_line(err)
    code, out, err = veil(capsys, "query", "SELECT COUNT(*) FROM t WHERE gender", "--epsilon",
                          "0.1", "-q")
    assert code == 2 and "a bare name is a condition only for a flag" in _one_line(err)
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert json.loads(out)["spent"] == "0"


def test_an_output_file_that_cannot_be_written_is_found_before_paying(
    env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    nowhere = tmp_path / "no-such-directory" / "table.csv"
    code, out, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "0.1",
                          "-f", "csv", "-o", str(nowhere), "-q")
    assert code == 2 and out == ""
    assert f"cannot write {nowhere}" in err and "nothing was released or charged" in err
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert json.loads(out)["spent"] == "0"
    # The check leaves no file behind, and an existing file is kept until the release is in hand.
    fresh = tmp_path / "fresh.csv"
    kept = tmp_path / "kept.csv"
    kept.write_text("the last cycle's table\n")
    code, _, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "9",
                        "-o", str(fresh), "-q")
    assert code == 3 and not fresh.exists()  # over budget: refused, nothing written
    code, _, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "9",
                        "-o", str(kept), "-q")
    assert code == 3 and kept.read_text() == "the last cycle's table\n"
    # Nor is a symlink to a file yet to be written touched, or its target made, before paying.
    link, target = tmp_path / "link.csv", tmp_path / "written" / "table.csv"
    (tmp_path / "written").mkdir()
    link.symlink_to(target)
    code, _, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "9",
                        "-o", str(link), "-q")
    assert code == 3 and link.is_symlink() and not target.exists()
    # The path is checked as the write will open it: "~" left unexpanded by the shell (as in
    # --output=~/x.csv), or "sub/.." through a directory that does not exist.
    for path in ("~/table.csv", str(tmp_path / "no-such" / ".." / "table.csv")):
        code, _, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "0.1",
                            f"--output={path}", "-q")
        assert code == 2 and "nothing was released or charged" in err, (path, err)
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    code, _, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "0.1",
                        "-o", str(loop), "-q")
    assert code == 2 and "nothing was released or charged" in err
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert json.loads(out)["spent"] == "0"


def test_a_write_that_fails_keeps_the_old_file_and_names_the_release(
    env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    kept = tmp_path / "kept.csv"
    kept.write_text("the last cycle's table\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("os.fsync", full)
        code, out, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "0.1",
                              "-f", "csv", "-o", str(kept), "-q")
    assert code == 1 and out == ""
    assert "No space left on device" in err and "prints it again, free" in err
    release_id = err.split("release ", 1)[1].split()[0]
    assert kept.read_text() == "the last cycle's table\n"  # not truncated, not replaced
    assert [p.name for p in tmp_path.iterdir()] == ["kept.csv"]  # no temporary file left
    code, out, _ = veil(capsys, "releases", release_id, "-f", "csv", "-q")
    assert code == 0 and out.startswith("gender,")


def test_the_other_accountings_loss_is_refused_in_the_shells_words(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = veil(capsys, "query", "--count", "--by", "gender", "--rho", "0.1", "-q")
    assert code == 2 and out == ""
    line = _one_line(err)
    assert line.endswith("pass --epsilon instead of --rho") and "=" not in line
    with client.connect(os.environ["VEIL_SERVER"], token=env) as veil_client:
        with pytest.raises(client.InvalidQuery, match=r"pass epsilon=\.\.\. instead of rho="):
            veil_client.count().by("gender").release(rho="0.1")
        assert veil_client.budget().spent == 0


def test_ctrl_c_while_a_pack_spec_is_read_says_nothing_was_asked(
    env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import client.pack

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(client.pack.Pack, "from_toml", interrupted)
    for mode in ("--dry-run", "--out"):
        extra = [str(tmp_path / "tables")] if mode == "--out" else []
        code, out, err = veil(capsys, "pack", str(tmp_path / "spec.toml"), mode, *extra)
        assert code == 130 and out == ""
        assert _one_line(err) == "veil: interrupted; nothing was asked of any server"
    assert not (tmp_path / "tables").exists()


def test_ctrl_c_names_the_request_id_that_fetches_the_release_free(
    env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.cli

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    # Before anything is asked: nothing was charged, and no traceback.
    with monkeypatch.context() as patch:
        patch.setattr(client.Client, "codebook", interrupted)
        code, out, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "0.1",
                              "-q")
    assert code == 130 and out == ""
    assert "interrupted" in _one_line(err) and "nothing was charged" in err
    # After the release was made (while it is printed): the request id that gets it back free.
    with monkeypatch.context() as patch:
        patch.setattr(client.cli, "emit", interrupted)
        code, out, err = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "0.1",
                              "-q")
    line = _one_line(err)
    assert code == 130 and "interrupted" in line and "may have been made and charged" in line
    assert "`veil releases`" in line
    request_id = line.split("--request-id ", 1)[1].split()[0]
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    spent = json.loads(out)["spent"]
    code, out, _ = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "0.1",
                        "--request-id", request_id, "-f", "json", "-q")
    assert code == 0
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert json.loads(out)["spent"] == spent  # the release asked for again: free
    code, out, _ = veil(capsys, "releases", "-f", "json", "-q")
    assert request_id in out


def test_max_loss_caps_what_a_half_width_may_cost(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = veil(capsys, "query", "--count", "--by", "gender", "--half-width", "1",
                          "--max-loss", "0.1", "-q")
    assert code == 2 and out == "" and "more than max_loss 0.1; nothing was charged" in err
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert json.loads(out)["spent"] == "0"


def test_a_flag_set_given_as_a_dimension_points_to_its_flag_counts(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = veil(capsys, "query", "--count", "--by", "gender,meansOfControl", "--epsilon",
                        "0.1")
    assert code == 2 and "--flag-counts meansOfControl --by gender" in _one_line(err)
    assert "took" not in err  # the timing line is for calls that succeed
    code, _, err = veil(capsys, "query", "SELECT meansOfControl, COUNT(*) FROM victims "
                        "GROUP BY meansOfControl", "--epsilon", "0.1")
    assert code == 2 and "SELECT FLAG_COUNTS(meansOfControl) FROM victims" in err
    code, out, _ = veil(capsys, "budget", "-f", "json", "-q")
    assert json.loads(out)["spent"] == "0"


def test_codebook_names_ignore_case_and_unknown_ones_get_suggestions(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = veil(capsys, "codebook", "GENDER", "-q")
    assert code == 0 and out.startswith("gender  (category)") and "Transgender" in out
    code, out, _ = veil(capsys, "codebook", "meansofcontrol", "-f", "json", "-q")
    assert code == 0 and json.loads(out)["name"] == "meansOfControl"
    code, _, err = veil(capsys, "codebook", "GENDR", "-q")
    assert code == 2 and "did you mean gender?" in err


def test_an_unknown_codebook_name_is_not_called_an_invalid_query(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = veil(capsys, "codebook", "meansOfControll")
    assert (code, out) == (2, "")
    assert err == (
        "veil: 'meansOfControll' is not a variable, flag set or derived dimension of codebook "
        "ctdc; did you mean meansOfControl, meansOfControlOther, meansOfControlThreats?\n"
    )
    code, out, err = veil(capsys, "codebook", "zzqqxx", "-f", "json", "-q")
    assert (code, out) == (2, "")
    assert err == (
        "veil: 'zzqqxx' is not a variable, flag set or derived dimension of codebook ctdc\n"
    )


def test_a_loss_with_too_many_places_says_what_to_write(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = veil(capsys, "query", "--count", "--epsilon", "0.30000000000000004")
    line = _one_line(err)
    assert code == 2 and "at most 15 decimal places, such as '0.3'" in line
    assert "exponent" not in line
    code, out, _ = veil(capsys, "dry-run", "--count", "--epsilon", "5e-1", "-f", "json", "-q")
    assert code == 0 and json.loads(out)["loss"] == "0.5"


def test_dry_run_says_whether_the_budget_covers_it(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = veil(capsys, "dry-run", "--count", "--by", "Datasource", "--epsilon", "2",
                        "-q")
    assert code == 0 and "cost: epsilon 2; it fits: 5 remaining now, 3 after" in out
    code, out, _ = veil(capsys, "dry-run", "--count", "--by", "Datasource", "--epsilon", "6",
                        "-f", "json", "-q")
    priced = json.loads(out)
    assert priced["fits_budget"] is False and priced["limiting_scope"] == "client"
    assert priced["remaining"] == "5" and priced["remaining_after"] is None
    code, out, _ = veil(capsys, "dry-run", "--count", "--by", "Datasource", "--epsilon", "6",
                        "-q")
    assert "it does NOT fit: the client budget has 5 left" in out

    assert veil(capsys, "query", "--count", "--by", "Datasource", "--epsilon", "2", "-q")[0] == 0
    code, out, _ = veil(capsys, "dry-run", "--count", "--by", "Datasource", "--epsilon", "1",
                        "-q")
    assert "cost: 0 (the stored release is returned free; 3 remains)" in out
    assert "it was made at epsilon 2, with the accuracy shown" in out


def test_each_retry_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "veil_cli.py", "budget", "--server", "127.0.0.1:1", "--token",
         "veil_x", "--retries", "3", "--timeout", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 5
    lines = result.stderr.splitlines()
    retries = [line for line in lines if "retry" in line.lower()]
    assert len(retries) == 2, result.stderr  # attempts 2 and 3
    assert all(line.startswith("veil: GetBudget failed (UNAVAILABLE") for line in retries)
    assert len(lines) == 3 and "cannot reach" in lines[-1], result.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _screen(text: str) -> list[str]:
    """What a terminal shows for `text`: a carriage return writes over its line from the left."""
    shown = []
    for raw in text.split("\n"):
        line = ""
        for part in raw.split("\r"):
            line = part + line[len(part):]
        shown.append(line.rstrip())
    return shown


def test_a_retry_during_the_spinner_is_one_clean_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from client import cli

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with cli.progress("a much longer label than the retry line", quiet=False, stream=terminal):
        time.sleep(0.35)  # the spinner draws its line
        cli._report_retry("Release", 2, 0.5, "UNAVAILABLE: down")
        time.sleep(0.25)
    screen = [line for line in _screen(terminal.getvalue()) if line]
    assert screen[0] == "veil: Release failed (UNAVAILABLE: down); retry 2 in 0.5 s"
    assert screen[1].startswith("veil: a much longer label than the retry line took")
    assert len(screen) == 2, screen


def test_a_missing_token_names_the_shells_ways_to_give_one(
    live: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VEIL_SERVER", address(live))
    monkeypatch.delenv("VEIL_TOKEN", raising=False)
    code, out, err = veil(capsys, "budget")
    assert code == 4 and out == ""
    assert _one_line(err) == (
        "veil: no token: set VEIL_TOKEN or pass --token-file FILE, with the token the custodian "
        "issued"
    )
    empty = tmp_path / "token"
    empty.write_text("\n")
    code, _, err = veil(capsys, "budget", "--token-file", str(empty))
    assert code == 4 and _one_line(err) == f"veil: the token file {empty} is empty"
    missing = tmp_path / "no-such-token"
    code, _, err = veil(capsys, "budget", "--token-file", str(missing))
    assert code == 4 and _one_line(err) == (
        f"veil: cannot read the token file {missing}: No such file or directory"
    )
    for wrong in ("-1", "0", "many"):  # tries in all: at least one
        with pytest.raises(SystemExit) as exited:
            veil(capsys, "budget", "--retries", wrong)
        assert exited.value.code == 2 and "--retries" in capsys.readouterr().err
    code, _, err = veil(capsys, "admin", "list")
    assert code == 4 and "set VEIL_TOKEN or pass --token-file" in _one_line(err)


def test_an_expired_or_revoked_token_is_not_told_to_pass_the_token_again(
    live: LiveServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datetime import UTC, datetime, timedelta

    from server.auth import hash_token

    monkeypatch.setenv("VEIL_SERVER", address(live))
    expired_id, expired = add_researcher(live)
    live.ledger.set_token_hash(expired_id, hash_token(expired),
                               expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with client.connect(address(live), token=expired) as veil_client, pytest.raises(
        client.AuthenticationError
    ) as raised:
        veil_client.budget()
    assert str(raised.value).endswith(f"(veil admin rotate {expired_id})")
    assert "token=" not in str(raised.value) and "VEIL_TOKEN" not in str(raised.value)
    monkeypatch.setenv("VEIL_TOKEN", expired)
    code, _, err = veil(capsys, "budget", "-q")
    assert code == 4 and _one_line(err).endswith(f"(veil admin rotate {expired_id})")

    revoked_id, revoked = add_researcher(live)
    live.ledger.revoke(revoked_id, reason="left")
    with client.connect(address(live), token=revoked) as veil_client, pytest.raises(
        client.AuthenticationError
    ) as raised:
        veil_client.budget()
    assert "token=... or VEIL_TOKEN holds the latest token issued to you" in str(raised.value)
    assert "needs a new one from the administrator (veil admin rotate CLIENT)" in str(
        raised.value)
    # Revoked: rotating is refused for it (a revoked client cannot be given a token again).
    assert "a revoked client needs to be registered anew (veil admin register)" in str(
        raised.value)
    monkeypatch.setenv("VEIL_TOKEN", revoked)
    code, _, err = veil(capsys, "budget", "-q")
    assert code == 4 and "token=" not in err
    assert "check that VEIL_TOKEN or --token-file holds the latest token" in _one_line(err)
    assert "needs a new one from the administrator (veil admin rotate CLIENT)" in err
    assert "a revoked client needs to be registered anew (veil admin register)" in err

    # No token at all: the shell's ways to give one, not Python's.
    code, _, err = veil(capsys, "budget", "-q", "--token", "")
    assert code == 4 and "token=" not in err


def test_commands_piped_into_head_end_quietly(live: LiveServer) -> None:
    from tests.unit.test_cli_pipes import assert_quiet, run_into_closed_pipe

    _, token = add_researcher(live)
    env = {**os.environ, "VEIL_SERVER": address(live), "VEIL_TOKEN": token}
    assert_quiet(*run_into_closed_pipe("codebook", env=env))
    assert_quiet(*run_into_closed_pipe("codebook", "--format", "csv", env=env))
    assert_quiet(*run_into_closed_pipe(
        "query", "--count", "--by", "gender,ageBroad", "--epsilon", "0.1", "--format", "csv",
        "-q", env=env,
    ))
    assert_quiet(*run_into_closed_pipe("releases", env=env))


def test_output_into_a_pipe_or_device_is_written_not_replaced(
    env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Whole-file replacement is for regular files: a FIFO (or /dev/stdout, a device) given as
    # -o must be written into, and stay what it is.
    import stat
    import threading

    fifo = tmp_path / "table.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    code, _, _ = veil(capsys, "query", "--count", "--by", "gender", "--epsilon", "0.1",
                      "-f", "csv", "-o", str(fifo), "-q")
    reader.join(timeout=30)
    assert code == 0
    assert received and received[0].startswith("gender,")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["table.fifo"]
