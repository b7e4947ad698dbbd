"""The seed's probabilistic distillation objectives, as functions a training client calls.

Notation of the seed (Грабовой & Стрижов): ``I`` are the objects with
privileged information (the teacher's answers ``s_i``), ``λ`` weighs the
teacher's answers against the true labels, ``T`` is the temperature.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "hinton_loss",
    "log_softmax",
    "probabilistic_classification_loss",
    "regression_closed_form",
    "regression_objective",
]


def log_softmax(z: np.ndarray, T: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=float) / T
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def hinton_loss(
    student_logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray, T: float
) -> float:
    """Hinton et al. (2015), as the seed writes it:
    ``−Σ_i Σ_k y_ik log g_k(x_i)|_{T=1} − Σ_i Σ_k f̂_k(x_i)|_{T} log g_k(x_i)|_{T}``
    with ``labels`` one-hot ``(m, K)``."""
    teacher = np.exp(log_softmax(teacher_logits, T))
    return float(
        -np.sum(labels * log_softmax(student_logits, 1.0))
        - np.sum(teacher * log_softmax(student_logits, T))
    )


def probabilistic_classification_loss(
    student_logits: np.ndarray,
    labels: np.ndarray,
    teacher_probs: np.ndarray,
    privileged: np.ndarray,
    lam: float,
    T: float,
) -> float:
    """Minus the seed's log-likelihood of true labels and teacher answers (classification).

    ``Σ_{i∉I} Σ_k y log g|_{T=1} + (1−λ) Σ_{i∈I} Σ_k y log g|_{T=1}
    + λ Σ_{i∈I} Σ_k s log g|_{T} + λ Σ_{i∈I} Σ_k (log g|_{T} + log log 1/g|_{T})``;
    the last term is the log of the theorem's normalising constant of
    ``p(s|x, g) = C Π_k g_k^{s_k}`` (up to a constant), valid for ε < g_k < 1 − ε.
    """
    priv = np.asarray(privileged, dtype=bool)
    lg1 = log_softmax(student_logits, 1.0)
    lgT = log_softmax(student_logits, T)
    w = np.where(priv, 1.0 - lam, 1.0)[:, None]
    objective = np.sum(w * labels * lg1)
    objective += lam * np.sum(teacher_probs[priv] * lgT[priv])
    objective += lam * np.sum(lgT[priv] + np.log(-lgT[priv]))
    return float(-objective)


def regression_objective(
    w: np.ndarray, X, y, s, privileged, lam: float, sigma: float, sigma_s: float
) -> float:
    """The seed's regression objective for a linear student ``g(x) = wᵀx``:
    ``Σ_{i∉I} σ²(y−g)² + (1−λ) Σ_{i∈I} σ²(y−g)² + λ Σ_{i∈I} σ_s²(s−g)²``."""
    priv = np.asarray(privileged, dtype=bool)
    g = X @ w
    r_y, r_s = (y - g) ** 2, (s - g) ** 2
    return float(
        sigma**2 * np.sum(r_y[~priv])
        + (1 - lam) * sigma**2 * np.sum(r_y[priv])
        + lam * sigma_s**2 * np.sum(r_s[priv])
    )


def regression_closed_form(
    X, y, s, privileged, lam: float, sigma: float, sigma_s: float
) -> np.ndarray:
    """The seed's theorem: the objective is the weighted least squares
    ``y'' = X w + ε``, ``ε ~ N(0, Σ)``, ``Σ⁻¹ = diag(σ')``, with
    ``σ'_i = σ²`` (i ∉ I) or ``(1−λ)σ² + λσ_s²``, ``y'_i = σ² y_i`` or
    ``(1−λ)σ² y_i + λσ_s² s_i``, ``y'' = Σ y'``."""
    priv = np.asarray(privileged, dtype=bool)
    sig = np.where(priv, (1 - lam) * sigma**2 + lam * sigma_s**2, sigma**2)
    y1 = np.where(
        priv, (1 - lam) * sigma**2 * y + lam * sigma_s**2 * np.where(priv, s, 0), sigma**2 * y
    )
    y2 = y1 / sig
    A = X.T @ (sig[:, None] * X)
    return np.linalg.solve(A, X.T @ (sig * y2))
