"""The constructive pass: one route, one plan, by exact increments (docs/theory.md §6).

Blocks are visited from the output down, so every position is reduced after
the positions above it (deeper first: a neuron's removal then conditions only
its outgoing weights into surviving neurons, which never costs more, docs/theory.md §4):

* a position that shrinks removes, one at a time, the neuron whose removal has
  the least exact increment given everything conditioned so far (ties: the
  lowest index); the scorer keeps its factorisation up to date between steps
  (``incremental`` criteria).  Other criteria rank the neurons by their own
  score and the scorer only prices the choice exactly;
* a layer removed by ψ conditions its kept rows to unit vectors: the pairing
  π (and, at the bottom of a merged block, which neurons of the position below
  survive) is a linear assignment on the exact change of the cost when one
  entry's target goes from 0 to 1, given everything conditioned so far; the
  unpaired neurons below are then removed.

The steps are recorded as :class:`Choices` (teacher neuron ids), from which
:func:`replay` rebuilds the same plan; ψ steps come last, in an order that
keeps every step valid.  Everything goes through :class:`~planner.ops.Tracked`,
so the plan's conditioned set is, by construction, what the scorer committed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from math import ceil

import numpy as np
from scipy.optimize import linear_sum_assignment

from .._threads import single_threaded
from ..criteria import Criterion, NeuronContext
from ..lattice import Route
from ..ops import Effect, Op, Phi, Psi, Tracked
from ..plan import CompiledPlan, Plan
from ..posterior import Posterior
from ..posterior.scoring import Columns, LayerBlock
from ..structure import Structure
from .budget import Budget

__all__ = ["Built", "Choices", "Shared", "construct", "replay", "single_threaded"]


#: Above this many entries a merged layer's assignment is first narrowed to the
#: columns with the cheapest entries (a heuristic for very wide layers).
ASSIGN_ENTRIES = 400_000
#: Work (flops) one shrinking position may spend on exact increments before the
#: greedy removes several neurons per update (structured kernels on large teachers).
STAGE_WORK = 2e10


@dataclass
class Choices:
    """A route's decisions in teacher neuron ids, enough to rebuild its plan.

    ``drops[p]``: the neurons of teacher position p removed by φ, in order;
    ``pairs[p]``: for teacher layer p removed by ψ, ``(rows, cols)``: neuron
    ``rows[k]`` of position p is paired with neuron ``cols[k]`` of position p-1.
    """

    route: Route
    drops: dict[int, tuple[int, ...]] = field(default_factory=dict)
    pairs: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def copy(self) -> Choices:
        return Choices(self.route, dict(self.drops), dict(self.pairs))

    def key(self) -> tuple:
        """Identifies the plan (MLP removal order within a position does not matter)."""
        return (
            self.route.blocks,
            tuple(sorted(self.drops.items())),
            tuple(sorted(self.pairs.items())),
        )


@dataclass(frozen=True)
class Built:
    """A constructed plan, its exact cost and the choices that rebuild it; ``scorer``:
    the scorer that committed exactly the plan's conditioning, when kept (what the
    posterior may adopt for the plan's alignment, :meth:`~planner.posterior.Posterior.adopt`)."""

    plan: Plan
    cost: float
    choices: Choices
    scorer: object = field(default=None, repr=False, compare=False)


