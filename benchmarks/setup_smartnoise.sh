#!/usr/bin/env bash
# SmartNoise SQL for the benchmark, in a virtual environment of its own: smartnoise-sql 1.0.10
# pins opendp < 0.15, and veil needs opendp 0.16. DuckDB is pinned to the version veil uses, so
# both read the same data files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-smartnoise"
duckdb_version="$(python3 -c 'import duckdb; print(duckdb.__version__)')"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "smartnoise-sql==1.0.10" "duckdb==$duckdb_version"
"$venv/bin/python" -c 'import snsql, duckdb; print("SmartNoise SQL ready:", duckdb.__version__)'
