"""The aligned prior in a training job (docs/torch.md): the mean loaded, the penalty, the
prior in laplace-torch's terms, a torch distribution."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..imports import spd_inverse
from ._common import FORMATS, Prior, _first_layer, _layers, _params, _sym, nn, torch


def _check_kron(prior: Prior, params: list[torch.Tensor]) -> None:
    for t, _, (n_out, n_in), b in _layers(params, _first_layer(prior)):
        for key, n in ((f"row{t}", n_out), (f"col{t}", n_in)):
            if key not in prior:
                raise ValueError(f"kron prior has no {key!r} for layer {t}")
            if np.shape(prior[key]) != (n, n):
                raise ValueError(f"{key} is {np.shape(prior[key])}; layer {t} needs ({n}, {n})")
        if b is not None and f"bias{t}" not in prior:
            raise ValueError(f"kron prior has no 'bias{t}' for layer {t}'s bias")


def student_module(plan: Mapping[str, Any], prior: Prior, dtype: torch.dtype | None = None):
    """The student a plan describes (:func:`~.structures.module_of` of ``plan["student"]``)
    with the prior's mean loaded: ``student = student_module(plan, arrays)`` after
    ``plan, arrays = client.align(...)``."""
    from .structures import module_of

    return load_mean(module_of(plan["student"], dtype), prior)


def load_mean(module: nn.Module, prior: Prior) -> nn.Module:
    """Copy ``prior["mean"]`` into ``module.parameters()`` (``parameters_to_vector`` order).

    Raises ``ValueError`` when the sizes differ, or when a ``kron`` prior's factors
    do not match the module's layers. Returns the module.
    """
    params = _params(module)
    mean = np.asarray(prior["mean"], dtype=np.float64)
    n = sum(p.numel() for p in params)
    if mean.shape != (n,):
        raise ValueError(f"the prior mean has shape {mean.shape}; the module has {n} parameters")
    if any(k.startswith("row") for k in prior):
        _check_kron(prior, params)
    with torch.no_grad():
        at = 0
        for p in params:
            p.copy_(torch.from_numpy(mean[at : at + p.numel()]).reshape(p.shape))
            at += p.numel()
    return module


def _t(a: Any) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(np.asarray(a, dtype=np.float64)))


def _cholesky(a: torch.Tensor, what: str) -> torch.Tensor:
    a = 0.5 * (a + a.T)
    L, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise ValueError(f"{what} is not positive definite")
    return L


def _tri(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(L, B, upper=False)


class PriorPenalty(nn.Module):
    """The Gaussian energy ``½ (θ − μ)ᵀ Ξ⁻¹ (θ − μ)`` of a module's current parameters.

    ``penalty()`` is differentiable in the parameters, float64 inside and cast to
    the parameters' dtype. Each format is applied at its own cost, with whatever
    factorisation it needs computed once here: ``diag`` ``O(p)``; ``lowrank`` by
    Woodbury, ``O(p k)``; ``kron`` per layer, two triangular solves with
    ``chol(G_t)`` and ``chol(A_t)``; ``full`` one triangular solve with the cached
    ``chol(Σ)``; ``precision`` one product. The normalising constant is left out
    (it does not depend on θ). ``energy(vector)`` evaluates any flat vector.

    ``temperature`` τ scales the prior's covariance (``Ξ → τ Ξ``, so the energy is
    divided by τ): τ < 1 trusts the teacher more, τ > 1 less. The informative-prior
    literature tunes such a factor on validation data; never on test data.
    """

    def __init__(
        self, module: nn.Module, format: str, prior: Prior, *, temperature: float = 1.0
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
        if not (isinstance(temperature, int | float) and temperature > 0):
            raise ValueError(f"temperature must be a positive number; got {temperature!r}")
        self.temperature = float(temperature)
        self._module_params = _params(module)  # a plain list: not registered twice
        n = sum(p.numel() for p in self._module_params)
        mean = np.asarray(prior["mean"], dtype=np.float64)
        if mean.shape != (n,):
            raise ValueError(f"the prior mean has shape {mean.shape}; the module has {n} params")
        self.format = format
        self.register_buffer("mean", _t(mean))
        getattr(self, f"_init_{format}")(prior, n)

    # -- set-up per format -------------------------------------------------------------------
    def _init_diag(self, prior: Prior, n: int) -> None:
        var = _t(prior["variance"]).reshape(-1)
        if var.shape != (n,) or not bool((var > 0).all()):
            raise ValueError(f"variance must be ({n},) and positive")
        self.register_buffer("inv_var", 1.0 / var)

    def _init_full(self, prior: Prior, n: int) -> None:
        S = _t(prior["covariance"])
        if S.shape != (n, n):
            raise ValueError(f"covariance is {tuple(S.shape)}; need ({n}, {n})")
        self.register_buffer("chol", _cholesky(S, "the prior covariance"))

    def _init_precision(self, prior: Prior, n: int) -> None:
        P = _t(prior["precision"])
        if P.shape != (n, n):
            raise ValueError(f"precision is {tuple(P.shape)}; need ({n}, {n})")
        _cholesky(P, "the prior precision")
        self.register_buffer("precision", 0.5 * (P + P.T))

    def _init_lowrank(self, prior: Prior, n: int) -> None:
        d, F = _t(prior["variance"]).reshape(-1), _t(prior["factor"])
        if d.shape != (n,) or F.ndim != 2 or F.shape[0] != n or not bool((d > 0).all()):
            raise ValueError(f"lowrank needs variance ({n},) positive and factor ({n}, k)")
        W = F / d[:, None]  # D⁻¹ F
        C = torch.eye(F.shape[1], dtype=torch.float64) + F.T @ W
        self.register_buffer("inv_var", 1.0 / d)
        self.register_buffer("woodbury", W)
        self.register_buffer("chol_c", _cholesky(C, "I + Fᵀ D⁻¹ F"))

    def _init_kron(self, prior: Prior, n: int) -> None:
        _check_kron(prior, self._module_params)
        self._kron = []
        for t, w, shape, b in _layers(self._module_params, _first_layer(prior)):
            Lg = _cholesky(_t(prior[f"row{t}"]), f"row{t}")
            La = _cholesky(_t(prior[f"col{t}"]), f"col{t}")
            self.register_buffer(f"chol_row{t}", Lg)
            self.register_buffer(f"chol_col{t}", La)
            bias = None
            if b is not None:
                B = _t(prior[f"bias{t}"])
                if B.ndim == 1:
                    bias = ("var", b)
                    self.register_buffer(f"inv_bias{t}", 1.0 / B)
                else:
                    bias = ("cov", b)
                    self.register_buffer(f"chol_bias{t}", _cholesky(B, f"bias{t}"))
            self._kron.append((t, w, shape, bias))

    # -- energy --------------------------------------------------------------------------------
    def vector(self) -> torch.Tensor:
        """The module's parameters as one float64 vector (differentiable)."""
        return torch.cat([p.reshape(-1).to(torch.float64) for p in self._module_params])

    def energy(self, theta: torch.Tensor) -> torch.Tensor:
        """``½ (θ − μ)ᵀ Ξ⁻¹ (θ − μ)`` of a flat float64 vector ``θ``."""
        d = theta - self.mean
        f = self.format
        if f == "diag":
            return 0.5 * (d * d * self.inv_var).sum()
        if f == "full":
            z = _tri(self.chol, d[:, None])
            return 0.5 * (z * z).sum()
        if f == "precision":
            return 0.5 * d @ (self.precision @ d)
        if f == "lowrank":
            z = _tri(self.chol_c, (self.woodbury.T @ d)[:, None])
            return 0.5 * ((d * d * self.inv_var).sum() - (z * z).sum())
        total = d.new_zeros(())
        for t, w, shape, bias in self._kron:
            X = _tri(getattr(self, f"chol_row{t}"), d[w].reshape(shape))  # L_G⁻¹ D
            Y = _tri(getattr(self, f"chol_col{t}"), X.T)  # L_A⁻¹ (L_G⁻¹ D)ᵀ
            total = total + (Y * Y).sum()
            if bias is not None:
                kind, b = bias
                if kind == "var":
                    total = total + (d[b] * d[b] * getattr(self, f"inv_bias{t}")).sum()
                else:
                    z = _tri(getattr(self, f"chol_bias{t}"), d[b][:, None])
                    total = total + (z * z).sum()
        return 0.5 * total

    def forward(self) -> torch.Tensor:
        dtype = self._module_params[0].dtype if self._module_params else torch.float64
        return (self.energy(self.vector()) / self.temperature).to(dtype)


