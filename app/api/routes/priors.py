"""``/v1/plans/{id}/prior`` and ``/v1/priors/{id}``: aligned priors and their arrays."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg as sla
from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ...arrays import convert_npy, write_npy, write_npz, write_safetensors
from ...compute import TeacherFiles
from ...problems import Problem
from ...schemas import PriorPublic
from ...store import PriorRecord, Store
from ..deps import JobsDep, OwnerDep, SettingsDep, StoreDep, owned

router = APIRouter(tags=["priors"])
_build_lock = threading.Lock()


def prior_json(store: Store, rec: PriorRecord) -> dict:
    plan = store.plan(rec.owner, rec.plan_id)
    teacher = store.teacher(rec.owner, plan.teacher_id)
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
    than this machine offers is refused (413) before anything starts."""
    plan = owned(store, owner, "p", id)
    teacher = store.teacher(owner, plan.teacher_id)
    need = (
        TeacherFiles.of(store, teacher)
        .posterior()
        .align_bytes(plan.info["conditioned"], plan.student["n_params"])
    )
    if need > settings.max_job_bytes:
        raise Problem(
            413,
            "too-large",
            "Prior too large",
            f"aligning this plan needs about {need / 2**30:.1f} GiB of memory; this service "
            f"allows {settings.max_job_bytes / 2**30:.1f} GiB per prior",
            field="plan",
        )
    rec, created = store.prior_for_plan(owner, plan.id)
    if rec.status == "failed":
        store.update_prior(rec.id, status="queued", problem=None, started=None, finished=None)
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
    rec = owned(store, owner, "r", id)
    deadline = time.monotonic() + wait
    while rec.status in ("queued", "running") and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        rec = store.prior(owner, rec.id) or rec
    return prior_json(store, rec)


@router.get(
    "/v1/priors/{id}/arrays/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def get_array(
    id: str,
    name: str,
    store: StoreDep,
    owner: OwnerDep,
    dtype: Literal["float64", "float32"] = "float64",
):
    """One array as ``.npy`` (HTTP Range supported, so broken downloads resume)."""
    rec = _done_prior(store, owner, id)
    if name == "covariance" and "precision" in rec.arrays:  # a precision prior, on request
        path = store.prior_dir(rec.id) / "covariance.npy"
        src = store.prior_dir(rec.id) / "precision.npy"
        await _ensure(path, lambda: _covariance_of(src, path))
        return FileResponse(path, media_type="application/octet-stream", filename=f"{name}.npy")
    if name not in rec.arrays:
        raise Problem(
            404,
            "not-found",
            "Not found",
            f"prior {id} has no array {name[:80]!r}; it has {sorted(rec.arrays)}",
            field="name",
        )
    path = store.prior_dir(rec.id) / f"{name}.npy"
    etag = rec.arrays[name]["sha256"]
    if dtype == "float32":
        cached = store.prior_dir(rec.id) / f"{name}.float32.npy"
        await _ensure(cached, lambda: convert_npy(path, cached, "float32"))
        path, etag = cached, f"{etag}-f32"
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{name}.npy",
        headers={"ETag": f'"{etag}"'},
    )


def _covariance_of(precision: Path, dst: Path) -> None:
    """Σ = Λ⁻¹ by one Cholesky factorisation of Λ (asked for explicitly by the client)."""
    lam = np.load(precision, mmap_mode="r", allow_pickle=False)
    cf = sla.cho_factor(np.array(lam), lower=True, check_finite=False)
    write_npy(dst, sla.cho_solve(cf, np.eye(lam.shape[0]), check_finite=False))


async def _ensure(target: Path, build) -> None:
    """Build a derived file once (atomically, off the event loop) unless it exists."""

    def once() -> None:
        with _build_lock:
            if not target.exists():
                build()

    if not target.exists():
        await run_in_threadpool(once)


@router.get(
    "/v1/priors/{id}/archive",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def get_archive(
    id: str,
    store: StoreDep,
    owner: OwnerDep,
    format: Literal["npz", "safetensors"] = "npz",
):
    """Every array in one ``.npz`` or ``.safetensors`` file, the student structure in
    its metadata (the zip comment, or the safetensors header)."""
    rec = _done_prior(store, owner, id)
    d = store.prior_dir(rec.id)
    plan = store.plan(owner, rec.plan_id)
    teacher = store.teacher(owner, plan.teacher_id)
    arrays = {n: d / f"{n}.npy" for n in rec.arrays}
    meta = {
        "structure": plan.student,
        "format": teacher.format,
        "plan": plan.id,
        "prior": rec.id,
        "cost": rec.cost,
    }
    target = d / f"archive.{format}"
    st_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    await _ensure(
        target,
        (lambda: write_npz(target, arrays, meta))
        if format == "npz"
        else (lambda: write_safetensors(target, arrays, st_meta)),
    )
    return FileResponse(
        target, media_type="application/octet-stream", filename=f"{rec.id}.{format}"
    )
