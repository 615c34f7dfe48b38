"""Neighbouring datasets, asked through derived dimensions: does anything but the noisy values,
and above all the cells stated empty, tell them apart?

The target is the only record from Melanesia (Fiji), the only minor from Oceania and the only
record of his (region, age group) cell: with him, those cells hold 1; without him, 0, for every
level of the M49 regions and for `majorityFromAge`. A cell whose query rules it out is stated as
exactly 0 with status `empty`; if that statement ever followed the data (a cell with no record
called empty), the status alone would say whether he is in the data, noise or no noise.

Two real servers hold the two datasets and answer the same calls: every measure grouped by a
derived dimension and filtered on its source or on another level of it, and their dry runs.

- With the noisy values pinned to the same numbers in both (the noise patched in this process
  only), every response is the same once ids and times are blanked.
- With real noise, the cells stated empty, the metadata that counts them
  (`unreachable_cells`, `empty_pass_probability`, `expected_empty_published_bound`) and every
  dry run are the same in both, and no cell the target falls into is ever stated empty.

The control states empty every cell with no record (the data's emptiness, not the query's) and
checks the pinned comparison tells the worlds apart. Nothing compared depends on the noise: the
tests fail by chance with probability 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from google.protobuf.json_format import MessageToDict

from engine import engine as engine_module
from engine.backend import Cancellation
from engine.noise import NoiseAhead
from engine.planner import Plan
from engine.query import And, Count, Eq, FlagCounts, In, Mean, Not, Proportion, Query, Sum
from engine.release import Answer, Release, build_answer
from protos.veil.v1 import veil_pb2 as pb
from server.convert import query_to_pb
from tests.attacks.conftest import FAST_LIMITS
from tests.attacks.test_side_channels import blank
from tests.conftest import write_database
from tests.server_harness import LiveServer, start_live, stubs

TARGET = {"citizenship": "FJ", "ageBroad": "9--17", "gender": "Male",
          "yearOfRegistration": 2011, "isSexualExploit": 1, "isForcedLabour": 0}
BASE = (
    [{"citizenship": "AU", "ageBroad": "30--38", "gender": "Female", "yearOfRegistration": 2015,
      "isSexualExploit": 1, "isForcedLabour": 0}] * 40
    + [{"citizenship": "FR", "ageBroad": "9--17", "gender": "Female", "yearOfRegistration": 2018,
        "isSexualExploit": 0, "isForcedLabour": 1}] * 40
    + [{"citizenship": "UA", "ageBroad": "18--20", "gender": "Male", "yearOfRegistration": 2012,
        "isSexualExploit": 0, "isForcedLabour": 1}] * 40
)
PIN = 1000  # every noisy count, when pinned: above every tau


def _q(query: Query) -> pb.Query:
    return query_to_pb(query)


# Each is asked at 0.2 (seven of them: alice's cap of 2 holds them).
QUERIES: dict[str, pb.Query] = {
    "subregion x age group, by countries": _q(Query(
        Count(), by=("citizenshipSubregion", "majorityFromAge"),
        where=In("citizenship", ["FJ", "AU", "FR"]))),
    "region x age band, minors of Oceania": _q(Query(
        Count(), by=("citizenshipRegion", "ageBroad"),
        where=And(Eq("majorityFromAge", "Minor"), Eq("citizenshipRegion", "Oceania")))),
    "intermediate region and country": _q(Query(
        Count(), by=("citizenshipIntermediateRegion", "citizenship"),
        where=Eq("citizenshipRegion", "Oceania"))),
    "exploitation by intermediate region, Fiji": _q(Query(
        FlagCounts("exploitationType"), by=("citizenshipIntermediateRegion",),
        where=And(Eq("citizenship", "FJ"), Eq("isForcedLabour", 0)))),
    "share sexual by age group, Oceania": _q(Query(
        Proportion(Eq("isSexualExploit", 1)), by=("majorityFromAge", "citizenshipSubregion"),
        where=Eq("citizenshipRegion", "Oceania"))),
    "mean year by subregion, outside Europe": _q(Query(
        Mean("yearOfRegistration"), by=("citizenshipSubregion", "majorityFromAge"),
        where=Not(Eq("citizenshipRegion", "Europe")))),
    "sum of years by age group and region, Fiji": _q(Query(
        Sum("yearOfRegistration"), by=("majorityFromAge", "citizenshipRegion"),
        where=Eq("citizenship", "FJ"))),
}
# The target's keys, for finding his cells in a release.
TARGET_KEYS = {"citizenship": "FJ", "citizenshipRegion": "Oceania",
               "citizenshipSubregion": "Melanesia", "citizenshipIntermediateRegion": "Melanesia",
               "majorityFromAge": "Minor", "ageBroad": "9--17"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("derived-neighbours")
    return {
        "without": write_database(root / "without.duckdb", BASE, data_version="neighbours"),
        "with": write_database(root / "with.duckdb", [*BASE, TARGET], data_version="neighbours"),
    }


@pytest.fixture
def pinned_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    def add_to(self: NoiseAhead, exact: list[np.ndarray]) -> list[np.ndarray]:
        self.discard()
        return [np.full(len(v), PIN, dtype=np.int64) for v in exact]

    monkeypatch.setattr(NoiseAhead, "add_to", add_to)


@pytest.fixture
def empty_from_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row whose true count is 0 is stated empty, as if the query had ruled it out."""

    def answer(
        self: engine_module.Engine, plan: Plan, *, cancel: Cancellation | None = None
    ) -> Answer:
        exact = self._true_components(plan, cancel=cancel)
        counts = [v for v, c in zip(exact, plan.components, strict=True) if c.thresholded]
        if len(counts) == 1:
            rows = counts[0].reshape(-1, plan.group_cells).sum(axis=0)
        else:
            rows = np.concatenate(counts)
        noise = NoiseAhead(plan.mechanisms, plan.vector_sizes)
        noisy = noise.add_to(exact)
        vars(plan)["unreachable_row_mask"] = plan.unreachable_row_mask | (rows == 0)
        return build_answer(plan, noisy, data_version=self.data_version)

    monkeypatch.setattr(engine_module.Engine, "answer", answer)


