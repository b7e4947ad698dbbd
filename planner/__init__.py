"""alignment-planner's core: exact structure alignment of Gaussian posteriors.

Pure numpy, scipy and networkx; no I/O.  The mathematics: ``docs/theory.md``.
"""

from __future__ import annotations

from ._openblas import configure as _configure_openblas
from ._openblas import settle as _settle_openblas

_configure_openblas()  # before numpy loads: see planner._openblas

from .errors import (  # noqa: E402 - after the OpenBLAS choice above
    DeadlineExceeded,
    InvalidOperation,
    InvalidPlan,
    InvalidPosterior,
    InvalidStructure,
    MissingData,
    NotInLattice,
    PlannerError,
    SingularConstraint,
    TooLarge,
    UnknownCriterion,
    Unsupported,
)
from .ops import Phi, PhiSpace, Psi, PsiBlock  # noqa: E402
from .plan import CompiledPlan, Plan, Provenance, op_from_json, step_costs  # noqa: E402
from .posterior import FORMATS, DiagPosterior, FullPosterior, Posterior, from_arrays  # noqa: E402
from .stages import Conv, Flatten, Linear, Network, Pool, Residual  # noqa: E402
from .structure import ACTIVATIONS, IDEMPOTENT, Structure  # noqa: E402

_settle_openblas()  # numpy came first: no threaded SkylakeX kernels (see planner._openblas)

__all__ = [
    "ACTIVATIONS",
    "FORMATS",
    "IDEMPOTENT",
    "CompiledPlan",
    "Conv",
    "DeadlineExceeded",
    "DiagPosterior",
    "Flatten",
    "FullPosterior",
    "InvalidOperation",
    "InvalidPlan",
    "InvalidPosterior",
    "InvalidStructure",
    "Linear",
    "MissingData",
    "Network",
    "NotInLattice",
    "Phi",
    "PhiSpace",
    "Plan",
    "PlannerError",
    "Pool",
    "Posterior",
    "Provenance",
    "Psi",
    "PsiBlock",
    "Residual",
    "SingularConstraint",
    "Structure",
    "TooLarge",
    "UnknownCriterion",
    "Unsupported",
    "from_arrays",
    "op_from_json",
    "step_costs",
]
