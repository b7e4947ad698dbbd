"""Files derived from a computed prior on request, built by a job (``app.jobs``).

* ``<name>.float32.npy``: a float32 copy of one array, converted as it streams;
* ``covariance.npy`` of a precision prior: Σ = Λ⁻¹ by the core (one Cholesky,
  one ``potri``);
* ``archive.npz`` / ``archive.safetensors``: every array in one file, the
  student structure in its metadata, written as the arrays stream.

Each is written once under ``priors/<id>/derived/`` and committed whole; the
first request builds it (on a worker when scaled out: nothing passes through
the replica), later ones are served from storage.
"""

from __future__ import annotations

import json

import numpy as np

from planner.posterior import PrecisionPosterior

from .arrays import convert_npy, load_npy_stream, npy_chunks, write_npz, write_safetensors
from .compute import Config, store_for, structure_from_json
from .problems import Problem
from .store import PriorRecord, Store

__all__ = ["ARCHIVES", "build_derived", "derived_name"]

ARCHIVES = ("npz", "safetensors")


def derived_name(kind: str, name: str | None = None) -> str:
    """The object name of a derived file: ``float32`` of ``name``, ``covariance``, or an
    archive format."""
    if kind == "float32":
        return f"{name}.float32.npy"
    if kind == "covariance":
        return "covariance.npy"
    if kind in ARCHIVES:
        return f"archive.{kind}"
    raise ValueError(kind)


def build_derived(config: Config, prior_id: str, kind: str, name: str | None = None) -> str:
    """Build one derived file of a done prior unless it exists; return its key."""
    store = store_for(config)
    rec = store.prior_for_job(prior_id)
    if rec is None or rec.status != "done":  # deleted (with its teacher) meanwhile
        raise Problem.not_found("prior", prior_id)
    key = store.derived_key(rec.id, derived_name(kind, name))
    if store.storage.exists(key):
        return key
    try:
        _build(store, rec, key, kind, name)
    except FileNotFoundError:  # its arrays were deleted while the file was being built
        store.storage.delete(key)
        raise Problem.not_found("prior", prior_id) from None
    return key


def _build(store: Store, rec: PriorRecord, key: str, kind: str, name: str | None) -> None:
    if kind == "float32":
        with store.storage.open(store.prior_key(rec, name)) as f, store.storage.writer(key) as out:
            convert_npy(f, out, "float32")
    elif kind == "covariance":
        _covariance(store, rec, key)
    else:
        _archive(store, rec, key, kind)


def _covariance(store: Store, rec: PriorRecord, key: str) -> None:
    st = store.storage
    arrays = {}
    for n in ("mean", "precision"):
        with st.open(store.prior_key(rec, n)) as f:
            arrays[n] = load_npy_stream(f)
    plan = store.plan_for_job(rec.plan_id)
    if plan is None:
        raise FileNotFoundError(rec.id)
    post = PrecisionPosterior.from_validated(structure_from_json(plan.student), arrays)
    cov = post.dense_covariance()
    with st.writer(key) as out:
        for chunk in npy_chunks(np.ascontiguousarray(cov)):
            out.write(chunk)


def _archive(store: Store, rec: PriorRecord, key: str, fmt: str) -> None:
    st = store.storage
    plan = store.plan_for_job(rec.plan_id)
    teacher = store.teacher_for_job(plan.teacher_id) if plan is not None else None
    if teacher is None:
        raise FileNotFoundError(rec.id)
    meta = {
        "structure": plan.student,
        "format": teacher.format,
        "plan": plan.id,
        "prior": rec.id,
        "cost": rec.cost,
    }
    openers = {n: (lambda n=n: st.open(store.prior_key(rec, n))) for n in rec.arrays}
    with st.writer(key) as out:
        if fmt == "npz":
            write_npz(out, openers, meta)
        else:
            text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
            write_safetensors(out, openers, text)
