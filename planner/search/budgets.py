"""Students by budget: the planner chooses the widths (and residual blocks) of least exact cost
within a parameter budget (docs/theory.md §11).

Pruning users think in ratios, not widths: ``max_params = N`` or ``keep = 0.5`` (a
fraction of the teacher's parameters), with optional per-space floors.  The greedy of
exact increments across every removable space (and every removable residual block of a
network) takes, one step at a time, the candidate of least exact increment until the
student fits the budget; the student it reaches is then searched as any student is
(:func:`planner.search.search`: routes, branch and bound where it enumerates, exchange
moves), and the cheaper of the two plans is kept.  So a plan by budget never exceeds the
budget and never costs more than the greedy that stops at it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from ..errors import DeadlineExceeded, InvalidPlan, NotInLattice
from ..plan import Plan
from ..posterior import Posterior
from .budget import Budget

__all__ = ["budget_greedy", "floors_ok", "params_for", "search_budget"]


def params_for(teacher, max_params: int | None = None, keep: float | None = None) -> int:
    """The parameter budget asked: ``max_params``, or ``keep`` × the teacher's (floored)."""
    if (max_params is None) == (keep is None):
        raise InvalidPlan("give exactly one of max_params and keep", field="budget")
    if keep is not None:
        if not 0 < keep <= 1:
            raise InvalidPlan(f"keep is a fraction in (0, 1]; got {keep!r}", field="budget.keep")
        return int(np.floor(keep * teacher.n_params))
    if max_params < 1:
        raise InvalidPlan(
            f"max_params must be at least 1; got {max_params}", field="budget.max_params"
        )
    return int(max_params)


def floors_ok(teacher, floors: Mapping[int, int] | None) -> dict[int, int]:
    """``floors`` checked: each names a space that φ may shrink and is at least 1."""
    floors = dict(floors or {})
    g = teacher.graph
    for s, f in floors.items():
        if s not in range(1, len(g.widths) + 1) or s in g.fixed or f < 1:
            raise InvalidPlan(
                f"floor {f} for space {s}: a floor names a space φ may shrink (2.."
                f"{len(g.widths)}, not the input or output) and is at least 1",
                field="budget.floors",
            )
    return floors


def budget_greedy(
    posterior: Posterior,
    max_params: int,
    floors: Mapping[int, int] | None = None,
    blocks: bool = True,
    budget: Budget | None = None,
) -> tuple[Plan, float]:
    """The greedy of exact increments that stops at the budget: (plan, cost).

    ``floors`` maps a teacher space (an MLP's position) to the fewest channels it keeps
    (default 1); ``blocks`` lets a network's removable residual blocks compete.

    Raises
    ------
    NotInLattice
        When even the smallest student the floors allow exceeds the budget.
    """
    from .networks import Fits, _greedy

    teacher = posterior.structure
    fits = Fits(int(max_params), floors_ok(teacher, floors), blocks)
    st = _greedy(posterior, None, budget or Budget(np.inf), fits=fits)
    if st.tr.structure.n_params > max_params:
        raise NotInLattice(
            f"no student within {max_params} parameters: the smallest the floors allow "
            f"has {st.tr.structure.n_params}",
            field="budget",
        )
    return st.plan(), float(st.sc.cost)


def search_budget(
    posterior: Posterior,
    max_params: int,
    *,
    floors: Mapping[int, int] | None = None,
    blocks: bool = True,
    seconds: float | None = None,
    **search_options,
):
    """The plan of least exact cost found within ``max_params`` parameters (see the
    module): the greedy's student searched as any student, the cheaper plan kept."""
    from . import search

    stop = search_options.get("stop")
    start = time.monotonic()
    greedy, cost = budget_greedy(
        posterior, max_params, floors, blocks, Budget(np.inf, seconds, None, stop)
    )
    left = None if seconds is None else max(1e-3, seconds - (time.monotonic() - start))
    try:  # one deadline for both: the search has what the greedy left
        found = search(posterior, greedy.student, seconds=left, **search_options)
    except DeadlineExceeded:
        return _result(greedy, cost)
    if found.cost <= cost:
        return found
    return replace(found, plan=greedy, cost=cost)


def _result(plan: Plan, cost: float):
    """The greedy's plan as a search result (the search after it was cut before a plan)."""
    from . import SearchResult

    return SearchResult(plan, cost, None, 1, 1, 0, 0.0, False, True, "deadline")
