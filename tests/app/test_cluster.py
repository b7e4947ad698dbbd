"""The scaled-out service under faults: PostgreSQL, S3 (SeaweedFS) and Dask, all real.

Workers, the scheduler and replicas are killed for real (SIGKILL).  Priors are
slowed on the first workers (``slow_priors.py``, a preload that sleeps before
the exact alignment) so that they are certainly running when the kill comes;
every prior must then complete with the core's values, bit for bit.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from app.compute import run_prior
from app.db import engine_for, migrate
from app.storage import Storage
from planner import FullPosterior, Plan, Structure
from tests.app.cluster import DaskCluster, Server, postgres_database, settings_env
from tests.app.conftest import (
    cluster_settings,
    make_plan,
    posterior,
    start,
    stop,
    stored,
    upload,
    wait_done,
)

pytestmark = pytest.mark.anyio

PRELOAD = str(Path(__file__).with_name("slow_priors.py"))
#: seconds a prior takes on the slowed workers: far longer than a kill takes
DELAY = 4.0
TEACHER = (3, 6, 6, 2)
STUDENTS = ([3, 5, 6, 2], [3, 6, 5, 2], [3, 4, 6, 2], [3, 6, 4, 2], [3, 5, 5, 2])


@pytest.fixture
def database(cluster_parts):
    with postgres_database() as url:
        yield url


@pytest.fixture
def slow_dask(tmp_path, cluster_parts):
    """A cluster of its own (the fault tests kill it), two workers on which priors are slow."""
    dask = DaskCluster(tmp_path / "dask", cluster_parts.s3.env(), workers=0, preload=PRELOAD)
    dask.start_workers(2, PLANNER_TEST_APPLY_DELAY=str(DELAY))
    yield dask
    dask.stop()


async def teacher_and_plans(client, n: int):
    """A full-covariance teacher and plans to ``n`` students; (posterior, plans)."""
    structure, arrays = posterior(TEACHER, "full", seed=31, bias=True)
    r = await upload(client, structure, "full", arrays)
    assert r.status_code == 201, r.text
    teacher = Structure.mlp(TEACHER, bias=True)
    post = FullPosterior.from_dense(teacher, arrays["mean"], arrays["covariance"])
    plans = [await make_plan(client, r.json()["id"], s) for s in STUDENTS[:n]]
    return post, plans


async def request_priors(client, plans) -> list[str]:
    ids = []
    for p in plans:
        r = await client.post(f"/v1/plans/{p['id']}/prior")
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


async def until(check, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def statuses(store, ids) -> list[str]:
    return [store.prior_for_job(i).status for i in ids]


async def assert_exact(client, post, plans, ids) -> None:
    """Every prior done, each array bit for bit the core's alignment of its plan."""
    for plan, pid in zip(plans, ids, strict=True):
        done = await wait_done(client, pid, timeout=90)
        assert done["status"] == "done", done
        expect = Plan.from_json(post.structure, plan["ops"]).apply(post).to_arrays()
        for name, a in expect.items():
            r = await client.get(f"/v1/priors/{pid}/arrays/{name}")
            assert r.status_code == 200, r.text
            assert np.array_equal(np.load(io.BytesIO(r.content), allow_pickle=False), a), name


async def test_every_worker_killed_mid_job_then_new_workers_finish_every_prior(
    tmp_path, cluster_parts, database, slow_dask
):
    settings = cluster_settings(cluster_parts, database, dask_scheduler=slow_dask.address)
    svc, ctx = await start(tmp_path / "data", **settings)
    try:
        post, plans = await teacher_and_plans(svc.client, 5)
        ids = await request_priors(svc.client, plans)
        await until(lambda: statuses(svc.store, ids).count("running") == 2, what="two running")
        await asyncio.to_thread(slow_dask.kill_workers)
        before = statuses(svc.store, ids)
        assert sorted(before) == ["queued"] * 3 + ["running"] * 2, before
        running = [i for i, s in zip(ids, before, strict=True) if s == "running"]

        async def unready() -> bool:
            r = await svc.client.get("/readyz")
            return r.status_code == 503 and r.json()["workers"] == 0

        deadline = time.monotonic() + 30
        while not await unready():  # no worker: not ready (the scheduler notices the deaths)
            assert time.monotonic() < deadline, (await svc.client.get("/readyz")).json()
            await asyncio.sleep(0.2)

        await asyncio.to_thread(slow_dask.start_workers, 2)  # new workers, at full speed
        await assert_exact(svc.client, post, plans, ids)
        for i in running:  # cut off once, claimed again after the lease expired
            assert svc.store.prior_for_job(i).attempts >= 2
        assert (await svc.client.get("/readyz")).status_code == 200
    finally:
        await stop(svc, ctx)


