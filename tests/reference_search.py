"""Slow, obviously correct references for the search (docs/theory.md §5, §6).

Written independently of ``planner``: the routes, the greedy of exact
increments and the brute force all speak the reference's own layout and rules
(``tests.reference``) and compute costs by dense solves on the teacher's
covariance, ``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)``, from scratch every time.

* :func:`ref_routes` lists every way the student's positions can come from
  blocks of consecutive teacher positions (docs/theory.md §5 rules, written again here).
* :func:`ref_greedy` is the contract of docs/theory.md §6: per route, from the output
  down, a shrinking position removes, one at a time, the neuron of least exact
  increment given everything conditioned so far (ties, within 1e-9 of the cost so far:
  the lowest index); a
  layer removed by ψ conditions its kept rows to unit vectors, paired by a
  linear assignment on the exact change of the cost when one entry's target
  goes from 0 to 1 (everything else in the layer at 0), given everything
  conditioned so far.  The cheapest route wins.
* :func:`brute_force` applies every valid sequence of operations, every neuron
  and every pairing, step by step, and returns the least total cost.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import linear_sum_assignment

from tests.reference import IDEMPOTENT, RefNet, ref_apply, ref_effect, valid_ops


def constraint_cost(mean, cov, B: list[int], v: list[float]) -> float:
    if not B:
        return 0.0
    d = np.asarray(v, dtype=float) - mean[B]
    return 0.5 * float(d @ np.linalg.solve(cov[np.ix_(B, B)], d))


def ref_routes(net: RefNet, widths: list[int], acts: list[str]) -> list[list[tuple[int, int]]]:
    """Every route: ``blocks[j-1] = (s, e)``, teacher positions s..e become student j
    (s survives, s+1..e are removed by ψ after shrinking to the student's width).
    ``acts`` lists the student's activations by position, the input's ("identity")
    first, as ``RefNet.acts`` does."""
    T, Ts = net.T, len(widths)
    out = []
    for cuts in itertools.combinations(range(2, T + 1), Ts - 1):
        starts = [1, *cuts]
        ends = [c - 1 for c in cuts] + [T]
        blocks = list(zip(starts, ends, strict=True))
        if all(_block_ok(net, widths, acts, j + 1, s, e) for j, (s, e) in enumerate(blocks)):
            out.append(blocks)
    return out


def _block_ok(net: RefNet, widths, acts, j: int, s: int, e: int) -> bool:
    T, Ts, w = net.T, len(widths), widths[j - 1]
    if (s == 1) != (j == 1) or (e == T) != (j == Ts):
        return False
    if any(net.widths[p - 1] < w for p in range(s, e + 1)):
        return False
    if (s == 1 and net.widths[0] != w) or (e == T and net.widths[T - 1] != w):
        return False
    if net.rnn and e == T and s < T:
        return False
    if acts[j - 1] != net.acts[s - 1]:
        return False
    a = net.acts[s - 1]
    return all(
        net.acts[p - 1] == "identity" or (net.acts[p - 1] == a and a in IDEMPOTENT)
        for p in range(s + 1, e + 1)
    )


class _State:
    """The current net, the teacher index of each current parameter, and B with targets."""

    def __init__(self, net: RefNet, mean, cov) -> None:
        self.net, self.mean, self.cov = net, mean, cov
        self.origin = {k: q for q, k in enumerate(net.params())}  # current key -> teacher
        self.tpos = list(range(1, net.T + 1))  # teacher position of each current position
        self.B: dict[int, float] = {}

    def cost(self, extra: dict[int, float] | None = None) -> float:
        B = dict(self.B)
        B.update(extra or {})
        keys = sorted(B)
        return constraint_cost(self.mean, self.cov, keys, [B[k] for k in keys])

    def effect(self, op) -> dict[int, float]:
        cond, _, _, _ = ref_effect(self.net, op)
        return {self.origin[k]: v for k, v in cond.items()}

    def apply(self, op) -> None:
        cond, _, new, old_key = ref_effect(self.net, op)
        for k, v in cond.items():
            assert self.origin[k] not in self.B
            self.B[self.origin[k]] = v
        self.origin = {k: self.origin[old_key(k)] for k in new.params()}
        if op[0] == "psi":
            del self.tpos[op[1] - 1]
        self.net = new


#: Increments this close (relative to the cost so far) are ties, broken by the lowest
#: index: rounding must not decide between two equally cheap neurons.
TIE = 1e-9


def _least(incs: list[float], base: float) -> int:
    m = min(incs)
    tol = TIE * max(1.0, abs(base) + abs(m))
    return next(i for i, x in enumerate(incs) if x <= m + tol)


def _greedy_route(net: RefNet, mean, cov, widths, route) -> float:
    st = _State(net, mean, cov)
    for j in range(len(widths), 0, -1):
        s, e, w = *route[j - 1], widths[j - 1]
        t = st.tpos.index(e) + 1
        if 1 < t < st.net.T:  # the block's top shrinks by φ, one neuron at a time
            while st.net.widths[t - 1] > w:
                base = st.cost()
                incs = [
                    st.cost(st.effect(("phi", t, i))) - base for i in range(st.net.widths[t - 1])
                ]
                st.apply(("phi", t, _least(incs, base)))
        for p in range(e, s, -1):  # layers removed by ψ, from the top down
            t = st.tpos.index(p) + 1
            n_rows, n_cols = st.net.widths[t - 1], st.net.widths[t - 2]
            keys = [("U", t, k, l) for k in range(n_rows) for l in range(n_cols)]
            if st.net.bias:
                keys += [("b", t, k, 0) for k in range(n_rows)]
            if st.net.rnn and t < st.net.T:
                keys += [("V", t, k, l) for k in range(n_rows) for l in range(n_rows)]
            P = [st.origin[k] for k in keys]
            Bk = sorted(st.B)
            d = np.array([st.B[k] for k in Bk]) - mean[Bk]
            S = cov[np.ix_(P, P)]
            mu = mean[P].copy()
            if Bk:
                X = np.linalg.solve(cov[np.ix_(Bk, Bk)], cov[np.ix_(Bk, P)])
                S = S - cov[np.ix_(P, Bk)] @ X
                mu = mu + X.T @ d
            Q = np.linalg.inv(S)
            lin = 0.5 * np.diag(Q) - Q @ mu  # a target going from 0 to 1
            C = lin[: n_rows * n_cols].reshape(n_rows, n_cols)
            rows, cols = linear_sum_assignment(C)
            pairing = [0] * n_rows
            for r, c in zip(rows, cols, strict=True):
                pairing[r] = int(c)
            for c in sorted(set(range(n_cols)) - set(pairing), reverse=True):
                st.apply(("phi", t - 1, c))  # indices above c do not move: descending
                pairing = [x - (x > c) for x in pairing]
            st.apply(("psi", t, pairing))
    return st.cost()


def ref_greedy(net: RefNet, mean, cov, widths: list[int], acts: list[str]) -> float:
    """The cost of the greedy of exact increments (docs/theory.md §6), the least over routes."""
    costs = [_greedy_route(net, mean, cov, widths, r) for r in ref_routes(net, widths, acts)]
    assert costs, "the student is not in the lattice"
    return min(costs)


def _ops(net: RefNet):
    for kind, t in valid_ops(net):
        if kind == "phi":
            for i in range(net.widths[t - 1]):
                yield ("phi", t, i)
        else:
            for pi in itertools.permutations(range(net.widths[t - 1])):
                yield ("psi", t, list(pi))


def brute_force(net: RefNet, mean, cov, widths: list[int], acts: list[str]) -> float:
    """The least cost over every valid sequence of operations reaching the student."""
    target = (list(widths), list(acts))
    best = np.inf

    def reachable(n: RefNet) -> bool:
        if len(n.widths) < len(widths):
            return False
        return any(_route_ok(n, widths, acts, r) for r in _compositions(n.T, len(widths)))

    def go(n: RefNet, ops: list) -> None:
        nonlocal best
        if (list(n.widths), list(n.acts)) == target:
            *_, costs = ref_apply(net, mean, cov, ops)
            best = min(best, sum(costs))
            return
        for op in _ops(n):
            cond_net = ref_effect(n, op)[2]
            if reachable(cond_net):
                go(cond_net, [*ops, op])

    go(net, [])
    return best


def _compositions(T: int, Ts: int):
    for cuts in itertools.combinations(range(2, T + 1), Ts - 1):
        starts = [1, *cuts]
        yield list(zip(starts, [c - 1 for c in cuts] + [T], strict=True))


def _route_ok(net: RefNet, widths, acts, blocks) -> bool:
    return all(_block_ok(net, widths, acts, j + 1, s, e) for j, (s, e) in enumerate(blocks))
