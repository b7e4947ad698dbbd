"""Converters from what posterior libraries hold to this service's formats (numpy only).

* :func:`from_swag`: SWAG's running moments and deviation rows → ``lowrank``.
* :func:`from_laplace_kron`: laplace-torch's per-layer Kronecker factors of the
  Hessian with a prior precision → ``kron``.

Both return a dict of arrays to pass to :meth:`PlannerClient.upload_teacher`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["from_laplace_kron", "from_swag", "spd_inverse"]


def from_swag(
    mean: np.ndarray,
    sq_mean: np.ndarray,
    deviations: np.ndarray,
    scale: float = 1.0,
    min_variance: float = 1e-30,
) -> dict[str, np.ndarray]:
    """SWAG (Maddox et al., 2019) as a ``lowrank`` posterior.

    SWAG samples ``θ = θ̄ + √scale (Σ_diag^½ z₁ / √2 + Dᵀ z₂ / √(2(K − 1)))`` with
    ``Σ_diag = diag(sq_mean − mean²)`` and ``D`` the ``K`` deviation rows
    ``(K, p)``; so its covariance is
    ``scale · (½ Σ_diag + Dᵀ D / (2 (K − 1)))``: ``variance`` is the first
    term (clamped at ``min_variance``), ``factor = √(scale / (2 (K − 1))) · Dᵀ``.
    """
    mean = np.asarray(mean, dtype=np.float64)
    D = np.asarray(deviations, dtype=np.float64)
    if D.ndim != 2 or D.shape[1] != mean.shape[0] or D.shape[0] < 2:
        raise ValueError(f"deviations must be (K >= 2, {mean.shape[0]}); got {D.shape}")
    var = np.maximum(np.asarray(sq_mean, dtype=np.float64) - mean**2, min_variance)
    K = D.shape[0]
    return {
        "mean": mean,
        "variance": 0.5 * scale * var,
        "factor": np.ascontiguousarray(D.T) * np.sqrt(scale / (2.0 * (K - 1))),
    }


def spd_inverse(A: np.ndarray, what: str = "the matrix") -> np.ndarray:
    """The inverse of a symmetric positive definite matrix, by Cholesky, symmetric in
    float64; a ``ValueError`` naming ``what`` when it is not positive definite."""
    import scipy.linalg as sla

    A = np.asarray(A, dtype=np.float64)
    try:
        c = sla.cho_factor(0.5 * (A + A.T), lower=True)
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"{what} is not positive definite") from exc
    out = sla.cho_solve(c, np.eye(len(A)))
    return np.ascontiguousarray(0.5 * (out + out.T))


def _damped_inverse(H: np.ndarray, damping: float) -> np.ndarray:
    H = np.asarray(H, dtype=np.float64)
    return spd_inverse(H + damping * np.eye(H.shape[0]), "a damped Kronecker factor")


def from_laplace_kron(
    widths: Sequence[int],
    mean: np.ndarray,
    factors: Sequence[Sequence[np.ndarray]],
    prior_precision: float,
    bias: bool = False,
) -> dict[str, np.ndarray]:
    """laplace-torch's K-FAC Laplace (``KronDecomposed``/``Kron`` ``kfacs``) as ``kron``.

    ``factors`` lists, in ``model.parameters()`` order, one entry per parameter:
    ``[B, A]`` (``out × out``, ``in × in``) for a weight, ``[B]`` for a bias.
    With prior precision ``δ`` the weight covariance is, in row-major order,
    ``(B + √δ I)⁻¹ ⊗ (A + √δ I)⁻¹`` and the bias covariance ``(B + δ I)⁻¹``.
    """
    T = len(widths)
    expected = (T - 1) * (2 if bias else 1)
    if len(factors) != expected:
        raise ValueError(
            f"expected {expected} factor entries for {T - 1} layers; got {len(factors)}"
        )
    out: dict[str, np.ndarray] = {"mean": np.asarray(mean, dtype=np.float64)}
    it = iter(factors)
    root = float(np.sqrt(prior_precision))
    for t in range(2, T + 1):
        B, A = next(it)
        if B.shape != (widths[t - 1],) * 2 or A.shape != (widths[t - 2],) * 2:
            raise ValueError(f"layer {t}: factors must be {widths[t - 1]}² and {widths[t - 2]}²")
        out[f"row{t}"] = _damped_inverse(B, root)
        out[f"col{t}"] = _damped_inverse(A, root)
        if bias:
            (Bb,) = next(it)
            out[f"bias{t}"] = _damped_inverse(Bb, float(prior_precision))
    return out
