"""A Dask worker preload for the fault tests (``dask worker --preload``).

Every prior computed on a worker started with ``PLANNER_TEST_APPLY_DELAY=s``
takes ``s`` seconds longer (a sleep before the exact alignment), so a test can
kill workers, the scheduler or a replica while priors are certainly running.
The values computed are untouched.
"""

from __future__ import annotations

import os
import time

from planner.plan import Plan


def _slowed(apply):
    def slow_apply(self, posterior):
        time.sleep(float(os.environ.get("PLANNER_TEST_APPLY_DELAY", "0")))
        return apply(self, posterior)

    slow_apply.slowed = True
    return slow_apply


if not getattr(Plan.apply, "slowed", False):  # Dask may run a preload more than once
    Plan.apply = _slowed(Plan.apply)
