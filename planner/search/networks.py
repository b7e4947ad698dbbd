"""The search for convolutional and residual teachers (docs/theory.md §13, §6).

Per route (the teacher blocks the student leaves out, :mod:`planner.network_lattice`):

1. **The global greedy of exact increments.**  At every step the candidates are
   φ on every channel of every space that must still shrink, ψ on every block
   the route removes and that is still there, and ψ on every plain layer the route
   removes once its two spaces are down to their common width (its pairing: every
   permutation when there are at most ``EXACT_PAIRINGS``, else the assignment on
   the block's linear terms, as an MLP's merge); the one of least exact increment,
   given everything conditioned so far, is taken (ties, within ``TIE``: φ before
   ψ on blocks before ψ on layers, then the lowest space, block or layer, then the
   lowest channel).  Every space is
   ranked against every other, as the LLM Surgeon ranks the rows and columns of
   all layers together, so the order of φ between adjacent spaces and of φ on a
   stream against ψ on its blocks is chosen by cost too.
2. **Exhaustive where it can be enumerated.**  When the budget covers it, a
   branch and bound over the same steps (removals within one space in a run
   counted once) proves the optimum of each route.

The cheapest route's plan wins.  The budget and deadline are :mod:`.budget`'s.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import comb, factorial

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import InvalidOperation, InvalidPlan
from ..network_lattice import NetRoute, network_routes
from ..ops import Effect, Op, Phi, PhiSpace, Psi, PsiBlock, Tracked
from ..plan import CompiledPlan, Plan
from ..posterior import Posterior
from ..posterior.scoring import DenseScorer
from ..stages import Network
from .budget import NODE_WORK, Budget, Cut, dense_work
from .construction import least, single_threaded, tie_limit

__all__ = ["ENUMERATE_LEAVES", "EXACT_PAIRINGS", "global_greedy_sets", "network_search"]

#: ψ on a plain layer of at most this many channels tries every pairing (4! = 24 costs
#: of one block each: a precision's block cost is a constraint cost of its own); wider,
#: the assignment on the block's linear terms chooses it.
EXACT_PAIRINGS = 4

#: A branch and bound runs, with the effort's enumeration budget, when the routes have at
#: most this many step sequences (it proves the optimum when it finishes within it);
#: beyond, the plan is the global greedy's.
ENUMERATE_LEAVES = 10_000


@dataclass(frozen=True)
class Fits:
    """The other stopping rule: remove until the student has at most ``max_params``
    parameters, every removable space down to no fewer than its floor (default 1),
    removable residual blocks competing when ``blocks`` (students by budget)."""

    max_params: int
    floors: dict[int, int]
    blocks: bool = True


class _State:
    """A tracked layout, its scorer and the plan so far, with what is left to remove:
    ``route``'s blocks and widths, or (``fits``) whatever fits a budget."""

    def __init__(
        self, teacher, scorer, route: NetRoute | None = None, fits: Fits | None = None
    ) -> None:
        self.tr = Tracked.start(teacher)
        self.sc = scorer
        self.ops: list[Op] = []
        self.effects: list[Effect] = []
        self.fits = fits
        route = route or NetRoute((), ())
        self.pending = list(route.removed_blocks)
        self.layers = list(route.removed_layers)
        self.merges = bool(route.removed_layers)
        self.target = dict(route.widths)
        gone_inner = {s for b in route.removed_blocks for s in teacher.graph.blocks[b - 1].inner}
        self.shrinking = [s for s in sorted(self.target) if s not in gone_inner]

    def copy(self) -> _State:
        out = object.__new__(_State)
        out.tr, out.sc = self.tr.copy(), self.sc.copy()
        out.ops, out.effects = list(self.ops), list(self.effects)
        out.pending, out.target, out.shrinking = list(self.pending), self.target, self.shrinking
        out.layers, out.fits, out.merges = list(self.layers), self.fits, self.merges
        return out

    def keys(self) -> list[tuple[str, int]]:
        """The spaces, blocks and layers a next step may act on, in the tie order (none:
        done).  A plain layer waits until its spaces are at their common width."""
        tr, fits = self.tr, self.fits
        if fits is None:
            keys = [
                ("space", s)
                for s in self.shrinking
                if s in tr.positions and self.width(s) > self.target[s]
            ]
            keys += [("block", b) for b in self.pending]
            for n in self.layers:
                try:
                    tr.check(Psi(n))
                except InvalidOperation:
                    continue
                keys.append(("layer", n))
            return keys
        if tr.structure.n_params <= fits.max_params:
            return []
        fixed = tr.teacher.graph.fixed
        keys = [
            ("space", s)
            for s in tr.positions
            if s not in fixed and self.width(s) > max(1, fits.floors.get(s, 1))
        ]
        if fits.blocks and tr.is_network:
            for b in tr.teacher.graph.blocks:
                try:
                    tr.check(PsiBlock(b.number))
                except InvalidOperation:
                    continue
                keys.append(("block", b.number))
        return keys

    def width(self, space: int) -> int:
        return self.tr.neurons[self.tr.positions.index(space)].size

    def settled(self, block: int) -> bool:
        """Whether ψ on ``block`` (still to come on this route) will condition exactly the
        entries it would condition now: its last layer's rows (the space it writes) and
        columns (its inner space, gone with it, or the stream it reads) shrink no more, and
        no plain layer merges spaces on this route."""
        if self.fits is not None or self.merges:
            return False
        b = self.tr.teacher.graph.blocks[block - 1]
        spaces = (b.writes,) if b.inner else (b.writes, b.reads)
        return all(
            s in self.tr.positions and self.width(s) <= self.target.get(s, self.width(s))
            for s in spaces
        )

    def floor(self, ops: _Steps, inc: np.ndarray) -> float:
        """A lower bound of this route's final cost: the cost so far plus the largest
        increment (or lower bound of one) of a settled block still to remove.  The cost
        only grows with the conditioned set, and that block's entries will be in it."""
        best = 0.0
        for b in self.pending:
            k = ops.index(("block", b)) if self.settled(b) else None
            if k is not None and np.isfinite(inc[k]):
                best = max(best, float(inc[k]))
        return float(self.sc.cost) + best

    def phi(self, space: int, channel: int) -> Op:
        """φ on channel ``channel`` (current order) of teacher space ``space``, in the
        teacher's vocabulary: a network's φ(space, channel), an MLP's φ(position, neuron)."""
        if self.tr.is_network:
            return PhiSpace(space, channel)
        return Phi(self.tr.positions.index(space) + 1, channel)

    def candidates(self) -> tuple[_Steps, np.ndarray]:
        """Every next step and its exact increment, in the tie order."""
        ops = _Steps(self)
        incs: list[np.ndarray] = []
        for key in self.keys():
            if key[0] == "layer":
                op, inc = self.merge(key[1])
                ops.add(key, 1, op)
                incs.append(np.array([inc]))
                continue
            if key[0] == "space":
                groups = self.tr.consumers(key[1])
                ops.add(key, groups.width)
            else:
                groups = self.tr.block_whole(key[1])
                ops.add(key, 1)
            incs.append(np.asarray(self.sc.drops(groups).increments(), dtype=float))
        return ops, np.concatenate(incs) if incs else np.zeros(0)

    def merge(self, layer: int) -> tuple[Psi, float]:
        """ψ on plain layer ``layer`` with its pairing of least exact cost (every
        permutation up to ``EXACT_PAIRINGS`` channels; beyond, the assignment on the
        block's linear terms), and that cost."""
        probe = self.tr.copy()
        eff = probe.apply(Psi(layer))
        idx, base = eff.conditioned, eff.targets
        lay = self.tr._layer_of(layer)
        R, g = lay.rows.size, lay.unit.segments[0].group
        centre = np.arange(R)[:, None] * (R * g) + np.arange(R)[None, :] * g + g // 2
        block = self.sc.block(idx)
        if R <= EXACT_PAIRINGS:
            pairings = list(itertools.permutations(range(R)))
        else:
            lin = block.linear[centre]  # [row, channel]: that row's centre on that channel
            r, c = linear_sum_assignment(lin)
            pi = np.empty(R, dtype=np.int64)
            pi[r] = c
            pairings = [tuple(int(x) for x in pi)]
        costs = []
        for pi in pairings:  # the weight's entries lead eff's, row-major (its bias: 0)
            targets = np.zeros_like(base)
            targets[np.arange(R) * (R * g) + np.asarray(pi) * g + g // 2] = 1.0
            costs.append(float(block.cost(targets)))
        k = least(np.array(costs), self.sc.cost)
        best, best_cost = pairings[k], costs[k]
        return Psi(layer, None if best == tuple(range(R)) else tuple(best)), best_cost

    def take(self, op: Op) -> None:
        eff = self.record(op)
        self.sc.commit(eff.conditioned, eff.targets)

    def record(self, op: Op) -> Effect:
        """Apply ``op`` to the layout and the plan so far (the scorer's commit is the
        caller's: a stage may make it from what it holds)."""
        eff = self.tr.apply(op)
        self.ops.append(op)
        self.effects.append(eff)
        self.forget(op)
        return eff

    def forget(self, op: Op) -> None:
        """Strike a ψ step from what the route still has to remove."""
        if isinstance(op, PsiBlock) and op.block in self.pending:
            self.pending.remove(op.block)
        if isinstance(op, Psi) and op.layer in self.layers:
            self.layers.remove(op.layer)

    def plan(self) -> Plan:
        teacher = self.tr.teacher
        return Plan.from_compiled(CompiledPlan(teacher, self.ops, (self.tr, self.effects)))


class _Steps:
    """The candidate steps of a state in the tie order, each op made when asked for (a
    wide network has hundreds of thousands of candidates per step, one of them taken)."""

    def __init__(self, st: _State) -> None:
        self.st = st
        self.runs: list[tuple[tuple[str, int], Op | None]] = []
        self.ends: list[int] = []
        #: per run, the stage's candidate of each step (``_Stages``: the live ones)
        self.members: list[np.ndarray | None] = []

    def add(self, key: tuple[str, int], n: int, op: Op | None = None, members=None) -> None:
        self.runs.append((key, op))
        self.ends.append((self.ends[-1] if self.ends else 0) + n)
        self.members.append(members)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def _run(self, k: int) -> tuple[int, int]:
        """(the run of step k, its place in the run)."""
        j = int(np.searchsorted(self.ends, k, side="right"))
        return j, int(k) - (self.ends[j - 1] if j else 0)

    def __getitem__(self, k: int) -> Op:
        j, i = self._run(k)
        (kind, x), op = self.runs[j]
        if op is not None:  # ψ on a layer, its pairing chosen when scored
            return op
        if kind == "block":
            return PsiBlock(x)
        return self.st.phi(x, i)

    def where(self, k: int) -> tuple[tuple[str, int], int]:
        """(the key of step k, its candidate in that key's stage; -1 for a layer)."""
        j, i = self._run(k)
        m = self.members[j]
        return self.runs[j][0], (-1 if m is None else int(m[i]))

    def index(self, key: tuple[str, int]) -> int | None:
        """The first step of ``key``'s run (None when it has none)."""
        for j, (k, _) in enumerate(self.runs):
            if k == key:
                return self.ends[j - 1] if j else 0
        return None


def _greedy(
    posterior: Posterior,
    route: NetRoute | None,
    budget: Budget,
    incremental: bool = True,
    fits: Fits | None = None,
    bound: float = np.inf,
) -> _State | None:
    """The global greedy of ``route`` (or until the student ``fits``); ``incremental``:
    with stages kept current where the scorer can (else, or when False, every candidate
    rescored by a new stage each step).  ``None`` once its cost, or its floor
    (:meth:`_State.floor`), reaches ``bound`` (a cheaper route is known: the cost only
    grows with the conditioned set, so this one cannot win)."""
    with single_threaded():  # thin products; big ones ask for every core themselves
        return _greedy_in(posterior, route, budget, incremental, fits, bound)


def _greedy_in(posterior, route, budget, incremental, fits, bound) -> _State | None:
    st = _State(posterior.structure, posterior.scorer(), route, fits)
    stages = _Stages(st) if incremental and isinstance(st.sc, DenseScorer) else None
    while True:
        if st.sc.cost >= bound:
            return None
        budget.check("choosing the widths within the budget" if fits else "building the first plan")
        if stages is None:  # scorers whose stages cannot take in each other's commits
            ops, inc = st.candidates()
            if not ops:
                return st
            if np.isfinite(bound) and st.floor(ops, inc) >= bound:
                return None
            st.take(ops[least(inc, st.sc.cost)])
            continue
        ops, inc = stages.candidates(stop=bound)
        if not ops:
            return st
        if np.isfinite(bound) and st.floor(ops, inc) >= bound:
            return None
        k = least(inc, st.sc.cost)
        stages.take(ops[k], *ops.where(k))


class _Stages:
    """The global greedy's candidates kept current between steps (dense scorers): one
    scorer stage per shrinking space and per block still to remove, each taking in every
    other stage's commits (``absorb``, ``O(|B| k |G|)``) and losing the entries its
    consumers' rows lost (``restrict``), instead of a new stage per space per step
    (``O(|B|² |G|)``). The numbers are those of new stages: exact."""

    def __init__(self, st: _State) -> None:
        self.st = st
        self.drops: dict[tuple[str, int], object] = {}

    def _groups(self, key: tuple[str, int]) -> np.ndarray:
        tr = self.st.tr
        return tr.consumer_groups(key[1]) if key[0] == "space" else tr.block_indices(key[1])[None]

    def _synced(self, key: tuple[str, int]):
        """The stage of ``key``, its candidates' groups as they are now."""
        new = self._groups(key)
        d = self.drops.get(key)
        if d is None:
            d = self.drops[key] = self.st.sc.drops(new)
            return d
        live = np.flatnonzero(d.live)
        old = d.G[d.pos[live]]
        if old.shape != new.shape:
            keep = np.isin(old[0], new[0])
            d.restrict(keep)
            old = d.G[d.pos[live]]
        if not np.array_equal(old, new):  # a merged layer's readers joined: a new stage
            d = self.drops[key] = self.st.sc.drops(new)
        return d

    def candidates(self, stop: float = np.inf) -> tuple[_Steps, np.ndarray]:
        """Every next step (its stage and candidate: :meth:`_Steps.where`) and its
        increment, in the tie order.  A stage whose
        factors are kept offers lower bounds first (:meth:`_DenseDrops.bounds`); stages
        are scored exactly until every candidate within ``TIE`` of the least value is
        exact, so the step taken is the one exact increments everywhere would take.
        When the route's floor from the bounds alone reaches ``stop`` (the route cannot
        win: :meth:`_State.floor`), the bounds are returned as they are."""
        st = self.st
        ops = _Steps(st)
        keys = st.keys()
        for key in list(self.drops):
            if key not in keys:
                del self.drops[key]
        parts: list[tuple[tuple[str, int], object, np.ndarray, bool]] = []
        for key in keys:
            if key[0] == "layer":
                op, inc = st.merge(key[1])
                ops.add(key, 1, op)
                parts.append((key, None, np.array([inc]), True))
                continue
            d = self._synced(key)
            d.keep_factors = True
            live = np.flatnonzero(d.live)
            b = d.bounds()
            exact = b is None
            v = (d.increments() if exact else b)[live]
            parts.append((key, d, v, exact))
            ops.add(key, live.size, members=live)
        if np.isfinite(stop) and parts:
            inc = np.concatenate([v for _, _, v, _ in parts])
            if st.floor(ops, inc) >= stop:
                return ops, inc
        while parts:
            m = min((float(v.min()) for _, _, v, _ in parts if v.size), default=0.0)
            top = tie_limit(m, st.sc.cost)
            redo = [i for i, (_, _, v, ex) in enumerate(parts) if not ex and (v <= top).any()]
            if not redo:
                break
            for i in redo:
                key, d, _, _ = parts[i]
                parts[i] = (key, d, d.increments()[np.flatnonzero(d.live)], True)
        inc = np.concatenate([v for _, _, v, _ in parts]) if parts else np.zeros(0)
        return ops, inc

    def take(self, op: Op, key: tuple[str, int], j: int) -> None:
        """Take step ``op`` (candidate ``j`` of ``key``'s stage).  Only the stages of the
        keys left after it are kept current: the one whose step ends it (a block's ψ, a
        space's last channel, the route's last step) commits its own block alone."""
        st = self.st
        n0 = st.sc.n
        eff = st.record(op)
        keys = set(st.keys())
        for other in [o for o in self.drops if o not in keys and o != key]:
            del self.drops[other]
        if key[0] == "layer":
            st.sc.commit(eff.conditioned, eff.targets)
        else:
            self.drops[key].take(j, last=key not in keys)
            if key not in keys:
                del self.drops[key]
        k = st.sc.n - n0
        for other, d in self.drops.items():
            if other != key:
                d.absorb(k)


def _leaves(teacher: Network, route: NetRoute) -> int:
    """How many step sequences a branch and bound may visit for ``route`` (runs of φ in one
    space counted once): an upper bound from the multinomial of the removals."""
    counts, total = [], 1
    widths = dict(zip(range(1, len(teacher.graph.widths) + 1), teacher.graph.widths, strict=True))
    gone_inner = {s for b in route.removed_blocks for s in teacher.graph.blocks[b - 1].inner}
    for s, w in route.widths:
        if s not in gone_inner and widths[s] > w:
            k = widths[s] - w
            counts.append(k)
            total *= comb(widths[s], k) * factorial(k)
    counts += [1] * (len(route.removed_blocks) + len(route.removed_layers))
    n = sum(counts)
    multinomial = factorial(n)
    for k in counts:
        multinomial //= factorial(k)
    return total * multinomial


def _branch_and_bound(posterior: Posterior, route: NetRoute, best: list, budget: Budget) -> None:
    """Improve ``best`` = [cost, state, route] to the least-cost sequence of ``route``'s steps
    (:class:`~.budget.Cut` when the budget runs out; ``best`` then holds the best so far).
    Increments are never negative, so a prefix at least as dear as the best is cut; a run
    of φ in one space is a set, visited in increasing teacher channel order only (unless
    a layer both reads and writes the space)."""
    # spaces a layer both reads and writes (a one-layer branch of an identity block): there
    # the order of removals matters, as in an RNN (docs/theory.md §3)
    g = posterior.structure.graph
    self_reading = {u.out for u in g.units if any(seg.space == u.out for seg in u.segments)}

    def visit(st: _State, last: tuple[int, int] | None) -> None:
        budget.spend(NODE_WORK)
        ops, inc = st.candidates()
        if not ops:
            if st.sc.cost < best[0] - 1e-12 * max(1.0, abs(best[0])):
                best[:] = [st.sc.cost, st, route]
            return
        for k in np.argsort(inc, kind="stable"):
            op = ops[int(k)]
            if st.sc.cost + inc[k] >= best[0]:
                break
            here = None
            if isinstance(op, PhiSpace):
                here = (op.space, int(st.tr.neurons[st.tr.positions.index(op.space)][op.channel]))
                if (
                    last is not None
                    and last[0] == here[0]
                    and here[1] < last[1]
                    and op.space not in self_reading
                ):
                    continue
            nxt = st.copy()
            nxt.take(op)
            visit(nxt, here)

    with single_threaded():
        visit(_State(posterior.structure, posterior.scorer(), route), None)


def network_search(
    posterior: Posterior,
    student: Network,
    *,
    budget: Budget,
    work: float | None,
    effort_floor: float,
    enumerate_floor: float,
    one_shots: float,
    max_routes: int,
):
    """The plan of least exact cost found for a network teacher (see the module)."""
    from . import SearchResult

    teacher = posterior.structure
    routes = network_routes(teacher, student)
    n_routes = len(routes)
    if len(routes) > max_routes:  # the best by the exact cost of their blocks alone
        sc = posterior.scorer()

        def block_cost(r: NetRoute) -> float:
            tr = Tracked.start(teacher)
            B = np.concatenate([np.zeros(0, np.int64), *(tr.block_indices(b) for b in r.blocks)])
            return float(sc.drops(B[None, :]).increments()[0]) if B.size else 0.0

        routes = sorted(routes, key=lambda r: (block_cost(r), r.removed_blocks, r.removed_layers))[
            :max_routes
        ]
    built: list[tuple[float, _State, NetRoute]] = []
    beaten: list[NetRoute] = []  # routes whose greedy cost reached a finished one's
    for route in routes:
        if (built or beaten) and budget.expired():
            break
        st = _greedy(posterior, route, budget, bound=min((b[0] for b in built), default=np.inf))
        if st is None:
            beaten.append(route)
            continue
        cost, st.sc = st.sc.cost, None  # its plan needs the ops only: the scorer's memory goes
        built.append((cost, st, route))
    built.sort(key=lambda x: x[0])
    best = list(built[0])
    c = best[1].plan().compiled
    default = one_shots * dense_work(c.n_conditioned, c.student.n_params)
    budget.work = work if work is not None else max(effort_floor, default)
    tried = [r for _, _, r in built] + beaten
    leaves = sum(_leaves(teacher, r) for r in tried)
    if work is None and leaves <= ENUMERATE_LEAVES:
        budget.work = max(budget.work, enumerate_floor)
    exhaustive = False
    if len(tried) == n_routes and leaves <= ENUMERATE_LEAVES and not budget.expired():
        try:  # bounded by the greedy's cost, so it mostly visits far fewer nodes than leaves
            for route in tried:
                _branch_and_bound(posterior, route, best, budget)
            exhaustive = not budget.cut
        except Cut:
            exhaustive = False
    best_cost, best, best_route = best
    plan = best.plan()
    if plan.student.to_json() != student.to_json():  # pragma: no cover - by construction
        raise InvalidPlan("the search reached another student", field="student")
    return SearchResult(
        plan,
        float(best_cost),
        best_route,
        n_routes,
        len(built),
        budget.evaluations,
        float(budget.spent),
        exhaustive,
        budget.cut,
        budget.cut_by,
    )


def global_greedy_sets(
    posterior: Posterior, widths: dict[int, int], budget: Budget
) -> tuple[dict[int, list[int]], float]:
    """The global greedy of exact increments on an MLP: the teacher neurons each shrinking
    position (teacher numbering) loses, in the greedy's order, and the greedy's cost.  A
    φ-only route of the MLP search builds its plan from these sets, deeper first, which
    never costs more (docs/theory.md §6): so the search is never above this greedy."""
    route = NetRoute((), tuple(sorted(widths.items())))
    st = _greedy(posterior, route, budget)
    drops: dict[int, list[int]] = {}
    tr = Tracked.start(posterior.structure)
    for op in st.ops:
        p = tr.positions[op.layer - 1]
        drops.setdefault(p, []).append(int(tr.neurons[op.layer - 1][op.neuron]))
        tr.apply(op)
    return drops, float(st.sc.cost)
