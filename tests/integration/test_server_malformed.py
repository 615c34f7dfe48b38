"""Every byte the server receives is untrusted: malformed, hostile and out-of-domain requests.

Each gets a clear error (never INTERNAL or UNKNOWN), nothing is charged, no file is created,
and the server keeps serving.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.veil.v1 import veil_pb2 as pb
from tests.server_harness import (
    LiveServer,
    Stubs,
    charges_settled,
    count_query,
    files_under,
    start_live,
    stubs,
)

HOSTILE = (
    "' OR 1=1--",
    "read_csv('/etc/passwd')",
    "ATTACH 'pwned.duckdb' AS pwned",
    "'; DROP TABLE records; --",
    "COPY records TO 'leak.csv'",
    "gender\x00",
    "x" * 5000,
    "²",
)

# method -> (caller, base request); every string field of a base request is replaced in turn.
Q_PROPORTION = pb.Query(
    measure=pb.Measure(
        proportion=pb.ProportionMeasure(
            condition=pb.Filter(
                any_of=pb.AnyOf(
                    operands=[
                        pb.Filter(
                            equals=pb.Equals(variable="gender", value=pb.Value(text="Female"))
                        ),
                        pb.Filter(is_missing=pb.IsMissing(variable="ageBroad")),
                    ]
                )
            )
        )
    ),
    by=["gender", "ageBroad"],
    where=pb.Filter(
        all_of=pb.AllOf(
            operands=[
                pb.Filter(
                    in_set=pb.InSet(
                        variable="citizenship", values=[pb.Value(text="PH"), pb.Value(text="US")]
                    )
                ),
                pb.Filter(between=pb.Between(variable="yearOfRegistration", low=2010, high=2020)),
                pb.Filter(
                    negation=pb.Negation(
                        operand=pb.Filter(
                            equals=pb.Equals(variable="Datasource", value=pb.Value(text="Hotline"))
                        )
                    )
                ),
            ]
        )
    ),
)
Q_FLAGS = pb.Query(measure=pb.Measure(flag_counts=pb.FlagCountsMeasure(flag_set="sexType")))
Q_SUM = pb.Query(measure=pb.Measure(sum=pb.SumMeasure(variable="yearOfRegistration")))
Q_MEAN = pb.Query(measure=pb.Measure(mean=pb.MeanMeasure(variable="yearOfRegistration")))

BASES: list[tuple[str, str, Message]] = [
    ("/veil.v1.Research/DescribeVariable", "alice", pb.DescribeVariableRequest(name="gender")),
    *[
        ("/veil.v1.Research/DryRun", "alice", pb.DryRunRequest(query=q, loss="0.5"))
        for q in (Q_PROPORTION, Q_FLAGS, Q_SUM, Q_MEAN)
    ],
    *[
        (
            "/veil.v1.Research/Release",
            "alice",
            pb.ReleaseRequest(request_id=f"hostile-{i}", query=q, loss="0.5"),
        )
        for i, q in enumerate((Q_PROPORTION, Q_FLAGS, Q_SUM, Q_MEAN))
    ],
    (
        "/veil.v1.Admin/RegisterClient",
        "root",
        pb.RegisterClientRequest(
            client_id="zed", role=pb.ROLE_RESEARCHER, institution="iom", budget="0.5"
        ),
    ),
    ("/veil.v1.Admin/SetBudget", "root", pb.SetBudgetRequest(client_id="bob", budget="1")),
    ("/veil.v1.Admin/RevokeClient", "root", pb.RevokeClientRequest(client_id="bob")),
    ("/veil.v1.Admin/RotateToken", "root", pb.RotateTokenRequest(client_id="bob")),
    ("/veil.v1.Audit/ListReleases", "audra", pb.ListReleasesRequest(client_id="alice")),
]

REQUEST_TYPES = {
    f"/{s.full_name}/{m.name}": m.input_type.full_name
    for s in pb.DESCRIPTOR.services_by_name.values()
    for m in s.methods
}
FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_live(
        tmp_path_factory.mktemp("malformed"),
        limits={"rate_per_second": 1e6, "rate_burst": 1_000_000},
    )
    yield server
    server.stop()


@pytest.fixture
def watched(live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stubs]:
    """Stubs, with a check afterwards that nothing was charged or created and the server serves."""
    monkeypatch.chdir(tmp_path)
    roots = (live.root, tmp_path)
    before = {root: files_under(root) for root in roots}
    charges = len(live.ledger.charges())
    with stubs(live.port) as s:
        yield s
        for root in roots:
            assert files_under(root) == before[root], f"files appeared under {root}"
        assert len(live.ledger.charges()) == charges, "a charge was made"
        assert charges_settled(live.ledger)
        assert s.research.GetCodebook(pb.GetCodebookRequest(), metadata=live.auth("alice"))


def raw_call(s: Stubs, method: str, data: bytes, metadata: Any) -> grpc.RpcError | None:
    """Send raw bytes; the error, or None when the call succeeded."""
    call = s.channel.unary_unary(method)
    try:
        call(data, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        return error
    return None


def assert_clear(error: grpc.RpcError | None, *codes: grpc.StatusCode) -> None:
    assert error is not None, "the call succeeded"
    assert error.code() not in FAULTS, error.details()
    if codes:
        assert error.code() in codes, (error.code(), error.details())
    details = error.details() or ""
    assert details and not details.startswith("internal error"), details


# ---- bytes that are not the message ------------------------------------------------------------


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=1, max_size=512), which=st.integers(0, len(BASES) - 1))
def test_random_bytes(live: LiveServer, data: bytes, which: int) -> None:
    method, caller, _ = BASES[which]
    before = len(live.ledger.charges())
    with stubs(live.port) as s:
        error = raw_call(s, method, data, live.auth(caller))
    if error is not None:
        assert error.code() not in FAULTS, error.details()
    if method.endswith("/Release"):
        assert error is not None
        assert len(live.ledger.charges()) == before


def test_garbage_is_invalid_argument(live: LiveServer, watched: Stubs) -> None:
    for data in (b"\xff" * 40, b"\x0a\xff\xff\xff\xff\x0f", os.urandom(64) + b"\x0b"):
        error = raw_call(watched, "/veil.v1.Research/Release", data, live.auth("alice"))
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)


def test_truncated_requests(live: LiveServer, watched: Stubs) -> None:
    data = pb.ReleaseRequest(request_id="cut", query=Q_PROPORTION, loss="0.5").SerializeToString()
    for length in range(len(data)):
        error = raw_call(watched, "/veil.v1.Research/Release", data[:length], live.auth("alice"))
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)


def test_wrong_message_types(live: LiveServer, watched: Stubs) -> None:
    register = pb.RegisterClientRequest(
        client_id="zed", role=pb.ROLE_ADMIN, institution="iom", budget="1"
    ).SerializeToString()
    error = raw_call(watched, "/veil.v1.Research/Release", register, live.auth("alice"))
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)
    # Every base request sent to every other reading method: never a fault, never a charge.
    # (Administration is left out: a SetBudgetRequest is also, byte for byte, a valid
    # RevokeClientRequest, and carrying it out would be correct.)
    for method, caller, _ in BASES:
        if method.startswith("/veil.v1.Admin/"):
            continue
        for _, _, other in BASES:
            if type(other).DESCRIPTOR.full_name == REQUEST_TYPES[method]:
                continue
            error = raw_call(watched, method, other.SerializeToString(), live.auth(caller))
            if error is not None:
                assert error.code() not in FAULTS, error.details()


def test_unknown_fields_are_refused(live: LiveServer, watched: Stubs) -> None:
    valid = pb.ReleaseRequest(request_id="u-1", query=count_query("gender"), loss="0.5")
    top = valid.SerializeToString() + b"\xf8\x06\x01"  # field 111, varint 1
    error = raw_call(watched, "/veil.v1.Research/Release", top, live.auth("alice"))
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)
    assert "does not define" in (error.details() or "")  # type: ignore[union-attr]
    # An unknown kind of filter, nested inside the query's where: a newer client's filter the
    # server would otherwise read as "no filter", releasing a broader table than was asked for.
    query = (
        count_query("gender").SerializeToString() + b"\x1a\x03\xc2\x3e\x00"
    )  # where { 1000: {} }
    nested = b"\x0a\x03u-2" + b"\x12" + bytes([len(query)]) + query + b"\x1a\x030.5"
    error = raw_call(watched, "/veil.v1.Research/Release", nested, live.auth("alice"))
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)


# ---- hostile strings in every string field -----------------------------------------------------


def string_paths(message: Message, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    for field, value in message.ListFields():
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_STRING:
            if repeated:
                for i in range(len(value)):
                    yield (*prefix, (field.name, i))
            else:
                yield (*prefix, (field.name, None))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            children = enumerate(value) if repeated else [(None, value)]
            for i, child in children:
                yield from string_paths(child, (*prefix, (field.name, i)))


def with_string(message: Message, path: tuple[Any, ...], text: str) -> Message:
    copy = type(message)()
    copy.CopyFrom(message)
    target: Any = copy
    for name, index in path[:-1]:
        target = getattr(target, name) if index is None else getattr(target, name)[index]
    name, index = path[-1]
    if index is None:
        setattr(target, name, text)
    else:
        getattr(target, name)[index] = text
    return copy


def test_every_string_field_refuses_hostile_text(live: LiveServer, watched: Stubs) -> None:
    tried = 0
    for method, caller, base in BASES:
        for path in string_paths(base):
            for text in HOSTILE:
                request = with_string(base, path, text)
                error = raw_call(watched, method, request.SerializeToString(), live.auth(caller))
                assert_clear(error)
                assert error is not None
                if method.endswith(("/Release", "/DryRun", "/DescribeVariable")):
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, text)
                tried += 1
    assert tried > 150
    # The hostile text in the authorization header, too.
    for text in HOSTILE[:5]:
        error = raw_call(
            watched, "/veil.v1.Research/GetCodebook", b"", (("authorization", f"Bearer {text}"),)
        )
        assert_clear(error, grpc.StatusCode.UNAUTHENTICATED)


def test_free_text_is_stored_as_text(live: LiveServer, watched: Stubs) -> None:
    """The one free-text field (a revocation reason) accepts any printable text, verbatim."""
    made = watched.admin.RegisterClient(
        pb.RegisterClientRequest(client_id="mallory", role=pb.ROLE_RESEARCHER, budget="0"),
        metadata=live.auth("root"),
    )
    reason = "'; DROP TABLE clients; -- read_csv('/etc/passwd')"
    revoked = watched.admin.RevokeClient(
        pb.RevokeClientRequest(client_id="mallory", reason=reason), metadata=live.auth("root")
    )
    assert revoked.client.revoked and made.token
    entry = next(e for e in reversed(live.ledger.audit_log()) if e.entry["event"] == "revoke")
    assert reason in entry.entry["detail"]["reason"]
    assert len(live.ledger.list_clients()) >= 5


# ---- sizes, values and amounts -----------------------------------------------------------------


def test_huge_repeated_fields(live: LiveServer, watched: Stubs) -> None:
    alice = live.auth("alice")
    big_by = pb.ReleaseRequest(
        request_id="h-1", loss="0.5", query=count_query(*(["gender"] * 50_000))
    )
    many_values = count_query(
        "gender",
        where=pb.Filter(
            in_set=pb.InSet(variable="citizenship", values=[pb.Value(text="PH")] * 60_000)
        ),
    )
    many_filters = count_query(where=pb.Filter(all_of=pb.AllOf(operands=[pb.Filter()] * 100_000)))
    for request in (
        big_by,
        pb.ReleaseRequest(request_id="h-2", loss="0.5", query=many_values),
        pb.ReleaseRequest(request_id="h-3", loss="0.5", query=many_filters),
    ):
        assert request.ByteSize() < live.config.limits.max_request_bytes
        error = raw_call(watched, "/veil.v1.Research/Release", request.SerializeToString(), alice)
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)


def test_deep_nesting(live: LiveServer, watched: Stubs) -> None:
    def length_delimited(field: int, payload: bytes) -> bytes:
        size, out = len(payload), bytearray()
        while True:
            byte = size & 0x7F
            size >>= 7
            out.append(byte | (0x80 if size else 0))
            if not size:
                break
        return bytes([field << 3 | 2]) + bytes(out) + payload

    leaf = length_delimited(4, length_delimited(1, b"gender"))  # is_missing { variable }
    for depth in (9, 60, 3000):
        node = leaf
        for _ in range(depth):
            node = length_delimited(5, length_delimited(1, node))  # negation { operand }
        query = count_query("gender").SerializeToString() + length_delimited(3, node)
        data = b"\x0a\x03d-1" + length_delimited(2, query) + b"\x1a\x030.5"
        error = raw_call(watched, "/veil.v1.Research/Release", data, live.auth("alice"))
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)


OUTSIDE = [
    (
        count_query(
            "gender",
            where=pb.Filter(equals=pb.Equals(variable="gender", value=pb.Value(text="Alien"))),
        ),
        "gender",
    ),
    (
        count_query(
            "gender",
            where=pb.Filter(
                equals=pb.Equals(variable="yearOfRegistration", value=pb.Value(integer=1999))
            ),
        ),
        "yearOfRegistration",
    ),
    (
        count_query(
            "gender",
            where=pb.Filter(
                equals=pb.Equals(variable="yearOfRegistration", value=pb.Value(integer=2**62))
            ),
        ),
        "yearOfRegistration",
    ),
    (
        count_query(
            "gender",
            where=pb.Filter(equals=pb.Equals(variable="citizenship", value=pb.Value(text="XX"))),
        ),
        "citizenship",
    ),
    (
        count_query(
            "gender",
            where=pb.Filter(equals=pb.Equals(variable="gender", value=pb.Value(integer=1))),
        ),
        "gender",
    ),
    (count_query("gender", where=pb.Filter(equals=pb.Equals(variable="gender"))), "gender"),
    (
        count_query("gender", where=pb.Filter(between=pb.Between(variable="gender", low=1))),
        "gender",
    ),
    (
        count_query("gender", where=pb.Filter(between=pb.Between(variable="yearOfRegistration"))),
        "yearOfRegistration",
    ),
    (count_query("gender", where=pb.Filter(in_set=pb.InSet(variable="gender"))), "gender"),
    (count_query("gender", where=pb.Filter()), "filter"),
    (count_query("nonexistent"), "nonexistent"),
    (count_query("meansOfControlConcatenated"), "meansOfControlConcatenated"),
    (count_query("gender", "gender"), "twice"),
    (
        count_query("gender", "ageBroad", "citizenship", "yearOfRegistration", "Datasource"),
        "dimensions",
    ),
    (pb.Query(by=["gender"]), "measure"),
    (pb.Query(measure=pb.Measure(flag_counts=pb.FlagCountsMeasure(flag_set="nope"))), "nope"),
    (pb.Query(measure=pb.Measure(sum=pb.SumMeasure(variable="gender"))), "gender"),
    (pb.Query(measure=pb.Measure(mean=pb.MeanMeasure(variable=""))), "required"),
    (pb.Query(measure=pb.Measure(proportion=pb.ProportionMeasure())), "condition"),
]


@pytest.mark.parametrize(("query", "named"), OUTSIDE)
def test_values_outside_the_codebook(
    live: LiveServer, watched: Stubs, query: pb.Query, named: str
) -> None:
    for method, request in (
        ("/veil.v1.Research/Release", pb.ReleaseRequest(request_id="o-1", query=query, loss="0.5")),
        ("/veil.v1.Research/DryRun", pb.DryRunRequest(query=query, loss="0.5")),
    ):
        error = raw_call(watched, method, request.SerializeToString(), live.auth("alice"))
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)
        assert named in (error.details() or ""), error.details()  # type: ignore[union-attr]


BAD_AMOUNTS = (
    "NaN",
    "nan",
    "-1",
    "-0.5",
    "0",
    "0.0",
    "inf",
    "Infinity",
    "1e308",
    "1e-99999999",
    "1/2",
    " 0.5",
    "0.5 ",
    "",
    "0x10",
    "1000",
    "0.0000000001",
    "\u0661",  # ARABIC-INDIC DIGIT ONE
)


def test_nan_negative_and_absurd_losses(live: LiveServer, watched: Stubs) -> None:
    alice = live.auth("alice")
    for text in BAD_AMOUNTS:
        release = pb.ReleaseRequest(request_id="a-1", query=count_query("gender"), loss=text)
        error = raw_call(watched, "/veil.v1.Research/Release", release.SerializeToString(), alice)
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)
        dry = pb.DryRunRequest(query=count_query("gender"), loss=text)
        error = raw_call(watched, "/veil.v1.Research/DryRun", dry.SerializeToString(), alice)
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)
    for width in (0, -5, 10**12):
        dry = pb.DryRunRequest(query=count_query("gender"), half_width=width)
        error = raw_call(watched, "/veil.v1.Research/DryRun", dry.SerializeToString(), alice)
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)
    dry = pb.DryRunRequest(query=count_query("gender"), loss="0.5", assumed_count=-1)
    error = raw_call(watched, "/veil.v1.Research/DryRun", dry.SerializeToString(), alice)
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)
    dry = pb.DryRunRequest(query=count_query("gender"))
    error = raw_call(watched, "/veil.v1.Research/DryRun", dry.SerializeToString(), alice)
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)


def test_nan_and_negative_budgets(live: LiveServer, watched: Stubs) -> None:
    root = live.auth("root")
    for text in BAD_AMOUNTS:
        if text in ("0", "0.0", "", "1000"):
            continue  # zero is a valid cap; empty means the default; 1000 is above the maximum
        register = pb.RegisterClientRequest(client_id="nan", role=pb.ROLE_RESEARCHER, budget=text)
        error = raw_call(
            watched, "/veil.v1.Admin/RegisterClient", register.SerializeToString(), root
        )
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)
        change = pb.SetBudgetRequest(client_id="bob", budget=text)
        error = raw_call(watched, "/veil.v1.Admin/SetBudget", change.SerializeToString(), root)
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT)
    assert "nan" not in {c.client_id for c in live.ledger.list_clients()}
    assert live.ledger.client("bob").cap == 1
