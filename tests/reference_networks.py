"""A slow, obviously correct reference for convolutional and residual networks
(docs/theory.md §13), written from the definitions alone.

It reads the structure JSON itself (not ``planner.stages``), names every
parameter by a key ``("W", layer, row, channel, q)`` (``q`` the place inside
the channel's group of columns: kernel offset, flattened pixel, or 0) or
``("b", layer, row)``, numbers spaces by their first producer, and applies each
φ/ψ as a dense Gaussian step on a dict of keys (conditioning with
``numpy.linalg.solve``, marginalising by dropping keys).  For tests only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IDEMPOTENT = {"identity", "relu", "relu6", "hardtanh", "step"}


def _pair(v, default):
    v = default if v is None else v
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass
class RLayer:
    number: int
    kind: str  # conv | linear
    out: int  # width
    inp: int  # channels read
    group: int  # columns per channel
    bias: bool
    reads: int  # space
    writes: int  # space
    top: bool
    block: int | None
    conv: dict = field(default_factory=dict)
    act: str = "identity"
    act_in: str | None = None


@dataclass
class RBlock:
    number: int
    layers: list[int]  # branch layer numbers
    projection: int | None
    inner: list[int]
    act: str
    act_in: str | None


class RefNetwork:
    """Layers in module order, spaces by first producer, blocks, keys in layout order."""

    def __init__(self, d: dict) -> None:
        self.input = list(d["input"])
        self.layers: list[RLayer] = []
        self.blocks: list[RBlock] = []
        self.widths = {1: self.input[0]}
        shape = list(self.input)
        space, act = 1, None
        for st in d["stages"]:
            t = st["type"]
            if t in ("conv", "linear"):
                new = self._space(st["out"])
                shape = self._layer(st, shape, space, new, True, None, act)
                space, act = new, st.get("activation", "identity")
            elif t == "pool":
                if st.get("global"):
                    shape = [shape[0], 1, 1]
                else:
                    k = _pair(st.get("kernel"), 2)
                    s = _pair(st.get("stride"), k[0]) if st.get("stride") is not None else k
                    p = _pair(st.get("padding"), 0)
                    shape = [
                        shape[0],
                        (shape[1] + 2 * p[0] - k[0]) // s[0] + 1,
                        (shape[2] + 2 * p[1] - k[1]) // s[1] + 1,
                    ]
                if st.get("mode", "avg" if st.get("global") else "max") == "avg" and act == "step":
                    act = None
            elif t == "flatten":
                shape = [int(np.prod(shape))]
            else:  # residual
                number = len(self.blocks) + 1
                names, inner = [], []
                cur, cur_shape, cur_act = space, shape, act
                proj = st.get("shortcut")
                branch = st["branch"]
                out_space = space
                for j, b in enumerate(branch):
                    if j < len(branch) - 1:
                        new = self._space(b["out"])
                        inner.append(new)
                    else:
                        new = space if proj is None else self._space(b["out"])
                        out_space = new
                    cur_shape = self._layer(b, cur_shape, cur, new, False, number, cur_act)
                    names.append(self.layers[-1].number)
                    cur, cur_act = new, b.get("activation", "identity")
                pnum = None
                if proj is not None:
                    self._layer(proj, shape, space, out_space, False, number, act)
                    pnum = self.layers[-1].number
                self.blocks.append(
                    RBlock(number, names, pnum, inner, st.get("activation", "identity"), act)
                )
                shape, space, act = cur_shape, out_space, st.get("activation", "identity")
        self.output = space

    def _space(self, width: int) -> int:
        n = len(self.widths) + 1
        self.widths[n] = width
        return n

    def _layer(self, st, shape, reads, writes, top, block, act_in):
        number = len(self.layers) + 1
        if st["type"] == "conv":
            k = _pair(st.get("kernel"), 3)
            s = _pair(st.get("stride"), 1)
            p = _pair(st.get("padding"), 0)
            group = k[0] * k[1]
            out_shape = [
                st["out"],
                (shape[1] + 2 * p[0] - k[0]) // s[0] + 1,
                (shape[2] + 2 * p[1] - k[1]) // s[1] + 1,
            ]
            conv = {"kernel": k, "stride": s, "padding": p}
        else:
            group = shape[0] // self.widths[reads]
            out_shape = [st["out"]]
            conv = {}
        self.layers.append(
            RLayer(
                number,
                st["type"],
                st["out"],
                self.widths[reads],
                group,
                st.get("bias", True),
                reads,
                writes,
                top,
                block,
                conv,
                st.get("activation", "identity"),
                act_in,
            )
        )
        return out_shape

    def keys(self) -> list[tuple]:
        """Every parameter, in the torch module's order."""
        out = []
        for L in self.layers:
            out += [
                ("W", L.number, o, i, q)
                for o in range(L.out)
                for i in range(L.inp)
                for q in range(L.group)
            ]
            if L.bias:
                out += [("b", L.number, o) for o in range(L.out)]
        return out

    def kron_covariance(self, G: dict, A: dict, bias: dict) -> np.ndarray:
        """The dense covariance of a K-FAC posterior, from its definition on the keys:
        ``Cov(W[o, i, q], W[o', i', q']) = G[o, o'] A[i·group + q, i'·group + q']`` within a
        layer, bias variances (or covariances) on their own, layers independent."""
        keys = self.keys()
        out = np.zeros((len(keys), len(keys)))
        for a, ka in enumerate(keys):
            for b, kb in enumerate(keys):
                if ka[0] != kb[0] or ka[1] != kb[1]:
                    continue
                n = ka[1]
                if ka[0] == "W":
                    g = self.layers[n - 1].group
                    out[a, b] = G[n][ka[2], kb[2]] * A[n][ka[3] * g + ka[4], kb[3] * g + kb[4]]
                else:
                    v = np.asarray(bias[n])
                    out[a, b] = v[ka[2], kb[2]] if v.ndim == 2 else float(ka[2] == kb[2]) * v[ka[2]]
        return out


