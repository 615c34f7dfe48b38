"""Regenerate the committed Python code for veil's wire contract.

    python protos/generate.py            # rewrite protos/veil/v1/*_pb2*.py{,i} in place
    python protos/generate.py --check    # exit 1 if the committed files differ from fresh output

Uses grpcio-tools (protoc, the Python and gRPC plugins) and mypy-protobuf (the .pyi stubs).
Generated modules import as `protos.veil.v1.veil_pb2`, because the .proto files are compiled
with the repository root as the include path.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ("protos/veil/v1/status.proto", "protos/veil/v1/veil.proto")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generator_versions() -> dict[str, str]:
    """The versions of the tools whose output is committed (their output differs by version)."""
    return {
        name: importlib.metadata.version(name) for name in ("grpcio-tools", "mypy-protobuf")
    }


def generated_files(root: Path = ROOT) -> list[Path]:
    """Paths, relative to `root`, of every file the generator writes."""
    return [
        Path(proto).with_name(Path(proto).stem + suffix)
        for proto in PROTO_FILES
        for suffix in GENERATED_SUFFIXES
    ]


def _plugin(directory: Path, name: str, entry: str) -> Path:
    """A protoc plugin executable that runs mypy-protobuf with this interpreter."""
    path = directory / name
    module, function = entry.split(":")
    path.write_text(
        f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def generate(out: Path) -> list[Path]:
    """Compile every .proto into `out` (mirroring the protos/ tree); returns the written paths."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as plugins:
        mypy = _plugin(Path(plugins), "protoc-gen-mypy", "mypy_protobuf.main:main")
        mypy_grpc = _plugin(Path(plugins), "protoc-gen-mypy_grpc", "mypy_protobuf.main:grpc")
        arguments = [
            "grpc_tools.protoc",
            f"--proto_path={ROOT}",
            f"--proto_path={include}",
            f"--plugin=protoc-gen-mypy={mypy}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *(str(ROOT / proto) for proto in PROTO_FILES),
        ]
        cwd = os.getcwd()
        try:
            os.chdir(ROOT)
            code = protoc.main(arguments)
        finally:
            os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return [out / path for path in generated_files()]


def differences(root: Path = ROOT) -> list[str]:
    """Generated files whose committed bytes differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        return [
            str(path)
            for path in generated_files()
            if not (root / path).is_file()
            or (root / path).read_bytes() != (Path(scratch) / path).read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        stale = differences()
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        for path in generated_files():
            shutil.copyfile(Path(scratch) / path, ROOT / path)
            print(f"wrote {path}")
    versions = ", ".join(f"{name} {version}" for name, version in generator_versions().items())
    print(f"generated with {versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
