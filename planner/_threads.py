"""BLAS thread counts for the search's loops (threadpoolctl).

One :class:`~threadpoolctl.ThreadpoolController` is kept for the process: building
one scans the loaded libraries (about 0.45 ms), switching a limit with it costs
about 13 µs, so a loop may switch for each of its large products.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext

from threadpoolctl import ThreadpoolController

__all__ = ["THREADED_PRODUCT", "all_threads", "limited", "product", "single_threaded", "split"]

_controller: ThreadpoolController | None = None
#: BLAS thread counts in force where each enclosing ``single_threaded`` began
_outer: list[int] = []
#: Python threads for :func:`split`, by count (numpy releases the GIL in its kernels);
#: a forked child (a service's pool worker) has none of its parent's threads: new ones
_pools: dict[int, ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_pools.clear)


def _libraries() -> ThreadpoolController:
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller


def _blas() -> ThreadpoolController:
    return _libraries().select(user_api="blas")


def limited(n: int):
    """Every thread pool (BLAS, OpenMP) limited to ``n`` threads, for one service job
    (``threadpool_limits`` would scan the loaded libraries at every call: 1.6 ms, a
    tenth of a small plan request)."""
    return _libraries().limit(limits=n)


@contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS thread: for loops of small products, where a thread pool's start-up and
    synchronisation cost several times the work (measured: 2.5–10× slower with two)."""
    blas = _blas()
    _outer.append(max((c.num_threads for c in blas.lib_controllers), default=1))
    try:
        with blas.limit(limits=1):
            yield
    finally:
        _outer.pop()


def all_threads():
    """The BLAS threads in force outside the innermost ``single_threaded``, for one large
    product inside a single-threaded loop; outside any, the threads in force stay (a
    caller's own limit, such as a service job's, is kept)."""
    return _blas().limit(limits=_outer[-1]) if _outer else nullcontext()


#: Multiply-adds from which a product inside a single-threaded loop runs on every core
#: (measured: two threads are 1.6–1.7× faster from 10 × 300 × 1,000 to 30 × 4,500 × 8,000;
#: switching costs about 30 µs).
THREADED_PRODUCT = 2e6


def product(A, B):
    """``A @ B``, on every core (:func:`all_threads`) when it is large enough to gain
    (:data:`THREADED_PRODUCT`): for the few large products inside a greedy's
    single-threaded loop."""
    if A.shape[0] * A.shape[1] * B.shape[1] >= THREADED_PRODUCT:
        with all_threads():
            return A @ B
    return A @ B


def split(work: Callable[[int, int], None], n: int) -> None:
    """``work(start, stop)`` over ``range(n)`` cut into one part per BLAS thread in force
    outside the innermost ``single_threaded``, each part in its own Python thread with
    one BLAS thread: for a batch of mid-sized products, which one BLAS call per item
    runs at half the machine's speed with every thread (each too small to share) and
    at full speed with one thread per item (measured: sixteen 226 × 226 Gram matrices
    on two cores, 9.8 ms as one batched product on both threads, 3.9 ms in two
    parts).  Outside any ``single_threaded``, or with one thread, it runs inline."""
    parts = min(_outer[-1] if _outer else 1, n)
    if parts <= 1:
        work(0, n)
        return
    pool = _pools.get(parts)
    if pool is None:
        pool = _pools[parts] = ThreadPoolExecutor(parts - 1, thread_name_prefix="planner")
    cuts = [n * i // parts for i in range(parts + 1)]
    rest = [pool.submit(work, a, b) for a, b in itertools.pairwise(cuts[1:])]
    try:
        work(cuts[0], cuts[1])  # the first part on the calling thread
    finally:
        wait(rest)  # no part still writes once this returns or raises
    for f in rest:
        f.result()
