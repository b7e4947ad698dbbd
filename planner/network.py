"""Flat parameter vectors as matrices, and the networks they define (docs/theory.md §2).

For training jobs and checks: :func:`unflatten` turns a flat vector in the
PyTorch layout into per-layer ``(U, V, b)``; :func:`forward` evaluates the MLP
(or the Elman RNN over a sequence) in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidStructure
from .structure import Structure

__all__ = ["ACTIVATION_FUNCTIONS", "LayerParams", "forward", "unflatten"]

ACTIVATION_FUNCTIONS = {
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
    "hardtanh": lambda x: np.clip(x, -1.0, 1.0),
    "step": lambda x: (x > 0).astype(float),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3))),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
}


@dataclass(frozen=True)
class LayerParams:
    """Layer t's parameters: ``U (n_t, n_{t-1})``, ``V (n_t, n_t)`` or None, ``b`` or None."""

    t: int
    U: np.ndarray
    V: np.ndarray | None
    b: np.ndarray | None


def unflatten(structure: Structure, theta: np.ndarray) -> list[LayerParams]:
    """Per-layer matrices of a flat vector (views, no copies)."""
    theta = np.asarray(theta)
    if theta.shape != (structure.n_params,):
        raise InvalidStructure(
            f"a vector of {structure.n_params} parameters is needed; got shape {theta.shape}",
            field="theta",
        )
    out = []
    for t in range(2, structure.T + 1):
        ix = structure.layer(t)
        V = None if ix.V is None else theta[ix.V]
        b = None if ix.b is None else theta[ix.b]
        out.append(LayerParams(t, theta[ix.U], V, b))
    return out


def forward(structure: Structure, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Outputs for inputs ``X``: ``(batch, n_1)`` for an MLP, ``(steps, batch, n_1)`` for an RNN."""
    layers = unflatten(structure, theta)
    if structure.kind == "mlp":
        h = np.asarray(X, dtype=float)
        for lp in layers:
            z = h @ lp.U.T + (0.0 if lp.b is None else lp.b)
            h = ACTIVATION_FUNCTIONS[structure.activation(lp.t)](z)
        return h
    seq = np.asarray(X, dtype=float)
    for lp in layers:
        act = ACTIVATION_FUNCTIONS[structure.activation(lp.t)]
        out, state = [], np.zeros((seq.shape[1], lp.U.shape[0]))
        for x in seq:
            z = x @ lp.U.T + (0.0 if lp.b is None else lp.b)
            if lp.V is not None:
                z = z + state @ lp.V.T
            state = act(z)
            out.append(state)
        seq = np.stack(out)
    return seq
