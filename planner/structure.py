"""Structures and their parameter layout (docs/theory.md §2).

A :class:`Structure` is a tuple of widths ``(n_1, …, n_T)`` with an activation
per position 2..T, a ``bias`` flag and a ``kind`` (``"mlp"`` or ``"rnn"``).
Positions are 1-based as in the seed.  The flat parameter layout is PyTorch's
``parameters_to_vector`` order: for t = 2..T, ``U_t`` row-major, then (RNN,
hidden t) ``V_t`` row-major, then ``b_t``.

Examples
--------
>>> s = Structure.mlp((10, 100, 50, 1))
>>> s.n_params
6050
>>> s.layer(3).U.shape
(50, 100)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import InvalidStructure
from .graph import Graph, Segment, Unit

__all__ = ["ACTIVATIONS", "IDEMPOTENT", "KINDS", "LayerIndex", "Structure"]

#: Activations a position may carry.
ACTIVATIONS = frozenset(
    {"identity", "relu", "relu6", "hardtanh", "step", "sigmoid", "tanh", "gelu", "leaky_relu"}
)
#: Activations with σ∘σ = σ (docs/theory.md §3, validity of ψ).
IDEMPOTENT = frozenset({"identity", "relu", "relu6", "hardtanh", "step"})
KINDS = frozenset({"mlp", "rnn"})


@dataclass(frozen=True)
class LayerIndex:
    """Flat indices of layer t's parameters: ``U[i, j]`` is the index of ``U_t[i, j]``."""

    t: int
    U: np.ndarray
    V: np.ndarray | None
    b: np.ndarray | None

    @property
    def start(self) -> int:
        return int(self.U.flat[0])

    @property
    def stop(self) -> int:
        last = self.b if self.b is not None else self.V if self.V is not None else self.U
        return int(last.flat[-1]) + 1


