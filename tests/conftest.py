import os

from hypothesis import HealthCheck, settings

import planner  # noqa: F401 - first, so planner._openblas acts before numpy loads

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
