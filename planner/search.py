"""The search: route × neurons × order → a plan of least exact cost (SPEC §4–§6).

The lattice is never built.  The search

1. takes the **routes** (which teacher positions survive, which are removed by
   ψ) from the compact route graph (:mod:`planner.lattice`): all of them when
   there are few, else the ``max_routes`` best by a cheap proxy weight, in
   order, with ``networkx.shortest_simple_paths``;
2. for each route, picks **neurons** block by block from the output down:
   a position that only shrinks removes its lowest-scoring neurons by the
   criterion; a block whose layers are removed by ψ chooses the neurons it
   keeps *and* the pairing π jointly, as a rectangular linear assignment on the
   cost of conditioning each row of the square layer to a unit vector
   (``scipy.optimize.linear_sum_assignment``), dropped neurons paying the cost
   of zeroing their outgoing weights;
3. **orders** the steps deeper first (every φ before any ψ, higher positions
   first), which conditions only the outgoing weights into surviving neurons
   and so never costs more (SPEC §4);
4. **rescores** every candidate plan exactly (``½ dᵀ Σ_BB⁻¹ d``) and returns
   the cheapest.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import comb, factorial

import networkx as nx
import numpy as np
from scipy.optimize import linear_sum_assignment

from .criteria import Criterion, NeuronContext, criterion_function
from .errors import MissingData
from .lattice import END, Route, require_member, route_graph, routes
from .ops import Effect, Op, Phi, Psi, Tracked
from .plan import CompiledPlan, Plan
from .posterior import Posterior
from .structure import Structure

__all__ = ["SearchResult", "build_plan", "random_plan", "search"]

#: Above this many entries an assignment is first narrowed to the likeliest rows/columns.
_LSA_ENTRIES = 400_000
#: Numbers the search may touch building routes exactly (a route is about one pass).
_ROUTE_WORK = 1e8
#: Rows of a layer the route proxy looks at (a sample: the proxy only ranks routes).
_PROXY_ROWS = 256


@dataclass(frozen=True)
class SearchResult:
    """The chosen plan, its exact cost, and what the search looked at."""

    plan: Plan
    cost: float
    route: Route
    routes_considered: int
    candidates: int


def search(
    posterior: Posterior,
    student: Structure,
    criterion: str | Criterion = "posterior_ratio",
    *,
    seed: int = 0,
    gradients: np.ndarray | None = None,
    max_routes: int = 6,
    polish: int = 1000,
) -> SearchResult:
    """The valid plan of least exact cost found from ``posterior``'s teacher to ``student``.

    Parameters
    ----------
    posterior : Posterior
        The teacher's posterior; ``posterior.structure`` is the teacher.
    student : Structure
        The target structure; must be in the teacher's lattice.
    criterion : str or callable
        Ranks the neurons of positions that shrink (SPEC §6).  ``"random"``
        is the seed's baseline: random neurons, also in merged blocks, where
        only the pairing is still assigned.
    seed : int
        Seeds the ``random`` criterion and any tie-breaking.
    gradients : array (examples × p), optional
        Per-example gradients, for ``"gradient_covariance"``.
    max_routes : int
        How many routes are built and rescored exactly when there are more.
    polish : int
        Budget of exact rescorings for the local search that swaps a kept and
        a dropped neuron of a position that only shrinks, keeping a swap when
        the exact plan cost falls.  0 turns it off; the ``random`` criterion
        is never polished (it is the baseline).

    Raises
    ------
    NotInLattice
        If the student cannot be reached.
    UnknownCriterion, MissingData
        For an unknown criterion or one without its data.
    """
    teacher = posterior.structure
    require_member(teacher, student)
    crit = criterion_function(criterion)
    if crit is criterion_function("gradient_covariance") and gradients is None:
        raise MissingData(
            "criterion 'gradient_covariance' needs per-example gradients", field="gradients"
        )
    # a route costs about one pass over the posterior: huge ones get fewer routes built
    affordable = max(1, int(_ROUTE_WORK // max(posterior.size, 1)))
    candidates = _candidate_routes(posterior, student, min(max_routes, affordable))
    built = []
    for route in candidates:
        rng = np.random.default_rng(seed)
        plan, choices = _build(posterior, student, route, crit, rng, gradients)
        built.append((plan.cost(posterior), plan, route, choices))
    evaluations = len(built)
    if polish > 0 and crit is not criterion_function("random"):
        # every route gets its share: the cheapest start need not have the cheapest optimum
        share = polish // len(built)
        for k, (cost, plan, route, choices) in enumerate(built):
            budget = min(share, _affordable(posterior, plan))
            cost, plan, used = _polish(posterior, student, route, crit, plan, choices, cost, budget)
            built[k] = (cost, plan, route, choices)
            evaluations += used
    cost, plan, route, _ = min(built, key=lambda b: b[0])
    return SearchResult(plan, cost, route, len(candidates), evaluations)


# -- exact polish ---------------------------------------------------------------------------
#: Work the polish may spend on exact rescorings, in units of one flop or one
#: parameter touched while rebuilding a plan (≈ 1 ns each here).
_POLISH_WORK = 2e8
#: Below this many affordable rescorings a local search cannot move far: skip it.
_POLISH_MIN = 20
#: Pairings up to this size also try every 3-cycle.
_CYCLES_UP_TO = 8


def _affordable(posterior: Posterior, plan: Plan) -> int:
    """How many exact rescorings of plans like ``plan`` fit the polish's work budget."""
    k = plan.compiled.conditioned.size
    per = k if posterior.format == "diag" else k**3 / 3 + k * k
    n = int(_POLISH_WORK // max(per + posterior.structure.n_params, 1.0))
    return n if n >= _POLISH_MIN else 0


@dataclass
class _Choices:
    """A route's decisions, in teacher neuron ids.

    ``singles[p]``: neurons kept at a position that only shrinks;
    ``pairs[p]``: ``(rows, cols)``, neuron ``rows[k]`` of merged position p is
    paired with neuron ``cols[k]`` of position p-1.
    """

    singles: dict[int, np.ndarray]
    pairs: dict[int, tuple[np.ndarray, np.ndarray]]

    def copy(self) -> _Choices:
        return _Choices(
            {p: k.copy() for p, k in self.singles.items()},
            {p: (r.copy(), c.copy()) for p, (r, c) in self.pairs.items()},
        )


def _neighbours(teacher: Structure, route: Route, ch: _Choices):
    """Every choice one move away: swap a kept neuron out, or exchange two partners."""

    def dropped(p: int, kept: np.ndarray):
        return itertools.product(
            range(len(kept)), np.setdiff1d(np.arange(teacher.width(p)), kept).tolist()
        )

    for p, kept in ch.singles.items():
        for k, b in dropped(p, kept):
            nb = ch.copy()
            nb.singles[p][k] = b
            nb.singles[p].sort()
            yield nb
    for s, e in route.blocks:
        for p in range(e, s, -1):
            rows, cols = ch.pairs[p]
            for a, b in itertools.combinations(range(len(rows)), 2):
                nb = ch.copy()
                c = nb.pairs[p][1]
                c[a], c[b] = c[b], c[a]
                yield nb
            if len(rows) <= _CYCLES_UP_TO:  # 3-cycles reach what transpositions cannot
                for a, b, d in itertools.permutations(range(len(rows)), 3):
                    if a < b and a < d:
                        nb = ch.copy()
                        c = nb.pairs[p][1]
                        c[a], c[b], c[d] = c[b], c[d], c[a]
                        yield nb
            if p == e and p != teacher.T:
                for k, b in dropped(p, rows):
                    nb = ch.copy()
                    nb.pairs[p][0][k] = b
                    yield nb
            if p - 1 != 1:
                for k, b in dropped(p - 1, cols):
                    nb = ch.copy()
                    old = nb.pairs[p][1][k]
                    nb.pairs[p][1][k] = b
                    if p - 1 > s:  # position p-1 is itself merged: its rows follow
                        r = nb.pairs[p - 1][0]
                        r[r == old] = b
                    yield nb


def _space(teacher: Structure, student: Structure, route: Route) -> int:
    """The number of distinct choice sets of ``route`` (kept neurons and pairings)."""
    size = 1
    for j, (s, e) in enumerate(route.blocks, start=1):
        w = student.width(j)
        if s == e:
            size *= comb(teacher.width(s), w) if teacher.is_hidden(s) else 1
            continue
        for p in range(e, s, -1):
            if p == e and p != teacher.T:
                size *= comb(teacher.width(p), w)
            if p - 1 != 1:
                size *= comb(teacher.width(p - 1), w)
            size *= factorial(w)
    return size


def _every_choice(teacher: Structure, student: Structure, route: Route):
    """All choice sets of ``route`` (only when :func:`_space` is small)."""
    axes: list[list] = []
    keys: list[tuple] = []
    for j, (s, e) in enumerate(route.blocks, start=1):
        w = student.width(j)
        if s == e:
            if teacher.is_hidden(s) and teacher.width(s) > w:
                axes.append(
                    [np.array(c) for c in itertools.combinations(range(teacher.width(s)), w)]
                )
                keys.append(("single", s))
            continue
        for p in range(e, s, -1):
            top = p == e and p != teacher.T
            rows_opts = (
                [np.array(c) for c in itertools.combinations(range(teacher.width(p)), w)]
                if top
                else [None]  # fixed: all of p (the output) or what the merge above kept
            )
            cols_opts = (
                [np.array(c) for c in itertools.combinations(range(teacher.width(p - 1)), w)]
                if p - 1 != 1
                else [np.arange(w)]
            )
            axes.append(
                list(itertools.product(rows_opts, cols_opts, itertools.permutations(range(w))))
            )
            keys.append(("pair", p))
    for combo in itertools.product(*axes):
        ch = _Choices({}, {})
        for (kind, p), val in zip(keys, combo, strict=True):
            if kind == "single":
                ch.singles[p] = val
                continue
            rows, cols, perm = val
            if rows is None:
                rows = ch.pairs[p + 1][1] if p + 1 in ch.pairs else np.arange(teacher.width(p))
            ch.pairs[p] = (np.asarray(rows), np.asarray(cols)[list(perm)])
        yield ch


def _polish(
    posterior: Posterior,
    student: Structure,
    route: Route,
    crit: Criterion,
    plan: Plan,
    choices: _Choices,
    cost: float,
    budget: int,
) -> tuple[float, Plan, int]:
    """Exact search over the route's choices: all of them when they fit ``budget``,
    else first-improvement local search from ``choices``; every candidate rescored exactly."""
    teacher = posterior.structure
    if _space(teacher, student, route) <= budget:
        used = 0
        for ch in _every_choice(teacher, student, route):
            cand, _ = _build(posterior, student, route, crit, None, None, ch)
            c = cand.cost(posterior)
            used += 1
            if c < cost:
                cost, plan = c, cand
        return cost, plan, used
    used, improved = 0, True
    while improved and used < budget:
        improved = False
        for nb in _neighbours(teacher, route, choices):
            if used >= budget:
                break
            cand, _ = _build(posterior, student, route, crit, None, None, nb)
            c = cand.cost(posterior)
            used += 1
            if c < cost * (1 - 1e-12):
                cost, plan, choices, improved = c, cand, nb, True
                break
    return cost, plan, used


# -- routes ---------------------------------------------------------------------------------
def _candidate_routes(posterior: Posterior, student: Structure, k: int) -> list[Route]:
    teacher = posterior.structure
    G = route_graph(teacher, student)
    first = list(itertools.islice(routes(teacher, student, G), k + 1))
    if len(first) <= k:
        return first
    weigh = _ProxyWeights(posterior, student)
    for a, _b, data in G.edges(data=True):
        data["proxy"] = weigh(data["block"], a[1])
    out = []
    for path in itertools.islice(nx.shortest_simple_paths(G, (1, 1), END, weight="proxy"), k):
        out.append(Route(tuple(G.edges[a, b]["block"] for a, b in itertools.pairwise(path))))
    return out


class _ProxyWeights:
    """A cheap, route-independent estimate of a block's cost: the teacher's marginal
    variances only (``Posterior.surrogate``), on a sample of each layer's rows."""

    def __init__(self, posterior: Posterior, student: Structure) -> None:
        self.post, self.student = posterior.surrogate(), student
        self.tr = Tracked.start(posterior.structure)
        self._zero: dict[int, np.ndarray] = {}
        self._assign: dict[int, np.ndarray] = {}

    def _rows(self, n: int) -> tuple[np.ndarray, float]:
        """An evenly spaced sample of at most ``_PROXY_ROWS`` of n rows, and its weight."""
        k = min(n, _PROXY_ROWS)
        return np.linspace(0, n - 1, k).astype(np.int64), n / k

    def zero(self, p: int) -> np.ndarray:
        """Sorted costs of zeroing each neuron's outgoing weights at teacher position p
        (estimated from a sample of the rows they feed)."""
        if p not in self._zero:
            rows, weight = self._rows(self.tr.structure.width(p + 1))
            groups = self.tr.outgoing_all(p, rows)  # sampled outgoing weights per neuron
            self._zero[p] = np.sort(self.post.group_costs(groups)) * weight
        return self._zero[p]

    def assign(self, p: int) -> np.ndarray:
        """Sorted per-row best costs of conditioning layer p's rows to unit vectors
        (over a sample of its rows, each standing for ``weight`` of them)."""
        if p not in self._assign:
            rows, weight = self._rows(self.tr.structure.width(p))
            C = self.post.assignment_costs(self.tr._U(p, rows=rows))
            self._assign[p] = np.repeat(np.sort(C.min(axis=1)), round(weight))
        return self._assign[p]

    def __call__(self, block: tuple[int, int], j: int) -> float:
        s, e = block
        f, w = self.post.structure, self.student.width(j)
        cost = 0.0
        for p in range(s, e + 1):
            if p in (1, f.T):
                continue
            if p == e:  # its dropped neurons zero their outgoing weights
                cost += float(self.zero(p)[: f.width(p) - w].sum())
        for p in range(s + 1, e + 1):
            cost += float(self.assign(p)[:w].sum())
        return max(cost, 0.0)


# -- one route → one plan -------------------------------------------------------------------
def build_plan(
    posterior: Posterior,
    student: Structure,
    route: Route,
    criterion: str | Criterion = "posterior_ratio",
    *,
    rng: np.random.Generator | None = None,
    gradients: np.ndarray | None = None,
) -> Plan:
    """The plan of ``route``: neurons by ``criterion``, merges by assignment, deeper first."""
    return _build(posterior, student, route, criterion_function(criterion), rng, gradients)[0]


def _build(
    posterior: Posterior,
    student: Structure,
    route: Route,
    crit: Criterion,
    rng: np.random.Generator | None,
    gradients: np.ndarray | None,
    fixed: _Choices | None = None,
) -> tuple[Plan, _Choices]:
    """Build the plan of ``route``, taking the decisions in ``fixed`` where given."""
    teacher = posterior.structure
    rng = np.random.default_rng(0) if rng is None else rng
    is_random = crit is criterion_function("random")
    tr = Tracked.start(teacher)
    ops: list[Op] = []
    effects: list[Effect] = []
    made = _Choices({}, {})

    def drop(p: int, keep: np.ndarray) -> None:
        """φ away every neuron of (teacher, still current) position p not in ``keep``."""
        gone = [int(i) for i in np.setdiff1d(np.arange(tr.structure.width(p)), keep)[::-1]]
        effects.append(tr.apply_phis(p, gone))  # descending: current indices do not shift
        ops.extend(Phi(p, i) for i in gone)

    for j in range(student.T, 0, -1):
        s, e = route.blocks[j - 1]
        w = student.width(j)
        if s == e:
            if teacher.is_hidden(s) and tr.structure.width(s) > w:
                if fixed is not None:
                    keep = fixed.singles[s]
                else:
                    scores = crit(NeuronContext(posterior, tr, s, rng, gradients))
                    keep = np.sort(np.argsort(scores, kind="stable")[-w:])
                made.singles[s] = np.asarray(keep)
                drop(s, keep)  # nothing below s has moved: current == teacher ids
            continue
        for p in range(e, s, -1):
            nr, nc = tr.layers[p - 2].rows, tr.layers[p - 2].cols
            if fixed is not None:
                r_ids, c_ids = fixed.pairs[p]
                rows, cols = np.searchsorted(nr, r_ids), np.searchsorted(nc, c_ids)
            elif is_random:
                rows_fixed = p == teacher.T or p < e
                R, L = nr.size, nc.size
                rows = np.arange(R) if rows_fixed else np.sort(rng.choice(R, w, replace=False))
                cols = np.arange(L) if p - 1 == 1 else np.sort(rng.choice(L, w, replace=False))
                r, c = linear_sum_assignment(
                    posterior.assignment_costs(tr._U(p)[np.ix_(rows, cols)])
                )
                rows, cols = rows[r], cols[c]
            else:
                rows, cols = _assign(posterior, tr, p, w, p == teacher.T or p < e)
            made.pairs[p] = (nr[rows].copy(), nc[cols].copy())
            drop(p, np.sort(rows))
            drop(p - 1, np.sort(cols))

    # every ψ after every φ: identity layers first, then the rest, each from the top down
    partner = {
        p: dict(zip(r.tolist(), c.tolist(), strict=True)) for p, (r, c) in made.pairs.items()
    }
    removed = [p for s, e in route.blocks for p in range(s + 1, e + 1)]
    order = sorted(removed, key=lambda p: (teacher.activation(p) != "identity", -p))
    for p in order:
        t = tr.positions.index(p) + 1
        q = tr.positions[t - 2]
        index = {int(a): k for k, a in enumerate(tr.neurons[t - 2])}
        pairing = []
        for a in tr.neurons[t - 1]:
            b, pos = partner[p][int(a)], p - 1
            while pos != q:
                b, pos = partner[pos][b], pos - 1
            pairing.append(index[b])
        op = Psi(t, tuple(pairing))
        effects.append(tr.apply(op))
        ops.append(op)
    return Plan._applied(CompiledPlan(teacher, ops, (tr, effects))), made


def _assign(
    posterior: Posterior, tr: Tracked, p: int, w: int, rows_fixed: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of layer p to keep (w of them) paired with w columns: a linear assignment.

    Rows not kept are φ-removed and pay the cost of zeroing their outgoing
    weights (dummy columns); columns not kept are φ-removed at p-1, which zeroes
    their entries of the kept rows (already in the unit-vector cost).
    """
    R, L = tr.structure.width(p), tr.structure.width(p - 1)
    rows = np.arange(R)
    cols = np.arange(L)
    drop_cost = None
    if not rows_fixed and w < R:
        drop_cost = posterior.group_costs(tr.outgoing_all(p))
    if R * L > _LSA_ENTRIES:  # narrow to the likeliest rows and columns first
        cap = min(w + max(16, w // 4), L)
        if drop_cost is not None and cap < R:  # keep the rows dearest to drop
            rows = np.sort(np.argsort(-drop_cost, kind="stable")[:cap])
        C = posterior.assignment_costs(tr._U(p, rows=rows))
        if cap < L:
            cols = np.sort(np.argsort(C.min(axis=0), kind="stable")[:cap])
            C = C[:, cols]
    else:
        C = posterior.assignment_costs(tr._U(p))
    if drop_cost is not None and len(rows) > w:
        d = drop_cost[rows]
        big = float(d.max() - C.min() + 1.0)
        dummies = np.repeat(d[:, None], len(rows) - w, axis=1)
        r, c = linear_sum_assignment(np.hstack([C + big, dummies]))
        real = c < len(cols)
        r, c = r[real], c[real]
    else:
        r, c = linear_sum_assignment(C)
    return rows[r], cols[c]


# -- the random baseline --------------------------------------------------------------------
def random_plan(teacher: Structure, student: Structure, rng: np.random.Generator) -> Plan:
    """A uniformly random valid plan: random route, random neurons, random pairings."""
    require_member(teacher, student)
    all_routes = list(routes(teacher, student))
    route = all_routes[int(rng.integers(len(all_routes)))]
    tr = Tracked.start(teacher)
    ops: list[Op] = []
    for j, (s, e) in enumerate(route.blocks, start=1):
        w = student.width(j)
        for p in range(s, e + 1):
            while teacher.is_hidden(p) and tr.structure.width(p) > w:
                op = Phi(p, int(rng.integers(tr.structure.width(p))))
                tr.apply(op)
                ops.append(op)
    removed = [p for s, e in route.blocks for p in range(s + 1, e + 1)]
    for p in sorted(removed, key=lambda p: (teacher.activation(p) != "identity", -p)):
        t = tr.positions.index(p) + 1
        op = Psi(t, tuple(int(x) for x in rng.permutation(tr.structure.width(t))))
        tr.apply(op)
        ops.append(op)
    return Plan(teacher, tuple(ops))
