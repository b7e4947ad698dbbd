"""The lattice 𝔖_f of structures a teacher generates (docs/theory.md §5).

The lattice itself (structures as nodes, single φ(t)/ψ(t) steps as edges) is
far too large to build for real teachers, so this module works on two compact
objects instead:

* the **route graph** (a networkx DAG): a route assigns each student position j
  a block of consecutive teacher positions ``s..e``; ``s`` survives, ``s+1..e``
  are removed by ψ after being reduced by φ to the student's width.  Node
  ``(s, j)`` says "teacher position s survives as student position j"; an edge
  is a valid block.  The student is in 𝔖_f iff a path reaches ``END``.
* per-block **sequence counts by length**, combined across blocks by shuffle
  products (steps of different blocks interleave freely), which gives the exact
  number of structure-level sequences without visiting the lattice.

Enumeration walks the lattice itself, depth first, pruned by membership, so it
never enters a dead end.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from math import comb

import networkx as nx

from .errors import NotInLattice, TooLarge
from .ops import merge_reason
from .structure import Structure

__all__ = [
    "END",
    "Membership",
    "Route",
    "count_sequences",
    "enumerate_sequences",
    "membership",
    "random_route",
    "route_graph",
    "routes",
]

END = "end"
#: A structure-level step: ("phi", t) or ("psi", t), t the current position.
Step = tuple[str, int]


@dataclass(frozen=True)
class Membership:
    """Whether a student is in 𝔖_f, and why not when it is not."""

    member: bool
    reason: str | None = None


@dataclass(frozen=True)
class Route:
    """Blocks of teacher positions, one per student position: ``blocks[j-1] = (s, e)``."""

    blocks: tuple[tuple[int, int], ...]

    @property
    def removed_layers(self) -> tuple[int, ...]:
        """Teacher positions removed by ψ."""
        return tuple(p for s, e in self.blocks for p in range(s + 1, e + 1))


# -- blocks ---------------------------------------------------------------------------------
def _block_reason(
    f: Structure, g: Structure, s: int, e: int, j: int, activations: bool = True
) -> str | None:
    """Why teacher positions s..e cannot become student position j (None when they can)."""
    w = g.width(j)
    if (s == 1) != (j == 1):
        return "the input position maps to the input position"
    if (e == f.T) != (j == g.T):
        return "the output position maps to the output position"
    for p in range(s, e + 1):
        if f.width(p) < w:
            return f"teacher position {p} has width {f.width(p)} < {w}"
    if (s == 1 and f.width(1) != w) or (e == f.T and f.width(f.T) != w):
        return "input and output widths cannot change"
    if f.kind == "rnn" and e == f.T and s < f.T:
        return "an RNN's output layer cannot be removed"
    if not activations:
        return None
    if f.activation(s) != g.activation(j):
        return (
            f"student position {j} has activation {g.activation(j)}, but it would come from "
            f"teacher position {s} with {f.activation(s)}"
        )
    a = f.activation(s)
    for p in range(s + 1, e + 1):
        why = merge_reason(f.activation(p), a)
        if why and s == 1:
            return (
                f"removing teacher layer {p} ({f.activation(p)}) into the input would change "
                f"the function: ψ({p}) reads the input, so it needs σ_{p} to be the identity "
                f"(the rule of docs/theory.md §3); keep position {p} in the student"
            )
        if why:
            return (
                f"removing teacher layer {p} ({f.activation(p)}) into position {s} ({a}) "
                f"would change the function: ψ({p}) {why} (the rule of docs/theory.md §3)"
            )
    return None


def route_graph(teacher: Structure, student: Structure, activations: bool = True) -> nx.DiGraph:
    """The compact route graph: nodes ``(s, j)``, edges valid blocks (attribute ``block``)."""
    G = nx.DiGraph()
    G.add_node((1, 1))
    for j in range(1, student.T + 1):
        for s in range(1, teacher.T + 1):
            if (s, j) not in G:
                continue
            for e in range(s, teacher.T + 1):
                if _block_reason(teacher, student, s, e, j, activations) is None:
                    nxt = END if j == student.T else (e + 1, j + 1)
                    G.add_edge((s, j), nxt, block=(s, e))
    return G


def routes(teacher: Structure, student: Structure, G: nx.DiGraph | None = None) -> Iterator[Route]:
    """Every valid route, in no particular order."""
    G = route_graph(teacher, student) if G is None else G
    if END not in G:
        return
    for path in nx.all_simple_paths(G, (1, 1), END):
        yield Route(tuple(G.edges[a, b]["block"] for a, b in itertools.pairwise(path)))


def _global_reason(teacher: Structure, student: Structure) -> str | None:
    if teacher.kind != student.kind:
        return f"the student is an {student.kind} and the teacher an {teacher.kind}"
    if teacher.bias != student.bias:
        return "the student and the teacher disagree on biases"
    if student.width(1) != teacher.width(1):
        return f"input width {student.width(1)} differs from the teacher's {teacher.width(1)}"
    if student.width(student.T) != teacher.width(teacher.T):
        return (
            f"output width {student.width(student.T)} differs from the teacher's "
            f"{teacher.width(teacher.T)}"
        )
    if student.T > teacher.T:
        return f"the student has {student.T} positions, more than the teacher's {teacher.T}"
    return None


def _width_reason(teacher: Structure, student: Structure) -> str:
    """Name the first student hidden position no teacher position can host, in order."""
    p = 1
    for j in range(2, student.T):
        w = student.width(j)
        p += 1
        while p < teacher.T and teacher.width(p) < w:
            p += 1
        if p >= teacher.T:
            return (
                f"student position {j} (width {w}) cannot come from any teacher position: "
                f"each student hidden position needs its own, later teacher hidden position "
                f"at least as wide, and none is left"
            )
    return "the hidden positions cannot be reduced to the student's widths"


def membership(teacher: Structure, student: Structure) -> Membership:
    """Whether ``student`` is in 𝔖_f of ``teacher``, with the reason when it is not."""
    reason = _global_reason(teacher, student)
    if reason:
        return Membership(False, reason)
    G = route_graph(teacher, student)
    if END in G and nx.has_path(G, (1, 1), END):
        return Membership(True)
    loose = route_graph(teacher, student, activations=False)
    if END not in loose or not nx.has_path(loose, (1, 1), END):
        return Membership(False, _width_reason(teacher, student))
    path = nx.shortest_path(loose, (1, 1), END)
    for (s, j), b in itertools.pairwise(path):
        _, e = loose.edges[(s, j), b]["block"]
        why = _block_reason(teacher, student, s, e, j)
        if why:
            return Membership(False, why)
    return Membership(False, "no valid sequence of φ and ψ reaches the student")  # pragma: no cover


def require_member(teacher: Structure, student: Structure) -> None:
    m = membership(teacher, student)
    if not m.member:
        raise NotInLattice(m.reason or "not in the lattice", field="student")


def enumerate_sequences(
    teacher: Structure, student: Structure, limit: int = 100
) -> list[list[Step]]:
    """Up to ``limit`` structure-level sequences from teacher to student.

    The route graph is built once; each route's sequences are the shuffles of
    its blocks' own sequences (steps of different blocks interleave freely,
    as in :func:`count_sequences`), so no dead end is ever entered.
    """
    require_member(teacher, student)
    out: list[list[Step]] = []
    if limit <= 0:
        return out
    for route in routes(teacher, student):
        per_block = [(s, e, student.width(j)) for j, (s, e) in enumerate(route.blocks, start=1)]
        alive = list(range(1, teacher.T + 1))
        for seq in _shuffles(teacher, per_block, alive):
            out.append(seq)
            if len(out) >= limit:
                return out
    return out


#: A step inside a block, in teacher positions: ("phi", p) or ("psi", p) (p merges down).
_TStep = tuple[str, int]


def _paths(root, children):
    """Every root-to-leaf path of a tree, as the list of its edge labels, lazily and
    without recursion (a path may be thousands of steps long): ``children(state)`` is
    an iterable of ``(label, child)``, or ``None`` at a leaf (an empty iterable is a
    dead end)."""
    first = children(root)
    if first is None:
        yield []
        return
    stack, path = [iter(first)], []
    while stack:
        nxt = next(stack[-1], None)
        if nxt is None:
            stack.pop()
            if path:
                path.pop()
            continue
        label, child = nxt
        path.append(label)
        below = children(child)
        if below is None:  # a leaf: an answer
            yield list(path)
            path.pop()
        else:
            stack.append(iter(below))


def _block_sequences(f: Structure, s: int, e: int, w: int):
    """Every sequence of the steps inside block s..e (teacher positions), lazily."""
    fixed = {p for p in (1, f.T) if s <= p <= e}

    def children(state):
        live, out_merged = state
        if len(live) == 1 and live[0][1] == w:
            return None
        return list(_block_moves(f, fixed, w, live, out_merged))

    yield from _paths((tuple((p, f.width(p)) for p in range(s, e + 1)), False), children)


def _block_moves(f: Structure, fixed: set[int], w: int, live: tuple, out_merged: bool):
    """The steps possible in a block's state, with the states they lead to."""
    for k, (p, n) in enumerate(live):
        is_output = out_merged and k == len(live) - 1
        if p not in fixed and not is_output and n > w:
            yield ("phi", p), ((*live[:k], (p, n - 1), *live[k + 1 :]), out_merged)
        if k > 0:
            q, nq = live[k - 1]
            if n == nq and merge_reason(f.activation(p), f.activation(q)) is None:
                yield ("psi", p), ((*live[:k], *live[k + 1 :]), out_merged or p == f.T)