@dataclass
class RefState:
    """Live layers with their row ids and column-channel ids (current order), live spaces
    with their widths, and the Gaussian over the live keys."""

    net: RefNetwork
    rows: dict[int, list[int]]
    cols: dict[int, list[int]]
    reads: dict[int, int]
    writes: dict[int, int]
    spaces: dict[int, int]  # live space -> current width
    keys: list[tuple]
    mean: np.ndarray
    cov: np.ndarray
    cost: float = 0.0

    @classmethod
    def start(cls, net: RefNetwork, mean, cov) -> RefState:
        cov = (np.asarray(cov) + np.asarray(cov).T) / 2  # a matrix is read as its symmetric part
        return cls(
            net,
            {L.number: list(range(L.out)) for L in net.layers},
            {L.number: list(range(L.inp)) for L in net.layers},
            {L.number: L.reads for L in net.layers},
            {L.number: L.writes for L in net.layers},
            dict(net.widths),
            net.keys(),
            np.asarray(mean, float).copy(),
            cov.copy(),
        )

    # -- Gaussian steps ----------------------------------------------------------------
    def condition(self, targets: dict[tuple, float]) -> None:
        pos = {k: q for q, k in enumerate(self.keys)}
        B = [pos[k] for k in targets]
        v = np.array(list(targets.values()))
        rest = [q for q in range(len(self.keys)) if q not in set(B)]
        S_BB = self.cov[np.ix_(B, B)]
        d = v - self.mean[B]
        self.cost += 0.5 * float(d @ np.linalg.solve(S_BB, d))
        K = np.linalg.solve(S_BB, self.cov[np.ix_(B, rest)]).T
        self.mean = self.mean[rest] + K @ d
        self.cov = self.cov[np.ix_(rest, rest)] - K @ self.cov[np.ix_(B, rest)]
        self.keys = [self.keys[q] for q in rest]

    def drop(self, gone: set[tuple]) -> None:
        keep = [q for q, k in enumerate(self.keys) if k not in gone]
        self.mean = self.mean[keep]
        self.cov = self.cov[np.ix_(keep, keep)]
        self.keys = [self.keys[q] for q in keep]

    def layer_keys(self, n: int) -> list[tuple]:
        L = self.net.layers[n - 1]
        out = [
            ("W", n, o, i, q) for o in self.rows[n] for i in self.cols[n] for q in range(L.group)
        ]
        if L.bias:
            out += [("b", n, o) for o in self.rows[n]]
        return out

    # -- φ and ψ (docs/theory.md §13) ----------------------------------------------------
    def phi(self, space: int, c: int) -> None:
        live = set(self.keys)
        targets = {}
        for n in self.rows:
            if self.reads[n] == space:
                ch = self.cols[n][c]
                L = self.net.layers[n - 1]
                for o in self.rows[n]:
                    for q in range(L.group):
                        targets[("W", n, o, ch, q)] = 0.0
        self.condition(targets)
        gone = set()
        for n in self.rows:
            if self.writes[n] == space:
                r = self.rows[n][c]
                gone |= {k for k in live if k[1] == n and k[2] == r and k not in targets}
        self.drop(gone)
        for n in self.rows:
            if self.writes[n] == space:
                del self.rows[n][c]
            if self.reads[n] == space:
                del self.cols[n][c]
        self.spaces[space] -= 1

    def psi_block(self, b: int) -> None:
        blk = self.net.blocks[b - 1]
        last = blk.layers[-1]
        self.condition(dict.fromkeys(self.layer_keys(last), 0.0))
        gone = set()
        for n in blk.layers[:-1]:
            gone |= set(self.layer_keys(n))
        self.drop(gone)
        for n in blk.layers:
            for d in (self.rows, self.cols, self.reads, self.writes):
                del d[n]
        for s in blk.inner:
            del self.spaces[s]

    def psi_layer(self, n: int, pairing: list[int]) -> None:
        L = self.net.layers[n - 1]
        centre = L.group // 2
        targets = {}
        for k, o in enumerate(self.rows[n]):
            for j, i in enumerate(self.cols[n]):
                for q in range(L.group):
                    targets[("W", n, o, i, q)] = 1.0 if (j == pairing[k] and q == centre) else 0.0
        if L.bias:
            for o in self.rows[n]:
                targets[("b", n, o)] = 0.0
        self.condition(targets)
        out, src = self.writes[n], self.reads[n]
        for m in self.rows:
            if m != n and self.reads[m] == out:
                new = [None] * len(self.cols[m])
                for k, ch in enumerate(self.cols[m]):
                    new[pairing[k]] = ch
                self.cols[m] = new
                self.reads[m] = src
        for d in (self.rows, self.cols, self.reads, self.writes):
            del d[n]
        del self.spaces[out]

    # -- what is left ----------------------------------------------------------------------
    def student_order(self) -> list[tuple]:
        out = []
        for n in sorted(self.rows):
            out += self.layer_keys(n)
        return out

    def result(self):
        """(mean, covariance) of the live keys in the student's layout order, and the cost."""
        pos = {k: q for q, k in enumerate(self.keys)}
        order = [pos[k] for k in self.student_order()]
        assert len(order) == len(self.keys)
        return self.mean[order], self.cov[np.ix_(order, order)], self.cost

    # -- which steps are valid ------------------------------------------------------------
    def valid(self) -> list[tuple]:
        net = self.net
        out = []
        for s, w in self.spaces.items():
            if s not in (1, net.output) and w >= 2:
                out.append(("phi", s))
        for blk in net.blocks:
            if blk.layers[0] not in self.rows or blk.projection is not None:
                continue
            if blk.act == "identity" or (blk.act in IDEMPOTENT and blk.act == blk.act_in):
                out.append(("block", blk.number))
        for n in self.rows:
            L = net.layers[n - 1]
            if not L.top or L.writes == net.output:
                continue
            if sum(1 for m in self.rows if self.writes[m] == L.writes) != 1:
                continue
            if len(self.rows[n]) != len(self.cols[n]):
                continue
            if L.kind == "conv":
                k, s, p = L.conv["kernel"], L.conv["stride"], L.conv["padding"]
                if s != (1, 1) or k[0] % 2 == 0 or k[1] % 2 == 0 or p != (k[0] // 2, k[1] // 2):
                    continue
            elif L.group != 1:
                continue
            if L.act == "identity" or (L.act in IDEMPOTENT and L.act == L.act_in):
                out.append(("layer", n))
        return out


# -- the search's references (docs/theory.md §6, §13) ---------------------------------------
def _skeleton(stages: list[dict]) -> list:
    """The stages without their widths."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "out"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(stages)


def _layer_removable(net: RefNetwork, L: RLayer) -> bool:
    """Whether ψ may ever remove plain layer L (whatever the widths and the blocks)."""
    if not L.top or L.writes == net.output:
        return False
    if L.kind == "conv":
        k, s, p = L.conv["kernel"], L.conv["stride"], L.conv["padding"]
        if s != (1, 1) or k[0] % 2 == 0 or k[1] % 2 == 0 or p != (k[0] // 2, k[1] // 2):
            return False
    elif L.group != 1:
        return False
    return L.act == "identity" or (L.act in IDEMPOTENT and L.act == L.act_in)


def ref_routes(teacher: dict, student: dict) -> list[tuple]:
    """Every (removed blocks, removed plain layers, target width of every teacher space
    that survives or merges): subsets of the removable blocks and layers whose removal
    leaves the student's stages up to widths."""
    import itertools

    net = RefNetwork(teacher)
    p = len(net.keys())
    removable = [
        b for kind, b in RefState.start(net, np.zeros(p), np.eye(p)).valid() if kind == "block"
    ]
    plain = [L.number for L in net.layers if _layer_removable(net, L)]
    stage_of, n = {}, 0
    for i, st in enumerate(teacher["stages"]):
        if st["type"] == "residual":
            n += 1
            stage_of[n] = i
    layer_stage = dict(  # a plain stage is one top-level layer, in order
        zip(
            [L.number for L in net.layers if L.top],
            [i for i, st in enumerate(teacher["stages"]) if st["type"] in ("conv", "linear")],
            strict=True,
        )
    )
    out = []
    snet = RefNetwork(student)
    options = [("block", b) for b in removable] + [("layer", m) for m in plain]
    for k in range(len(options) + 1):
        for chosen in itertools.combinations(options, k):
            R = tuple(b for kind, b in chosen if kind == "block")
            Ls = tuple(m for kind, m in chosen if kind == "layer")
            dropped = {stage_of[b] for b in R} | {layer_stage[m] for m in Ls}
            kept = [st for i, st in enumerate(teacher["stages"]) if i not in dropped]
            if _skeleton(kept) != _skeleton(student["stages"]):
                continue
            gone = {n for b in R for n in net.blocks[b - 1].layers} | set(Ls)
            layers = [L for L in net.layers if L.number not in gone]
            widths = {1: net.widths[1]}
            for L, S in zip(layers, snet.layers, strict=True):
                widths[L.writes] = S.out
            ok = True
            for m in Ls:  # in layer order: a chain merges down
                L = net.layers[m - 1]
                writers = [
                    b.number
                    for b in net.blocks
                    if b.number not in R and net.layers[b.layers[-1] - 1].writes == L.writes
                ]
                ok = ok and not writers
                widths[L.writes] = widths[L.reads]
            if ok and all(w <= net.widths[s] for s, w in widths.items()):
                out.append((R, Ls, widths))
    return out


def _steps(state: RefState, pending: list, target: dict[int, int]) -> list[tuple]:
    """The next steps, in the tie order: φ by space then channel, then ψ by block, then ψ
    on each plain layer still to go whose spaces are square, with every pairing."""
    import itertools

    out = [
        ("phi", s, c)
        for s in sorted(target)
        if s in state.spaces and state.spaces[s] > target[s]
        for c in range(state.spaces[s])
    ]
    out += [("block", b) for kind, b in pending if kind == "block"]
    valid = set(state.valid())
    for kind, m in pending:
        if kind == "layer" and ("layer", m) in valid:
            out += [("layer", m, pi) for pi in itertools.permutations(range(len(state.rows[m])))]
    return out


def _do(state: RefState, step: tuple) -> RefState:
    import copy

    nxt = copy.deepcopy(state)
    if step[0] == "phi":
        nxt.phi(step[1], step[2])
    elif step[0] == "block":
        nxt.psi_block(step[1])
    else:
        nxt.psi_layer(step[1], list(step[2]))
    return nxt


def _left(pending: list, step: tuple) -> list:
    return [x for x in pending if x != step[:2]]


def _targets(net: RefNetwork, R, widths: dict[int, int]) -> dict[int, int]:
    inner = {s for b in R for s in net.blocks[b - 1].inner}
    return {s: w for s, w in widths.items() if s not in inner}


def _start(net: RefNetwork, route, mean, cov):
    R, Ls, widths = route
    pending = [("block", b) for b in R] + [("layer", m) for m in Ls]
    return RefState.start(net, mean, cov), pending, _targets(net, R, widths)


def ref_greedy(teacher: dict, student: dict, mean, cov) -> float:
    """The global greedy of exact increments (docs/theory.md §13): per route, at every step
    the step of least exact increment among φ on every channel of every space that must
    shrink, ψ on every block the route removes and ψ with every pairing on every plain
    layer it removes (ties within 1e-9: the first in the tie order); the cheapest route's
    cost."""
    net = RefNetwork(teacher)
    best = np.inf
    for route in ref_routes(teacher, student):
        state, pending, target = _start(net, route, mean, cov)
        while True:
            steps = _steps(state, pending, target)
            if not steps:
                break
            nexts = [_do(state, s) for s in steps]
            inc = np.array([n.cost - state.cost for n in nexts])
            m = inc.min()
            k = int(np.flatnonzero(inc <= m + 1e-9 * max(1.0, abs(state.cost) + abs(m)))[0])
            state = nexts[k]
            pending = _left(pending, steps[k])
        best = min(best, state.cost)
    return best


def ref_brute_force(teacher: dict, student: dict, mean, cov) -> float:
    """The least cost over every route and every sequence of its steps (every pairing)."""
    net = RefNetwork(teacher)
    best = [np.inf]

    def walk(state: RefState, pending: list, target) -> None:
        steps = _steps(state, pending, target)
        if not steps:
            best[0] = min(best[0], state.cost)
        for s in steps:
            walk(_do(state, s), _left(pending, s), target)

    for route in ref_routes(teacher, student):
        walk(*_start(net, route, mean, cov))
    return best[0]


def ref_budget_greedy(teacher: dict, max_params: int, mean, cov, floors=None) -> tuple:
    """The greedy of exact increments that stops at a parameter budget: φ on every channel
    of every space but the input and output (down to its floor, default 1) and ψ on every
    removable block compete; (cost, parameters left)."""
    floors = floors or {}
    net = RefNetwork(teacher)
    state = RefState.start(net, mean, cov)
    while len(state.keys) > max_params:
        steps = [
            ("phi", s, c)
            for s in sorted(state.spaces)
            if s not in (1, net.output) and state.spaces[s] > max(1, floors.get(s, 1))
            for c in range(state.spaces[s])
        ]
        steps += [v for v in state.valid() if v[0] == "block"]
        if not steps:
            break
        nexts = [_do(state, s) for s in steps]
        inc = np.array([n.cost - state.cost for n in nexts])
        m = inc.min()
        state = nexts[int(np.flatnonzero(inc <= m + 1e-9 * max(1.0, abs(state.cost) + abs(m)))[0])]
    return state.cost, len(state.keys)
