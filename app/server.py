"""Serving the app: uvicorn with the service's connection limits.

``python -m app.server [--host H] [--port P]`` (what ``make run``, the CLI's
``serve``, the Dockerfile and the tests use) runs :func:`app.main.create_app`
under uvicorn with :class:`Protocol`, uvicorn's HTTP/1.1 protocol plus two
bounds uvicorn does not have:

* **header timeout** (``PLANNER_HEADER_TIMEOUT``, 10 s): a connection whose
  request line and headers have not arrived whole that long after they began is
  answered 408 and closed (a slow client, or one that sends half a request and
  waits, holds nothing for long); idle keep-alive connections are closed by
  uvicorn's own ``timeout_keep_alive`` (5 s);
* **connections per client** (``PLANNER_MAX_CLIENT_CONNECTIONS``, 128): one
  address may hold at most that many connections; more are answered 503 and
  closed, so one client cannot use up the process's file descriptors.

Bodies are bounded by :mod:`app.limits` (sizes, a timeout between chunks,
requests in progress).  The open-file limit is raised to the hard limit at start.
Behind a reverse proxy, its own timeouts (nginx: ``client_header_timeout``,
``client_body_timeout``, ``limit_conn``) do the same work at the edge.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
from collections import Counter
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import Settings

__all__ = ["Protocol", "main", "serve"]

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def _raw(template: bytes, status: int, slug: str, detail: str) -> bytes:
    body = json.dumps(
        {
            "type": f"urn:alignment-planner:problem:{slug}",
            "title": slug.replace("-", " ").capitalize(),
            "status": status,
            "detail": detail,
        }
    ).encode()
    return template % (len(body), body)


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a per-client connection cap."""

    header_timeout: float = 10.0
    max_per_client: int = 128
    _per_client: ClassVar[Counter] = Counter()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._who = self.client[0] if self.client else None
        self._per_client[self._who] += 1
        if self._who is not None and self._per_client[self._who] > self.max_per_client:
            detail = (
                f"this address holds {self.max_per_client} connections already "
                "(PLANNER_MAX_CLIENT_CONNECTIONS)"
            )
            transport.write(_raw(_BUSY_503, 503, "busy", detail))
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._per_client[self._who] -= 1
        if self._per_client[self._who] <= 0:
            del self._per_client[self._who]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request line or headers still to come
            if self._header_timer is None:
                self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # an idle keep-alive connection is uvicorn's timeout's business

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            detail = f"the request headers did not arrive within {self.header_timeout:g} s"
            with contextlib.suppress(Exception):
                self.transport.write(_raw(_TIMEOUT_408, 408, "request-timeout", detail))
        self.transport.close()


def _raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the service from ``PLANNER_*`` settings until interrupted."""
    import uvicorn

    settings = Settings()
    Protocol.header_timeout = settings.header_timeout
    Protocol.max_per_client = settings.max_client_connections
    _raise_open_files()
    uvicorn.run(
        "app.main:app",
        host=host,
        port=port,
        http=Protocol,
        timeout_keep_alive=5,
        log_level=log_level,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m app.server", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    serve(args.host, args.port, args.log_level)


if __name__ == "__main__":
    main()