def precision_diagonal(format: str, prior: Prior) -> np.ndarray:
    """The exact diagonal of ``Ξ⁻¹`` (not ``1 / diag Ξ``), in float64."""
    import scipy.linalg as sla

    if format == "diag":
        return 1.0 / np.asarray(prior["variance"], dtype=np.float64)
    if format == "precision":
        return np.diag(np.asarray(prior["precision"], dtype=np.float64)).copy()
    if format == "full":
        L = np.linalg.cholesky(_sym(np.asarray(prior["covariance"], dtype=np.float64)))
        Linv = sla.solve_triangular(L, np.eye(len(L)), lower=True)
        return (Linv * Linv).sum(axis=0)  # diag(L⁻ᵀ L⁻¹): column norms of L⁻¹
    if format == "lowrank":
        d = np.asarray(prior["variance"], dtype=np.float64)
        F = np.asarray(prior["factor"], dtype=np.float64)
        W = F / d[:, None]
        L = np.linalg.cholesky(np.eye(F.shape[1]) + F.T @ W)
        Z = sla.solve_triangular(L, W.T, lower=True)  # L⁻¹ Wᵀ
        return 1.0 / d - (Z * Z).sum(axis=0)
    if format == "kron":
        parts, t = [], _first_layer(prior)
        while f"row{t}" in prior:
            g = np.diag(spd_inverse(np.asarray(prior[f"row{t}"], dtype=np.float64), f"row{t}"))
            a = np.diag(spd_inverse(np.asarray(prior[f"col{t}"], dtype=np.float64), f"col{t}"))
            parts.append(np.outer(g, a).reshape(-1))
            if f"bias{t}" in prior:
                B = np.asarray(prior[f"bias{t}"], dtype=np.float64)
                parts.append(1.0 / B if B.ndim == 1 else np.diag(spd_inverse(B, f"bias{t}")))
            t += 1
        return np.concatenate(parts)
    raise ValueError(f"format must be one of {FORMATS}; got {format!r}")


