"""Serving objects from storage over HTTP, with Range (so broken downloads resume).

One path for every storage: the object is opened (a local file) or its size read
(S3) *before* the response starts, so an object deleted meanwhile is a 404
problem, never a 200 that ends short; a local file stays readable through its
open descriptor even if it is deleted while it streams.  Remote objects are
streamed by ranged reads, a block at a time off the event loop: nothing is
copied to the replica's disk or held whole in memory.  Range errors are
problems like every other error.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from .problems import Problem
from .storage import BLOCK, Storage

__all__ = ["BinaryResponse", "serve"]


class BinaryResponse(Response):
    """What the array and archive routes declare: bytes, never JSON (so clients generated
    from the OpenAPI document return the body as a file)."""

    media_type = "application/octet-stream"


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _reader(storage: Storage, key: str, filename: str) -> tuple[int, Callable, Callable]:
    """(size, read(start, end), close) of an object, opened now."""
    path = storage.local_path(key)
    if path is not None:
        try:  # a file object: closed when collected, even if the body is never sent
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the stream
        except FileNotFoundError:
            raise Problem.not_found("object", filename) from None
        fd = f.fileno()
        return os.fstat(fd).st_size, lambda a, b: os.pread(fd, b - a, a), f.close
    size = storage.size(key)
    if size is None:
        raise Problem.not_found("object", filename)
    return size, lambda a, b: storage.read_range(key, a, b), lambda: None


def _span(spec: str | None, size: int) -> tuple[int, int] | None:
    """The byte range a ``Range`` header asks for (end exclusive), or None for all."""
    if not spec:
        return None
    m = _RANGE.match(spec.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        raise Problem(
            416,
            "range-not-satisfiable",
            "Range not satisfiable",
            f"Range must be one 'bytes=start-end', 'bytes=start-' or 'bytes=-suffix'; got "
            f"{spec[:80]!r}",
            field="range",
            headers={"Content-Range": f"bytes */{size}"},
        )
    if m.group(1):
        start = int(m.group(1))
        end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    else:  # a suffix: the last n bytes
        start = max(0, size - int(m.group(2)))
        end = size
    if start >= size or start >= end:
        raise _unsatisfiable(size)
    return start, end


async def serve(
    request: Request, storage: Storage, key: str, filename: str, etag: str | None = None
) -> Response:
    headers = {"ETag": f'"{etag}"'} if etag else {}
    size, read, close = _reader(storage, key, filename)
    try:
        span = _span(request.headers.get("range"), size)
    except BaseException:
        close()
        raise
    start, end = span or (0, size)
    status = 206 if span else 200
    if span:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    headers["Accept-Ranges"] = "bytes"
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'

    def chunks() -> Iterator[bytes]:
        try:
            pos = start
            while pos < end:
                stop = min(pos + BLOCK, end)
                block = read(pos, stop)
                if not block:
                    raise OSError(f"{filename} ended at byte {pos} of {end}")
                yield block
                pos += len(block)
        finally:
            with contextlib.suppress(OSError):
                close()

    return StreamingResponse(
        iterate_in_threadpool(chunks()),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )


def _unsatisfiable(size: int) -> Problem:
    return Problem(
        416,
        "range-not-satisfiable",
        "Range not satisfiable",
        f"the object has {size} bytes",
        field="range",
        headers={"Content-Range": f"bytes */{size}"},
    )
