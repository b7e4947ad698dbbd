"""``/v1/teachers/{id}/plans`` and ``/v1/plans/{id}`` (docs/service.md)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from planner import PlannerError
from planner.criteria import criterion_function
from planner.plan import MAX_COST_RUNS
from planner.search.budgets import floors_ok, params_for

from ...compute import plan_record, run_plan, run_steps, structure_from_json
from ...problems import Problem, problem_from_planner_error
from ...schemas import PlanCreate, PlanJobPublic, PlanPublic, PlanSteps, structure_json
from ...store import PlanJobRecord, PlanRecord, new_id
from ..deps import JobsDep, OwnerDep, SettingsDep, StoreDep, long_poll, owned

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
        "surviving": rec.info.get("surviving"),
        "search": rec.info.get("search"),
        "created": rec.created,
    }


def _async(prefer: str | None) -> bool:
    """Whether a ``Prefer`` header (RFC 7240) asks for ``respond-async``."""
    return bool(prefer) and any(
        p.split(";")[0].split("=")[0].strip().lower() == "respond-async" for p in prefer.split(",")
    )


@router.post(
    "/v1/teachers/{id}/plans",
    status_code=201,
    response_model=PlanPublic,
    responses={
        202: {
            "model": PlanJobPublic,
            "description": "with `Prefer: respond-async`: the plan is a job; poll "
            "`/v1/plan-jobs/{id}` (its `Location`) until it is done",
        }
    },
)
async def create_plan(
    id: str,
    body: PlanCreate,
    response: Response,
    store: StoreDep,
    jobs: JobsDep,
    owner: OwnerDep,
    settings: SettingsDep,
    prefer: str | None = Header(
        None,
        max_length=256,
        description="`respond-async` (RFC 7240): run the search as a job and answer 202 at "
        "once, with a deadline of up to PLANNER_PLAN_JOB_SECONDS",
    ),
):
    """Search the plan of least cost to ``student``, or validate and score ``ops``.

    The search runs in the job executor (a process pool by default), so
    concurrent plans use every core and never block the event loop. With
    ``Prefer: respond-async`` it runs as a job: 202 with the job, which survives a
    lost worker or replica (it is run again) and can be cancelled (``DELETE``).
    """
    rec = owned(store, owner, "t", id)
    teacher = structure_from_json(rec.structure)
    if (body.student is None) == (body.budget is None):
        raise Problem(
            422,
            "invalid-request",
            "Invalid request",
            "give exactly one of 'student' (the structure) and 'budget' (max_params or keep: "
            "the planner chooses the student)",
            field="student" if body.student is None else "budget",
        )
    if body.budget is not None and body.ops is not None:
        raise Problem(
            422,
            "invalid-request",
            "Invalid request",
            "ops are scored against a student: give 'student' with 'ops', not 'budget'",
            field="budget",
        )
    student = None
    if body.student is not None:
        try:
            student = body.student.build(parent=teacher)
        except PlannerError as exc:
            raise problem_from_planner_error(exc, "student") from None
    else:
        try:
            params_for(teacher, body.budget.max_params, body.budget.keep)
            floors_ok(teacher, body.budget.request()["floors"])
        except PlannerError as exc:
            raise problem_from_planner_error(exc) from None
    if body.ops is not None and len(body.ops) > settings.max_plan_ops:
        raise Problem(
            413,
            "too-large",
            "Plan too long",
            f"{len(body.ops)} operations given; this service scores plans of at most "
            f"{settings.max_plan_ops} (PLANNER_MAX_PLAN_OPS)",
            field="ops",
        )
    if body.ops is None:
        try:
            criterion_function(body.criterion)  # unknown names fail before any work
        except PlannerError as exc:
            raise problem_from_planner_error(exc) from None
    later = _async(prefer)
    most = settings.plan_job_seconds if later else settings.plan_seconds
    request = {
        "student": None if student is None else structure_json(student),
        "budget": None if body.budget is None else body.budget.request(),
        "criterion": body.criterion,
        "seed": body.seed,
        "ops": body.ops_json(),
        "seconds": min(body.seconds or most, most),
        "effort": body.effort,
        "memory": settings.job_memory / 2,  # the rest for the posterior's own arrays
        "max_ops": settings.max_plan_ops,
    }
    if later:
        return await _submit_plan_job(store, jobs, owner, rec.id, request)
    try:
        limit = request["seconds"] + settings.job_grace  # the worker's hard limit
        out = await jobs.run(run_plan, settings.config, rec.id, request, seconds=limit)
    except PlannerError as exc:
        raise problem_from_planner_error(exc) from None
    plan = plan_record(owner, rec.id, request, out)
    try:
        await asyncio.to_thread(store.add_plan, plan)
    except IntegrityError:  # the teacher was deleted while its plan was searched
        raise Problem.not_found("teacher", id) from None
    response.headers["Location"] = f"/v1/plans/{plan.id}"
    return plan_json(plan)


async def _submit_plan_job(store, jobs, owner: str, teacher_id: str, request: dict):
    job = PlanJobRecord(new_id("j"), owner, teacher_id, request, "queued", created=time.time())
    try:
        await asyncio.to_thread(store.add_plan_job, job)
    except IntegrityError:  # the teacher was deleted meanwhile
        raise Problem.not_found("teacher", teacher_id) from None
    jobs.submit(job.id)
    job = await asyncio.to_thread(store.plan_job, owner, job.id) or job
    return JSONResponse(
        plan_job_json(job),
        status_code=202,
        headers={"Location": f"/v1/plan-jobs/{job.id}", "Preference-Applied": "respond-async"},
    )


def plan_job_json(job: PlanJobRecord) -> dict:
    req = job.request
    return {
        "id": job.id,
        "teacher": job.teacher_id,
        "status": job.status,
        "student": req["student"],
        "budget": req.get("budget"),
        "criterion": req["criterion"],
        "seconds": req["seconds"],
        "effort": req["effort"],
        "plan": job.plan_id,
        "problem": job.problem,
        "attempts": job.attempts,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
    }


@router.get("/v1/plan-jobs/{id}", response_model=PlanJobPublic)
async def get_plan_job(
    id: str,
    store: StoreDep,
    owner: OwnerDep,
    wait: float = Query(
        0.0, ge=0.0, le=60.0, description="long-poll: seconds to wait for the job to finish"
    ),
):
    """A plan job: ``queued``, ``running``, ``done`` (``plan`` is the plan's id),
    ``failed`` (``problem`` says why) or ``cancelled``; ``wait`` answers as soon as it
    finishes."""
    job = await asyncio.to_thread(owned, store, owner, "j", id)
    job = await long_poll(lambda i: store.plan_job(owner, i), job, wait, "plan job", id)
    return plan_job_json(job)


@router.delete("/v1/plan-jobs/{id}", status_code=204)
def cancel_plan_job(id: str, store: StoreDep, owner: OwnerDep):
    """Cancel a queued or running plan job: it records no plan, and its worker stops
    searching within a third of a lease (``PLANNER_LEASE_SECONDS``). A job that already
    finished is a 409."""
    job = owned(store, owner, "j", id)
    if not store.cancel_plan_job(owner, job.id):
        job = store.plan_job(owner, job.id) or job
        raise Problem(
            409,
            "already-finished",
            "Plan job already finished",
            f"plan job {id} is {job.status}; only queued or running jobs can be cancelled",
            field="status",
            status_value=job.status,
        )
    return Response(status_code=204)


@router.get("/v1/plans/{id}", response_model=PlanPublic)
def get_plan(id: str, store: StoreDep, owner: OwnerDep):
    return plan_json(owned(store, owner, "p", id))


async def steps_of(store, jobs, rec: PlanRecord) -> list[dict] | None:
    """A plan's step costs: kept in its row once computed, else computed now by a job
    (exact prefix differences: about one conditioning per run of steps)."""
    if "steps" in rec.info:  # computed already (None: too many runs to cost one by one)
        return rec.info["steps"]
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
    # a run holds the fields it has (an MLP's layer and teacher position, a network's space,
    # block or layer): what the plan keeps, as it keeps it
    body = PlanSteps(plan=rec.id, cost=rec.cost, steps=steps, note=note).model_dump()
    if body["steps"] is not None:
        body["steps"] = [{k: v for k, v in s.items() if v is not None} for s in body["steps"]]
    return JSONResponse(body)
