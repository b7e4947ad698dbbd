"""The paper reproduction and the studies, as training clients of the service."""

import planner  # noqa: F401 - first: chooses OpenBLAS's kernels before numpy loads
