"""Typed client errors, each carrying the server's RFC 9457 problem details."""

from __future__ import annotations

from typing import Any

__all__ = [
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PlanFailed",
    "PlannerAPIError",
    "PriorFailed",
    "ServerError",
    "Unauthorized",
    "error_for",
]


class PlannerAPIError(Exception):
    """An error answer of the service; ``problem`` holds its problem details."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.field = problem.get("field")
        self.detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        where = f" [{self.field}]" if self.field and self.field not in self.detail else ""
        super().__init__(f"{status}{where}: {self.detail}")


class Unauthorized(PlannerAPIError):
    """401: no valid API key."""


class NotFound(PlannerAPIError):
    """404: no such id for this key."""


class Conflict(PlannerAPIError):
    """409: e.g. a prior's arrays before it is done."""


class PayloadTooLarge(PlannerAPIError):
    """413: beyond the service's limits."""


class InvalidRequest(PlannerAPIError):
    """4xx: the request is wrong (``field`` says where, ``detail`` why)."""


class ServerError(PlannerAPIError):
    """5xx: a bug or an unavailable service."""


class PriorFailed(PlannerAPIError):
    """A prior whose computation failed; ``problem`` is the failure's problem."""


class PlanFailed(PlannerAPIError):
    """A plan job that failed or was cancelled; ``problem`` says why."""


def error_for(status: int, problem: dict[str, Any]) -> PlannerAPIError:
    cls = {401: Unauthorized, 404: NotFound, 409: Conflict, 413: PayloadTooLarge}.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else InvalidRequest
    return cls(status, problem)