class _Builder:
    """Applies a route's steps to a tracked layout, recording ops, effects and choices."""

    def __init__(self, teacher: Structure, route: Route) -> None:
        self.teacher, self.route = teacher, route
        self.tr = Tracked.start(teacher)
        self.ops: list[Op] = []
        self.effects: list[Effect] = []
        self.choices = Choices(route)

    def copy(self) -> _Builder:
        out = _Builder.__new__(_Builder)
        out.teacher, out.route, out.tr = self.teacher, self.route, self.tr.copy()
        out.ops, out.effects = list(self.ops), list(self.effects)
        out.choices = self.choices.copy()
        return out

    def position(self, p: int) -> int:
        """Current position of teacher position p."""
        return self.tr.positions.index(p) + 1

    def ids(self, t: int) -> np.ndarray:
        """Teacher neuron ids of current position t, in current order."""
        return self.tr.neurons[t - 1]

    def remove(self, p: int, ids: list[int]) -> Effect:
        """φ away the neurons ``ids`` (teacher ids) of teacher position p, in that order."""
        t = self.position(p)
        start = np.searchsorted(self.ids(t), ids)  # current order is ascending teacher ids
        if start.size < 2 or (np.diff(start) < 0).all():
            seq = [int(i) for i in start]  # descending: earlier removals do not shift it
        else:  # an index shifts by the earlier removals below it
            seq, gone = [], []
            for i in (int(x) for x in start):
                seq.append(i - bisect.bisect_left(gone, i))
                bisect.insort(gone, i)
        eff = self.tr.apply_phis(t, seq)
        self.effects.append(eff)
        self.ops.extend(Phi(t, i) for i in seq)
        self.choices.drops[p] = self.choices.drops.get(p, ()) + tuple(int(a) for a in ids)
        return eff

    def block_indices(self, t: int) -> tuple[np.ndarray, int, int]:
        """Teacher indices a ψ(t) conditions (U rows, then V, then b) and U's shape."""
        U = self.tr.weights(t)
        parts = [U.ravel()]
        if self.tr.structure.recurrent(t):
            parts.append(self.tr.recurrent(t).ravel())
        if self.tr.structure.bias:
            parts.append(self.tr.biases(t))
        return np.concatenate(parts), U.shape[0], U.shape[1]

    def finish(self) -> Plan:
        """Every ψ, identity layers first, then from the top down (always valid)."""
        partner = {p: dict(zip(r, c, strict=True)) for p, (r, c) in self.choices.pairs.items()}
        removed = self.route.removed_layers
        for p in sorted(removed, key=lambda p: (self.teacher.activation(p) != "identity", -p)):
            t = self.position(p)
            q = self.tr.positions[t - 2]
            index = {int(a): k for k, a in enumerate(self.ids(t - 1))}
            pairing = []
            for a in self.ids(t):
                b, pos = partner[p][int(a)], p - 1
                while pos != q:
                    b, pos = partner[pos][b], pos - 1
                pairing.append(index[b])
            op = Psi(t, tuple(pairing))
            self.effects.append(self.tr.apply(op))
            self.ops.append(op)
        return Plan.from_compiled(CompiledPlan(self.teacher, self.ops, (self.tr, self.effects)))


#: Increments this close (relative to the cost so far) are ties, broken by the lowest
#: index (docs/theory.md §6): rounding noise must not decide between two equally cheap neurons.
TIE = 1e-9


def tie_limit(m: float, base: float) -> float:
    """The largest increment that ties with the least one ``m`` (cost so far ``base``)."""
    return m + TIE * max(1.0, abs(base) + abs(m))


def least(inc: np.ndarray, base: float) -> int:
    """The index of the least increment, the lowest among ties (within ``TIE``)."""
    return int(np.flatnonzero(inc <= tie_limit(float(np.min(inc)), base))[0])


class Shared:
    """What several routes' constructions have in common, computed once: the state after a
    shrinking stage depends only on the blocks above it and the stage itself (its
    position and width), so routes that agree there share it (an incremental criterion:
    nothing random is drawn).  It counts, per stage, the routes that will ask for it:
    the last one takes the kept state itself, the others a copy."""

    def __init__(self, routes: list[Route], student: Structure, teacher: Structure) -> None:
        self.left: dict[tuple, int] = {}
        self.kept: dict[tuple, tuple[_Builder, object]] = {}
        for r in routes:
            for key in {self.key(r, j, student) for j in range(student.T, 0, -1)}:
                self.left[key] = self.left.get(key, 0) + 1
        self.left = {k: n for k, n in self.left.items() if n > 1 and _shrinks(teacher, k)}

    @staticmethod
    def key(route: Route, j: int, student: Structure) -> tuple:
        return (route.blocks[j:], route.blocks[j - 1][1], student.width(j))

    def take(self, key: tuple):
        """(builder, scorer) after the stage ``key`` when known (a copy unless this is its
        last route), else None."""
        if key not in self.kept:
            return None
        self.left[key] -= 1
        b, sc = self.kept[key]
        if self.left[key] == 0:
            del self.kept[key]
            return b, sc
        return b.copy(), sc.copy()

    def keep(self, key: tuple, b: _Builder, sc) -> None:
        if self.left.get(key, 0) > 1:
            self.left[key] -= 1  # this route's own use
            self.kept[key] = (b.copy(), sc.copy())


