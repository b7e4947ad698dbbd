"""Between stored records and the core: rebuild structures and posteriors, align."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from planner import FORMATS, InvalidPlan, Plan, PlannerError, Posterior, Structure
from planner.criteria import criterion_function
from planner.search import search

from .arrays import write_npy
from .problems import Problem, problem_from_planner_error
from .store import LocalStore, Store, TeacherRecord

__all__ = ["TeacherFiles", "load_posterior", "run_plan", "run_prior", "structure_from_json"]

log = logging.getLogger("app.jobs")


def structure_from_json(d: dict) -> Structure:
    return Structure.build(
        d["widths"], d["activation"], d["output_activation"], d["bias"], d["kind"]
    )


@dataclass(frozen=True)
class TeacherFiles:
    """What a worker needs to rebuild a teacher's posterior: plain, picklable data."""

    structure: dict
    format: str
    paths: dict[str, str]

    @classmethod
    def of(cls, store: Store, rec: TeacherRecord) -> TeacherFiles:
        paths = {n: str(store.teacher_array(rec.id, n)) for n in rec.arrays}
        return cls(rec.structure, rec.format, paths)

    def posterior(self) -> Posterior:
        """The posterior over memory-mapped, already validated float64 arrays."""
        cls = FORMATS[self.format]
        structure = structure_from_json(self.structure)
        arrays = {n: self._load(n) for n in cls.names(structure)}
        arrays.update({n: self._load(n) for n in cls.derived_names if n in self.paths})
        return cls.from_validated(structure, arrays)

    def gradients(self) -> np.ndarray | None:
        return self._load("gradients") if "gradients" in self.paths else None

    def _load(self, name: str) -> np.ndarray:
        return np.load(self.paths[name], mmap_mode="r", allow_pickle=False)


#: Dense problems from this many parameters on gain from threaded BLAS.
_THREADED_FROM = 1500


def blas_threads(post: Posterior) -> int:
    """BLAS threads for one job: all cores for large dense problems, else one (small
    problems gain nothing from threads and lose much when jobs run side by side)."""
    dense = post.format in ("full", "precision")
    return (os.cpu_count() or 1) if dense and post.n >= _THREADED_FROM else 1


def load_posterior(store: Store, rec: TeacherRecord) -> Posterior:
    return TeacherFiles.of(store, rec).posterior()


def run_plan(
    teacher: TeacherFiles,
    student: dict,
    criterion: str,
    seed: int,
    ops: list[dict] | None,
    seconds: float | None = None,
) -> dict:
    """Search (or validate and score ``ops``) in a worker; raises ``PlannerError``.
    ``seconds`` is the search's wall-clock safety net (``PLANNER_PLAN_SECONDS``)."""
    post = teacher.posterior()
    with threadpool_limits(blas_threads(post)):
        return _plan(post, teacher, student, criterion, seed, ops, seconds)


def _plan(post, teacher, student, criterion, seed, ops, seconds=None) -> dict:
    target = structure_from_json(student)
    if ops is not None:
        plan = Plan.from_json(post.structure, ops)
        if plan.student != target:
            raise InvalidPlan(
                f"the ops lead to {plan.student.describe()}, not the requested {target.describe()}",
                field="ops",
            )
        cost, stats = plan.cost(post), None
    else:
        grads = teacher.gradients() if criterion_function(criterion).needs_gradients else None
        found = search(post, target, criterion, seed=seed, gradients=grads, seconds=seconds)
        plan, cost = found.plan, found.cost
        stats = {
            "route": [list(b) for b in found.route.blocks],
            "routes": found.routes_considered,
            "routes_built": found.routes_built,
            "evaluations": found.evaluations,
            "work": found.work,
            "exhaustive": found.exhaustive,
            "cut": found.cut,
            "seconds": seconds,
        }
    c = plan.compiled
    return {
        "ops": plan.to_json(),
        "cost": float(cost),
        "info": {
            "conditioned": int(c.n_conditioned),
            "provenance": [p.to_json() for p in c.provenance],
            "search": stats,
        },
    }


def run_prior(data_dir: str, prior_id: str) -> dict:
    """Compute one prior (in a worker process or thread); the store records the outcome.

    Returns ``{"status", "seconds"}``; never raises for a failure of the
    computation itself, which is recorded on the prior as a problem.
    """
    t0 = time.perf_counter()
    store = LocalStore(Path(data_dir))
    try:
        prior = store.prior_for_job(prior_id)
        plan_rec = store.plan_for_job(prior.plan_id) if prior else None
        teacher = store.teacher_for_job(plan_rec.teacher_id) if plan_rec else None
        if prior is None or plan_rec is None or teacher is None:
            return {"status": "gone", "seconds": time.perf_counter() - t0}  # deleted meanwhile
        store.update_prior(prior_id, status="running", started=time.time())
        try:
            post = load_posterior(store, teacher)
            plan = Plan.from_json(post.structure, plan_rec.ops)
            with threadpool_limits(blas_threads(post)):
                aligned = plan.apply(post)
            cost = plan_rec.cost  # computed when the plan was made
            tmp = store.tmp_dir()
            infos = {}
            for name, arr in aligned.to_arrays().items():
                sha, size = write_npy(tmp / f"{name}.npy", arr)
                infos[name] = {
                    "shape": list(arr.shape),
                    "dtype": "float64",
                    "bytes": size,
                    "sha256": sha,
                }
            store.adopt_prior_arrays(prior_id, tmp)
            store.update_prior(
                prior_id,
                status="done",
                cost=cost,
                arrays=infos,
                problem=None,
                finished=time.time(),
            )
            status = "done"
        except PlannerError as exc:
            problem = problem_from_planner_error(exc, "plan").to_json()
            store.update_prior(prior_id, status="failed", problem=problem, finished=time.time())
            status = "failed"
        except Exception:
            log.exception("prior %s failed", prior_id)
            problem = Problem(
                500, "internal", "Internal server error", "computing the prior failed (a bug)"
            ).to_json()
            store.update_prior(prior_id, status="failed", problem=problem, finished=time.time())
            status = "failed"
        return {"status": status, "seconds": time.perf_counter() - t0}
    finally:
        store.close()
