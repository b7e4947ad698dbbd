"""``/`` and ``/ui``: the pages (a plan, a teacher, the index), rendered by ``app.pages``.

The API keys apply as to the API: the same tenant, the same 404 for another
tenant's ids (send the same ``Authorization: Bearer`` header).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from ... import pages
from ...problems import Problem
from ..deps import JobsDep, OwnerDep, StoreDep, owned
from .plans import steps_of

router = APIRouter(tags=["pages"])


@router.get("/ui/plans/{id}", response_class=HTMLResponse, responses=pages.HTML_RESPONSES)
async def plan_page(id: str, store: StoreDep, jobs: JobsDep, owner: OwnerDep):
    """A plan as a picture: which teacher neurons each student position keeps, which
    layers ψ merged and how π pairs their neurons, the cost each run of steps added and
    the cost by teacher position, with links to the prior."""
    plan = await asyncio.to_thread(owned, store, owner, "p", id)
    steps = await steps_of(store, jobs, plan)

    def render():
        teacher = store.teacher(owner, plan.teacher_id)
        if teacher is None:  # deleted while the page was being made
            raise Problem.not_found("plan", plan.id)
        return pages.plan_page(plan, teacher, store.prior_of(owner, plan.id), steps)

    return await asyncio.to_thread(render)


@router.get("/ui/teachers/{id}", response_class=HTMLResponse, responses=pages.HTML_RESPONSES)
def teacher_page(id: str, store: StoreDep, owner: OwnerDep):
    """A teacher: its structure, arrays, and its plans with their priors."""
    t = owned(store, owner, "t", id)
    plans = [(p, store.prior_of(owner, p.id)) for p in store.plans_of(owner, t.id)]
    return pages.teacher_page(t, plans)


@router.get("/", response_class=HTMLResponse, responses=pages.HTML_RESPONSES)
@router.get("/ui/", response_class=HTMLResponse, include_in_schema=False)
def index_page(store: StoreDep, owner: OwnerDep):
    """The caller's teachers, with their plans and priors, and links to the API docs."""
    teachers = store.teachers(owner)
    plans = {
        t.id: [(p, store.prior_of(owner, p.id)) for p in store.plans_of(owner, t.id)]
        for t in teachers
    }
    return pages.index_page(teachers, plans)
