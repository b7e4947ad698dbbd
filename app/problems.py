"""The one place where errors become RFC 9457 problem details.

Every client mistake is a 4xx ``application/problem+json`` answer naming the
``field`` and the reason; anything else is a 500 and a bug.
"""

from __future__ import annotations

import logging
import re
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
    core.DeadlineExceeded: (503, "deadline-exceeded", "Deadline exceeded"),
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


#: Tags of the discriminated unions (an op's kind, a stage's type, a structure's kind):
#: branches, not fields.
_OP_TAGS = ("phi", "psi", "channel", "block")
_STAGE_TAGS = ("conv", "linear", "pool", "flatten", "residual")
_BRANCH = re.compile(r".*\[.*|str|int|float|bool|none|list|dict|function-\w+")


def memory_problem(exc: MemoryError) -> Problem:
    """The 413 problem for a job out of memory: its own bound (``PLANNER_JOB_MEMORY``), or
    its worker's device (:class:`planner.backend.DeviceMemoryError`)."""
    from planner.backend import DeviceMemoryError

    if isinstance(exc, DeviceMemoryError):
        return Problem(
            413,
            "too-large",
            "Out of device memory",
            f"this request needed more memory than its worker's device holds ({exc}); ask "
            "for a smaller problem, or run it on workers without PLANNER_DEVICE",
            field="body",
        )
    return Problem(
        413,
        "too-large",
        "Out of memory",
        "this request needed more working memory than one job may hold on this service "
        "(PLANNER_JOB_MEMORY); ask for a smaller problem",
        field="body",
    )


def field_name(loc: tuple) -> str:
    """pydantic's location as the service names fields: ``ops[0].layer``, ``student.widths``.

    Unions put the branch in the location (``ops, 0, phi, layer`` for an op's tag,
    ``activation, literal[...]`` for a smart union); branches are not fields, so they
    are left out."""
    out = ""
    prev = None
    for p in loc:
        if p in ("body", "query", "path") and not out:
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif (
            (isinstance(prev, int) and p in _OP_TAGS)
            or ((isinstance(prev, int) or prev == "shortcut") and p in _STAGE_TAGS)
            or p in ("mlp", "network")
            or _BRANCH.fullmatch(str(p))
        ):
            pass
        else:
            out += f".{p}" if out else str(p)
        prev = p
    return out or "body"


def _allowed(request: Request) -> set[str]:
    """The methods the OpenAPI document lists for the request's path."""
    path = request.url.path
    for template, item in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path):
            return {m.upper() for m in item} | ({"HEAD"} if "get" in item else set())
    return set()


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
        errors = [{"field": field_name(tuple(e["loc"])), "reason": e["msg"]} for e in exc.errors()]
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
        headers = dict(exc.headers or {})
        field = None
        if exc.status_code == 405:  # every method of the path, not only the first route's
            headers["Allow"] = ", ".join(sorted(_allowed(request))) or headers.get("Allow", "")
            field = "method"
        elif exc.status_code == 400:
            field = "body"
        return Problem(
            exc.status_code, slug, str(exc.detail), str(exc.detail), field=field, headers=headers
        ).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return Problem(
            500, "internal", "Internal server error", "an unexpected error occurred (a bug)"
        ).response()
