"""The ``full`` format: mean and dense covariance (docs/theory.md §3, §7, §8)."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from ..backend import current
from ..linalg import inverse_diagonal
from ..structure import Structure
from . import _validate as v
from ._dense import DensePosterior, HeldCovariance, gather

__all__ = ["FullPosterior"]


class FullPosterior(DensePosterior):
    """``N(mean, covariance)`` with a dense covariance.

    Conditioning is one Cholesky of Σ_BB, one triangular solve against Σ_Ba and
    one product for the kept block (docs/theory.md §8): never k copies of Σ.
    """

    format = "full"
    array_names = ("covariance",)

    @property
    def covariance(self) -> np.ndarray:
        return self.matrix

    @classmethod
    def from_dense(cls, structure: Structure, mean: np.ndarray, covariance: np.ndarray):
        """Validated construction from a mean and a covariance."""
        return cls.from_arrays(structure, {"mean": mean, "covariance": covariance})

    def condition(self, B, values, keep, structure) -> FullPosterior:
        S, m = self.covariance, self.mean
        B = np.asarray(B, dtype=np.int64)
        keep = np.asarray(keep, dtype=np.int64)
        m_keep = m[keep]
        S_keep = gather(S, keep, keep)
        if B.size:  # one joint conditioning, on the backend in force (planner.backend)
            S_BB = gather(S, B, B)
            try:
                L, shift, S_keep = current().condition(
                    S_BB, gather(S, B, keep), S_keep, values - m[B]
                )
            except np.linalg.LinAlgError:
                L = None
            v.check_constraint_factor(L, S_BB)
            m_keep += shift
        return FullPosterior(structure, m_keep, S_keep)

    def constraint_cost(self, B, values) -> float:
        return self._covariance_cost(np.asarray(B, dtype=np.int64), values)

    def _blocks(self, groups: np.ndarray):
        """Yield (slice, Σ blocks (n × k × k), means (n × k)) in memory-bounded chunks."""
        n, k = groups.shape
        step = max(1, (1 << 22) // max(1, k * k))
        for a in range(0, n, step):
            g = groups[a : a + step]
            yield slice(a, a + step), self.cov_blocks(g, g), self.mean[g]

    def group_costs(self, groups: np.ndarray) -> np.ndarray:
        out = np.empty(len(groups))
        if groups.shape[1] == 0:
            out[:] = 0.0
            return out
        for sl, S, m in self._blocks(groups):
            out[sl] = 0.5 * np.einsum("nk,nk->n", m, np.linalg.solve(S, m[..., None])[..., 0])
        return out

    def cov_block(self, idx) -> np.ndarray:
        return gather(self.covariance, idx, idx)

    def cov_cross(self, rows, cols) -> np.ndarray:
        return gather(self.covariance, rows, cols)

    def cov_blocks(self, rows, cols) -> np.ndarray:
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        return self.covariance[rows[:, :, None], cols[:, None, :]]

    def covariance_over(self, idx) -> HeldCovariance:
        return HeldCovariance(self.covariance)

    def variance(self) -> np.ndarray:
        return np.diag(self.covariance).copy()

    @cached_property
    def _precision_diagonal(self) -> np.ndarray:
        return inverse_diagonal(self._chol)  # diag(Σ⁻¹), with Σ = L Lᵀ

    def precision_diagonal(self) -> np.ndarray:
        return self._precision_diagonal

    def dense_covariance(self) -> np.ndarray:
        return self.covariance