@dataclass(frozen=True)
class Structure:
    """A network structure: widths, activations of positions 2..T, bias, kind.

    Parameters
    ----------
    widths : tuple of int
        ``(n_1, …, n_T)``, ``T >= 3``, every width ``>= 1``.
    activations : tuple of str
        One per position 2..T (position 1, the input, has none).
    bias : bool
        Whether every layer carries a bias ``b_t``.
    kind : {"mlp", "rnn"}
        An Elman RNN adds a recurrent ``V_t`` to every hidden position.

    Raises
    ------
    InvalidStructure
        For T < 3, a width < 1, an unknown activation or kind.
    """

    widths: tuple[int, ...]
    activations: tuple[str, ...]
    bias: bool = False
    kind: str = "mlp"

    def __post_init__(self) -> None:
        widths = tuple(self.widths)
        acts = tuple(self.activations)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "activations", acts)
        if self.kind not in KINDS:
            raise InvalidStructure(
                f"unknown kind {self.kind!r}; expected one of {sorted(KINDS)}", field="kind"
            )
        if len(widths) < 3:
            raise InvalidStructure(
                f"a structure needs T >= 3 positions (input, at least one hidden, output); "
                f"got T = {len(widths)}",
                field="widths",
            )
        for pos, n in enumerate(widths, start=1):
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
                raise InvalidStructure(
                    f"width of position {pos} must be an integer >= 1; got {n!r}", field="widths"
                )
        object.__setattr__(self, "widths", tuple(int(n) for n in widths))
        if len(acts) != len(widths) - 1:
            raise InvalidStructure(
                f"need one activation for each of positions 2..{len(widths)} "
                f"({len(widths) - 1}); got {len(acts)}",
                field="activation",
            )
        for pos, a in enumerate(acts, start=2):
            if a not in ACTIVATIONS:
                raise InvalidStructure(
                    f"unknown activation {a!r} at position {pos}; known: {sorted(ACTIVATIONS)}",
                    field="activation" if pos < len(widths) else "output_activation",
                )
        if not isinstance(self.bias, bool | np.bool_):
            raise InvalidStructure(f"bias must be a boolean; got {self.bias!r}", field="bias")

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def mlp(
        cls,
        widths: Sequence[int],
        activation: str | Sequence[str] = "relu",
        output_activation: str = "identity",
        bias: bool = False,
    ) -> Structure:
        """An MLP with one activation for every hidden position (or a list of them)."""
        return cls.build(widths, activation, output_activation, bias, "mlp")

    @classmethod
    def rnn(
        cls,
        widths: Sequence[int],
        activation: str | Sequence[str] = "tanh",
        output_activation: str = "identity",
        bias: bool = False,
    ) -> Structure:
        """An Elman RNN: every hidden position has a recurrent matrix ``V_t``."""
        return cls.build(widths, activation, output_activation, bias, "rnn")

    @classmethod
    def build(
        cls,
        widths: Sequence[int],
        activation: str | Sequence[str] = "relu",
        output_activation: str = "identity",
        bias: bool = False,
        kind: str = "mlp",
    ) -> Structure:
        """The form of docs/service.md: a hidden ``activation`` (one name or one per hidden
        position)."""
        widths = tuple(widths)
        n_hidden = max(len(widths) - 2, 0)
        if isinstance(activation, str):
            hidden = (activation,) * n_hidden
        else:
            hidden = tuple(activation)
            if len(hidden) != n_hidden:
                raise InvalidStructure(
                    f"activation lists one entry per hidden position ({n_hidden}); "
                    f"got {len(hidden)}",
                    field="activation",
                )
        return cls(widths, (*hidden, output_activation), bias=bool(bias), kind=kind)

    # -- shape --------------------------------------------------------------------------
    @property
    def T(self) -> int:
        """Number of positions."""
        return len(self.widths)

    def width(self, t: int) -> int:
        """``n_t`` for 1-based position t."""
        return self.widths[t - 1]

    def activation(self, t: int) -> str:
        """``σ_t`` for 1-based position t; the input (t = 1) is the identity."""
        return "identity" if t == 1 else self.activations[t - 2]

    @property
    def hidden_activation(self) -> str | tuple[str, ...]:
        """The hidden activation as one name when uniform, else one per hidden position."""
        hidden = self.activations[:-1]
        return hidden[0] if len(set(hidden)) == 1 else hidden

    @property
    def output_activation(self) -> str:
        return self.activations[-1]

    def is_hidden(self, t: int) -> bool:
        return 2 <= t <= self.T - 1

    def recurrent(self, t: int) -> bool:
        """Whether layer t has a recurrent matrix ``V_t`` (RNN hidden positions)."""
        return self.kind == "rnn" and self.is_hidden(t)

    def layer_size(self, t: int) -> int:
        """Number of parameters of layer t (``U_t``, ``V_t``, ``b_t``)."""
        n, m = self.width(t), self.width(t - 1)
        return n * m + (n * n if self.recurrent(t) else 0) + (n if self.bias else 0)

    @property
    def n_params(self) -> int:
        return sum(self.layer_size(t) for t in range(2, self.T + 1))

    # -- layout -------------------------------------------------------------------------
    @cached_property
    def _layers(self) -> tuple[LayerIndex, ...]:
        out, offset = [], 0
        for t in range(2, self.T + 1):
            n, m = self.width(t), self.width(t - 1)
            U = np.arange(offset, offset + n * m, dtype=np.int64).reshape(n, m)
            offset += n * m
            V = None
            if self.recurrent(t):
                V = np.arange(offset, offset + n * n, dtype=np.int64).reshape(n, n)
                offset += n * n
            b = None
            if self.bias:
                b = np.arange(offset, offset + n, dtype=np.int64)
                offset += n
            out.append(LayerIndex(t, U, V, b))
        return tuple(out)

    def layer(self, t: int) -> LayerIndex:
        """Index maps of layer t (2 <= t <= T)."""
        if not 2 <= t <= self.T:
            raise InvalidStructure(f"layer {t} does not exist (layers are 2..{self.T})")
        return self._layers[t - 2]

    @cached_property
    def _offsets(self) -> tuple[int, ...]:
        out = [0, 0, 0]  # positions 0 and 1 have no layer; layer 2 starts at 0
        for t in range(2, self.T + 1):
            out.append(out[-1] + self.layer_size(t))
        return tuple(out)

    def layer_offset(self, t: int) -> int:
        """Flat index of ``U_t[0, 0]`` (for t = T + 1: the number of parameters)."""
        return self._offsets[t]

    def parameter_arithmetic(self) -> str:
        """How the parameter count adds up, layer by layer: ``3·4 + 4·2 = 20``."""
        terms = []
        for t in range(2, self.T + 1):
            n, m = self.width(t), self.width(t - 1)
            terms.append(f"{n}·{m}")
            if self.recurrent(t):
                terms.append(f"{n}·{n}")
            if self.bias:
                terms.append(f"{n}")
        return f"{' + '.join(terms)} = {self.n_params}"

    def size_hint(self, got: int) -> str:
        """Why ``got`` is not this structure's parameter count, in arithmetic, with a hint
        when it is the count of the same widths with the bias switched."""
        b = "with" if self.bias else "without"
        hint = f"{list(self.widths)} {b} bias has {self.parameter_arithmetic()} parameters"
        flipped = Structure(self.widths, self.activations, not self.bias, self.kind)
        if got == flipped.n_params:
            hint += (
                f"; {got} is its count {'without' if self.bias else 'with'} bias "
                f'({flipped.parameter_arithmetic()}): set "bias": '
                f"{'false' if self.bias else 'true'} in the structure"
            )
        return hint

    def where(self, index: int) -> str:
        """What flat parameter ``index`` is, in words: ``U_3[1, 2]``, ``V_2[0, 0]``, ``b_2[3]``."""
        for t in range(2, self.T + 1):
            start = self.layer_offset(t)
            if start <= index < self.layer_offset(t + 1):
                n, m, k = self.width(t), self.width(t - 1), index - start
                if k < n * m:
                    return f"U_{t}[{k // m}, {k % m}] (layer {t})"
                k -= n * m
                if self.recurrent(t):
                    if k < n * n:
                        return f"V_{t}[{k // n}, {k % n}] (layer {t})"
                    k -= n * n
                return f"b_{t}[{k}] (layer {t})"
        return f"index {index} (past the last parameter)"

    # -- the parameter graph (docs/theory.md §13) -----------------------------------------
    @cached_property
    def graph(self) -> Graph:
        """Spaces 1..T (position t), unit t-1 = layer t reading position t-1 (and itself, for
        an RNN's ``V_t``)."""
        units = []
        for t in range(2, self.T + 1):
            n, m, off = self.width(t), self.width(t - 1), self.layer_offset(t)
            segs = [Segment(t - 1, m, 1, off)]
            if self.recurrent(t):
                segs.append(Segment(t, n, 1, off + n * m))
            bias = self.layer_offset(t + 1) - n if self.bias else None
            units.append(Unit(t - 2, t, t, n, tuple(segs), bias, f"layer {t}"))
        return Graph(self.widths, tuple(units), (), frozenset({1, self.T}))

    def reduced(
        self, spaces: Sequence[int], widths: Sequence[int], gone: frozenset[int] = frozenset()
    ) -> Structure:
        """The structure left when only positions ``spaces`` (teacher numbers, in order) are
        alive, with ``widths``: a position removed by ψ takes its activation with it."""
        acts = tuple(self.activation(p) for p in spaces[1:])
        return Structure(tuple(widths), acts, self.bias, self.kind)

    # -- relations ----------------------------------------------------------------------
    def with_widths(self, widths: Sequence[int]) -> Structure:
        """A structure of another width tuple of the same depth, kind, bias, activations."""
        return Structure(tuple(widths), self.activations, self.bias, self.kind)

    def inherit(
        self,
        widths: Sequence[int],
        activation: str | Sequence[str] | None = None,
        output_activation: str | None = None,
    ) -> Structure:
        """A student given by ``widths`` (and optionally activations) inheriting the rest.

        A student given by widths alone takes the teacher's hidden activation (one
        per position when the depths agree; when the teacher's differ by position and
        the depths do not, the student's must be given) and output activation.
        """
        if activation is None:
            activation = self.hidden_activation
            if not isinstance(activation, str) and len(widths) != self.T:
                raise InvalidStructure(
                    "the teacher's hidden activations differ by position and the student has "
                    "another depth: give the student's activation explicitly",
                    field="activation",
                )
        return Structure.build(
            widths,
            activation,
            self.output_activation if output_activation is None else output_activation,
            self.bias,
            self.kind,
        )

    def describe(self) -> str:
        acts = self.hidden_activation
        acts = acts if isinstance(acts, str) else ",".join(acts)
        b = ", bias" if self.bias else ""
        return f"{self.kind}{list(self.widths)} ({acts} → {self.output_activation}{b})"
