"""Validating an upload and adopting it as a teacher: a job, run where the executor puts it.

The API streams the multipart parts into storage (``teachers/<id>/upload/``)
and hands this job a :class:`Staged` upload; the job reads the parts (their own
files for a local folder; from S3, copies in the worker's cache, which later
jobs on that worker reuse), validates them (docs/theory.md §7, §8), adopts every part
that is already the final float64 array where it lies (the record names its
key: nothing is copied), writes the other arrays under ``teachers/<id>/`` and
returns the record, which the API inserts: a teacher exists once its row does.
Nothing a client sent is ever unpickled; large dense matrices are validated in
disk-backed memory maps in the job's scratch space.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from planner import FORMATS, InvalidPosterior, PlannerError
from planner.posterior import asymmetry_report

from .arrays import ZIP_MAGIC, extract_npz, extract_safetensors, magic, open_npy, sha256_file
from .compute import Config, cores, scratch, store_for, structure_from_json, workspace_prefix
from .problems import Problem, problem_from_planner_error
from .store import Store, TeacherRecord

__all__ = ["DENSE", "DISK_WORKSPACE_FROM", "Staged", "ingest"]

#: Formats whose arrays include a dense p × p matrix.
DENSE = {"full", "precision"}
#: From this size on, validating a dense matrix works in disk-backed memory maps.
DISK_WORKSPACE_FROM = 512 * 2**20


@dataclass(frozen=True)
class Staged:
    """An upload in storage, what the API hands to :func:`ingest` (plain data)."""

    teacher_id: str
    prefix: str  # teachers/<id>
    files: dict[str, str]  # part name -> key
    sha256: dict[str, str]  # part name -> sha256 of the part as received
    name: str
    owner: str
    structure: dict  # the validated structure, in its JSON form
    format: str
    max_bytes: int
    #: most rows of a gradients array
    max_gradient_examples: int = 100_000


def ingest(config: Config, staged: Staged) -> dict:
    """Validate a staged upload and write the teacher's arrays; the record as a dict.
    Raises a 4xx :class:`~app.problems.Problem` for anything the client got wrong, and
    then nothing of the upload is left in storage."""
    store = store_for(config)
    st = store.storage
    try:
        with tempfile.TemporaryDirectory(dir=scratch(config), prefix=workspace_prefix()) as tmp:
            rec = _ingest(store, staged, Path(tmp))
    except BaseException:
        st.delete(staged.prefix)
        for key in staged.files.values():
            st.forget(key)
        raise
    adopted = {a.get("key") for a in rec.arrays.values()}
    for key in staged.files.values():  # parts not adopted as arrays: archives, conversions
        if key not in adopted:
            st.delete(key)
            st.forget(key)
    return asdict(rec)


def _ingest(store: Store, up: Staged, tmp: Path) -> TeacherRecord:
    st = store.storage
    structure = structure_from_json(up.structure)
    fmt = up.format
    local = {name: st.local_file(key) for name, key in up.files.items()}
    origin = {path.resolve(): name for name, path in local.items()}  # file -> staged part
    cls = FORMATS[fmt]
    allowed = {*cls.names(structure), "gradients"}

    def most(name: str) -> int | None:
        if name == "gradients":
            return up.max_gradient_examples * structure.n_params
        return _max_elements(structure, name)

    if "archive" in local:
        if len(local) > 1:
            raise Problem(
                422,
                "invalid-request",
                "Invalid request",
                "send either one 'archive' or one .npy part per array, not both",
                field="archive",
            )
        path = local.pop("archive")
        if magic(path).startswith(ZIP_MAGIC):
            local = extract_npz(path, tmp, "archive", up.max_bytes, most, allowed)
        else:
            local = extract_safetensors(path, tmp, "archive", most, allowed)
    for name in local:
        if name not in allowed:
            raise Problem(
                422,
                "invalid-posterior",
                "Invalid posterior",
                f"unexpected array {name!r} for format {fmt!r}; expected {sorted(allowed)}",
                field=name,
            )
    arrays = {name: open_npy(path, name) for name, path in local.items()}
    p = structure.n_params
    scratch = iter(range(1 << 30))

    def workspace(shape):  # validation's large arrays live on disk, in the job's scratch
        path = tmp / f"workspace-{next(scratch)}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=shape)

    dense = fmt in DENSE and 8 * p * p >= DISK_WORKSPACE_FROM
    try:
        with (
            threadpool_limits(cores() if fmt in DENSE else 1),  # the Cholesky factorisation
            asymmetry_report() as asymmetry,
        ):
            post = cls.from_arrays(structure, arrays, workspace if dense else None)
        grads = arrays.get("gradients")
        if grads is not None and (grads.ndim != 2 or grads.shape[1] != p):
            raise InvalidPosterior(
                f"must have shape (examples, {p}); got {grads.shape}", field="gradients"
            )
        if grads is not None and grads.shape[0] > up.max_gradient_examples:
            raise InvalidPosterior(
                f"has {grads.shape[0]} examples; this service takes at most "
                f"{up.max_gradient_examples} (PLANNER_MAX_GRADIENT_EXAMPLES)",
                field="gradients",
            )
        if grads is not None and not np.isfinite(grads).all():
            raise InvalidPosterior("contains NaN or infinite values", field="gradients")
    except PlannerError as exc:
        raise problem_from_planner_error(exc) from None
    out = post.to_arrays()
    if grads is not None:
        out["gradients"] = grads
    derived = post.derived_arrays()  # e.g. a precision's Cholesky factor: kept, not listed
    out.update(derived)
    tid, infos = up.teacher_id, {}
    for name, arr in out.items():
        shape = list(arr.shape)
        own = _own_file(arr)
        part = origin.get(own.resolve()) if own is not None else None
        if own is not None and part is not None:  # a float64 part as uploaded: adopt it
            del arr
            info = {"key": up.files[part], "sha256": up.sha256.get(part) or sha256_file(own)}
            info["bytes"] = own.stat().st_size
        elif own is not None:  # an extracted member, already float64: upload the file
            del arr
            key = store.teacher_key(tid, name)
            info = {"key": key, "sha256": sha256_file(own), "bytes": st.put_file(own, key)}
        else:
            key = store.teacher_key(tid, name)
            sha, size = st.put_npy(key, arr, np.float64)
            info = {"key": key, "sha256": sha, "bytes": size}
        infos[name] = {"shape": shape, "dtype": "float64", **info}
        if name in asymmetry:  # measured before symmetrising (docs/theory.md §8)
            infos[name]["asymmetry"] = asymmetry[name]
        if name in derived:
            infos[name]["derived"] = True
    return TeacherRecord(tid, up.owner, up.name, up.structure, fmt, infos, time.time())


def _max_elements(structure, name: str) -> int | None:
    """The most elements an array of this name can have for this structure (an upper
    bound for every format; the exact shapes are checked when the posterior is built)."""
    p = structure.n_params
    if name in ("mean", "variance"):
        return p
    if name in ("covariance", "precision", "factor"):  # a factor has at most p columns
        return p * p
    m = re.fullmatch(r"(row|col|bias)(\d+)", name)
    if m and 2 <= int(m.group(2)) <= structure.T:
        t = int(m.group(2))
        n = structure.width(t - 1 if m.group(1) == "col" else t)
        return n * n
    return None  # gradients: bounded by the upload size; unknown names are refused later


def _own_file(a: np.ndarray) -> Path | None:
    """The ``.npy`` file behind ``a`` when ``a`` is all of a float64 C-ordered memory map
    of it (views made by ``np.asarray`` included)."""
    if a.dtype != np.float64 or not a.flags.c_contiguous:
        return None
    m = a
    while m is not None and not isinstance(m, np.memmap):
        m = getattr(m, "base", None)
    if m is None or not m.filename:
        return None
    same_data = a.__array_interface__["data"][0] == m.__array_interface__["data"][0]
    return Path(m.filename) if same_data and m.shape == a.shape else None