def laplace_prior(format: str, prior: Prior, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Keyword arguments for ``laplace.Laplace(student, likelihood, **laplace_prior(...))``.

    ``prior_mean``, and as ``prior_precision`` the exact diagonal of ``Ξ⁻¹`` (each
    parameter's precision given the others): laplace-torch takes only a diagonal
    prior, so the correlations are dropped. ``subset_of_weights="all"`` comes
    with them, since the prior covers every parameter (laplace-torch's default
    is the last layer only).
    """
    dtype = dtype or torch.get_default_dtype()
    return {
        "subset_of_weights": "all",
        "prior_mean": _t(prior["mean"]).to(dtype),
        "prior_precision": _t(precision_diagonal(format, prior)).to(dtype),
    }


def to_distribution(format: str, prior: Prior) -> torch.distributions.Distribution:
    """The prior as a ``torch.distributions`` object (float64), where one exists.

    ``full``: ``MultivariateNormal(scale_tril=chol Σ)``; ``precision``:
    ``MultivariateNormal(precision_matrix=Λ)``; ``lowrank``:
    ``LowRankMultivariateNormal``; ``diag``: ``Independent(Normal, 1)``. torch has
    no matrix-normal, so ``kron`` raises: use :class:`PriorPenalty`.
    """
    D = torch.distributions
    mean = _t(prior["mean"])
    if format == "full":
        return D.MultivariateNormal(
            mean, scale_tril=_cholesky(_t(prior["covariance"]), "the covariance")
        )
    if format == "precision":
        P = _t(prior["precision"])
        return D.MultivariateNormal(mean, precision_matrix=0.5 * (P + P.T))
    if format == "lowrank":
        return D.LowRankMultivariateNormal(mean, _t(prior["factor"]), _t(prior["variance"]))
    if format == "diag":
        return D.Independent(D.Normal(mean, _t(prior["variance"]).sqrt()), 1)
    if format == "kron":
        raise ValueError(
            "torch.distributions has no matrix-normal for a 'kron' prior: use PriorPenalty for "
            "its energy, or upload the teacher as 'full' or 'precision' for a dense distribution"
        )
    raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
