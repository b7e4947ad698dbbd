"""The alignment-planner service: FastAPI over the ``planner`` core. All I/O lives here."""

import planner  # noqa: F401 - first: chooses OpenBLAS's kernels before numpy loads
