"""Against a real uvicorn process (process-pool jobs), through the client SDK and CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from planner import FullPosterior, Structure
from planner.search import search
from planner_client import InvalidRequest, NotFound, PlannerClient
from planner_client.cli import main as cli
from tests.app.cluster import Server
from tests.app.conftest import posterior, stored


def test_the_client_end_to_end(server, tmp_path):
    structure, arrays = posterior((3, 6, 5, 2), "full", seed=11)
    with PlannerClient(server.url) as c:
        assert c.health() == {"status": "ok"}
        t = c.upload_teacher("mlp", structure, "full", arrays)
        assert c.teacher(t["id"])["name"] == "mlp"
        seq = c.sequences([10, 6, 7, 10], [10, 4, 6, 10])
        assert seq["count"] == 3
        plan, got = c.align(t["id"], [3, 4, 2])
        teacher = Structure.mlp((3, 6, 5, 2))
        post = FullPosterior.from_dense(teacher, arrays["mean"], arrays["covariance"])
        expect = search(post, teacher.inherit((3, 4, 2))).plan.apply(post)
        assert np.array_equal(got["mean"], expect.mean)
        assert np.array_equal(got["covariance"], expect.covariance)

        prior_id = c.request_prior(plan["id"])["id"]
        # a broken download resumes from its partial file with HTTP Range
        out = tmp_path / "cov.npy"
        whole = c._send("GET", f"/v1/priors/{prior_id}/arrays/covariance").content
        (tmp_path / "cov.npy.part").write_bytes(whole[:77])
        c.download(prior_id, out, "covariance")
        assert out.read_bytes() == whole
        arc = c.download(prior_id, tmp_path / "prior.npz")
        assert np.array_equal(np.load(arc)["mean"], expect.mean)
        with pytest.raises(InvalidRequest) as err:
            c.plan(t["id"], [3, 9, 2])
        assert err.value.field == "student" and "width 9" in err.value.detail
        with pytest.raises(NotFound):
            c.teacher("t_000000000000000000000000")
        c.delete_teacher(t["id"])
        assert c.teachers() == []


def test_the_cli(server, tmp_path, capsys):
    _, arrays = posterior((3, 4, 4, 2), "diag", seed=12)
    for k, v in arrays.items():
        np.save(tmp_path / f"{k}.npy", v)
    base = ["--url", server.url]
    assert (
        cli(
            [
                *base,
                "teacher",
                "upload",
                "--name",
                "x",
                "--structure",
                "3,4,4,2",
                "--format",
                "diag",
                "--array",
                f"mean={tmp_path / 'mean.npy'}",
                "--array",
                f"variance={tmp_path / 'variance.npy'}",
            ]
        )
        == 0
    )
    t = json.loads(capsys.readouterr().out)
    assert cli([*base, "sequences", "--teacher", "10,6,6,10", "--student", "10,6,10"]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == [[{"op": "psi", "layer": 3}]]
    assert cli([*base, "plan", t["id"], "--student", "3,3,2", "--criterion", "obd"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["criterion"] == "obd"
    out = tmp_path / "prior.safetensors"
    assert (
        cli(
            [
                *base,
                "prior",
                "get",
                plan["id"],
                "--out",
                str(out),
                "--format",
                "safetensors",
                "--no-progress",
            ]
        )
        == 0
    )
    from safetensors.numpy import load_file

    assert load_file(str(out))["mean"].shape == (15,)
    assert cli([*base, "plan", t["id"], "--student", "3,9,2"]) == 1
    assert "width 9" in capsys.readouterr().err
    # a plan as a job: submitted, waited for, the same plan as a synchronous one
    assert cli([*base, "plan", t["id"], "--student", "3,3,2", "--criterion", "obd", "--async"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["id"].startswith("j_") and job["status"] in ("queued", "running", "done")
    assert cli([*base, "plan-job", "wait", job["id"]]) == 0
    waited = json.loads(capsys.readouterr().out)
    assert waited["ops"] == plan["ops"] and waited["cost"] == plan["cost"]
    assert cli([*base, "plan-job", "get", job["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "done"
    assert cli([*base, "plan-job", "cancel", job["id"]]) == 1  # finished: a 409
    assert "already" in capsys.readouterr().err
    # a student by budget: the planner chooses the widths
    assert cli([*base, "plan", t["id"], "--keep", "0.6", "--floor", "2=2"]) == 0
    by_budget = json.loads(capsys.readouterr().out)
    assert by_budget["student"]["n_params"] <= 0.6 * t["structure"]["n_params"]
    assert by_budget["student"]["widths"][1] >= 2
    assert cli([*base, "teacher", "list"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    # a network, its structures as JSON files
    net = {
        "input": [1, 3, 3],
        "stages": [
            {"type": "conv", "out": 3, "kernel": 3, "padding": 1, "activation": "relu"},
            {"type": "flatten"},
            {"type": "linear", "out": 2},
        ],
    }
    small = json.loads(json.dumps(net))
    small["stages"][0]["out"] = 2
    (tmp_path / "net.json").write_text(json.dumps(net))
    (tmp_path / "small.json").write_text(json.dumps(small))
    p = 3 * 9 + 3 + 2 * 27 + 2
    np.save(tmp_path / "nm.npy", np.linspace(-1, 1, p))
    np.save(tmp_path / "nv.npy", np.ones(p))
    up = [*base, "teacher", "upload", "--name", "n", "--structure", f"@{tmp_path / 'net.json'}"]
    up += ["--format", "diag", "--array", f"mean={tmp_path / 'nm.npy'}"]
    assert cli([*up, "--array", f"variance={tmp_path / 'nv.npy'}"]) == 0
    nt = json.loads(capsys.readouterr().out)
    assert nt["structure"]["kind"] == "network"
    assert cli([*base, "plan", nt["id"], "--student", str(tmp_path / "small.json")]) == 0
    assert json.loads(capsys.readouterr().out)["ops"][0]["space"] == 2


def test_a_killed_upload_leaves_nothing(server):
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n'
        + json.dumps(
            {"name": "k", "structure": {"widths": [3, 4, 4, 2]}, "posterior": {"format": "diag"}}
        )
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="mean"; '
        f'filename="mean.npy"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    body = head + b"\x93NUMPY" + b"\0" * 200_000
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            (
                f"POST /v1/teachers HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                f"boundary={boundary}\r\nContent-Length: {len(body) + 10_000_000}\r\n\r\n"
            ).encode()
        )
        s.sendall(body)
        time.sleep(0.5)  # the server is now writing the part to disk
    deadline = time.monotonic() + 10
    while stored(server.data) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stored(server.data) == []
    assert httpx.get(f"{server.url}/v1/teachers").json() == []


def test_sixteen_concurrent_clients(server):
    structure, arrays = posterior((4, 8, 8, 3), "full", seed=13)
    with PlannerClient(server.url) as c:
        t = c.upload_teacher("shared", structure, "full", arrays)

    def job(i: int):
        with PlannerClient(server.url) as c:
            student = [4, 8 - i % 4, 3] if i % 2 else [4, 7 - i % 3, 8 - i % 5, 3]
            plan, got = c.align(t["id"], student, seed=i)
            assert got["mean"].shape == (plan["student"]["n_params"],)
            assert (
                c.array(c.request_prior(plan["id"])["id"], "covariance", "float32").dtype
                == np.float32
            )
            return plan["id"]

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(job, range(16)))
    assert len(set(ids)) == 16


def test_restart_of_the_process(tmp_path):
    data = tmp_path / "data"
    srv = Server(data).start()
    try:
        structure, arrays = posterior((3, 4, 4, 2), "diag", seed=14)
        with PlannerClient(srv.url) as c:
            t = c.upload_teacher("r", structure, "diag", arrays)
            plan, got = c.align(t["id"], [3, 3, 2])
    finally:
        srv.stop()
    arrays_dir = data / "arrays"
    stray = [  # as if a previous process died mid-upload, and mid-ingest
        arrays_dir / "teachers" / "t_eeeeeeeeeeeeeeeeeeeeeeee" / "upload" / "mean",
        arrays_dir / "teachers" / "t_ffffffffffffffffffffffff" / "mean.npy",
    ]
    for f in stray:
        f.parent.mkdir(parents=True)
        f.write_bytes(b"partial")
    srv = Server(data).start()
    try:
        with PlannerClient(srv.url) as c:
            assert c.teacher(t["id"])["arrays"] == t["arrays"]
            prior = c.request_prior(plan["id"])
            assert prior["status"] == "done"
            assert np.array_equal(c.array(prior["id"], "mean"), got["mean"])
        assert not any(f.exists() for f in stray)
        assert stored(data)  # what the records own stays
    finally:
        srv.stop()


def _forkserver_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "multiprocessing.forkserver"], capture_output=True)
    return {int(x) for x in out.stdout.split()}


def _gone(pids: set[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_workers_end_with_the_server(tmp_path, how):
    before = _forkserver_pids()
    srv = Server(tmp_path / "data").start()
    ours = _forkserver_pids() - before
    assert ours, "the process pool should have started its workers"
    if how == "terminate":
        srv.stop()
    else:
        srv.proc.kill()
        srv.proc.wait(10)
    assert _gone(ours, within=15), f"workers outlived the server ({how})"


README = Path(__file__).parents[2] / "README.md"
SERVICE_DOC = Path(__file__).parents[2] / "docs" / "service.md"


def test_the_curl_walkthrough_runs(server, tmp_path):
    import re

    block = re.search(r"```sh\n(URL=.*?)```", SERVICE_DOC.read_text(), re.S).group(1)
    env = {
        **os.environ,
        "URL": server.url,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert '"count":3' in out.stdout and '"status":"done"' in out.stdout
    assert np.load(tmp_path / "prior_mean.npy", allow_pickle=False).shape == (124,)
    assert sorted(np.load(tmp_path / "prior.npz").files) == ["covariance", "mean"]


def test_the_client_example_runs(server, tmp_path, monkeypatch, capsys):
    import re

    blocks = re.findall(r"```python\n(.*?)```", SERVICE_DOC.read_text(), re.S)
    code = next(b for b in blocks if "# needs a running service" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:8000", server.url), "service.md", "exec"), {})
    assert "(550,)" in capsys.readouterr().out
    assert (tmp_path / "prior.safetensors").stat().st_size > 550 * 8


def test_the_readme_examples_run_against_a_server(server, capsys):
    """The README's first example, then its service example, in one namespace."""
    import re

    namespace: dict = {}
    for code in re.findall(r"```python\n(.*?)```", README.read_text(), re.S):
        code = code.replace("http://127.0.0.1:8000", server.url)
        exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("(124,)"), out
