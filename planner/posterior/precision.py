"""The ``precision`` format: mean and precision ``Λ = Σ⁻¹`` (SPEC §7), the Laplace
approximation's native form.

With ``B`` conditioned, ``a`` kept and ``M`` marginalised, let ``r = M ∪ a``,
ordered M first.  One Cholesky ``Λ_rr = L Lᵀ`` gives everything:

* the conditional mean ``μ_r = m_r − Λ_rr⁻¹ Λ_rB (v − m_B)``;
* the marginal precision of ``a``: the Schur complement of ``Λ_rr`` on ``M``,
  which is ``L_aa L_aaᵀ`` (the trailing block of the same factor);
* the cost ``½ (dᵀ Λ_BB d − yᵀ Λ_rr⁻¹ y)``, ``y = Λ_rB d``.

So a plan with a large ``B`` and a small ``a ∪ M`` costs ``O(|a ∪ M|³)``,
however large ``B`` is.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.linalg as sla

from ..errors import InvalidPosterior
from ._dense import DensePosterior

__all__ = ["PrecisionPosterior"]


class PrecisionPosterior(DensePosterior):
    """``N(mean, precision⁻¹)``."""

    format = "precision"
    array_names = ("precision",)

    @property
    def precision(self) -> np.ndarray:
        return self.matrix

    def _rest(self, B: np.ndarray, keep: np.ndarray | None = None):
        """(M, keep) with M every coordinate in neither B nor keep."""
        mask = np.ones(self.n, dtype=bool)
        mask[B] = False
        if keep is not None:
            mask[keep] = False
        M = np.flatnonzero(mask)
        return M, (np.zeros(0, np.int64) if keep is None else keep)

    def _factor(self, r: np.ndarray) -> np.ndarray:
        try:
            return sla.cholesky(self.precision[np.ix_(r, r)], lower=True, check_finite=False)
        except np.linalg.LinAlgError:  # pragma: no cover - a principal block of a PD matrix
            raise InvalidPosterior("is not positive definite", field="precision") from None

    def condition(self, B, values, keep, structure) -> PrecisionPosterior:
        B = np.asarray(B, dtype=np.int64)
        keep = np.asarray(keep, dtype=np.int64)
        M, _ = self._rest(B, keep)
        r = np.concatenate([M, keep])
        L = self._factor(r)
        mu = self.mean[r].copy()
        if B.size:
            y = self.precision[np.ix_(r, B)] @ (values - self.mean[B])
            mu -= sla.cho_solve((L, True), y, check_finite=False)
        La = L[M.size :, M.size :]
        prec = La @ La.T
        prec += prec.T
        prec *= 0.5
        return PrecisionPosterior(structure, mu[M.size :], prec, La.copy())

    def constraint_cost(self, B, values) -> float:
        B = np.asarray(B, dtype=np.int64)
        if B.size == 0:
            return 0.0
        d = values - self.mean[B]
        r, _ = self._rest(B)
        quad = float(d @ (self.precision[np.ix_(B, B)] @ d))
        if r.size:
            L = self._factor(r)
            z = sla.solve_triangular(
                L, self.precision[np.ix_(r, B)] @ d, lower=True, check_finite=False
            )
            quad -= float(z @ z)
        return 0.5 * quad

    def align_bytes(self, conditioned: int, kept: int) -> int:
        rest = self.n - conditioned
        return 8 * (3 * rest**2 + rest * conditioned)

    # -- small blocks: Σ[idx, idx] = XᵀX with X = L⁻¹ E_idx, never Σ whole --------------------
    def _cols(self, idx: np.ndarray) -> np.ndarray:
        E = np.zeros((self.n, idx.size))
        E[idx, np.arange(idx.size)] = 1.0
        return sla.solve_triangular(self._chol, E, lower=True, check_finite=False)

    def cov_block(self, idx) -> np.ndarray:
        X = self._cols(np.asarray(idx, dtype=np.int64))
        return X.T @ X

    def _group_blocks(self, groups: np.ndarray):
        """Σ blocks (n, g, g) and means (n, g) of each row of ``groups``, in one solve."""
        uniq, inv = np.unique(groups, return_inverse=True)
        X = self._cols(uniq)
        S = X.T @ X
        inv = inv.reshape(groups.shape)
        return S[inv[:, :, None], inv[:, None, :]], self.mean[groups]

    def group_costs(self, groups: np.ndarray) -> np.ndarray:
        S, m = self._group_blocks(groups)
        return 0.5 * np.einsum("nk,nk->n", m, np.linalg.solve(S, m[..., None])[..., 0])

    def assignment_costs(self, rows: np.ndarray) -> np.ndarray:
        S, m = self._group_blocks(rows)
        P = np.linalg.inv(S)
        Pm = np.einsum("nkl,nl->nk", P, m)
        quad = np.einsum("nk,nk->n", m, Pm)
        return 0.5 * (quad[:, None] - 2 * Pm + np.diagonal(P, axis1=1, axis2=2))

    @cached_property
    def _variance(self) -> np.ndarray:
        Linv = sla.solve_triangular(self._chol, np.eye(self.n), lower=True, check_finite=False)
        return np.einsum("ij,ij->j", Linv, Linv)

    def variance(self) -> np.ndarray:
        return self._variance

    def precision_diagonal(self) -> np.ndarray:
        return np.diag(self.precision).copy()

    def surrogate(self):
        """Conditional variances ``1 / Λ_ii``: no inverse of Λ for a mere proxy."""
        from .diag import DiagPosterior

        return DiagPosterior(self.structure, self.mean, 1.0 / self.precision_diagonal())

    def dense_covariance(self) -> np.ndarray:
        return sla.cho_solve((self._chol, True), np.eye(self.n), check_finite=False)
