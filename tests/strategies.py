"""Hypothesis strategies: random structures, posteriors and valid operation sequences."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from planner import Phi, Psi, Structure
from tests.reference import RefNet, valid_ops


def ref_next(net: RefNet, op: tuple) -> RefNet:
    if op[0] == "phi":
        widths = list(net.widths)
        widths[op[1] - 1] -= 1
        return RefNet(widths, list(net.acts), net.bias, net.rnn)
    t = op[1]
    return RefNet(
        net.widths[: t - 1] + net.widths[t:], net.acts[: t - 1] + net.acts[t:], net.bias, net.rnn
    )


def to_structure(net: RefNet) -> Structure:
    return Structure.build(
        net.widths, list(net.acts[1:-1]), net.acts[-1], net.bias, "rnn" if net.rnn else "mlp"
    )


def to_ops(ops) -> tuple:
    return tuple(Phi(o[1], o[2]) if o[0] == "phi" else Psi(o[1], tuple(o[2])) for o in ops)


@st.composite
def nets(draw, max_T=5, max_width=4, rnn=None) -> RefNet:
    is_rnn = draw(st.booleans()) if rnn is None else rnn
    T = draw(st.integers(3, max_T))
    widths = [draw(st.integers(1, max_width)) for _ in range(T)]
    hidden = [draw(st.sampled_from(["identity", "relu", "tanh"])) for _ in range(T - 2)]
    out = draw(st.sampled_from(["identity", "relu"]))
    return RefNet(widths, ["identity", *hidden, out], draw(st.booleans()), is_rnn)


@st.composite
def sequences(draw, net: RefNet, max_steps=5) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(0, max_steps))):
        choices = valid_ops(net)
        if not choices:
            break
        kind, t = draw(st.sampled_from(choices))
        if kind == "phi":
            op = ("phi", t, draw(st.integers(0, net.widths[t - 1] - 1)))
        else:
            op = ("psi", t, list(draw(st.permutations(range(net.widths[t - 1])))))
        ops.append(op)
        net = ref_next(net, op)
    return ops


def spd(rng: np.random.Generator, p: int, jitter: float = 0.3) -> np.ndarray:
    """A random, reasonably conditioned SPD matrix with correlated entries."""
    A = rng.normal(size=(p, p))
    return A @ A.T / p + jitter * np.eye(p)


@st.composite
def cases(draw, max_T=5, max_width=4, max_steps=5, rnn=None):
    """(RefNet, ref ops, mean, cov) with a random SPD covariance."""
    net = draw(nets(max_T, max_width, rnn))
    ops = draw(sequences(net, max_steps))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = len(net.params())
    return net, ops, rng.normal(size=p), spd(rng, p)
