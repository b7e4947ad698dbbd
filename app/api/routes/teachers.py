"""``/v1/teachers``: upload, list, read, delete (SPEC §9)."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from ...problems import Problem
from ...schemas import TeacherPublic
from ...store import TeacherRecord
from ...uploads import ingest_teacher, receive_multipart
from ..deps import OwnerDep, SettingsDep, StoreDep, check_id, owned

router = APIRouter(prefix="/v1/teachers", tags=["teachers"])


def teacher_json(rec: TeacherRecord) -> dict:
    return {
        "id": rec.id,
        "name": rec.name,
        "structure": rec.structure,
        "posterior": {"format": rec.format},
        "arrays": {n: a for n, a in rec.arrays.items() if not a.get("derived")},
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
                            "spec": {
                                "type": "string",
                                "description": "JSON: name, structure, posterior.format",
                            },
                            "archive": {"type": "string", "format": "binary"},
                            "mean": {"type": "string", "format": "binary"},
                        },
                        "additionalProperties": {"type": "string", "format": "binary"},
                    }
                }
            },
        }
    },
)
async def create_teacher(
    request: Request, response: Response, store: StoreDep, settings: SettingsDep, owner: OwnerDep
):
    """Upload a teacher: ``spec`` and one ``.npy`` per array, or one ``archive``."""
    folder = store.tmp_dir()
    try:
        up = await receive_multipart(request, folder, settings.max_upload_bytes)
        rec = await run_in_threadpool(ingest_teacher, store, settings, owner, up, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    response.headers["Location"] = f"/v1/teachers/{rec.id}"
    return teacher_json(rec)


@router.get("", response_model=list[TeacherPublic])
def list_teachers(store: StoreDep, owner: OwnerDep):
    return [teacher_json(r) for r in store.teachers(owner)]


@router.get("/{id}", response_model=TeacherPublic)
def get_teacher(id: str, store: StoreDep, owner: OwnerDep):
    return teacher_json(owned(store, owner, "t", id))


@router.delete("/{id}", status_code=204)
def delete_teacher(id: str, store: StoreDep, owner: OwnerDep):
    """Delete a teacher with its plans, priors and files."""
    if not store.delete_teacher(owner, check_id(id, "t", "teacher")):
        raise Problem.not_found("teacher", id)
    return Response(status_code=204)
