"""Many spellings of one query, from many clients at once, at mixed losses: one noise per loss.

An averaging attacker who cannot get a second draw of a query by asking again (a replay), nor by
rewriting it (a canonical fingerprint), may try both at once: send every spelling of the query
from several clients in the same instant, at losses in no particular order, hoping that two of
them are drawn side by side before either is stored, or that a smaller loss is drawn after a
larger one was stored. The spellings here go through a derived dimension and its source (a
region and its list of countries, `majorityFromAge` and its age bands), reordered and repeated
IN lists, double negation and De Morgan, all on the wire.

What the real server must show, whatever the order the requests are served in:
- every response carries a release drawn at no less loss than it asked for;
- the releases drawn have strictly increasing losses in the order they were made, so at most
  one per loss level, and each was charged once: the ledger's committed charges, the dataset's
  spending and the sum of the distinct releases' losses are one and the same;
- a response that says it was charged is the one that drew its release; every other one says
  "0" and carries the stored bytes of a release some response drew;
- a spelling that means something else (NOT majorityFromAge = Adult, which keeps the records
  whose age band is missing) is a release of its own.

The control removes the ledger's claim on a query being computed (only request ids are claimed)
and shows the same check finds concurrent draws of one query. No part of these tests depends on
chance beyond thread scheduling: with the claim the outcome holds for every schedule, and the
control holds all requests at a barrier after their reservation so that its draws overlap.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from engine.codebook import default_codebook
from engine.ledger import Ledger
from engine.loss import PrivacyLoss, parse_amount
from engine.planner import plan_query
from engine.query import And, Count, Eq, Filter, In, Not, Or, Query
from engine.release import Release
from engine.settings import Settings
from protos.veil.v1 import veil_pb2 as pb
from server.auth import Role, hash_token, new_token
from server.convert import query_to_pb
from tests.attacks.conftest import FAST_LIMITS
from tests.server_harness import LiveServer, bearer, start_live, stubs

CODEBOOK = default_codebook()
MINOR = [c for c, g in CODEBOOK.dimension("majorityFromAge").derived.mapping.items()  # type: ignore[union-attr]
         if g == "Minor"]
AFRICA = [c for c, g in CODEBOOK.dimension("citizenshipRegion").derived.mapping.items()  # type: ignore[union-attr]
          if g == "Africa"]

ROWS = (
    [{"citizenship": "NG", "ageBroad": "9--17", "gender": "Female"}] * 60
    + [{"citizenship": "KE", "ageBroad": "0--8", "gender": "Male"}] * 25
    + [{"citizenship": "NG", "gender": "Male"}] * 15  # no age band: outside "Minor"
    + [{"citizenship": "FR", "ageBroad": "9--17", "gender": "Female"}] * 40
)

# One query, by gender: minors from Africa. Every spelling reaches one fingerprint.
SPELLINGS: list[Filter] = [
    And(Eq("majorityFromAge", "Minor"), Eq("citizenshipRegion", "Africa")),
    And(In("ageBroad", list(reversed(MINOR)) + MINOR), In("citizenship", AFRICA)),
    And(In("citizenship", sorted(AFRICA, reverse=True)), Eq("majorityFromAge", "Minor")),
    Not(Or(Not(Eq("majorityFromAge", "Minor")), Not(Eq("citizenshipRegion", "Africa")))),
    Not(Not(And(In("majorityFromAge", ["Minor"]), In("citizenshipRegion", ["Africa"])))),
    And(Eq("citizenshipRegion", "Africa"), Or(Eq("ageBroad", MINOR[0]), Eq("ageBroad", MINOR[1]))),
]
# Not the same question: NOT Adult keeps the records with no age band.
OTHER = And(Not(Eq("majorityFromAge", "Adult")), Eq("citizenshipRegion", "Africa"))
LOSSES = ("0.1", "0.2", "0.3")
CALLERS = 12


def _query(where: Filter) -> pb.Query:
    return query_to_pb(Query(Count(), by=("gender",), where=where))


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    server = start_live(
        tmp_path, rows=ROWS, caps={"dataset": "100", "client": "5"}, limits=FAST_LIMITS
    )
    tokens = {}
    for i in range(CALLERS):
        token = new_token()
        server.ledger.register_client(
            f"c{i}", role=Role.RESEARCHER.value, cap="5", token_hash=hash_token(token)
        )
        tokens[f"c{i}"] = token
    try:
        yield server, tokens
    finally:
        server.stop()


def _fire(live: LiveServer, tokens: dict[str, str], seed: int) -> list[tuple[str, Any]]:
    """Every caller at once, each a spelling and a loss (shuffled): (loss asked, response)."""
    rng = random.Random(seed)
    plan = [(SPELLINGS[i % len(SPELLINGS)], LOSSES[i % len(LOSSES)]) for i in range(CALLERS)]
    rng.shuffle(plan)
    barrier = threading.Barrier(CALLERS)
    out: list[tuple[str, Any]] = [("", None)] * CALLERS

    def call(i: int) -> None:
        where, loss = plan[i]
        with stubs(live.port) as s:
            request = pb.ReleaseRequest(request_id=f"q-{i}", query=_query(where), loss=loss)
            barrier.wait()
            out[i] = (loss, s.research.Release(request, metadata=bearer(tokens[f"c{i}"])))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def findings(ledger: Ledger, responses: list[tuple[str, Any]]) -> list[str]:
    """What breaks one-noise-per-loss, from the responses and the ledger."""
    found = []
    drawn = {}
    for asked, response in responses:
        release = Release.from_bytes(response.arrow_ipc)
        meta = release.metadata
        if parse_amount(meta.loss) < parse_amount(asked):
            found.append(f"asked {asked}, got a release of {meta.loss}")
        if response.charged != "0":
            if meta.release_id in drawn:
                found.append(f"release {meta.release_id} charged twice")
            drawn[meta.release_id] = response.arrow_ipc
            if response.charged != meta.loss:
                found.append(f"charged {response.charged} for a release of {meta.loss}")
    stored = [r for r in ledger.releases() if r.fingerprint == _fingerprint()]
    if len(stored) != len(drawn):
        found.append(f"{len(stored)} releases stored, {len(drawn)} responses charged")
    losses = [r.loss for r in stored]
    if losses != sorted(set(losses)):
        found.append(f"releases drawn at losses {[str(x) for x in losses]}, not increasing")
    by_id = {r.release_id: r for r in stored}
    for _, response in responses:
        release_id = response.metadata.release_id
        if release_id not in by_id:
            found.append(f"a response carries {release_id}, which no charge drew")
        elif response.charged == "0" and release_id in drawn \
                and response.arrow_ipc != drawn[release_id]:
            found.append(f"a replay of {release_id} is not its stored bytes")
    committed = sum((c.amount for c in ledger.charges() if c.state == "committed"), Fraction(0))
    dataset = ledger.report().dataset.spent
    if not committed == dataset == sum(losses, Fraction(0)):
        found.append(f"charged {committed}, dataset spent {dataset}, drawn {sum(losses)}")
    return found


def _fingerprint() -> str:
    query = Query(Count(), by=("gender",), where=SPELLINGS[0])
    return plan_query(query, CODEBOOK, Settings(), PrivacyLoss.pure("0.1")).fingerprint


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concurrent_spellings_at_mixed_losses_get_one_noise_per_loss(
    live: tuple[LiveServer, dict[str, str]], seed: int
) -> None:
    server, tokens = live
    responses = _fire(server, tokens, seed)
    assert findings(server.ledger, responses) == []
    assert 1 <= len({r.metadata.release_id for _, r in responses}) <= len(LOSSES)
    # Whatever was drawn first, the request at the largest loss holds a release of that loss.
    assert max(parse_amount(r.metadata.loss) for _, r in responses) == Fraction(3, 10)
    # Another question is another release, charged.
    with stubs(server.port) as s:
        other = s.research.Release(
            pb.ReleaseRequest(request_id="other", query=_query(OTHER), loss="0.1"),
            metadata=server.auth("alice"),
        )
    assert other.charged == "0.1"
    assert other.metadata.fingerprint != responses[0][1].metadata.fingerprint


@pytest.fixture
def no_query_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger claims request ids only, and every reservation waits at a barrier before its
    statement runs, so that reservations of one query overlap."""
    original = Ledger._claim
    barrier = threading.Barrier(CALLERS, timeout=10)

    def claim(self: Ledger, keys: tuple[tuple[str, ...], ...]) -> None:
        original(self, tuple(k for k in keys if k[0] != "query"))

    def hook(self: Ledger, point: str) -> None:
        if point == "after_reserve":
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()

    monkeypatch.setattr(Ledger, "_claim", claim)
    monkeypatch.setattr(Ledger, "_hook", hook)


@pytest.mark.usefixtures("no_query_claim")
def test_the_check_finds_concurrent_draws_of_one_query(
    live: tuple[LiveServer, dict[str, str]],
) -> None:
    server, tokens = live
    responses = _fire(server, tokens, seed=0)
    found = findings(server.ledger, responses)
    assert any("not increasing" in f for f in found), found
