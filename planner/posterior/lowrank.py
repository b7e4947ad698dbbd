"""The ``lowrank`` format: ``Σ = diag(variance) + F Fᵀ`` (SPEC §7; SWAG's form).

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

from ..errors import InvalidPosterior
from ..structure import Structure
from . import _validate as v
from .base import Posterior

__all__ = ["LowRankPosterior"]


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
        mean = v.vector(arrays["mean"], "mean", p)
        var = v.positive_vector(arrays["variance"], "variance", p)
        F = v.as_float(arrays["factor"], "factor")
        if F.ndim != 2 or F.shape[0] != p or F.shape[1] < 1:
            raise InvalidPosterior(
                f"must have shape ({p}, k) with k >= 1; got {F.shape}", field="factor"
            )
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
        """(C's Cholesky factor, w = F_Bᵀ D_B⁻¹ d, dᵀ D_B⁻¹ d) for the block B."""
        F_B = np.asarray(self.factor[B])
        dinv = 1.0 / self.var[B]
        d = values - self.mean[B]
        inner = np.eye(self.rank) + (F_B.T * dinv) @ F_B
        try:
            L = sla.cholesky(inner, lower=True, check_finite=False)
        except np.linalg.LinAlgError:  # pragma: no cover - I + FᵀD⁻¹F is always PD
            raise InvalidPosterior("factor is numerically degenerate", field="factor") from None
        return L, F_B.T @ (dinv * d), float(d @ (dinv * d))

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
        return 0.5 * (dd - float(z @ z))

    def align_bytes(self, conditioned: int, kept: int) -> int:
        return 8 * (2 * (conditioned + kept) * self.rank + 3 * kept)

    # -- small blocks -----------------------------------------------------------------------
    def cov_block(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        F = np.asarray(self.factor[idx])
        return np.diag(self.var[idx]) + F @ F.T

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

    def assignment_costs(self, rows: np.ndarray) -> np.ndarray:
        """Batched Woodbury for ``½ (e_l − m)ᵀ Σ_r⁻¹ (e_l − m)`` over each row ``r``."""
        m, d, F, DF = _stacked(self, rows)
        Minv = np.linalg.inv(_inner(F, DF))  # (n, k, k)
        # P m = D⁻¹ m − D⁻¹F M Fᵀ D⁻¹ m ; diag P = D⁻¹ − rowsum((D⁻¹F M) ⊙ D⁻¹F)
        X = np.matmul(DF, Minv)  # (n, g, k)
        u = np.matmul(DF.transpose(0, 2, 1), m[..., None])  # (n, k, 1)
        Pm = m / d - np.matmul(X, u)[..., 0]
        diagP = 1.0 / d - np.sum(X * DF, axis=2)
        quad = np.sum(m * Pm, axis=1)
        return 0.5 * (quad[:, None] - 2.0 * Pm + diagP)
