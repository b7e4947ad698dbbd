"""The OpenAPI document as the contract (docs/service.md): every status a route can answer, the
RFC 9457 problem schema under ``application/problem+json``, and links between operations.

FastAPI documents what the route functions declare: their success responses and a
generic ``422`` in ``application/json``. Every error here is a problem, so the
document is completed once, from one table of what each operation can answer
(:data:`ERRORS`), instead of on every route.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .problems import MEDIA_TYPE
from .schemas import TeacherSpec

__all__ = ["ERRORS", "install"]

PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details; `field` names the input at fault.",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "format": "uri", "example": "urn:alignment-planner:problem:x"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "field": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "reason": {"type": "string"}},
            },
        },
    },
    "additionalProperties": True,
    "example": {
        "type": "urn:alignment-planner:problem:invalid-structure",
        "title": "Invalid structure",
        "status": 422,
        "detail": "width 9 at position 2 exceeds the teacher's 6",
        "field": "student.widths",
    },
}

REASONS = {
    400: "the body is not well-formed (JSON or multipart that does not parse)",
    401: "API keys are on and the request carries no valid bearer key",
    404: "no such id for this tenant (ids of other tenants are not found either)",
    409: "the prior is not done (its arrays do not exist yet), or the plan job already finished",
    413: "the request or the work it asks for exceeds a documented limit",
    415: "the body is not multipart/form-data with a boundary",
    416: "the Range header asks for bytes beyond the array",
    422: "a field breaks the schema or a rule of docs/theory.md §8 or docs/service.md; "
    "`field` says which",
    408: "the request's body stalled past PLANNER_BODY_TIMEOUT",
    503: "retry later: the replica is at PLANNER_MAX_CONNECTIONS, the executor (a Dask "
    "scheduler) is unreachable, the job's worker died (worker-lost), or a search ran past "
    "its deadline before a first plan (deadline-exceeded)",
}

#: What each operation can answer besides its success (operation id → statuses).
ERRORS: dict[str, tuple[int, ...]] = {
    "healthz": (503,),
    "readyz": (503,),
    "metrics": (401, 503),
    "create_teacher": (400, 401, 408, 413, 415, 422, 503),
    "list_teachers": (401, 503),
    "get_teacher": (401, 404, 503),
    "delete_teacher": (401, 404, 503),
    "sequences": (400, 401, 408, 413, 422, 503),
    "create_plan": (400, 401, 404, 408, 413, 422, 503),
    "get_plan": (401, 404, 503),
    "list_plans": (401, 404, 422, 503),
    "list_priors": (401, 404, 422, 503),
    "get_plan_steps": (401, 404, 503),
    "get_plan_job": (401, 404, 422, 503),
    "cancel_plan_job": (401, 404, 409, 503),
    "request_prior": (401, 404, 408, 413, 503),
    "get_prior": (401, 404, 422, 503),
    "get_array": (401, 404, 409, 416, 422, 503),
    "get_archive": (401, 404, 409, 416, 422, 503),
    "plan_page": (401, 404, 503),
    "teacher_page": (401, 404, 503),
    "index_page": (401, 503),
}

#: Links for stateful clients: teacher → plan → prior → arrays.
LINKS: dict[str, dict[str, dict[str, Any]]] = {
    "create_teacher": {
        "GetTeacher": {"operationId": "get_teacher", "parameters": {"id": "$response.body#/id"}},
        "CreatePlan": {"operationId": "create_plan", "parameters": {"id": "$response.body#/id"}},
        "DeleteTeacher": {
            "operationId": "delete_teacher",
            "parameters": {"id": "$response.body#/id"},
        },
    },
    "create_plan": {
        "GetPlan": {"operationId": "get_plan", "parameters": {"id": "$response.body#/id"}},
        "RequestPrior": {
            "operationId": "request_prior",
            "parameters": {"id": "$response.body#/id"},
        },
    },
    "request_prior": {
        "GetPrior": {"operationId": "get_prior", "parameters": {"id": "$response.body#/id"}},
        "GetMean": {
            "operationId": "get_array",
            "parameters": {"id": "$response.body#/id", "name": "mean"},
        },
    },
}


def _problem_response(status: int) -> dict[str, Any]:
    return {
        "description": REASONS[status],
        "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Problem"] = PROBLEM
    spec = TeacherSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(spec.pop("$defs", {}))
    schemas["TeacherSpec"] = spec  # the multipart upload's `spec` part (JSON)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            oid = op.get("operationId", "")
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if oid not in ERRORS:
                raise RuntimeError(f"{method.upper()} {path}: add {oid!r} to app.openapi.ERRORS")
            for status in ERRORS[oid]:
                responses[str(status)] = _problem_response(status)
            for status, response in responses.items():
                if status.startswith("2") and oid in LINKS:
                    response["links"] = LINKS[oid]
    return doc


def install(app: FastAPI) -> None:
    """Serve the completed document at ``/openapi.json`` (built once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
