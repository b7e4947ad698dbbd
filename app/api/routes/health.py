"""Liveness, readiness and metrics.  Liveness and readiness are always open; metrics
need the operator's key when API keys are on."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...auth import bearer_key, unauthorized

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Ready when the database, the storage and the executor answer (and, scaled out, at
    least one worker is connected to the scheduler).  A broken pool is replaced first:
    not ready only while no pool can be had."""
    state = request.app.state
    with contextlib.suppress(Exception):
        await state.jobs.heal()
    return await asyncio.to_thread(_ready, state)


def _ready(state):
    checks = {"database": True, "storage": True, "jobs": state.jobs.alive()}
    try:
        state.store.ping()
    except Exception:
        checks["database"] = False
    try:
        state.store.storage.ping()
    except Exception:
        checks["storage"] = False
    workers = getattr(state.jobs, "workers", None)
    if workers is not None:
        checks["workers"] = workers()
        checks["jobs"] = checks["jobs"] and checks["workers"] > 0
    ok = all(bool(v) for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, 200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request):
    """Prometheus metrics.  They are summed over tenants: with API keys on, only the
    operator's ``PLANNER_METRICS_KEY`` reads them."""
    settings = request.app.state.settings
    if settings.keys:  # no metrics key set: /metrics is closed
        keys = frozenset({settings.metrics_key} - {""})
        if bearer_key(request.headers.get("authorization", ""), keys) is None:
            raise unauthorized()
    body = generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)
