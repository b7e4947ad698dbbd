"""Jobs: plain functions of ids and a :class:`Config`, run wherever the executor puts them.

A worker (a process of the local pool, or a Dask worker on another machine)
reaches the service's state through the same seams as the API: the database
for rows, the storage for arrays (``Config`` carries their URLs; one
:class:`~app.store.Store` per process).  Nothing large travels with a job.

* :func:`run_plan` searches (or scores given ``ops``) and returns the plan.
* :func:`run_prior` claims a queued prior by a conditional update, renews its
  lease while it works, writes the arrays under its own claim's prefix and
  completes the row only if it still holds the claim: a prior never completes
  twice, and a job whose worker died is found by its expired lease and run
  again (``app.jobs``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass

from planner import (
    FORMATS,
    InvalidPlan,
    Network,
    Plan,
    PlannerError,
    Posterior,
    Structure,
    backend,
    step_costs,
)
from planner._threads import limited as limited_threads
from planner.criteria import criterion_function
from planner.network_lattice import NetRoute
from planner.search import search, search_budget
from planner.search.budgets import params_for

from .problems import Problem, memory_problem, problem_from_planner_error
from .schemas import structure_json
from .storage import Storage
from .store import PlanRecord, Store, TeacherRecord, new_id

__all__ = [
    "Config",
    "load_posterior",
    "plan_record",
    "run_plan",
    "run_plan_job",
    "run_prior",
    "run_steps",
    "scratch",
    "store_for",
    "structure_from_json",
    "sweep_scratch",
    "workspace_prefix",
]

log = logging.getLogger("app.jobs")


@dataclass(frozen=True)
class Config:
    """Where a job finds the service's state: plain, picklable data."""

    database_url: str
    storage_url: str
    #: a worker's local scratch space (validation workspaces, copies of remote arrays)
    scratch_dir: str | None = None
    #: how long a claim holds without a renewal (a dead worker's job is run again after it)
    lease_seconds: float = 30.0
    #: most bytes of remote arrays a process keeps copies of (``PLANNER_CACHE_BYTES``
    #: in a worker's environment overrides it)
    cache_bytes: int = 16 * 2**30
    #: where dense kernels run (``planner.backend``): None numpy, "cpu"/"cuda" torch;
    #: ``PLANNER_DEVICE`` in a worker's environment overrides it
    device: str | None = None


_STORES: dict[Config, Store] = {}
_STORES_LOCK = threading.Lock()


def scratch(config: Config) -> str:
    """This process's scratch space: ``PLANNER_SCRATCH_DIR`` when set (a worker's own),
    else the replica's when it is writable here, else the system's temporary folder."""
    for d in (os.environ.get("PLANNER_SCRATCH_DIR"), config.scratch_dir):
        if d:
            try:
                os.makedirs(d, exist_ok=True)
            except OSError:
                continue
            if os.access(d, os.W_OK):
                return d
    import tempfile

    return tempfile.gettempdir()


#: A job's workspace in the scratch space: ``work-<pid>-<random>`` (the pid says whose).
_WORKSPACE = re.compile(r"^work-(\d+)-")


def workspace_prefix() -> str:
    """The prefix of a job's temporary workspace (its process is named in it)."""
    return f"work-{os.getpid()}-"


def sweep_scratch(directory: str | os.PathLike, grace: float) -> int:
    """Remove the job workspaces left in ``directory`` by processes that are gone (a
    worker killed mid-validation), and temporary folders of older versions once older
    than ``grace`` seconds; how many were removed.  Run at start-up and with every
    storage sweep."""
    import shutil

    removed, now = 0, time.time()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False) or entry.name == "cache":
            continue
        m = _WORKSPACE.match(entry.name)
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if m is not None:  # a job's: once its process is gone (or a day old: pids recur)
            doomed = not _alive(int(m.group(1))) or age > 86400
        else:  # a temporary folder of an older version
            doomed = age > grace and entry.name.startswith("tmp")
        if doomed:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def use_device(config: Config) -> None:
    """Select this process's backend for dense kernels: the worker's own
    ``PLANNER_DEVICE`` if set, else the service's."""
    backend.select(os.environ.get("PLANNER_DEVICE") or config.device)


