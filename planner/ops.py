"""φ and ψ as data (docs/theory.md §3).

An operation does not touch numbers: applied to a :class:`Tracked` layout (the
current structure, and for every live parameter the teacher index it came
from) it says which teacher parameters it *conditions* (with their targets) and
which it *marginalises*, and returns the layout that results.  Plans compile a
sequence of operations this way (``planner.plan``); the Gaussian arithmetic
happens once, afterwards.

Each current layer t is held as its teacher layer plus the teacher neuron ids
of its rows and columns, so a step costs O(size of its group), never a copy of
the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidOperation
from .graph import Consumers, Slice, Unit, Whole
from .stages import Conv, Network
from .structure import IDEMPOTENT, Structure

__all__ = [
    "Effect",
    "Event",
    "Op",
    "Phi",
    "PhiSpace",
    "Psi",
    "PsiBlock",
    "Tracked",
    "identity_reason",
    "merge_reason",
    "psi_activation_reason",
]


@dataclass(frozen=True)
class Phi:
    """φ(t, i): remove neuron ``i`` (0-based, current order) of hidden position ``t``."""

    layer: int
    neuron: int

    def to_json(self) -> dict:
        return {"op": "phi", "layer": self.layer, "neuron": self.neuron}


@dataclass(frozen=True)
class Psi:
    """ψ(t, π): remove layer ``t``; ``pairing[k] = π(k)``, identity when ``None``."""

    layer: int
    pairing: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        d: dict = {"op": "psi", "layer": self.layer}
        if self.pairing is not None:
            d["pairing"] = list(self.pairing)
        return d


@dataclass(frozen=True)
class PhiSpace:
    """φ(s, c) on a network: remove channel ``c`` (0-based, current order) of space ``s``
    (teacher numbering, docs/theory.md §13)."""

    space: int
    channel: int

    def to_json(self) -> dict:
        return {"op": "phi", "space": self.space, "channel": self.channel}


@dataclass(frozen=True)
class PsiBlock:
    """ψ on residual block ``block`` (1-based, the teacher's layout order)."""

    block: int

    def to_json(self) -> dict:
        return {"op": "psi", "block": self.block}


Op = Phi | Psi | PhiSpace | PsiBlock


def merge_reason(removed: str, kept: str) -> str | None:
    """The one ψ activation rule (docs/theory.md §3): why a position with activation ``removed``
    cannot be merged into its predecessor with ``kept``; ``None`` when it can.

    With ``U_t = P_π`` position t computes ``σ_t(P_π h) = P_π σ_t(h)``, which is the
    predecessor's output only when ``σ_t`` is the identity, or equals the
    predecessor's activation and is idempotent.  The input's "activation" is the
    identity, so ψ(2) needs ``σ_2`` to be the identity.
    """
    if removed == "identity":
        return None
    if removed != kept:
        return f"needs the identity or the same activation as its predecessor ({kept})"
    if removed not in IDEMPOTENT:
        return f"needs an idempotent activation (σ∘σ = σ); {removed} is not"
    return None


def psi_activation_reason(structure: Structure, t: int) -> str | None:
    """Why ψ(t) would not preserve the function, or ``None`` when it is valid
    (docs/theory.md §3)."""
    a, prev = structure.activation(t), structure.activation(t - 1)
    why = merge_reason(a, prev)
    if why is None:
        return None
    if t == 2:
        return f"ψ(2) needs the identity at position 2 (it reads the input); σ_2 is {a}"
    if a != prev:
        return (
            f"ψ({t}) needs σ_{t} to be the identity or equal to σ_{t - 1}; "
            f"σ_{t} is {a} and σ_{t - 1} is {prev}"
        )
    return f"ψ({t}) {why}"


@dataclass(frozen=True)
class Event:
    """One step in a teacher layer's own terms (for formats that keep layer structure).

    ``kind`` is ``"columns"`` (the columns ``cols`` of teacher layer ``layer``,
    over its current rows ``rows``, conditioned to zero), ``"rows"`` (rows
    ``rows`` marginalised, with their biases) or ``"layer"`` (the whole current
    block ``rows × cols`` conditioned to ``target``, the bias to zero).  Ids are
    teacher neuron ids.
    """

    kind: str
    layer: int
    rows: np.ndarray
    cols: np.ndarray | None = None
    target: np.ndarray | None = None


@dataclass(frozen=True)
class Effect:
    """What one operation does to the teacher's parameters."""

    conditioned: np.ndarray
    targets: np.ndarray
    marginalised: np.ndarray
    events: tuple[Event, ...] = ()


@dataclass
class _Layer:
    """A current layer: its teacher unit, the teacher channel ids of its rows and, per
    segment, of its column groups (current order), and the current space each segment
    reads (teacher numbering)."""

    unit: Unit
    rows: np.ndarray
    segs: list[np.ndarray]
    reads: list[int]

    @property
    def src(self) -> int:
        """The teacher layer this one is (an MLP's position; a network's layer number)."""
        return self.unit.layer

    @property
    def cols(self) -> np.ndarray:
        """The column ids of its first segment (an MLP's ``U_t``)."""
        return self.segs[0]

    @cols.setter
    def cols(self, value: np.ndarray) -> None:
        self.segs[0] = value

    def copy(self) -> _Layer:
        return _Layer(self.unit, self.rows.copy(), [a.copy() for a in self.segs], list(self.reads))

    def indices(self) -> np.ndarray:
        """Teacher indices of its live parameters, in the layout order (segments, bias)."""
        parts = [
            seg.indices(self.rows, ids).ravel()
            for seg, ids in zip(self.unit.segments, self.segs, strict=True)
        ]
        if self.unit.bias is not None:
            parts.append(self.unit.biases(self.rows))
        return np.concatenate(parts)


@dataclass
class Tracked:
    """The current structure, with the teacher origin of every live parameter.

    Build one with :meth:`Tracked.start`, then :meth:`apply` operations in order.  The
    state is the teacher's parameter graph (``planner.graph``) cut down: the live spaces
    (``positions``, teacher numbers in order) with the teacher ids of their channels
    (``neurons``), and the live layers in layout order.  For an MLP or RNN, ``layers[t-2]``
    is current layer t.
    """

    teacher: Structure | Network
    structure: Structure | Network
    positions: list[int]  # teacher space of each current space (1-based values)
    neurons: list[np.ndarray]  # teacher channel ids of each current space
    layers: list[_Layer] = field(default_factory=list)  # current layers, layout order
    #: Whether effects list what they marginalise (costly on big teachers; kept
    #: for replays that need it, e.g. ``CompiledPlan.marginalised``).
    record_marginalised: bool = False
    gone: set[int] = field(default_factory=set)  # teacher units removed by ψ

    @classmethod
    def start(cls, teacher: Structure | Network, record_marginalised: bool = False) -> Tracked:
        g = teacher.graph
        positions = list(range(1, len(g.widths) + 1))
        neurons = [np.arange(n, dtype=np.int64) for n in g.widths]
        layers = [
            _Layer(
                u,
                neurons[u.out - 1].copy(),
                [neurons[seg.space - 1].copy() for seg in u.segments],
                [seg.space for seg in u.segments],
            )
            for u in g.units
        ]
        return cls(teacher, teacher, positions, neurons, layers, record_marginalised)

    def copy(self) -> Tracked:
        return Tracked(
            self.teacher,
            self.structure,
            list(self.positions),
            [a.copy() for a in self.neurons],
            [lay.copy() for lay in self.layers],
            self.record_marginalised,
            set(self.gone),
        )

    @property
    def is_network(self) -> bool:
        return self.teacher.kind == "network"

    # -- teacher indices of current blocks (MLP and RNN terms) ----------------------------
    def weights(self, t: int, rows=slice(None), cols=slice(None)) -> np.ndarray:
        """Teacher indices of ``U_t[rows, cols]`` (current layer t, current indices)."""
        lay = self.layers[t - 2]
        return lay.unit.segments[0].indices(lay.rows[rows], lay.segs[0][cols])

    def recurrent(self, t: int, rows=slice(None), cols=slice(None)) -> np.ndarray:
        """Teacher indices of ``V_t[rows, cols]`` (RNN hidden positions)."""
        lay = self.layers[t - 2]
        return lay.unit.segments[1].indices(lay.rows[rows], lay.segs[1][cols])

    def biases(self, t: int, rows=slice(None)) -> np.ndarray:
        """Teacher indices of ``b_t[rows]``."""
        lay = self.layers[t - 2]
        return lay.unit.biases(lay.rows[rows])

    def layer_indices(self, t: int) -> np.ndarray:
        """Teacher indices of current layer t in its layout order (U, V, b)."""
        return self.layers[t - 2].indices()

    def kept(self) -> np.ndarray:
        """Teacher indices of all live parameters, in the current structure's layout."""
        return np.concatenate([np.zeros(0, np.int64), *(lay.indices() for lay in self.layers)])

    def outgoing(self, t: int, i: int) -> np.ndarray:
        """Teacher indices that φ(t, i) would condition to zero."""
        return self.outgoing_all(t)[i]

    def outgoing_all(self, t: int, rows=slice(None)) -> np.ndarray:
        """Row i: the teacher indices φ(t, i) would condition (column i of U_{t+1}, V_t);
        ``rows`` restricts them to some rows of U_{t+1} (MLP)."""
        U = self.weights(t + 1, rows=rows).T
        if not self.structure.recurrent(t):
            return U
        return np.hstack([U, self.recurrent(t).T])

    # -- what a network's steps would condition ----------------------------------------
    def consumers(self, space: int) -> Consumers:
        """The candidate groups of φ on ``space``: channel c's consumer slices (current
        order) in every layer that reads it, over their current rows."""
        slices = tuple(
            Slice(lay.src, lay.unit.segments[k], lay.rows, lay.segs[k])
            for lay in self.layers
            for k, reads in enumerate(lay.reads)
            if reads == space
        )
        return Consumers(slices, self.neurons[self.positions.index(space)].size)

    def consumer_groups(self, space: int) -> np.ndarray:
        """Row c: the teacher indices φ on channel c (current order) of ``space`` would
        condition, every consumer slice over its current rows (a network's spaces)."""
        return self.consumers(space).indices()

    def block_whole(self, number: int) -> Whole:
        """What ψ on block ``number`` would condition: its branch's last layer, whole, as it
        is now."""
        last = self.teacher.graph.blocks[number - 1].branch[-1]
        lay = next(lay for lay in self.layers if lay.unit.index == last)
        (seg,) = lay.unit.segments
        return Whole(Slice(lay.src, seg, lay.rows, lay.segs[0]), lay.unit.bias)

    def block_indices(self, number: int) -> np.ndarray:
        """The teacher indices ψ on block ``number`` would condition (its branch's last
        layer, as it is now)."""
        return self.block_whole(number).indices()[0]

    # -- validity -------------------------------------------------------------------------
    def check(self, op: Op) -> None:
        """Raise :class:`InvalidOperation` naming the rule ``op`` breaks here."""
        if self.is_network:
            if isinstance(op, PhiSpace):
                j = self._space(op.space)
                self._check_channel(op.space, op.channel, self.neurons[j].size)
            elif isinstance(op, PsiBlock):
                self._check_block(op.block)
            elif isinstance(op, Psi):
                self._check_layer(op)
            else:
                raise InvalidOperation(
                    'a network\'s φ is {"op": "phi", "space": s, "channel": c}', field="op"
                )
            return
        s = self.structure
        if isinstance(op, Phi):
            self._check_phi(op.layer, op.neuron, s.width(op.layer) if 1 <= op.layer <= s.T else 0)
        elif isinstance(op, Psi):
            t = op.layer
            if not 2 <= t <= s.T:
                raise InvalidOperation(f"layer {t} does not exist (2..{s.T})", field="layer")
            if s.T <= 3:
                raise InvalidOperation(
                    f"ψ({t}) would leave no hidden position (T = {s.T})", field="layer"
                )
            if s.width(t) != s.width(t - 1):
                raise InvalidOperation(
                    f"ψ({t}) needs a square layer: n_{t} = {s.width(t)} ≠ n_{t - 1} = "
                    f"{s.width(t - 1)}",
                    field="layer",
                )
            if s.kind == "rnn" and t == s.T:
                raise InvalidOperation(
                    f"ψ({t}) on an RNN would make the recurrent position {t - 1} the output",
                    field="layer",
                )
            reason = psi_activation_reason(s, t)
            if reason:
                raise InvalidOperation(reason, field="layer")
            _check_pairing(op.pairing, s.width(t))
        else:
            raise InvalidOperation(
                'an MLP\'s or RNN\'s ops are {"op": "phi", "layer", "neuron"} and '
                '{"op": "psi", "layer"}',
                field="op",
            )

    def _check_phi(self, t: int, i: int, width: int) -> None:
        s = self.structure
        if not s.is_hidden(t):
            raise InvalidOperation(
                f"φ({t}) needs a hidden position (2..{s.T - 1}); position {t} is "
                + ("the input" if t == 1 else "the output" if t == s.T else "out of range"),
                field="layer",
            )
        if width < 2:
            raise InvalidOperation(
                f"φ({t}) would empty position {t} (width {width})", field="layer"
            )
        if not 0 <= i < width:
            raise InvalidOperation(
                f"neuron {i} does not exist at position {t} (width {width})", field="neuron"
            )

    def _space(self, space: int) -> int:
        """Current index of teacher space ``space``; a clear error when it is not alive."""
        try:
            return self.positions.index(space)
        except ValueError:
            n = len(self.teacher.graph.widths)
            why = "was removed with its block or layer" if 1 <= space <= n else "does not exist"
            raise InvalidOperation(
                f"space {space} {why} (the teacher's spaces are 1..{n})", field="space"
            ) from None

    def _check_channel(self, space: int, c: int, width: int) -> None:
        if space in self.teacher.graph.fixed:
            which = "input" if space == 1 else "output"
            raise InvalidOperation(
                f"φ on space {space}: the network's {which} is not removable", field="space"
            )
        if width < 2:
            raise InvalidOperation(
                f"φ on space {space} would leave it no channel (width {width})", field="space"
            )
        if not 0 <= c < width:
            raise InvalidOperation(
                f"channel {c} does not exist in space {space} (width {width})", field="channel"
            )

    def _check_block(self, number: int) -> None:
        blocks = self.teacher.graph.blocks
        if not 1 <= number <= len(blocks):
            raise InvalidOperation(
                f"block {number} does not exist (the teacher has {len(blocks)} residual blocks)",
                field="block",
            )
        b = blocks[number - 1]
        if b.branch[0] in self.gone:
            raise InvalidOperation(f"block {number} was already removed", field="block")
        if b.projection is not None:
            raise InvalidOperation(
                f"ψ on block {number}: its shortcut is a projection, so the block is not "
                "the identity once its branch is 0; only identity-shortcut blocks are removable",
                field="block",
            )
        before = self.teacher.layers[b.branch[0]].input_activation
        why = _merge_after(b.activation, before)
        if why:
            raise InvalidOperation(f"ψ on block {number}: {why}", field="block")

    def _check_layer(self, op: Psi) -> None:
        lay = self._layer_of(op.layer)
        info = self.teacher.layers[lay.unit.index]
        if info.top is None:
            raise InvalidOperation(
                f"ψ on layer {op.layer}: it is inside residual block {info.block}; remove the "
                "block instead",
                field="layer",
            )
        out = lay.unit.out
        if out in self.teacher.graph.fixed:
            raise InvalidOperation(
                f"ψ on layer {op.layer}: it writes the network's output", field="layer"
            )
        if sum(1 for other in self.layers if other.unit.out == out) != 1:
            raise InvalidOperation(
                f"ψ on layer {op.layer}: its output space {out} is also written by residual "
                "blocks, which would then write its input",
                field="layer",
            )
        n, m = lay.rows.size, lay.segs[0].size
        if n != m:
            raise InvalidOperation(
                f"ψ on layer {op.layer} needs as many outputs as inputs; it has {n} and {m}",
                field="layer",
            )
        why = identity_reason(info, lay.unit.segments[0].group, m)
        if why:
            raise InvalidOperation(f"ψ on layer {op.layer}: {why}", field="layer")
        _check_pairing(op.pairing, n)

    def _layer_of(self, layer: int) -> _Layer:
        for lay in self.layers:
            if lay.unit.layer == layer:
                return lay
        n = len(self.teacher.graph.units)
        why = "was removed" if 1 <= layer <= n else "does not exist"
        raise InvalidOperation(
            f"layer {layer} {why} (the teacher's layers are 1..{n})", field="layer"
        )

    # -- application ----------------------------------------------------------------------
    def apply(self, op: Op) -> Effect:
        """Apply ``op`` in place; return what it conditions and marginalises."""
        self.check(op)
        if isinstance(op, Phi):
            return self._phi(self.positions[op.layer - 1], np.array([op.neuron], dtype=np.int64))
        if isinstance(op, PhiSpace):
            return self._phi(op.space, np.array([op.channel], dtype=np.int64))
        if isinstance(op, PsiBlock):
            return self._drop_block(op.block)
        if self.is_network:
            return self._merge(self._layer_of(op.layer), op.pairing)
        return self._merge(self.layers[op.layer - 2], op.pairing)

    def apply_phis(self, t: int, neurons: list[int]) -> Effect:
        """Apply φ(t, i) for each i of ``neurons`` in order, as one batched step.

        Exactly the effect of the single steps (docs/theory.md §3), computed at once: the
        indices are current ones, each taken after the previous removals.
        """
        if not neurons:
            return Effect(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
        if self.is_network:
            raise InvalidOperation(
                'a network\'s φ is {"op": "phi", "space": s, "channel": c}', field="op"
            )
        n = self.structure.width(t)
        live = list(range(n))
        start: list[int] = []  # positions at the start of the run
        for i in neurons:
            self._check_phi(t, i, len(live))
            start.append(live.pop(i))
        return self._phi(self.positions[t - 1], np.asarray(start, dtype=np.int64))

    def apply_channels(self, space: int, channels: list[int]) -> Effect:
        """φ on ``space`` for each channel of ``channels`` in order, as one batched step."""
        j = self._space(space)
        live = list(range(self.neurons[j].size))
        start: list[int] = []
        for c in channels:
            self._check_channel(space, c, len(live))
            start.append(live.pop(c))
        return self._phi(space, np.asarray(start, dtype=np.int64))

    def _phi(self, sid: int, idx: np.ndarray) -> Effect:
        """Remove the channels at current indices ``idx`` (in that order) of space ``sid``:
        every consumer slice conditioned to 0, every producer slice not conditioned
        marginalised (docs/theory.md §13)."""
        j = self.positions.index(sid)
        rec = self.record_marginalised
        order = np.full(self.neurons[j].size, np.iinfo(np.int64).max)
        order[idx] = np.arange(idx.size)
        cond: list[np.ndarray] = []
        marg: list[np.ndarray] = []
        columns, rows, recurrent = [], [], []
        for lay in self.layers:
            for k, reads in enumerate(lay.reads):
                if reads == sid:
                    (recurrent if lay.unit.out == sid else columns).append((lay, k))
            if lay.unit.out == sid:
                rows.append(lay)
        for lay, k in columns:
            seg = lay.unit.segments[k]
            cond.append(seg.indices(lay.rows, lay.segs[k][idx]).T.ravel())
        for lay, k in recurrent:
            # W[a, b] with b removed: conditioned iff a was still live then (or a == b)
            W = lay.unit.segments[k].indices(lay.rows, lay.segs[k])
            cond.append(_grouped(W, idx, lay.unit.segments[k].group, order, cols=True))
        if rec:
            for lay in rows:
                for k, seg in enumerate(lay.unit.segments):
                    if lay.reads[k] == sid:  # W[a, b] with a removed, b still live then
                        W = seg.indices(lay.rows, lay.segs[k])
                        marg.append(_grouped(W, idx, seg.group, order, cols=False))
                    else:
                        marg.append(seg.indices(lay.rows[idx], lay.segs[k]).ravel())
                if lay.unit.bias is not None:
                    marg.append(lay.unit.biases(lay.rows[idx]))
        events = tuple(
            Event("columns", lay.src, lay.rows.copy(), lay.segs[k][idx].copy())
            for lay, k in columns
        )
        selfread = {id(lay) for lay, _ in recurrent}
        events += tuple(
            Event("rows", lay.src, lay.rows[idx].copy()) for lay in rows if id(lay) not in selfread
        )
        for lay, k in recurrent:  # each channel in turn: its columns over the rows still
            live = np.ones(lay.rows.size, dtype=bool)  # there, then its row marginalised
            for i in idx:
                events += (
                    Event("columns", lay.src, lay.rows[live].copy(), lay.segs[k][[i]].copy()),
                    Event("rows", lay.src, lay.rows[[i]].copy()),
                )
                live[i] = False
        self.neurons[j] = np.delete(self.neurons[j], idx)
        for lay in rows:
            lay.rows = np.delete(lay.rows, idx)
        for lay, k in columns + recurrent:
            lay.segs[k] = np.delete(lay.segs[k], idx)
        self._restructure()
        c = np.concatenate(cond)
        marg_all = np.concatenate([np.zeros(0, np.int64), *marg])
        return Effect(c, np.zeros(c.size), marg_all, events)

    def _restructure(self) -> None:
        self.structure = self.teacher.reduced(
            self.positions, [a.size for a in self.neurons], frozenset(self.gone)
        )

    def _merge(self, lay: _Layer, pairing: tuple[int, ...] | None) -> Effect:
        """ψ on a plain layer: its weight conditioned to the identity kernel ``W[k, π(k),
        centre] = 1`` (every other entry, recurrent weight and bias 0); its output space is
        gone and its readers read its input, column k as column π(k)."""
        n = lay.rows.size
        pi = np.arange(n) if pairing is None else np.asarray(pairing, dtype=np.int64)
        seg = lay.unit.segments[0]
        U = seg.indices(lay.rows, lay.segs[0])
        g = seg.group
        target = np.zeros((n, n * g))
        target[np.arange(n), pi * g + g // 2] = 1.0  # the centre of an odd kernel
        event = Event("layer", lay.src, lay.rows.copy(), lay.segs[0].copy(), target)
        cond, targets = [U.ravel()], [target.ravel()]
        for k in range(1, len(lay.segs)):
            V = lay.unit.segments[k].indices(lay.rows, lay.segs[k]).ravel()
            cond.append(V)
            targets.append(np.zeros(V.size))
        if lay.unit.bias is not None:
            b = lay.unit.biases(lay.rows)
            cond.append(b)
            targets.append(np.zeros(b.size))
        out, src = lay.unit.out, lay.reads[0]
        for other in self.layers:
            for k, reads in enumerate(other.reads):
                if reads == out and other is not lay:
                    cols = np.empty_like(other.segs[k])
                    cols[pi] = other.segs[k]
                    other.segs[k] = cols
                    other.reads[k] = src
        j = self.positions.index(out)
        del self.positions[j], self.neurons[j]
        self.layers.remove(lay)
        self.gone.add(lay.unit.index)
        self._restructure()
        return Effect(
            np.concatenate(cond), np.concatenate(targets), np.zeros(0, np.int64), (event,)
        )

    def _drop_block(self, number: int) -> Effect:
        """ψ on a residual block: its branch's last layer conditioned to 0, the rest of the
        branch marginalised, its inner spaces gone."""
        b = self.teacher.graph.blocks[number - 1]
        branch = [lay for lay in self.layers if lay.unit.index in b.branch]
        last = branch[-1]
        B = last.indices()
        events = [Event("layer", last.src, last.rows.copy(), last.segs[0].copy(), None)]
        marg = [lay.indices() for lay in branch[:-1]] if self.record_marginalised else []
        events += [Event("rows", lay.src, lay.rows.copy()) for lay in branch[:-1]]
        for lay in branch:
            self.layers.remove(lay)
            self.gone.add(lay.unit.index)
        for sid in b.inner:
            j = self.positions.index(sid)
            del self.positions[j], self.neurons[j]
        self._restructure()
        return Effect(
            B, np.zeros(B.size), np.concatenate([np.zeros(0, np.int64), *marg]), tuple(events)
        )


def identity_reason(info, group: int, width: int) -> str | None:
    """Why a plain network layer (its :class:`~planner.stages.LayerInfo`, reading ``width``
    channels of ``group`` features each) can never be conditioned to the identity, or
    ``None``: a conv needs stride 1 and an odd kernel padded to keep its size, a linear
    layer must read features, not a flattened image, and its activation must pass the
    rule.  The op's check and the lattice's routes ask the same question here."""
    st = info.stage
    if isinstance(st, Conv):
        (kh, kw), pad = st.kernel, st.padding
        if st.stride != (1, 1) or kh % 2 == 0 or kw % 2 == 0 or pad != (kh // 2, kw // 2):
            return (
                "a conv is the identity only with stride 1 and an odd kernel padded to keep "
                f"its size; it has kernel {list(st.kernel)}, stride {list(st.stride)}, "
                f"padding {list(pad)}"
            )
    elif group != 1:
        return (
            f"it reads a flattened image ({width} channels of {group} features), not "
            f"{width} features"
        )
    return _merge_after(st.activation, info.input_activation)


def _grouped(W: np.ndarray, idx: np.ndarray, g: int, order: np.ndarray, cols: bool):
    """Entries of a weight ``W`` (rows × channels·g) over a space it both reads and writes
    (an RNN's ``V_t``), for removed channels ``idx``, each in turn: with ``cols``, their
    column groups at rows removed no earlier (conditioned, ``a == b`` included); else
    their rows at column groups removed later (marginalised)."""
    Wg = W.reshape(W.shape[0], -1, g)
    if cols:
        blk = Wg[:, idx, :].transpose(1, 0, 2)  # removed channel, row, g
        ok = order[None, :] >= order[idx][:, None]
    else:
        blk = Wg[idx]  # removed row, column channel, g
        ok = order[None, :] > order[idx][:, None]
    return blk[ok].ravel()


def _check_pairing(pairing, n: int) -> None:
    if pairing is not None:
        pi = np.asarray(pairing)
        if pi.shape != (n,) or not np.array_equal(np.sort(pi), np.arange(n)):
            raise InvalidOperation(f"pairing must be a permutation of 0..{n - 1}", field="pairing")


def _merge_after(sigma: str, before: str | None) -> str | None:
    """The activation rule for a network's ψ: why ``σ`` applied after values that already
    passed ``before`` (``None``: the input, or nothing known) is not the identity."""
    if sigma == "identity":
        return None
    if before is None:
        return f"its activation {sigma} would have to be the identity (its input has passed none)"
    why = merge_reason(sigma, before)
    return None if why is None else f"its activation {sigma} {why}"
