"""Executors: where plans, uploads and priors are computed (SPEC §11).

* :class:`LocalRunner` (the embedded default): a process pool as large as the
  machine (``PLANNER_EXECUTOR=process``) or a thread pool (``thread``).
* :class:`DaskRunner` (``PLANNER_EXECUTOR=dask``): jobs are submitted to a
  Dask distributed scheduler (``PLANNER_DASK_SCHEDULER``) as plain functions of
  ids and a :class:`~app.compute.Config`; workers read and write through the
  same database and storage.

Plans and uploads are awaited (``run``).  A prior is *submitted*
(``submit_prior``) and its row is the truth: the job claims it by a
conditional update, renews a lease while it works and completes it only while
it holds the claim.  Every replica runs a reaper that puts back in the queue
the running priors whose lease expired (their worker died) and hands to its
executor the queued priors whose submission may be lost (with a scheduler or a
replica): duplicate submissions are harmless, the claim admits one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor

from .compute import Config, run_prior
from .problems import Problem
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
    async def run(self, fn, *args):
        """Run ``fn(*args)`` on the executor and await its result (or its exception)."""

    @abstractmethod
    def _submit(self, prior_id: str) -> bool:
        """Hand the prior's job to the executor (fire and forget); False when the
        executor is unreachable (the row stays queued for the reaper)."""

    @abstractmethod
    def alive(self) -> bool: ...

    async def _heal(self) -> None:
        """Reconnect to the executor if the connection was lost (scaled out)."""
        return None

    def submit_prior(self, prior_id: str) -> None:
        if self._submit(prior_id):
            self.store.mark_submitted(prior_id)

    async def reap(self) -> int:
        """One pass of the reaper: (re)submit what the rows say is lost; how many.  The
        rows are read off the event loop; submissions are made on it."""
        ids = await asyncio.to_thread(
            self.store.lost_jobs, time.time(), self.settings.resubmit_seconds
        )
        for pid in ids:
            log.info("handing prior %s to the executor (again)", pid)
            self._submit(pid)
        return len(ids)

    async def _reap_forever(self) -> None:
        sweep_at = 0.0
        while True:
            try:
                await self._heal()
                if self.alive():
                    await self.reap()
                if time.monotonic() > sweep_at:
                    sweep_at = time.monotonic() + self.settings.sweep_seconds
                    await asyncio.to_thread(self.store.sweep, self.settings.sweep_grace)
            except Exception:
                log.warning("the reaper's pass failed", exc_info=True)
            await asyncio.sleep(self.settings.reap_seconds)


# -- the embedded default -------------------------------------------------------------------
def _worker_init(blas_threads: int, server_pid: int) -> None:
    """Each worker: one BLAS thread by default (jobs raise it for large dense problems),
    the core imported before the first job, and a watchdog that ends the worker when
    the server is gone, even killed without a shutdown."""
    from threadpoolctl import threadpool_limits

    import app.compute  # noqa: F401 - pay the imports before the first job

    threadpool_limits(blas_threads)  # stays in force for the worker's life

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True, name="watchdog").start()


def _noop() -> None:
    return None


class LocalRunner(JobRunner):
    """A process (or thread) pool on this machine."""

    def __init__(self, settings: Settings, store: Store, observe=None) -> None:
        super().__init__(settings, store, observe)
        self.executor: Executor | None = None

    async def _start(self) -> None:
        n = self.settings.workers
        if self.settings.executor == "process":
            ctx = multiprocessing.get_context("forkserver")
            self.executor = ProcessPoolExecutor(
                n, mp_context=ctx, initializer=_worker_init, initargs=(1, os.getpid())
            )
            for _ in range(n):  # start the workers now, not on demand
                self.executor.submit(_noop)
        else:
            self.executor = ThreadPoolExecutor(n, thread_name_prefix="job")
        # the embedded executor is the only one on its database: whatever ran or waited
        # before this pool started belonged to a process that is gone
        for pid in self.store.requeue_running():
            log.info("re-queueing prior %s (cut off by a restart)", pid)
        # and so is whatever no row owns: half-written uploads, results of cut-off jobs
        removed = await asyncio.to_thread(self.store.sweep, 0.0)
        if removed:
            log.info("swept %d objects that no record owns", removed)
        for pid in self.store.queued():
            self.submit_prior(pid)

    def _submit(self, prior_id: str) -> bool:
        if self.executor is None:
            return False
        fut = self.executor.submit(run_prior, self.config, prior_id)
        fut.add_done_callback(lambda f: self._done(prior_id, f))
        return True

    def _done(self, prior_id: str, fut: Future) -> None:
        if fut.cancelled():
            return  # shutting down: the prior stays as it is, found again at the next start
        exc = fut.exception()
        if exc is None:
            out = fut.result()
            self.observe(out["status"], out["seconds"])
            return
        log.error("worker for prior %s died: %r (its lease will expire)", prior_id, exc)
        self.observe("failed", 0.0)

    async def run(self, fn, *args):
        if self.executor is None:
            raise RuntimeError("the job runner is not started")
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    def alive(self) -> bool:
        return self.executor is not None

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

    async def _heal(self) -> None:
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

    async def run(self, fn, *args):
        from distributed.client import FutureCancelledError

        if not self.alive():
            raise _unavailable()
        # no retries: a task that raises (a 4xx problem) would only raise again; a task
        # whose worker died is run again by the scheduler itself
        fut = self.client.submit(fn, *args, pure=False, key=self._key(fn.__name__))
        try:
            return await fut
        except FutureCancelledError:  # lost with the scheduler: the request may be retried
            raise _unavailable() from None

    def _submit(self, prior_id: str) -> bool:
        from distributed import fire_and_forget

        if not self.alive():
            return False  # the row stays queued: the reaper submits it once the scheduler is back
        fut = self.client.submit(
            run_prior, self.config, prior_id, pure=False, key=self._key(f"prior-{prior_id}")
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


def runner_for(settings: Settings, store: Store, observe=None) -> JobRunner:
    cls = DaskRunner if settings.executor == "dask" else LocalRunner
    return cls(settings, store, observe)