def _shuffles(f: Structure, blocks: list[tuple[int, int, int]], alive: list[int]):
    """Every interleaving of one sequence per block, in current positions, lazily."""

    def choose(k: int):  # the blocks' own sequences, block by block
        if k == len(blocks):
            return None
        return ((seq, k + 1) for seq in _block_sequences(f, *blocks[k]))

    for picked in _paths(0, choose):
        yield from _interleave(picked, alive)


def _interleave(seqs: list[list[_TStep]], alive: list[int]):
    """Every interleaving of the blocks' sequences, with teacher positions turned into
    current ones (a ψ shifts every position above it down by one)."""

    def children(state):
        at, live = state
        moves = []
        for b, seq in enumerate(seqs):
            if at[b] == len(seq):
                continue
            kind, p = seq[at[b]]
            t = live.index(p) + 1
            nat = (*at[:b], at[b] + 1, *at[b + 1 :])
            moves.append(((kind, t), (nat, live[: t - 1] + live[t:] if kind == "psi" else live)))
        return moves or None

    yield from _paths(((0,) * len(seqs), tuple(alive)), children)


def random_route(teacher: Structure, student: Structure, rng) -> Route:
    """A uniformly random valid route, by a walk weighted by path counts (no listing)."""
    require_member(teacher, student)
    G = route_graph(teacher, student)
    paths: dict = {END: 1}
    for node in reversed(list(nx.topological_sort(G))):
        if node != END:
            paths[node] = sum(paths.get(nxt, 0) for nxt in G.successors(node))
    node, blocks = (1, 1), []
    while node != END:
        succ = [n for n in G.successors(node) if paths.get(n, 0)]
        weights = [paths[n] for n in succ]
        pick = succ[int(rng.choice(len(succ), p=[w / sum(weights) for w in weights]))]
        blocks.append(G.edges[node, pick]["block"])
        node = pick
    return Route(tuple(blocks))


