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
from .structure import IDEMPOTENT, Structure

__all__ = [
    "Effect",
    "Event",
    "Op",
    "Phi",
    "Psi",
    "Tracked",
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


Op = Phi | Psi


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
    src: int  # teacher layer (position) this matrix comes from
    rows: np.ndarray  # teacher neuron ids of its rows (teacher position src)
    cols: np.ndarray  # teacher neuron ids of its columns (teacher position of its input)


@dataclass
class Tracked:
    """The current structure, with the teacher origin of every live parameter.

    Build one with :meth:`Tracked.start`, then :meth:`apply` operations in order.
    """

    teacher: Structure
    structure: Structure
    positions: list[int]  # teacher position of each current position (1-based values)
    neurons: list[np.ndarray]  # teacher neuron ids of each current position
    layers: list[_Layer] = field(default_factory=list)  # current layers 2..T
    #: Whether effects list what they marginalise (costly on big teachers; kept
    #: for replays that need it, e.g. ``CompiledPlan.marginalised``).
    record_marginalised: bool = False

    @classmethod
    def start(cls, teacher: Structure, record_marginalised: bool = False) -> Tracked:
        positions = list(range(1, teacher.T + 1))
        neurons = [np.arange(n, dtype=np.int64) for n in teacher.widths]
        layers = [
            _Layer(t, neurons[t - 1].copy(), neurons[t - 2].copy()) for t in range(2, teacher.T + 1)
        ]
        return cls(teacher, teacher, positions, neurons, layers, record_marginalised)

    # -- teacher indices of current blocks ------------------------------------------------
    def weights(self, t: int, rows=slice(None), cols=slice(None)) -> np.ndarray:
        """Teacher indices of ``U_t[rows, cols]`` (current layer t, current indices)."""
        lay = self.layers[t - 2]
        off = self.teacher.layer_offset(lay.src)
        n_in = self.teacher.width(lay.src - 1)
        r, c = np.atleast_1d(lay.rows[rows]), np.atleast_1d(lay.cols[cols])
        return (off + r * n_in)[:, None] + c[None, :]

    def recurrent(self, t: int, rows=slice(None), cols=slice(None)) -> np.ndarray:
        """Teacher indices of ``V_t[rows, cols]`` (RNN hidden positions)."""
        lay = self.layers[t - 2]
        n = self.teacher.width(lay.src)
        off = self.teacher.layer_offset(lay.src) + n * self.teacher.width(lay.src - 1)
        r, c = np.atleast_1d(lay.rows[rows]), np.atleast_1d(lay.rows[cols])
        return (off + r * n)[:, None] + c[None, :]

    def biases(self, t: int, rows=slice(None)) -> np.ndarray:
        """Teacher indices of ``b_t[rows]``."""
        lay = self.layers[t - 2]
        n = self.teacher.width(lay.src)
        off = self.teacher.layer_offset(lay.src + 1) - n
        return off + np.atleast_1d(lay.rows[rows])

    def layer_indices(self, t: int) -> np.ndarray:
        """Teacher indices of current layer t in its layout order (U, V, b)."""
        parts = [self.weights(t).ravel()]
        if self.structure.recurrent(t):
            parts.append(self.recurrent(t).ravel())
        if self.structure.bias:
            parts.append(self.biases(t))
        return np.concatenate(parts)

    def kept(self) -> np.ndarray:
        """Teacher indices of all live parameters, in the current structure's layout."""
        return np.concatenate([self.layer_indices(t) for t in range(2, self.structure.T + 1)])

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

    # -- validity -------------------------------------------------------------------------
    def check(self, op: Op) -> None:
        """Raise :class:`InvalidOperation` naming the rule ``op`` breaks here."""
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
            if op.pairing is not None:
                pi = np.asarray(op.pairing)
                n = s.width(t)
                if pi.shape != (n,) or not np.array_equal(np.sort(pi), np.arange(n)):
                    raise InvalidOperation(
                        f"pairing must be a permutation of 0..{n - 1}", field="pairing"
                    )
        else:  # pragma: no cover - typing guards this
            raise InvalidOperation(f"unknown operation {op!r}", field="op")

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

    # -- application ----------------------------------------------------------------------
    def apply(self, op: Op) -> Effect:
        """Apply ``op`` in place; return what it conditions and marginalises."""
        self.check(op)
        if isinstance(op, Phi):
            return self._phi(op.layer, np.array([op.neuron], dtype=np.int64))
        return self._psi(op)

    def apply_phis(self, t: int, neurons: list[int]) -> Effect:
        """Apply φ(t, i) for each i of ``neurons`` in order, as one batched step.

        Exactly the effect of the single steps (docs/theory.md §3), computed at once: the
        indices are current ones, each taken after the previous removals.
        """
        if not neurons:
            return Effect(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
        n = self.structure.width(t)
        live = list(range(n))
        start: list[int] = []  # positions at the start of the run
        for i in neurons:
            self._check_phi(t, i, len(live))
            start.append(live.pop(i))
        return self._phi(t, np.asarray(start, dtype=np.int64))

    def _phi(self, t: int, idx: np.ndarray) -> Effect:
        """Remove the neurons at current indices ``idx`` (in that order) of position t."""
        s = self.structure
        rec = self.record_marginalised
        cond = [self.weights(t + 1, cols=idx).T.ravel()]
        marg = [self.weights(t, rows=idx).ravel()] if rec else []
        if s.recurrent(t):
            # V_t[a, b] with b removed: conditioned iff a was still live then (or a == b);
            # V_t[a, b] with a removed: marginalised iff b was still live then (b ≠ a).
            order = np.full(s.width(t), np.iinfo(np.int64).max)
            order[idx] = np.arange(idx.size)
            V = self.recurrent(t)
            cond.append(V.T[idx][order[None, :] >= order[idx][:, None]])
            if rec:
                marg.append(V[idx][order[None, :] > order[idx][:, None]])
        if s.bias and rec:
            marg.append(self.biases(t, rows=idx))
        out_l, in_l = self.layers[t - 1], self.layers[t - 2]
        events = (
            Event("columns", out_l.src, out_l.rows.copy(), out_l.cols[idx].copy()),
            Event("rows", in_l.src, in_l.rows[idx].copy()),
        )
        self.neurons[t - 1] = np.delete(self.neurons[t - 1], idx)
        self.layers[t - 2].rows = np.delete(self.layers[t - 2].rows, idx)
        self.layers[t - 1].cols = np.delete(self.layers[t - 1].cols, idx)
        widths = list(s.widths)
        widths[t - 1] -= idx.size
        self.structure = s.with_widths(widths)
        c = np.concatenate(cond)
        marg_all = np.concatenate([np.zeros(0, np.int64), *marg])
        return Effect(c, np.zeros(c.size), marg_all, events)

    def _psi(self, op: Psi) -> Effect:
        s, t = self.structure, op.layer
        n = s.width(t)
        pi = np.arange(n) if op.pairing is None else np.asarray(op.pairing, dtype=np.int64)
        U = self.weights(t)
        target = np.zeros((n, n))
        target[np.arange(n), pi] = 1.0
        lay = self.layers[t - 2]
        event = Event("layer", lay.src, lay.rows.copy(), lay.cols.copy(), target)
        cond, targets = [U.ravel()], [target.ravel()]
        if s.recurrent(t):
            V = self.recurrent(t).ravel()
            cond.append(V)
            targets.append(np.zeros(V.size))
        if s.bias:
            b = self.biases(t)
            cond.append(b)
            targets.append(np.zeros(b.size))
        if t < s.T:  # the next layer now reads position t-1: column k becomes column π(k)
            nxt = self.layers[t - 1]
            cols = np.empty_like(nxt.cols)
            cols[pi] = nxt.cols
            nxt.cols = cols
        del self.positions[t - 1], self.neurons[t - 1], self.layers[t - 2]
        widths = list(s.widths)
        del widths[t - 1]
        acts = list(s.activations)
        del acts[t - 2]  # position t-1 keeps σ_{t-1}, also when it becomes the output
        self.structure = type(s)(tuple(widths), tuple(acts), s.bias, s.kind)
        return Effect(
            np.concatenate(cond), np.concatenate(targets), np.zeros(0, np.int64), (event,)
        )
