"""laplace-torch posteriors in this service's formats (docs/torch.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..imports import spd_inverse
from ._common import _layers, _np, _params, _sym, nn, torch


def _h_factor(la) -> float:
    """laplace-torch's likelihood scale of the Hessian: 1 / (σ² · temperature)."""
    sigma = float(torch.as_tensor(la.sigma_noise).reshape(-1)[0])
    return 1.0 / (sigma**2 * float(la.temperature))


class Converted(tuple):
    """``(format, arrays)``, as ``fmt, arrays = from_laplace(la)`` unpacks it, with what
    the conversion assumed or approximated in ``meta`` (empty when it is exact)."""

    meta: dict[str, Any]

    def __new__(cls, fmt: str, arrays: dict[str, np.ndarray], meta: dict | None = None):
        out = super().__new__(cls, (fmt, arrays))
        out.meta = dict(meta or {})
        return out


def from_laplace(
    la, format: str | None = None, *, kron: str | None = None, rest: float | str | None = None
) -> Converted:
    """``(format, arrays)`` in this service's layout from a fitted laplace-torch posterior;
    ``.meta`` of the result says what the conversion assumed or approximated.

    The mean is ``la.mean`` (``parameters_to_vector`` order, docs/theory.md §2); the prior
    precision is part of every posterior below, as laplace-torch defines it
    (``h·H + P₀``, ``h = 1 / (σ² · temperature)``).

    * ``FullLaplace``: ``precision`` (default; laplace-torch's own matrix,
      symmetrised) or ``full`` (its inverse by Cholesky, float64).
    * ``DiagLaplace``: ``diag`` with ``variance = 1 / (h·H + P₀)``.
    * ``KronLaplace``: ``kron``, exact for a posterior fitted with ``damping=True``,
      whose precision is, per weight, ``(√h B + √δ I) ⊗ (√h A + √δ I)`` (laplace-
      torch's damped K-FAC) and, per bias, ``h B + δ I``. laplace-torch's default,
      the undamped ``h (B ⊗ A) + δ I``, is no Kronecker product: it is refused in
      ``kron`` unless ``kron="damped"`` asks for the damped form of the same factors
      (δ folded into each factor, as ``damping=True`` does); ``meta["kl"]`` is then
      the exact ``KL(undamped ‖ damped)`` in nats (both are diagonal in the
      factors' eigenbases). ``precision`` or ``full`` give the undamped one exactly,
      densely (``p²`` memory).
    * ``LowRankLaplace``: its precision ``U diag(h λ) Uᵀ + P₀`` has a covariance
      ``P₀⁻¹ − V K Vᵀ`` (diagonal *minus* low rank) that this service's
      ``lowrank`` (diagonal *plus* low rank) cannot hold; so ``precision``
      (default) or ``full`` (by Woodbury, ``O(p² k)``), both exact and dense.

    **Last-layer and subnetwork posteriors** (laplace-torch's default is the last
    layer) cover only some parameters. ``rest`` completes them over the whole
    network: the fitted block as above, and every other parameter an independent
    Gaussian at its trained value with variance ``rest`` (a float, or ``"prior"``:
    ``1 / prior_precision``, laplace-torch's own prior for them). That is an
    assumption you make, not something laplace-torch fitted (``meta["rest"]`` records
    it). The format follows the fitted block: ``diag``; ``precision`` or ``full`` for
    a dense block; ``kron`` for K-FAC (the other layers with factors ``√rest · I``).
    """
    name = type(la).__name__
    key = getattr(la, "_key", None)
    subset = key[0] if key is not None else "all"
    if getattr(la, "H", None) is None or not getattr(la, "n_data", 1):
        raise ValueError(f"{name} is not fitted: call la.fit(train_loader) first")
    kind = _kind(name)
    if kron not in (None, "damped"):
        raise ValueError(f"kron must be None or 'damped'; got {kron!r}")
    allowed = {
        "full": ("precision", "full"),
        "diag": ("diag",),
        "kron": ("kron", "precision", "full"),
        "lowrank": ("precision", "full"),
    }[kind]
    fmt = format or allowed[0]
    if fmt not in allowed:
        raise ValueError(f"{name} converts exactly to {' or '.join(allowed)}, not {fmt!r}")
    if subset != "all":
        if rest is None:
            raise ValueError(
                f"{name} covers only its {subset!r} weights: pass rest=<variance> (or "
                "rest='prior') to complete it over every parameter with independent "
                "Gaussians at the trained values, an assumption you make"
            )
        return _completed(la, name, kind, fmt, kron, rest)
    mean = _np(la.mean).reshape(-1)
    if kind == "diag":
        return Converted("diag", {"mean": mean, "variance": 1.0 / _np(la.posterior_precision)})
    if kind == "kron" and fmt == "kron":
        arrays, meta = _kron_arrays(la, kron, first_t=_first_number(la.model))
        return Converted("kron", {"mean": mean, **arrays}, meta)
    precision = _sym(_dense_precision(la, kind))
    if fmt == "precision":
        return Converted("precision", {"mean": mean, "precision": precision})
    if kind == "lowrank":
        return Converted("full", {"mean": mean, "covariance": _lowrank_covariance(la)})
    return Converted(
        "full", {"mean": mean, "covariance": spd_inverse(precision, f"{name} precision")}
    )


