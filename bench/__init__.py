"""Benchmarks, run by hand (``make bench``)."""

import planner  # noqa: F401 - first: chooses OpenBLAS's kernels before numpy loads
