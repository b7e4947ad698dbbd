"""Improvement: exact exchanges and, where the choices can be enumerated, branch and bound.

**Exchange moves** (:mod:`planner.search.moves`) are scored exactly without
rebuilding the plan, a whole family at once.  With ``P = Σ_BB⁻¹`` and
``α = P d`` of the current plan, a move that removes the entries R from B,
changes the targets of others by δ and adds the entries A costs (Schur
complements on P, then the increment of A)

    cost(B∖R) = ½ [eᵀβ − 2 e_Rᵀβ_R + e_RᵀP_RR e_R − γᵀ P_RR⁻¹ γ],
    e = d + δ,  β = P e,  γ = β_R − P_RR e_R,

plus ``½ rᵀ S⁻¹ r`` for A given B∖R, from ``H = P Σ_{B,E}`` precomputed for
the pool E of every entry a move may add: with ``Z = L_R⁻¹ H_{R,A}`` (``L_R`` the
Cholesky factor of ``P_RR``), ``S = Cov(x_A | x_B) + ZᵀZ`` and
``r = t_A − E[x_A | x_B] + H_{R,A}ᵀ e_R + Zᵀ L_R⁻¹ γ``: ``O(|R|²|A| + |A|³)`` per
move, ``P_RR`` factorised once per distinct R (a family pairs a few of them with
many entering sets).  The
next round's ``P`` and ``H`` come from the last by rank-k up- and downdates past the
accepted move (:meth:`DenseEvaluator.moved`), not from a new factorisation.  Independent
coordinates (``diag``) need none of it; other formats without a dense
evaluator rebuild and rescore (:class:`ReplayEvaluator`).

**Branch and bound** enumerates a route's choices in the constructive order,
committing each choice to a copy of the scorer; the exact cost of a partial
plan is a lower bound of every completion (costs only grow as B grows), so a
branch that already costs as much as the best plan is cut.  It runs when the
choice space fits the budget, and then the result is the exhaustive optimum.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from itertools import pairwise
from math import comb, perm

import numpy as np
from scipy.linalg import cho_solve

from ..backend import for_size
from ..errors import SingularConstraint
from ..lattice import Route
from ..linalg import cholesky_lower, gram_downdate, lower_solve, symmetrise
from ..posterior import DiagPosterior, Posterior
from ..posterior.scoring import (
    _FORWARD_MAX,
    batched_cholesky,
    batched_cholesky_solve,
    solve_lower,
)
from ..structure import Structure
from .budget import NODE_WORK, Budget, Cut
from .construction import Built, Choices, _Builder, replay, single_threaded
from .moves import Family, families

__all__ = ["branch_and_bound", "choice_space", "local_search"]


# -- evaluators -----------------------------------------------------------------------------
def _lookup(keys: np.ndarray):
    """A vectorised map from teacher index to position in ``keys``."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]

    def pos(x: np.ndarray) -> np.ndarray:
        return order[np.searchsorted(sorted_keys, x)]

    return pos


