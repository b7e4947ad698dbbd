"""Teacher uploads: multipart streamed to disk, then validated and adopted whole.

The body is parsed as it arrives (python-multipart's streaming parser), each
file part written straight into a private temporary folder of the store and
hashed on the way; nothing is held whole in memory and nothing survives a
failure.  Files are fsynced when they are adopted, so the disk's write-back
overlaps with validation instead of stalling the stream.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from planner import FORMATS, InvalidPosterior, PlannerError

from .arrays import (
    NAME,
    ZIP_MAGIC,
    extract_npz,
    extract_safetensors,
    fsync_path,
    magic,
    open_npy,
    sha256_file,
    write_npy,
)
from .problems import Problem, problem_from_planner_error
from .schemas import TeacherSpec, structure_json
from .settings import Settings
from .store import Store, TeacherRecord, new_id

__all__ = ["Upload", "ingest_teacher", "receive_multipart"]

_MAX_FIELD = 1 << 20
#: Formats whose arrays include a dense p × p matrix.
DENSE = {"full", "precision"}
#: From this size on, validating a dense matrix works in disk-backed memory maps.
DISK_WORKSPACE_FROM = 512 * 2**20


@dataclass
class Upload:
    fields: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # of each file part, as received
    bytes: int = 0


def _too_large(limit: int) -> Problem:
    return Problem(
        413, "too-large", "Request too large", f"the upload exceeds {limit} bytes", field="body"
    )


async def receive_multipart(request: Request, folder: Path, limit: int) -> Upload:
    """Stream a ``multipart/form-data`` body: fields into memory (small), files to ``folder``."""
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
    up = Upload()
    state: dict = {
        "headers": {},
        "hf": b"",
        "hv": b"",
        "name": None,
        "fh": None,
        "buf": None,
        "h": None,
    }

    def on_part_begin():
        state.update(headers={}, hf=b"", hv=b"", name=None, fh=None, buf=None, h=None)

    def on_header_field(data, start, end):
        state["hf"] += data[start:end]

    def on_header_value(data, start, end):
        state["hv"] += data[start:end]

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
            path = folder / f"{name}.upload"
            state["fh"] = open(path, "wb")  # noqa: SIM115 - closed at part end
            state["h"] = hashlib.sha256()
            up.files[name] = path
        else:
            state["buf"] = bytearray()

    def on_part_data(data, start, end):
        if state["fh"] is not None:
            chunk = data[start:end]
            state["fh"].write(chunk)
            state["h"].update(chunk)
        else:
            state["buf"] += data[start:end]
            if len(state["buf"]) > _MAX_FIELD:
                raise Problem(
                    413,
                    "too-large",
                    "Too large",
                    f"field {state['name']!r} exceeds 1 MiB",
                    field=state["name"],
                )

    def on_part_end():
        if state["fh"] is not None:  # fsynced when adopted: only kept files need it
            state["fh"].close()
            state["fh"] = None
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
        async for chunk in request.stream():
            up.bytes += len(chunk)
            if up.bytes > limit:
                raise _too_large(limit)
            parser.write(chunk)
        parser.finalize()
    finally:
        if state["fh"] is not None:
            state["fh"].close()
    return up


def _spec(up: Upload) -> TeacherSpec:
    raw = up.fields.get("spec")
    if raw is None:
        if "spec" in up.files:
            raw = up.files["spec"].read_bytes()[:_MAX_FIELD]
        else:
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


def _own_file(a: np.ndarray, folder: Path) -> Path | None:
    """The file behind ``a`` when it is a float64 C-ordered memory map inside ``folder``."""
    if not isinstance(a, np.memmap) or a.dtype != np.float64 or not a.flags.c_contiguous:
        return None
    path = Path(a.filename) if a.filename else None
    if path is None or path.parent.resolve() != folder.resolve():
        return None
    # a view of the whole file, not of a part of it
    header = np.load(path, mmap_mode="r", allow_pickle=False)
    return path if header.shape == a.shape else None


def ingest_teacher(store: Store, settings: Settings, owner: str, up: Upload, folder: Path):
    """Validate an upload (SPEC §7, §8) and adopt it as a teacher; 4xx problems otherwise."""
    spec = _spec(up)
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
    files = dict(up.files)
    if "archive" in files:
        if len(files) > 1:
            raise Problem(
                422,
                "invalid-request",
                "Invalid request",
                "send either one 'archive' or one .npy part per array, not both",
                field="archive",
            )
        path = files.pop("archive")
        if magic(path).startswith(ZIP_MAGIC):
            files = extract_npz(path, folder, "archive", settings.max_upload_bytes)
        else:
            files = extract_safetensors(path, folder, "archive")
        path.unlink()
    cls = FORMATS[fmt]
    allowed = {*cls.names(structure), "gradients"}
    for name in files:
        if name not in allowed:
            raise Problem(
                422,
                "invalid-posterior",
                "Invalid posterior",
                f"unexpected array {name!r} for format {fmt!r}; expected {sorted(allowed)}",
                field=name,
            )
    arrays = {name: open_npy(path, name) for name, path in files.items()}
    scratch = iter(range(1 << 30))

    def workspace(shape):  # validation's large arrays live on disk, beside the upload
        path = folder / f"workspace-{next(scratch)}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=shape)

    dense = fmt in DENSE and 8 * p * p >= DISK_WORKSPACE_FROM
    try:
        post = cls.from_arrays(structure, arrays, workspace if dense else None)
        grads = arrays.get("gradients")
        if grads is not None and (grads.ndim != 2 or grads.shape[1] != p):
            raise InvalidPosterior(
                f"must have shape (examples, {p}); got {grads.shape}", field="gradients"
            )
        if grads is not None and not np.isfinite(grads).all():
            raise InvalidPosterior("contains NaN or infinite values", field="gradients")
    except PlannerError as exc:
        raise problem_from_planner_error(exc) from None
    final = folder / "final"
    final.mkdir()
    infos = {}
    out = post.to_arrays()
    if grads is not None:
        out["gradients"] = grads
    derived = post.derived_arrays()  # e.g. a precision's Cholesky factor: kept, not listed
    out.update(derived)
    hashes = {Path(files[n]).resolve(): up.sha256[n] for n in files if n in up.sha256}
    for name, arr in out.items():
        dst = final / f"{name}.npy"
        shape = list(arr.shape)
        src = _own_file(arr, folder)
        if src is not None:  # float64 and already in our folder: adopt the file as it is
            del arr
            sha = hashes.get(src.resolve()) or sha256_file(src)
            fsync_path(src)
            src.rename(dst)
            size = dst.stat().st_size
        else:
            sha, size = write_npy(dst, arr, np.float64)
        infos[name] = {"shape": shape, "dtype": "float64", "bytes": size, "sha256": sha}
        if name in derived:
            infos[name]["derived"] = True
    rec = TeacherRecord(
        new_id("t"), owner, spec.name, structure_json(structure), fmt, infos, time.time()
    )
    store.add_teacher(rec, final)
    return rec
