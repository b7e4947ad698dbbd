"""``/v1/teachers``: upload, list, read, delete (docs/service.md)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request, Response

from ...arrays import NAME
from ...ingest import ingest
from ...problems import Problem
from ...schemas import PlanPage, PriorPage, TeacherPublic
from ...store import TeacherRecord
from ...uploads import receive_multipart, staged_upload
from ..deps import JobsDep, OwnerDep, SettingsDep, StoreDep, check_id, owned
from .plans import plan_json
from .priors import prior_json

router = APIRouter(prefix="/v1/teachers", tags=["teachers"])


def teacher_json(rec: TeacherRecord) -> dict:
    return {
        "id": rec.id,
        "name": rec.name,
        "structure": rec.structure,
        "posterior": {"format": rec.format},
        "arrays": {  # where an array lies is the service's business
            n: {k: v for k, v in a.items() if k != "key"}
            for n, a in rec.arrays.items()
            if not a.get("derived")
        },
        "created": rec.created,
    }


@router.post(
    "",
    status_code=201,
    response_model=TeacherPublic,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["spec"],
                        "properties": {
                            "spec": {"$ref": "#/components/schemas/TeacherSpec"},
                            "archive": {
                                "type": "string",
                                "format": "binary",
                                "description": "one .npz with every array (instead of parts)",
                            },
                            "mean": {
                                "type": "string",
                                "format": "binary",
                                "description": "the mean, .npy (p,)",
                            },
                        },
                        "additionalProperties": {
                            "type": "string",
                            "format": "binary",
                            "description": "the format's other arrays, one .npy part each",
                        },
                        "propertyNames": {"pattern": NAME.pattern, "maxLength": 64},
                    },
                    "encoding": {"spec": {"contentType": "application/json"}},
                }
            },
        }
    },
)
async def create_teacher(
    request: Request,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    jobs: JobsDep,
):
    """Upload a teacher: ``spec`` and one ``.npy`` per array, or one ``archive``.

    The parts stream into storage; validation runs on the executor (a worker
    when scaled out); the teacher exists once its row is written."""
    up = await receive_multipart(
        request,
        store.storage,
        settings.max_upload_bytes,
        settings.max_parts,
        settings.max_form_bytes,
    )
    try:
        staged = staged_upload(up, store.storage, settings, owner)
    except BaseException:
        await asyncio.to_thread(store.storage.delete, up.prefix)
        raise
    rec = TeacherRecord(
        **await jobs.run(ingest, settings.config, staged, seconds=settings.job_seconds)
    )
    await asyncio.to_thread(store.add_teacher, rec)
    response.headers["Location"] = f"/v1/teachers/{rec.id}"
    return teacher_json(rec)


@router.get("", response_model=list[TeacherPublic])
def list_teachers(store: StoreDep, owner: OwnerDep):
    return [teacher_json(r) for r in store.teachers(owner)]


@router.get("/{id}", response_model=TeacherPublic)
def get_teacher(id: str, store: StoreDep, owner: OwnerDep):
    return teacher_json(owned(store, owner, "t", id))


@router.delete("/{id}", status_code=204)
def delete_teacher(id: str, store: StoreDep, owner: OwnerDep):  # rows, then arrays
    """Delete a teacher with its plans, priors and files."""
    if not store.delete_teacher(owner, check_id(id, "t", "teacher")):
        raise Problem.not_found("teacher", id)
    return Response(status_code=204)


#: Items of one page of a listing at most.
PAGE_MAX = 100


def _page(store, owner: str, id: str, what: str, limit: int, after: str | None) -> dict:
    """One page of a teacher's plans or priors (``what``), oldest first, and the next
    page's URL when this one is full."""
    t = owned(store, owner, "t", id)
    if what == "plans":
        items = store.plans_page(owner, t.id, limit, after)
        out = [plan_json(p) for p in items]
    else:
        items = store.priors_page(owner, t.id, limit, after)
        out = [prior_json(store, r) for r in items]
    full = len(items) == limit
    return {
        "items": out,
        "next": f"/v1/teachers/{t.id}/{what}?limit={limit}&after={items[-1].id}" if full else None,
    }


Limit = Query(50, ge=1, le=PAGE_MAX, description="items per page")
After = Query(None, max_length=64, description="the last item of the page before")


@router.get("/{id}/plans", response_model=PlanPage)
def list_plans(
    id: str, store: StoreDep, owner: OwnerDep, limit: int = Limit, after: str | None = After
):
    """The teacher's plans, oldest first, a page at a time (``next`` links the next page)."""
    return _page(store, owner, id, "plans", limit, after)


@router.get("/{id}/priors", response_model=PriorPage)
def list_priors(
    id: str, store: StoreDep, owner: OwnerDep, limit: int = Limit, after: str | None = After
):
    """The priors requested for the teacher's plans, oldest first, a page at a time."""
    return _page(store, owner, id, "priors", limit, after)
