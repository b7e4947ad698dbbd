"""``/v1/teachers/{id}/plans`` and ``/v1/plans/{id}`` (docs/service.md)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Response
from sqlalchemy.exc import IntegrityError

from planner import PlannerError
from planner.criteria import criterion_function
from planner.plan import MAX_COST_RUNS

from ...compute import run_plan, run_steps, structure_from_json
from ...problems import Problem, problem_from_planner_error
from ...schemas import PlanCreate, PlanPublic, PlanSteps, structure_json
from ...store import PlanRecord, new_id
from ..deps import JobsDep, OwnerDep, SettingsDep, StoreDep, owned

router = APIRouter(tags=["plans"])


def plan_json(rec: PlanRecord) -> dict:
    return {
        "id": rec.id,
        "teacher": rec.teacher_id,
        "student": rec.student,
        "criterion": rec.criterion,
        "seed": rec.seed,
        "ops": rec.ops,
        "cost": rec.cost,
        "conditioned": rec.info["conditioned"],
        "provenance": rec.info["provenance"],
        "search": rec.info.get("search"),
        "created": rec.created,
    }


@router.post("/v1/teachers/{id}/plans", status_code=201, response_model=PlanPublic)
async def create_plan(
    id: str,
    body: PlanCreate,
    response: Response,
    store: StoreDep,
    jobs: JobsDep,
    owner: OwnerDep,
    settings: SettingsDep,
):
    """Search the plan of least cost to ``student``, or validate and score ``ops``.

    The search runs in the job executor (a process pool by default), so
    concurrent plans use every core and never block the event loop.
    """
    rec = owned(store, owner, "t", id)
    teacher = structure_from_json(rec.structure)
    try:
        student = body.student.build(parent=teacher)
    except PlannerError as exc:
        raise problem_from_planner_error(exc, "student") from None
    if body.ops is not None and len(body.ops) > settings.max_plan_ops:
        raise Problem(
            413,
            "too-large",
            "Plan too long",
            f"{len(body.ops)} operations given; this service scores plans of at most "
            f"{settings.max_plan_ops} (PLANNER_MAX_PLAN_OPS)",
            field="ops",
        )
    deadline = min(body.seconds or settings.plan_seconds, settings.plan_seconds)
    try:
        if body.ops is None:
            criterion_function(body.criterion)  # unknown names fail before any work
        out = await jobs.run(
            run_plan,
            settings.config,
            rec.id,
            structure_json(student),
            body.criterion,
            body.seed,
            body.ops_json(),
            deadline,
            body.effort,
            settings.job_memory / 2,  # the rest for the posterior's own working arrays
            settings.max_plan_ops,
            seconds=deadline + settings.job_grace,
        )
    except PlannerError as exc:
        raise problem_from_planner_error(exc) from None
    searched = body.ops is None
    plan = PlanRecord(
        new_id("p"),
        owner,
        rec.id,
        structure_json(student),
        body.criterion if searched else None,
        body.seed if searched else None,
        out["ops"],
        out["cost"],
        out["info"],
        time.time(),
    )
    try:
        await asyncio.to_thread(store.add_plan, plan)
    except IntegrityError:  # the teacher was deleted while its plan was searched
        raise Problem.not_found("teacher", id) from None
    response.headers["Location"] = f"/v1/plans/{plan.id}"
    return plan_json(plan)


@router.get("/v1/plans/{id}", response_model=PlanPublic)
def get_plan(id: str, store: StoreDep, owner: OwnerDep):
    return plan_json(owned(store, owner, "p", id))


async def steps_of(store, jobs, rec: PlanRecord) -> list[dict] | None:
    """A plan's step costs: kept in its row once computed, else computed now by a job
    (exact prefix differences: about one conditioning per run of steps)."""
    if rec.info.get("steps_computed") or "steps" in rec.info:
        return rec.info.get("steps")
    return await jobs.run(run_steps, jobs.config, rec.id, seconds=jobs.settings.job_seconds)


@router.get("/v1/plans/{id}/steps", response_model=PlanSteps)
async def get_plan_steps(id: str, store: StoreDep, jobs: JobsDep, owner: OwnerDep):
    """The cost each run of the plan's steps adds (a run: φ at one layer, or one ψ); the
    costs sum to the plan's cost.  Computed on the first request (about one
    conditioning per run) and kept; ``steps`` is null, with a note, for plans of more
    runs than are costed one by one."""
    rec = await asyncio.to_thread(owned, store, owner, "p", id)
    steps = await steps_of(store, jobs, rec)
    note = None if steps is not None else f"more than {MAX_COST_RUNS} runs: only the total"
    return {"plan": rec.id, "cost": rec.cost, "steps": steps, "note": note}