#: laplace-torch's posterior classes by the Hessian structure they hold.
_KINDS = {"Full": "full", "Diag": "diag", "Kron": "kron", "LowRank": "lowrank"}


def _kind(name: str) -> str:
    for prefix, kind in _KINDS.items():
        if name.startswith(prefix) and name.endswith("Laplace") and "Functional" not in name:
            return kind
    raise ValueError(
        "from_laplace takes Full/Diag/Kron/LowRank Laplace posteriors (all weights, the last "
        f"layer or a subnetwork); got {name}"
    )


def _fitted_indices(la, model: nn.Module) -> np.ndarray:
    """Where the posterior's parameters lie in ``parameters_to_vector(model)``."""
    sub = getattr(la, "subnetwork_indices", None)
    if sub is not None:
        return _np(sub).astype(np.int64).reshape(-1)
    ours = {id(p) for p in la.model.last_layer.parameters()}
    out, start = [], 0
    for p in model.parameters():
        if id(p) in ours:
            out.extend(range(start, start + p.numel()))
        start += p.numel()
    return np.asarray(out, dtype=np.int64)


def _completed(la, name: str, kind: str, fmt: str, kron: str | None, rest) -> Converted:
    """A last-layer or subnetwork posterior completed over every parameter."""
    model = la.model.model if hasattr(la.model, "last_layer") else la.model
    theta = _np(torch.nn.utils.parameters_to_vector(model.parameters()))
    idx = _fitted_indices(la, model)
    prior = _np(torch.as_tensor(la.prior_precision)).reshape(-1)
    if isinstance(rest, str):
        if rest != "prior" or prior.size != 1:
            raise ValueError("rest is a variance, or 'prior' with a scalar prior precision")
        v = 1.0 / float(prior[0])
    else:
        v = float(rest)
    if not v > 0:
        raise ValueError(f"rest must be a positive variance; got {rest!r}")
    meta = {
        "rest": {
            "variance": v,
            "fitted": int(idx.size),
            "of": int(theta.size),
            "assumption": "the parameters laplace-torch did not fit are independent Gaussians "
            "at their trained values with this variance",
        }
    }
    if kind == "diag":
        var = np.full(theta.size, v)
        var[idx] = 1.0 / _np(la.posterior_precision)
        return Converted("diag", {"mean": theta, "variance": var}, meta)
    if kind == "kron" and fmt == "kron":
        if getattr(la, "subnetwork_indices", None) is not None:
            raise ValueError("a subnetwork posterior is not Kronecker-factored by layer")
        first = _layers(_params(model), _first_number(model))
        last = first[-1][0]  # the last layer's number
        if not np.array_equal(idx, np.arange(theta.size - idx.size, theta.size)):
            raise ValueError("the fitted last layer must be the model's last Linear layer")
        fitted, kl = _kron_arrays(la, kron, first_t=last)
        arrays: dict[str, np.ndarray] = {"mean": theta}
        root = np.sqrt(v)
        for t, _, (n_out, n_in), b in first[:-1]:
            arrays[f"row{t}"] = root * np.eye(n_out)
            arrays[f"col{t}"] = root * np.eye(n_in)
            if b is not None:
                arrays[f"bias{t}"] = np.full(n_out, v)
        arrays.update(fitted)
        return Converted("kron", arrays, {**meta, **kl})
    P = np.diag(np.full(theta.size, 1.0 / v))
    P[np.ix_(idx, idx)] = _sym(_dense_precision(la, kind))
    if fmt == "precision":
        return Converted("precision", {"mean": theta, "precision": P}, meta)
    return Converted(
        "full", {"mean": theta, "covariance": spd_inverse(P, f"{name} precision")}, meta
    )


