"""A training job installs the client alone: no server package, no torch unless asked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SERVER = {
    "fastapi", "starlette", "uvicorn", "pydantic", "pydantic-settings", "python-multipart",
    "safetensors", "prometheus-client", "sqlalchemy", "alembic", "psycopg", "fsspec", "s3fs",
    "distributed", "dask", "torch", "laplace-torch",
}  # fmt: skip


def test_importing_the_client_loads_no_server_and_no_torch():
    code = (
        "import sys, planner_client, planner_client.imports, planner_client.cli;"
        "print([m for m in ('fastapi', 'uvicorn', 'sqlalchemy', 'distributed', 'torch',"
        " 'laplace', 'app') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_client_extra_resolves_without_server_packages(tmp_path):
    """pip itself resolves `alignment-planner[client]` against the index (nothing installed)."""
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
            "--report", str(report), f"{ROOT}[client]",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"httpx", "tqdm", "numpy", "alignment-planner"} <= names
    assert not names & SERVER, names & SERVER
