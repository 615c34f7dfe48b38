"""SmartNoise SQL 1.0.10 over DuckDB, driven in its own virtual environment.

The parent (this module) writes SmartNoise's SQL and metadata from the workload and the
codebook and sends them to `smartnoise_worker.py`, which runs under
`benchmarks/.venv-smartnoise/bin/python` and times each query itself. SmartNoise takes its keys
from the data and suppresses a group whose noisy count falls under a threshold set by delta, so
it releases fewer cells than veil and OpenDP (it never answers an empty cell of the domain).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.data import Dataset
from benchmarks.systems import Options, System, Unavailable
from benchmarks.workload import WorkloadQuery, literal, workload
from engine.codebook import Codebook, Kind, default_codebook

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv-smartnoise"
WORKER = HERE / "smartnoise_worker.py"
DELTA = 1e-6  # SmartNoise needs a delta to release keys it reads from the data
TABLE = "main.records"


def python() -> Path:
    return VENV / "bin" / "python"


def metadata(codebook: Codebook, rows: int) -> dict[str, Any]:
    """SmartNoise's metadata for the columns the workload reads."""
    columns: dict[str, Any] = {}
    for name in sorted({c for q in workload(codebook) for c in q.columns()}):
        variable = codebook.variable(name)
        if variable.kind in (Kind.CATEGORY, Kind.COUNTRY):
            columns[name] = {"type": "string"}
        else:
            low, high = (0, 1) if variable.kind is Kind.FLAG else (variable.low, variable.high)
            columns[name] = {"type": "int", "lower": low, "upper": high}
    table = {"row_privacy": True, "rows": rows, **columns}
    return {"veil": {"main": {"records": table}}}


def sql(query: WorkloadQuery) -> str:
    keys = ", ".join(query.by)
    if query.measure == "count":
        aggregates = ["COUNT(*) AS n"]
    elif query.measure == "flags":
        aggregates = [f"SUM({f}) AS {f}" for f in query.flags]
    else:
        assert query.condition is not None
        aggregates = [f"SUM({query.condition[0]}) AS numerator", "COUNT(*) AS denominator"]
    text = f"SELECT {keys}, {', '.join(aggregates)} FROM {TABLE}"
    if query.where is not None:
        text += f" WHERE {query.where[0]} = {literal(query.where[1])}"
    return text + f" GROUP BY {keys}"


class SmartNoise:
    name = "smartnoise_sql"
    label = "SmartNoise SQL 1.0.10 over DuckDB (own virtualenv)"
    slow = True
    reference = False

    def __init__(self, options: Options) -> None:
        self.options = options
        self.codebook = default_codebook()
        self.process: subprocess.Popen[str] | None = None
        self.version = ""
        self._cells: int | None = None

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the SmartNoise worker exited")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"SmartNoise: {answer.get('error')}")
        return answer

    def open(self, data: Dataset) -> None:
        self.close()
        self.process = subprocess.Popen(
            [str(python()), str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        answer = self._call(
            {
                "op": "open",
                "path": str(data.path),
                "metadata": metadata(self.codebook, data.rows),
                "epsilon": self.options.epsilon,
                "delta": DELTA,
            }
        )
        self.version = str(answer.get("version", ""))

    def prepare(self, query: WorkloadQuery) -> None:
        pass

    def run(self, query: WorkloadQuery) -> float:
        answer = self._call({"op": "run", "sql": sql(query)})
        self._cells = int(answer["rows"])
        return float(answer["seconds"])

    def cells(self, query: WorkloadQuery) -> int | None:
        return self._cells

    def close(self) -> None:
        if self.process is not None:
            if self.process.stdin is not None:
                try:
                    self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    self.process.stdin.close()
                except OSError:
                    pass
            self.process.wait(timeout=30)
            self.process = None


def systems(options: Options) -> list[System]:
    if not python().exists():
        raise Unavailable(f"no SmartNoise virtualenv at {VENV}")
    return [SmartNoise(options)]