def _table(data: bytes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pylist()
    return rows


def _seen(response: Any) -> str:
    seen = MessageToDict(response, preserving_proto_field_name=True)
    if isinstance(response, pb.ReleaseResponse):
        seen["arrow_ipc"] = {"table": _table(response.arrow_ipc),
                             "metadata": asdict(Release.from_bytes(response.arrow_ipc).metadata)}
    return blank(json.dumps(seen, sort_keys=True, default=str))


def ask(root: Path, data: Path) -> dict[str, Any]:
    """Every query released and dry-run by alice; the responses by label."""
    live: LiveServer = start_live(root, data=data, caps={"dataset": "10", "client": "1"},
                                  limits=FAST_LIMITS)
    out: dict[str, Any] = {}
    try:
        with stubs(live.port) as s:
            for label, query in QUERIES.items():
                out[f"dry run {label}"] = s.research.DryRun(
                    pb.DryRunRequest(query=query, loss="0.2"), metadata=live.auth("alice"))
                out[label] = s.research.Release(
                    pb.ReleaseRequest(request_id=label.replace(" ", "-").replace(",", ""),
                                      query=query, loss="0.2"),
                    metadata=live.auth("alice"))
    finally:
        live.stop()
    return out


def both(tmp_path: Path, worlds: dict[str, Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    return (ask(tmp_path / "without", worlds["without"]),
            ask(tmp_path / "with", worlds["with"]))


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [label for label in a if _seen(a[label]) != _seen(b[label])]


@pytest.mark.usefixtures("pinned_noise")
def test_with_the_noise_pinned_derived_releases_are_the_same_in_both_worlds(
    tmp_path: Path, worlds: dict[str, Path]
) -> None:
    without, with_target = both(tmp_path, worlds)
    assert differences(without, with_target) == []
    # Each release states some rows empty and publishes the rest (PIN passes every tau).
    for label in QUERIES:
        statuses = {row["status"] for row in _table(with_target[label].arrow_ipc)}
        assert statuses == {"published", "empty"}, label


@pytest.mark.usefixtures("pinned_noise", "empty_from_data")
def test_the_comparison_finds_empty_cells_decided_by_the_data(
    tmp_path: Path, worlds: dict[str, Path]
) -> None:
    without, with_target = both(tmp_path, worlds)
    assert set(QUERIES) <= set(differences(without, with_target))


def _empty(response: pb.ReleaseResponse) -> list[int]:
    return [i for i, row in enumerate(_table(response.arrow_ipc)) if row["status"] == "empty"]


def _targets(response: pb.ReleaseResponse) -> list[int]:
    """The rows of a release the target falls into (for flag counts, the rows of his flags)."""
    rows = _table(response.arrow_ipc)
    keys = [k for k in rows[0] if k in TARGET_KEYS]
    return [
        i for i, row in enumerate(rows)
        if all(row[k] == TARGET_KEYS[k] for k in keys)
        and ("flag" not in row or TARGET.get(row["flag"]) == 1)
    ]


def test_with_real_noise_the_empty_cells_and_dry_runs_do_not_depend_on_the_target(
    tmp_path: Path, worlds: dict[str, Path]
) -> None:
    without, with_target = both(tmp_path, worlds)
    fields = ("unreachable_cells", "empty_pass_probability", "expected_empty_published_bound",
              "cells", "tau", "noise_scale")
    for label in QUERIES:
        a, b = without[label], with_target[label]
        assert _empty(a) == _empty(b), label
        assert [getattr(a.metadata, f) for f in fields] == \
               [getattr(b.metadata, f) for f in fields], label
        assert _seen(without[f"dry run {label}"]) == _seen(with_target[f"dry run {label}"])
        # He is in these cells in one world: none is stated empty, in either.
        cells = _targets(b)
        assert cells and not set(cells) & set(_empty(b)), label
