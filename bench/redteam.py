"""The red team's reproductions (the hardening issue), at their own sizes where this
machine allows, against a real server (``python -m app.server``, a process pool):
what each request now answers, how long it took, and the server's memory.

``python -m bench.redteam [--quick]`` prints a table (and saves
``bench/results/redteam.json`` for a full run).  ``--quick`` scales every case down
(the smoke test runs it).  Nothing here is asserted: ``tests/app/test_hardening.py``
holds the checks.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.common import random_spd, report
from planner import Structure
from tests.app.cluster import Server


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _spec(widths, fmt) -> str:
    return json.dumps({"name": "r", "structure": {"widths": widths}, "posterior": {"format": fmt}})


class Run:
    def __init__(self, srv: Server) -> None:
        self.srv, self.rows = srv, []
        self.proc = psutil.Process(srv.proc.pid)

    def rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running())

    def case(self, name: str, fn) -> None:
        before = self.rss()
        t0 = time.monotonic()
        try:
            answer = fn()
        except httpx.HTTPError as exc:
            answer = f"connection: {type(exc).__name__}"
        took = time.monotonic() - t0
        grew = (self.rss() - before) / 2**20
        ready = httpx.get(f"{self.srv.url}/readyz", timeout=30).status_code
        self.rows.append(
            {
                "case": name,
                "answer": answer,
                "seconds": took,
                "rss_growth_mib": grew,
                "readyz": ready,
            }
        )
        print(f"{name}: {answer} in {took:.2f} s (server +{grew:.0f} MiB, readyz {ready})")

    def upload(self, widths, fmt, arrays) -> str:
        files = {k: (f"{k}.npy", _npy(v), "application/octet-stream") for k, v in arrays.items()}
        r = httpx.post(
            f"{self.srv.url}/v1/teachers",
            data={"spec": _spec(widths, fmt)},
            files=files,
            timeout=600,
        )
        r.raise_for_status()
        return r.json()["id"]

    def plan(self, tid: str, body: dict) -> str:
        r = httpx.post(f"{self.srv.url}/v1/teachers/{tid}/plans", json=body, timeout=600)
        return _said(r)


def _said(r: httpx.Response) -> str:
    if r.status_code < 300:
        search = (
            r.json().get("search")
            if r.headers.get("content-type", "").startswith("application/json")
            else None
        )
        cut = f", cut by {search['cut_by']}" if search and search.get("cut") else ""
        return f"{r.status_code}{cut}"
    try:
        body = r.json()
        field = f" ({body['field']})" if body.get("field") else ""
        return f"{r.status_code} {body['type'].rsplit(':', 1)[-1]}{field}: {body['detail'][:90]}"
    except ValueError:
        return f"{r.status_code}"


def full_teacher(widths, seed=0):
    s = Structure.mlp(widths)
    rng = np.random.default_rng(seed)
    return {"mean": rng.normal(size=s.n_params), "covariance": random_spd(rng, s.n_params)}


def run(quick: bool) -> list[dict]:
    wide = 30 if quick else 82
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp) / "data").start()
        try:
            return _cases(Run(srv), wide, quick)
        finally:
            srv.stop()


def _cases(run: Run, wide: int, quick: bool) -> list[dict]:
    url = run.srv.url
    # critical: the search's deadline and memory
    tid = run.upload([10, wide, wide, 10], "full", full_teacher((10, wide, wide, 10)))
    run.case(
        f"full (10,{wide},{wide},10) -> [10,1,{wide},10]",
        lambda: run.plan(tid, {"student": {"widths": [10, 1, wide, 10]}}),
    )
    t20 = run.upload([10, 20, 20, 10], "full", full_teacher((10, 20, 20, 10), 1))
    run.case(
        "full (10,20,20,10) -> [10,1,20,10], seconds 5",
        lambda: run.plan(t20, {"student": {"widths": [10, 1, 20, 10]}, "seconds": 5}),
    )

    def killed():
        box = {}
        th = threading.Thread(
            target=lambda: box.update(
                r=run.plan(tid, {"student": {"widths": [10, 1, wide, 10]}, "seconds": 30})
            )
        )
        th.start()
        time.sleep(1.0)
        for child in run.proc.children():
            for w in child.children():
                w.kill()
        th.join()
        after = run.plan(t20, {"student": {"widths": [10, 10, 20, 10]}})
        return f"{box['r']}; next plan {after}"

    run.case("worker killed mid-search, then the next plan", killed)

    # high: bodies
    big = 40 * 2**20 if quick else 400 * 2**20
    multipart = {"content-type": "multipart/form-data; boundary=b"}

    def declared():  # the headers alone: the answer must come before any body byte
        with socket.create_connection(("127.0.0.1", run.srv.port), timeout=30) as sk:
            sk.sendall(
                b"POST /v1/structures/sequences HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: %d\r\n\r\n" % big
            )
            return sk.recv(4096).split(b"\r\n", 1)[0].decode()

    run.case(f"multipart of {big >> 20} MB declared to a JSON route", declared)

    def chunked():
        def gen():
            for _ in range(big >> 20):
                yield b"x" * 2**20

        return _said(
            httpx.post(
                f"{url}/v1/teachers/{tid}/plans", headers=multipart, content=gen(), timeout=60
            )
        )

    run.case(f"multipart of {big >> 20} MB chunked to a JSON route", chunked)

    rows = 156_000 if quick else 1_560_000
    p = 172

    def bomb():
        s = Structure.mlp((10, 10, 2))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("mean.npy", _npy(np.zeros(s.n_params)))
            zf.writestr("variance.npy", _npy(np.ones(s.n_params)))
            with zf.open("gradients.npy", "w", force_zip64=True) as out:
                hdr = io.BytesIO()
                np.lib.format.write_array_header_2_0(
                    hdr, {"descr": "<f8", "fortran_order": False, "shape": (rows, p)}
                )
                out.write(hdr.getvalue())
                left = rows * p * 8
                zero = bytes(1 << 22)
                while left:
                    out.write(zero[: min(left, len(zero))])
                    left -= min(left, len(zero))
        data = buf.getvalue()
        r = httpx.post(
            f"{url}/v1/teachers",
            data={"spec": _spec([10, 10, 2], "diag")},
            files={"archive": ("a.npz", data, "application/octet-stream")},
            timeout=120,
        )
        return f"{_said(r)}; {len(data) / 2**20:.1f} MB on the wire"

    run.case(f"deflated gradients member ({rows} x {p} zeros)", bomb)

    def fields():
        data = {f"f{i}": "y" * 2**20 for i in range(20 if quick else 1000)}
        data["spec"] = _spec([3, 4, 2], "diag")
        files = {"mean": ("mean.npy", _npy(np.zeros(14)), "application/octet-stream")}
        return _said(httpx.post(f"{url}/v1/teachers", data=data, files=files, timeout=120))

    run.case("1 MB form fields (x1000)", fields)

    def parts():
        n = 2_000 if quick else 22_000
        many = {f"p{i}": (f"p{i}.npy", b"0", "application/octet-stream") for i in range(n)}
        return _said(
            httpx.post(
                f"{url}/v1/teachers",
                data={"spec": _spec([3, 4, 2], "diag")},
                files=many,
                timeout=120,
            )
        )

    run.case("22,000 file parts", parts)

    # medium
    seq = f"{url}/v1/structures/sequences"

    def deep():
        body = {"teacher": {"widths": [10, 990, 10]}, "student": {"widths": [10, 1, 10]}}
        return _said(httpx.post(seq, json=body, timeout=60))

    run.case("sequences (10,990,10) -> (10,1,10)", deep)

    def wide_seq():
        body = {
            "teacher": {"widths": [10, 450, 450, 10]},
            "student": {"widths": [10, 1, 1, 10]},
            "limit": 1000,
        }
        out = []

        def one():
            r = httpx.post(seq, json=body, timeout=120)
            out.append((r.status_code, len(r.content)))

        ths = [threading.Thread(target=one) for _ in range(8)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        return f"{out[0][0]} x8, {max(n for _, n in out) / 2**20:.1f} MB each"

    run.case("sequences (10,450,450,10) -> (10,1,1,10), 8 at once", wide_seq)

    n_diag = 2**16 if quick else 2**20
    s = Structure.mlp((1, n_diag, 1))
    tdiag = run.upload(
        [1, n_diag, 1], "diag", {"mean": np.zeros(s.n_params), "variance": np.ones(s.n_params)}
    )
    n_ops = min(120_000, n_diag // 2)
    ops = [{"op": "phi", "layer": 2, "neuron": 0}] * n_ops
    run.case(
        f"{n_ops} explicit phi ops on diag (1,{n_diag},1)",
        lambda: run.plan(tdiag, {"student": {"widths": [1, n_diag - n_ops, 1]}, "ops": ops}),
    )
    run.case(
        f"search diag (1,{n_diag},1) -> (1,1,1)",
        lambda: run.plan(tdiag, {"student": {"widths": [1, 1, 1]}}),
    )

    def slow():
        n = 300 if quick else 1100
        socks = []
        for _ in range(n):
            try:
                sk = socket.create_connection(("127.0.0.1", run.srv.port), timeout=5)
                sk.sendall(b"GET /heal")
                socks.append(sk)
            except OSError:
                break
        other = httpx.HTTPTransport(local_address="127.0.0.2")  # another client's address
        with httpx.Client(transport=other, timeout=30) as c:
            health = c.get(f"{url}/healthz").status_code
        t0 = time.monotonic()
        closed = 0
        for sk in socks:
            try:
                sk.settimeout(max(0.1, 20 - (time.monotonic() - t0)))
                if sk.recv(4096)[:12] in (b"HTTP/1.1 408", b"HTTP/1.1 503", b""):
                    closed += 1
            except OSError:
                pass
            sk.close()
        return (
            f"{len(socks)} opened, another client's healthz {health} meanwhile, "
            f"{closed} answered and closed"
        )

    run.case("1,100 connections with half a request line", slow)
    return run.rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args.quick)
    report("redteam", rows, args.quick)


if __name__ == "__main__":
    main()
