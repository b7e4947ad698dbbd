"""The small pieces of dense linear algebra the formats share (docs/theory.md §8).

* :func:`inverse_diagonal`: the diagonal of ``(L Lᵀ)⁻¹`` from a Cholesky factor, by
  one triangular inversion (the precision's diagonal of a covariance, a precision's
  variances, a Kronecker factor's);
* :func:`pivots_ok`: the one numerical positive-definiteness rule: a factor's smallest
  squared pivot must exceed ``k ε`` times the largest diagonal entry of its matrix,
  else the matrix is numerically singular (a plan's ``Σ_BB``, a Kronecker block,
  a batch of candidate blocks);
* :func:`symmetrise`: ``(A + Aᵀ) / 2``, the symmetric part every matrix is read as;
* :func:`cholesky_lower` and :func:`lower_solve`: a Cholesky factor and ``L⁻¹ b``
  through LAPACK and BLAS directly: a greedy step factorises and solves blocks of
  ten entries, where scipy's checking wrappers cost several times the arithmetic
  (7–8 µs a call against 1 µs).

Examples
--------
>>> import numpy as np
>>> L = np.linalg.cholesky(np.array([[4.0, 2.0], [2.0, 3.0]]))
>>> inverse_diagonal(L).round(4)
array([0.375, 0.5  ])
>>> bool(pivots_ok(L, np.array([[4.0, 2.0], [2.0, 3.0]])))
True
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas, lapack

__all__ = [
    "cholesky_lower",
    "gram_downdate",
    "inverse_diagonal",
    "lower_solve",
    "pivots_ok",
    "symmetrise",
]

EPS = np.finfo(float).eps


def inverse_diagonal(L: np.ndarray) -> np.ndarray:
    """The diagonal of ``(L Lᵀ)⁻¹`` for a lower Cholesky factor ``L``: the column sums of
    squares of ``L⁻¹`` (one ``trtri``)."""
    if L.shape[0] == 0:
        return np.zeros(0)
    Li, info = lapack.dtrtri(L, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the factor is singular at pivot {info}")
    return np.einsum("ij,ij->j", Li, Li)


def pivots_ok(L: np.ndarray, S: np.ndarray) -> np.ndarray | np.bool_:
    """Whether the Cholesky factor ``L`` of ``S`` (or a batch: ``(..., k, k)``) is
    numerically positive definite: every squared pivot above ``k ε max|diag S|``."""
    k = S.shape[-1]
    if k == 0:
        return np.ones(S.shape[:-2], dtype=bool) if S.ndim > 2 else np.True_
    d = np.diagonal(L, axis1=-2, axis2=-1) ** 2
    scale = np.abs(np.diagonal(S, axis1=-2, axis2=-1)).max(axis=-1)
    return d.min(axis=-1) > k * EPS * scale


def gram_downdate(S: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``S − XᵀX`` for a symmetric ``S``, written over ``S`` when it is C-ordered (one
    ``gemm`` on its memory, read as the Fortran-ordered ``Sᵀ = S``): no product held
    beside it, and no second pass to subtract it (a 1,000² block less a rank-40 term:
    0.84 ms against 2.0 ms for ``S -= X.T @ X``)."""
    if X.shape[0] == 0:
        return S
    return blas.dgemm(-1.0, X, X, 1.0, S.T, trans_a=1, overwrite_c=1).T


def symmetrise(A: np.ndarray) -> np.ndarray:
    """``(A + Aᵀ) / 2`` as a new array."""
    return 0.5 * (A + A.T)


def cholesky_lower(S: np.ndarray) -> np.ndarray | None:
    """The lower Cholesky factor of ``S`` (LAPACK ``potrf``, as ``scipy.linalg.cholesky``
    calls it), or None when ``S`` is not positive definite.  ``S`` is not changed."""
    L, info = lapack.dpotrf(S, lower=1, clean=1, overwrite_a=0)
    if info < 0:  # pragma: no cover - an argument LAPACK refuses is a bug here
        raise ValueError(f"potrf refused its argument {-info}")
    return L if info == 0 else None


def lower_solve(L: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``L⁻¹ b`` for a lower-triangular ``L`` (k × k, nonsingular: a Cholesky factor) and
    ``b`` of shape (k,) or (k, n); a C-ordered ``b`` gives a C-ordered answer without
    copies (``trsm`` from the right on ``bᵀ``)."""
    if b.ndim == 1:
        x, info = (
            lapack.dtrtrs(L.T, b, lower=0, trans=1)
            if L.flags.c_contiguous
            else lapack.dtrtrs(L, b, lower=1)
        )
        if info != 0:
            raise np.linalg.LinAlgError(f"singular triangular factor at pivot {info}")
        return x
    if L.flags.c_contiguous:  # Lᵀ is Fortran-ordered: X Lᵀ = bᵀ with A = Lᵀ (upper)
        X = blas.dtrsm(1.0, L.T, b.T, side=1, lower=0, trans_a=0)
    else:
        X = blas.dtrsm(1.0, L, b.T, side=1, lower=1, trans_a=1)
    return X.T
