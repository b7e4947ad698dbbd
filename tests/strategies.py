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


@st.composite
def search_cases(draw, max_T=5, max_width=4, max_steps=5, rnn=None):
    """(teacher RefNet, a student RefNet reached by 1..max_steps random valid steps, a seed).

    Teachers lean towards what makes searches interesting: identity or equal
    idempotent activations and equal neighbouring widths (so ψ is possible), and
    hidden widths of at least 2; ψ steps are preferred when valid.
    """
    is_rnn = draw(st.booleans()) if rnn is None else rnn
    T = draw(st.integers(3, max_T))
    width = st.integers(2, max_width)
    widths = [draw(st.integers(1, max_width))]
    for _ in range(T - 1):
        widths.append(widths[-1] if draw(st.booleans()) and widths[-1] > 1 else draw(width))
    act = draw(st.sampled_from(["identity", "relu", "mixed"]))
    pool = ["identity", "relu", "tanh"] if act == "mixed" else [act]
    hidden = [draw(st.sampled_from(pool)) for _ in range(T - 2)]
    out = draw(st.sampled_from(["identity", "relu"]))
    net = RefNet(widths, ["identity", *hidden, out], draw(st.booleans()), is_rnn)
    student = net
    for _ in range(draw(st.integers(min(2, max_steps), max_steps))):
        choices = valid_ops(student)
        if not choices:
            break
        psis = [c for c in choices if c[0] == "psi"]
        kind, t = draw(st.sampled_from(psis if psis and draw(st.booleans()) else choices))
        student = ref_next(
            student, (kind, t, 0 if kind == "phi" else list(range(student.widths[t - 1])))
        )
    return net, student, draw(st.integers(0, 2**32 - 1))


def redundant(structure: Structure, rng: np.random.Generator, pairs: int, rho: float = -0.95):
    """(mean, covariance) where the last hidden position has ``pairs`` pairs of redundant
    neurons: strongly anti-correlated outgoing weights and nearly opposite means, so either
    alone is dear and the second is almost free once the first is gone; the other neurons'
    costs lie in between (so ranking by the teacher's marginal takes one of each pair)."""
    p = structure.n_params
    mean = rng.normal(size=p)
    cov = spd(rng, p, jitter=0.5) * 0.05
    cov[np.diag_indices(p)] += 1.0
    U = structure.layer(structure.T).U
    n_out, n = U.shape
    for i in range(2 * pairs, n):
        f = rng.normal(size=n_out)
        mean[U[:, i]] = f * np.sqrt(2 * rng.uniform(0.6, 2.0) / (f @ f))
    for a in range(pairs):
        i, j = 2 * a, 2 * a + 1
        f = rng.normal(size=n_out)
        f *= np.sqrt(1.0 / (f @ f))  # alone: about 0.5
        mean[U[:, i]], mean[U[:, j]] = f, -1.15 * f
        for q in (U[:, i], U[:, j]):
            cov[q, :] = 0.0
            cov[:, q] = 0.0
        for r in range(n_out):
            a_, b_ = U[r, i], U[r, j]
            cov[a_, a_] = cov[b_, b_] = 1.0
            cov[a_, b_] = cov[b_, a_] = rho
    return mean, cov
