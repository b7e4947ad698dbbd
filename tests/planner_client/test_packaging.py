"""A training job installs the client alone: no server package, no torch unless asked."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
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


def test_the_client_distribution_resolves_without_server_packages(tmp_path):
    """pip itself resolves the client distribution (``pip install ./client``) against the
    index, nothing installed: no server package, no torch."""
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
            "--report", str(report), str(ROOT / "client"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"httpx", "tqdm", "numpy", "alignment-planner-client"} <= names
    assert not names & SERVER, names & SERVER
    assert "alignment-planner" not in names


def test_the_client_wheel_holds_planner_client_alone(tmp_path):
    """Built from the checkout, the client's wheel puts one top-level package on a user's
    path: ``planner_client`` (no ``app`` to clash with theirs, no ``planner``), every
    module of it, and the CLI."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path),
         str(ROOT / "client")],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("alignment_planner_client-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = zf.read(entry).decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"planner_client"}, tops
    ours = {p.name for p in (ROOT / "planner_client").glob("*.py")}
    assert ours <= {n.split("/")[-1] for n in names if n.startswith("planner_client/")}
    assert "alignment-planner = planner_client.cli:main" in scripts
    # installed in a clean virtual environment: one new top-level package on its path
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    before = {p.name for p in site.iterdir()}
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
         "--target", str(site), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    added = {p.name for p in site.iterdir()} - before
    assert {n for n in added if not n.endswith(".dist-info") and n != "bin"} == {"planner_client"}


def test_serve_without_the_service_says_what_to_install():
    code = (
        "import sys; sys.modules['app'] = None;"  # as if the service were not installed
        "from planner_client.cli import main; sys.exit(main(['serve']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "pip install 'alignment-planner[service]'" in out.stderr, out.stderr
