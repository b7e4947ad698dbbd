"""What a search may spend (docs/theory.md §6, "deterministic budgets, sized by the work").

The budget is counted in *work* (floating-point operations, as the posterior's
scorer reports them for each exact evaluation), never in seconds, so the same
request gives the same plan on any machine.  Two safety nets bound what work
cannot foresee: a wall-clock deadline and the memory the search may hold.
When either cuts the search, the result says which (``cut_by``) and still
carries the best plan found; a deadline that passes before a first plan exists
raises :class:`~planner.errors.DeadlineExceeded`.

Every loop of the search that can grow (the construction's greedy steps,
route scoring, exchange rounds, each node of a branch and bound at every
depth) asks the budget before it works: :meth:`Budget.allows` for work it is
about to charge, :meth:`Budget.expired` for the clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded

__all__ = ["NODE_WORK", "Budget", "Cut", "dense_work"]

#: Work charged for one exact evaluation at least (its Python overhead, in flops).
EVALUATION_FLOOR = 2e5
#: Work charged for one node of a branch and bound (a scorer copied and one commit:
#: about 0.3 ms of Python, counted as flops at 10¹¹ a second).
NODE_WORK = 3e7


def dense_work(conditioned: int, kept: int) -> float:
    """Flops of one conditioning of a dense Gaussian on ``conditioned`` parameters keeping
    ``kept``: the unit budgets are sized in.  It depends on sizes only, not on the
    format, so every format of one Gaussian gets the same budget, charges the same
    evaluations the same, and so gets the same plan."""
    return conditioned**3 / 3 + conditioned**2 * kept + conditioned * kept**2


class Cut(Exception):
    """Raised inside a search phase to unwind it at once when its budget is spent; the
    phase's caller keeps the best plan found so far."""


@dataclass
class Budget:
    """Work (flops) the improvement phase may spend, a deadline and a memory bound.

    Parameters
    ----------
    work : float
        Flops of exact evaluations the search may spend beyond its constructive
        passes.  Deterministic: sized from the problem by the caller.
    seconds : float, optional
        Wall-clock safety net.
    memory : float, optional
        Bytes the search may hold beyond the posterior's own arrays; phases whose
        estimated footprint exceeds it are skipped (``cut_by = "memory"``).
    """

    work: float
    seconds: float | None = None
    memory: float | None = None
    #: asked with the clock: True once the caller wants the search stopped (a cancelled job)
    stop: Callable[[], bool] | None = field(default=None, repr=False)
    spent: float = 0.0
    evaluations: int = 0
    #: which safety net cut the search: ``"deadline"``, ``"cancelled"`` or ``"memory"``
    cut_by: str | None = None
    _deadline: float | None = field(default=None, repr=False)

    @property
    def cut(self) -> bool:
        """Whether a safety net (the deadline, a stop, the memory bound) cut the search."""
        return self.cut_by is not None

    def __post_init__(self) -> None:
        if self.seconds is not None:
            self._deadline = time.monotonic() + self.seconds

    def expired(self) -> bool:
        """Whether the deadline has passed, or the caller asked to stop (and the search is
        therefore cut)."""
        if self.cut_by not in ("deadline", "cancelled"):
            if self._late():
                self.cut_by = "deadline"
            elif self.stop is not None and self.stop():
                self.cut_by = "cancelled"
        return self.cut_by in ("deadline", "cancelled")

    def _late(self) -> bool:
        return self._deadline is not None and time.monotonic() > self._deadline

    def check(self, what: str) -> None:
        """Raise :class:`DeadlineExceeded` when the deadline has passed before ``what``
        could give any answer (the construction of the first plan)."""
        if self.expired():
            raise DeadlineExceeded(
                f"the search ran past its deadline of {self.seconds:g} s while {what}, "
                "before it had a first plan; ask for more 'seconds' (up to the service's "
                "PLANNER_PLAN_SECONDS) or a smaller problem",
                field="seconds",
            )

    def fits(self, nbytes: float) -> bool:
        """Whether a phase that holds ``nbytes`` fits the memory bound (if not, the
        search is marked cut by memory and the phase is skipped)."""
        if self.memory is None or nbytes <= self.memory:
            return True
        if self.cut_by is None:
            self.cut_by = "memory"
        return False

    def allows(self, flops: float) -> bool:
        """Whether one more evaluation of ``flops`` fits (and the deadline has not passed)."""
        return self.spent + max(flops, EVALUATION_FLOOR) <= self.work and not self.expired()

    def charge(self, flops: float, evaluations: int = 1) -> None:
        """Charge ``flops`` in all for ``evaluations`` exact evaluations done at once."""
        self.spent += max(flops, EVALUATION_FLOOR * min(evaluations, 1))
        self.evaluations += evaluations

    def spend(self, flops: float) -> None:
        """Charge one evaluation of ``flops`` if it fits, else raise :class:`Cut`."""
        if not self.allows(flops):
            raise Cut
        self.charge(flops)
