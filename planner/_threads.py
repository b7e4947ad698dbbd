"""BLAS thread counts for the search's loops (threadpoolctl)."""

from __future__ import annotations

import os

from threadpoolctl import threadpool_limits

__all__ = ["all_threads", "single_threaded"]


def single_threaded():
    """One BLAS thread: for loops of small products, where a thread pool's start-up and
    synchronisation cost several times the work (measured: 2.5–10× slower with two)."""
    return threadpool_limits(1, user_api="blas")


def all_threads():
    """Every core this process may use, for one large product inside a single-threaded
    loop (a structured kernel's rank-k update of an n × n matrix)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return threadpool_limits(cores, user_api="blas")
