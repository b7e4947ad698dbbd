"""Teacher uploads, the HTTP side: multipart streamed into storage, then validated by a job.

The body is parsed as it arrives (python-multipart's streaming parser) and each
file part is written straight into storage under ``teachers/<new id>/upload/``
(a local folder, or an S3 multipart upload), hashed on the way: nothing is held whole
in memory, nothing lands on this replica's disk when storage is S3, and the
parts become visible together once the whole body is received (a body cut
short, or a replica killed mid-upload, leaves nothing listed).  The spec is checked here, before any
work; validation and adoption run as a job (:func:`app.ingest.ingest`), which
adopts the parts that are already the final arrays where they lie (no copy),
writes the others, and then the row is inserted.  A teacher prefix that no row
owns once its request is over (a killed replica) is swept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field

from pydantic import ValidationError
from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from planner import FORMATS, PlannerError

from .arrays import NAME
from .ingest import DENSE, Staged
from .problems import Problem, field_name, problem_from_planner_error
from .schemas import TeacherSpec, structure_json
from .settings import Settings
from .storage import Storage
from .store import new_id

__all__ = ["Upload", "receive_multipart", "staged_upload"]

_MAX_FIELD = 1 << 20
#: Bytes gathered before the parser (and the storage writes it makes) runs off the loop.
_HANDOFF = 1 << 20


@dataclass
class Upload:
    teacher_id: str
    prefix: str
    fields: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # part name -> storage key
    sha256: dict[str, str] = field(default_factory=dict)  # of each file part, as received
    bytes: int = 0


#: Bytes one part header's name or value may have.
_MAX_HEADER = 8192


def _bounded_header(b: bytes) -> None:
    if len(b) > _MAX_HEADER:
        raise _malformed(f"a part header is longer than {_MAX_HEADER} bytes")


def _too_large(limit: int) -> Problem:
    return Problem(
        413, "too-large", "Request too large", f"the upload exceeds {limit} bytes", field="body"
    )


def _malformed(detail: str) -> Problem:
    return Problem(400, "malformed-body", "Malformed multipart body", detail, field="body")


class _Parts:
    """The multipart parser's callbacks for one upload: each file part streams into a
    storage object (hashed on the way) that is committed with the others once the body
    is whole; form fields are kept in memory, bounded in total."""

    def __init__(self, up: Upload, storage: Storage, max_parts: int, max_fields: int) -> None:
        self.up, self.storage = up, storage
        self.max_parts, self.max_fields = max_parts, max_fields
        self.parts = 0
        #: parts received whole, their objects not yet committed: every part of an upload
        #: becomes visible at the end of the body, or none does
        self.complete: list = []
        self._start()

    def _start(self) -> None:
        self.headers: dict[str, bytes] = {}
        self.field, self.value = b"", b""
        self.name: str | None = None
        self.writer = None  # the open storage object of the current file part
        self.fh = None
        self.hash = None
        self.buf: bytearray | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise Problem(
                413,
                "too-large",
                "Too many parts",
                f"an upload has at most {self.max_parts} parts (PLANNER_MAX_PARTS)",
                field="body",
            )
        self._start()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]
        _bounded_header(self.field)

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]
        _bounded_header(self.value)

    def header_end(self) -> None:
        self.headers[self.field.decode("latin-1").lower()] = self.value
        self.field, self.value = b"", b""

    def headers_finished(self) -> None:
        up = self.up
        _, disp = parse_options_header(self.headers.get("content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if not NAME.match(name):
            raise Problem(
                422,
                "invalid-request",
                "Invalid request",
                f"part name {name[:80]!r} is not an identifier",
                field="body",
            )
        if name in up.files or name in up.fields:
            raise Problem(
                422, "invalid-request", "Invalid request", f"part {name!r} given twice", field=name
            )
        self.name = name
        if b"filename" not in disp:
            self.buf = bytearray()
            return
        if name == "spec":
            raise Problem(
                422,
                "invalid-request",
                "Invalid request",
                "'spec' is a form field (JSON text), not a file part",
                field="spec",
            )
        key = f"{up.prefix}/upload/{name}"
        self.writer = self.storage.writer(key)
        self.fh = self.writer.__enter__()
        self.hash = hashlib.sha256()
        up.files[name] = key

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.fh is not None:
            chunk = data[start:end]
            self.fh.write(chunk)
            self.hash.update(chunk)
            return
        self.buf += data[start:end]
        held = len(self.buf) + sum(len(v) for v in self.up.fields.values())
        if held > self.max_fields:
            raise Problem(
                413,
                "too-large",
                "Too large",
                f"form fields hold more than {self.max_fields} bytes all together "
                "(PLANNER_MAX_FORM_BYTES); arrays go in file parts",
                field=self.name,
            )

    def part_end(self) -> None:
        if self.fh is not None:  # the part is complete: committed with the others
            self.complete.append(self.writer)
            self.up.sha256[self.name] = self.hash.hexdigest()
            self.writer, self.fh = None, None
        else:
            self.up.fields[self.name] = bytes(self.buf)

    def unfinished(self) -> list:
        """Every storage object not yet committed (to abort when the upload fails)."""
        return [*self.complete, *([self.writer] if self.writer is not None else [])]


async def receive_multipart(
    request: Request,
    storage: Storage,
    limit: int,
    max_parts: int = 64,
    max_fields: int = _MAX_FIELD,
) -> Upload:
    """Stream a ``multipart/form-data`` body: fields into memory (small: ``max_fields``
    bytes all together), file parts into storage under the prefix of a new teacher id
    (removed again when anything fails); at most ``max_parts`` parts."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "a teacher upload is multipart/form-data with a boundary",
            field="content-type",
        )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    tid = new_id("t")
    up = Upload(teacher_id=tid, prefix=f"teachers/{tid}")
    parts = _Parts(up, storage, max_parts, max_fields)
    parser = MultipartParser(boundary, parts.callbacks())
    try:
        pending = bytearray()
        try:
            async for chunk in request.stream():
                up.bytes += len(chunk)
                if up.bytes > limit:
                    raise _too_large(limit)
                pending += chunk
                if len(pending) >= _HANDOFF:
                    await asyncio.to_thread(parser.write, bytes(pending))
                    pending.clear()
            if pending:
                await asyncio.to_thread(parser.write, bytes(pending))
            parser.finalize()
        except ParseError as exc:
            raise _malformed(f"the multipart body does not parse: {exc}") from None
        if parts.writer is not None:
            raise _malformed(f"the body ends inside part {parts.name!r}")
        await asyncio.to_thread(_commit, parts.complete)
    except BaseException as exc:
        for cm in parts.unfinished():  # abort every object not yet committed
            with contextlib.suppress(Exception):
                cm.__exit__(type(exc), exc, exc.__traceback__)
        await asyncio.to_thread(storage.delete, up.prefix)
        raise
    return up


