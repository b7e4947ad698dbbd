"""The Python client of the alignment-planner service, for training jobs.

>>> from planner_client import PlannerClient
>>> client = PlannerClient("http://127.0.0.1:8000")  # doctest: +SKIP
"""

from .client import PlannerClient
from .errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PlanFailed,
    PlannerAPIError,
    PriorFailed,
    ServerError,
    Unauthorized,
)

__all__ = [
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PlanFailed",
    "PlannerAPIError",
    "PlannerClient",
    "PriorFailed",
    "ServerError",
    "Unauthorized",
]