def store_for(config: Config) -> Store:
    """The process's store for ``config`` (one engine per process, reused by every job);
    also selects the process's dense backend (:func:`use_device`)."""
    use_device(config)
    with _STORES_LOCK:
        store = _STORES.get(config)
        if store is None:
            cache = int(os.environ.get("PLANNER_CACHE_BYTES") or config.cache_bytes)
            cache_dir = os.path.join(scratch(config), "cache")
            storage = Storage(config.storage_url, cache_dir=cache_dir, cache_bytes=cache)
            store = _STORES[config] = Store(config.database_url, storage, migrate_schema=False)
        return store


def structure_from_json(d: dict) -> Structure | Network:
    """The structure a stored record describes (``schemas.structure_json``'s form)."""
    if d.get("kind") == "network":
        return Network.from_json(d)
    return Structure.build(
        d["widths"], d["activation"], d["output_activation"], d["bias"], d["kind"]
    )


def load_posterior(store: Store, rec: TeacherRecord) -> Posterior:
    """The teacher's posterior over memory-mapped, already validated float64 arrays (and
    the derived arrays kept beside them, such as a precision's Cholesky factor)."""
    cls = FORMATS[rec.format]
    structure = structure_from_json(rec.structure)
    names = [*cls.names(structure), *(n for n in cls.derived_names(structure) if n in rec.arrays)]
    arrays = {n: store.load_teacher_array(rec, n) for n in names}
    return cls.from_validated(structure, arrays)


def _teacher_posterior(store: Store, teacher_id: str, what: str, ident: str):
    """(record, posterior) of a teacher for a job; 404 (as ``what`` ``ident``) when it was
    deleted, before or while its arrays were opened."""
    rec = store.teacher_for_job(teacher_id)
    if rec is None:
        raise Problem.not_found(what, ident)
    try:
        return rec, load_posterior(store, rec)
    except FileNotFoundError:  # deleted while the request was on its way
        raise Problem.not_found(what, ident) from None


#: Dense problems from this many parameters on gain from threaded BLAS.
_THREADED_FROM = 1500


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a pinned
    worker's share, not the whole machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def blas_threads(post: Posterior) -> int:
    """BLAS threads for one job: all of this process's cores for large dense problems,
    else one (small problems gain nothing from threads and lose much when jobs run side
    by side)."""
    dense = post.format in ("full", "precision")
    return cores() if dense and post.n >= _THREADED_FROM else 1


def run_plan(config: Config, teacher_id: str, request: dict, stop=None) -> dict:
    """Search (or validate and score ``ops``) for a plan ``request``, as ``POST …/plans``
    builds it: ``student`` (its JSON), ``criterion``, ``seed``, ``ops``, ``seconds`` (the
    search's wall-clock safety net), ``effort``, ``memory`` (what its improvement may
    hold) and ``max_ops`` (the longest plan answered).  ``stop`` cancels the search once
    it returns True.  Raises ``PlannerError`` for bad requests."""
    store = store_for(config)
    rec, post = _teacher_posterior(store, teacher_id, "teacher", teacher_id)
    with limited_threads(blas_threads(post)):
        out = _plan(post, store, rec, request, stop)
    max_ops = request.get("max_ops")
    if max_ops is not None and len(out["ops"]) > max_ops:
        raise Problem(
            413,
            "too-large",
            "Plan too long",
            f"the plan has {len(out['ops'])} operations; this service answers plans of at "
            f"most {max_ops} (PLANNER_MAX_PLAN_OPS): ask for a student closer to the teacher",
            field="student",
        )
    return out