def _commit(writers: list) -> None:
    """Commit the parts' objects in order (each leaves the list once committed)."""
    while writers:
        writers[0].__exit__(None, None, None)
        writers.pop(0)


def _spec(up: Upload, storage: Storage) -> TeacherSpec:
    raw = up.fields.get("spec")
    if raw is None:
        raise Problem(
            422,
            "invalid-request",
            "Invalid request",
            "the form field 'spec' is missing",
            field="spec",
        )
    try:
        return TeacherSpec.model_validate_json(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = field_name(("spec", *e["loc"]))
        raise Problem(
            422, "invalid-request", "Invalid request", f"{loc}: {e['msg']}", field=loc
        ) from None


def staged_upload(up: Upload, storage: Storage, settings: Settings, owner: str) -> Staged:
    """Check what can be checked before any work (the spec, the format, the size limits)
    and describe the staged upload for the ingest job."""
    spec = _spec(up, storage)
    try:
        structure = spec.structure.build()
    except PlannerError as exc:
        raise problem_from_planner_error(exc, "spec.structure") from None
    fmt = spec.posterior.format
    if fmt not in FORMATS:
        raise Problem(
            422,
            "invalid-posterior",
            "Invalid posterior",
            f"unknown posterior format {fmt!r}; known: {sorted(FORMATS)}",
            field="spec.posterior.format",
        )
    p = structure.n_params
    limit = settings.max_dense_params if fmt in DENSE else settings.max_params
    if p > limit:
        raise Problem(
            413,
            "too-large",
            "Teacher too large",
            f"{p} parameters exceed this service's limit of {limit} for format {fmt!r}",
            field="spec.structure",
        )
    return Staged(
        up.teacher_id,
        up.prefix,
        dict(up.files),
        dict(up.sha256),
        spec.name,
        owner,
        structure_json(structure),
        fmt,
        settings.max_upload_bytes,
        settings.max_gradient_examples,
    )
