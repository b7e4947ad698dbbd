"""The search: route × neurons × order → the plan of least exact cost (docs/theory.md §4–§6).

1. **Routes** (:mod:`.routes`): all of them when there are few, else the ``k``
   best by exact block costs.
2. **Construction** (:mod:`.construct`): per route, the greedy of exact
   increments (or the criterion's ranking), deeper first, merged layers paired
   by assignment on exact target terms.
3. **Improvement** (:mod:`.improve`): branch and bound over every candidate
   route when the choice space fits the budget (the result is then the
   exhaustive optimum); otherwise exact exchange moves on each route's plan,
   cheapest first, until none improves or the budget is spent.

The budget (:mod:`.budget`) counts work, so the same request gives the same
plan on any machine; ``seconds`` is a wall-clock safety net that the result
reports when it cuts the search.

Examples
--------
>>> import numpy as np
>>> from planner import DiagPosterior, Structure
>>> teacher = Structure.mlp((2, 4, 1))
>>> p = teacher.n_params
>>> post = DiagPosterior.from_arrays(teacher, {"mean": np.arange(p) / p, "variance": np.ones(p)})
>>> found = search(post, teacher.inherit((2, 2, 1)))
>>> found.plan.student.widths, round(found.cost, 4)
((2, 2, 1), 0.5035)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..criteria import Criterion, criterion_function
from ..errors import DeadlineExceeded, InvalidPlan, MissingData, NotInLattice, Unsupported
from ..lattice import Route, random_route, require_member
from ..ops import Phi, Psi, Tracked
from ..plan import Plan
from ..posterior import Posterior
from ..structure import Structure
from .budget import NODE_WORK, Budget, dense_work
from .construction import Built, Choices, Shared, construct, replay
from .improvement import branch_and_bound, choice_space, local_search
from .networks import global_greedy_sets, network_search
from .routes import candidate_routes

__all__ = ["Budget", "SearchResult", "global_greedy_sets", "random_plan", "search", "search_budget"]

#: Routes finished at most (the best by exact block costs when there are more).
MAX_ROUTES = 8
#: Improvement budget per effort (docs/theory.md §6), as (one-shot conditionings of the constructed
#: plan's B, a floor of flops every search may spend, the flops a branch and bound may
#: spend when it can enumerate the whole choice space). ``fast`` (the default) keeps a
#: plan within about 3 one-shot conditionings of its own B (the construction is 1–2.5 of
#: them), proves the optimum of every space small enough to enumerate, and its floor
#: (10⁸ flops, milliseconds) lets the exchange moves improve small teachers' plans, where
#: the greedy alone can lose to the best of 40 random plans (5 of 600 random teachers
#: without the floor, none with it). ``thorough`` spends two one-shots and at least
#: 3·10¹⁰ flops: lower costs where B is small (the Table-1 teacher: up to 5.6 % below
#: the greedy) at up to about 6× the one-shot time there, about a second.
EFFORTS = {"fast": (0.5, 1e8, 3e10), "thorough": (2.0, 3e10, 3e10)}
#: Improvement work at most, however large the problem (flops).
WORK_CAP = 2e11
#: Branch and bound runs when the choice space times this many nodes fits the budget.
NODES_PER_LEAF = 3
#: After the exchange moves, a branch and bound bounded by their cost runs (with at most
#: the enumeration floor more work) where the choice space is up to this many times the
#: largest one enumerated outright.
PROBE_SPACE = 10


@dataclass(frozen=True)
class SearchResult:
    """The chosen plan, its exact cost, and what the search looked at."""

    plan: Plan
    cost: float
    route: Route
    #: routes that exist (counted up to ``MAX_ROUTES + 1``) and routes finished
    routes_considered: int
    routes_built: int
    #: exact evaluations spent improving, and the work they were charged
    evaluations: int
    work: float
    #: whether the choices were enumerated (the plan is then the optimum of its routes)
    exhaustive: bool
    #: whether a safety net (the wall-clock deadline, the memory bound) cut the search
    cut: bool
    #: which one cut it: ``"deadline"``, ``"cancelled"`` (``stop``) or ``"memory"`` (None
    #: when not cut)
    cut_by: str | None = None

    @property
    def candidates(self) -> int:  # the previous name of ``evaluations``
        return self.evaluations


def search(
    posterior: Posterior,
    student: Structure,
    criterion: str | Criterion = "posterior_ratio",
    *,
    seed: int = 0,
    gradients: np.ndarray | None = None,
    work: float | None = None,
    seconds: float | None = None,
    max_routes: int = MAX_ROUTES,
    effort: str = "fast",
    memory: float | None = None,
    stop=None,
) -> SearchResult:
    """The valid plan of least exact cost found from ``posterior``'s teacher to ``student``.

    Parameters
    ----------
    posterior : Posterior
        The teacher's posterior; ``posterior.structure`` is the teacher.
    student : Structure
        The target structure; must be in the teacher's lattice.
    criterion : str or Criterion
        ``"posterior_ratio"`` (default): the greedy of exact increments.
        Others rank the neurons of shrinking positions by their own score
        (docs/theory.md §6); ``"random"`` is the seed's baseline and is never improved.
    seed : int
        Seeds the ``random`` criterion.
    gradients : array (examples × p), optional
        Per-example gradients, for ``"gradient_covariance"``.
    work : float, optional
        Flops the improvement may spend, counted as for a dense Gaussian
        (:func:`~planner.search.budget.dense_work`) whatever the format; by
        default as ``effort`` says (:data:`EFFORTS`), at most ``WORK_CAP``.
    seconds : float, optional
        Wall-clock safety net; the result says when it cut the search.  Checked
        in every loop of every phase; past it before a first plan exists,
        :class:`~planner.errors.DeadlineExceeded` is raised.
    memory : float, optional
        Bytes the improvement may hold beyond the posterior's arrays (a branch
        and bound's scorer copies, the exchange moves' blocks); a phase that
        would exceed it is skipped and the result is marked cut by memory.
    stop : callable, optional
        Asked whenever the deadline is: once it returns True the search stops as at
        its deadline (``cut_by = "cancelled"``), e.g. for a cancelled job.
    max_routes : int
        Routes finished at most.
    effort : str
        ``"fast"`` (default: plan time within about 3 one-shot conditionings of the
        plan's B; exhaustive where the choice space is small) or ``"thorough"`` (a
        fixed floor of improvement work: lower costs where B is small); see
        :data:`EFFORTS`.

    Raises
    ------
    NotInLattice
        If the student cannot be reached.
    UnknownCriterion, MissingData
        For an unknown criterion or one without its data.
    """
    if effort not in EFFORTS:
        raise InvalidPlan(
            f"effort must be one of {sorted(EFFORTS)}; got {effort!r}", field="effort"
        )
    teacher = posterior.structure
    if teacher.kind == "network":
        if getattr(criterion, "name", criterion) != "posterior_ratio":
            raise Unsupported(
                f"criterion {getattr(criterion, 'name', criterion)!r} is for MLP and RNN "
                "teachers; a network's plan is searched by exact increments "
                "(posterior_ratio)",
                field="criterion",
            )
        one_shots, floor, enumerate_floor = EFFORTS[effort]
        return network_search(
            posterior,
            student,
            budget=Budget(np.inf, seconds, memory, stop),
            work=work,
            effort_floor=floor,
            enumerate_floor=enumerate_floor,
            one_shots=one_shots,
            max_routes=max_routes,
        )
    if student.kind == "network":
        raise NotInLattice(
            "the student is a network but the teacher is not: upload the teacher as a network too",
            field="student",
        )
    require_member(teacher, student)
    crit = criterion_function(criterion)
    if crit.needs_gradients and gradients is None:
        raise MissingData(f"criterion {crit.name!r} needs per-example gradients", field="gradients")
    gvar = np.asarray(gradients).var(axis=0) if crit.needs_gradients else None
    budget = Budget(np.inf, seconds, memory, stop)
    cands, n_routes = candidate_routes(posterior, student, crit, max_routes, budget)
    first, count = _reach(teacher, student, cands)
    posterior.prepare(first, count)
    built: list[Built] = []
    shared = Shared(cands, student, teacher)
    adopts = type(posterior).adopt is not Posterior.adopt
    for route in cands:
        if built and budget.expired():
            break
        rng = np.random.default_rng(seed)
        try:
            plan = construct(
                posterior,
                student,
                route,
                crit,
                rng=rng,
                gradients=gradients,
                gradient_variance=gvar,
                budget=budget,
                shared=shared,
            )
        except DeadlineExceeded:
            if not built:  # nothing to answer with yet
                raise
            break
        # only the cheapest keeps its scorer, and only for a format that adopts it (below):
        # a dense scorer holds the factor of Σ_BB
        if not adopts or (built and plan.cost >= min(b.cost for b in built)):
            plan = replace(plan, scorer=None)
        else:
            built = [replace(b, scorer=None) for b in built]
        built.append(plan)
    # the global greedy's sets: measured 3–13× the fast plan on Table-1, so thorough only
    mlp = teacher.kind == "mlp" and crit.name == "posterior_ratio"
    if effort == "thorough" and mlp and _dense(posterior):
        built = _with_global_greedy(posterior, student, built, budget)
    built.sort(key=lambda b: b.cost)
    exhaustive = False
    if crit.polished and not budget.expired():
        best = built[0]
        c = best.plan.compiled
        one_shots, floor, enumerate_floor = EFFORTS[effort]
        default = one_shots * dense_work(c.n_conditioned, c.student.n_params)
        budget.work = work if work is not None else max(floor, min(WORK_CAP, default))
        space = sum(choice_space(teacher, student, b.choices.route) for b in built)
        if work is None and space * NODES_PER_LEAF <= enumerate_floor / NODE_WORK:  # space: int
            budget.work = max(budget.work, enumerate_floor)  # small enough to prove
        every_route = len(built) == len(cands)
        if every_route and space * NODES_PER_LEAF <= budget.work / NODE_WORK:
            best, exhaustive = _bound(posterior, student, built, best, budget)
            built = [best]
        else:
            built = [local_search(posterior, b, budget) for b in built]
            built.sort(key=lambda b: b.cost)
            probe = enumerate_floor / NODE_WORK * PROBE_SPACE
            if work is None and every_route and space * NODES_PER_LEAF <= probe:
                # a space a few times too large to prove: the exchange moves can stop at a
                # local optimum well above the best (docs/core.md), so a branch and bound
                # bounded by the moves' cost spends at most the enumeration floor more
                budget.work = max(budget.work, budget.spent + enumerate_floor)
                best, exhaustive = _bound(posterior, student, built, built[0], budget)
                built = [best]
    best = built[0]
    if best.scorer is not None:  # the plan as constructed: its scorer knows its conditioning
        posterior.adopt(best.plan.compiled, best.scorer)
    return SearchResult(
        best.plan,
        float(best.cost),
        best.choices.route,
        n_routes,
        len(built) if not exhaustive else len(cands),
        budget.evaluations,
        float(budget.spent),
        exhaustive,
        budget.cut,
        budget.cut_by,
    )


def _bound(
    posterior: Posterior, student: Structure, built: list[Built], best: Built, budget: Budget
) -> tuple[Built, bool]:
    """A branch and bound of every route's choices below ``best``'s cost: the best plan
    found and whether the walks finished (the plan is then the optimum of its routes)."""
    teacher = posterior.structure
    finished = True
    for b in built:
        found, done = branch_and_bound(posterior, student, b.choices.route, best.cost, budget)
        finished = finished and done
        if found is not None:
            plan = replay(teacher, found)
            best = Built(plan, plan.cost(posterior), found)
    return best, finished and not budget.cut


def _dense(posterior: Posterior) -> bool:
    """Whether the posterior scores through dense blocks, whose stages can take in each
    other's commits (the global greedy then costs about what the construction does;
    kron and large lowrank scorers keep their per-position construction)."""
    from ..posterior.scoring import DenseScorer

    return isinstance(posterior.scorer(), DenseScorer)


def _with_global_greedy(posterior, student, built: list[Built], budget: Budget) -> list[Built]:
    """Each φ-only route's construction, or the global greedy's sets (every shrinking
    position ranked together, docs/theory.md §10) replayed deeper first where that is
    cheaper: the search is then never above the global greedy of exact increments."""
    out = []
    for b in built:
        route = b.choices.route
        if route.removed_layers or budget.expired():
            out.append(b)
            continue
        widths = {s: student.width(j) for j, (s, _) in enumerate(route.blocks, start=1)}
        try:
            drops, _ = global_greedy_sets(posterior, widths, budget)
        except DeadlineExceeded:
            out.append(b)
            continue
        choices = Choices(route, {p: tuple(v) for p, v in drops.items()})
        plan = replay(posterior.structure, choices)
        g = Built(plan, plan.cost(posterior), choices)
        out.append(g if g.cost < b.cost else b)
    return out


def _reach(teacher: Structure, student: Structure, cands: list[Route]) -> tuple[int, int]:
    """Where the search will ask for covariance blocks: the layers of the outgoing
    weights of shrinking positions (and the incoming rows their moves touch); merged
    layers go through ``Posterior.conditional_precision`` where that is cheaper.
    Returns the first such parameter and how many parameters those layers hold (a
    hint for ``Posterior.prepare``)."""
    layers: set[int] = set()
    for route in cands:
        for j, (_, e) in enumerate(route.blocks, start=1):
            if 1 < e < teacher.T and teacher.width(e) > student.width(j):
                layers.add(e + 1)
                if e > 2 and teacher.width(e - 1) > student.width(j):
                    layers.add(e)
    if not layers:
        return teacher.n_params, 0
    return teacher.layer_offset(min(layers)), sum(teacher.layer_size(t) for t in layers)


# -- the random baseline --------------------------------------------------------------------
def random_plan(teacher: Structure, student: Structure, rng: np.random.Generator) -> Plan:
    """A uniformly random valid plan: random route, random neurons, random pairings."""
    route = random_route(teacher, student, rng)
    tr = Tracked.start(teacher)
    ops = []
    for j, (s, e) in enumerate(route.blocks, start=1):
        w = student.width(j)
        for p in range(s, e + 1):
            while teacher.is_hidden(p) and tr.structure.width(p) > w:
                op = Phi(p, int(rng.integers(tr.structure.width(p))))
                tr.apply(op)
                ops.append(op)
    for p in sorted(route.removed_layers, key=lambda p: (teacher.activation(p) != "identity", -p)):
        t = tr.positions.index(p) + 1
        op = Psi(t, tuple(int(x) for x in rng.permutation(tr.structure.width(t))))
        tr.apply(op)
        ops.append(op)
    return Plan(teacher, tuple(ops))


from .budgets import search_budget  # noqa: E402 - it calls search