def _plan(post, store, rec, request: dict, stop) -> dict:
    ops, seconds, effort = request["ops"], request["seconds"], request["effort"]
    budget = request.get("budget")
    target = None if budget is not None else structure_from_json(request["student"])
    if ops is not None:
        plan = Plan.from_json(post.structure, ops)
        if plan.student != target:
            raise InvalidPlan(
                f"the ops lead to {plan.student.describe()}, not the requested {target.describe()}",
                field="ops",
            )
        cost, stats = plan.cost(post), None
    else:
        crit = criterion_function(request["criterion"])
        grads = (
            store.load_teacher_array(rec, "gradients")
            if crit.needs_gradients and "gradients" in rec.arrays
            else None
        )
        options = {
            "seed": request["seed"],
            "gradients": grads,
            "seconds": seconds,
            "effort": effort,
            "memory": request.get("memory"),
            "stop": stop,
        }
        if budget is not None:
            found = search_budget(
                post,
                params_for(post.structure, budget["max_params"], budget["keep"]),
                floors={int(k): v for k, v in budget["floors"].items()},
                criterion=crit,
                **options,
            )
        else:
            found = search(post, target, crit, **options)
        plan, cost = found.plan, found.cost
        stats = {
            "route": _route_json(found.route),
            "routes": found.routes_considered,
            "routes_built": found.routes_built,
            "evaluations": found.evaluations,
            "work": found.work,
            "exhaustive": found.exhaustive,
            "cut": found.cut,
            "cut_by": found.cut_by,
            "seconds": seconds,
            "effort": effort,
        }
    c = plan.compiled
    return {
        "student": structure_json(plan.student),
        "ops": plan.to_json(),
        "cost": float(cost),
        "info": {
            "conditioned": int(c.n_conditioned),
            "provenance": [p.to_json() for p in c.provenance],
            "search": stats,
            **({"surviving": c.surviving} if isinstance(plan.teacher, Network) else {}),
        },
    }


def _route_json(route) -> list | dict | None:
    """An MLP's route as its blocks of teacher positions; a network's as the teacher blocks
    (and plain layers, when any) it leaves out."""
    if route is None:  # a plan by budget whose search was cut: the greedy's plan
        return None
    if isinstance(route, NetRoute):
        return route.to_json()
    return [list(b) for b in route.blocks]


def plan_record(owner: str, teacher_id: str, request: dict, out: dict) -> PlanRecord:
    """The record of a plan computed for ``request`` (what ``POST …/plans`` carries:
    ``student``, ``criterion``, ``seed``, ``ops``), from :func:`run_plan`'s answer."""
    searched = request.get("ops") is None
    return PlanRecord(
        new_id("p"),
        owner,
        teacher_id,
        out["student"],
        request["criterion"] if searched else None,
        request["seed"] if searched else None,
        out["ops"],
        out["cost"],
        out["info"],
        time.time(),
    )


def run_plan_job(config: Config, job_id: str) -> dict:
    """A plan requested with ``Prefer: respond-async``: claimed like a prior, searched
    under a lease (a replica or worker lost mid-search loses no plan: the job is run
    again), stopped as soon as it is cancelled, and recorded with its plan in one
    transaction only while the claim holds.  Returns ``{"status", "seconds"}``."""

    def work(store: Store, job, token: str, lease: _Lease) -> str:
        req = job.request
        out = run_plan(config, job.teacher_id, req, stop=lease.lost.is_set)
        plan = plan_record(job.owner, job.teacher_id, req, out)
        return "done" if store.complete_plan_job(job_id, token, plan) else "lost"

    return _claimed(config, job_id, work, "the search failed (a bug)")


def run_steps(config: Config, plan_id: str) -> list[dict] | None:
    """The cost each run of a plan's steps adds (``planner.step_costs``: exact prefix
    differences), computed when first asked for (the plan page, ``GET …/steps``) and
    kept in the plan's row; never part of a plan request, which costs what its search
    costs."""
    store = store_for(config)
    plan_rec = store.plan_for_job(plan_id)
    if plan_rec is None:
        raise Problem.not_found("plan", plan_id)
    _, post = _teacher_posterior(store, plan_rec.teacher_id, "plan", plan_id)
    plan = Plan.from_json(post.structure, plan_rec.ops)
    with limited_threads(blas_threads(post)):
        steps = step_costs(plan, post)
    store.set_plan_steps(plan_id, steps)
    return steps


