"""The ``kron`` format: per layer ``Cov(U[i,j], U[k,l]) = G[i,k] A[j,l]`` (docs/theory.md §7).

Layers are independent (and biases independent of weights).  Arrays: ``mean``
and, for each layer t = 2..T, ``row{t}`` (G, out × out), ``col{t}`` (A,
in × in) and, with biases, ``bias{t}``: variances ``(n_t,)`` or a covariance
``(n_t, n_t)``.  MLP teachers only.

Every step of a plan keeps each layer matrix-normal, so a plan is replayed in
the layers' own terms (``CompiledPlan.events``), never densified:

* conditioning whole columns ``C`` (over the current rows) to zero keeps G and
  replaces A by its Schur complement ``A_kk − A_kC A_CC⁻¹ A_Ck``, the mean by
  ``M_k − M_C A_CC⁻¹ A_Ck``; cost ``½ tr(G⁻¹ D A_CC⁻¹ Dᵀ)``, ``D = −M_C``;
* marginalising rows drops them from G (and from the bias);
* ψ conditions a whole layer block to its target: cost ``½ tr(G⁻¹ D A⁻¹ Dᵀ)``
  plus the bias's own.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from scipy.linalg import blas

from .._threads import all_threads
from ..errors import InvalidPosterior, SingularConstraint, Unsupported
from ..linalg import inverse_diagonal, pivots_ok, symmetrise
from ..structure import Structure
from . import _validate as v
from .base import Posterior
from .scoring import Columns, indices

__all__ = ["KronPosterior", "KronScorer"]


#: Up to this many parameters the search scores on dense blocks of Σ.
DENSE_PARAMS = 4096


def _chol(S: np.ndarray, what: str) -> np.ndarray:
    """Cholesky factor of a block met while conditioning; a block that is not numerically
    positive definite makes the plan's constraint singular (docs/theory.md §8)."""
    try:
        L = sla.cholesky(S, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        L = None
    if L is None or not pivots_ok(L, S):
        raise SingularConstraint(
            f"the Kronecker factor {what} restricted to the conditioned parameters is "
            "numerically singular; this plan cannot be conditioned on",
            field="ops",
        )
    return L


@dataclass
class _Layer:
    """One teacher layer during a replay: current rows/cols (teacher ids) and factors."""

    rows: np.ndarray
    cols: np.ndarray
    M: np.ndarray  # mean, rows × cols
    G: np.ndarray
    A: np.ndarray
    bm: np.ndarray | None  # bias mean (rows)
    bS: np.ndarray | None  # bias covariance (rows × rows), or variances (rows,)
    gone: bool = False

    def pos(self, ids: np.ndarray, of: np.ndarray) -> np.ndarray:
        index = {int(x): k for k, x in enumerate(of)}
        return np.array([index[int(x)] for x in ids], dtype=np.int64)


def _bias_cost(bm: np.ndarray, bS: np.ndarray) -> float:
    if bS.ndim == 1:
        return 0.5 * float(np.sum(bm * bm / bS))
    L = _chol(bS, "bias")
    z = sla.solve_triangular(L, bm, lower=True, check_finite=False)
    return 0.5 * float(z @ z)


class KronPosterior(Posterior):
    """Layer-wise Kronecker-factored Gaussian (K-FAC Laplace)."""

    format = "kron"
    array_names = ()

    def __init__(
        self,
        structure: Structure,
        mean: np.ndarray,
        G: dict[int, np.ndarray],
        A: dict[int, np.ndarray],
        bias: dict[int, np.ndarray],
    ) -> None:
        super().__init__(structure, mean)
        self.G, self.A, self.bias = G, A, bias

    @classmethod
    def names(cls, structure: Structure) -> tuple[str, ...]:
        out = ["mean"]
        for t in range(2, structure.T + 1):
            out += [f"row{t}", f"col{t}"] + ([f"bias{t}"] if structure.bias else [])
        return tuple(out)

    @classmethod
    def from_arrays(
        cls, structure: Structure, arrays: Mapping[str, np.ndarray], workspace=None
    ) -> KronPosterior:
        if structure.kind == "network":
            raise Unsupported(
                "the kron format for convolutional and residual networks (laplace-torch's "
                "K-FAC of Conv2d) is not implemented yet; upload full, precision, lowrank or "
                "diag",
                field="posterior.format",
            )
        if structure.kind != "mlp":
            raise InvalidPosterior(
                "the kron format is for MLP teachers; an RNN's recurrent weights are not "
                "Kronecker-factored",
                field="posterior.format",
            )
        v.require(arrays, cls.names(structure), cls.format)
        mean = v.vector(arrays["mean"], "mean", structure.n_params, structure.size_hint)
        G, A, bias = {}, {}, {}
        for t in range(2, structure.T + 1):
            G[t] = v.spd_matrix(arrays[f"row{t}"], f"row{t}", structure.width(t))[0]
            A[t] = v.spd_matrix(arrays[f"col{t}"], f"col{t}", structure.width(t - 1))[0]
            if structure.bias:
                b = np.asarray(arrays[f"bias{t}"])
                n = structure.width(t)
                bias[t] = (
                    v.positive_vector(b, f"bias{t}", n)
                    if b.ndim == 1
                    else v.spd_matrix(b, f"bias{t}", n)[0]
                )
        return cls(structure, mean, G, A, bias)

    @classmethod
    def from_validated(cls, structure: Structure, arrays: Mapping[str, np.ndarray]):
        T = structure.T
        return cls(
            structure,
            arrays["mean"],
            {t: arrays[f"row{t}"] for t in range(2, T + 1)},
            {t: arrays[f"col{t}"] for t in range(2, T + 1)},
            {t: arrays[f"bias{t}"] for t in range(2, T + 1)} if structure.bias else {},
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean}
        for t in range(2, self.structure.T + 1):
            out[f"row{t}"], out[f"col{t}"] = self.G[t], self.A[t]
            if self.structure.bias:
                out[f"bias{t}"] = self.bias[t]
        return out

    # -- the replay -----------------------------------------------------------------------------
    def _layers(self) -> dict[int, _Layer]:
        """Each layer's state as views of the posterior's arrays: updates make new arrays."""
        s = self.structure
        out = {}
        for t in range(2, s.T + 1):
            n, m, start = s.width(t), s.width(t - 1), s.layer_offset(t)
            M = self.mean[start : start + n * m].reshape(n, m)
            bm = self.mean[start + n * m : start + n * m + n] if s.bias else None
            bS = self.bias[t] if s.bias else None
            out[t] = _Layer(np.arange(n), np.arange(m), M, self.G[t], self.A[t], bm, bS)
        return out

    def _replay(self, plan) -> tuple[dict[int, _Layer], float]:
        """Replay ``plan``'s events; the last replay is kept for an :meth:`align` that
        follows a :meth:`plan_cost` of the same plan (the search's pattern)."""
        last = getattr(self, "_last", None)
        if last is not None and last[0]() is plan:
            return last[1], last[2]
        layers, cost = self._replay_events(plan.events)
        self._last = (weakref.ref(plan), layers, cost)
        return layers, cost

    def _replay_events(self, events) -> tuple[dict[int, _Layer], float]:
        layers, cost = self._layers(), 0.0
        for ev in events:
            L = layers[ev.layer]
            if ev.kind == "rows":
                keep = np.setdiff1d(np.arange(L.rows.size), L.pos(ev.rows, L.rows))
                L.rows, L.M, L.G = L.rows[keep], L.M[keep], L.G[np.ix_(keep, keep)]
                if L.bm is not None:
                    L.bm = L.bm[keep]
                    L.bS = L.bS[keep] if L.bS.ndim == 1 else L.bS[np.ix_(keep, keep)]
            elif ev.kind == "columns":
                C = L.pos(ev.cols, L.cols)
                k = np.setdiff1d(np.arange(L.cols.size), C)
                LA = _chol(L.A[np.ix_(C, C)], f"col{ev.layer}")
                Zt = sla.solve_triangular(LA, -L.M[:, C].T, lower=True, check_finite=False)
                LG = _chol(L.G, f"row{ev.layer}")
                X = sla.solve_triangular(LG, Zt.T, lower=True, check_finite=False)
                cost += 0.5 * float(np.sum(X * X))
                W = sla.solve_triangular(LA, L.A[np.ix_(C, k)], lower=True, check_finite=False)
                L.M = L.M[:, k] + Zt.T @ W
                L.A = L.A[np.ix_(k, k)] - W.T @ W
                L.A = symmetrise(L.A)
                L.cols = L.cols[k]
            else:  # a whole layer conditioned (ψ)
                r, c = L.pos(ev.rows, L.rows), L.pos(ev.cols, L.cols)
                D = ev.target - L.M[np.ix_(r, c)]
                LA = _chol(L.A[np.ix_(c, c)], f"col{ev.layer}")
                LG = _chol(L.G[np.ix_(r, r)], f"row{ev.layer}")
                Y = sla.solve_triangular(LA, D.T, lower=True, check_finite=False)
                X = sla.solve_triangular(LG, Y.T, lower=True, check_finite=False)
                cost += 0.5 * float(np.sum(X * X))
                if L.bm is not None:
                    bS = L.bS[r] if L.bS.ndim == 1 else L.bS[np.ix_(r, r)]
                    cost += _bias_cost(-L.bm[r], bS)
                L.gone = True
        return layers, cost

    def align(self, plan) -> KronPosterior:
        layers, _ = self._replay(plan)
        s = plan.student
        mean = np.empty(s.n_params)
        G, A, bias = {}, {}, {}
        for t, (src, rows, cols) in enumerate(plan.student_layers, start=2):
            L = layers[src]
            r, c = L.pos(rows, L.rows), L.pos(cols, L.cols)
            ix = s.layer(t)
            mean[ix.U] = L.M[np.ix_(r, c)]
            G[t], A[t] = L.G[np.ix_(r, r)], L.A[np.ix_(c, c)]
            if s.bias:
                mean[ix.b] = L.bm[r]
                bias[t] = L.bS[r] if L.bS.ndim == 1 else L.bS[np.ix_(r, r)]
        return KronPosterior(s, mean, G, A, bias)

    @classmethod
    def align_bytes_of(cls, structure, shapes, conditioned: int, kept: int) -> int:
        s = structure
        per = [
            s.width(t) ** 2 + s.width(t - 1) ** 2 + s.width(t) * s.width(t - 1)
            for t in range(2, s.T + 1)
        ]
        return 8 * (3 * sum(per) + 2 * kept)

    def plan_cost(self, plan) -> float:
        return self._replay(plan)[1]

    def constraint_cost(self, B, values) -> float:
        """For arbitrary (small) index sets; plans use the structured :meth:`plan_cost`."""
        B = np.asarray(B, dtype=np.int64)
        if B.size == 0:
            return 0.0
        L = v.cholesky_constraint(self.cov_block(B))
        z = sla.solve_triangular(L, values - self.mean[B], lower=True, check_finite=False)
        return 0.5 * float(z @ z)

    def condition(self, B, values, keep, structure):
        raise Unsupported(
            "a kron posterior is aligned by a plan's steps (Plan.apply), which keep every "
            "layer Kronecker-factored; conditioning arbitrary index sets would not",
            field="posterior.format",
        )

    # -- small blocks -------------------------------------------------------------------------
    def _locate(self, idx: np.ndarray):
        """For flat indices: (layer t, is_bias, row, col)."""
        s = self.structure
        starts = np.array([s.layer_offset(t) for t in range(2, s.T + 2)])
        t = np.searchsorted(starts, idx, side="right") + 1
        off = idx - starts[t - 2]
        n_in = np.array([0, 0] + [s.width(u - 1) for u in range(2, s.T + 1)])[t]
        n_out = np.array([0, 0] + [s.width(u) for u in range(2, s.T + 1)])[t]
        is_b = off >= n_out * n_in
        row = np.where(is_b, off - n_out * n_in, off // np.maximum(n_in, 1))
        col = np.where(is_b, 0, off % np.maximum(n_in, 1))
        return t, is_b, row, col

    def cov_block(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return self.cov_cross(idx, idx)

    def cov_cross(self, rows, cols) -> np.ndarray:
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        ta, ba, ra, ca = self._locate(rows)
        tb, bb, rb, cb = self._locate(cols)
        out = np.zeros((rows.size, cols.size))
        for u in np.intersect1d(ta, tb):
            w, x = np.flatnonzero((ta == u) & ~ba), np.flatnonzero((tb == u) & ~bb)
            if w.size and x.size:
                G, A = self.G[u][np.ix_(ra[w], rb[x])], self.A[u][np.ix_(ca[w], cb[x])]
                out[np.ix_(w, x)] = G * A
            w, x = np.flatnonzero((ta == u) & ba), np.flatnonzero((tb == u) & bb)
            if w.size and x.size:
                b = self.bias[u]
                out[np.ix_(w, x)] = (
                    (ra[w][:, None] == rb[x][None, :]) * b[ra[w]][:, None]
                    if b.ndim == 1
                    else b[np.ix_(ra[w], rb[x])]
                )
        return out

    def column_factor(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Cholesky factor of layer t's column factor A_t and the diagonal of A_t⁻¹,
        computed once (searches ask for them route after route)."""
        cache = self.__dict__.setdefault("_column_factors", {})
        if t not in cache:
            L = _chol(np.asarray(self.A[t]), f"col{t}")
            cache[t] = (L, inverse_diagonal(L))
        return cache[t]

    def scorer(self):
        """Per-layer matrix-normal state (:class:`KronScorer`); dense blocks while the
        posterior is small enough to be held dense (the same numbers either way)."""
        if self.n <= DENSE_PARAMS:
            return super().scorer()
        return KronScorer(self)

    def one_shot_work(self, conditioned: int, kept: int) -> float:
        s = self.structure
        return float(sum(s.width(t) ** 3 + s.width(t - 1) ** 3 for t in range(2, s.T + 1)))

    def _column_groups(self, groups: np.ndarray):
        """(layer, rows, cols) when every group is one column of one layer over the same rows."""
        t, is_b, r, c = self._locate(groups.ravel())
        t, is_b, r, c = (a.reshape(groups.shape) for a in (t, is_b, r, c))
        if is_b.any() or (t != t[0, 0]).any() or (c != c[:, :1]).any() or (r != r[:1]).any():
            return None
        return int(t[0, 0]), r[0], c[:, 0]

    def group_costs(self, groups: np.ndarray) -> np.ndarray:
        """Columns of a layer: ``½ m_colᵀ G_R⁻¹ m_col / A_jj`` with one factor of G_R."""
        hit = self._column_groups(groups)
        if hit is None:
            return super().group_costs(groups)
        t, rows, cols = hit
        L = _chol(self.G[t][np.ix_(rows, rows)], f"row{t}")
        X = sla.solve_triangular(L, self.mean[groups].T, lower=True, check_finite=False)
        return 0.5 * np.sum(X * X, axis=0) / np.diag(self.A[t])[cols]

    def variance(self) -> np.ndarray:
        s, out = self.structure, np.empty(self.n)
        for t in range(2, s.T + 1):
            ix = s.layer(t)
            out[ix.U] = np.outer(np.diag(self.G[t]), np.diag(self.A[t]))
            if s.bias:
                b = self.bias[t]
                out[ix.b] = b if b.ndim == 1 else np.diag(b)
        return out

    def precision_diagonal(self) -> np.ndarray:
        s, out = self.structure, np.empty(self.n)

        def inv_diag(S):
            return inverse_diagonal(_chol(S, "factor"))

        for t in range(2, s.T + 1):
            ix = s.layer(t)
            out[ix.U] = np.outer(inv_diag(self.G[t]), inv_diag(self.A[t]))
            if s.bias:
                b = self.bias[t]
                out[ix.b] = 1.0 / b if b.ndim == 1 else inv_diag(b)
        return out

    def dense_covariance(self) -> np.ndarray:
        return self.cov_block(np.arange(self.n))


def _lower_columns(A: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Columns ``C`` (sorted) of a symmetric matrix of which only the lower triangle is
    current."""
    out = A[:, C]
    upper = np.arange(A.shape[0])[:, None] < C[None, :]
    out[upper] = A[C, :].T[upper]
    return out


#: A layer's Schur complement is compacted (its dead columns dropped) once fewer than
#: this share of its columns are live.
_COMPACT_BELOW = 0.5


@dataclass
class _LayerState:
    """A layer during a search: its current rows (teacher ids), its columns and which are
    still live (not conditioned), the row factor's Cholesky on those rows, the whitened
    residual mean ``Z = L_G⁻¹ M'`` and the column factor's Schur complement ``A'`` (kept
    full-size, Fortran order, downdated in place in its lower triangle, which alone is
    current; conditioned columns are dead until a compaction drops them)."""

    rows: np.ndarray
    cols: np.ndarray
    live: np.ndarray
    LG: np.ndarray
    Z: np.ndarray
    A: np.ndarray
    gone: bool = False

    def copy(self) -> _LayerState:
        return _LayerState(
            self.rows.copy(),
            self.cols.copy(),
            self.live.copy(),
            self.LG,
            self.Z.copy(),
            np.asfortranarray(self.A.copy()),
            self.gone,
        )


class KronScorer:
    """Exact incremental conditioning of a layer-wise Kronecker posterior (docs/theory.md §6, §7).

    Layers are independent, so each keeps its own matrix-normal state.  The
    search's candidates are whole columns of a layer over its current rows (a
    neuron's outgoing weights): conditioning columns C to zero keeps G and
    Schur-complements A, and the increment of column c is
    ``½ ‖z_c‖² / A'_cc`` with ``z = L_G⁻¹ M'``: every candidate scored at once,
    a batch of commits one rank-|C| update.  A merged layer's block (all its live
    columns over its current rows) has precision ``G⁻¹ ⊗ A'⁻¹``.
    """

    def __init__(self, posterior: KronPosterior) -> None:
        self.post = posterior
        self.layers: dict[int, _LayerState] = {}
        self.cost = 0.0

    def copy(self) -> KronScorer:
        out = KronScorer(self.post)
        out.layers = {t: st.copy() for t, st in self.layers.items()}
        out.cost = self.cost
        return out

    independent = False

    def step_work(self, n: int, k: int) -> float:
        # a step reads and writes the whole n × n Schur complement: memory, not flops
        return float(n * k + 100 * n * n)

    def _state(self, t: int, rows: np.ndarray) -> _LayerState:
        """Layer t's state over ``rows`` (its other rows marginalised).  Rows are fixed the
        first time a layer is scored: a search reduces the positions above it first."""
        st = self.layers.get(t)
        if st is None:
            s = self.post.structure
            n, m, start = s.width(t), s.width(t - 1), s.layer_offset(t)
            M = np.asarray(self.post.mean[start : start + n * m]).reshape(n, m)[rows]
            LG = _chol(self.post.G[t][np.ix_(rows, rows)], f"row{t}")
            Z = sla.solve_triangular(LG, M, lower=True, check_finite=False)
            A = np.array(self.post.A[t], order="F")
            st = _LayerState(rows, np.arange(m), np.ones(m, dtype=bool), LG, Z, A)
            self.layers[t] = st
        elif not np.array_equal(st.rows, rows):
            raise InvalidPosterior(
                f"a kron search changed the rows of layer {t} after scoring it", field="ops"
            )
        return st

    def _columns(self, groups: np.ndarray):
        t, is_b, r, c = self.post._locate(groups.ravel())
        t, is_b, r, c = (a.reshape(groups.shape) for a in (t, is_b, r, c))
        if is_b.any() or (t != t[0, 0]).any() or (c != c[:, :1]).any() or (r != r[:1]).any():
            raise InvalidPosterior(
                "a kron search scores whole columns of one layer over its current rows",
                field="ops",
            )
        return int(t[0, 0]), r[0], c[:, 0]

    def drops(self, groups) -> _KronDrops:
        if isinstance(groups, Columns):
            t, rows, cols = groups.layer, groups.rows, groups.cols
        else:
            t, rows, cols = self._columns(np.asarray(groups, dtype=np.int64))
        return _KronDrops(self, t, self._state(t, np.sort(rows)), np.asarray(cols))

    def block(self, idx) -> _KronBlock:
        return _KronBlock(self, indices(idx))

    def commit(self, idx: np.ndarray, targets: np.ndarray) -> None:
        if np.asarray(idx).size:
            raise InvalidPosterior(
                "a kron posterior conditions whole columns or layers only", field="ops"
            )


class _KronDrops:
    def __init__(self, sc: KronScorer, t: int, st: _LayerState, cols: np.ndarray) -> None:
        self.sc, self.t, self.st = sc, t, st
        self.cand = np.asarray(cols)  # the candidates' teacher column ids
        self.live = np.isin(self.cand, st.cols[st.live])

    def increments(self) -> np.ndarray:
        out = np.full(self.cand.size, np.inf)
        st = self.st
        q = np.searchsorted(st.cols, self.cand[self.live])
        a = np.diagonal(st.A)[q]
        ok = a > 0
        inc = np.full(q.size, np.inf)
        z = st.Z[:, q[ok]]
        inc[ok] = 0.5 * np.einsum("ij,ij->j", z, z) / a[ok]
        out[self.live] = inc
        return out

    def take(self, which) -> None:
        """Condition the columns ``which`` at once: a rank-|C| Schur update of ``A'`` in
        place (its conditioned rows and columns fall to zero and are dead), compacted
        once most of it is dead (the work falls as the greedy goes)."""
        which = np.atleast_1d(which)
        if not self.live[which].all():
            raise ValueError("a candidate was taken already")
        st = self.st
        C = np.sort(np.searchsorted(st.cols, self.cand[which]))  # sorted: A[C, C]'s lower
        LC = _chol(st.A[np.ix_(C, C)], f"col{self.t}")  # triangle is A's
        Y = sla.solve_triangular(LC, st.Z[:, C].T, lower=True, check_finite=False)
        self.sc.cost += 0.5 * float(np.sum(Y * Y))
        W = sla.solve_triangular(LC, _lower_columns(st.A, C).T, lower=True, check_finite=False)
        st.Z -= Y.T @ W
        # A' is symmetric: its lower triangle alone is kept (a rank-|C| syrk, half a gemm)
        with all_threads() if st.A.shape[0] >= 1024 else contextlib.nullcontext():
            st.A = blas.dsyrk(-1.0, W, beta=1.0, c=st.A, trans=1, lower=1, overwrite_c=True)
        st.live[C] = False
        if st.live.mean() < _COMPACT_BELOW:
            keep = np.flatnonzero(st.live)
            st.A = np.asfortranarray(st.A[np.ix_(keep, keep)])
            st.Z = np.ascontiguousarray(st.Z[:, keep])
            st.cols, st.live = st.cols[keep], st.live[keep]
        self.live[which] = False


class _KronBlock:
    """A layer's whole live block (rows × live columns, and its biases) to a pattern."""

    def __init__(self, sc: KronScorer, idx: np.ndarray) -> None:
        post = sc.post
        t, is_b, r, c = post._locate(idx)
        u = int(t[0])
        if (t != u).any():
            raise InvalidPosterior("a kron block lies in one layer", field="ops")
        w = ~is_b
        rows = np.unique(r[w])
        st = sc._state(u, rows)
        cols = st.cols[st.live]
        R, L = rows.size, cols.size
        if w.sum() != R * L or not np.array_equal(np.unique(c[w]), cols):
            raise InvalidPosterior(
                "a kron block is all live columns of a layer over its rows", field="ops"
            )
        self.sc, self.t, self.st, self.idx = sc, u, st, idx
        self.w, self.b = np.flatnonzero(w), np.flatnonzero(is_b)
        self.ri, self.ci = np.searchsorted(rows, r[w]), np.searchsorted(cols, c[w])
        live = np.flatnonzero(st.live)
        self.Z = st.Z[:, live]
        # Q = G⁻¹ ⊗ A'⁻¹ and c = M': linear = ½ diag(G⁻¹)_k diag(A'⁻¹)_l − (G⁻¹ M' A'⁻¹)_kl;
        # the diagonals from the inverse factors, G⁻¹ M' A⁻¹ by solves (never A⁻¹ whole)
        if live.size == st.cols.size and st.cols.size == post.structure.width(u - 1):
            self.LA, ai = post.column_factor(u)  # untouched: the layer's own, cached
        else:
            self.LA = _chol(st.A[np.ix_(live, live)], f"col{u}")
            ai = inverse_diagonal(self.LA)
        gi = inverse_diagonal(st.LG)
        GM = sla.solve_triangular(st.LG, self.Z, lower=True, trans="T", check_finite=False)
        GMA = sla.cho_solve((self.LA, True), GM.T, check_finite=False).T
        lin = np.empty(idx.size)
        lin[self.w] = 0.5 * gi[self.ri] * ai[self.ci] - GMA[self.ri, self.ci]
        self.bias = None
        if self.b.size:
            bm, rb = post.mean[idx[self.b]], r[self.b]
            bS = post.bias[u]
            bS = bS[rb] if bS.ndim == 1 else bS[np.ix_(rb, rb)]
            Bi = np.diag(1.0 / bS) if bS.ndim == 1 else np.linalg.inv(bS)
            lin[self.b] = 0.5 * np.diag(Bi) - Bi @ bm
            self.bias = (bm, bS)
        self.linear = lin

    def cost(self, targets: np.ndarray) -> float:
        st = self.st
        T = np.zeros(self.Z.shape)
        T[self.ri, self.ci] = targets[self.w]
        D = T - st.LG @ self.Z  # the residual mean is M' = L_G Z
        X = sla.solve_triangular(st.LG, D, lower=True, check_finite=False)
        Y = sla.solve_triangular(self.LA, X.T, lower=True, check_finite=False)
        out = 0.5 * float(np.sum(Y * Y))
        if self.bias is not None:
            bm, bS = self.bias
            out += _bias_cost(targets[self.b] - bm, bS)
        return out

    def commit(self, targets: np.ndarray) -> None:
        self.sc.cost += self.cost(np.asarray(targets, dtype=np.float64))
        self.st.gone = True
