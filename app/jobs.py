"""Executors: where plans, uploads and priors are computed (docs/scaling.md).

* :class:`LocalRunner` (the embedded default): a process pool as large as the
  machine (``PLANNER_EXECUTOR=process``) or a thread pool (``thread``).
* :class:`DaskRunner` (``PLANNER_EXECUTOR=dask``): jobs are submitted to a
  Dask distributed scheduler (``PLANNER_DASK_SCHEDULER``) as plain functions of
  ids and a :class:`~app.compute.Config`; workers read and write through the
  same database and storage.

Plans and uploads are awaited (``run``).  A prior, and a plan asked for with
``Prefer: respond-async``, is a *job*, *submitted* (``submit``) by id, and its row
is the truth: the job claims it by a conditional update, renews a lease while it
works and completes it only while it holds the claim.  Every replica runs a reaper
that puts back in the queue the running jobs whose lease expired (their worker
died) and hands to its executor the queued jobs whose submission may be lost (with a scheduler or a
replica): duplicate submissions are harmless, the claim admits one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import secrets
import signal
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .compute import Config, run_plan_job, run_prior, sweep_scratch
from .problems import Problem, memory_problem
from .settings import Settings
from .store import Store

__all__ = ["DaskRunner", "JobRunner", "LocalRunner", "runner_for"]

log = logging.getLogger("app.jobs")


class JobRunner(ABC):
    """What routes need from an executor, and the reaper every replica runs."""

    def __init__(self, settings: Settings, store: Store, observe=None) -> None:
        self.settings, self.store = settings, store
        self.config: Config = settings.config
        self.observe = observe or (lambda status, seconds: None)
        self._reaper: asyncio.Task | None = None

    async def start(self) -> None:
        await self._start()
        self._reaper = asyncio.create_task(self._reap_forever(), name="reaper")

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
        await self._shutdown()

    @abstractmethod
    async def _start(self) -> None: ...

    @abstractmethod
    async def _shutdown(self) -> None: ...

    @abstractmethod
    async def run(self, fn, *args, seconds: float | None = None):
        """Run ``fn(*args)`` on the executor and await its result (or its exception);
        past ``seconds`` (a hard limit, where the executor can enforce one) the job is
        stopped and the call answers a 503 problem."""

    @abstractmethod
    def _submit(self, job_id: str) -> bool:
        """Hand the job (a prior, a plan job) to the executor (fire and forget); False
        when the executor is unreachable (the row stays queued for the reaper)."""

    @abstractmethod
    def alive(self) -> bool: ...

    async def heal(self) -> None:
        """Replace a broken pool, or reconnect to a lost scheduler (scaled out)."""
        return None

    def submit(self, job_id: str) -> None:
        """Hand a queued job to the executor: ``r_…`` a prior, ``j_…`` a plan job."""
        if self._submit(job_id):
            self.store.mark_submitted(job_id)

    async def reap(self) -> int:
        """One pass of the reaper: (re)submit what the rows say is lost; how many.  The
        rows are read off the event loop; submissions are made on it."""
        ids = await asyncio.to_thread(
            self.store.lost_jobs,
            time.time(),
            self.settings.resubmit_seconds,
            100,
            self.settings.max_attempts,
        )
        for pid in ids:
            log.info("handing prior %s to the executor (again)", pid)
            self._submit(pid)
        return len(ids)

    async def _reap_forever(self) -> None:
        sweep_at = 0.0
        while True:
            try:
                await self.heal()
                if self.alive():
                    await self.reap()
                if time.monotonic() > sweep_at:
                    sweep_at = time.monotonic() + self.settings.sweep_seconds
                    await asyncio.to_thread(self.store.sweep, self.settings.sweep_grace)
                    await asyncio.to_thread(
                        sweep_scratch, self.settings.scratch, self.settings.sweep_grace
                    )
            except Exception:
                log.warning("the reaper's pass failed", exc_info=True)
            await asyncio.sleep(self.settings.reap_seconds)


# -- the embedded default -------------------------------------------------------------------
def _worker_init(blas_threads: int, server_pid: int, memory: int | None) -> None:
    """Each worker: one BLAS thread by default (jobs raise it for large dense problems),
    the core imported before the first job, its working memory bounded by the OS
    (``memory`` bytes beyond what it holds now: an allocation past it is a
    ``MemoryError`` in the job, not the kernel's OOM killer on the machine), SIGALRM at
    its default action (a job's hard time limit ends the worker), and a watchdog that
    ends the worker when the server is gone, even killed without a shutdown."""
    from threadpoolctl import threadpool_limits

    import app.compute  # noqa: F401 - pay the imports before the first job

    threadpool_limits(blas_threads)  # stays in force for the worker's life
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if memory:
        limit_data(memory)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True, name="watchdog").start()


def limit_data(extra: int) -> int:
    """Bound this process's private writable memory (``RLIMIT_DATA``: the heap and
    anonymous maps, where numpy's arrays live; not read-only file maps such as a
    teacher's memory-mapped arrays) to what it holds now plus ``extra`` bytes."""
    used = 0
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                used = int(line.split()[1]) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = used + int(extra)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


def guarded(seconds: float | None, fn, *args):
    """Run ``fn(*args)`` in a pool worker under a hard time limit: SIGALRM, whose default
    action ends the process whatever it is doing (a step stuck in native code too); the
    server sees the worker die and replaces the pool.  A ``MemoryError`` (the worker's
    memory limit, or a device's: planner.backend) becomes a problem that names the limit.
    ``seconds`` None (threads, Dask workers): no time limit, the same problem."""
    if seconds:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    except MemoryError as exc:
        raise memory_problem(exc) from None
    finally:
        if seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _noop() -> None:
    return None


def _death(code: int | None) -> str:
    if code == -signal.SIGALRM:
        return "it ran past its hard time limit"
    if code == -signal.SIGKILL:
        return "it was killed (most often by the kernel, out of memory)"
    if code is not None and code < 0:
        return f"it died of signal {signal.Signals(-code).name}"
    return f"it exited with code {code}"


class LocalRunner(JobRunner):
    """A process (or thread) pool on this machine.

    A worker that dies (out of memory, past its hard time limit, killed) breaks a
    ``ProcessPoolExecutor`` for every later job; the runner notices at once (the failed
    job, the next submission, or the reaper's pass) and replaces the pool: the job that
    was running answers a 503 problem that says why, a prior is queued again (failed
    after ``PLANNER_MAX_ATTEMPTS``), and the next request works.
    """

    def __init__(self, settings: Settings, store: Store, observe=None) -> None:
        super().__init__(settings, store, observe)
        self.executor: Executor | None = None
        self._lock = threading.Lock()
        self.last_death: str | None = None

    @property
    def _processes(self) -> bool:
        return self.settings.executor == "process"

    def _new_pool(self) -> Executor:
        n = self.settings.workers
        if not self._processes:
            return ThreadPoolExecutor(n, thread_name_prefix="job")
        ctx = multiprocessing.get_context("forkserver")
        ex = ProcessPoolExecutor(
            n,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(1, os.getpid(), self.settings.job_memory),
        )
        for _ in range(n):  # start the workers now, not on demand
            ex.submit(_noop)
        return ex

    async def _start(self) -> None:
        self.executor = self._new_pool()
        # the embedded executor is the only one on its database: whatever ran or waited
        # before this pool started belonged to a process that is gone
        for pid in self.store.requeue_running(self.settings.max_attempts):
            log.info("re-queueing prior %s (cut off by a restart)", pid)
        # and so is whatever no row owns: half-written uploads, results of cut-off jobs
        removed = await asyncio.to_thread(self.store.sweep, 0.0)
        removed += await asyncio.to_thread(sweep_scratch, self.settings.scratch, 0.0)
        if removed:
            log.info("swept %d objects and workspaces that nothing owns", removed)
        for pid in self.store.queued():
            self.submit(pid)

    def _replace(self, broken: Executor) -> str:
        """Replace ``broken`` (once, whoever notices first); why its worker died."""
        with self._lock:
            if self.executor is not broken:
                return self.last_death or "a worker died"
            procs = dict(getattr(broken, "_processes", None) or {})  # ProcessPoolExecutor's
            dead = [p.exitcode for p in procs.values() if p.exitcode not in (None, 0)]
            why = _death(dead[0]) if dead else "a worker died"
            log.error("a pool worker died (%s; %d workers): replacing the pool", why, len(procs))
            self.executor = self._new_pool()
            self.last_death = why
        broken.shutdown(wait=False, cancel_futures=True)
        return why

    def _broken(self) -> bool:
        return bool(getattr(self.executor, "_broken", False))

    async def heal(self) -> None:
        ex = self.executor
        if ex is not None and self._broken():
            await asyncio.to_thread(self._replace, ex)

    def _limit(self, seconds: float | None) -> float | None:
        return seconds if self._processes else None

    def _call(self, seconds: float | None, fn, *args) -> tuple[Future, Executor]:
        """Submit to the current pool, replacing it first if it is already broken; the
        future and the pool it runs in."""
        for _ in range(2):
            ex = self.executor
            if ex is None:
                raise RuntimeError("the job runner is not started")
            try:  # threads: no hard limit (_limit), but the same answer to MemoryError
                return ex.submit(guarded, seconds, fn, *args), ex
            except BrokenProcessPool:
                self._replace(ex)
        raise _worker_lost("the process pool could not be restarted")

    def _submit(self, job_id: str) -> bool:
        if self.executor is None:
            return False
        fut, ex = self._call(
            self._limit(self.settings.job_seconds), job_of(job_id), self.config, job_id
        )
        fut.add_done_callback(lambda f: self._done(job_id, f, ex))
        return True

    def _done(self, job_id: str, fut: Future, ex: Executor) -> None:
        if fut.cancelled():
            return  # shutting down: the job stays as it is, found again at the next start
        exc = fut.exception()
        if exc is None:
            out = fut.result()
            self.observe(out["status"], out["seconds"])
            return
        self.observe("failed", 0.0)
        if not isinstance(exc, BrokenProcessPool) or self.executor is None:
            log.error("worker for job %s failed: %r (its lease will expire)", job_id, exc)
            return
        why = self._replace(ex)
        # the pool's workers are all gone: the job's claim, if it was claimed, is nobody's
        status = self.store.release(job_id, self.settings.max_attempts)
        if status == "queued":  # put back, or never claimed: hand it over again
            log.warning("job %s lost its worker (%s): queued again", job_id, why)
            self.submit(job_id)
        elif status == "failed":
            log.error("job %s lost its worker (%s) too often: failed", job_id, why)

    async def run(self, fn, *args, seconds: float | None = None):
        fut, ex = self._call(self._limit(seconds), fn, *args)
        try:
            return await asyncio.wrap_future(fut)
        except BrokenProcessPool:
            why = await asyncio.to_thread(self._replace, ex)
            raise _worker_lost(f"the worker computing this request died: {why}") from None

    def alive(self) -> bool:
        return self.executor is not None and not self._broken()

    async def _shutdown(self) -> None:
        """Stop at once: queued and running jobs are found again at the next start."""
        ex, self.executor = self.executor, None
        if ex is None:
            return
        workers = list(getattr(ex, "_processes", {}).values())  # ProcessPoolExecutor only
        ex.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.join(timeout=5)


def _worker_lost(detail: str) -> Problem:
    return Problem(
        503,
        "worker-lost",
        "Worker lost",
        f"{detail}; the pool was replaced and the service is ready for the next request",
        headers={"Retry-After": "1"},
    )


# -- scaled out ------------------------------------------------------------------------------
class DaskRunner(JobRunner):
    """Jobs on a Dask distributed cluster; nothing large travels through the scheduler."""

    def __init__(self, settings: Settings, store: Store, observe=None) -> None:
        super().__init__(settings, store, observe)
        self.client = None
        self._pending: set = set()

    async def _start(self) -> None:
        if not self.settings.dask_scheduler:
            raise RuntimeError("PLANNER_EXECUTOR=dask needs PLANNER_DASK_SCHEDULER")
        await self._connect()

    async def _connect(self) -> None:
        from distributed import Client

        self.client = await Client(
            self.settings.dask_scheduler, asynchronous=True, timeout="30s", set_as_default=False
        )

    async def heal(self) -> None:
        """A client that gave up on a lost scheduler (after its own 30 s of retries) is
        replaced by a new one; what it had submitted is found again by the reaper."""
        if self.client is not None and self.client.status in ("running", "connecting"):
            return
        old, self.client = self.client, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        try:
            await self._connect()
            log.info("reconnected to the Dask scheduler %s", self.settings.dask_scheduler)
        except Exception:
            log.warning("the Dask scheduler %s is unreachable", self.settings.dask_scheduler)

    def _key(self, what: str) -> str:
        return f"{what}-{secrets.token_hex(8)}"

    async def run(self, fn, *args, seconds: float | None = None):
        from distributed.client import FutureCancelledError

        if not self.alive():
            raise _unavailable()
        # no retries: a task that raises (a 4xx problem) would only raise again; a task
        # whose worker died is run again by the scheduler itself
        # guarded without a time limit (a worker's thread cannot be stopped by a signal):
        # a MemoryError (the host's or a GPU's, planner.backend) is a 413 problem here too
        fut = self.client.submit(guarded, None, fn, *args, pure=False, key=self._key(fn.__name__))
        try:
            return await asyncio.wait_for(fut, seconds)
        except TimeoutError:  # a Dask worker's thread cannot be killed: drop the task
            with contextlib.suppress(Exception):
                await self.client.cancel(fut)
            raise _worker_lost("the job ran past its hard time limit and was cancelled") from None
        except FutureCancelledError:  # lost with the scheduler: the request may be retried
            raise _unavailable() from None

    def _submit(self, job_id: str) -> bool:
        from distributed import fire_and_forget

        if not self.alive():
            return False  # the row stays queued: the reaper submits it once the scheduler is back
        fut = self.client.submit(
            job_of(job_id), self.config, job_id, pure=False, key=self._key(f"job-{job_id}")
        )
        fire_and_forget(fut)  # the scheduler keeps it even if this replica goes away
        return True

    def alive(self) -> bool:
        return self.client is not None and self.client.status == "running"

    def workers(self) -> int:
        if not self.alive():
            return 0
        try:
            return len(self.client.scheduler_info().get("workers", {}))
        except Exception:
            return 0

    async def _shutdown(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


def _unavailable() -> Problem:
    return Problem(
        503,
        "unavailable",
        "Executor unavailable",
        "the job executor (Dask scheduler) is not reachable; retry shortly",
        headers={"Retry-After": "5"},
    )


def job_of(job_id: str):
    """The function that runs a job, by the kind of its id."""
    return {"r": run_prior, "j": run_plan_job}[job_id[0]]


def runner_for(settings: Settings, store: Store, observe=None) -> JobRunner:
    cls = DaskRunner if settings.executor == "dask" else LocalRunner
    return cls(settings, store, observe)
