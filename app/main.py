"""The FastAPI application: ``uvicorn app.main:app``.

:func:`create_app` builds an app from :class:`~app.settings.Settings`; the
module attribute ``app`` is built on first access from the environment.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import problems
from .api.routes import health, plans, priors, structures, teachers
from .jobs import JobRunner
from .metrics import Metrics, MetricsMiddleware
from .settings import Settings
from .store import LocalStore

__all__ = ["create_app"]

VERSION = "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    store = LocalStore(settings.data_dir)
    store.sweep()
    metrics = Metrics(store.bytes_stored)
    jobs = JobRunner(settings, store, metrics.observe_job)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        jobs.start()
        try:
            yield
        finally:
            jobs.shutdown()

    app = FastAPI(
        title="alignment-planner",
        version=VERSION,
        summary="Structure alignment of teacher posteriors for Bayesian distillation.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.store = settings, store
    app.state.jobs, app.state.metrics = jobs, metrics
    problems.install(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics, max_json_bytes=settings.max_json_bytes)
    for r in (health, teachers, structures, plans, priors):
        app.include_router(r.router)
    return app


def __getattr__(name: str):
    if name == "app":
        logging.basicConfig(level=logging.INFO)
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(name)
