"""The one place where errors become RFC 9457 problem details.

Every client mistake is a 4xx ``application/problem+json`` answer naming the
``field`` and the reason; anything else is a 500 and a bug.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from planner import errors as core

__all__ = ["Problem", "install", "problem_from_planner_error"]

log = logging.getLogger("app")
MEDIA_TYPE = "application/problem+json"

#: Core errors by the HTTP status and problem slug they become.
_CORE = {
    core.InvalidStructure: (422, "invalid-structure", "Invalid structure"),
    core.InvalidPosterior: (422, "invalid-posterior", "Invalid posterior"),
    core.InvalidOperation: (422, "invalid-operation", "Invalid operation"),
    core.InvalidPlan: (422, "invalid-plan", "Invalid plan"),
    core.NotInLattice: (422, "not-in-lattice", "Student not in the teacher's lattice"),
    core.SingularConstraint: (422, "singular-constraint", "Singular constraint"),
    core.UnknownCriterion: (422, "unknown-criterion", "Unknown criterion"),
    core.MissingData: (422, "missing-data", "Missing data"),
    core.TooLarge: (413, "too-large", "Too large"),
    core.Unsupported: (422, "unsupported", "Unsupported by this format"),
}


class Problem(Exception):
    """An HTTP problem: raise it anywhere in ``app``; the handler renders it."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.field, self.headers, self.extra = field, headers, extra

    def __reduce__(self):  # raised in worker processes too
        return (
            _rebuild_problem,
            (self.status, self.slug, self.title, self.detail, self.field, self.headers, self.extra),
        )

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"urn:alignment-planner:problem:{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field:
            body["field"] = self.field
        body.update(self.extra)
        return body

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.to_json(), status_code=self.status, media_type=MEDIA_TYPE, headers=self.headers
        )

    @classmethod
    def not_found(cls, what: str, ident: str) -> Problem:
        return cls(404, "not-found", "Not found", f"no {what} with id {ident!r}", field="id")


def _rebuild_problem(status, slug, title, detail, field, headers, extra) -> Problem:
    return Problem(status, slug, title, detail, field=field, headers=headers, **extra)


def problem_from_planner_error(exc: core.PlannerError, field_prefix: str = "") -> Problem:
    status, slug, title = next(v for k, v in _CORE.items() if isinstance(exc, k))
    field = exc.field
    if field_prefix:
        field = f"{field_prefix}.{field}" if field else field_prefix
    return Problem(status, slug, title, exc.reason, field=field)


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return exc.response()

    @app.exception_handler(core.PlannerError)
    async def _core(request: Request, exc: core.PlannerError):
        return problem_from_planner_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"field": _loc(tuple(e["loc"])), "reason": e["msg"]} for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "reason": "invalid request"}
        return Problem(
            422,
            "invalid-request",
            "Invalid request",
            f"{first['field']}: {first['reason']}",
            field=first["field"],
            errors=errors,
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return Problem(
            exc.status_code, slug, str(exc.detail), str(exc.detail), headers=exc.headers
        ).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return Problem(
            500, "internal", "Internal server error", "an unexpected error occurred (a bug)"
        ).response()
