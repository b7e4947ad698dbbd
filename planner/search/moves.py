"""Exchange moves on an MLP plan, in families scored at once (docs/theory.md §6).

For a plan built deeper first, every teacher layer ℓ contributes to the
conditioned set B one block (kept neurons ``K``, dropped ``D``):

* a layer removed by ψ: ``U_ℓ[K_ℓ, :]`` (row k to the unit vector of its
  partner π(k)) and ``b_ℓ[K_ℓ]`` (to zero);
* any other layer: ``U_ℓ[K_ℓ, D_{ℓ−1}]`` (to zero: the dropped neurons'
  outgoing weights into surviving neurons).

A move changes a few of these blocks.  Moves come in :class:`Family` objects:
all moves of one kind at one place, with the same shapes, so that an evaluator
scores a whole family in one vectorised pass.  For each move a family carries
the exact difference of (B, v): entries that leave B, entries that enter it with
their targets, and entries whose target changes.  Kinds:

* ``swap``: at a position that shrinks, a kept neuron is dropped and a dropped
  one kept (in a merged layer the newcomer inherits the partner);
* ``transpose``: two rows of a merged layer exchange partners;
* ``substitute``: a row of a merged layer takes a dropped neuron below as its
  partner, which then survives instead of the old partner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..structure import Structure
from .construction import Choices

__all__ = ["Family", "families"]

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Family:
    """``n`` moves of one kind: row i of each array describes move i (teacher indices)."""

    kind: str
    layer: int
    leave: np.ndarray  # (n, r)
    enter: np.ndarray  # (n, a)
    enter_targets: np.ndarray  # (n, a)
    change: np.ndarray  # (n, c)
    change_to: np.ndarray  # (n, c)
    choices: Callable[[int], Choices]  # the choices after move i

    def __len__(self) -> int:
        return self.leave.shape[0]


class _View:
    """Kept and dropped neurons per teacher position, and the pairings, of a plan."""

    def __init__(self, teacher: Structure, ch: Choices) -> None:
        self.f, self.ch = teacher, ch
        self.dropped = {p: np.array(sorted(d), dtype=np.int64) for p, d in ch.drops.items()}
        self.pi = {p: dict(zip(r, c, strict=True)) for p, (r, c) in ch.pairs.items()}

    def kept(self, p: int) -> np.ndarray:
        return np.setdiff1d(np.arange(self.f.width(p)), self.dropped.get(p, _EMPTY))

    def drop(self, p: int) -> np.ndarray:
        return self.dropped.get(p, _EMPTY) if 1 < p < self.f.T else _EMPTY

    def rows_of(self, layer: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``U_layer[rows[i], cols]`` for each i: an (len(rows), len(cols)) index array."""
        return self.f.layer(layer).U[np.ix_(rows, cols)]

    def merged_rows(self, layer: int, rows: np.ndarray, partners: np.ndarray):
        """Rows of a merged layer (with their biases) and their unit-vector targets."""
        n_in = self.f.width(layer - 1)
        idx = self.rows_of(layer, rows, np.arange(n_in))
        t = np.zeros(idx.shape)
        t[np.arange(rows.size), partners] = 1.0
        if self.f.bias:
            idx = np.hstack([idx, self.f.layer(layer).b[rows][:, None]])
            t = np.hstack([t, np.zeros((rows.size, 1))])
        return idx, t

    def below(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """Incoming weights of neurons ``rows`` (of a surviving, unmerged position) from the
        dropped neurons below: conditioned when the neuron survives."""
        return self.rows_of(layer, rows, self.drop(layer - 1))


def _replace(seq: tuple[int, ...], old: int, new: int) -> tuple[int, ...]:
    return tuple(new if x == old else x for x in seq)


def families(teacher: Structure, ch: Choices) -> Iterator[Family]:
    """Every family of moves one step away from ``ch`` (MLP plans), deterministic order."""
    v = _View(teacher, ch)
    for s, e in reversed(ch.route.blocks):
        if e in ch.drops and 1 < e < teacher.T and v.drop(e).size and v.kept(e).size:
            yield _swaps(v, e, merged=e > s)
        for p in range(e, s, -1):
            if len(ch.pairs[p][0]) > 1:
                yield _transpositions(v, p)
            if p - 1 > 1 and v.drop(p - 1).size:
                yield _substitutions(v, p, bottom=p - 1 == s)


def _pairs(n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
    ia, ib = np.meshgrid(np.arange(n_a), np.arange(n_b), indexing="ij")
    return ia.ravel(), ib.ravel()


def _swaps(v: _View, p: int, merged: bool) -> Family:
    f = v.f
    K, D = v.kept(p), v.drop(p)
    rows_next = v.kept(p + 1) if p + 1 < f.T else np.arange(f.width(p + 1))
    ia, ib = _pairs(K.size, D.size)
    a, b = K[ia], D[ib]
    out_cols = v.rows_of(p + 1, rows_next, D).T[ib]  # U_{p+1}[rows, b]: leaves
    in_cols = v.rows_of(p + 1, rows_next, K).T[ia]  # U_{p+1}[rows, a]: enters (to 0)
    leave, enter = [out_cols], [in_cols]
    targets = [np.zeros(in_cols.shape)]
    if merged:  # b takes a's place in the merged layer p, with a's partner
        partners = np.array([v.pi[p][int(x)] for x in K])
        out_rows, _ = v.merged_rows(p, K, partners)
        in_rows, _ = v.merged_rows(p, D, np.zeros(D.size, dtype=np.int64))
        in_t = np.zeros((ia.size, in_rows.shape[1]))
        in_t[np.arange(ia.size), partners[ia]] = 1.0
        leave.append(out_rows[ia])
        enter.append(in_rows[ib])
        targets.append(in_t)
    elif v.drop(p - 1).size:
        leave.append(v.below(p, K)[ia])
        enter.append(v.below(p, D)[ib])
        targets.append(np.zeros((ia.size, v.drop(p - 1).size)))

    def choices(i: int) -> Choices:
        x, y = int(a[i]), int(b[i])
        ch = v.ch.copy()
        ch.drops[p] = _replace(ch.drops[p], y, x)
        if merged:
            r, c = ch.pairs[p]
            ch.pairs[p] = (_replace(r, x, y), c)
        return ch

    n = ia.size
    return Family(
        "swap",
        p,
        np.hstack(leave),
        np.hstack(enter),
        np.hstack(targets),
        np.zeros((n, 0), dtype=np.int64),
        np.zeros((n, 0)),
        choices,
    )


def _transpositions(v: _View, p: int) -> Family:
    rows, cols = (np.asarray(x, dtype=np.int64) for x in v.ch.pairs[p])
    i, j = np.triu_indices(rows.size, k=1)
    U = v.f.layer(p).U
    change = np.stack(
        [U[rows[i], cols[i]], U[rows[i], cols[j]], U[rows[j], cols[j]], U[rows[j], cols[i]]],
        axis=1,
    )
    to = np.tile([0.0, 1.0, 0.0, 1.0], (i.size, 1))

    def choices(m: int) -> Choices:
        ch = v.ch.copy()
        c = list(ch.pairs[p][1])
        c[i[m]], c[j[m]] = c[j[m]], c[i[m]]
        ch.pairs[p] = (ch.pairs[p][0], tuple(c))
        return ch

    n = i.size
    empty = np.zeros((n, 0), dtype=np.int64)
    return Family("transpose", p, empty, empty, np.zeros((n, 0)), change, to, choices)


def _substitutions(v: _View, p: int, bottom: bool) -> Family:
    rows, cols = (np.asarray(x, dtype=np.int64) for x in v.ch.pairs[p])
    below = p - 1
    D = v.drop(below)
    ir, idn = _pairs(rows.size, D.size)
    x, old, new = rows[ir], cols[ir], D[idn]
    U = v.f.layer(p).U
    change = np.stack([U[x, old], U[x, new]], axis=1)
    to = np.tile([0.0, 1.0], (ir.size, 1))
    if bottom:  # position p-1 survives unmerged: its incoming weights from dropped neurons
        if v.drop(below - 1).size:
            leave, enter = v.below(below, cols)[ir], v.below(below, D)[idn]
        else:
            leave = enter = np.zeros((ir.size, 0), dtype=np.int64)
        targets = np.zeros(enter.shape)
    else:  # position p-1 is merged too: the newcomer takes the old partner's row
        partners = np.array([v.pi[below][int(c)] for c in cols])
        out_rows, _ = v.merged_rows(below, cols, partners)
        in_rows, _ = v.merged_rows(below, D, np.zeros(D.size, dtype=np.int64))
        leave, enter = out_rows[ir], in_rows[idn]
        targets = np.zeros(enter.shape)
        if v.f.bias:
            targets[:, :-1][np.arange(ir.size), partners[ir]] = 1.0
        else:
            targets[np.arange(ir.size), partners[ir]] = 1.0

    def choices(m: int) -> Choices:
        o, nw = int(old[m]), int(new[m])
        ch = v.ch.copy()
        c = list(ch.pairs[p][1])
        c[ir[m]] = nw
        ch.pairs[p] = (ch.pairs[p][0], tuple(c))
        ch.drops[below] = _replace(ch.drops[below], nw, o)
        if not bottom:
            r2, c2 = ch.pairs[below]
            ch.pairs[below] = (_replace(r2, o, nw), c2)
        return ch

    return Family("substitute", p, leave, enter, targets, change, to, choices)
