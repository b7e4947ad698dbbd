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
from .problems import Problem, problem_from_planner_error
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
    #: parts received whole, their objects not yet committed: every part of an upload
    #: becomes visible at the end of the body, or none does
    complete: list = []
    state: dict = {"headers": {}, "hf": b"", "hv": b"", "name": None, "cm": None, "fh": None}

    def on_part_begin():
        state["parts"] = state.get("parts", 0) + 1
        if state["parts"] > max_parts:
            raise Problem(
                413,
                "too-large",
                "Too many parts",
                f"an upload has at most {max_parts} parts (PLANNER_MAX_PARTS)",
                field="body",
            )
        state.update(headers={}, hf=b"", hv=b"", name=None, cm=None, fh=None, buf=None, h=None)

    def on_header_field(data, start, end):
        state["hf"] += data[start:end]
        _bounded_header(state["hf"])

    def on_header_value(data, start, end):
        state["hv"] += data[start:end]
        _bounded_header(state["hv"])

    def on_header_end():
        state["headers"][state["hf"].decode("latin-1").lower()] = state["hv"]
        state["hf"], state["hv"] = b"", b""

    def on_headers_finished():
        _, disp = parse_options_header(state["headers"].get("content-disposition", b""))
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
        state["name"] = name
        if b"filename" in disp:
            if name == "spec":
                raise Problem(
                    422,
                    "invalid-request",
                    "Invalid request",
                    "'spec' is a form field (JSON text), not a file part",
                    field="spec",
                )
            key = f"{up.prefix}/upload/{name}"
            state["cm"] = storage.writer(key)
            state["fh"] = state["cm"].__enter__()
            state["h"] = hashlib.sha256()
            up.files[name] = key
        else:
            state["buf"] = bytearray()

    def on_part_data(data, start, end):
        if state["fh"] is not None:
            chunk = data[start:end]
            state["fh"].write(chunk)
            state["h"].update(chunk)
        else:
            state["buf"] += data[start:end]
            held = len(state["buf"]) + sum(len(v) for v in up.fields.values())
            if held > max_fields:
                raise Problem(
                    413,
                    "too-large",
                    "Too large",
                    f"form fields hold more than {max_fields} bytes all together "
                    "(PLANNER_MAX_FORM_BYTES); arrays go in file parts",
                    field=state["name"],
                )

    def on_part_end():
        if state["fh"] is not None:  # the part is complete: committed with the others
            complete.append(state["cm"])
            state["cm"], state["fh"] = None, None
            up.sha256[state["name"]] = state["h"].hexdigest()
        else:
            up.fields[state["name"]] = bytes(state["buf"])

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
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
        if state.get("cm") is not None:
            raise _malformed(f"the body ends inside part {state['name']!r}")
        await asyncio.to_thread(_commit, complete)
    except BaseException as exc:
        unfinished = [*complete, *([state["cm"]] if state.get("cm") is not None else [])]
        for cm in unfinished:  # abort every object not yet committed
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
        loc = ".".join(str(p) for p in ("spec", *e["loc"]))
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