def _shrinks(teacher: Structure, key: tuple) -> bool:
    _, e, w = key
    return teacher.is_hidden(e) and teacher.width(e) > w


def construct(
    posterior: Posterior,
    student: Structure,
    route: Route,
    crit: Criterion,
    *,
    rng: np.random.Generator,
    gradients: np.ndarray | None = None,
    gradient_variance: np.ndarray | None = None,
    scorer=None,
    budget: Budget | None = None,
    shared: Shared | None = None,
) -> Built:
    """The plan of ``route`` built by ``crit`` (exact increments when incremental).

    With a ``budget``, its deadline is checked before every stage and every greedy
    step: past it, :class:`~planner.errors.DeadlineExceeded` is raised.  With ``shared``
    (an incremental criterion), stages other routes have built or will build are built
    once (:class:`Shared`)."""
    sc = posterior.scorer() if scorer is None else scorer
    b = _Builder(posterior.structure, route)
    tick = (lambda: budget.check("building a plan")) if budget is not None else (lambda: None)
    if not crit.incremental:
        shared = None

    def context(t: int) -> NeuronContext:
        return NeuronContext(posterior, b.tr, t, rng, gradients, gradient_variance)

    for j in range(student.T, 0, -1):
        s, e = route.blocks[j - 1]
        w = student.width(j)
        t = b.position(e)
        tick()
        if b.tr.structure.is_hidden(t) and b.tr.structure.width(t) > w:
            key = Shared.key(route, j, student)
            known = shared.take(key) if shared is not None else None
            if known is not None:
                b, sc = known
                b.route = b.choices.route = route
            else:
                _shrink(b, sc, e, w, crit, context, tick)
                if shared is not None:
                    shared.keep(key, b, sc)
        for p in range(e, s, -1):
            tick()
            _merge(b, sc, p, crit, context, rng)
    return Built(b.finish(), float(sc.cost), b.choices, sc)


def _shrink(b: _Builder, sc, p: int, w: int, crit: Criterion, context, tick=lambda: None) -> None:
    """Reduce teacher position p to width w."""
    t = b.position(p)
    ids = [int(a) for a in b.ids(t)]
    need = len(ids) - w
    if b.tr.structure.kind == "rnn":
        # a removal changes the others' groups (their V columns lose its row): one at a time
        ranked = None if crit.incremental else np.argsort(crit(context(t)), kind="stable")
        for k in range(need):
            tick()
            if ranked is None:
                inc = sc.drops(b.tr.outgoing_all(t)).increments()
                a = int(b.ids(t)[least(inc, float(sc.cost))])
            else:
                a = ids[int(ranked[k])]
            eff = b.remove(p, [a])
            sc.commit(eff.conditioned, eff.targets)
        return
    nxt = b.tr.layers[t - 1]  # layer t+1: its rows and its columns (position t), teacher ids
    groups = Columns(b.teacher, nxt.src, nxt.rows, nxt.cols)
    drops = sc.drops(groups)
    if crit.incremental:
        if sc.independent:
            batch = need
        else:
            work = sc.step_work(groups.cols.size, groups.rows.size)
            batch = max(1, ceil(need * work / STAGE_WORK))
        taken: list[int] = []
        with single_threaded():  # many thin products: threads cost more than they give
            while len(taken) < need:
                tick()
                n = min(batch, need - len(taken))
                inc = _deciding(drops, n, float(sc.cost))
                if batch == 1:  # ties within TIE of the cost so far: the lowest index
                    pick = np.array([least(inc, float(sc.cost))])
                else:
                    pick = np.argsort(inc, kind="stable")[:n]
                drops.take(pick)
                taken.extend(int(i) for i in pick)
    else:
        taken = [int(i) for i in np.argsort(crit(context(t)), kind="stable")[:need]]
        drops.take(np.asarray(taken))
    b.remove(p, [ids[i] for i in sorted(taken, reverse=True)])


