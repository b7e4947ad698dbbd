"""Torch adapters for training jobs (docs/torch.md): laplace-torch in, the aligned prior out.

>>> from planner_client.torch import structure_of, from_laplace, load_mean, PriorPenalty
>>> fmt, arrays = from_laplace(la)                              # doctest: +SKIP
>>> teacher = client.upload_teacher("t", structure_of(model), fmt, arrays)  # doctest: +SKIP
>>> plan, prior = client.align(teacher["id"], [64, 32, 16, 10])  # doctest: +SKIP
>>> load_mean(student, prior)                                   # doctest: +SKIP
>>> penalty = PriorPenalty(student, fmt, prior)                 # doctest: +SKIP
>>> loss = nll + penalty() / n_train                            # doctest: +SKIP

Every number is float64 inside, whatever the module's dtype; what goes back into
the module (the mean, the penalty's value) is cast to the parameters' dtype.
This module needs the client's ``torch`` extra (``pip install './client[torch]'``);
:func:`from_laplace` also needs laplace-torch, which that extra installs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .imports import spd_inverse

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised by the client-only install check
    raise ImportError(
        "planner_client.torch needs PyTorch; install the torch extra: "
        "pip install './client[torch]' (torch and laplace-torch)"
    ) from exc

__all__ = [
    "FORMATS",
    "PriorPenalty",
    "from_laplace",
    "laplace_prior",
    "load_mean",
    "module_of",
    "structure_of",
    "to_distribution",
]

#: The posterior formats a prior can come in (docs/theory.md §7).
FORMATS = ("full", "diag", "lowrank", "kron", "precision")

Prior = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# structure_of
# ---------------------------------------------------------------------------------------------


def _activation(m: nn.Module, where: str) -> str:
    """The structure's name for an activation module, or a ValueError saying why not."""
    kind = type(m)
    if kind is nn.ReLU6:  # a Hardtanh subclass: test it first
        return "relu6"
    if kind is nn.Hardtanh:
        if (m.min_val, m.max_val) != (-1.0, 1.0):
            raise ValueError(f"{where}: only Hardtanh(-1, 1) is the structure's 'hardtanh'")
        return "hardtanh"
    if kind is nn.LeakyReLU:
        if m.negative_slope != 0.01:
            raise ValueError(f"{where}: only LeakyReLU(0.01) is the structure's 'leaky_relu'")
        return "leaky_relu"
    names = {
        nn.Identity: "identity",
        nn.ReLU: "relu",
        nn.Sigmoid: "sigmoid",
        nn.Tanh: "tanh",
        nn.GELU: "gelu",
    }
    if kind in names:
        return names[kind]
    raise ValueError(
        f"{where}: {kind.__name__} is not an activation the lattice knows "
        "(identity, relu, relu6, hardtanh, sigmoid, tanh, gelu, leaky_relu)"
    )


def _flatten(seq: nn.Sequential, prefix: str = "") -> Iterable[tuple[str, nn.Module]]:
    for name, m in seq.named_children():
        if isinstance(m, nn.Sequential):
            yield from _flatten(m, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", m


def structure_of(module: nn.Module, head: nn.Linear | None = None) -> dict[str, Any]:
    """The structure JSON (docs/service.md) of a torch network.

    ``module`` is an ``nn.Sequential`` of ``nn.Linear`` layers, each followed by at
    most one activation (``nn.Flatten`` first and ``nn.Dropout`` anywhere are
    allowed: they hold no parameters), or an Elman ``nn.RNN`` without bias with
    its output layer ``head`` (an ``nn.Linear`` without bias). Anything the
    lattice cannot describe (convolutions, normalisation, mixed biases, a
    ``bias=True`` RNN, whose two bias vectors only their sum identifies) raises
    a ``ValueError`` naming the module.
    """
    if isinstance(module, nn.RNN):
        return _rnn_structure(module, head)
    if head is not None:
        raise ValueError("head is only for an nn.RNN; put the output layer in the Sequential")
    if not isinstance(module, nn.Sequential):
        raise ValueError(
            f"structure_of takes an nn.Sequential of Linear layers and activations "
            f"(or an nn.RNN with a Linear head); got {type(module).__name__}"
        )
    widths: list[int] = []
    acts: list[str] = []
    biases: set[bool] = set()
    activated = False
    for name, m in _flatten(module):
        where = f"module {name!r}"
        if isinstance(m, nn.Linear):
            if widths and m.in_features != widths[-1]:
                raise ValueError(
                    f"{where}: in_features {m.in_features} != the previous width {widths[-1]}"
                )
            if not widths:
                widths.append(m.in_features)
            widths.append(m.out_features)
            acts.append("identity")
            activated = False
            biases.add(m.bias is not None)
        elif isinstance(m, nn.Dropout) or (isinstance(m, nn.Flatten) and not widths):
            continue
        elif not widths:
            raise ValueError(f"{where}: the network must start with a Linear layer")
        elif activated:
            raise ValueError(f"{where}: one activation per layer; two follow each other here")
        else:
            acts[-1], activated = _activation(m, where), True
    if len(widths) < 3:
        raise ValueError("a structure needs at least two Linear layers (T >= 3 positions)")
    if len(biases) > 1:
        raise ValueError("every Linear layer must have a bias, or none of them")
    return {
        "widths": widths,
        "activation": acts[:-1],
        "output_activation": acts[-1],
        "bias": biases.pop(),
        "kind": "mlp",
    }


_MODULES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardtanh": nn.Hardtanh,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": lambda: nn.GELU(approximate="tanh"),  # the planner's gelu is the tanh form
    "leaky_relu": nn.LeakyReLU,
}


