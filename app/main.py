"""The FastAPI application: ``uvicorn app.main:app``.

:func:`create_app` builds an app from :class:`~app.settings.Settings`; the
module attribute ``app`` is built on first access from the environment.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from . import openapi, problems
from .api.routes import health, plans, priors, structures, teachers, ui
from .jobs import runner_for
from .limits import LimitsMiddleware
from .metrics import Metrics, MetricsMiddleware
from .settings import Settings
from .storage import Storage
from .store import Store

__all__ = ["create_app"]

VERSION = "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.scratch.mkdir(parents=True, exist_ok=True)
    storage = Storage(
        settings.storage, cache_dir=settings.scratch / "cache", cache_bytes=settings.cache_bytes
    )
    store = Store(settings.database, storage)  # migrates the schema (once across replicas)
    metrics = Metrics(store.bytes_stored)
    jobs = runner_for(settings, store, metrics.observe_job)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await jobs.start()
        try:
            yield
        finally:
            await jobs.shutdown()
            await asyncio.to_thread(store.close)

    app = FastAPIOffline(  # /docs and /redoc from packaged files: no CDN, no internet
        title="alignment-planner",
        version=VERSION,
        summary="Structure alignment of teacher posteriors for Bayesian distillation.",
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # operationId = function name
    )
    app.state.settings, app.state.store = settings, store
    app.state.jobs, app.state.metrics = jobs, metrics
    problems.install(app)
    openapi.install(app)
    app.add_middleware(LimitsMiddleware, settings=settings)  # inner: after the count
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    for r in (health, teachers, structures, plans, priors, ui):
        app.include_router(r.router)
    return app


def __getattr__(name: str):
    if name == "app":
        logging.basicConfig(level=logging.INFO)
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(name)
