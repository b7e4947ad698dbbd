"""Which students a network reaches, and by which residual blocks (docs/theory.md §13).

A student of a :class:`~planner.stages.Network` teacher has the teacher's stages, less
residual blocks that ψ can remove (identity shortcut, the activation rule) and plain
layers that ψ can remove (a conv of stride 1 with an odd kernel padded to keep its
size, or a linear layer on features; the activation rule; a space no residual block
left in the student writes too), with every layer's width between 1 and the
teacher's; kernels, strides, paddings, pools, the input and the output are the
teacher's.  A removed plain layer's output space merges into its input space, so
both are shrunk to the width the student gives that space.  Which blocks and layers
of a run of alike stages go is the planner's choice: each way of matching the
student's stages to the teacher's is a :class:`NetRoute`, scored by exact costs like
an MLP's routes.

Examples
--------
>>> from planner.stages import Network
>>> block = {"type": "residual", "activation": "relu", "branch": [
...     {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "activation": "relu"},
...     {"type": "conv", "out": 4, "kernel": 3, "padding": 1}]}
>>> head = [{"type": "pool", "mode": "avg", "global": True}, {"type": "flatten"},
...         {"type": "linear", "out": 2}]
>>> stem = {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "activation": "relu"}
>>> teacher = Network.from_json({"input": [1, 6, 6], "stages": [stem, block, block, *head]})
>>> small = dict(stem, out=3)
>>> student = Network.from_json({"input": [1, 6, 6], "stages": [
...     small, dict(block, branch=[dict(block["branch"][0], out=2),
...                                 dict(block["branch"][1], out=3)]), *head]})
>>> [r.removed_blocks for r in network_routes(teacher, student)]
[(1,), (2,)]
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .errors import NotInLattice, TooLarge
from .lattice import _paths
from .ops import identity_reason
from .stages import Conv, Flatten, Linear, Network, Pool, Residual
from .structure import IDEMPOTENT as _IDEMPOTENT

__all__ = [
    "MAX_ALIGNMENTS",
    "NetRoute",
    "count_network_sequences",
    "enumerate_network_sequences",
    "network_routes",
]

#: Ways of matching a student's stages at most (a teacher with many removable blocks).
MAX_ALIGNMENTS = 4096


@dataclass(frozen=True)
class NetRoute:
    """The teacher blocks and plain layers a student leaves out, and the width every
    teacher space must reach (``widths``: (teacher space, width) pairs, in space order):
    a surviving space's student width, or, for the output space of a removed layer, the
    width of the space it merges into."""

    removed_blocks: tuple[int, ...]
    widths: tuple[tuple[int, int], ...]
    removed_layers: tuple[int, ...] = ()  # teacher layer numbers (ψ on a plain layer)

    @property
    def blocks(self) -> tuple[int, ...]:  # what a search result reports as its route
        return self.removed_blocks

    def to_json(self) -> dict:
        out: dict = {"removed_blocks": list(self.removed_blocks)}
        if self.removed_layers:
            out["removed_layers"] = list(self.removed_layers)
        return out

    def describe(self) -> str:
        parts = [f"blocks {list(self.removed_blocks)}"] if self.removed_blocks else []
        parts += [f"layers {list(self.removed_layers)}"] if self.removed_layers else []
        return " and ".join(parts) + " removed" if parts else "nothing removed"


def _kind(st) -> str:
    return {Conv: "conv", Linear: "linear", Pool: "pool", Flatten: "flatten"}.get(
        type(st), "residual"
    )


def _layer_reason(t, s, where: str) -> str | None:
    if type(t) is not type(s):
        return f"{where} is a {_kind(s)} layer where the teacher has a {_kind(t)} layer"
    fields = ["bias", "activation"] + (
        ["kernel", "stride", "padding"] if isinstance(t, Conv) else []
    )
    for f in fields:
        if getattr(t, f) != getattr(s, f):
            return f"{where}.{f} is {getattr(s, f)!r}; the teacher's is {getattr(t, f)!r}"
    if s.out > t.out:
        return f"{where}.out is {s.out}, wider than the teacher's {t.out}"
    return None


def _stage_reason(t, s, where: str) -> str | None:
    """Why student stage ``s`` cannot be teacher stage ``t`` with fewer channels."""
    if _kind(t) != _kind(s):
        return f"{where} is a {_kind(s)} stage where the teacher has a {_kind(t)} stage"
    if isinstance(t, Conv | Linear):
        return _layer_reason(t, s, where)
    if isinstance(t, Pool | Flatten):
        return None if t == s else f"{where} differs from the teacher's {t.to_json()}"
    if len(t.branch) != len(s.branch):
        return f"{where} has {len(s.branch)} branch layers; the teacher's block has {len(t.branch)}"
    for k, (a, b) in enumerate(zip(t.branch, s.branch, strict=True)):
        why = _layer_reason(a, b, f"{where}.branch[{k}]")
        if why:
            return why
    if (t.shortcut is None) != (s.shortcut is None):
        return f"{where}.shortcut must be {'none' if t.shortcut is None else 'a projection'}"
    if t.shortcut is not None:
        why = _layer_reason(t.shortcut, s.shortcut, f"{where}.shortcut")
        if why:
            return why
    if t.activation != s.activation:
        return f"{where}.activation is {s.activation!r}; the teacher's is {t.activation!r}"
    return None


def _removable(teacher: Network, number: int) -> str | None:
    b = teacher.graph.blocks[number - 1]
    if b.projection is not None:
        return "its shortcut is a projection"
    before = teacher.layers[b.branch[0]].input_activation
    if b.activation == "identity" or (b.activation == before and b.activation in _IDEMPOTENT):
        return None
    return (
        f"its activation {b.activation} is neither the identity nor the idempotent activation "
        f"its input already passed ({before or 'none'})"
    )


def _layer_removable(teacher: Network, unit) -> str | None:
    """Why ψ could never remove plain layer ``unit`` of ``teacher`` (whatever the widths),
    or ``None``; a residual block writing its output space too is checked per route."""
    if unit.out in teacher.graph.fixed:
        return "it writes the network's output"
    seg = unit.segments[0]
    return identity_reason(teacher.layers[unit.index], seg.group, teacher.graph.width(seg.space))


def network_routes(teacher: Network, student: Network) -> list[NetRoute]:
    """Every way ``student`` comes from ``teacher`` (teacher blocks and layers left out,
    widths).

    Raises
    ------
    NotInLattice
        Naming the student's stage and field, or the teacher block that cannot go.
    """
    if not isinstance(student, Network):
        raise NotInLattice(
            "the teacher is a network: give the student as a network too "
            '({"input": [...], "stages": [...]})',
            field="student",
        )
    if student.input_shape != teacher.input_shape:
        raise NotInLattice(
            f"the student's input {list(student.input_shape)} is not the teacher's "
            f"{list(teacher.input_shape)}",
            field="student.input",
        )
    ts, ss = teacher.stages, student.stages
    block_of = {}  # teacher stage index -> block number
    n = 0
    for i, st in enumerate(ts):
        if isinstance(st, Residual):
            n += 1
            block_of[i] = n
    removable = {i: _removable(teacher, block_of[i]) for i in block_of}
    unit_of = {teacher.layers[u.index].top: u for u in teacher.graph.units}
    unit_of = {i: u for i, u in unit_of.items() if i is not None}
    plain = {i: _layer_removable(teacher, u) for i, u in unit_of.items()}
    found: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    deepest: list = [(-1, -1, "")]  # the furthest failure: (student stage, teacher stage, why)

    def walk(i: int, j: int, removed: tuple[int, ...], layers: tuple[int, ...] = ()) -> None:
        if len(found) >= MAX_ALIGNMENTS:
            return
        if j == len(ss) and i == len(ts):
            found.append((removed, layers))
            return
        if i < len(ts) and i in block_of and removable[i] is None:
            walk(i + 1, j, (*removed, block_of[i]), layers)
        if i < len(ts) and plain.get(i, "") is None:
            walk(i + 1, j, removed, (*layers, unit_of[i].layer))
        if i == len(ts) or j == len(ss):
            if j < len(ss):
                _fail(deepest, j, i, f"student stages[{j}] is past the teacher's last stage")
            elif i in block_of:
                _fail(
                    deepest,
                    j,
                    i,
                    f"teacher block {block_of[i]} (stages[{i}]) cannot be removed: {removable[i]}",
                )
            elif i in plain:
                _fail(
                    deepest,
                    j,
                    i,
                    f"teacher layer {unit_of[i].layer} (stages[{i}]) cannot be removed by ψ: "
                    f"{plain[i]}",
                )
            else:
                _fail(
                    deepest,
                    j,
                    i,
                    f"the student stops where the teacher has stages[{i}] "
                    f"({_kind(ts[i])}), which cannot be removed",
                )
            return
        why = _stage_reason(ts[i], ss[j], f"student stages[{j}]")
        if why is None:
            walk(i + 1, j + 1, removed, layers)
        else:
            if i in block_of and removable[i] is not None:
                why += f" (and teacher block {block_of[i]} cannot be removed: {removable[i]})"
            if plain.get(i):
                why += f" (and teacher layer {unit_of[i].layer} cannot be removed: {plain[i]})"
            _fail(deepest, j, i, why)

    walk(0, 0, ())
    if not found:
        raise NotInLattice(deepest[0][2], field="student")
    out = []
    g = teacher.graph
    t_units, s_units = g.units, student.graph.units
    why_not = ""
    for removed, layers in found:
        gone = {u for b in removed for u in g.blocks[b - 1].branch}
        merged = {u.index: u for u in t_units if u.layer in layers}
        kept = [u for u in t_units if u.index not in gone and u.index not in merged]
        widths = {}
        for tu, su in zip(kept, s_units, strict=True):
            widths[tu.out] = su.rows
        widths[1] = g.width(1)
        out_space = max(g.fixed)
        if widths[out_space] != g.width(out_space):
            raise NotInLattice(
                f"the student's output width {widths[out_space]} is not the teacher's "
                f"{g.width(out_space)}: the output is not removable",
                field="student",
            )
        why = None
        for u in merged.values():  # in layout order: a chain of removed layers merges down
            src = u.segments[0].space
            writers = [b.number for b in g.blocks if b.writes == u.out and b.number not in removed]
            if writers:
                why = (
                    f"teacher layer {u.layer} cannot be removed: blocks {writers} write its "
                    "output too"
                )
            elif widths[src] > min(g.width(src), g.width(u.out)):
                why = (
                    f"teacher layer {u.layer} cannot be removed: its spaces merge at width "
                    f"{widths[src]}, wider than the teacher's {min(g.width(src), g.width(u.out))}"
                )
            widths[u.out] = widths[src]
        if why:
            why_not = why_not or why
            continue
        out.append(NetRoute(tuple(removed), tuple(sorted(widths.items())), tuple(layers)))
    if not out:
        raise NotInLattice(why_not, field="student")
    return out


def _fail(deepest: list, j: int, i: int, why: str) -> None:
    """Keep the failure that got furthest into the student, with the fewest teacher blocks
    skipped to get there (the match a user means)."""
    if deepest[0][0] < 0 or (j, -i) > (deepest[0][0], -deepest[0][1]):
        deepest[0] = (j, i, why)


# -- structure-level sequences (docs/theory.md §13) ------------------------------------------
#: A structure-level step in the teacher's terms: ("phi", space), ("block", b), ("layer", l).
NetStep = tuple[str, int]


class _Walk:
    """The structure-level steps of one route: φ on a space (which channel is not a
    structure-level choice), ψ on a block the route removes, ψ on a layer it removes once
    its two spaces are equally wide, each keeping the student reachable.  A state is the
    width of every teacher space (0: gone) and what the route has removed so far (sorted:
    the same removals in another order are the same state)."""

    def __init__(self, teacher: Network, route: NetRoute) -> None:
        g = teacher.graph
        self.g, self.route = g, route
        self.blocks = route.removed_blocks
        self.layers = route.removed_layers
        self.units = {u.layer: u for u in g.units if u.layer in self.layers}
        self.target = dict(route.widths)
        self.inner = {s: b.number for b in g.blocks if b.number in self.blocks for s in b.inner}
        self.start = (tuple(g.widths), (), ())

    def _space(self, merged: dict[int, int], s: int) -> int:
        while s in merged:
            s = merged[s]
        return s

    def steps(self, state) -> list[tuple[NetStep, tuple]]:
        widths, gone_b, gone_l = state
        merged = {self.units[m].out: self.units[m].segments[0].space for m in gone_l}
        out = []
        for s, w in enumerate(widths, start=1):
            if not w or s in self.g.fixed:
                continue
            floor = 1 if s in self.inner else self.target[s]
            if w > floor:
                nw = list(widths)
                nw[s - 1] -= 1
                out.append((("phi", s), (tuple(nw), gone_b, gone_l)))
        for b in self.blocks:
            if b not in gone_b:
                nw = list(widths)
                for s in self.g.blocks[b - 1].inner:
                    nw[s - 1] = 0
                out.append((("block", b), (tuple(nw), tuple(sorted((*gone_b, b))), gone_l)))
        for m in self.layers:
            if m in gone_l:
                continue
            u = self.units[m]
            src = self._space(merged, u.segments[0].space)
            writers = [
                b.number for b in self.g.blocks if b.writes == u.out and b.number not in gone_b
            ]
            if writers or widths[src - 1] != widths[u.out - 1]:
                continue
            nw = list(widths)
            nw[u.out - 1] = 0
            out.append((("layer", m), (tuple(nw), gone_b, tuple(sorted((*gone_l, m))))))
        return out

    def done(self, state) -> bool:
        widths, gone_b, gone_l = state
        return (
            len(gone_b) == len(self.blocks)
            and len(gone_l) == len(self.layers)
            and all(
                w == self.target[s] for s, w in enumerate(widths, start=1) if w and s in self.target
            )
        )


def count_network_sequences(teacher: Network, student: Network, max_states: int) -> int:
    """The exact number of structure-level sequences from ``teacher`` to ``student``: per
    route, the paths of :class:`_Walk` (φ on a space, ψ on a block or a layer, in the
    teacher's numbering), counted over its states (found forwards, then summed backwards:
    every step lowers the widths left plus the removals left, so no recursion).

    Raises
    ------
    NotInLattice
        If the student is not reachable.
    TooLarge
        If counting would visit more than ``max_states`` states.
    """
    total = 0
    seen = 0
    for route in network_routes(teacher, student):
        walk = _Walk(teacher, route)
        nexts: dict = {}
        todo = [walk.start]
        while todo:
            state = todo.pop()
            if state in nexts:
                continue
            seen += 1
            if seen > max_states:
                raise TooLarge(
                    f"counting the sequences would visit more than {max_states} lattice states",
                    field="student",
                )
            nexts[state] = [] if walk.done(state) else [n for _, n in walk.steps(state)]
            todo.extend(n for n in nexts[state] if n not in nexts)

        def left(state) -> int:
            widths, gone_b, gone_l = state
            return sum(widths) - len(gone_b) - len(gone_l)

        paths: dict = {}
        for state in sorted(nexts, key=left):
            paths[state] = sum(paths[n] for n in nexts[state]) if nexts[state] else 1
        total += paths[walk.start]
    return total


def enumerate_network_sequences(
    teacher: Network, student: Network, limit: int
) -> list[list[NetStep]]:
    """Up to ``limit`` structure-level sequences, route by route, steps in the order
    :class:`_Walk` lists them (every state reaches the student: no dead end), walked
    without recursion by the MLP lattice's own path walker."""
    out: list[list[NetStep]] = []
    for route in network_routes(teacher, student):
        walk = _Walk(teacher, route)

        def children(state, walk=walk):
            return None if walk.done(state) else walk.steps(state)

        for seq in itertools.islice(_paths(walk.start, children), limit - len(out)):
            out.append(seq)
        if len(out) >= limit:
            break
    return out
