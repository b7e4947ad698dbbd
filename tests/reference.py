"""A slow, obviously correct reference for φ and ψ (docs/theory.md §3).

Written independently of ``planner.ops``/``planner.plan``: its own layout (a
dict from ``("U"|"V"|"b", t, row, col)`` to flat index, built by loops), its
own validity rules, and dense conditioning one step at a time with
``numpy.linalg.solve``.  Slow on purpose; only for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IDEMPOTENT = {"identity", "relu", "relu6", "hardtanh", "step"}


@dataclass
class RefNet:
    widths: list[int]
    acts: list[str]  # position 1..T; acts[0] == "identity"
    bias: bool
    rnn: bool

    @property
    def T(self) -> int:
        return len(self.widths)

    def params(self) -> list[tuple]:
        """Every parameter, in PyTorch order."""
        out = []
        for t in range(2, self.T + 1):
            n, m = self.widths[t - 1], self.widths[t - 2]
            out += [("U", t, i, j) for i in range(n) for j in range(m)]
            if self.rnn and t < self.T:
                out += [("V", t, i, j) for i in range(n) for j in range(n)]
            if self.bias:
                out += [("b", t, i, 0) for i in range(n)]
        return out

    def index(self) -> dict[tuple, int]:
        return {k: q for q, k in enumerate(self.params())}


def valid_ops(net: RefNet) -> list[tuple]:
    """Structure-level ops valid on ``net``: ("phi", t) and ("psi", t)."""
    out = [("phi", t) for t in range(2, net.T) if net.widths[t - 1] >= 2]
    if net.T >= 4:
        for t in range(2, net.T + 1):
            if net.widths[t - 1] != net.widths[t - 2]:
                continue
            if net.rnn and t == net.T:
                continue
            a, prev = net.acts[t - 1], net.acts[t - 2]
            if a == "identity" or (a == prev and a in IDEMPOTENT):
                out.append(("psi", t))
    return out


def _condition(mean, cov, B, v, keep):
    B, keep = np.asarray(B, int), np.asarray(keep, int)
    if len(B) == 0:
        return mean[keep], cov[np.ix_(keep, keep)], 0.0
    S_BB = cov[np.ix_(B, B)]
    S_aB = cov[np.ix_(keep, B)]
    d = v - mean[B]
    sol = np.linalg.solve(S_BB, d)
    m = mean[keep] + S_aB @ sol
    C = cov[np.ix_(keep, keep)] - S_aB @ np.linalg.solve(S_BB, S_aB.T)
    return m, (C + C.T) / 2, 0.5 * float(d @ sol)


def ref_effect(net: RefNet, op: tuple):
    """What one step does, by the reference's own rules: (conditioned {key: target},
    marginalised keys, the net after it, and for each new key the old key it was)."""
    kind, t = op[0], op[1]
    cond: dict[tuple, float] = {}
    marg: set[tuple] = set()
    if kind == "phi":
        i = op[2]
        for k in range(net.widths[t]):  # column i of U_{t+1}
            cond[("U", t + 1, k, i)] = 0.0
        if net.rnn:
            for k in range(net.widths[t - 1]):  # column i of V_t
                cond[("V", t, k, i)] = 0.0
            for j in range(net.widths[t - 1]):
                if j != i:
                    marg.add(("V", t, i, j))
        for j in range(net.widths[t - 2]):
            marg.add(("U", t, i, j))
        if net.bias:
            marg.add(("b", t, i, 0))
        widths = list(net.widths)
        widths[t - 1] -= 1
        new = RefNet(widths, list(net.acts), net.bias, net.rnn)

        def old_key(key):
            k, s, r, c = key
            if k in ("U", "V", "b") and s == t:
                r = r if r < i else r + 1
            if (k == "U" and s == t + 1) or (k == "V" and s == t):
                c = c if c < i else c + 1
            return (k, s, r, c)

    else:
        pi = op[2]
        n = net.widths[t - 1]
        for k in range(n):
            for l in range(n):
                cond[("U", t, k, l)] = 1.0 if pi[k] == l else 0.0
            if net.bias:
                cond[("b", t, k, 0)] = 0.0
            if net.rnn and t < net.T:
                for l in range(n):
                    cond[("V", t, k, l)] = 0.0
        inv = {pi[k]: k for k in range(n)}
        widths = net.widths[: t - 1] + net.widths[t:]
        acts = net.acts[: t - 1] + net.acts[t:]
        new = RefNet(widths, acts, net.bias, net.rnn)

        def old_key(key):
            k, s, r, c = key
            if s < t:
                return key
            if s == t and k == "U":  # the old layer t+1, which read position t
                return (k, t + 1, r, inv[c])
            return (k, s + 1, r, c)

    return cond, marg, new, old_key


def ref_step(net: RefNet, mean, cov, op: tuple):
    """One step, dense: returns (new net, mean, cov, step cost)."""
    idx = net.index()
    cond, marg, new, old_key = ref_effect(net, op)
    B = [idx[k] for k in cond]
    v = np.array(list(cond.values()))
    keep = [idx[old_key(k)] for k in new.params()]
    assert len(set(keep)) == len(keep)
    assert not (set(keep) & set(B)) and not (set(keep) & {idx[k] for k in marg})
    assert len(keep) + len(B) + len(marg) == len(idx)
    m, C, c = _condition(mean, cov, B, v, keep)
    return new, m, C, c


def ref_apply(net: RefNet, mean, cov, ops):
    """Step-by-step application: (net, mean, cov, per-step costs)."""
    costs = []
    for op in ops:
        net, mean, cov, c = ref_step(net, mean, cov, op)
        costs.append(c)
    return net, mean, cov, costs
