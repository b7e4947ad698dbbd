"""Flat parameter vectors as matrices, and the networks they define (docs/theory.md §2).

For training jobs and checks: :func:`unflatten` turns a flat vector in the
PyTorch layout into per-layer ``(U, V, b)``; :func:`forward` evaluates the MLP
(or the Elman RNN over a sequence, or a convolutional or residual network of
``planner.stages``) in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidStructure
from .stages import Conv, Flatten, Linear, Network, Pool, Residual
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


def forward(structure: Structure | Network, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Outputs for inputs ``X``: ``(batch, n_1)`` for an MLP, ``(steps, batch, n_1)`` for an
    RNN, ``(batch, *input_shape)`` for a network."""
    if isinstance(structure, Network):
        return _network_forward(structure, np.asarray(theta, dtype=float), X)
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


def _windows(x: np.ndarray, kernel, stride, padding, fill: float) -> np.ndarray:
    """``(batch, C, H', W', kh, kw)`` views of the padded input's windows."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return win[:, :, ::sh, ::sw]


def _network_forward(net: Network, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    if theta.shape != (net.n_params,):
        raise InvalidStructure(
            f"a vector of {net.n_params} parameters is needed; got shape {theta.shape}",
            field="theta",
        )
    units = iter(net.graph.units)

    def layer(st, h):
        u = next(units)
        seg = u.segments[0]
        W = theta[seg.offset : seg.offset + u.rows * seg.width * seg.group]
        b = 0.0 if u.bias is None else theta[u.bias : u.bias + u.rows]
        if isinstance(st, Conv):
            W = W.reshape(u.rows, seg.width, *st.kernel)
            win = _windows(h, st.kernel, st.stride, st.padding, 0.0)
            z = np.einsum("bchwij,ocij->bohw", win, W, optimize=True)
            z = z + np.reshape(b, (1, -1, 1, 1)) if u.bias is not None else z
        else:
            z = h @ W.reshape(u.rows, -1).T + b
        return z

    def act(name, z):
        return ACTIVATION_FUNCTIONS[name](z)

    h = np.asarray(X, dtype=float)
    for st in net.stages:
        if isinstance(st, Conv | Linear):
            h = act(st.activation, layer(st, h))
        elif isinstance(st, Pool):
            if st.glob:
                h = h.mean(axis=(2, 3), keepdims=True)
            elif st.mode == "max":
                h = _windows(h, st.kernel, st.stride or st.kernel, st.padding, -np.inf).max(
                    axis=(4, 5)
                )
            else:  # PyTorch's default counts the zero padding in the average
                h = _windows(h, st.kernel, st.stride or st.kernel, st.padding, 0.0).mean(
                    axis=(4, 5)
                )
        elif isinstance(st, Flatten):
            h = h.reshape(h.shape[0], -1)
        else:
            assert isinstance(st, Residual)
            y = h
            for b in st.branch:
                y = act(b.activation, layer(b, y))
            s = h if st.shortcut is None else layer(st.shortcut, h)
            h = act(st.activation, s + y)
    return h
