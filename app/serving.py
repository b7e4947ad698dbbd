"""Serving objects from storage over HTTP, with Range (so broken downloads resume).

A local object is the file itself (Starlette's ``FileResponse`` does Range);
a remote one (S3) is streamed by ranged reads, a block at a time off the event
loop: nothing is copied to the replica's disk or held whole in memory.
"""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from .problems import Problem
from .storage import BLOCK, Storage

__all__ = ["serve"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


async def serve(
    request: Request, storage: Storage, key: str, filename: str, etag: str | None = None
) -> Response:
    headers = {"ETag": f'"{etag}"'} if etag else {}
    path = storage.local_path(key)
    if path is not None:
        return FileResponse(
            path, media_type="application/octet-stream", filename=filename, headers=headers
        )
    size = storage.size(key)
    if size is None:
        raise Problem.not_found("object", filename)
    start, end, status = 0, size, 200
    spec = request.headers.get("range")
    if spec:
        m = _RANGE.match(spec.strip())
        if m is None or (not m.group(1) and not m.group(2)):
            raise _unsatisfiable(size)
        if m.group(1):
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
        else:  # a suffix: the last n bytes
            start = max(0, size - int(m.group(2)))
        if start >= size or start >= end:
            raise _unsatisfiable(size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    headers["Accept-Ranges"] = "bytes"
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'

    def chunks():
        pos = start
        while pos < end:
            stop = min(pos + BLOCK, end)
            yield storage.read_range(key, pos, stop)
            pos = stop

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
