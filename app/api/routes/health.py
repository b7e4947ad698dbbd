"""Liveness, readiness and metrics: always open, no authentication."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request):
    """Ready when the database, the storage and the executor answer (and, scaled out, at
    least one worker is connected to the scheduler)."""
    state = request.app.state
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
    body = generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)
