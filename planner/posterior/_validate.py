"""Validation of posterior arrays at the edge (docs/theory.md §8): validate once, then trust."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping

import numpy as np
from scipy.linalg import lapack

from ..errors import InvalidPosterior, SingularConstraint
from ..linalg import cholesky_lower, pivots_ok

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


#: Says why a size is not the structure's (``Structure.size_hint``), for messages.
Explain = Callable[[int], str]


def _shape_problem(name: str, want: tuple, got: tuple, explain: Explain | None):
    why = f"must have shape {want}; got {got}"
    if explain is not None and got:
        why += f": {explain(got[0])}"
    return InvalidPosterior(why, field=name)


def vector(a: np.ndarray, name: str, n: int, explain: Explain | None = None) -> np.ndarray:
    v = as_float(a, name)
    if v.shape != (n,):
        raise _shape_problem(name, (n,), v.shape, explain)
    if not np.isfinite(v).all():
        raise InvalidPosterior("contains NaN or infinite values", field=name)
    return v


def positive_vector(a: np.ndarray, name: str, n: int, explain: Explain | None = None) -> np.ndarray:
    v = vector(a, name, n, explain)
    if n and v.min() <= 0:
        raise InvalidPosterior(
            f"variances must be > 0; entry {int(np.argmin(v))} is {v.min():g}", field=name
        )
    return v


def spd_matrix(
    a: np.ndarray,
    name: str,
    n: int,
    workspace: Workspace | None = None,
    explain: Explain | None = None,
    where: Callable[[int], str] | None = None,
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
        raise _shape_problem(name, (n, n), raw.shape, explain)
    where = where or (lambda i: f"index {i}")
    rtol = SYMMETRY_RTOL
    m = as_float(raw, name) if workspace is None else raw
    scale = 0.0
    rows = max(1, _ROW_BYTES // max(8 * n, 1))  # bounded temporaries, whatever n is
    for i in range(0, n, rows):
        blk = m[i : i + rows]
        if not np.isfinite(blk).all():
            raise InvalidPosterior("contains NaN or infinite values", field=name)
        scale = max(scale, float(blk.max(initial=0.0)), -float(blk.min(initial=0.0)))
    worst, at = 0.0, (0, 0)
    for i in range(0, n, _BLOCK):
        for j in range(i, n, _BLOCK):
            d = np.abs(m[i : i + _BLOCK, j : j + _BLOCK] - m[j : j + _BLOCK, i : i + _BLOCK].T)
            if d.size and float(d.max()) > worst:
                r, c = np.unravel_index(int(np.argmax(d)), d.shape)
                worst, at = float(d[r, c]), (i + int(r), j + int(c))
    report = _REPORT.get()
    if report is not None:
        report[name] = worst / scale if scale > 0 else 0.0
    if worst > rtol * scale:
        r, c = at
        raise InvalidPosterior(
            f"is not symmetric: max |A - Aᵀ| = {worst:.3g}, at [{r}, {c}] ({where(r)} against "
            f"{where(c)}), exceeds {rtol:g} × max |A| = {rtol * scale:.3g}. Rows and columns "
            "must follow the same parameter order (parameters_to_vector); if the asymmetry is "
            "rounding, send (A + Aᵀ) / 2",
            field=name,
        )
    if workspace is None:
        if worst > 0:
            if m is raw:  # never symmetrise the caller's array in place
                m = np.array(m)
            m += m.T
            m *= 0.5
        chol, info = lapack.dpotrf(m, lower=1, clean=1, overwrite_a=0)
        if info != 0:
            raise _indefinite(name, info, where)
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
        _, info = lapack.dpotrf(scratch.T, lower=1, clean=0, overwrite_a=1)
    finally:
        del scratch
    if info != 0:
        raise _indefinite(name, info, where)
    return m, None


def _indefinite(name: str, info: int, where: Callable[[int], str]) -> InvalidPosterior:
    """Where a Cholesky factorisation stopped (LAPACK's ``info``), and what to do."""
    if info < 0:  # an argument LAPACK refused: not the matrix's fault
        return InvalidPosterior(f"could not be factorised (LAPACK info {info})", field=name)
    k = info - 1
    return InvalidPosterior(
        f"is not positive definite: its leading {info} × {info} block is not (the "
        f"factorisation fails at [{k}, {k}], {where(k)}). A Laplace posterior needs a positive "
        "prior precision (add δ·I to a GGN or Hessian: laplace-torch's prior_precision); a "
        "sample covariance with fewer samples than parameters needs the diagonal or lowrank "
        "format",
        field=name,
    )


def cholesky_constraint(S_BB: np.ndarray, backend=None) -> np.ndarray:
    """Lower Cholesky factor of Σ_BB, refusing a numerically singular block (docs/theory.md §8);
    factorised by ``backend`` (a :class:`planner.backend.Backend`) when one is given."""
    k = S_BB.shape[0]
    if k == 0:
        return np.zeros((0, 0))
    if backend is None:
        L = cholesky_lower(S_BB)
    else:
        try:
            L = backend.cholesky(S_BB)
        except np.linalg.LinAlgError:
            L = None
    check_constraint_factor(L, S_BB)
    return L


def check_constraint_factor(L: np.ndarray | None, S_BB: np.ndarray) -> None:
    """Refuse a plan whose Σ_BB had no Cholesky factor (``L`` None) or a numerically
    singular one (docs/theory.md §8)."""
    if L is None:
        raise SingularConstraint(
            "the covariance of the conditioned parameters Σ_BB is singular; "
            "this plan cannot be conditioned on",
            field="ops",
        )
    if S_BB.shape[0] and not pivots_ok(L, S_BB):
        piv = np.diag(L) ** 2
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
