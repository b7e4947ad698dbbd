"""Between stored records and the core: rebuild structures and posteriors, align."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from planner import FORMATS, Plan, PlannerError, Posterior, Structure

from .arrays import write_npy
from .problems import Problem, problem_from_planner_error
from .store import LocalStore, Store, TeacherRecord

__all__ = ["load_gradients", "load_posterior", "run_prior", "structure_from_json"]

log = logging.getLogger("app.jobs")


def structure_from_json(d: dict) -> Structure:
    return Structure.build(
        d["widths"], d["activation"], d["output_activation"], d["bias"], d["kind"]
    )


def load_posterior(store: Store, rec: TeacherRecord) -> Posterior:
    """The teacher's posterior over memory-mapped, already validated float64 arrays."""
    cls = FORMATS[rec.format]
    names = ("mean", *cls.array_names)
    arrays = {
        n: np.load(store.teacher_array(rec.id, n), mmap_mode="r", allow_pickle=False) for n in names
    }
    return cls.from_validated(structure_from_json(rec.structure), arrays)


def load_gradients(store: Store, rec: TeacherRecord) -> np.ndarray | None:
    if "gradients" not in rec.arrays:
        return None
    return np.load(store.teacher_array(rec.id, "gradients"), mmap_mode="r", allow_pickle=False)


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
            aligned = plan.apply(post)
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
                cost=plan.cost(post),
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