def _gather(M: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``M[rows[i]][:, cols[i]]`` for each move i: (n, r, c)."""
    return M[rows[:, :, None], cols[:, None, :]]


def _segments(A: np.ndarray) -> list[slice]:
    """Runs of columns of ``A`` (one row per move) that vary together: a family's moves
    are pairs of a few choices, and each run of entries follows one of them."""
    a = A.shape[1]
    if a == 0:
        return []
    keys = [np.unique(A[:, j], return_inverse=True)[1].ravel() for j in range(a)]
    cuts = [0, *(j for j in range(1, a) if not np.array_equal(keys[j], keys[j - 1])), a]
    return [slice(i, j) for i, j in pairwise(cuts)]


#: Bytes the batched products of one chunk of pattern blocks may hold.
_CHUNK_BYTES = 1 << 25


def _pattern(A: np.ndarray, dense, pairs) -> np.ndarray:
    """``M[A_i, A_i]`` for every move i (an (n, a, a) array) of a matrix M over the pool,
    computing only blocks that some move uses.

    For each pair of column runs (:func:`_segments`) either the dense block over every
    entry either run uses (``dense(rows, cols)``), or, when the moves combine few of
    them, one small block per combination that occurs (``pairs(R, C)`` for stacked
    index rows), whichever is less work.
    """
    out = np.empty((A.shape[0], A.shape[1], A.shape[1]))
    segs = _segments(A)
    uniq = [np.unique(A[:, s], axis=0, return_inverse=True) for s in segs]
    for i, s1 in enumerate(segs):
        u1, inv1 = uniq[i][0], uniq[i][1].ravel()
        for j in range(i, len(segs)):
            s2 = segs[j]
            u2, inv2 = uniq[j][0], uniq[j][1].ravel()
            e1, e2 = np.unique(u1), np.unique(u2)
            combo, cinv = np.unique(inv1 * len(u2) + inv2, return_inverse=True)
            w1, w2 = s1.stop - s1.start, s2.stop - s2.start
            if e1.size * e2.size <= 4 * combo.size * w1 * w2:
                M = dense(e1, e2)
                r, c = np.searchsorted(e1, A[:, s1]), np.searchsorted(e2, A[:, s2])
                blk = M[r[:, :, None], c[:, None, :]]
            else:
                blk = pairs(u1[combo // len(u2)], u2[combo % len(u2)])[cinv.ravel()]
            out[:, s1, s2] = blk
            if j != i:
                out[:, s2, s1] = np.swapaxes(blk, 1, 2)
    return out


class DenseEvaluator:
    """Exact cost of whole families of moves from ``P = Σ_BB⁻¹`` of the current plan.

    Set-up: ``P`` (``Posterior.inverse_block``: a factorisation of Σ_BB, or for a
    precision the Schur complement on B's complement), ``α = P d``, and for the
    pool E of entries moves may add ``Σ_BE`` and ``H = P Σ_BE``; ``Cov(x_E | x_B)``
    is formed only on the blocks moves use (:func:`_pattern`).  Then a move costs
    ``O(|R|²|A| + |A|³)``, all moves of a family in one batched pass.
    """

    def __init__(self, post: Posterior, built: Built, pool: np.ndarray) -> None:
        c = built.plan.compiled
        self.post = post
        self.B, self.v = c.conditioned, c.targets
        E = np.setdiff1d(np.unique(pool), self.B)
        P = post.inverse_block(self.B)
        S_BE = post.cov_cross(self.B, E)
        # |B|² |E|: on a device backend when large (planner.backend)
        self._finish(E, P, S_BE, for_size(P.size + S_BE.size).matmul(P, S_BE))

    def moved(
        self, built: Built, pool: np.ndarray, leave: np.ndarray, enter: np.ndarray
    ) -> DenseEvaluator | None:
        """The evaluator of ``built``, the plan after the accepted move that took the
        entries ``leave`` out of B and put ``enter`` in (other targets may have changed),
        by rank-k up- and downdates of ``P`` and ``H``: ``O(|B|² (r + a) + |B| (r + a) |E|)``
        against a new set-up's ``O(|B|³ + |B|² |E|)``.  None when B did not change so, or
        a block met on the way is not numerically positive definite (then set up anew).

        Leaving R: ``P_K = P_KK − P_KR P_RR⁻¹ P_RK`` and ``P_K Σ_KE = H_K − P_KR P_RR⁻¹ H_R``
        (K = B∖R).  Entering A, with ``S = Cov(x_A | x_K) = Σ_AA − Σ_AK P_K Σ_KA`` and
        ``H_KA = P_K Σ_KA``: ``P`` gains the blocks ``P_K + H_KA S⁻¹ H_KAᵀ``, ``−H_KA S⁻¹``,
        ``S⁻¹``, and ``H`` the rows ``H_A = S⁻¹ (Σ_AE − Σ_AK H_K)``, ``H_K − H_KA H_A``.
        Entries new to the pool get their columns of ``H`` from the updated ``P``; the
        pool's columns are kept (those of entries now in B, or no move's, are never read)
        until more than ``_UNREAD_SHARE`` of them are (None then: a new set-up compacts)."""
        c = built.plan.compiled
        Rp = self.posB(leave)
        keep = np.ones(self.B.size, dtype=bool)
        keep[Rp] = False
        kp = np.flatnonzero(keep)
        K = self.B[kp]
        B = np.concatenate([K, enter])
        if np.intersect1d(K, enter).size or not np.array_equal(np.sort(B), np.sort(c.conditioned)):
            return None
        L_R = cholesky_lower(self.P[np.ix_(Rp, Rp)]) if Rp.size else np.zeros((0, 0))
        if L_R is None:
            return None
        X = lower_solve(L_R, self.P[np.ix_(Rp, kp)]) if Rp.size else np.zeros((0, K.size))
        P_K = self.P[np.ix_(kp, kp)]  # less (L_R⁻¹ P_RK)ᵀ (L_R⁻¹ P_RK)
        P_K = gram_downdate(P_K, X) if K.size and Rp.size else P_K
        Y = lower_solve(L_R, self.H[Rp]) if Rp.size else np.zeros((0, self.E.size))  # L_R⁻¹ H_R
        Ap = self.posE(enter) if enter.size else np.zeros(0, dtype=np.int64)
        H_KA = self.H[np.ix_(kp, Ap)] - X.T @ Y[:, Ap]  # P_K Σ_KA
        S_KA = self.S_BE[np.ix_(kp, Ap)]
        S = symmetrise(self.post.cov_cross(enter, enter) - S_KA.T @ H_KA)
        L_S = cholesky_lower(S) if enter.size else np.zeros((0, 0))
        if L_S is None:
            return None
        Si = cho_solve((L_S, True), np.eye(enter.size), check_finite=False) if enter.size else S
        T = H_KA @ Si
        P = np.empty((B.size, B.size))
        k = K.size
        P[:k, :k] = P_K + T @ H_KA.T
        P[:k, k:] = -T
        P[k:, :k] = -T.T
        P[k:, k:] = Si
        P = symmetrise(P)
        # the pool's columns stay where they are (those of entries now in B are never read
        # again: a move adds entries outside B) and the entries new to it come after them
        n = self.E.size
        pool = np.setdiff1d(np.unique(pool), B)
        if n - np.count_nonzero(np.isin(self.E, pool)) > _UNREAD_SHARE * n:
            return None  # many columns are no longer read: set up anew, which compacts
        fresh = np.setdiff1d(pool, self.E)
        E = np.concatenate([self.E, fresh])
        S_BE, H = np.empty((B.size, E.size)), np.empty((B.size, E.size))
        S_BE[:k, :n] = self.S_BE[kp]
        S_BE[k:, :n] = self.post.cov_cross(enter, self.E)
        H_K = H[:k, :n]
        H_K[...] = self.H[kp]
        H_K -= X.T @ Y  # P_K Σ_KE
        H[k:, :n] = Si @ (S_BE[k:, :n] - S_KA.T @ H_K)  # S⁻¹ Cov(x_A, x_E | x_K)
        H_K -= H_KA @ H[k:, :n]
        if fresh.size:
            S_BE[:, n:] = self.post.cov_cross(B, fresh)
            H[:, n:] = P @ S_BE[:, n:]
        out = DenseEvaluator.__new__(DenseEvaluator)
        out.post, out.B = self.post, B
        out.v = c.targets[_lookup(c.conditioned)(B)]
        out._finish(E, P, S_BE, H)
        return out

    def _finish(self, E: np.ndarray, P: np.ndarray, S_BE: np.ndarray, H: np.ndarray) -> None:
        """Set up what every move reads from ``B``, ``v`` and ``P``, ``Σ_BE``, ``H``."""
        self.d = self.v - self.post.mean[self.B]
        self.posB = _lookup(self.B)
        self.E, self.posE = E, _lookup(E) if E.size else None
        self.P, self.S_BE, self.H = P, S_BE, H
        self.alpha = P @ self.d
        self.dalpha = float(self.d @ self.alpha)
        self.Ealpha = S_BE.T @ self.alpha

    def _dense(self, e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
        """``Cov(x_E | x_B)`` over pool positions e1 × e2."""
        return self.post.cov_cross(self.E[e1], self.E[e2]) - self.S_BE[:, e1].T @ self.H[:, e2]

    def _pairs(self, R: np.ndarray, C: np.ndarray) -> np.ndarray:
        """``Cov(x_E | x_B)[R_k, C_k]`` for each k (pool positions), in chunks."""
        k, w1 = R.shape
        w2 = C.shape[1]
        step = max(1, _CHUNK_BYTES // (8 * (w1 + w2) * max(1, self.B.size)))
        out = np.empty((k, w1, w2))
        for i in range(0, k, step):
            r, c = R[i : i + step], C[i : i + step]
            out[i : i + step] = self.post.cov_blocks(self.E[r], self.E[c]) - np.matmul(
                self.S_BE[:, r].transpose(1, 2, 0), self.H[:, c].transpose(1, 0, 2)
            )
        return out

    @staticmethod
    def work(n_B: int, n_E: int) -> float:
        return n_B**3 + n_B**2 * n_E + n_B * n_E**2

    @staticmethod
    def footprint(n_B: int, n_E: int) -> float:
        """Bytes the set-up holds: P (and its factorisation) and Σ_BE, H."""
        return 8.0 * (2 * n_B * n_B + 2 * n_B * n_E)

    def evaluate(self, fam: Family) -> np.ndarray:
        P, alpha, n = self.P, self.alpha, len(fam)
        R, C = self.posB(fam.leave), self.posB(fam.change)
        delta = fam.change_to - self.v[C]
        P_CC = _gather(P, C, C)
        eb = (
            self.dalpha
            + 2 * np.einsum("nc,nc->n", delta, alpha[C])
            + np.einsum("nc,ncd,nd->n", delta, P_CC, delta)
        )
        beta_R = alpha[R] + np.einsum("nrc,nc->nr", _gather(P, R, C), delta)
        e_R = self.d[R]
        P_RR = _gather(P, R, R)
        gamma = beta_R - np.einsum("nrs,ns->nr", P_RR, e_R)
        # P_RR's factor once per distinct set of leaving entries (a family's moves pair a
        # few of them with many others), and every solve against it in one call
        solve, ok = _LeaveSolver.of(P_RR, R)
        y = solve(gamma[:, :, None])[:, :, 0]  # L_R⁻¹ γ
        cost = 0.5 * (
            eb
            - 2 * np.einsum("nr,nr->n", e_R, beta_R)
            + np.einsum("nr,nrs,ns->n", e_R, P_RR, e_R)
            - np.einsum("nr,nr->n", y, y)
        )
        if fam.enter.shape[1]:
            # with H_AR = H[R, A] and Z = L_R⁻¹ H_AR: leaving R adds H_ARᵀ P_RR⁻¹ H_AR = ZᵀZ
            # to Cov(x_A | x_B), and moves A's conditional mean by −H_ARᵀ (e_R + P_RR⁻¹ γ)
            A = self.posE(fam.enter)
            H_AR = _gather(self.H, R, A)
            Z = solve(H_AR)
            shift = (
                self.Ealpha[A]
                + np.einsum("nca,nc->na", _gather(self.H, C, A), delta)
                - np.einsum("nra,nr->na", H_AR, e_R)
                - np.einsum("nra,nr->na", Z, y)
            )
            r = fam.enter_targets - self.post.mean[fam.enter] - shift
            S_A = _pattern(A, self._dense, self._pairs)
            S_A += np.matmul(np.swapaxes(Z, 1, 2), Z)
            _, okA, ya = batched_cholesky_solve(S_A, r)
            cost = cost + 0.5 * np.einsum("na,na->n", ya, ya)
            ok &= okA
        cost[~ok] = np.inf
        assert cost.shape == (n,)
        return cost


#: Share of the pool's columns an updated evaluator may hold unread (entries now in B or
#: in no move) before the next round sets up anew instead.
_UNREAD_SHARE = 0.25

#: Up to this ``r² m`` (order r, m columns) a batch of triangular solves runs fastest as
#: one substitution vectorised over the batch; past it, one LAPACK solve per move
#: (measured on (400 | 2500, r, m) batches: 3.7× faster at r = m = 51).
_SUBSTITUTION_WORK = 4096


class _LeaveSolver:
    """``L_R⁻¹ M_i`` for each move i, ``L_R`` the Cholesky factor of its ``P_RR``:
    factorised once per distinct leaving set, and solved for all of a set's moves at once
    (one triangular solve of many columns) when the sets are few; move by move otherwise
    (vectorised substitution for small orders and few columns, a LAPACK solve each
    beyond)."""

    def __init__(self, L: np.ndarray, inv: np.ndarray | None) -> None:
        self.L, self.inv = L, inv
        if inv is not None:
            order = np.argsort(inv, kind="stable")
            cuts = np.flatnonzero(np.diff(inv[order])) + 1
            self.groups = np.split(order, cuts)

    @classmethod
    def of(cls, P_RR: np.ndarray, R: np.ndarray):
        """(the solver, whether each move's ``P_RR`` is positive definite)."""
        n, r = R.shape
        if r == 0:
            return (lambda M: M), np.ones(n, dtype=bool)
        uR, first, inv = np.unique(R, axis=0, return_index=True, return_inverse=True)
        inv = inv.ravel()
        if 4 * uR.shape[0] <= n:  # few distinct sets
            L, ok = batched_cholesky(P_RR[first])
            return cls(L, inv).solve, ok[inv]
        L, ok = batched_cholesky(P_RR)
        return cls(L, None).solve, ok

    def solve(self, M: np.ndarray) -> np.ndarray:
        """``L_R⁻¹ M_i`` for ``M`` of shape (n, r, m)."""
        n, r, m = M.shape
        if self.inv is None:
            if r <= _FORWARD_MAX and r * r * m < _SUBSTITUTION_WORK:
                out = solve_lower(self.L[:, None], np.swapaxes(M, 1, 2))
                return np.swapaxes(out, 1, 2)
            return np.stack([lower_solve(self.L[i], M[i]) for i in range(n)])
        out = np.empty_like(M)
        for j, g in enumerate(self.groups):  # (r, |g|·m) columns at once
            cols = np.swapaxes(M[g], 0, 1).reshape(r, g.size * m)
            out[g] = np.swapaxes(lower_solve(self.L[j], cols).reshape(r, g.size, m), 0, 1)
        return out


class DiagEvaluator:
    """Independent coordinates: a move's cost is a sum over the entries it touches."""

    def __init__(self, post: DiagPosterior, built: Built) -> None:
        self.post, self.cost = post, built.cost
        c = built.plan.compiled
        self.pos, self.v = _lookup(c.conditioned), c.targets

    def _sum(self, idx: np.ndarray, t: np.ndarray) -> np.ndarray:
        d = t - self.post.mean[idx]
        return 0.5 * np.sum(d * d / self.post.var[idx], axis=1)

    def evaluate(self, fam: Family) -> np.ndarray:
        was_leave = self.v[self.pos(fam.leave)] if fam.leave.size else fam.leave * 0.0
        was = self.v[self.pos(fam.change)] if fam.change.size else fam.change * 0.0
        return (
            self.cost
            - self._sum(fam.leave, was_leave)
            + self._sum(fam.enter, fam.enter_targets)
            - self._sum(fam.change, was)
            + self._sum(fam.change, fam.change_to)
        )


def _pool(fams: list[Family]) -> np.ndarray:
    parts = [f.enter.ravel() for f in fams if f.enter.size]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


#: Set-up work from which the next round's evaluator comes from updates of the last
#: (:meth:`DenseEvaluator.moved`): below it a new set-up is a few small products, which
#: cost less than the updates' bookkeeping (measured crossover: about 3·10⁷).
_UPDATE_WORK = 1e8

#: Work charged per call scoring a family, and per move of a family beyond its algebra.
FAMILY_WORK = 1e6
MOVE_WORK = 1e4


def _updates_pay(setup: float, entries: float) -> bool:
    """Whether the next round's evaluator comes from updates of this one's: where its
    set-up (``setup`` flops, over arrays of ``entries`` entries) is at least
    ``_UPDATE_WORK`` and runs in numpy.  On a device backend the set-up's products run
    there (planner.backend) and the updates, thin products of host arrays, would not."""
    return setup >= _UPDATE_WORK and for_size(entries).name == "numpy"


def _family_work(f: Family) -> float:
    k = f.leave.shape[1] + f.enter.shape[1] + f.change.shape[1]
    return FAMILY_WORK + len(f) * (MOVE_WORK + k**3)


def local_search(post: Posterior, built: Built, budget: Budget) -> Built:
    """Best-improvement exchanges, a round per accepted move, until none improves or
    the budget is spent.

    Charges, whatever the format, what the dense algebra costs (the evaluator's
    set-up per round, each family's moves), so one Gaussian is searched the same
    way in every format.
    """
    teacher = post.structure
    if teacher.kind != "mlp":
        return built
    moved = None
    while not budget.expired():
        n_B = built.plan.compiled.n_conditioned
        if not budget.allows(DenseEvaluator.work(n_B, 0)):
            return built
        fams = [f for f in families(teacher, built.choices) if len(f)]
        if not fams:
            return built
        pool = _pool(fams)
        setup = DenseEvaluator.work(n_B, pool.size)
        if not budget.allows(setup):
            return built
        if not post.independent and not budget.fits(DenseEvaluator.footprint(n_B, pool.size)):
            return built
        # charged as a set-up whether or not the last move's updates stand in for it: the
        # rounds (and the plan) are the same either way
        budget.charge(setup, 0)
        if post.independent:
            ev = DiagEvaluator(post, built)
        else:
            ev = (moved(built, pool) if moved is not None else None) or DenseEvaluator(
                post, built, pool
            )
            moved = None  # the last round's evaluator is let go before this one's work
        best, where = built.cost * (1 - 1e-12) - 1e-15, None
        with single_threaded():
            for f in fams:
                if not budget.allows(_family_work(f)):
                    break
                budget.charge(_family_work(f), len(f))
                costs = ev.evaluate(f)
                i = int(np.argmin(costs))
                if costs[i] < best:
                    best, where = float(costs[i]), (f, i)
        if where is None:
            return built
        f, i = where
        ch = f.choices(i)
        built = Built(replay(teacher, ch), best, ch)
        if not post.independent and _updates_pay(setup, n_B * (n_B + pool.size)):
            moved = partial(ev.moved, leave=f.leave[i], enter=f.enter[i])  # next round's
    return built


# -- branch and bound -----------------------------------------------------------------------
def choice_space(teacher: Structure, student: Structure, route: Route) -> int:
    """The number of complete choice sets of ``route`` (leaves of the search tree)."""
    size = 1
    rnn = teacher.kind == "rnn"
    for j, (s, e) in enumerate(route.blocks, start=1):
        w = student.width(j)
        n = teacher.width(e)
        if 1 < e < teacher.T and n > w:
            size *= perm(n, n - w) if rnn else comb(n, w)
        for p in range(e, s, -1):
            L = teacher.width(p - 1)
            size *= perm(L, w)
            if rnn and p - 1 > 1 and w < L:
                size *= perm(L - w, L - w)
    return size


def branch_and_bound(
    post: Posterior,
    student: Structure,
    route: Route,
    best_cost: float,
    budget: Budget,
) -> tuple[Choices | None, bool]:
    """The cheapest choices of ``route`` if cheaper than ``best_cost`` (None otherwise),
    and whether the walk finished (if not, the choices are the best it found).

    Depth first over the constructive order; a partial plan whose exact cost
    reaches the best found is cut.  Every node, at every depth, is charged to the
    budget before it is made (its scorer copy and commit) and counted against the
    memory bound with the copies the path above it holds; when either is spent the
    walk unwinds at once and returns the best found.
    """
    teacher = post.structure
    steps: list[tuple] = []
    for j in range(student.T, 0, -1):
        s, e = route.blocks[j - 1]
        w = student.width(j)
        if 1 < e < teacher.T and teacher.width(e) > w:
            steps.append(("shrink", e, w))
        steps.extend(("merge", p, w) for p in range(e, s, -1))
    walk = _Walk(budget, best_cost * (1 - 1e-12) - 1e-15)

    def go(k: int, b: _Builder, sc) -> None:
        if sc.cost >= walk.best:
            return
        if k == len(steps):
            walk.best, walk.choices = sc.cost, b.choices.copy()
            return
        kind, p, w = steps[k]
        if kind == "shrink":
            _shrinks(walk, b, sc, p, w, lambda b2, sc2: go(k + 1, b2, sc2))
        else:
            _merges(walk, b, sc, p, lambda b2, sc2: go(k + 1, b2, sc2))

    sc = post.scorer()
    try:
        walk.enter(sc)
        go(0, _Builder(teacher, route), sc)
    except Cut:
        return walk.choices, False
    return walk.choices, True


def _footprint(obj, depth: int = 0) -> int:
    """Bytes of the arrays a scorer owns (not the posterior's, which copies share)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes if obj.base is None else 0
    if depth > 2:
        return 0
    if isinstance(obj, dict):
        return sum(_footprint(v, depth + 1) for v in obj.values())
    state = getattr(obj, "__dict__", None)
    if state is None:
        return 0
    return sum(_footprint(v, depth + 1) for k, v in state.items() if k not in ("post", "mean"))


class _Walk:
    """A branch and bound's best so far and what its path holds: each node is charged
    ``NODE_WORK`` plus the bytes its scorer copy moves, and the copies alive on the
    path must fit the budget's memory bound."""

    def __init__(self, budget: Budget, bound: float) -> None:
        self.budget, self.best, self.choices = budget, bound, None
        self.held = 0

    def enter(self, sc) -> int:
        """Charge one node that copies ``sc``; raises :class:`Cut` when it does not fit."""
        size = _footprint(sc)
        if not self.budget.fits(self.held + size):
            raise Cut
        self.budget.spend(NODE_WORK + size)
        self.held += size
        return size

    @contextmanager
    def node(self, sc) -> Iterator[None]:
        """One node that copies ``sc``, charged on entry; its copy is held until exit."""
        size = self.enter(sc)
        try:
            yield
        finally:
            self.held -= size


def _fork(b: _Builder, sc):
    nb = _Builder.__new__(_Builder)
    nb.teacher, nb.route = b.teacher, b.route
    nb.tr = b.tr.copy()
    nb.ops, nb.effects = list(b.ops), list(b.effects)
    nb.choices = b.choices.copy()
    return nb, sc.copy()


def _shrinks(walk: _Walk, b: _Builder, sc, p: int, w: int, then) -> None:
    """Every way to remove neurons of p down to width w (sets for an MLP, sequences for
    an RNN, whose removal order matters), one removal per level.  An MLP's sets are
    walked in increasing order, and a prefix that cannot be completed (too few larger
    neurons left) is never entered: the walk has at most (sets × depth) nodes."""
    rnn = b.teacher.kind == "rnn"

    def level(b: _Builder, sc, last: int) -> None:
        t = b.position(p)
        ids = [int(a) for a in b.ids(t)]
        if len(ids) == w:
            then(b, sc)
            return
        after = len(ids) - w - 1  # removals still to make after this one
        for k, a in enumerate(ids):
            if not rnn and (a <= last or len(ids) - 1 - k < after):
                continue
            with walk.node(sc):
                nb, nsc = _fork(b, sc)
                eff = nb.remove(p, [a])
                try:
                    nsc.commit(eff.conditioned, eff.targets)
                except SingularConstraint:  # not a valid plan
                    continue
                if nsc.cost < walk.best:
                    level(nb, nsc, a)

    level(b, sc, -1)


def _merges(walk: _Walk, b: _Builder, sc, p: int, then) -> None:
    """Every injective pairing of layer p's rows with neurons of position p-1: a row
    conditioned per level, its prefix cut on its cost, or, for a scorer that conditions
    a layer's rows only all at once (``whole_layers``: kron), every row at the last level."""
    t = b.position(p)
    P, R, L = b.block_indices(t)
    rows, cols = b.ids(t), b.ids(t - 1)
    rnn = b.tr.structure.recurrent(t)
    extra = []  # per row: its V and b entries (targets 0)
    for k in range(R):
        e = []
        if rnn:
            e.append(b.tr.recurrent(t, rows=k).ravel())
        if b.tr.structure.bias:
            e.append(b.tr.biases(t, rows=k))
        extra.append(np.concatenate(e) if e else np.zeros(0, dtype=np.int64))
    U = b.tr.weights(t)
    whole = getattr(sc, "whole_layers", False)

    def pairing(cs: tuple) -> tuple[np.ndarray, np.ndarray]:
        """What pairing row ``len(cs) - 1`` with column ``cs[-1]`` conditions: that row to
        its unit vector, or (``whole``) every row so far to the pairing ``cs``."""
        ks = range(len(cs)) if whole else [len(cs) - 1]
        idx = np.concatenate([np.concatenate([U[k], extra[k]]) for k in ks])
        tg = np.zeros(idx.size)
        at = np.cumsum([0, *(U[k].size + extra[k].size for k in ks)])[:-1]
        tg[at + np.asarray([cs[k] for k in ks])] = 1.0
        return idx, tg

    def row(k: int, used: tuple, bb: _Builder, s2) -> None:
        if k == R:
            with walk.node(s2):
                nb, nsc = _fork(bb, s2)
                nb.choices.pairs[p] = (
                    tuple(int(a) for a in rows),
                    tuple(int(cols[c]) for c in used),
                )
                gone = [int(cols[i]) for i in sorted(set(range(L)) - set(used), reverse=True)]
                _remove_all(walk, nb, nsc, p - 1, gone, P, then)
            return
        for c in range(L):
            if c in used:
                continue
            if whole and k < R - 1:  # nothing conditioned before the last row
                row(k + 1, (*used, c), bb, s2)
                continue
            with walk.node(s2):
                nsc = s2.copy()
                try:
                    nsc.commit(*pairing((*used, c)))
                except SingularConstraint:
                    continue
                if nsc.cost < walk.best:
                    row(k + 1, (*used, c), bb, nsc)

    row(0, (), b, sc)


def _remove_all(
    walk: _Walk, b: _Builder, sc, p: int, gone: list[int], skip: np.ndarray, then
) -> None:
    """Remove the neurons ``gone`` of position p (in every order for an RNN, whose
    recurrent columns make the order matter), committing what is not in ``skip``."""
    if not gone:
        then(b, sc)
        return
    firsts = gone if b.teacher.kind == "rnn" else gone[:1]
    forked = len(firsts) > 1  # one order only: the walk goes on with b and sc themselves
    for a in firsts:
        with walk.node(sc) if forked else nullcontext():
            nb, nsc = _fork(b, sc) if forked else (b, sc)
            eff = nb.remove(p, [a])
            keep = ~np.isin(eff.conditioned, skip)
            try:
                nsc.commit(eff.conditioned[keep], eff.targets[keep])
            except SingularConstraint:
                continue
            if nsc.cost < walk.best:
                _remove_all(walk, nb, nsc, p, [x for x in gone if x != a], skip, then)
