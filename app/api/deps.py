"""Typed dependencies: settings, store, jobs, and the caller's identity."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated

from fastapi import Depends, Request

from ..auth import PUBLIC, owner_of
from ..jobs import JobRunner
from ..problems import Problem
from ..settings import Settings
from ..store import ID, Store

__all__ = [
    "PUBLIC",
    "JobsDep",
    "OwnerDep",
    "SettingsDep",
    "StoreDep",
    "check_id",
    "long_poll",
    "owned",
]

_ID = re.compile(ID)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_jobs(request: Request) -> JobRunner:
    return request.app.state.jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]


def get_owner(request: Request, settings: SettingsDep) -> str:
    """The tenant: a digest of the caller's API key, or ``public`` without keys."""
    return owner_of(request.headers.get("authorization", ""), settings.keys)


OwnerDep = Annotated[str, Depends(get_owner)]


#: Id kinds: the store's reader and the name problems use.
_KINDS = {
    "t": ("teacher", "teacher"),
    "p": ("plan", "plan"),
    "r": ("prior", "prior"),
    "j": ("plan_job", "plan job"),
}


def owned(store: Store, owner: str, kind: str, id: str):
    """The caller's teacher (``t``), plan (``p``) or prior (``r``) with this id, or 404:
    another tenant's record is not found either."""
    reader, what = _KINDS[kind]
    rec = getattr(store, reader)(owner, check_id(id, kind, what))
    if rec is None:
        raise Problem.not_found(what, id)
    return rec


async def long_poll(fetch, rec, wait: float, what: str, id: str):
    """Re-read a job's record (``fetch(id)``) until it leaves ``queued``/``running`` or
    ``wait`` seconds pass: at 20 Hz at first, then less often (4 Hz at most after a
    second), so many waiting clients cost the database little; 404 if it is deleted
    meanwhile (with its teacher)."""
    deadline, pause = time.monotonic() + wait, 0.05
    while rec.status in ("queued", "running") and time.monotonic() < deadline:
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(1.5 * pause, 0.25)
        rec = await asyncio.to_thread(fetch, rec.id)
        if rec is None:
            raise Problem.not_found(what, id)
    return rec


def check_id(value: str, kind: str, what: str) -> str:
    """Ids are opaque tokens: anything that is not one is simply not found."""
    if not _ID.match(value) or value[0] != kind:
        raise Problem.not_found(what, value[:80])
    return value