def _first_number(model: nn.Module) -> int:
    """How the kron arrays number the model's layers: from 1 for a network (any module an
    MLP has not: a conv, a pool, a residual block), from 2 for an MLP's positions."""
    from .structures import _flatten, _mlp_part

    model = getattr(model, "model", model)  # laplace-torch's last-layer wrapper
    if not isinstance(model, nn.Sequential):
        return 2
    return 1 if any(not _mlp_part(m) for _, m in _flatten(model)) else 2


def _dense_precision(la, kind: str) -> np.ndarray:
    P = la.posterior_precision
    if kind == "full":
        return _np(P)
    if kind == "kron":
        return _np(_damped(P, la).to_matrix() if la.damping else P.to_matrix())
    (U, lam), p0 = P
    U = _np(U)
    return (U * _np(lam)) @ U.T + np.diag(_np(p0))


def _lowrank_covariance(la) -> np.ndarray:
    """Woodbury: ``(P₀ + U Λ Uᵀ)⁻¹ = P₀⁻¹ − V (Λ⁻¹ + Uᵀ V)⁻¹ Vᵀ``, ``V = P₀⁻¹ U``."""
    (U, lam), p0 = la.posterior_precision
    U, lam, p0 = _np(U), _np(lam), _np(p0)
    V = U / p0[:, None]
    K = np.diag(1.0 / lam) + U.T @ V
    L = np.linalg.cholesky(_sym(K))
    W = np.linalg.solve(L, V.T).T  # V L⁻ᵀ
    return _sym(np.diag(1.0 / p0) - W @ W.T)


def _damped(P, la):
    """laplace-torch's posterior precision with its damping flag restored (its ``*`` and
    ``+`` on ``KronDecomposed`` drop the flag, so ``la.posterior_precision`` of a
    ``damping=True`` fit is the undamped form)."""
    return type(P)(P.eigenvectors, P.eigenvalues, P.deltas, damping=bool(la.damping))


def _kron_arrays(la, kron: str | None, first_t: int = 2) -> tuple[dict[str, np.ndarray], dict]:
    """The kron arrays of a K-FAC posterior (layers numbered from ``first_t``), and, for an
    undamped one converted with ``kron="damped"``, ``{"kl": …}``."""
    if not la.damping and kron != "damped":
        raise ValueError(
            "laplace-torch's undamped K-FAC posterior h(B⊗A) + δI is not a Kronecker product, "
            "so no 'kron' upload equals it: pass kron='damped' for its damped form "
            "(√h B + √δ I) ⊗ (√h A + √δ I), with the KL divergence between the two in "
            ".meta['kl']; fit with damping=True to have that form exactly; or ask "
            "format='precision' for the undamped one, exact and dense"
        )
    P = la.posterior_precision  # eigenvalues already scaled by h (h^½ per factor)
    deltas = _np(P.deltas.reshape(-1)) * np.ones(len(P.eigenvalues))
    out: dict[str, np.ndarray] = {}
    kl = 0.0
    t = first_t - 1
    last = getattr(la.model, "last_layer", None)  # a last-layer posterior's own parameters
    params = list(last.parameters()) if last is not None else la.params
    for Qs, ls, delta, param in zip(P.eigenvectors, P.eigenvalues, deltas, params, strict=True):
        Qs, ls = [_np(q) for q in Qs], [_np(v) for v in ls]
        if param.ndim in (2, 4):  # Linear (out, in); Conv2d (out, in·kh·kw)
            t += 1
            (Qg, Qa), (lg, la_) = Qs, ls
            out_f, in_f = param.shape[0], param[0].numel()
            if Qg.shape != (out_f, out_f) or Qa.shape != (in_f, in_f):
                raise ValueError(f"layer {t}: Kronecker factors do not match weight {param.shape}")
            root = np.sqrt(delta)
            out[f"row{t}"] = _sym((Qg / (lg + root)) @ Qg.T)
            out[f"col{t}"] = _sym((Qa / (la_ + root)) @ Qa.T)
            if not la.damping:  # both precisions are diagonal in the eigenbasis Qg ⊗ Qa
                u = np.outer(lg, la_) + delta  # undamped
                d = np.outer(lg + root, la_ + root)  # damped
                kl += 0.5 * float(np.sum(d / u - 1.0 + np.log(u) - np.log(d)))
        elif param.ndim == 1 and t >= first_t:
            (Qb,), (lb,) = Qs, ls
            out[f"bias{t}"] = _sym((Qb / (lb + delta)) @ Qb.T)
        else:
            raise ValueError(
                f"a {tuple(param.shape)} parameter is not a Linear or Conv2d weight or bias"
            )
    meta = {} if la.damping else {"kl": kl, "kron": "damped"}
    return out, meta
