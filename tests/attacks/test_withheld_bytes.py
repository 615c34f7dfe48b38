"""A withheld cell carries nothing in the bytes a client receives, for every measure.

A client that reads the Arrow IPC stream itself, without honouring validity bitmaps, sees the
data buffer under every null. Were a suppressed cell only masked, its noisy value (a count
below tau, a share whose numerator failed, a sum or mean of a small group) and its interval
would be there to read. The attack asks every measure (a sum too) over derived and stored
dimensions from a real server, at a loss small enough that most cells are suppressed, and
reads the value and interval buffers of the bytes as sent, as a stored release replayed to
another client, and as fetched again: under every cell without a value, every byte is zero.

The control masks suppressed values without zeroing them and checks the same reading finds
nonzero bytes. A real server passes whatever the noise: it fails by chance with probability 0.
The control finds a mean's masked values always (an estimate is clamped to 2002-2021, never 0)
and another measure's unless every one of its withheld cells had a noisy value and interval
ends of exactly 0, which with tens of withheld cells at a noise scale of 20 has a probability
far below 1e-20.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine import release as release_module
from engine.query import Count, Eq, FlagCounts, Mean, Proportion, Query, Sum
from protos.veil.v1 import veil_pb2 as pb
from server.convert import query_to_pb
from tests.attacks.conftest import FAST_LIMITS
from tests.server_harness import LiveServer, start_live, stubs

ROWS = (
    [{"citizenship": "PH", "ageBroad": "18--20", "gender": "Female", "yearOfRegistration": 2015,
      "isSexualExploit": 1, "isForcedLabour": 0}] * 30
    + [{"citizenship": "NG", "ageBroad": "9--17", "gender": "Male", "yearOfRegistration": 2019,
        "isSexualExploit": 0, "isForcedLabour": 1}] * 12
    + [{"citizenship": "FR", "ageBroad": "0--8", "gender": "Female", "yearOfRegistration": 2003,
        "isSexualExploit": 1, "isForcedLabour": 1}] * 3
)
QUERIES = {
    "count": Query(Count(), by=("citizenshipRegion", "majorityFromAge")),
    "flags": Query(FlagCounts("exploitationType"), by=("citizenshipRegion",)),
    "share": Query(Proportion(Eq("isSexualExploit", 1)), by=("citizenshipSubregion", "gender")),
    "sum": Query(Sum("yearOfRegistration"), by=("majorityFromAge", "gender")),
    "mean": Query(Mean("yearOfRegistration"), by=("citizenshipRegion", "ageBroad")),
}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = start_live(tmp_path, rows=ROWS, limits=FAST_LIMITS,
                        caps={"dataset": "10", "client": "2"})
    try:
        yield server
    finally:
        server.stop()


def readable_under_nulls(data: bytes) -> list[str]:
    """The columns of an IPC stream whose data buffer holds a nonzero byte under a null."""
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    withheld = np.asarray(table.column("suppressed").to_numpy(zero_copy_only=False))
    found = []
    for name in ("value", "ci_low", "ci_high"):
        column = table.column(name).combine_chunks()
        kind = np.int64 if pa.types.is_integer(column.type) else np.float64
        raw = np.frombuffer(column.buffers()[1], dtype=kind)[
            column.offset : column.offset + len(column)
        ]
        nulls = ~np.asarray(column.is_valid().to_numpy(zero_copy_only=False))
        if (nulls != withheld).any():
            found.append(f"{name}: nulls differ from the suppressed cells")
        if raw[nulls].any():
            found.append(f"{name}: nonzero bytes under a null")
    return found


def attack(live: LiveServer) -> tuple[dict[str, list[str]], int]:
    """What each release shows under its nulls (as sent, replayed, fetched); cells withheld."""
    found: dict[str, list[str]] = {}
    withheld = 0
    with stubs(live.port) as s:
        for label, query in QUERIES.items():
            request = pb.ReleaseRequest(request_id=label, query=query_to_pb(query), loss="0.05")
            sent = s.research.Release(request, metadata=live.auth("alice"))
            replayed = s.research.Release(
                pb.ReleaseRequest(request_id=f"b-{label}", query=request.query, loss="0.05"),
                metadata=live.auth("bob"))
            fetched = s.research.GetRelease(
                pb.GetReleaseRequest(release_id=sent.metadata.release_id),
                metadata=live.auth("alice"))
            assert replayed.charged == "0" and replayed.arrow_ipc == sent.arrow_ipc
            withheld += sent.metadata.suppressed_cells
            found[label] = [
                f"{how}: {problem}"
                for how, data in (("sent", sent.arrow_ipc), ("replayed", replayed.arrow_ipc),
                                  ("fetched", fetched.arrow_ipc))
                for problem in readable_under_nulls(data)
            ]
    return found, withheld


def test_a_withheld_cell_carries_nothing_in_the_bytes_sent(live: LiveServer) -> None:
    found, withheld = attack(live)
    assert found == {label: [] for label in QUERIES}
    assert withheld > 100  # the reading looked under many nulls


@pytest.fixture
def masked_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def withheld(values: np.ndarray, published: np.ndarray, kind: pa.DataType) -> pa.Array:
        return release_module._numbers(np.asarray(values), kind, null=~published)

    monkeypatch.setattr(release_module, "_withheld", withheld)


@pytest.mark.usefixtures("masked_only")
def test_the_reading_finds_values_masked_but_not_zeroed(live: LiveServer) -> None:
    found, _ = attack(live)
    assert all(any("nonzero bytes" in p for p in found[label]) for label in QUERIES), found
