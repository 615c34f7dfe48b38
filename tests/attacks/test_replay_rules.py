"""Stored releases are replayed only under the rule and on the data they were made under.

A stored release comes back free to anyone who asks for its query at no more than its loss, on
the data version it was drawn from, under the suppression rule (k and beta) it was made under.
The custodian changes the rule between starts of the server (raising k, or beta), and loads new
versions of the same people; an attacker keeps its request ids and asks the same query again
under each, hoping to be handed a release made under another rule or data (a table suppressed
by another threshold, sold as this one's), or a fresh draw free.

One ledger and one dataset, served by real servers on port 0, one after the other:

1. k = 10, beta = 0.05: alice releases a table at 0.2;
2. k = 12: the dry run prices a fresh draw; alice's request id is refused, not answered with
   the k = 10 release; a new request id is drawn afresh and charged, with its own tau;
3. beta = 0.1: the same again, with a third tau;
4. k = 10, beta = 0.05 again: the first release is back, byte for byte, free to anyone asking
   at most its loss (bob, at 0.1), and alice's first request id returns it; at 0.3 it is drawn
   afresh and charged;
5. a new data version of the same dataset, first rule: nothing is replayed, alice's request id
   is refused, a release is charged to the dataset's one cap.

At each step the dataset's spending is exactly the sum of the fresh draws. The control drops
the suppression rule from the fingerprint and checks the same script notices the k = 10 release
served under k = 12. Deterministic: nothing compared depends on the noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine import engine as engine_module
from engine.codebook import Codebook
from engine.loss import PrivacyLoss
from engine.planner import Plan, plan_query
from engine.query import Count, Eq, Query
from engine.release import Release
from engine.settings import Settings
from protos.veil.v1 import veil_pb2 as pb
from server.accounts import LedgerAccounts
from server.app import build_engine, start
from server.convert import query_to_pb
from tests.conftest import write_database
from tests.server_harness import ROWS, LiveServer, live_config, start_live, stubs

CAPS = {"dataset": "10", "client": "3"}
QUERY = query_to_pb(Query(Count(), by=("gender", "ageBroad"), where=Eq("citizenship", "PH")))


def _serve(root: Path, data: Path, tokens: dict[str, str], **privacy: Any) -> LiveServer:
    config = live_config(root, data, caps=CAPS, privacy=privacy)
    engine = build_engine(config)
    accounts = LedgerAccounts.for_config(config, engine, create=False)
    return LiveServer(start(config, engine=engine, accounts=accounts), config, tokens, root)


class Script:
    """The calls of one step, recorded: what each returned, or the refusal's code."""

    def __init__(self, live: LiveServer) -> None:
        self.live = live
        self.seen: dict[str, Any] = {}

    def dry(self, label: str, loss: str) -> pb.DryRunResponse:
        with stubs(self.live.port) as s:
            response = s.research.DryRun(
                pb.DryRunRequest(query=QUERY, loss=loss), metadata=self.live.auth("bob")
            )
        self.seen[label] = response
        return response

    def release(self, label: str, who: str, request_id: str, loss: str) -> Any:
        with stubs(self.live.port) as s:
            try:
                response: Any = s.research.Release(
                    pb.ReleaseRequest(request_id=request_id, query=QUERY, loss=loss),
                    metadata=self.live.auth(who),
                )
            except grpc.RpcError as exc:
                response = exc.code()
        self.seen[label] = response
        return response

    def dataset_spent(self) -> Fraction:
        return self.live.ledger.report().dataset.spent


