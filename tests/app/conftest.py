"""Fixtures: the real app over httpx's ASGI transport, and upload helpers."""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from app.main import create_app
from app.settings import Settings
from app.storage import Storage
from tests.app.cluster import (
    BUCKET,
    PG,
    DaskCluster,
    Seaweed,
    Server,
    need,
    postgres_database,
    postgres_up,
)
from tests.strategies import spd


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Service(SimpleNamespace):
    app: object
    client: httpx.AsyncClient
    settings: Settings
    data: Path

    @property
    def store(self):
        return self.app.state.store


async def start(data: Path, **settings) -> tuple:
    """The app on ``settings`` (the embedded default when only ``data`` is given), its
    lifespan entered; (service, lifespan context)."""
    s = Settings(**{"data_dir": data, "executor": "thread", "workers": 2, **settings})
    app = create_app(s)
    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return Service(app=app, client=client, settings=s, data=data), ctx


async def stop(service: Service, ctx) -> None:
    await service.client.aclose()
    await ctx.__aexit__(None, None, None)
    service.store.close()


# -- the two configurations: embedded, and PostgreSQL + S3 + Dask ---------------------------
class ClusterParts(SimpleNamespace):
    s3: Seaweed
    dask: DaskCluster


@pytest.fixture(scope="session")
def cluster_parts(tmp_path_factory):
    """SeaweedFS and a Dask scheduler with two workers, for the whole session; the S3
    endpoint and keys in this process's environment (as a replica would have them)."""
    need(postgres_up(), f"no PostgreSQL server at {PG!r}")
    root = tmp_path_factory.mktemp("cluster")
    s3 = Seaweed(root / "s3")
    env = s3.env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dask = DaskCluster(root / "dask", env, workers=2)
    try:
        yield ClusterParts(s3=s3, dask=dask)
    finally:
        dask.stop()
        s3.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: Job timings of the cluster configuration in tests: a dead worker's job is found
#: within seconds, not minutes.
FAST_JOBS = {"lease_seconds": 2.0, "reap_seconds": 0.3, "resubmit_seconds": 4.0}


def cluster_settings(parts: ClusterParts, database_url: str, **extra) -> dict:
    """Settings of a replica of the scaled-out service: its own S3 prefix per test."""
    return {
        "database_url": database_url,
        "storage_url": f"s3://{BUCKET}/t-{secrets.token_hex(6)}",
        "executor": "dask",
        "dask_scheduler": parts.dask.address,
        **FAST_JOBS,
        **extra,
    }


@pytest.fixture
def server(tmp_path):
    """An embedded service in a uvicorn process of its own (process-pool jobs)."""
    srv = Server(tmp_path / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def backend(request):
    """Settings of the configuration under test: ``embedded`` unless a test module
    parametrises ``backend`` (indirectly) over :data:`BACKENDS`."""
    mode = getattr(request, "param", "embedded")
    if mode == "embedded":
        yield {}
        return
    parts = request.getfixturevalue("cluster_parts")
    with postgres_database() as url:
        yield cluster_settings(parts, url)


BACKENDS = ["embedded", "cluster"]


@pytest.fixture
async def svc(tmp_path, backend):
    service, ctx = await start(tmp_path / "data", **backend)
    yield service
    await stop(service, ctx)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def posterior(widths=(3, 4, 4, 2), fmt="full", seed=0, bias=False):
    """A small random teacher posterior: (structure JSON, arrays)."""
    from planner import Structure

    s = Structure.mlp(widths, bias=bias)
    rng = np.random.default_rng(seed)
    p = s.n_params
    mean = rng.normal(size=p)
    if fmt == "full":
        return {"widths": list(widths), "bias": bias}, {"mean": mean, "covariance": spd(rng, p)}
    return {"widths": list(widths), "bias": bias}, {
        "mean": mean,
        "variance": rng.uniform(0.5, 2.0, size=p),
    }


async def upload(client, structure, fmt, arrays, name="t", raw=None, spec=None, headers=None):
    spec = (
        spec
        if spec is not None
        else {"name": name, "structure": structure, "posterior": {"format": fmt}}
    )
    files = (
        raw
        if raw is not None
        else {k: (f"{k}.npy", npy(v), "application/octet-stream") for k, v in arrays.items()}
    )
    data = {"spec": spec if isinstance(spec, str) else json.dumps(spec)}
    return await client.post("/v1/teachers", data=data, files=files, headers=headers)


async def wait_done(client, prior_id, headers=None, timeout=30.0):
    for _ in range(int(timeout / 0.02)):
        r = await client.get(f"/v1/priors/{prior_id}", headers=headers)
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("done", "failed"):
            return r.json()
        await asyncio.sleep(0.02)
    raise TimeoutError(prior_id)


def assert_problem(r: httpx.Response, status: int, field: str | None = None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    if field is not None:
        assert body.get("field") == field, body
    return body


def stored(where) -> list[str]:
    """Every object under teachers/ and priors/ of a service's storage (a
    :class:`Service`, a :class:`~app.storage.Storage`, or an embedded data folder),
    partial files included."""
    if isinstance(where, Service):
        storage = where.store.storage
    elif isinstance(where, Path):
        storage = Storage(Settings(data_dir=where).storage)
    else:
        storage = where
    storage.fs.invalidate_cache()
    keys = []
    for sub in ("teachers", "priors"):
        try:
            found = storage.fs.find(storage.path(sub))
        except FileNotFoundError:
            continue
        keys += [
            k[len(storage.root) + 1 :] for k in found if k.startswith(f"{storage.root}/{sub}/")
        ]
    return sorted(keys)


def key_of(svc: Service, teacher_id: str, name: str) -> str:
    """The storage key of a teacher's array (its record says where it lies)."""
    return svc.store.teacher_array_key(svc.store.teacher_for_job(teacher_id), name)


async def make_plan(client, teacher_id: str, widths, headers=None) -> dict:
    """POST a searched plan to ``widths``; its JSON (201 asserted)."""
    r = await client.post(
        f"/v1/teachers/{teacher_id}/plans",
        json={"student": {"widths": list(widths)}},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    return r.json()


async def make_prior(client, plan_id: str, headers=None) -> dict:
    """Request a plan's prior and wait until it is done or failed."""
    r = await client.post(f"/v1/plans/{plan_id}/prior", headers=headers)
    assert r.status_code in (201, 202), r.text
    return await wait_done(client, r.json()["id"], headers)