class _Lease:
    """Renews a claim's lease in the background; ``lost`` once another claim took it."""

    def __init__(self, store: Store, prior_id: str, token: str, seconds: float) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(seconds / 3):
                try:
                    if not store.renew(prior_id, token, seconds):
                        self.lost.set()
                        return
                except Exception:  # a database hiccup: try again at the next beat
                    log.warning("could not renew the lease of prior %s", prior_id, exc_info=True)

        self._thread = threading.Thread(target=beat, daemon=True, name=f"lease-{prior_id}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _claimed(config: Config, job_id: str, work, bug: str, field: str | None = None, lost=None):
    """Run a job (a prior, a plan job) if it can be claimed: ``work(store, record, token,
    lease)`` returns its status while the lease is renewed in the background; a failure
    is recorded on the job as a problem (``field`` prefixing a core error's), never
    raised.  ``lost(store, token)`` cleans up when another claim took the job over.
    Returns ``{"status", "seconds"}`` (``skipped`` when the job could not be claimed)."""
    t0 = time.perf_counter()
    store = store_for(config)
    token = secrets.token_hex(8)
    rec = store.claim(job_id, token, config.lease_seconds)
    if rec is None:
        return {"status": "skipped", "seconds": time.perf_counter() - t0}
    lease = _Lease(store, job_id, token, config.lease_seconds)
    try:
        try:
            status = work(store, rec, token, lease)
        except (PlannerError, Problem, MemoryError) as exc:
            if isinstance(exc, MemoryError):  # the job's own bound, or its device's
                problem = memory_problem(exc)
            elif isinstance(exc, Problem):
                problem = exc
            else:
                problem = problem_from_planner_error(exc, field or "")
            failed = store.complete(job_id, token, status="failed", problem=problem.to_json())
            status = "failed" if failed else "lost"
        except Exception:
            log.exception("job %s failed", job_id)
            problem = Problem(500, "internal", "Internal server error", bug).to_json()
            failed = store.complete(job_id, token, status="failed", problem=problem)
            status = "failed" if failed else "lost"
        if status == "lost" and lost is not None:  # another claim took over
            lost(store, token)
        return {"status": status, "seconds": time.perf_counter() - t0}
    finally:
        lease.stop()


def run_prior(config: Config, prior_id: str) -> dict:
    """Compute one prior if it can be claimed; the row records the outcome.

    Returns ``{"status", "seconds"}`` (``skipped`` when another claim holds it,
    ``gone`` when it was deleted); never raises for a failure of the computation
    itself, which is recorded on the prior as a problem.
    """

    def work(store: Store, rec, token: str, lease: _Lease) -> str:
        location = f"priors/{prior_id}/{token}"
        plan_rec = store.plan_for_job(rec.plan_id)
        teacher = store.teacher_for_job(plan_rec.teacher_id) if plan_rec else None
        if plan_rec is None or teacher is None:  # deleted meanwhile: nothing to record
            return "gone"
        post = load_posterior(store, teacher)
        plan = Plan.from_json(post.structure, plan_rec.ops)
        with limited_threads(blas_threads(post)):
            aligned = plan.apply(post)
        infos = {}
        for name, arr in aligned.to_arrays().items():
            sha, size = store.storage.put_npy(f"{location}/{name}.npy", arr)
            infos[name] = {
                "shape": list(arr.shape),
                "dtype": "float64",
                "bytes": size,
                "sha256": sha,
            }
        done = store.complete(
            prior_id,
            token,
            status="done",
            cost=plan_rec.cost,  # computed when the plan was made
            arrays=infos,
            location=location,
            problem=None,
        )
        return "done" if done else "lost"

    def lost(store: Store, token: str) -> None:  # our arrays are nobody's
        store.storage.delete(f"priors/{prior_id}/{token}")

    return _claimed(config, prior_id, work, "computing the prior failed (a bug)", "plan", lost)
