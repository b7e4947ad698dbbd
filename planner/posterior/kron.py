"""The ``kron`` format: per layer ``Cov(U[i,j], U[k,l]) = G[i,k] A[j,l]`` (SPEC §7).

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

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from ..errors import InvalidPosterior
from ..structure import Structure
from . import _validate as v
from .base import Posterior

__all__ = ["KronPosterior"]


def _chol(S: np.ndarray, field: str) -> np.ndarray:
    try:
        return sla.cholesky(S, lower=True, check_finite=False)
    except np.linalg.LinAlgError:  # pragma: no cover - validated factors stay PD
        raise InvalidPosterior("lost positive definiteness", field=field) from None


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
        if structure.kind != "mlp":
            raise InvalidPosterior(
                "the kron format is for MLP teachers; an RNN's recurrent weights are not "
                "Kronecker-factored",
                field="posterior.format",
            )
        v.require(arrays, cls.names(structure), cls.format)
        mean = v.vector(arrays["mean"], "mean", structure.n_params)
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
                L.A = 0.5 * (L.A + L.A.T)
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

    def align_bytes(self, conditioned: int, kept: int) -> int:
        s = self.structure
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
        raise NotImplementedError(
            "a kron posterior is aligned by a plan (align), not by arbitrary index sets"
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
        t, is_b, r, c = self._locate(idx)
        out = np.zeros((idx.size, idx.size))
        for u in np.unique(t):
            w = np.flatnonzero((t == u) & ~is_b)
            out[np.ix_(w, w)] = self.G[u][np.ix_(r[w], r[w])] * self.A[u][np.ix_(c[w], c[w])]
            wb = np.flatnonzero((t == u) & is_b)
            if wb.size:
                b = self.bias[u]
                out[np.ix_(wb, wb)] = np.diag(b[r[wb]]) if b.ndim == 1 else b[np.ix_(r[wb], r[wb])]
        return out

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

    def assignment_costs(self, rows: np.ndarray) -> np.ndarray:
        """Rows of a layer: ``Σ_row = G_ii A_CC``, so one inverse of A_CC serves all rows."""
        t, is_b, r, c = (a.reshape(rows.shape) for a in self._locate(rows.ravel()))
        if is_b.any() or (t != t[0, 0]).any() or (r != r[:, :1]).any() or (c != c[:1]).any():
            return super().assignment_costs(rows)
        u = int(t[0, 0])
        L, diagP = self._col_factor(u, c[0])
        g = np.diag(self.G[u])[r[:, 0]]
        m = self.mean[rows]
        Pm = sla.cho_solve((L, True), m.T, check_finite=False).T
        quad = np.einsum("nk,nk->n", m, Pm)
        return 0.5 * (quad[:, None] - 2 * Pm + diagP[None, :]) / g[:, None]

    def _col_factor(self, t: int, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cholesky factor of A_t[cols, cols] and the diagonal of its inverse (cached)."""
        key = (t, cols.tobytes())
        cache = self.__dict__.setdefault("_col_cache", {})
        if key not in cache:
            L = _chol(self.A[t][np.ix_(cols, cols)], f"col{t}")
            Li = sla.solve_triangular(L, np.eye(len(L)), lower=True, check_finite=False)
            if len(cache) >= 3:  # the search asks for a layer's block route after route
                cache.pop(next(iter(cache)))
            cache[key] = (L, np.einsum("ij,ij->j", Li, Li))
        return cache[key]

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
            Li = sla.solve_triangular(_chol(S, "factor"), np.eye(len(S)), lower=True)
            return np.einsum("ij,ij->j", Li, Li)

        for t in range(2, s.T + 1):
            ix = s.layer(t)
            out[ix.U] = np.outer(inv_diag(self.G[t]), inv_diag(self.A[t]))
            if s.bias:
                b = self.bias[t]
                out[ix.b] = 1.0 / b if b.ndim == 1 else inv_diag(b)
        return out

    def dense_covariance(self) -> np.ndarray:
        return self.cov_block(np.arange(self.n))
