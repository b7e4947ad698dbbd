"""The ``lowrank`` format: ``Σ = diag(variance) + F Fᵀ`` (docs/theory.md §7; SWAG's form).

With ``D = diag(variance)`` and ``B`` conditioned, ``a`` kept (disjoint, so
``Σ_aB = F_a F_Bᵀ``), Woodbury gives, for ``C = (I + F_Bᵀ D_B⁻¹ F_B)⁻¹``::

    μ_a = m_a + F_a C F_Bᵀ D_B⁻¹ (v − m_B)
    Ξ_aa = D_a + F_a C F_aᵀ            (the factor becomes F_a chol(C))
    cost = ½ (dᵀ D_B⁻¹ d − wᵀ C w),    w = F_Bᵀ D_B⁻¹ d

in ``O((|a| + |B|) k²)``: the result keeps the form and never densifies.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import numpy as np
import scipy.linalg as sla

from ..errors import InvalidPosterior, SingularConstraint
from ..structure import Structure
from . import _validate as v
from .base import Posterior
from .diag import diagonal_cross
from .scoring import batched_cholesky_solve, indices, solve_lower

__all__ = ["LowRankPosterior", "LowRankScorer"]


#: Up to this many parameters the search scores on dense blocks of Σ.
DENSE_PARAMS = 4096
#: Rows of the factor an alignment reads at a time (8 MB at k = 32).
_CHUNK_ROWS = 1 << 15


def _stacked(post, groups):
    """Means, variances, factors and D⁻¹F of each group: (n, g), (n, g), (n, g, k) ×2."""
    m, d, F = post.mean[groups], post.var[groups], np.asarray(post.factor[groups])
    return m, d, F, F / d[..., None]


def _inner(F: np.ndarray, DF: np.ndarray) -> np.ndarray:
    """``I + Fᵀ D⁻¹ F`` for each group, as one batched BLAS product."""
    return np.eye(F.shape[-1]) + np.matmul(F.transpose(0, 2, 1), DF)


class LowRankPosterior(Posterior):
    """``N(mean, diag(variance) + factor factorᵀ)``."""

    format = "lowrank"
    array_names = ("variance", "factor")

    def __init__(
        self, structure: Structure, mean: np.ndarray, var: np.ndarray, factor: np.ndarray
    ) -> None:
        super().__init__(structure, mean)
        self.var = var
        self.factor = factor

    @property
    def size(self) -> int:
        return self.n * (2 + self.rank)

    @property
    def rank(self) -> int:
        return self.factor.shape[1]

    @classmethod
    def from_arrays(
        cls, structure: Structure, arrays: Mapping[str, np.ndarray], workspace=None
    ) -> LowRankPosterior:
        v.require(arrays, ("mean", "variance", "factor"), cls.format)
        p = structure.n_params
        mean = v.vector(arrays["mean"], "mean", p, structure.size_hint)
        var = v.positive_vector(arrays["variance"], "variance", p, structure.size_hint)
        F = v.as_float(arrays["factor"], "factor")
        if F.ndim != 2 or F.shape[0] != p or F.shape[1] < 1:
            why = f"must have shape ({p}, k) with k >= 1; got {F.shape}"
            if F.ndim == 2 and F.shape[0] != p:
                why += f": {structure.size_hint(F.shape[0])}"
            raise InvalidPosterior(why, field="factor")
        rows = max(1, (1 << 24) // max(8 * F.shape[1], 1))
        for i in range(0, p, rows):
            if not np.isfinite(F[i : i + rows]).all():
                raise InvalidPosterior("contains NaN or infinite values", field="factor")
        return cls(structure, mean, var, F)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "variance": self.var, "factor": self.factor}

    # -- conditioning ---------------------------------------------------------------------
    def _woodbury(self, B: np.ndarray, values: np.ndarray, plan=None):
        """The factors of a conditioning on B.  For a compiled ``plan`` the last one is
        kept, so its alignment reuses what its cost computed (the search's pattern)."""
        last = getattr(self, "_last", None)
        if plan is not None and last is not None and last[0]() is plan:
            return last[1]
        out = self._woodbury_of(B, values)
        if plan is not None:
            self._last = (weakref.ref(plan), out)
        return out

    def plan_cost(self, plan) -> float:
        return self._cost(plan.conditioned, plan.targets, plan)

    def align(self, plan) -> LowRankPosterior:
        return self._condition(plan.conditioned, plan.targets, plan.kept, plan.student, plan)

    def _woodbury_of(self, B: np.ndarray, values: np.ndarray):
        """(C's Cholesky factor, w = F_Bᵀ D_B⁻¹ d, dᵀ D_B⁻¹ d) for the block B: sums over
        B, read in ascending chunks of rows (a memory-mapped factor streams from disk, and
        no temporary is as large as F_B)."""
        B, values = np.asarray(B, dtype=np.int64), np.asarray(values, dtype=np.float64)
        if B.size > 1 and (np.diff(B) < 0).any():
            order = np.argsort(B, kind="stable")
            B, values = B[order], values[order]
        inner, w, dd = np.eye(self.rank), np.zeros(self.rank), 0.0
        for i in range(0, B.size, _CHUNK_ROWS):
            b = B[i : i + _CHUNK_ROWS]
            s = 1.0 / np.sqrt(self.var[b])
            G = np.asarray(self.factor[b]) * s[:, None]  # D^-½ F
            e = (values[i : i + _CHUNK_ROWS] - self.mean[b]) * s  # D^-½ d
            inner += G.T @ G
            w += G.T @ e
            dd += float(e @ e)
        return self._factor_inner(inner), w, dd

    @staticmethod
    def _factor_inner(inner: np.ndarray) -> np.ndarray:
        try:
            return sla.cholesky(inner, lower=True, check_finite=False)
        except np.linalg.LinAlgError:  # pragma: no cover - I + FᵀD⁻¹F is always PD
            raise InvalidPosterior("factor is numerically degenerate", field="factor") from None

    def adopt(self, plan, scorer) -> None:
        """The search's scorer holds the Woodbury sums of ``plan``'s conditioning (it
        committed exactly the plan's B, to its targets): its alignment starts from them
        instead of reading F_B again."""
        if isinstance(scorer, LowRankScorer) and scorer.post is self:
            inner = 0.5 * (scorer.inner + scorer.inner.T)
            sums = (self._factor_inner(inner), scorer.w.copy(), scorer.dd)
            self._last = (weakref.ref(plan), sums)

    def condition(self, B, values, keep, structure) -> LowRankPosterior:
        return self._condition(B, values, keep, structure)

    def _condition(self, B, values, keep, structure, plan=None) -> LowRankPosterior:
        B = np.asarray(B, dtype=np.int64)
        keep = np.asarray(keep, dtype=np.int64)
        F_a = np.asarray(self.factor[keep])
        mean = self.mean[keep].copy()
        if B.size == 0:
            return LowRankPosterior(structure, mean, self.var[keep].copy(), F_a)
        L, w, _ = self._woodbury(B, values, plan)
        # C = (L Lᵀ)⁻¹ = L⁻ᵀ L⁻¹, so C w solves L Lᵀ x = w, and chol-like factor of C is L⁻ᵀ
        mean += F_a @ sla.cho_solve((L, True), w, check_finite=False)
        Linv_T = sla.solve_triangular(L, np.eye(self.rank), lower=True, check_finite=False).T
        return LowRankPosterior(structure, mean, self.var[keep].copy(), F_a @ Linv_T)

    def constraint_cost(self, B, values) -> float:
        return self._cost(B, values)

    def _cost(self, B, values, plan=None) -> float:
        B = np.asarray(B, dtype=np.int64)
        if B.size == 0:
            return 0.0
        L, w, dd = self._woodbury(B, values, plan)
        z = sla.solve_triangular(L, w, lower=True, check_finite=False)
        return v.difference_cost(dd, float(z @ z), B.size, "the plan")

    @classmethod
    def align_bytes_of(cls, structure, shapes, conditioned: int, kept: int) -> int:
        rank = shapes["factor"][1]
        return 8 * (2 * (conditioned + kept) * rank + 3 * kept)

    # -- small blocks -----------------------------------------------------------------------
    def cov_block(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        F = np.asarray(self.factor[idx])
        return np.diag(self.var[idx]) + F @ F.T

    def cov_cross(self, rows, cols) -> np.ndarray:
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        out = np.asarray(self.factor[rows]) @ np.asarray(self.factor[cols]).T
        out += diagonal_cross(self.var, rows, cols)
        return out

    def one_shot_work(self, conditioned: int, kept: int) -> float:
        return float((conditioned + kept) * self.rank**2)

    def scorer(self):
        """Woodbury on the k × k capacitance (:class:`LowRankScorer`); dense blocks while
        the posterior is small enough to be held dense (the same numbers either way)."""
        if self.n <= DENSE_PARAMS:
            return super().scorer()
        return LowRankScorer(self)

    def variance(self) -> np.ndarray:
        return self.var + np.einsum("pk,pk->p", self.factor, self.factor)

    def precision_diagonal(self) -> np.ndarray:
        # Woodbury: Σ⁻¹ = D⁻¹ − D⁻¹ F (I + Fᵀ D⁻¹ F)⁻¹ Fᵀ D⁻¹
        dinv = 1.0 / self.var
        G = self.factor * dinv[:, None]
        L = sla.cholesky(np.eye(self.rank) + self.factor.T @ G, lower=True, check_finite=False)
        X = sla.solve_triangular(L, G.T, lower=True, check_finite=False)
        return dinv - np.einsum("kp,kp->p", X, X)

    def dense_covariance(self) -> np.ndarray:
        return np.diag(self.var) + self.factor @ self.factor.T

    def group_costs(self, groups: np.ndarray) -> np.ndarray:
        """Batched Woodbury: ``½ (mᵀD⁻¹m − uᵀ(I + FᵀD⁻¹F)⁻¹u)``, ``u = FᵀD⁻¹m``."""
        m, d, F, DF = _stacked(self, groups)
        u = np.matmul(DF.transpose(0, 2, 1), m[..., None])  # Fᵀ D⁻¹ m, (n, k, 1)
        sol = np.linalg.solve(_inner(F, DF), u)
        return 0.5 * (np.sum(m * m / d, axis=1) - np.sum(u * sol, axis=(1, 2)))


class LowRankScorer:
    """Exact incremental conditioning of ``Σ = D + F Fᵀ`` by Woodbury (docs/theory.md §6, §7).

    Everything committed enters through three sums over B (D diagonal, so they
    add up group by group): the capacitance ``I + F_Bᵀ D_B⁻¹ F_B`` (k × k),
    ``w = F_Bᵀ D_B⁻¹ d_B`` and ``d_Bᵀ D_B⁻¹ d_B``; the cost is
    ``½ (dᵀD⁻¹d − wᵀ (I + FᵀD⁻¹F)⁻¹ w)``.  A candidate group g adds its own three
    terms, so all candidates are scored by one batched k × k solve each.
    """

    def __init__(self, posterior: LowRankPosterior) -> None:
        self.post = posterior
        k = posterior.rank
        self.inner, self.w, self.dd, self.cost = np.eye(k), np.zeros(k), 0.0, 0.0
        self.count = 0  # parameters committed

    def copy(self) -> LowRankScorer:
        out = LowRankScorer.__new__(LowRankScorer)
        out.post, out.dd, out.cost, out.count = self.post, self.dd, self.cost, self.count
        out.inner, out.w = self.inner.copy(), self.w.copy()
        return out

    independent = False

    def step_work(self, n: int, k: int) -> float:
        r = self.post.rank
        return n * (k * r * r + 10 * r**3)

    def terms(self, idx: np.ndarray, targets: np.ndarray):
        """(F_gᵀ D_g⁻¹ F_g, F_gᵀ D_g⁻¹ d_g, d_gᵀ D_g⁻¹ d_g) for rows of ``idx`` (n × k)."""
        F, dinv, DF = self.weighted(idx)
        M = np.matmul(np.swapaxes(DF, -1, -2), F)
        return M, *self.target_terms(idx, DF, dinv, targets)

    def weighted(self, idx: np.ndarray):
        """(F_g, D_g⁻¹, D_g⁻¹ F_g) for rows of ``idx``: what every term of a group reads."""
        F = np.asarray(self.post.factor[idx])  # (..., k, r)
        dinv = 1.0 / self.post.var[idx]
        return F, dinv, F * dinv[..., None]

    def target_terms(self, idx: np.ndarray, DF: np.ndarray, dinv: np.ndarray, targets):
        """The terms that depend on the targets, (F_gᵀ D_g⁻¹ d_g, d_gᵀ D_g⁻¹ d_g), from
        :meth:`weighted`'s ``DF`` and ``dinv``."""
        d = np.asarray(targets, dtype=np.float64) - self.post.mean[idx]
        return np.einsum("...kr,...k->...r", DF, d), np.einsum("...k,...k->...", d * dinv, d)

    def total(self, M, u, a, k: int = 1):
        """The cost with terms (M, u, a) of ``k`` more parameters added (batched over
        leading axes); inf where the difference is lost to cancellation (singular)."""
        return self._total(M, u, a, k)[0]

    def _total(self, M, u, a, k: int = 1):
        """(:meth:`total`, the Cholesky factors of ``inner + M``, whether they exist)."""
        inner, w = self.inner + M, self.w + u
        single = inner.ndim == 2
        L, pd, y = batched_cholesky_solve(*((inner[None], w[None]) if single else (inner, w)))
        whole = self.dd + a
        quad = whole - np.einsum("...r,...r->...", y, y).reshape(np.shape(a))
        ok = (pd.reshape(np.shape(a)) if single else pd) & ~(
            (whole > 0) & (quad <= 10 * (self.count + k) * np.finfo(float).eps * whole)
        )
        return np.where(ok, 0.5 * np.maximum(quad, 0.0), np.inf), L, pd

    def commit(self, idx: np.ndarray, targets: np.ndarray) -> None:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return
        self._add(*self.terms(idx, np.asarray(targets, dtype=np.float64)), idx.size)

    def _add(self, M: np.ndarray, u: np.ndarray, a: float, k: int) -> None:
        """Commit the terms of ``k`` parameters."""
        total = float(self.total(M, u, a, k))
        if not np.isfinite(total) or total < self.cost - 1e-9 * max(1.0, abs(self.cost)):
            raise SingularConstraint(
                "the conditioned parameters' covariance is numerically singular; this plan "
                "cannot be conditioned on",
                field="ops",
            )
        self.inner += M
        self.w += u
        self.dd += float(a)
        self.cost = total
        self.count += k

    def drops(self, groups) -> _LowRankDrops:
        return _LowRankDrops(self, indices(groups))

    def block(self, idx) -> _LowRankBlock:
        return _LowRankBlock(self, indices(idx))


class _LowRankDrops:
    #: :meth:`increments` scores a subset, and :meth:`bounds` bounds the rest (the MLP
    #: construction then factors only the candidates that could be taken)
    partial = True

    def __init__(self, sc: LowRankScorer, groups: np.ndarray) -> None:
        self.sc, self.groups = sc, groups
        self.M, self.u, self.a = sc.terms(groups, np.zeros(groups.shape))
        self.live = np.ones(len(groups), dtype=bool)
        #: with ``keep_factors``, each candidate's factor of ``inner + M_g`` at its last
        #: exact increment, for :meth:`bounds`
        self.keep_factors = False
        self._fac: np.ndarray | None = None
        self._fac_ok = np.zeros(len(groups), dtype=bool)

    def increments(self, which: np.ndarray | None = None) -> np.ndarray:
        """Exact increments of the live candidates (of those among ``which`` only, inf
        elsewhere)."""
        out = np.full(len(self.groups), np.inf)
        sel = self.live.copy()
        if which is not None:
            sel &= np.isin(np.arange(sel.size), which)
        if sel.any():
            k = self.groups.shape[1]
            tot, L, ok = self.sc._total(self.M[sel], self.u[sel], self.a[sel], k)
            out[sel] = tot - self.sc.cost
            if self.keep_factors:
                if self._fac is None:
                    self._fac = np.zeros((sel.size, *L.shape[1:]))
                self._fac[sel], self._fac_ok[sel] = L, ok
        return out

    def bounds(self) -> np.ndarray | None:
        """Lower bounds of the live candidates' increments (``None`` before any exact
        ones).  Commits only add to the capacitance (``inner_now ⪰ inner_then``), so
        ``(inner_then + M_g)⁻¹ ⪰ (inner_now + M_g)⁻¹``: the cost with the factor kept from
        the candidate's last exact increment and today's ``w`` and ``dd`` is at most
        today's, at ``O(r²)`` a candidate instead of ``O(r³)`` (docs/theory.md §7)."""
        if self._fac is None or not self.keep_factors:
            return None
        out = np.full(len(self.groups), np.inf)
        live = self.live
        out[live] = 0.0
        use = live & self._fac_ok
        if use.any():
            sc = self.sc
            y = solve_lower(self._fac[use], sc.w + self.u[use])
            quad = sc.dd + self.a[use] - np.einsum("nr,nr->n", y, y)
            out[use] = np.maximum(0.5 * quad - sc.cost, 0.0)
        return out

    def take(self, which) -> None:
        which = np.atleast_1d(which)
        if not self.live[which].all():
            raise ValueError("a candidate was taken already")
        M, u, a = self.M[which].sum(axis=0), self.u[which].sum(axis=0), float(self.a[which].sum())
        self.sc._add(M, u, a, which.size * self.groups.shape[1])
        self.live[which] = False


class _LowRankBlock:
    """``Q = (D_P + F_P C F_Pᵀ)⁻¹`` with ``C`` the inverse capacitance, by Woodbury."""

    def __init__(self, sc: LowRankScorer, idx: np.ndarray) -> None:
        self.sc, self.idx = sc, idx
        post = sc.post
        F, dinv, DF = sc.weighted(idx)
        Lin = np.linalg.cholesky(sc.inner)
        c = post.mean[idx] + F @ sla.cho_solve((Lin, True), sc.w, check_finite=False)
        self.M = F.T @ DF  # the block's own capacitance term, whatever its targets
        K = np.linalg.inv(sc.inner + self.M)  # (inner + FᵀD⁻¹F)⁻¹
        q = dinv - np.einsum("pr,pr->p", DF @ K, DF)
        Qc = dinv * c - DF @ (K @ (DF.T @ c))
        self.linear = 0.5 * q - Qc
        self.DF, self.dinv = DF, dinv

    def _terms(self, targets: np.ndarray):
        """:meth:`LowRankScorer.terms` of the block, from what scoring it read once."""
        return self.M, *self.sc.target_terms(self.idx, self.DF, self.dinv, targets)

    def cost(self, targets: np.ndarray) -> float:
        M, u, a = self._terms(targets)
        return float(self.sc.total(M, u, a, self.idx.size)) - self.sc.cost

    def commit(self, targets: np.ndarray) -> None:
        self.sc._add(*self._terms(targets), self.idx.size)