# -- counting -------------------------------------------------------------------------------
def _shuffle(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for la, ca in a.items():
        for lb, cb in b.items():
            out[la + lb] = out.get(la + lb, 0) + comb(la + lb, la) * ca * cb
    return out


def _block_counts(f: Structure, s: int, e: int, w: int, budget: list[int]) -> dict[int, int]:
    """Sequences of the steps inside block s..e, by length."""
    if s == e:
        return {f.width(s) - w: 1}
    fixed = {p for p in (1, f.T) if s <= p <= e}

    @cache
    def go(live: tuple[tuple[int, int], ...], out_merged: bool) -> dict[int, int]:
        budget[0] -= 1
        if budget[0] < 0:
            raise TooLarge("too many lattice states to count exactly", field="student")
        if len(live) == 1 and live[0][1] == w:
            return {0: 1}
        res: dict[int, int] = {}

        def add(sub: dict[int, int]) -> None:
            for length, c in sub.items():
                res[length + 1] = res.get(length + 1, 0) + c

        for k, (p, n) in enumerate(live):
            is_output = out_merged and k == len(live) - 1
            if p not in fixed and not is_output and n > w:
                add(go((*live[:k], (p, n - 1), *live[k + 1 :]), out_merged))
            if k > 0:
                q, nq = live[k - 1]
                if n == nq and merge_reason(f.activation(p), f.activation(q)) is None:
                    add(go((*live[:k], *live[k + 1 :]), out_merged or p == f.T))
        return res

    return go(tuple((p, f.width(p)) for p in range(s, e + 1)), False)


def count_sequences(teacher: Structure, student: Structure, max_states: int = 2_000_000) -> int:
    """The exact number of structure-level sequences from teacher to student.

    Raises
    ------
    NotInLattice
        If the student is not reachable.
    TooLarge
        If counting would visit more than ``max_states`` block states.
    """
    require_member(teacher, student)
    budget = [max_states]
    total = 0
    for r in routes(teacher, student):
        budget[0] -= 1
        if budget[0] < 0:
            raise TooLarge("too many routes to count exactly", field="student")
        dist = {0: 1}
        for j, (s, e) in enumerate(r.blocks, start=1):
            dist = _shuffle(dist, _block_counts(teacher, s, e, student.width(j), budget))
        total += sum(dist.values())
    return total
