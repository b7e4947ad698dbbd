"""Prometheus metrics: requests, latencies, job durations, bytes stored; and the
ASGI middleware that counts requests."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "MetricsMiddleware"]


class Metrics:
    def __init__(self, bytes_stored) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "planner_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "planner_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.jobs = Histogram(
            "planner_job_seconds",
            "prior computation time",
            ["status"],
            buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
            registry=self.registry,
        )
        self.stored = Gauge(
            "planner_bytes_stored", "bytes of arrays stored", registry=self.registry
        )
        self.stored.set_function(bytes_stored)

    def observe_job(self, status: str, seconds: float) -> None:
        self.jobs.labels(status).observe(seconds)


class MetricsMiddleware:
    """Counts and times requests by route template."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._count(scope, status["code"], t0)

    def _count(self, scope, status: int, t0: float) -> None:
        route = scope.get("route")
        name = getattr(route, "path", "unmatched")
        self.metrics.requests.labels(scope["method"], name, str(status)).inc()
        self.metrics.latency.labels(scope["method"], name).observe(time.perf_counter() - t0)
