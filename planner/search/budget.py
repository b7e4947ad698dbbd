"""What a search may spend (SPEC §6, "deterministic budgets, sized by the work").

The budget is counted in *work* (floating-point operations, as the posterior's
scorer reports them for each exact evaluation), never in seconds, so the same
request gives the same plan on any machine.  A wall-clock deadline is only a
safety net: when it cuts the search, the result says so and still carries the
best plan found.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["NODE_WORK", "Budget", "dense_work"]

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


@dataclass
class Budget:
    """Work (flops) the improvement phase may spend, and an optional deadline.

    Parameters
    ----------
    work : float
        Flops of exact evaluations the search may spend beyond its constructive
        passes.  Deterministic: sized from the problem by the caller.
    seconds : float, optional
        Wall-clock safety net.
    """

    work: float
    seconds: float | None = None
    spent: float = 0.0
    evaluations: int = 0
    #: whether the deadline cut the search
    cut: bool = False
    _deadline: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.seconds is not None:
            self._deadline = time.monotonic() + self.seconds

    def expired(self) -> bool:
        """Whether the deadline has passed (and the search is therefore cut)."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.cut = True
        return self.cut

    def allows(self, flops: float) -> bool:
        """Whether one more evaluation of ``flops`` fits (and the deadline has not passed)."""
        return self.spent + max(flops, EVALUATION_FLOOR) <= self.work and not self.expired()

    def charge(self, flops: float, evaluations: int = 1) -> None:
        """Charge ``flops`` in all for ``evaluations`` exact evaluations done at once."""
        self.spent += max(flops, EVALUATION_FLOOR * min(evaluations, 1))
        self.evaluations += evaluations
