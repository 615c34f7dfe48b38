"""The committed generated code is what the .proto files generate."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
GENERATED_WITH = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "veil_protos_generate", ROOT / "protos" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_files_match_the_protos_byte_for_byte() -> None:
    generate = _generator()
    versions = generate.generator_versions()
    if versions != GENERATED_WITH:
        pytest.skip(
            f"committed code was generated with {GENERATED_WITH}, installed are {versions}; "
            "the descriptor test below still checks the contract"
        )
    with tempfile.TemporaryDirectory() as scratch:
        written = generate.generate(Path(scratch))
        assert written
        for path in generate.generated_files():
            fresh = (Path(scratch) / path).read_bytes()
            committed = (ROOT / path).read_bytes()
            assert fresh == committed, f"{path} is stale: run python protos/generate.py"


def test_committed_descriptors_match_the_protos() -> None:
    """Independent of generator versions: the descriptors compiled into the committed modules
    are the ones the .proto files describe."""
    from grpc_tools import protoc

    from protos.veil.v1 import status_pb2, veil_pb2

    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.pb"
        code = protoc.main(
            [
                "protoc",
                f"--proto_path={ROOT}",
                f"--proto_path={include}",
                f"--descriptor_set_out={out}",
                str(ROOT / "protos/veil/v1/status.proto"),
                str(ROOT / "protos/veil/v1/veil.proto"),
            ]
        )
        assert code == 0
        compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    by_name = {f.name: _without_json_names(f) for f in compiled.file}
    for module in (status_pb2, veil_pb2):
        committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert _without_json_names(committed) == by_name[module.DESCRIPTOR.name], module.__name__


def _without_json_names(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """protoc's Python plugin embeds descriptors without json_name; compare without it."""
    out = descriptor_pb2.FileDescriptorProto()
    out.CopyFrom(file)
    stack = list(out.message_type)
    while stack:
        message = stack.pop()
        for field in message.field:
            field.ClearField("json_name")
        stack.extend(message.nested_type)
    return out


def test_the_package_is_versioned() -> None:
    from protos.veil.v1 import veil_pb2

    assert veil_pb2.DESCRIPTOR.package == "veil.v1"
    assert set(veil_pb2.DESCRIPTOR.services_by_name) == {"Research", "Admin", "Audit"}
