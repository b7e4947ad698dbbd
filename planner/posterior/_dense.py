"""Formats held by one dense SPD matrix (``full``: Σ, ``precision``: Λ)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import numpy as np
import scipy.linalg as sla

from ..structure import Structure
from . import _validate as v
from .base import Posterior


def _runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end positions (in ``idx``) of its runs of consecutive values."""
    br = np.flatnonzero(np.diff(idx) != 1) + 1
    return np.r_[0, br], np.r_[br, idx.size]


#: Gather by blocks while there are at most this many of them, else by fancy indexing.
_MAX_BLOCKS = 8192
#: ... and while they average at least this many entries (a loop step costs about as
#: much as fancy indexing this many).
_MIN_BLOCK = 256


def gather(A: np.ndarray, rows: np.ndarray, cols: np.ndarray, copy: bool = True) -> np.ndarray:
    """``A[np.ix_(rows, cols)]``, copied run by run when the indices come in long runs of
    consecutive values (rows and columns of layers do): several times faster.  With
    ``copy=False`` a single run of each is returned as a view (read-only use)."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    rs, re = _runs(rows)
    cs, ce = _runs(cols)
    if not copy and rs.size == 1 and cs.size == 1 and rows.size and cols.size:
        return A[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    blocks = rs.size * cs.size
    if blocks > _MAX_BLOCKS or blocks * _MIN_BLOCK > rows.size * cols.size:
        return A[np.ix_(rows, cols)]
    out = np.empty((rows.size, cols.size), dtype=A.dtype)
    for a0, a1 in zip(rs, re, strict=True):
        band = A[rows[a0] : rows[a1 - 1] + 1]
        for b0, b1 in zip(cs, ce, strict=True):
            out[a0:a1, b0:b1] = band[:, cols[b0] : cols[b1 - 1] + 1]
    return out


#: Blocks up to which :meth:`HeldCovariance.blocks` gathers them one by one.
_FEW_BLOCKS = 8


class HeldCovariance:
    """Σ over a set of parameters, for a scorer stage that reads rows and blocks of it
    many times (:meth:`~planner.posterior.base.Posterior.covariance_over`): held densely
    in ``A``, over the parameters ``idx`` (ascending), or every parameter from ``first``
    on (``idx`` None: a format's own matrix, read in place)."""

    def __init__(self, A: np.ndarray, idx: np.ndarray | None = None, first: int = 0) -> None:
        self.A, self.idx, self.first = A, idx, first
        self._cols: np.ndarray | None = None  # the last columns asked for, and where they are
        self._at_cols: np.ndarray | slice = slice(0)

    def _at(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return ids - self.first if self.idx is None else np.searchsorted(self.idx, ids)

    def cross(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``Σ[rows][:, cols]`` (parameter indices in the set).  A stage reads its rows
        against the same columns again and again: where the last ones lie is kept."""
        if cols is not self._cols:
            c = self._at(cols)
            one_run = c.size and c[-1] - c[0] + 1 == c.size
            self._cols, self._at_cols = cols, slice(c[0], c[-1] + 1) if one_run else c
        r, c = self._at(rows), self._at_cols
        return self.A[r, c] if isinstance(c, slice) else self.A[np.ix_(r, c)]

    def blocks(self, groups: np.ndarray) -> np.ndarray:
        """``Σ`` over each row of ``groups`` (``n × k`` parameter indices): ``n × k × k``;
        a few large blocks run by run (:func:`gather`: a ψ block's rows are runs)."""
        g = self._at(groups)
        if g.size and g.shape[0] <= _FEW_BLOCKS:
            return np.stack([gather(self.A, r, r) for r in g])
        return self.A[g[:, :, None], g[:, None, :]]


class DensePosterior(Posterior):
    """A Gaussian held by one dense SPD matrix, named ``array_names[0]``: validated once
    (docs/theory.md §8), its lower Cholesky factor computed at most once."""

    def __init__(
        self,
        structure: Structure,
        mean: np.ndarray,
        matrix: np.ndarray,
        _chol: np.ndarray | None = None,
    ) -> None:
        super().__init__(structure, mean)
        self.matrix = matrix
        if _chol is not None:
            self.__dict__["_chol"] = _chol

    @classmethod
    def from_arrays(
        cls,
        structure: Structure,
        arrays: Mapping[str, np.ndarray],
        workspace: v.Workspace | None = None,
    ):
        name = cls.array_names[0]
        v.require(arrays, ("mean", name), cls.format)
        p = structure.n_params
        mean = v.vector(arrays["mean"], "mean", p, structure.size_hint)
        matrix, chol = v.spd_matrix(
            arrays[name], name, p, workspace, structure.size_hint, structure.where
        )
        return cls(structure, mean, matrix, chol)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, self.array_names[0]: self.matrix}

    @classmethod
    def from_validated(cls, structure: Structure, arrays: Mapping[str, np.ndarray]):
        """Trusted construction; a stored ``cholesky`` (see ``derived_names``) is reused."""
        return cls(structure, arrays["mean"], arrays[cls.array_names[0]], arrays.get("cholesky"))

    @cached_property
    def _chol(self) -> np.ndarray:
        return sla.cholesky(self.matrix, lower=True, check_finite=False)

    def _covariance_cost(self, B: np.ndarray, values: np.ndarray) -> float:
        """``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)`` by a Cholesky factor of ``Σ_BB``
        (:meth:`cov_cross`), refusing a numerically singular block."""
        if B.size == 0:
            return 0.0
        L = v.cholesky_constraint(self.cov_cross(B, B))
        alpha = sla.solve_triangular(L, values - self.mean[B], lower=True, check_finite=False)
        return 0.5 * float(alpha @ alpha)