def run(tmp_path: Path) -> list[str]:
    """The script of the module docstring; what breaks the replay rules, as sentences."""
    found: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            found.append(what)

    data = write_database(tmp_path / "v1.duckdb", ROWS, data_version="v1")
    first = start_live(tmp_path, data=data, caps=CAPS)
    tokens = first.tokens
    try:
        step = Script(first)
        made = step.release("made", "alice", "a-1", "0.2")
        assert isinstance(made, pb.ReleaseResponse) and made.charged == "0.2"
        original = made.arrow_ipc
        tau = made.metadata.tau
        drawn = Fraction(2, 10)
    finally:
        first.stop()

    for label, privacy in (("k=12", {"k": 12}), ("beta=0.1", {"beta": 0.1})):
        live = _serve(tmp_path, data, tokens, **privacy)
        try:
            step = Script(live)
            dry = step.dry("dry", "0.2")
            expect(not dry.already_released, f"{label}: the dry run offers the earlier rule's "
                                              "release")
            retry = step.release("retry", "alice", "a-1", "0.2")
            expect(retry == grpc.StatusCode.FAILED_PRECONDITION,
                   f"{label}: alice's request id is answered ({_what(retry, original)})")
            fresh = step.release("fresh", "alice", f"a-{label.replace('=', '-')}", "0.1")
            if isinstance(fresh, pb.ReleaseResponse):
                expect(fresh.charged == "0.1" and fresh.arrow_ipc != original,
                       f"{label}: a new request is not drawn afresh "
                       f"({_what(fresh, original)})")
                expect(fresh.metadata.tau != tau, f"{label}: the release has the old tau")
                drawn += Fraction(1, 10) if fresh.charged == "0.1" else 0
            else:
                found.append(f"{label}: a new request is refused ({fresh})")
            expect(step.dataset_spent() == drawn, f"{label}: the dataset spent "
                                                  f"{step.dataset_spent()}, drawn {drawn}")
        finally:
            live.stop()

    live = _serve(tmp_path, data, tokens)
    try:
        step = Script(live)
        expect(step.dry("dry", "0.2").already_released, "the first rule's release is not found")
        replay = step.release("replay", "bob", "b-1", "0.1")
        expect(isinstance(replay, pb.ReleaseResponse) and replay.charged == "0"
               and replay.arrow_ipc == original, "the first release is not replayed free")
        retry = step.release("retry", "alice", "a-1", "0.2")
        expect(isinstance(retry, pb.ReleaseResponse) and retry.arrow_ipc == original,
               "alice's first request id does not return her release")
        larger = step.release("larger", "bob", "b-2", "0.3")
        expect(isinstance(larger, pb.ReleaseResponse) and larger.charged == "0.3"
               and larger.arrow_ipc != original, "a larger loss is not drawn afresh")
        drawn += Fraction(3, 10)
        expect(step.dataset_spent() == drawn, "the first rule again: spending differs")
    finally:
        live.stop()

    newer = write_database(tmp_path / "v2.duckdb", ROWS, data_version="v2")
    live = _serve(tmp_path, newer, tokens)
    try:
        step = Script(live)
        expect(not step.dry("dry", "0.1").already_released,
               "a release of another data version is offered")
        retry = step.release("retry", "alice", "a-1", "0.2")
        expect(retry == grpc.StatusCode.FAILED_PRECONDITION,
               f"a request id of another data version is answered ({_what(retry, original)})")
        fresh = step.release("fresh", "bob", "b-v2", "0.1")
        expect(isinstance(fresh, pb.ReleaseResponse) and fresh.charged == "0.1"
               and Release.from_bytes(fresh.arrow_ipc).metadata.data_version == "v2",
               "a new data version is not drawn afresh")
        drawn += Fraction(1, 10)
        expect(step.dataset_spent() == drawn, "a new data version: spending differs")
    finally:
        live.stop()
    return found


def _what(response: Any, original: bytes) -> str:
    if not isinstance(response, pb.ReleaseResponse):
        return str(response)
    same = "the earlier release" if response.arrow_ipc == original else "another release"
    return f"{same}, charged {response.charged}"


def test_releases_are_replayed_only_under_their_rule_and_data(tmp_path: Path) -> None:
    assert run(tmp_path) == []


@pytest.fixture
def rule_not_in_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    def plan(query: Query, codebook: Codebook, settings: Settings, loss: PrivacyLoss) -> Plan:
        made = plan_query(query, codebook, settings, loss)
        canonical = json.loads(made.canonical)
        del canonical["suppression"]
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return dataclasses.replace(
            made, canonical=text, fingerprint=hashlib.sha256(text.encode()).hexdigest()
        )

    planner: Callable[..., Plan] = plan
    monkeypatch.setattr(engine_module, "plan_query", planner)


@pytest.mark.usefixtures("rule_not_in_fingerprint")
def test_the_script_finds_a_release_replayed_under_another_rule(tmp_path: Path) -> None:
    found = run(tmp_path)
    assert any("k=12: the dry run offers" in f for f in found), found
    assert any("k=12: alice's request id is answered (the earlier release" in f
               for f in found), found
