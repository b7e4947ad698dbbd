"""Fixtures: the real app over httpx's ASGI transport, and upload helpers."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from app.main import create_app
from app.settings import Settings
from tests.strategies import spd


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Service(SimpleNamespace):
    app: object
    client: httpx.AsyncClient
    settings: Settings
    data: Path


async def start(data: Path, **settings) -> tuple:
    s = Settings(data_dir=data, executor="thread", workers=2, **settings)
    app = create_app(s)
    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return Service(app=app, client=client, settings=s, data=data), ctx


@pytest.fixture
async def svc(tmp_path):
    service, ctx = await start(tmp_path / "data")
    yield service
    await service.client.aclose()
    await ctx.__aexit__(None, None, None)


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


def stored_files(data: Path) -> list[Path]:
    """Every file under teachers/, priors/ and tmp/ of a data folder."""
    return [
        p for sub in ("teachers", "priors", "tmp") for p in (data / sub).rglob("*") if p.is_file()
    ]


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
