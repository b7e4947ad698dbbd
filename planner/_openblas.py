"""A workaround for an OpenBLAS defect on AVX-512 machines, applied before numpy loads.

OpenBLAS picks its ``SkylakeX`` kernels on CPUs with AVX-512 (Intel Skylake-X and
later, AMD Zen 4).  Their threaded level-3 routines corrupt the heap on large
problems (OpenBLAS issue #2562).  Checked again with the numpy that ``make``
installs (numpy 2.4.6, OpenBLAS 0.3.31; scipy's 0.3.30), on this project's AMD EPYC
machines, by ``bench/openblas_check.py``: with the SkylakeX kernels and two threads,
the Cholesky factorisation of ``U Uᵀ + I`` (20,300 × 20,300, clearly positive
definite) reports a non-positive leading minor and the process then dies of a
segmentation fault; with the ``Haswell`` kernels (AVX2) it succeeds, at the same
speed.  So the workaround stays.

:func:`configure` sets ``OPENBLAS_CORETYPE=Haswell`` when the variable is unset,
the machine is x86-64 with AVX-512, and numpy has not been imported yet (the
variable is read once, when OpenBLAS loads): ``import planner`` before numpy, as
the service, the benchmarks and the tests do, and nothing else happens.  When
numpy came first and runs the SkylakeX kernels, the kernels cannot be changed any
more: OpenBLAS is then limited to one thread in this process (the defect is in the
threaded routines), which is correct and slower on large dense problems; the
``planner`` logger says so at INFO level, never as a warning.  Set
``OPENBLAS_CORETYPE`` yourself to choose otherwise.

:func:`configure` also sets ``OPENBLAS_THREAD_TIMEOUT=16`` when it is unset (any
machine, numpy not imported yet).  OpenBLAS's idle worker threads otherwise spin for
2²⁸ cycles (about 0.1 s) after every threaded product, and the search's loops are
single-threaded between their large products (``planner._threads``): on this
project's 2-core machines the spinning worker slowed the loop's own thread so much
that threading a greedy's products made a Table-1 search 1.5× slower instead of
faster.  With 2¹⁶ cycles the workers sleep between products; large factorisations,
whose threads stay busy, run at the same speed (``docs/benchmarks.md``).
"""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["configure", "settle"]


def _avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        return False
    return False


#: log2 of the cycles an idle OpenBLAS worker spins before it sleeps (OpenBLAS: 28)
THREAD_TIMEOUT = 16


def configure() -> bool:
    """Choose the Haswell kernels where the SkylakeX ones would be used; True if set.
    Too late (numpy loaded first, OpenBLAS on SkylakeX kernels): OpenBLAS is limited to
    one thread instead.  Idle workers sleep after ``THREAD_TIMEOUT`` (module doc)."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", str(THREAD_TIMEOUT))
    if "OPENBLAS_CORETYPE" in os.environ:
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or not _avx512():
        return False
    if "numpy" in sys.modules:
        global _TOO_LATE
        _TOO_LATE = True  # settle() acts once planner's own imports (scipy) are loaded
        return False
    os.environ["OPENBLAS_CORETYPE"] = "Haswell"
    return True


_TOO_LATE = False


def settle() -> None:
    """After planner's imports: if numpy came first and an OpenBLAS loaded (numpy's,
    scipy's) runs the SkylakeX kernels, limit OpenBLAS to one thread."""
    if _TOO_LATE:
        _single_thread_if_skylakex()


def _single_thread_if_skylakex() -> None:
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        infos = threadpool_info()
        skx = [i for i in infos if i["internal_api"] == "openblas"]
        if not any(i.get("architecture") == "SkylakeX" for i in skx):
            return
        threadpool_limits(1, user_api="blas")  # stays in force for the process
    except Exception:  # pragma: no cover - threadpoolctl is a dependency
        return
    import logging

    logging.getLogger("planner").info(
        "numpy was imported before planner and OpenBLAS runs its SkylakeX kernels, whose "
        "threaded routines corrupt the heap on large problems (OpenBLAS #2562): OpenBLAS "
        "now runs one thread. Import planner first, or set OPENBLAS_CORETYPE=Haswell, to "
        "use every core"
    )
