"""Limits applied before a route runs: authentication before any body is read, body
sizes per route (whatever the content type says), how long a client may stall
between two chunks of its body, and how many requests one replica serves at once.

A pure ASGI middleware (no body is buffered beyond what a route may receive):

* **authentication first**: with API keys on, a request to ``/v1/`` without a valid
  key is answered 401 before a byte of its body is read;
* **size**: the upload route (``POST /v1/teachers``) may stream up to
  ``PLANNER_MAX_UPLOAD_BYTES``; every other route's body is at most
  ``PLANNER_MAX_JSON_BYTES``, declared (``Content-Length``, checked before reading)
  or chunked (counted as it arrives, and answered 413 as soon as it is over);
* **stalls**: each chunk of a body must arrive within ``PLANNER_BODY_TIMEOUT``
  seconds of the one before (408 otherwise);
* **concurrency**: past ``PLANNER_MAX_CONNECTIONS`` requests in progress, 503 with
  ``Retry-After``.

Request *headers* are bounded by the server (``app.server``): a connection
whose headers do not arrive whole within a timeout is closed.
"""

from __future__ import annotations

import asyncio

from .auth import owner_of
from .problems import Problem
from .settings import Settings

__all__ = ["UPLOAD_ROUTE", "LimitsMiddleware"]

#: The one route whose body may be large: (method, path).
UPLOAD_ROUTE = ("POST", "/v1/teachers")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _too_large(limit: int) -> Problem:
    return Problem(
        413,
        "too-large",
        "Request too large",
        f"this route's request bodies are limited to {limit} bytes",
        field="body",
    )


class BodyTimeout(Exception):
    """A client stalled in the middle of its body."""


class LimitsMiddleware:
    def __init__(self, app, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.settings
        if self.active >= s.max_connections:
            return await self._answer(
                Problem(
                    503,
                    "busy",
                    "Service busy",
                    f"this replica is serving {s.max_connections} requests "
                    "(PLANNER_MAX_CONNECTIONS); retry shortly",
                    headers={"Retry-After": "1"},
                ),
                scope,
                receive,
                send,
            )
        self.active += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            self.active -= 1

    async def _limited(self, scope, receive, send):
        s = self.settings
        method, path = scope["method"], scope["path"]
        headers = dict(scope.get("headers") or [])
        if s.keys and path.startswith("/v1/"):
            try:
                owner_of(headers.get(b"authorization", b"").decode("latin-1"), s.keys)
            except Problem as exc:
                return await self._answer(exc, scope, receive, send)
        if method not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        upload = (method, path.rstrip("/")) == UPLOAD_ROUTE
        limit = s.max_upload_bytes if upload else s.max_json_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await self._answer(_too_large(limit), scope, receive, send)
        if upload:  # streamed by the route, which counts and bounds it too
            return await self.app(scope, self._timed(receive), send)
        # a small body: read it here, bounded, then hand it to the route whole
        body = bytearray()
        timed = self._timed(receive)
        try:
            while True:
                message = await timed()
                if message["type"] != "http.request":
                    return await self.app(scope, _replay(bytes(body), message), send)
                body += message.get("body", b"")
                if len(body) > limit:
                    return await self._answer(_too_large(limit), scope, receive, send)
                if not message.get("more_body", False):
                    break
        except Problem as exc:
            return await self._answer(exc, scope, receive, send)
        await self.app(scope, _replay(bytes(body), None, receive), send)

    def _timed(self, receive):
        seconds = self.settings.body_timeout

        async def timed():
            try:
                return await asyncio.wait_for(receive(), seconds)
            except TimeoutError:
                raise Problem(
                    408,
                    "request-timeout",
                    "Request timeout",
                    f"no part of the request body arrived for {seconds:g} s (PLANNER_BODY_TIMEOUT)",
                    field="body",
                    headers={"Connection": "close"},
                ) from None

        return timed

    @staticmethod
    async def _answer(problem: Problem, scope, receive, send) -> None:
        await problem.response()(scope, receive, send)


def _replay(body: bytes, final, receive=None):
    """A ``receive`` that gives the body read already, then what the client sends next
    (a disconnect), or ``final`` if the body ended with it."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            if final is not None:
                return final
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay
