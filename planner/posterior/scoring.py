"""Exact incremental conditioning: the one scoring interface the search uses (docs/theory.md §6).

A search commits constraints one group at a time (a neuron's outgoing weights
to zero, a merged layer's rows to unit vectors) and, before each commit, scores
every candidate by its *exact increment*: removing group g after the set B
costs ``½ rᵀ S⁻¹ r`` with ``r = v_g − E[x_g | x_B = v_B]`` and
``S = Cov(x_g | x_B)``, the group form of Optimal Brain Surgeon.  A posterior
answers through a :class:`Scorer`:

* :meth:`Scorer.drops` opens a *stage*: candidate groups (rows of an index
  matrix) to be conditioned to zero; :meth:`Drops.increments` scores all of
  them at once and :meth:`Drops.take` commits some;
* :meth:`Scorer.block` opens a fixed set to be conditioned to a 0/1 pattern
  chosen afterwards (a merged layer): :attr:`Block.linear` is the exact change
  of the cost when one entry's target goes from 0 to 1, the others at 0, and
  :meth:`Block.cost` the exact cost of any pattern;
* :meth:`Scorer.commit` conditions any other set.

``Scorer.cost`` is always the exact ``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)`` of
everything committed.  :class:`DenseScorer` works for every format through
dense blocks of Σ (``Posterior.cov_cross``) and keeps the Cholesky factor of
Σ_BB up to date by block appends, never refactorising; :class:`DiagScorer`
uses independence.  Structured formats supply their own (``Posterior.scorer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.linalg as sla

from .._threads import THREADED_PRODUCT, all_threads, split
from ..backend import HostRows, for_size
from ..graph import Consumers, Whole
from ..linalg import lower_solve, pivots_ok
from ._dense import HeldCovariance
from ._validate import cholesky_constraint

__all__ = [
    "Block",
    "Columns",
    "DenseScorer",
    "DiagScorer",
    "Drops",
    "LayerBlock",
    "Scorer",
    "batched_cholesky",
    "indices",
]


@dataclass(frozen=True)
class Columns:
    """Candidate groups that are whole columns of one teacher layer over some of its rows
    (MLP neurons' outgoing weights): group i is column ``cols[i]`` of layer ``layer``
    over ``rows`` (teacher neuron ids).  Structured kernels read the layer directly;
    others ask for :meth:`indices`."""

    structure: object
    layer: int
    rows: np.ndarray
    cols: np.ndarray

    def indices(self) -> np.ndarray:
        U = self.structure.layer(self.layer).U
        return U[np.ix_(self.rows, self.cols)].T


@dataclass(frozen=True)
class LayerBlock:
    """A merged layer's block: ``rows × cols`` of one teacher layer (row-major), then the
    biases of ``rows`` when the structure has them (teacher ids)."""

    structure: object
    layer: int
    rows: np.ndarray
    cols: np.ndarray

    def indices(self) -> np.ndarray:
        ix = self.structure.layer(self.layer)
        parts = [ix.U[np.ix_(self.rows, self.cols)].ravel()]
        if self.structure.bias:
            parts.append(ix.b[self.rows])
        return np.concatenate(parts)


def indices(x) -> np.ndarray:
    """Teacher indices of candidate groups or a block, whatever their description."""
    if isinstance(x, Columns | LayerBlock | Consumers | Whole):
        return x.indices()
    return np.asarray(x, dtype=np.int64)


class Drops(Protocol):
    """A stage: candidate groups conditioned to zero, one commit at a time."""

    def increments(self) -> np.ndarray:
        """Exact increment of each candidate given everything committed (inf when
        taken already, or when conditioning on it would be singular)."""
        ...

    def take(self, which: np.ndarray) -> None:
        """Commit the candidates ``which`` (in that order) to the scorer."""
        ...


class Block(Protocol):
    """A fixed set of parameters to be conditioned to a 0/1 pattern."""

    linear: np.ndarray

    def cost(self, targets: np.ndarray) -> float:
        """The exact increment of conditioning the block to ``targets``."""
        ...

    def commit(self, targets: np.ndarray) -> None: ...


class Scorer(Protocol):
    """Exact incremental conditioning of one Gaussian."""

    cost: float

    def drops(self, groups: np.ndarray) -> Drops: ...

    def block(self, idx: np.ndarray) -> Block: ...

    def commit(self, idx: np.ndarray, targets: np.ndarray) -> None: ...

    def copy(self) -> Scorer: ...

    def step_work(self, n: int, k: int) -> float:
        """Work (flops) of scoring ``n`` candidate groups of ``k`` parameters and
        committing one, when the search should count it: a stage whose exact greedy
        would cost more removes several neurons per update.  Kernels whose greedy is
        always run exactly (dense, bounded by the service's limits) report 0;
        ``independent`` kernels (increments never change) remove all at once."""
        ...


def batched_cholesky(S: np.ndarray):
    """Batched lower Cholesky factors, with a mask of the numerically positive definite."""
    n, k = S.shape[0], S.shape[-1]
    if k == 0:
        return S, np.ones(n, dtype=bool)
    L, ok = _lapack_factors(S)
    return _numerically_pd(L, S, ok)


def _lapack_factors(S: np.ndarray):
    """Batched lower Cholesky factors and a mask of the blocks LAPACK factorised (one
    batched call; block by block when some block is refused), the identity for the others."""
    n, k = S.shape[0], S.shape[-1]
    try:
        return np.linalg.cholesky(S), np.ones(n, dtype=bool)
    except np.linalg.LinAlgError:
        L, ok = np.zeros_like(S), np.zeros(n, dtype=bool)
        for i in range(n):
            try:
                L[i], ok[i] = np.linalg.cholesky(S[i]), True
            except np.linalg.LinAlgError:
                L[i] = np.eye(k)
        return L, ok


def _numerically_pd(L: np.ndarray, S: np.ndarray, ok: np.ndarray):
    """(``L``, ``ok``) with ``ok`` also requiring every pivot numerically positive
    (:func:`~planner.linalg.pivots_ok`), and the identity for the factors of the others."""
    ok &= pivots_ok(L, S)
    L[~ok] = np.eye(S.shape[-1])
    return L, ok


#: Up to this order a batched triangular solve is a vectorised forward substitution.
_FORWARD_MAX = 64


def bordered_cholesky(S: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Batched lower Cholesky factors ``L`` of ``S`` (``n × k × k``) and ``L⁻¹ r``
    (``n × k``) from one batched factorisation: the factor of ``[[S, r], [rᵀ, ∞]]`` is
    ``[[L, 0], [(L⁻¹r)ᵀ, ∞]]``, its last row computed before its infinite pivot by the
    dot products of a forward substitution (about two thirds of the time of a
    factorisation and a vectorised substitution at k = 10; at k = 32 the substitution's
    32 steps cost more than the factorisation).  None when some block is not positive
    definite (LAPACK refused it): the caller then factorises them one by one."""
    n, k = r.shape
    M = np.empty((n, k + 1, k + 1))  # the lower triangle is all LAPACK reads
    M[:, :k, :k], M[:, k, :k], M[:, k, k] = S, r, np.inf
    try:
        F = np.linalg.cholesky(M)
    except np.linalg.LinAlgError:
        return None
    return F[:, :k, :k], F[:, k, :k]


def batched_cholesky_solve(S: np.ndarray, r: np.ndarray):
    """(:func:`batched_cholesky` of ``S``, and ``L⁻¹ r``): from one bordered factorisation
    (:func:`bordered_cholesky`) up to order ``_FORWARD_MAX`` when every block has a factor,
    else a factorisation and a substitution."""
    got = bordered_cholesky(S, r) if S.shape[-1] <= _FORWARD_MAX else None
    if got is None:
        L, ok = batched_cholesky(S)
        return L, ok, solve_lower(L, r)
    L, y = got  # views of a temporary: the identity may be written into L
    return (*_numerically_pd(L, S, np.ones(len(S), dtype=bool)), y)


def solve_lower(L: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``L⁻¹ b`` for a batch of lower-triangular ``L`` (``..., k, k``) and vectors ``b``
    (``..., k``).  Small orders by forward substitution vectorised over the batch
    (LAPACK's batched ``solve`` would factorise each L again: 5–8× slower at k = 32);
    larger ones by a triangular solve each."""
    k = L.shape[-1]
    if k > _FORWARD_MAX:  # one triangular solve each, O(k²), not a new factorisation
        shape = np.broadcast_shapes(L.shape[:-1], b.shape)
        Ls = np.broadcast_to(L, (*shape, k)).reshape(-1, k, k)
        bs = np.broadcast_to(b, shape).reshape(-1, k)
        out = np.empty(bs.shape)
        for i in range(bs.shape[0]):
            out[i] = lower_solve(Ls[i], bs[i])
        return out.reshape(shape)
    y = np.empty(np.broadcast_shapes(L.shape[:-1], b.shape))
    for i in range(k):
        acc = np.einsum("...j,...j->...", L[..., i, :i], y[..., :i]) if i else 0.0
        y[..., i] = (b[..., i] - acc) / L[..., i, i]
    return y


def cho_solve_batched(L: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``S⁻¹ r`` for a batch of lower Cholesky factors ``L`` of ``S`` (``n, k, k``) and
    vectors ``r`` (``n, k``)."""
    y = solve_lower(L, r)
    k = L.shape[-1]
    x = np.empty_like(y)
    if k > _FORWARD_MAX:  # one triangular solve each
        for i in range(L.shape[0]):
            x[i] = sla.solve_triangular(L[i], y[i], lower=True, trans="T", check_finite=False)
        return x
    for i in range(k - 1, -1, -1):  # Lᵀ x = y, backwards, vectorised over the batch
        acc = np.einsum("...j,...j->...", L[..., i + 1 :, i], x[..., i + 1 :])
        x[..., i] = (y[..., i] - acc) / L[..., i, i]
    return x


def _chol(S: np.ndarray) -> np.ndarray:
    return cholesky_constraint(S)


def _batched_increments(S: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``½ rᵀ S⁻¹ r`` for each of n groups (``S``: n × k × k, ``r``: n × k); inf where
    ``S`` is not numerically positive definite."""
    return _factored_increments(S, r)[0]


def _factored_increments(S: np.ndarray, r: np.ndarray):
    """(``_batched_increments``, each group's lower Cholesky factor (the identity where
    there is none), whether it has one).

    Small blocks are factorised bordered: the Cholesky factor of ``[[S, r], [rᵀ, ∞]]``
    is ``[[L, 0], [(L⁻¹r)ᵀ, ∞]]``, so one batched ``potrf`` also makes the solve (its
    last row is computed before its infinite pivot, by the same dot products as a
    forward substitution), at about two thirds of the time of a factorisation and a
    vectorised substitution."""
    n, k = r.shape
    if k == 0:
        return np.zeros(n), np.zeros((n, 0, 0)), np.ones(n, dtype=bool)
    if k == 1:
        s = S[:, 0, 0]
        ok = s > 0
        out = np.full(n, np.inf)
        out[ok] = 0.5 * r[ok, 0] ** 2 / s[ok]
        return out, np.sqrt(np.where(ok, s, 1.0))[:, None, None], ok
    got = bordered_cholesky(S, r) if k <= _FORWARD_MAX else None
    if got is not None:
        L, y = got
        return 0.5 * np.einsum("nk,nk->n", y, y), L, np.ones(n, dtype=bool)
    L, ok = _lapack_factors(S)  # a block LAPACK refuses is no candidate
    y = solve_lower(L, r)
    return np.where(ok, 0.5 * np.einsum("nk,nk->n", y, y), np.inf), L, ok


class DenseScorer:
    """Incremental conditioning through dense blocks of Σ (any format, docs/theory.md §6).

    State: the committed set B in commit order with its targets and its cost;
    the lower Cholesky factor ``L`` of Σ_BB and ``z = L⁻¹ (v_B − m_B)`` (so the
    cost is ``½ ‖z‖²``).  Committing a group appends one block row to ``L``
    (``[X_gᵀ, chol(S_g)]``): the factor is never recomputed.  A block that the
    format conditions more cheaply on its precision side (a merged layer whose
    complement is small, for ``precision``) is committed without extending
    ``L``, which is then rebuilt only if a later stage needs it.
    """

    def __init__(self, posterior) -> None:
        self.post = posterior
        self.mean = posterior.mean
        self._L = np.zeros((0, 0))
        self.n = 0
        self.B = np.zeros(0, dtype=np.int64)
        self.v = np.zeros(0)
        self.z = np.zeros(0)
        self.cost = 0.0

    def copy(self) -> DenseScorer:
        out = object.__new__(DenseScorer)
        out.post, out.mean, out.n, out.cost = self.post, self.mean, self.n, self.cost
        out._L = self._L.copy()
        out.B, out.v, out.z = self.B.copy(), self.v.copy(), self.z.copy()
        return out

    @property
    def L(self) -> np.ndarray:
        return self._L[: self.n, : self.n]

    def _refresh(self) -> None:
        """Rebuild the factor when blocks were committed on the precision side."""
        if self.n == self.B.size:
            return
        self._L = _chol(self.post.cov_cross(self.B, self.B))
        self.n = self.B.size
        self.z = sla.solve_triangular(
            self._L, self.v - self.mean[self.B], lower=True, check_finite=False
        )

    def _record(self, idx: np.ndarray, targets: np.ndarray, cost: float) -> None:
        """Commit a block whose exact new total cost is known, leaving the factor stale
        (it still covers the first ``n`` entries of B)."""
        self.B = np.concatenate([self.B, idx])
        self.v = np.concatenate([self.v, targets])
        self.cost = float(cost)

    #: increments change as groups are committed
    independent = False

    def step_work(self, n: int, k: int) -> float:
        return 0.0  # dense teachers are bounded in size: the greedy is always exact

    # -- the conditional Gaussian of a set, given B ------------------------------------
    def conditional(self, idx: np.ndarray):
        """(X = L⁻¹ Σ_{B,idx}, Cov(x_idx | x_B), E[x_idx | x_B = v_B])."""
        self._refresh()
        S = self.post.cov_cross(idx, idx)
        c = self.mean[idx].astype(np.float64, copy=True)
        if self.n == 0:
            return np.zeros((0, idx.size)), S, c
        # on a device backend when large (planner.backend): the stage's biggest kernel
        X, S = for_size(self.n * idx.size).downdate(self.L, self.post.cov_cross(self.B, idx), S)
        c += X.T @ self.z
        return X, S, c

    def _append(self, idx, targets, X, Lk, c) -> None:
        """Commit ``idx = targets`` given ``X = L⁻¹ Σ_{B,idx}``, ``Lk = chol(Cov(x_idx | x_B))``
        and ``c = E[x_idx | x_B]``."""
        k = idx.size
        if k == 0:
            return
        u = lower_solve(Lk, targets - c)
        m = self.n + k
        if m > self._L.shape[0]:
            self.reserve(max(m, 2 * self._L.shape[0]))
        self._L[self.n : m, : self.n] = X.T
        self._L[self.n : m, self.n : m] = Lk
        self.n = m
        self.B = np.concatenate([self.B, idx])
        self.v = np.concatenate([self.v, targets])
        self.z = np.concatenate([self.z, u])
        self.cost += 0.5 * float(u @ u)

    def reserve(self, size: int) -> None:
        """Room for the factor of ``size`` conditioned entries (growth copies it)."""
        if size > self._L.shape[0]:
            grown = np.zeros((size, size))
            grown[: self.n, : self.n] = self.L
            self._L = grown

    def commit(self, idx: np.ndarray, targets: np.ndarray) -> None:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return
        X, S, c = self.conditional(idx)
        self._append(idx, np.asarray(targets, dtype=np.float64), X, _chol(S), c)

    def drops(self, groups) -> _DenseDrops:
        return _DenseDrops(self, indices(groups))

    def block(self, idx) -> _DenseBlock | _PrecisionBlock:
        idx = indices(idx)
        got = self.post.conditional_precision(self.B, self.v, idx)
        if got is None:
            return _DenseBlock(self, idx)
        return _PrecisionBlock(self, idx, *got)

    def precision(self) -> tuple[np.ndarray, np.ndarray]:
        """``(Σ_BB⁻¹, Σ_BB⁻¹ (v_B − m_B))`` from the factor (for exchange moves)."""
        Linv = sla.solve_triangular(self.L, np.eye(self.n), lower=True, check_finite=False)
        return Linv.T @ Linv, Linv.T @ self.z


#: Candidates up to which a stage reads their blocks one by one (no gathered copy).
_FEW = 8
#: Entries of a candidate from which a stage reads the blocks of several one by one.
_LARGE_BLOCK = 64
#: Multiply-adds of one candidate's product below which a batch goes as one batched
#: product (one BLAS call an item costs more than the item)
_BATCHED_PRODUCT = 64**3


def _lower_solve(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``L⁻¹ B`` on every core when it is large enough to gain (a ψ candidate's rows)."""
    if L.shape[0] * L.shape[0] * B.shape[1] >= THREADED_PRODUCT:
        with all_threads():
            return lower_solve(L, B)
    return lower_solve(L, B)


def _gram_update(S: np.ndarray, at: np.ndarray | slice, Y: np.ndarray) -> None:
    """``S[at[i]] −= Y[i] Y[i]ᵀ`` for every i, in place (``at`` a slice: every block of
    ``S``, read as views, no gather): on one thread for a small batch; on every core for
    a single large block (a ψ candidate's has thousands of entries); a large batch split
    over threads (:func:`~planner._threads.split`), where small blocks go as one batched
    product and larger ones one by one."""
    every = isinstance(at, slice)
    n, k = len(Y), Y.shape[1] * Y.shape[1] * Y.shape[2]

    def part(lo: int, hi: int) -> None:
        if k < _BATCHED_PRODUCT and hi - lo > _FEW:
            S[slice(lo, hi) if every else at[lo:hi]] -= np.matmul(
                Y[lo:hi], Y[lo:hi].transpose(0, 2, 1)
            )
            return
        for i in range(lo, hi):  # in place (S[at] -= D would copy S[at] twice)
            S[i if every else at[i]] -= Y[i] @ Y[i].T

    if n * k < THREADED_PRODUCT:
        part(0, n)
    elif n == 1:
        with all_threads():
            part(0, 1)
    else:
        split(part, n)


class _DenseDrops:
    """Candidates scored on the conditional Gaussian of their union ``G`` given B.

    ``C0 = Cov(x_G | x_B)`` at the stage's start is read a few rows at a time (from the
    format's own Σ in place when B was empty, else formed once); the stage's commits
    enter through ``W`` (the scorer's factor over G's columns, one block row per commit,
    ``C = C0 − WᵀW``), and only what scoring needs is kept current: each candidate's own
    block of ``C`` and the conditional mean ``c``.  A commit needs its rows of ``C``,
    ``O(|B_stage| |G| k)``: they are computed for the next few candidates by increment
    at once (one product of ``SPECULATE`` × k rows runs near the machine's peak, one of
    k rows at half of it), and a row computed ahead is brought up to date by the
    commits since, so every number is the same as one commit at a time.  Candidates of
    ``ALONE_ROWS`` entries or more are not computed ahead: their own product runs
    near the peak already.  Nor are any after another stage's step (a network's
    global greedy): rows computed for a candidate another stage's step overtakes
    are lost.
    """

    #: candidates whose rows one product computes (the one taken and the next cheapest)
    SPECULATE = 6
    #: ... at most this many rows in all (one candidate's at least)
    SPECULATE_ROWS = 300
    #: candidates of this many entries or more compute their rows alone: one such product
    #: runs near the peak already, and the next cheapest by the last increments is often
    #: not the one taken next (the 10 k CNN's 144-entry channels: 4 of 10 rows computed
    #: ahead were used)
    ALONE_ROWS = 128

    def __init__(self, scorer: DenseScorer, groups: np.ndarray) -> None:
        self.sc = scorer
        self.G, inv = np.unique(groups, return_inverse=True)
        self.pos = inv.reshape(groups.shape)  # candidate → positions in the live columns
        q, w = self.pos, self.G.size
        scorer._refresh()
        if scorer.n == 0:  # C0 = Σ_GG, never copied whole
            X0 = np.zeros((0, w))
            self.c = scorer.mean[self.G].astype(np.float64, copy=True)
            self.cov = scorer.post.covariance_over(self.G)
        else:  # most of its rows are read as the stage goes: one product now
            X0, C0, self.c = scorer.conditional(self.G)  # X0 = L⁻¹ Σ_{B,G}
            self.cov = HeldCovariance(C0, self.G)
        self.S = self.cov.blocks(self.G[q])  # each candidate's own block
        #: ``[X0; W]`` over the live columns, with room for every row the stage may add
        #: (planner.backend.Rows): on the host, and on a device backend there too, where
        #: the products that read it whole then run
        self._R = for_size((X0.shape[0] + w) * w).rows(X0, w) if w else HostRows(X0, 0)
        #: the within-group entries left (ids of the stage's first groups, ascending), and
        #: those ``S`` still spans: :meth:`restrict` only marks entries gone, and ``S``
        #: and the updates waiting are cut down to them when ``S`` is next read
        self._ids = np.arange(q.shape[1])
        self._S_ids = self._ids
        scorer.reserve(scorer.n + self.G.size)  # B grows by at most G in this stage
        self.live = np.ones(len(groups), dtype=bool)
        self.dead = 0  # columns of taken candidates still held
        self._inc = np.zeros(len(groups))
        self._ahead: dict[int, tuple[np.ndarray, int]] = {}  # candidate → (rows of C, m then)
        self._queue: list[int] = []  # the candidates a call to take commits after this one
        #: whether another stage's commit came after this stage's last (:meth:`absorb`):
        #: rows computed ahead would then mostly be lost to the other stages' steps
        self._others = False
        #: with ``keep_factors``, each candidate's Cholesky factor at its last exact
        #: increment, for :meth:`bounds` (``None``: none yet, or its groups changed)
        self.keep_factors = False
        self._fac: np.ndarray | None = None
        self._fac_ok = np.zeros(len(groups), dtype=bool)
        self._c_then: np.ndarray | None = None  # the conditional means they were taken at
        #: ... and once the groups changed, each candidate's last exact solution ``S⁻¹c``
        #: (restricted to the entries left), which still bounds (:meth:`bounds`)
        self._y: np.ndarray | None = None
        self._y_ok = np.zeros(len(groups), dtype=bool)
        #: the updates of ``S`` not yet made, ``S[at] −= Yq Yqᵀ`` (:meth:`_settle`): a
        #: candidate scored by bounds alone never pays for its block's updates
        #: (each with the within-group entries ``Yq``'s rows span: ``_ids`` when made)
        self._pend: list[tuple[np.ndarray | slice, np.ndarray, np.ndarray]] = []

    @property
    def X0(self) -> np.ndarray:
        """``L⁻¹ Σ_{B,G}`` at the stage's start, over the live columns."""
        return self._R.host.X0

    @property
    def _W(self) -> np.ndarray:
        """The rows the stage's commits added, over the live columns."""
        return self._R.host.W

    @property
    def m(self) -> int:
        """Rows of ``W``."""
        return self._R.host.k

    def increments(self) -> np.ndarray:
        out = np.full(len(self.pos), np.inf)
        live = self.live
        if live.any():
            self._settle()
            r = -self.c[self.pos[live]]
            out[live], L, ok = _factored_increments(self.S[live], r)
            if self.keep_factors:  # for bounds() after the next commits
                if self._fac is None or self._fac.shape != self.S.shape:
                    self._fac = np.zeros_like(self.S)
                    self._c_then = np.zeros(self.pos.shape)
                    self._fac_ok[:] = False
                self._fac[live], self._fac_ok[live], self._c_then[live] = L, ok, r
        self._inc = out
        return out

    def _defer(self, at, Yq: np.ndarray) -> None:
        """``S[at] −= Yq Yqᵀ``, made when ``S`` is next read (or at once when the updates
        waiting would hold more than twice ``S`` and more than ``W``'s buffer)."""
        self._pend.append((at, Yq, self._ids))
        if sum(y.nbytes for _, y, _ in self._pend) > max(2 * self.S.nbytes, self._R.host.nbytes):
            self._settle()

    def _cut(self, ids: np.ndarray) -> np.ndarray | None:
        """Where the entries left lie among ``ids`` (None: they are all of them)."""
        return None if ids.size == self._ids.size else np.searchsorted(ids, self._ids)

    def _settle(self) -> None:
        r = self._cut(self._S_ids)
        if r is not None:  # the entries restricted away since S was last read: one gather
            self.S = self.S[:, r[:, None], r[None, :]]
            self._S_ids = self._ids
        for at, Yq, ids in self._pend:
            r = self._cut(ids)
            _gram_update(self.S, at, Yq if r is None else Yq[:, r])
        self._pend.clear()

    def _own(self, g: int) -> np.ndarray:
        """Candidate ``g``'s block of ``C`` as it is now (its updates waiting made on a copy,
        the others' left waiting)."""
        r = self._cut(self._S_ids)
        S = self.S[g].copy() if r is None else self.S[g][r[:, None], r[None, :]]
        for at, Yq, ids in self._pend:
            Y = Yq[g] if isinstance(at, slice) else Yq[int(np.searchsorted(at, g))]
            r = self._cut(ids)
            Y = Y if r is None else Y[r]
            S -= Y @ Y.T
        return S

    def _S_times(self, sel: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``S[sel] y`` (one vector a candidate) as ``S`` is now, without :meth:`_settle`:
        ``O(k)`` a candidate for each update waiting instead of ``O(k²)``.  Where ``S`` or an
        update still spans entries restricted away, ``y`` is spread over its entries (0 on
        those gone) and the product read back at the entries left: no copy of the blocks."""

        def spread(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            r = self._cut(ids)
            if r is None:
                return y, None
            out = np.zeros((y.shape[0], ids.size))
            out[:, r] = y
            return out, r

        # one by one when few or large (no copy of the blocks: a ψ candidate's is large),
        # else batched
        loop = sel.size <= _FEW or self.S.shape[1] >= _LARGE_BLOCK
        ys, r = spread(self._S_ids)
        if loop:
            out = np.stack([self.S[i] @ ys[j] for j, i in enumerate(sel)])
        else:
            out = np.matmul(self.S[sel], ys[:, :, None])[:, :, 0]
        out = out if r is None else out[:, r]
        where = np.full(len(self.pos), -1, dtype=np.int64)
        for at, Yq, ids in self._pend:
            if isinstance(at, slice):
                rows = sel
            else:
                where[at] = np.arange(at.size)
                rows = where[sel]
            ys, r = spread(ids)
            if loop:
                t = np.stack([Yq[a] @ (ys[j] @ Yq[a]) for j, a in enumerate(rows)])
            else:
                Y = Yq[rows]
                t = np.matmul(Y, np.matmul(ys[:, None, :], Y).transpose(0, 2, 1))[:, :, 0]
            out -= t if r is None else t[:, r]
        return out

    def bounds(self) -> np.ndarray | None:
        """Lower bounds of the live candidates' increments (``None`` unless
        ``keep_factors``).  From the factors of their last exact ones where the stage
        keeps them: conditioning only shrinks a block (``S_now ⪯ S_then``, so ``S_now⁻¹ ⪰
        S_then⁻¹``), so ``½ cᵀ S_then⁻¹ c`` with today's mean ``c`` is at most today's
        increment, at ``O(k²)`` a candidate instead of a factorisation's ``O(k³)``; a
        block that was not positive definite bounds at 0 (it is always scored exactly).
        Elsewhere by Cauchy–Schwarz (below)."""
        if not self.keep_factors:
            return None
        out = np.full(len(self.pos), np.inf)
        live = self.live
        out[live] = 0.0
        have = self._fac is not None
        use = live & self._fac_ok if have else np.zeros_like(live)
        if use.any():
            y = solve_lower(self._fac[use], -self.c[self.pos[use]])
            out[use] = 0.5 * np.einsum("nk,nk->n", y, y)
        # without a factor: for any y, cᵀ S⁻¹ c ≥ (yᵀc)² / (yᵀ S y) (Cauchy–Schwarz in S's
        # inner product), tight at y = S⁻¹c: the last exact solution where the groups
        # changed since, else c itself
        rest = np.flatnonzero(live & ~use) if not have else np.zeros(0, dtype=np.int64)
        if rest.size:
            c = self.c[self.pos[rest]]
            y = c.copy()
            if self._y is not None:
                known = self._y_ok[rest]
                y[known] = self._y[rest[known]]
            den = np.einsum("nk,nk->n", y, self._S_times(rest, y))
            num = np.einsum("nk,nk->n", y, c) ** 2
            out[rest] = np.where(den > 0, 0.5 * num / np.where(den > 0, den, 1.0), 0.0)
        return out

    def _product(self, rows: np.ndarray) -> np.ndarray:
        """``C[rows, :]`` over the live columns: ``C0[rows, :] − W[:, rows]ᵀ W``."""
        out = self.cov.cross(self.G[rows], self.G)
        out -= self._R.gram(rows, self.X0.shape[0])
        return out

    def _rows(self, g: int) -> np.ndarray:
        """``C[q_g, :]`` now, from rows computed ahead or with the next cheapest."""
        if g in self._ahead:
            row, m0 = self._ahead.pop(g)
            if m0 < self.m:  # the commits since
                row -= self._R.gram(self.pos[g], self.X0.shape[0] + m0)
            return row
        if self._queue:  # a criterion's ranking: the next ones are known
            order = self._queue
        else:  # the next cheapest by the last increments
            order = [int(h) for h in np.argsort(self._inc, kind="stable")[: self.SPECULATE + 1]]
        k = self.pos.shape[1]
        ahead = min(self.SPECULATE, self.SPECULATE_ROWS // max(k, 1)) - 1
        if self._others or k >= self.ALONE_ROWS:  # (see ALONE_ROWS, and _others)
            ahead = 0
        nxt = [h for h in order[: self.SPECULATE + 1] if h != g and self.live[h]]
        cands = [g, *[h for h in nxt if h not in self._ahead][: max(ahead, 0)]]
        sizes = [self.pos[h].size for h in cands]
        rows = self._product(np.concatenate([self.pos[h] for h in cands]))
        parts = np.split(rows, np.cumsum(sizes)[:-1])
        for h, part in zip(cands[1:], parts[1:], strict=True):
            self._ahead[h] = (part, self.m)
        return parts[0]

    def take(self, which, last: bool = False) -> None:
        """Commit candidates ``which`` in turn.  ``last``: the stage is never read after
        the last of them (its step ends the stage): that commit needs its own block of
        ``C`` only, not its rows over every column (a ψ block's are a product of
        ``|B_stage| × k × |G|``)."""
        which = [int(g) for g in np.atleast_1d(which)]
        for i, g in enumerate(which):
            self._queue = which[i + 1 :]
            if not self.live[g]:
                raise ValueError(f"candidate {g} was taken already")
            q = self.pos[g]
            Wq = self._W[:, q]
            # (L⁻¹ Σ_{B,q}): the factor's rows
            X = np.vstack([self.X0[:, q], Wq]) if self.X0.shape[0] else Wq
            if last and i == len(which) - 1:
                self.sc._append(self.G[q], np.zeros(q.size), X, _chol(self._own(g)), self.c[q])
                self.live[g] = False
                return
            row = self._rows(g)  # C[q, :]
            self._others = False
            Lk = _chol(row[:, q])
            Yt = _lower_solve(Lk, row)  # Lk⁻¹ C[q, :]
            self.sc._append(self.G[q], np.zeros(q.size), X, Lk, self.c[q].copy())
            u = self.sc.z[-q.size :]
            self.c += Yt.T @ u
            self.live[g] = False
            # every candidate's block, or only the live ones once most are taken
            few = 2 * np.count_nonzero(self.live) < self.live.size
            at = np.flatnonzero(self.live) if few else slice(None)
            self._defer(at, Yt.T[self.pos[at]])  # n × k_g × k
            self._add_rows(Yt)
            self.dead += q.size
            if self.dead > 0.3 * self.G.size:
                self._compact()

    # -- several stages at once (a network's global greedy, docs/theory.md §10) -----------
    def absorb(self, k: int) -> None:
        """Take in the scorer's last commit of ``k`` entries, made by another stage: the
        candidates' blocks and conditional means become those given it too, at
        ``O(|B| k |G|)`` instead of a new stage's ``O(|B|² |G|)``.  Every commit since this
        stage began must be taken in (by :meth:`take` or here), in order: ``W``'s rows then
        mirror the scorer's factor past the stage's start."""
        sc = self.sc
        n = sc.n
        idx = sc.B[n - k : n]
        X = sc._L[n - k : n, : n - k]  # (L⁻¹ Σ_{B_prev, e})ᵀ, rows: the new entries
        Lk = sc._L[n - k : n, n - k : n]
        u = sc.z[n - k : n]
        n0 = self.X0.shape[0]
        if n - k != n0 + self.m:
            raise ValueError("a commit was not taken in by this stage")
        G = self.G
        C = self.sc.post.cov_cross(idx, G)  # Σ_{e, G}
        C -= self._R.left(X)  # X [X0; W]
        Yt = _lower_solve(Lk, C)  # Lk⁻¹ Cov(e, G | B)
        self.c += Yt.T @ u
        self._others = True
        at = np.flatnonzero(self.live)
        self._defer(at, Yt.T[self.pos[at]])
        self._add_rows(Yt)

    def _add_rows(self, Yt: np.ndarray) -> None:
        """Append the rows ``Yt`` (``k × |G|``) to W (a stage reserves one row per column;
        the commits it takes in from other stages may need more)."""
        self._R.append(Yt)

    def restrict(self, keep: np.ndarray) -> None:
        """Keep only the within-group entries ``keep`` (a mask over a candidate's ``k``
        entries, the same for every candidate): a space's consumer slices lose the rows its
        readers lost to φ elsewhere (marginalised, so no longer conditioned)."""
        keep = np.asarray(keep, dtype=bool)
        self.pos = self.pos[:, keep]
        self._ids = self._ids[keep]  # S and the updates waiting are cut when next read
        self._ahead.clear()  # rows computed ahead were for the old groups
        if self._fac is not None:  # a sub-block's factor is not the factor's sub-block:
            ok = self._fac_ok  # keep the solutions S⁻¹c instead (bounds() still uses them)
            self._y = np.zeros(self.pos.shape[:1] + keep.shape)
            if ok.any():
                self._y[ok] = cho_solve_batched(self._fac[ok], self._c_then[ok])
            self._y_ok = ok.copy()
            self._fac, self._c_then = None, None
        if self._y is not None:
            self._y = self._y[:, keep]
        # the entries left out are never read again, as a taken candidate's: their columns
        # go at the next compaction (a space whose readers shrink to a tenth would
        # otherwise carry nine tenths of its columns through every product)
        used = self._used()
        self.dead = self.G.size - int(np.count_nonzero(used))
        if self.dead > 0.3 * self.G.size:
            self._compact(used)

    def _used(self) -> np.ndarray:
        """The columns some live candidate reads (a mask, not np.unique: no sort, no hash)."""
        used = np.zeros(self.G.size, dtype=bool)
        used[self.pos[self.live].ravel()] = True
        return used

    def _compact(self, used: np.ndarray | None = None) -> None:
        """Drop the columns no live candidate reads (taken candidates', entries restricted
        away; ``used``: :meth:`_used`, when known): every later commit then reads and
        writes less (the stage's work falls as the greedy goes)."""
        keep = np.flatnonzero(self._used() if used is None else used)
        remap = np.full(self.G.size, -1, dtype=np.int64)
        remap[keep] = np.arange(keep.size)
        self._R.compact(keep)  # X0 too: once here, not at every commit taken in
        self.c, self.G = self.c[keep], self.G[keep]
        self._ahead = {h: (r.take(keep, axis=1), m0) for h, (r, m0) in self._ahead.items()}
        self.pos = np.where(self.live[:, None], remap[self.pos], -1)
        self.dead = 0


class _DenseBlock:
    """``Q = Cov(x_P | x_B)⁻¹`` of a fixed set P: the cost of a pattern ``t`` is
    ``½ (t − c)ᵀ Q (t − c)``; ``linear[q] = ½ Q_qq − (Q c)_q`` is its change when
    entry q alone goes from 0 to 1.  Q itself is never formed: its diagonal comes
    from the inverse of the Cholesky factor, ``Q c`` from two triangular solves."""

    def __init__(self, scorer: DenseScorer, idx: np.ndarray) -> None:
        self.sc, self.idx = scorer, idx
        self.X, S, self.c = scorer.conditional(idx)
        bk = for_size(S.size)  # a merged layer's block: on a device backend when large
        self.Lk = cholesky_constraint(S, bk)
        q = bk.inverse_diagonal(self.Lk)
        self.linear = 0.5 * q - sla.cho_solve((self.Lk, True), self.c, check_finite=False)

    def cost(self, targets: np.ndarray) -> float:
        y = sla.solve_triangular(self.Lk, targets - self.c, lower=True, check_finite=False)
        return 0.5 * float(y @ y)

    def commit(self, targets: np.ndarray) -> None:
        self.sc._append(self.idx, np.asarray(targets, dtype=np.float64), self.X, self.Lk, self.c)


class _PrecisionBlock:
    """A block conditioned on its precision side: ``Q`` and ``Q c`` from the format
    (``Posterior.conditional_precision``); costs by the format's own one-shot formula."""

    def __init__(self, scorer: DenseScorer, idx: np.ndarray, q: np.ndarray, Qc: np.ndarray):
        self.sc, self.idx = scorer, idx
        self.linear = 0.5 * q - Qc

    def _total(self, targets: np.ndarray) -> float:
        sc = self.sc
        B = np.concatenate([sc.B, self.idx])
        return sc.post.constraint_cost(B, np.concatenate([sc.v, targets]))

    def cost(self, targets: np.ndarray) -> float:
        return self._total(targets) - self.sc.cost

    def commit(self, targets: np.ndarray) -> None:
        targets = np.asarray(targets, dtype=np.float64)
        self.sc._record(self.idx, targets, self._total(targets))


class DiagScorer:
    """Independent coordinates (``diag``): every increment is the group's own cost."""

    def __init__(self, posterior) -> None:
        self.mean, self.var = posterior.mean, posterior.var
        self.cost = 0.0

    def copy(self) -> DiagScorer:
        out = object.__new__(DiagScorer)
        out.mean, out.var, out.cost = self.mean, self.var, self.cost
        return out

    #: increments never change: the greedy removes the cheapest all at once
    independent = True

    def step_work(self, n: int, k: int) -> float:
        return float(n * k)

    def commit(self, idx: np.ndarray, targets: np.ndarray) -> None:
        idx = np.asarray(idx, dtype=np.int64)
        d = np.asarray(targets, dtype=np.float64) - self.mean[idx]
        self.cost += 0.5 * float(np.sum(d * d / self.var[idx]))

    def _layer(self, s, t: int, rows: np.ndarray, cols: np.ndarray):
        """Mean and variance of ``U_t[rows, cols]`` without index arrays (layer views)."""
        n, m, start = s.width(t), s.width(t - 1), s.layer_offset(t)
        mean = self.mean[start : start + n * m].reshape(n, m)
        var = self.var[start : start + n * m].reshape(n, m)
        return _take(mean, rows, cols), _take(var, rows, cols)

    def drops(self, groups) -> _DiagDrops:
        if isinstance(groups, Columns):
            m, v = self._layer(groups.structure, groups.layer, groups.rows, groups.cols)
            return _DiagDrops(self, 0.5 * np.einsum("rc,rc->c", m, m / v))
        return _DiagDrops(self, _group_costs(self, indices(groups)))

    def block(self, idx) -> _DiagBlock:
        if isinstance(idx, LayerBlock):
            s = idx.structure
            m, v = self._layer(s, idx.layer, idx.rows, idx.cols)
            m, v = m.ravel(), v.ravel()
            if s.bias:
                b = s.layer(idx.layer).b[idx.rows]
                m, v = np.concatenate([m, self.mean[b]]), np.concatenate([v, self.var[b]])
            return _DiagBlock(self, m, v)
        i = indices(idx)
        return _DiagBlock(self, self.mean[i], self.var[i])


def _span(ids: np.ndarray):
    """A slice for sorted ids that form one contiguous range, else the ids themselves."""
    ids = np.asarray(ids)
    if ids.size and ids[-1] - ids[0] + 1 == ids.size:
        return slice(int(ids[0]), int(ids[-1]) + 1)
    return ids


def _take(A: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``A[np.ix_(rows, cols)]`` by slices where the ids are a contiguous range."""
    return A[_span(rows)][:, _span(cols)]


def _group_costs(sc: DiagScorer, groups: np.ndarray) -> np.ndarray:
    z = sc.mean[groups]
    np.square(z, out=z)
    z /= sc.var[groups]
    return 0.5 * z.sum(axis=-1)


class _DiagDrops:
    def __init__(self, scorer: DiagScorer, inc: np.ndarray) -> None:
        self.sc, self.inc = scorer, inc
        self.live = np.ones(inc.size, dtype=bool)

    def increments(self) -> np.ndarray:
        return np.where(self.live, self.inc, np.inf)

    def take(self, which) -> None:
        which = np.atleast_1d(which)
        if not self.live[which].all():
            raise ValueError("a candidate was taken already")
        self.sc.cost += float(self.inc[which].sum())
        self.live[which] = False


class _DiagBlock:
    def __init__(self, scorer: DiagScorer, m: np.ndarray, v: np.ndarray) -> None:
        self.sc = scorer
        self.q = np.reciprocal(v)
        self.linear = np.subtract(0.5, m)
        self.linear *= self.q
        self.c = m

    def cost(self, targets: np.ndarray) -> float:
        d = np.subtract(targets, self.c)
        d *= d
        return 0.5 * float(d @ self.q)

    def commit(self, targets: np.ndarray) -> None:
        self.sc.cost += self.cost(np.asarray(targets, dtype=np.float64))