def _deciding(drops, b: int, base: float) -> np.ndarray:
    """Increments that pick the ``b`` least as exact ones would: exact for every candidate
    that could be among them or tie with the last (within ``TIE``), lower bounds
    (:meth:`bounds`) above that elsewhere.  Stages without bounds score every candidate."""
    if not getattr(drops, "partial", False):
        return drops.increments()
    drops.keep_factors = True
    inc = drops.bounds()
    if inc is None:
        return drops.increments()
    exact = ~np.isfinite(inc)  # taken: inf either way
    # the 2b least bounds first; then every bound within TIE of the b-th least exact value
    # (at least the b-th least of all, so those are the only ones that could decide)
    todo = np.argsort(inc, kind="stable")[: 2 * b]
    while True:
        todo = todo[~exact[todo]]
        if todo.size:
            inc[todo] = drops.increments(todo)[todo]
            exact[todo] = True
        known = inc[exact & np.isfinite(inc)]
        top = (
            tie_limit(float(np.partition(known, b - 1)[b - 1]), base) if known.size >= b else np.inf
        )
        todo = np.flatnonzero(~exact & (inc <= top))
        if not todo.size:
            return inc


def _merge(b: _Builder, sc, p: int, crit: Criterion, context, rng) -> None:
    """Condition layer p (removed by ψ later) to a pairing of its rows with position p-1."""
    t = b.position(p)
    if b.teacher.kind == "mlp":
        lay = b.tr.layers[t - 2]
        P = LayerBlock(b.teacher, lay.src, lay.rows, lay.cols)
        R, L = lay.rows.size, lay.cols.size
    else:
        P, R, L = b.block_indices(t)
    block = sc.block(P)
    lin = block.linear[: R * L].reshape(R, L)
    cand = np.arange(L)
    if not crit.incremental and t - 1 > 1 and L > R:
        # the criterion chooses which neurons below survive; the assignment pairs them
        keep = np.argsort(crit(context(t - 1)), kind="stable")[L - R :]
        cand = np.sort(keep)
    if R * cand.size > ASSIGN_ENTRIES:  # narrow to the columns with the cheapest entries
        cap = min(cand.size, R + max(16, R // 4))
        cand = np.sort(cand[np.argsort(lin[:, cand].min(axis=0), kind="stable")[:cap]])
    r, c = linear_sum_assignment(lin[:, cand])
    c = cand[c]
    targets = np.zeros(block.linear.size)
    targets[r * L + c] = 1.0
    block.commit(targets)
    rows, cols = b.ids(t), b.ids(t - 1)
    b.choices.pairs[p] = (tuple(int(a) for a in rows[r]), tuple(int(a) for a in cols[c]))
    gone = sorted(set(range(L)) - {int(x) for x in c}, reverse=True)
    if gone:
        eff = b.remove(p - 1, [int(cols[i]) for i in gone])
        if b.teacher.kind == "rnn":  # the recurrent columns below, outside the block
            extra = ~np.isin(eff.conditioned, P)
            sc.commit(eff.conditioned[extra], eff.targets[extra])


def replay(teacher: Structure, choices: Choices) -> Plan:
    """The plan of ``choices``, rebuilt step by step (no scoring)."""
    b = _Builder(teacher, choices.route)
    for s, e in reversed(choices.route.blocks):
        for p in range(e, s - 1, -1):
            if p in choices.drops:
                b.remove(p, list(choices.drops[p]))
            if p > s:
                b.choices.pairs[p] = choices.pairs[p]
    return b.finish()