def module_of(structure: Mapping[str, Any], dtype: torch.dtype | None = None) -> nn.Sequential:
    """The ``nn.Sequential`` of a structure JSON (a plan's ``student``, say): the inverse of
    :func:`structure_of` for an MLP. Its parameters are torch's default initialisation;
    :func:`load_mean` puts a prior's mean in them."""
    if structure.get("kind", "mlp") != "mlp":
        raise ValueError("module_of builds MLPs; build an RNN teacher's student by hand")
    widths = [int(w) for w in structure["widths"]]
    hidden = structure.get("activation", "relu")
    acts = [hidden] * (len(widths) - 2) if isinstance(hidden, str) else list(hidden)
    acts.append(structure.get("output_activation", "identity"))
    if len(acts) != len(widths) - 1 or any(a not in _MODULES for a in acts):
        raise ValueError(f"cannot build activations {acts} for widths {widths}")
    layers: list[nn.Module] = []
    for i, act in enumerate(acts):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bool(structure.get("bias", False))))
        if act != "identity":
            layers.append(_MODULES[act]())
    return nn.Sequential(*layers).to(dtype or torch.get_default_dtype())


def _rnn_structure(rnn: nn.RNN, head: nn.Linear | None) -> dict[str, Any]:
    if not isinstance(head, nn.Linear):
        raise ValueError("an nn.RNN needs its output layer: structure_of(rnn, head=nn.Linear(...))")
    if rnn.bias or head.bias is not None:
        raise ValueError(
            "an RNN teacher must have no biases: torch's RNN keeps two bias vectors per layer "
            "(b_ih, b_hh) and only their sum is identifiable (use bias=False on both)"
        )
    if rnn.bidirectional or getattr(rnn, "proj_size", 0):
        raise ValueError("bidirectional or projected RNNs are not Elman networks")
    if head.in_features != rnn.hidden_size:
        raise ValueError(f"head.in_features {head.in_features} != hidden_size {rnn.hidden_size}")
    return {
        "widths": [rnn.input_size, *[rnn.hidden_size] * rnn.num_layers, head.out_features],
        "activation": [rnn.nonlinearity] * rnn.num_layers,
        "output_activation": "identity",
        "bias": False,
        "kind": "rnn",
    }


# ---------------------------------------------------------------------------------------------
# from_laplace
# ---------------------------------------------------------------------------------------------


def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float64).numpy())


def _sym(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(0.5 * (a + a.T))


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
        arrays, meta = _kron_arrays(la, kron)
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
        first = _layers(_params(model))
        last = len(first) + 1  # the last layer's position (t = 2 … T)
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
        if param.ndim == 2:
            t += 1
            (Qg, Qa), (lg, la_) = Qs, ls
            out_f, in_f = param.shape
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
            raise ValueError(f"a {tuple(param.shape)} parameter is not a Linear weight or bias")
    meta = {} if la.damping else {"kl": kl, "kron": "damped"}
    return out, meta


# ---------------------------------------------------------------------------------------------
# load_mean, PriorPenalty, laplace_prior, to_distribution
# ---------------------------------------------------------------------------------------------


def _params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


def _layers(params: list[torch.Tensor]) -> list[tuple[int, slice, tuple[int, int], slice | None]]:
    """Per layer t: (t, weight slice, weight shape, bias slice) in the flat layout."""
    layers, at, i = [], 0, 0
    while i < len(params):
        W = params[i]
        if W.ndim != 2:
            raise ValueError(f"parameter {i} of shape {tuple(W.shape)} is not a Linear weight")
        w = slice(at, at + W.numel())
        at, i = w.stop, i + 1
        b = None
        if i < len(params) and params[i].ndim == 1:
            b = slice(at, at + params[i].numel())
            at, i = b.stop, i + 1
        layers.append((len(layers) + 2, w, tuple(W.shape), b))
    return layers


def _check_kron(prior: Prior, params: list[torch.Tensor]) -> None:
    for t, _, (n_out, n_in), b in _layers(params):
        for key, n in ((f"row{t}", n_out), (f"col{t}", n_in)):
            if key not in prior:
                raise ValueError(f"kron prior has no {key!r} for layer {t}")
            if np.shape(prior[key]) != (n, n):
                raise ValueError(f"{key} is {np.shape(prior[key])}; layer {t} needs ({n}, {n})")
        if b is not None and f"bias{t}" not in prior:
            raise ValueError(f"kron prior has no 'bias{t}' for layer {t}'s bias")


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
        for t, w, shape, b in _layers(self._module_params):
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
        parts, t = [], 2
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
