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
    state = request.app.state
    checks = {"store": True, "jobs": state.jobs.alive()}
    try:
        state.store.teachers("__readyz__")
    except Exception:
        checks["store"] = False
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, 200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request):
    body = generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)
