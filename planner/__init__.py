"""alignment-planner's core: exact structure alignment of Gaussian posteriors.

Pure numpy, scipy and networkx; no I/O.  See ``../shared/SPEC.md``.
"""

from __future__ import annotations

from .errors import (
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
from .ops import Phi, Psi
from .plan import CompiledPlan, Plan, Provenance, op_from_json
from .posterior import FORMATS, DiagPosterior, FullPosterior, Posterior, from_arrays
from .structure import ACTIVATIONS, IDEMPOTENT, Structure

__all__ = [
    "ACTIVATIONS",
    "FORMATS",
    "IDEMPOTENT",
    "CompiledPlan",
    "DiagPosterior",
    "FullPosterior",
    "InvalidOperation",
    "InvalidPlan",
    "InvalidPosterior",
    "InvalidStructure",
    "MissingData",
    "NotInLattice",
    "Phi",
    "Plan",
    "PlannerError",
    "Posterior",
    "Provenance",
    "Psi",
    "SingularConstraint",
    "Structure",
    "TooLarge",
    "UnknownCriterion",
    "Unsupported",
    "from_arrays",
    "op_from_json",
]
