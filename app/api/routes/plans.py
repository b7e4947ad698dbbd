"""``/v1/teachers/{id}/plans`` and ``/v1/plans/{id}`` (SPEC §9)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response

from planner import Plan, PlannerError
from planner.criteria import criterion_function
from planner.search import search

from ...compute import load_gradients, load_posterior, structure_from_json
from ...problems import Problem, problem_from_planner_error
from ...schemas import PlanCreate, PlanPublic, structure_json
from ...store import PlanRecord, new_id
from ..deps import OwnerDep, StoreDep, check_id

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
def create_plan(id: str, body: PlanCreate, response: Response, store: StoreDep, owner: OwnerDep):
    """Search the plan of least cost to ``student``, or validate and score ``ops``."""
    rec = store.teacher(owner, check_id(id, "t", "teacher"))
    if rec is None:
        raise Problem.not_found("teacher", id)
    teacher = structure_from_json(rec.structure)
    try:
        student = body.student.build(parent=teacher)
    except PlannerError as exc:
        raise problem_from_planner_error(exc, "student") from None
    try:
        if body.ops is not None:
            plan = Plan.from_json(teacher, body.ops)
            if plan.student != student:
                raise Problem(
                    422,
                    "invalid-plan",
                    "Invalid plan",
                    f"the ops lead to {plan.student.describe()}, not the requested "
                    f"{student.describe()}",
                    field="ops",
                )
            post = load_posterior(store, rec)
            cost, stats, criterion, seed = plan.cost(post), None, None, None
        else:
            criterion_function(body.criterion)  # unknown names fail before any work
            post = load_posterior(store, rec)
            grads = load_gradients(store, rec) if body.criterion == "gradient_covariance" else None
            found = search(post, student, body.criterion, seed=body.seed, gradients=grads)
            plan, cost, criterion, seed = found.plan, found.cost, body.criterion, body.seed
            stats = {
                "route": [list(b) for b in found.route.blocks],
                "routes_considered": found.routes_considered,
                "candidates": found.candidates,
            }
    except PlannerError as exc:
        raise problem_from_planner_error(exc) from None
    c = plan.compiled
    info = {
        "conditioned": int(c.conditioned.size),
        "provenance": [p.to_json() for p in c.provenance],
        "search": stats,
    }
    out = PlanRecord(
        new_id("p"),
        owner,
        rec.id,
        structure_json(plan.student),
        criterion,
        seed,
        plan.to_json(),
        float(cost),
        info,
        time.time(),
    )
    store.add_plan(out)
    response.headers["Location"] = f"/v1/plans/{out.id}"
    return plan_json(out)


@router.get("/v1/plans/{id}", response_model=PlanPublic)
def get_plan(id: str, store: StoreDep, owner: OwnerDep):
    rec = store.plan(owner, check_id(id, "p", "plan"))
    if rec is None:
        raise Problem.not_found("plan", id)
    return plan_json(rec)
