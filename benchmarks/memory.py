"""Peak memory of veil's server holding a data file, beside DuckDB's own footprint.

Every figure comes from a process of its own, read from /proc/<pid>/status (VmHWM is the peak
resident set, VmRSS the current one):

- server: `veil serve` on the file, after answering the workload twice over gRPC (fresh
  releases), so DuckDB has read every column the workload needs.
- duckdb_file: a Python process that opens the same file with DuckDB, as veil's backend does,
  and runs the same six aggregations twice: DuckDB's footprint serving the same questions.
- duckdb_table: a Python process that copies the whole table into an in-memory DuckDB database:
  DuckDB's footprint for holding the table itself (`duckdb_memory()` and the process peak).
- python_baseline: a Python process that has imported what the server imports and holds no data.
- duckdb_baseline: a Python process that has imported DuckDB and holds no data.

The DuckDB children import nothing but DuckDB (this module keeps its own imports light for
them): `python -m benchmarks.memory MODE` with {"path": ..., "sql": [...]} on standard input.
`measure` runs them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.data import Dataset

REPO = Path(__file__).resolve().parent.parent


def process_memory(pid: int) -> dict[str, int]:
    """Resident memory of a process now (VmRSS), at its peak (VmHWM) and its proportional share
    of pages shared with other processes counted once (Pss), in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                key, _, rest = line.partition(":")
                if key == "Pss":
                    values["Pss"] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def children(pid: int) -> list[int]:
    """The processes `pid` started (a server starts none today; counted should one appear)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("PPid:"):
                        if int(line.split()[1]) == pid:
                            found.append(int(entry.name))
                        break
        except OSError:
            continue
    return found


def tree_memory(pid: int) -> dict[str, int]:
    """A process's memory, and its children's added up (their peaks, their current sizes)."""
    values = process_memory(pid)
    kids = [process_memory(child) for child in children(pid)]
    values["children"] = len(kids)
    for key in ("VmHWM", "VmRSS", "Pss"):
        values[f"children_{key}"] = sum(k.get(key, 0) for k in kids)
    values["total_VmHWM"] = values["VmHWM"] + values["children_VmHWM"]
    values["total_Pss"] = values.get("Pss", 0) + values["children_Pss"]
    return values


def _child(mode: str, request: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", mode],
        cwd=REPO,
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(data: Dataset, work: str) -> dict[str, Any]:
    from benchmarks.serverproc import ServerProcess
    from benchmarks.workload import raw_sql, workload
    from engine.codebook import default_codebook
    from protos.veil.v1 import veil_pb2 as pb
    from protos.veil.v1 import veil_pb2_grpc as pb_grpc
    from server.convert import query_to_pb

    result: dict[str, Any] = {"rows": data.rows, "file_bytes": data.file_bytes}
    server = ServerProcess(data=data.path, work=Path(work) / "memory", name="memory")
    try:
        result["server_idle"] = server.memory()
        (token,) = server.register_researchers(1)
        codebook = default_codebook()
        queries = workload(codebook)
        with server.channel() as channel:
            stub = pb_grpc.ResearchStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            for loss in ("1", "1.0001"):
                for query in queries:
                    stub.Release(
                        pb.ReleaseRequest(
                            request_id=uuid.uuid4().hex,
                            query=query_to_pb(query.veil_query()),
                            loss=loss,
                        ),
                        metadata=metadata,
                    )
        result["server"] = server.memory()
    finally:
        server.stop()
    request = {"path": str(data.path), "sql": [raw_sql(q, codebook) for q in queries]}
    for mode in ("duckdb_file", "duckdb_table", "python_baseline", "duckdb_baseline"):
        result[mode] = _child(mode, request)
    return result


# ---- the children ----------------------------------------------------------------------------


def _duckdb_file(request: dict[str, Any]) -> dict[str, Any]:
    import duckdb

    connection = duckdb.connect(request["path"], read_only=True)
    for _ in range(2):
        for text in request["sql"]:
            connection.execute(text).fetchnumpy()
    used = connection.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()
    return {**process_memory(os.getpid()), "duckdb_memory": int(used[0]) if used else 0}


def _duckdb_table(request: dict[str, Any]) -> dict[str, Any]:
    import duckdb

    connection = duckdb.connect()
    connection.execute("ATTACH ? AS source (READ_ONLY)", [request["path"]])
    connection.execute("CREATE TABLE records AS SELECT * FROM source.records")
    connection.execute("DETACH source")
    used = connection.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()
    size = connection.execute("SELECT memory_usage FROM pragma_database_size()").fetchone()
    return {
        **process_memory(os.getpid()),
        "duckdb_memory": int(used[0]) if used else 0,
        "database_size": str(size[0]) if size else "",
    }


def _python_baseline(request: dict[str, Any]) -> dict[str, Any]:
    import duckdb  # noqa: F401
    import grpc  # noqa: F401
    import pyarrow  # noqa: F401

    import server.cli  # noqa: F401  (what `veil serve` imports before it opens anything)

    return process_memory(os.getpid())


def _duckdb_baseline(request: dict[str, Any]) -> dict[str, Any]:
    import duckdb  # noqa: F401

    return process_memory(os.getpid())


def main(argv: list[str]) -> int:
    (mode,) = argv
    request = json.load(sys.stdin)
    modes = {
        "duckdb_file": _duckdb_file,
        "duckdb_table": _duckdb_table,
        "python_baseline": _python_baseline,
        "duckdb_baseline": _duckdb_baseline,
    }
    print(json.dumps(modes[mode](request)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
