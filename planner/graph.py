"""The parameter graph every structure compiles to (docs/theory.md §13).

A network's parameters are the weights of its *units* (linear and conv layers,
an RNN's recurrent layers) and the *spaces* of channels between them.  A unit
writes one space (row ``c`` of its weight and ``b[c]``: its producer slice of
channel ``c``) and reads one or more spaces through *segments*: a weight block,
row-major, in which each channel of the read space owns a group of adjacent
columns (1 for a linear layer, ``kh·kw`` for a conv, ``H·W`` for a linear layer
after ``flatten``: its consumer slice).  Residual streams have several
producers and consumers; an Elman RNN's recurrent matrix is a segment reading
the space its unit writes.

φ, ψ, plans and the formats speak of this graph alone (``planner.ops``): an MLP
(space t = position t, unit t-1 = layer t) and an RNN are its smallest cases,
convolutional and residual networks (``planner.stages``) the general one.

Examples
--------
>>> from planner import Structure
>>> g = Structure.mlp((3, 4, 2)).graph
>>> g.widths, [u.layer for u in g.units], g.consumers(2)
((3, 4, 2), [2, 3], ((1, 0),))
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["Block", "Consumers", "Graph", "Segment", "Slice", "Unit", "Whole"]


@dataclass(frozen=True)
class Segment:
    """A weight block of a unit reading ``space``: ``rows × (width · group)`` row-major from
    flat index ``offset``; channel ``c`` owns columns ``c·group … (c+1)·group − 1``."""

    space: int
    width: int
    group: int
    offset: int

    def indices(self, rows: np.ndarray, channels: np.ndarray) -> np.ndarray:
        """Flat indices ``[row, channel, g]`` of rows × channels (teacher ids), shape
        ``(len(rows), len(channels) · group)``."""
        r = np.atleast_1d(rows).astype(np.int64, copy=False)
        c = np.atleast_1d(channels).astype(np.int64, copy=False)
        g = self.group
        base = self.offset + r * (self.width * g)
        if g == 1:
            return base[:, None] + c[None, :]
        cols = (c[:, None] * g + np.arange(g)[None, :]).ravel()
        return base[:, None] + cols[None, :]


@dataclass(frozen=True)
class Unit:
    """A parametrised layer: it writes ``out`` (``rows`` channels) and reads ``segments``.

    ``index`` is its 0-based place in the layout, ``layer`` its number in the
    structure's own terms (an MLP's position t; a network's layer 1, 2, …),
    ``bias`` the flat index of ``b[0]`` or ``None``; ``name`` is for messages.
    """

    index: int
    layer: int
    out: int
    rows: int
    segments: tuple[Segment, ...]
    bias: int | None
    name: str

    @property
    def size(self) -> int:
        return sum(s.width * s.group for s in self.segments) * self.rows + (
            self.rows if self.bias is not None else 0
        )

    @property
    def start(self) -> int:
        return self.segments[0].offset

    def biases(self, rows: np.ndarray) -> np.ndarray:
        return self.bias + np.atleast_1d(rows).astype(np.int64, copy=False)


@dataclass(frozen=True)
class Block:
    """A residual block ``y = σ(S x + F(x))``: the branch's units (layout order), its
    projection (``None`` for the identity), the stream it reads and the space it writes, the
    spaces inside the branch, and the 1-based number ψ uses."""

    number: int
    branch: tuple[int, ...]  # unit indices
    projection: int | None
    reads: int
    writes: int
    inner: tuple[int, ...]
    activation: str


@dataclass(frozen=True)
class Graph:
    """Spaces ``1 … S`` with their widths, units in layout order, residual blocks."""

    widths: tuple[int, ...]
    units: tuple[Unit, ...]
    blocks: tuple[Block, ...] = ()
    fixed: frozenset[int] = frozenset()  # the input and output spaces

    @property
    def n_params(self) -> int:
        return sum(u.size for u in self.units)

    def width(self, space: int) -> int:
        return self.widths[space - 1]

    @cached_property
    def _consumers(self) -> dict[int, tuple[tuple[int, int], ...]]:
        out: dict[int, list] = {}
        for u in self.units:
            for k, seg in enumerate(u.segments):
                out.setdefault(seg.space, []).append((u.index, k))
        return {s: tuple(v) for s, v in out.items()}

    @cached_property
    def _producers(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, list] = {}
        for u in self.units:
            out.setdefault(u.out, []).append(u.index)
        return {s: tuple(v) for s, v in out.items()}

    def consumers(self, space: int) -> tuple[tuple[int, int], ...]:
        """(unit index, segment) pairs that read ``space``."""
        return self._consumers.get(space, ())

    def producers(self, space: int) -> tuple[int, ...]:
        """Unit indices that write ``space``."""
        return self._producers.get(space, ())

    def unit_of_layer(self, layer: int) -> Unit | None:
        for u in self.units:
            if u.layer == layer:
                return u
        return None

    def block_of_unit(self, index: int) -> Block | None:
        for b in self.blocks:
            if index in b.branch or index == b.projection:
                return b
        return None

    def where(self, index: int) -> str:
        """What flat parameter ``index`` is, in words: ``W[1, 2] of layer 3 (conv)``."""
        for u in self.units:
            if u.start <= index < u.start + u.size:
                for seg in u.segments:
                    n = u.rows * seg.width * seg.group
                    if seg.offset <= index < seg.offset + n:
                        k = index - seg.offset
                        row, col = divmod(k, seg.width * seg.group)
                        ch, g = divmod(col, seg.group)
                        at = f"[{row}, {ch}]" if seg.group == 1 else f"[{row}, {ch}, {g}]"
                        return f"weight{at} of {u.name}"
                return f"bias[{index - u.bias}] of {u.name}"
        return f"index {index} (past the last parameter)"


# -- slices of the current graph: how a search describes its candidates --------------------
@dataclass(frozen=True)
class Slice:
    """The current weight block ``rows × channels`` of one segment of a teacher layer
    (``planner.graph.Segment``): layer number, segment, teacher row ids, teacher ids of the
    channels read (current order), each channel owning ``segment.group`` adjacent
    columns."""

    layer: int
    segment: Segment
    rows: np.ndarray
    channels: np.ndarray

    def indices(self) -> np.ndarray:
        """Flat indices, rows × (channels · group)."""
        return self.segment.indices(self.rows, self.channels)


@dataclass(frozen=True)
class Consumers:
    """Candidate groups that are a space's consumer slices (docs/theory.md §13): group c is
    channel c's columns in every layer that reads the space (``slices``), over each one's
    current rows.  Structured kernels read the layers directly; others ask for
    :meth:`indices`."""

    slices: tuple[Slice, ...]
    width: int

    def indices(self) -> np.ndarray:
        parts = []
        for sl in self.slices:
            W = sl.indices().reshape(sl.rows.size, -1, sl.segment.group).transpose(1, 0, 2)
            parts.append(W.reshape(W.shape[0], -1))
        return np.hstack(parts) if parts else np.zeros((self.width, 0), np.int64)


@dataclass(frozen=True)
class Whole:
    """One candidate: a layer's whole current block (its slice, then the biases of its
    rows, ``bias`` the flat index of ``b[0]`` or ``None``), as a residual block's last
    layer is conditioned to 0 (docs/theory.md §13)."""

    slice: Slice
    bias: int | None

    @property
    def width(self) -> int:
        return 1

    def indices(self) -> np.ndarray:
        parts = [self.slice.indices().ravel()]
        if self.bias is not None:
            parts.append(self.bias + self.slice.rows)
        return np.concatenate(parts)[None, :]