async def test_the_scheduler_restarted_loses_no_job(tmp_path, cluster_parts, database, slow_dask):
    settings = cluster_settings(cluster_parts, database, dask_scheduler=slow_dask.address)
    svc, ctx = await start(tmp_path / "data", **settings)
    try:
        post, plans = await teacher_and_plans(svc.client, 4)
        ids = await request_priors(svc.client, plans)
        await until(lambda: "running" in statuses(svc.store, ids), what="a prior running")
        await asyncio.to_thread(slow_dask.kill_scheduler)
        await asyncio.to_thread(slow_dask.kill_workers)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(slow_dask.start_scheduler)  # the same address
        await asyncio.to_thread(slow_dask.start_workers, 2)
        await assert_exact(svc.client, post, plans, ids)
        # the replica's client reconnected: new work is accepted again
        more = await make_plan(svc.client, plans[0]["teacher"], STUDENTS[4])
        assert more["cost"] > 0
    finally:
        await stop(svc, ctx)


async def test_every_replica_killed_mid_job_loses_no_job(
    tmp_path, cluster_parts, database, slow_dask
):
    settings = cluster_settings(cluster_parts, database, dask_scheduler=slow_dask.address)
    replica = await asyncio.to_thread(Server(tmp_path / "r1", **settings_env(settings)).start)
    try:
        async with httpx.AsyncClient(base_url=replica.url, timeout=60) as c:
            post, plans = await teacher_and_plans(c, 3)
            ids = await request_priors(c, plans)
    finally:
        replica.kill()  # two priors running, one queued: no replica is left
    svc, ctx = await start(tmp_path / "r2", **settings)  # another replica, later
    try:
        await assert_exact(svc.client, post, plans, ids)
    finally:
        await stop(svc, ctx)


def _send_partial_upload(url: str, mib: int) -> socket.socket:
    """Start an upload whose body is never finished: a whole ``mean`` part, then ``mib``
    MiB of a ``covariance`` part; the open socket (the caller closes it)."""
    port = int(url.rsplit(":", 1)[1])
    boundary = "cut-short"
    spec = {"name": "k", "structure": {"widths": list(TEACHER)}, "posterior": {"format": "full"}}
    _, arrays = posterior(TEACHER, "full")
    buf = io.BytesIO()
    np.save(buf, arrays["mean"])

    def part(name: str) -> bytes:
        return (
            (
                f"--{boundary}\r\nContent-Disposition: form-data; name={name!r}; "
                f"filename='{name}.npy'\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .replace("'", '"')
            .encode()
        )

    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{json.dumps(spec)}\r\n'
    ).encode()
    body = head + part("mean") + buf.getvalue() + b"\r\n" + part("covariance")
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        (
            f"POST /v1/teachers HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body) + (mib + 64) * 2**20}\r\n\r\n"
        ).encode()
        + body
    )
    chunk = b"\0" * 2**20
    for _ in range(mib):
        s.sendall(chunk)
    return s


async def test_a_replica_killed_mid_upload_leaves_nothing_listed(
    tmp_path, cluster_parts, database, slow_dask
):
    settings = cluster_settings(cluster_parts, database, dask_scheduler=slow_dask.address)
    storage = Storage(settings["storage_url"])
    replica = await asyncio.to_thread(Server(tmp_path / "r1", **settings_env(settings)).start)
    try:
        sock = await asyncio.to_thread(_send_partial_upload, replica.url, 40)
        bucket, _, prefix = storage.root.partition("/")

        def uploading() -> bool:  # the covariance part is being written to S3, in parts
            page = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
            return bool(page.get("Uploads"))

        await until(uploading, 30, "a multipart upload in progress")
        replica.kill()
        sock.close()
    finally:
        replica.kill()
    assert stored(storage) == []  # the complete mean part was never committed either
    assert uploading()  # never listed, but holding its parts until aborted
    svc, ctx = await start(tmp_path / "r2", **settings, sweep_grace=1.0, sweep_seconds=0.5)
    try:
        assert (await svc.client.get("/v1/teachers")).json() == []
        await until(lambda: not uploading(), 10, "the sweep to abort the upload")
    finally:
        await stop(svc, ctx)
        storage.close()


async def test_two_replicas_claiming_the_same_job_compute_it_once(
    tmp_path, cluster_parts, database
):
    settings = cluster_settings(cluster_parts, database)
    a, actx = await start(tmp_path / "a", **settings)
    b, bctx = await start(tmp_path / "b", **settings)
    try:
        post, plans = await teacher_and_plans(a.client, 1)
        rec, created = a.store.prior_for_plan("public", plans[0]["id"])
        assert created
        again, created = b.store.prior_for_plan("public", plans[0]["id"])
        assert again.id == rec.id and not created  # one prior per plan, whoever asks
        # both replicas hand the job to the executor, twice each; one claim wins
        for svc in (a, b, a, b):
            svc.app.state.jobs.submit(rec.id)
        await assert_exact(b.client, post, plans, [rec.id])
        done = a.store.prior_for_job(rec.id)
        assert done.attempts == 1
        claims = {k.split("/")[2] for k in stored(a) if k.startswith(f"priors/{rec.id}/")}
        assert claims == {done.location.rsplit("/", 1)[1]}  # one result was written
    finally:
        await stop(a, actx)
        await stop(b, bctx)


