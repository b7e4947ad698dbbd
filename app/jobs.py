"""The job runner: priors are computed off the event loop by an executor.

The default executor is a process pool as large as the machine
(``PLANNER_EXECUTOR=thread`` for a thread pool).  A job records its own
transitions (queued → running → done/failed) in the store, so a process pool
needs no back-channel; the done-callback only catches a worker that died.
Jobs cut off by a restart are found at start-up and queued again.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor

from .compute import run_prior
from .problems import Problem
from .settings import Settings
from .store import Store

__all__ = ["JobRunner"]

log = logging.getLogger("app.jobs")


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


class JobRunner:
    def __init__(self, settings: Settings, store: Store, observe=None) -> None:
        self.settings, self.store = settings, store
        self.observe = observe or (lambda status, seconds: None)
        self.executor: Executor | None = None

    def start(self) -> None:
        if self.settings.executor == "process":
            ctx = multiprocessing.get_context("forkserver")
            self.executor = ProcessPoolExecutor(
                self.settings.workers,
                mp_context=ctx,
                initializer=_worker_init,
                initargs=(1, os.getpid()),
            )
            for _ in range(self.settings.workers):  # start the workers now, not on demand
                self.executor.submit(_noop)
        else:
            self.executor = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="prior")
        for rec in self.store.unfinished_priors():  # cut off by a restart
            log.info("re-queueing prior %s (was %s)", rec.id, rec.status)
            self.store.update_prior(rec.id, status="queued", started=None)
            self.submit(rec.id)

    def submit(self, prior_id: str) -> None:
        if self.executor is None:
            raise RuntimeError("the job runner is not started")
        fut = self.executor.submit(run_prior, str(self.settings.data_dir), prior_id)
        fut.add_done_callback(lambda f: self._done(prior_id, f))

    def _done(self, prior_id: str, fut: Future) -> None:
        if fut.cancelled():
            return  # shutting down: the prior stays queued and is re-run at the next start
        exc = fut.exception()
        if exc is None:
            out = fut.result()
            self.observe(out["status"], out["seconds"])
            return
        log.error("worker for prior %s died: %r", prior_id, exc)
        problem = Problem(
            500,
            "internal",
            "Internal server error",
            f"the worker computing the prior died: {exc!r}",
        ).to_json()
        try:
            self.store.update_prior(
                prior_id, status="failed", problem=problem, finished=time.time()
            )
        except Exception:  # the store may be closed at shutdown
            log.exception("could not record the failure of prior %s", prior_id)
        self.observe("failed", 0.0)

    async def run(self, fn, *args):
        """Run ``fn(*args)`` in the executor and await its result (or its exception)."""
        if self.executor is None:
            raise RuntimeError("the job runner is not started")
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    def alive(self) -> bool:
        return self.executor is not None

    def shutdown(self) -> None:
        """Stop at once: queued and running jobs are re-run at the next start."""
        ex, self.executor = self.executor, None
        if ex is None:
            return
        workers = list(getattr(ex, "_processes", {}).values())  # ProcessPoolExecutor only
        ex.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.join(timeout=5)
