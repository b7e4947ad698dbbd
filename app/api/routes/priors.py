"""``/v1/plans/{id}/prior`` and ``/v1/priors/{id}``: aligned priors and their arrays.

Any replica answers for any prior: the row says where its arrays are, storage
serves them (HTTP Range supported, so broken downloads resume).  Files derived
on request (float32 copies, a precision prior's covariance, archives) are built
once per key, under a lock per key, and kept in storage beside the arrays.
"""

from __future__ import annotations

import asyncio
from typing import Literal
from weakref import WeakValueDictionary

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from planner import FORMATS

from ...compute import structure_from_json
from ...derived import build_derived, derived_name
from ...problems import Problem
from ...schemas import PriorPublic
from ...serving import BinaryResponse, serve
from ...store import PriorRecord, Store
from ..deps import JobsDep, OwnerDep, SettingsDep, StoreDep, long_poll, owned

#: A file, whole or a byte range of it (``Range: bytes=a-b``, so downloads resume).
BINARY: dict = {
    200: {
        "description": "the whole file",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    206: {
        "description": "the byte range asked for with a Range header",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
}

router = APIRouter(tags=["priors"])

#: One lock per derived object being built in this replica (two replicas building the
#: same object at once write the same bytes under the same key: the last commit wins).
_BUILDING: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()


def prior_json(store: Store, rec: PriorRecord) -> dict:
    plan = store.plan(rec.owner, rec.plan_id)
    teacher = store.teacher(rec.owner, plan.teacher_id) if plan is not None else None
    if teacher is None:  # deleted with its teacher while this request ran
        raise Problem.not_found("prior", rec.id)
    return {
        "id": rec.id,
        "plan": rec.plan_id,
        "status": rec.status,
        "student": plan.student,
        "posterior": {"format": teacher.format},
        "cost": rec.cost if rec.cost is not None else plan.cost,
        "arrays": rec.arrays,
        "problem": rec.problem,
        "created": rec.created,
        "started": rec.started,
        "finished": rec.finished,
    }


@router.post(
    "/v1/plans/{id}/prior",
    response_model=PriorPublic,
    status_code=202,
    responses={201: {"description": "the prior is already computed"}},
)
def request_prior(id: str, store: StoreDep, jobs: JobsDep, owner: OwnerDep, settings: SettingsDep):
    """Start or reuse the plan's prior: 201 when it is computed, 202 while it is queued
    or running.  A failed prior is queued again.  A prior that would need more memory
    than a worker may use is refused (413) before anything starts."""
    plan = owned(store, owner, "p", id)
    teacher = store.teacher(owner, plan.teacher_id)
    if teacher is None:  # deleted while this request ran
        raise Problem.not_found("plan", id)
    cls = FORMATS[teacher.format]
    shapes = {n: tuple(a["shape"]) for n, a in teacher.arrays.items()}
    need = cls.align_bytes_of(
        structure_from_json(teacher.structure),
        shapes,
        plan.info["conditioned"],
        plan.student["n_params"],
    )
    if need > settings.job_memory:
        raise Problem(
            413,
            "too-large",
            "Prior too large",
            f"aligning this plan needs about {need / 2**30:.1f} GiB of memory; this service "
            f"allows {settings.job_memory / 2**30:.1f} GiB per prior",
            field="plan",
        )
    rec, created = store.prior_for_plan(owner, plan.id)
    if rec.status == "failed" and store.requeue_failed(rec.id):
        created = True
    if created:
        jobs.submit(rec.id)
        rec = store.prior(owner, rec.id)
    status = 201 if rec.status == "done" else 202
    return JSONResponse(
        prior_json(store, rec), status_code=status, headers={"Location": f"/v1/priors/{rec.id}"}
    )


def _done_prior(store: Store, owner: str, id: str) -> PriorRecord:
    rec = owned(store, owner, "r", id)
    if rec.status != "done":
        raise Problem(
            409,
            "not-ready",
            "Prior not ready",
            f"prior {id} is {rec.status}; its arrays exist once it is done",
            field="status",
            status_value=rec.status,
        )
    return rec


@router.get("/v1/priors/{id}", response_model=PriorPublic)
async def get_prior(
    id: str,
    store: StoreDep,
    owner: OwnerDep,
    wait: float = Query(
        0.0,
        ge=0.0,
        le=60.0,
        description="long-poll: seconds to wait for "
        "the prior to be done or failed before answering",
    ),
):
    """The prior's status; with ``wait``, answers as soon as it is done or failed."""
    rec = await asyncio.to_thread(owned, store, owner, "r", id)
    rec = await long_poll(lambda i: store.prior(owner, i), rec, wait, "prior", id)
    return await asyncio.to_thread(prior_json, store, rec)


async def _ensure(store: Store, jobs, prior_id: str, kind: str, name: str | None = None) -> str:
    """The key of a derived object, built once by a job unless it exists already."""
    key = store.derived_key(prior_id, derived_name(kind, name))
    if await asyncio.to_thread(store.storage.exists, key):
        return key
    lock = _BUILDING.get(key)
    if lock is None:
        lock = _BUILDING[key] = asyncio.Lock()
    async with lock:
        if not await asyncio.to_thread(store.storage.exists, key):
            await jobs.run(
                build_derived, jobs.config, prior_id, kind, name, seconds=jobs.settings.job_seconds
            )
    return key


@router.get(
    "/v1/priors/{id}/arrays/{name}",
    responses=BINARY,
    response_class=BinaryResponse,
)
async def get_array(
    id: str,
    name: str,
    request: Request,
    store: StoreDep,
    jobs: JobsDep,
    owner: OwnerDep,
    dtype: Literal["float64", "float32"] = "float64",
):
    """One array as ``.npy`` (HTTP Range supported, so broken downloads resume)."""
    rec = await asyncio.to_thread(_done_prior, store, owner, id)
    st = store.storage
    if name == "covariance" and "precision" in rec.arrays:  # a precision prior, on request
        key = await _ensure(store, jobs, rec.id, "covariance")
        return await serve(request, st, key, f"{name}.npy")
    if name not in rec.arrays:
        raise Problem(
            404,
            "not-found",
            "Not found",
            f"prior {id} has no array {name[:80]!r}; it has {sorted(rec.arrays)}",
            field="name",
        )
    key, etag = store.prior_key(rec, name), rec.arrays[name]["sha256"]
    if dtype == "float32":
        key, etag = await _ensure(store, jobs, rec.id, "float32", name), f"{etag}-f32"
    return await serve(request, st, key, f"{name}.npy", etag)


@router.get(
    "/v1/priors/{id}/archive",
    responses=BINARY,
    response_class=BinaryResponse,
)
async def get_archive(
    id: str,
    request: Request,
    store: StoreDep,
    jobs: JobsDep,
    owner: OwnerDep,
    format: Literal["npz", "safetensors"] = "npz",
):
    """Every array in one ``.npz`` or ``.safetensors`` file, the student structure in
    its metadata (the zip comment, or the safetensors header)."""
    rec = await asyncio.to_thread(_done_prior, store, owner, id)
    key = await _ensure(store, jobs, rec.id, format)
    return await serve(request, store.storage, key, f"{rec.id}.{format}")
