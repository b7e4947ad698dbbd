"""planner._openblas: on AVX-512 machines the SkylakeX kernels never run threaded under
planner, and no warning is raised on any path (bench/openblas_check.py is the defect's
reproducer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
PROBE = (
    "import json; from threadpoolctl import threadpool_info;"
    "print(json.dumps([(i.get('architecture'), i['num_threads']) for i in threadpool_info()"
    " if i['internal_api'] == 'openblas']))"
)


def _run(first: str) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"{first}; {PROBE}"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.splitlines()[-1])


def test_planner_first_never_loads_the_skylakex_kernels():
    assert all(arch != "SkylakeX" for arch, _ in _run("import planner, numpy"))


def test_numpy_first_runs_skylakex_single_threaded_without_a_warning():
    # -W error: a warning would fail the child; SkylakeX kernels, if loaded, run one thread
    for arch, threads in _run("import numpy, planner"):
        assert arch != "SkylakeX" or threads == 1, (arch, threads)


def _env_after(first: str, **env: str) -> str | None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    out = subprocess.run(
        [sys.executable, "-c", f"{first}; import os, json; "
         "print(json.dumps(os.environ.get('OPENBLAS_THREAD_TIMEOUT')))"],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.splitlines()[-1])


def test_idle_workers_sleep_soon_unless_the_user_chose():
    from planner._openblas import THREAD_TIMEOUT

    assert _env_after("import planner") == str(THREAD_TIMEOUT)
    assert _env_after("import planner", OPENBLAS_THREAD_TIMEOUT="24") == "24"
    # numpy first: OpenBLAS has read its environment already, so nothing is pretended
    assert _env_after("import numpy, planner") is None


def test_a_large_product_takes_the_callers_threads_never_more():
    """``all_threads`` inside a one-thread loop restores the threads in force outside it;
    outside any loop it keeps the caller's own limit (a service job's, say)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from planner._threads import all_threads, single_threaded

    def threads() -> int:
        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    with threadpool_limits(2, user_api="blas"):
        outside = threads()  # 2 where OpenBLAS may run two threads
        with single_threaded():
            assert threads() == 1
            with all_threads():
                assert threads() == outside
            assert threads() == 1
    with threadpool_limits(1, user_api="blas"):
        with all_threads():
            assert threads() == 1
        with single_threaded(), all_threads():
            assert threads() == 1


def test_split_work_covers_every_item_once_in_the_callers_threads():
    """``split`` cuts a batch into one part per thread the caller allows (its limit outside
    the one-thread loop), never more, and runs it inline outside any loop."""
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    from planner._threads import single_threaded, split

    def run(n: int) -> list[tuple[int, int, str]]:
        parts: list[tuple[int, int, str]] = []
        split(lambda a, b: parts.append((a, b, threading.current_thread().name)), n)
        return sorted(parts)

    with threadpool_limits(2, user_api="blas"):
        outside = max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        parts = run(7)
        assert [(a, b) for a, b, _ in parts] == [(0, 7)]  # no loop: inline, one part
        assert parts[0][2] == threading.current_thread().name
        with single_threaded():
            for n in (1, 2, 7):
                parts = run(n)
                assert len(parts) == min(outside, n)
                cuts = [a for a, _, _ in parts] + [n]
                assert cuts[0] == 0 and [b for _, b, _ in parts] == cuts[1:]  # each item once
    with threadpool_limits(1, user_api="blas"), single_threaded():
        assert len(run(5)) == 1


def test_split_work_runs_in_a_forked_child():
    """A child forked after ``split`` made its threads (a service's pool worker) still runs
    it: the parent's threads are not in the child, which makes its own."""
    import multiprocessing

    assert _split_in_child()  # the parent's threads, made
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_split_in_child).get(timeout=30)


def _split_in_child() -> bool:
    from threadpoolctl import threadpool_limits

    from planner._threads import single_threaded, split

    seen: list[int] = []
    with threadpool_limits(2, user_api="blas"), single_threaded():
        split(lambda a, b: seen.extend(range(a, b)), 6)
    return sorted(seen) == list(range(6))
