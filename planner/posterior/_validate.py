"""Validation of posterior arrays at the edge (docs/theory.md §8): validate once, then trust."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import scipy.linalg as sla

from ..errors import InvalidPosterior, SingularConstraint

#: Relative symmetry tolerance, whatever the dtype (docs/theory.md §8): a float32 matrix upcast to
#: float64 by its client (laplace-torch's GGN, say) is asymmetric at ~1e-8 and accepted.
SYMMETRY_RTOL = 1e-5
_REPORT: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "asymmetry", default=None
)
_BLOCK = 1024
_ROW_BYTES = 1 << 24
#: Gives writable float64 arrays of a shape (the caller decides where they live).
Workspace = Callable[[tuple[int, ...]], np.ndarray]


@contextlib.contextmanager
def asymmetry_report() -> Iterator[dict[str, float]]:
    """Collect, per matrix validated inside the block, its measured relative asymmetry
    ``max|A − Aᵀ| / max|A|`` (before symmetrisation), to keep in the teacher's metadata."""
    report: dict[str, float] = {}
    token = _REPORT.set(report)
    try:
        yield report
    finally:
        _REPORT.reset(token)


def require(arrays: Mapping[str, np.ndarray], names: tuple[str, ...], fmt: str) -> None:
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InvalidPosterior(
            f"format {fmt!r} needs arrays {list(names)}; missing {missing}", field=missing[0]
        )


def as_float(a: np.ndarray, name: str) -> np.ndarray:
    """The array as float64 (no copy when it already is), refusing non-numeric dtypes."""
    a = np.asarray(a)
    if a.dtype.kind not in "fiu" or (a.dtype.kind == "f" and a.dtype.itemsize < 4):
        raise InvalidPosterior(
            f"must be a float32 or float64 array; got dtype {a.dtype}", field=name
        )
    return a if a.dtype == np.float64 else a.astype(np.float64)


def vector(a: np.ndarray, name: str, n: int) -> np.ndarray:
    v = as_float(a, name)
    if v.shape != (n,):
        raise InvalidPosterior(f"must have shape ({n},); got {v.shape}", field=name)
    if not np.isfinite(v).all():
        raise InvalidPosterior("contains NaN or infinite values", field=name)
    return v


def positive_vector(a: np.ndarray, name: str, n: int) -> np.ndarray:
    v = vector(a, name, n)
    if n and v.min() <= 0:
        raise InvalidPosterior(
            f"variances must be > 0; entry {int(np.argmin(v))} is {v.min():g}", field=name
        )
    return v


def spd_matrix(
    a: np.ndarray, name: str, n: int, workspace: Workspace | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Check a covariance or precision: finite, symmetric (docs/theory.md §8 tolerance), PD.

    Returns the float64 matrix, symmetrised, and its lower Cholesky factor.
    The checks read the matrix in blocks.  With ``workspace`` (a callable
    giving writable ``(n, n)`` arrays, e.g. disk-backed memory maps) the
    symmetrised copy and the factorisation live there instead of in memory,
    and no factor is returned.
    """
    raw = np.asarray(a)
    if raw.shape != (n, n):
        raise InvalidPosterior(f"must have shape ({n}, {n}); got {raw.shape}", field=name)
    rtol = SYMMETRY_RTOL
    m = as_float(raw, name) if workspace is None else raw
    scale = 0.0
    rows = max(1, _ROW_BYTES // max(8 * n, 1))  # bounded temporaries, whatever n is
    for i in range(0, n, rows):
        blk = m[i : i + rows]
        if not np.isfinite(blk).all():
            raise InvalidPosterior("contains NaN or infinite values", field=name)
        scale = max(scale, float(blk.max(initial=0.0)), -float(blk.min(initial=0.0)))
    worst = 0.0
    for i in range(0, n, _BLOCK):
        for j in range(i, n, _BLOCK):
            d = m[i : i + _BLOCK, j : j + _BLOCK] - m[j : j + _BLOCK, i : i + _BLOCK].T
            worst = max(worst, float(np.abs(d).max(initial=0.0)))
    report = _REPORT.get()
    if report is not None:
        report[name] = worst / scale if scale > 0 else 0.0
    if worst > rtol * scale:
        raise InvalidPosterior(
            f"is not symmetric: max |A - Aᵀ| = {worst:.3g} exceeds {rtol:g} × max |A| = "
            f"{rtol * scale:.3g}",
            field=name,
        )
    if workspace is None:
        if worst > 0:
            if m is raw:  # never symmetrise the caller's array in place
                m = np.array(m)
            m += m.T
            m *= 0.5
        try:
            chol = sla.cholesky(m, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            raise InvalidPosterior(
                "is not positive definite (Cholesky failed)", field=name
            ) from None
        return m, chol
    if worst > 0 or m.dtype != np.float64:
        out = workspace((n, n))
        for i in range(0, n, rows):
            out[i : i + rows] = m[i : i + rows]
            out[i : i + rows] += m[:, i : i + rows].T
            out[i : i + rows] *= 0.5
        m = out
    scratch = workspace((n, n))
    for i in range(0, n, rows):
        scratch[i : i + rows] = m[i : i + rows]
    try:  # in place: the transpose of a C-ordered symmetric matrix is itself, F-ordered
        sla.cholesky(scratch.T, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise InvalidPosterior("is not positive definite (Cholesky failed)", field=name) from None
    finally:
        del scratch
    return m, None


def cholesky_constraint(S_BB: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of Σ_BB, refusing a numerically singular block (docs/theory.md §8)."""
    k = S_BB.shape[0]
    if k == 0:
        return np.zeros((0, 0))
    try:
        L = sla.cholesky(S_BB, lower=True, check_finite=False, overwrite_a=False)
    except np.linalg.LinAlgError:
        raise SingularConstraint(
            "the covariance of the conditioned parameters Σ_BB is singular; "
            "this plan cannot be conditioned on",
            field="ops",
        ) from None
    piv = np.diag(L) ** 2
    if piv.min() <= k * np.finfo(float).eps * np.diag(S_BB).max():
        raise SingularConstraint(
            f"the covariance of the conditioned parameters Σ_BB is numerically singular "
            f"(smallest Cholesky pivot {piv.min():.3g}); this plan cannot be conditioned on",
            field="ops",
        )
    return L


def difference_cost(whole: float, part: float, k: int, what: str) -> float:
    """``½ (whole − part)``, a cost computed as a difference of quadratic forms (the
    precision and Woodbury formulas) over ``k`` conditioned parameters.  When the
    difference is within rounding of ``whole`` (``10 k ε whole``, the scale at which the
    dense formula refuses a Cholesky pivot), every significant digit is lost: the
    conditioned parameters' covariance is numerically singular (docs/theory.md §8)."""
    quad = whole - part
    if whole > 0 and quad <= 10 * k * np.finfo(float).eps * whole:
        raise SingularConstraint(
            f"the cost of {what} is lost to cancellation ({quad:.3g} of {whole:.3g}): the "
            "conditioned parameters' covariance is numerically singular; this plan cannot "
            "be conditioned on",
            field="ops",
        )
    return 0.5 * max(quad, 0.0)
