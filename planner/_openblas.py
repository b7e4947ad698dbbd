"""A workaround for an OpenBLAS defect on AVX-512 machines, applied before numpy loads.

OpenBLAS picks its ``SkylakeX`` kernels on CPUs with AVX-512 (Intel Skylake-X and
later, AMD Zen 4).  Their threaded level-3 routines corrupt the heap on large
problems (a buffer sized at build time is too small; OpenBLAS issue #2562):
measured here, on an AMD EPYC with the OpenBLAS 0.3.30/0.3.31 of the numpy 2.4
and scipy 1.17 wheels, a two-thread Cholesky of a 20,300 × 20,300 matrix and a
two-thread ``U @ U.T`` of a 20,300 × 200 ``U`` crash the process.  The
``Haswell`` kernels (AVX2) do not, at the same speed (gemm 105 GFlop/s,
Cholesky of 6,050: 1.4 s, either way).

:func:`configure` sets ``OPENBLAS_CORETYPE=Haswell`` when the variable is unset,
the machine is x86-64 with AVX-512, and numpy has not been imported yet (the
variable is read once, when OpenBLAS loads).  Set ``OPENBLAS_CORETYPE`` yourself
to choose otherwise.
"""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["configure"]


def _avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        return False
    return False


def configure() -> bool:
    """Choose the Haswell kernels where the SkylakeX ones would be used; True if set.
    Too late (numpy loaded first, OpenBLAS on SkylakeX kernels): a warning says how."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or not _avx512():
        return False
    if "numpy" in sys.modules:
        _warn_if_skylakex()
        return False
    os.environ["OPENBLAS_CORETYPE"] = "Haswell"
    return True


def _warn_if_skylakex() -> None:
    try:
        from threadpoolctl import threadpool_info

        infos = threadpool_info()
        archs = {i.get("architecture") for i in infos if i["internal_api"] == "openblas"}
    except Exception:  # pragma: no cover - threadpoolctl is a dependency
        return
    if "SkylakeX" in archs:
        import warnings

        warnings.warn(
            "OpenBLAS runs its SkylakeX kernels, whose threaded level-3 routines corrupt the "
            "heap on large problems (OpenBLAS #2562): set OPENBLAS_CORETYPE=Haswell before "
            "numpy loads, or import planner before numpy",
            RuntimeWarning,
            stacklevel=3,
        )
