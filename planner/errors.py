"""The typed errors every layer of the core raises.

One small tree, in the manner of ``networkx.exception``: the service maps each
class to an HTTP problem in exactly one place (``app.problems``).  Every error
carries the ``field`` it is about (a dotted path a client can act on) and a
``reason`` that says what is wrong in words.
"""

from __future__ import annotations

__all__ = [
    "DeadlineExceeded",
    "InvalidOperation",
    "InvalidPlan",
    "InvalidPosterior",
    "InvalidStructure",
    "MissingData",
    "NotInLattice",
    "PlannerError",
    "SingularConstraint",
    "TooLarge",
    "UnknownCriterion",
    "Unsupported",
]


class PlannerError(Exception):
    """Base class of every error the core raises on bad input."""

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field

    def __reduce__(self):  # keep ``field`` across processes (plans run in a pool)
        return (type(self), (self.reason,), {"field": self.field})


class InvalidStructure(PlannerError):
    """A structure breaks a rule of docs/theory.md §2 (T >= 3, widths >= 1, known activations)."""


class InvalidPosterior(PlannerError):
    """Posterior arrays break docs/theory.md §7/§8 (shape, finiteness, symmetry, definiteness)."""


class InvalidOperation(PlannerError):
    """A φ or ψ step that docs/theory.md §3 forbids on the current structure."""


class InvalidPlan(PlannerError):
    """A sequence of operations that does not lead where it claims to."""


class NotInLattice(PlannerError):
    """The student is not reachable from the teacher by valid steps (docs/theory.md §5)."""


class SingularConstraint(PlannerError):
    """Σ_BB is numerically singular: the constraint cannot be conditioned on (docs/theory.md §8)."""


class UnknownCriterion(PlannerError):
    """A criterion name that is not registered (docs/theory.md §6)."""


class MissingData(PlannerError):
    """A criterion or format needs data that was not supplied (e.g. gradients)."""


class TooLarge(PlannerError):
    """A computation that would not fit the limits it was given."""


class Unsupported(PlannerError):
    """An operation this posterior format cannot do (e.g. arbitrary conditioning of kron)."""


class DeadlineExceeded(PlannerError):
    """A computation ran past its wall-clock deadline before it had any answer to give
    (a search cut after its first plan returns that plan instead, marked ``cut``)."""