async def test_claims_are_exclusive_and_a_lost_claim_cannot_complete(
    tmp_path, cluster_parts, database
):
    settings = cluster_settings(cluster_parts, database)
    svc, ctx = await start(tmp_path / "a", **settings)
    try:
        post, plans = await teacher_and_plans(svc.client, 1)
        store = svc.store
        rec, _ = store.prior_for_plan("public", plans[0]["id"])
        # eight claimants at once, each on its own connection: exactly one wins
        barrier, won = threading.Barrier(8), []

        def claim(i: int) -> None:
            barrier.wait()
            if store.claim(rec.id, f"claimant-{i}", 0.5) is not None:
                won.append(i)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        # the winner stalls past its lease: the replica's reaper puts the prior back in
        # the queue and hands it to the executor, where a worker computes it
        await until(lambda: store.prior_for_job(rec.id).status == "done", 30, "recomputed")
        assert store.prior_for_job(rec.id).attempts == 2
        config = svc.settings.config
        # the stalled claimant comes back: it can neither renew nor complete
        assert not store.renew(rec.id, f"claimant-{won[0]}", 30.0)
        assert not store.complete(rec.id, f"claimant-{won[0]}", status="failed")
        assert store.prior_for_job(rec.id).status == "done"
        assert (await asyncio.to_thread(run_prior, config, rec.id))["status"] == "skipped"
        await assert_exact(svc.client, post, plans, [rec.id])
    finally:
        await stop(svc, ctx)


def test_replicas_starting_together_migrate_once(cluster_parts):
    with postgres_database() as url:
        errors: list[BaseException] = []

        def replica() -> None:
            try:
                engine = engine_for(url)
                migrate(engine)
                engine.dispose()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=replica) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        engine = engine_for(url)
        with engine.connect() as conn:
            from sqlalchemy import text

            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            tables = set(
                conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
            )
        engine.dispose()
        assert len(versions) == 1
        assert {"teachers", "plans", "priors", "alembic_version"} <= tables


def test_the_compose_file_runs_the_embedded_default_and_the_cluster_profile():
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
    services = compose["services"]
    default = [n for n, s in services.items() if not s.get("profiles")]
    assert default == ["planner"]  # `docker compose up`: the embedded service alone
    cluster = {n for n, s in services.items() if "cluster" in s.get("profiles", [])}
    assert {"postgres", "s3", "scheduler", "worker-1", "worker-2", "api-1", "api-2"} <= cluster
    ours = ["planner", "scheduler", "worker-1", "worker-2", "api-1", "api-2"]
    images = {services[n].get("image") for n in ours}
    assert len(images) == 1 and None not in images  # the project's one image everywhere
    assert all(services[n].get("build", {"context": "."}) for n in ours)
    assert services["s3"]["image"].startswith("chrislusf/seaweedfs")
    assert services["postgres"]["image"].startswith("postgres")

    def env(name: str) -> dict:
        e = services[name].get("environment", {})
        return e if isinstance(e, dict) else dict(kv.split("=", 1) for kv in e)

    for api in ("api-1", "api-2"):
        e = env(api)
        assert e["PLANNER_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert e["PLANNER_STORAGE_URL"].startswith("s3://")
        assert e["PLANNER_EXECUTOR"] == "dask"
        assert e["PLANNER_DASK_SCHEDULER"] == "tcp://scheduler:8786"
        assert e["AWS_ENDPOINT_URL"].startswith("http://s3:")
        assert {"postgres", "s3", "scheduler"} <= set(services[api]["depends_on"])
    for worker in ("worker-1", "worker-2"):
        command = " ".join(services[worker]["command"])
        assert "dask worker tcp://scheduler:8786" in command and "--nthreads 1" in command
        assert env(worker)["AWS_ENDPOINT_URL"] == env("api-1")["AWS_ENDPOINT_URL"]
    # the two replicas differ only in their published port
    assert env("api-1") == env("api-2")
    assert services["api-1"]["ports"] != services["api-2"]["ports"]


async def test_a_job_out_of_memory_on_a_dask_worker_is_a_413_problem(cluster_parts, database):
    """A Dask worker's job that runs out of memory (the host's, or a GPU's: planner.backend
    raises a ``MemoryError`` for both) is answered with the 413 problem the process
    pool gives, not a 500."""
    from app.jobs import DaskRunner
    from app.problems import Problem
    from app.settings import Settings

    runner = DaskRunner(Settings(**cluster_settings(cluster_parts, database)), store=None)
    await runner._start()
    try:
        with pytest.raises(Problem) as got:  # an allocation of 4 EiB, refused at once
            await runner.run(bytearray, 2**62, seconds=60)
    finally:
        await runner._shutdown()
    assert got.value.status == 413 and got.value.slug == "too-large"
    assert "PLANNER_JOB_MEMORY" in got.value.detail
