"""Convolutional and residual networks: chains of stages over spaces (docs/theory.md §13).

A :class:`Network` is an input shape (``(C, H, W)`` or ``(n,)``) and a chain of
stages: :class:`Conv`, :class:`Linear`, :class:`Pool` (max or average, or global
average), :class:`Flatten` and :class:`Residual` blocks ``y = σ(S x + F(x))``.
Its parameters are ``parameters_to_vector`` of the equivalent torch module (per
layer the weight ``(out, in, kh, kw)`` row-major, then the bias; in a block the
branch's layers, then the projection), and it compiles to the same parameter
graph (``planner.graph``) as an MLP, so φ, ψ and plans need nothing else.

Examples
--------
>>> net = Network.from_json({
...     "input": [1, 8, 8],
...     "stages": [
...         {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "activation": "relu"},
...         {"type": "residual", "activation": "relu", "branch": [
...             {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "activation": "relu"},
...             {"type": "conv", "out": 4, "kernel": 3, "padding": 1}]},
...         {"type": "pool", "mode": "avg", "global": True},
...         {"type": "flatten"},
...         {"type": "linear", "out": 3}]})
>>> net.n_params, net.graph.widths
(351, (1, 4, 4, 3))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from .errors import InvalidStructure
from .graph import Block, Graph, Segment, Unit
from .structure import ACTIVATIONS

__all__ = ["Conv", "Flatten", "LayerInfo", "Linear", "Network", "Pool", "Residual"]

#: Activations whose range is convex, so an average of values σ has already mapped is
#: mapped to itself again (docs/theory.md §13: ψ on a block after an average pool).
_CONVEX_RANGE = frozenset({"identity", "relu", "relu6", "hardtanh"})


def _pair(v, name: str, where: str, least: int) -> tuple[int, int]:
    vals = [v, v] if isinstance(v, int) and not isinstance(v, bool) else v
    if (
        not isinstance(vals, list | tuple)
        or len(vals) != 2
        or any(isinstance(x, bool) or not isinstance(x, int) or x < least for x in vals)
    ):
        raise InvalidStructure(
            f"{name} must be an integer >= {least} or a pair of them; got {v!r}",
            field=f"{where}.{name}",
        )
    return int(vals[0]), int(vals[1])


@dataclass(frozen=True)
class Conv:
    """A ``Conv2d`` (groups 1, dilation 1) followed by an activation."""

    out: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    bias: bool = True
    activation: str = "identity"

    def to_json(self) -> dict:
        return {
            "type": "conv",
            "out": self.out,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "bias": self.bias,
            "activation": self.activation,
        }


@dataclass(frozen=True)
class Linear:
    """A ``Linear`` layer followed by an activation."""

    out: int
    bias: bool = True
    activation: str = "identity"

    def to_json(self) -> dict:
        return {"type": "linear", "out": self.out, "bias": self.bias, "activation": self.activation}


@dataclass(frozen=True)
class Pool:
    """Max or average pooling (``kernel``, ``stride``, ``padding``), or, with ``glob``, the
    global average (``AdaptiveAvgPool2d(1)``)."""

    mode: str = "max"
    kernel: tuple[int, int] = (2, 2)
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] = (0, 0)
    glob: bool = False

    def to_json(self) -> dict:
        if self.glob:
            return {"type": "pool", "mode": "avg", "global": True}
        return {
            "type": "pool",
            "mode": self.mode,
            "kernel": list(self.kernel),
            "stride": list(self.stride or self.kernel),
            "padding": list(self.padding),
        }


@dataclass(frozen=True)
class Flatten:
    """``(C, H, W)`` to ``C·H·W`` features, channel-major as PyTorch."""

    def to_json(self) -> dict:
        return {"type": "flatten"}


@dataclass(frozen=True)
class Residual:
    """``y = σ(S x + F(x))``: ``branch`` a chain of conv or linear layers, ``shortcut`` the
    identity (``None``) or a projection (a conv or linear layer without activation)."""

    branch: tuple[Conv | Linear, ...]
    shortcut: Conv | Linear | None = None
    activation: str = "identity"

    def to_json(self) -> dict:
        return {
            "type": "residual",
            "branch": [s.to_json() for s in self.branch],
            "shortcut": None if self.shortcut is None else self.shortcut.to_json(),
            "activation": self.activation,
        }


Stage = Conv | Linear | Pool | Flatten | Residual


@dataclass(frozen=True)
class LayerInfo:
    """What ψ needs to know of a unit: its stage, where it sits, the shapes around it, and
    the activation its input has already passed (``None``: none known)."""

    stage: Conv | Linear
    where: str
    top: int | None  # index of its top-level stage, None inside a block
    block: int | None  # block number
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input_activation: str | None


# -- JSON ---------------------------------------------------------------------------------
_KEYS = {
    "conv": {"type", "out", "kernel", "stride", "padding", "bias", "activation"},
    "linear": {"type", "out", "bias", "activation"},
    "pool": {"type", "mode", "kernel", "stride", "padding", "global"},
    "flatten": {"type"},
    "residual": {"type", "branch", "shortcut", "activation"},
}


def _act(d: Mapping, where: str) -> str:
    a = d.get("activation", "identity")
    if a not in ACTIVATIONS:
        raise InvalidStructure(
            f"unknown activation {a!r}; known: {sorted(ACTIVATIONS)}", field=f"{where}.activation"
        )
    return a


def _width(d: Mapping, where: str) -> int:
    if "out" not in d:
        raise InvalidStructure("a layer needs its output width 'out'", field=f"{where}.out")
    n = d["out"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidStructure(f"out must be an integer >= 1; got {n!r}", field=f"{where}.out")
    return n


def _bias(d: Mapping, where: str) -> bool:
    b = d.get("bias", True)
    if not isinstance(b, bool):
        raise InvalidStructure(f"bias must be a boolean; got {b!r}", field=f"{where}.bias")
    return b


def _stage(d, where: str, layer_only: bool = False) -> Stage:
    if not isinstance(d, Mapping):
        raise InvalidStructure(f"a stage is an object with a 'type'; got {d!r}", field=where)
    kind = d.get("type")
    allowed = ("conv", "linear") if layer_only else tuple(_KEYS)
    if kind not in allowed:
        raise InvalidStructure(
            f"unknown stage type {kind!r}; expected one of {list(allowed)}", field=f"{where}.type"
        )
    extra = sorted(set(d) - _KEYS[kind])
    if extra:
        raise InvalidStructure(
            f"a {kind} stage has no field {extra[0]!r}; its fields are {sorted(_KEYS[kind])}",
            field=f"{where}.{extra[0]}",
        )
    if kind == "conv":
        return Conv(
            _width(d, where),
            _pair(d.get("kernel", 3), "kernel", where, 1),
            _pair(d.get("stride", 1), "stride", where, 1),
            _pair(d.get("padding", 0), "padding", where, 0),
            _bias(d, where),
            _act(d, where),
        )
    if kind == "linear":
        return Linear(_width(d, where), _bias(d, where), _act(d, where))
    if kind == "pool":
        glob = d.get("global", False)
        if not isinstance(glob, bool):
            raise InvalidStructure(
                f"global must be a boolean; got {glob!r}", field=f"{where}.global"
            )
        mode = d.get("mode", "avg" if glob else "max")
        if mode not in ("max", "avg") or (glob and mode != "avg"):
            raise InvalidStructure(
                f"mode must be 'max' or 'avg' ('avg' for a global pool); got {mode!r}",
                field=f"{where}.mode",
            )
        if glob:
            return Pool("avg", glob=True)
        kernel = _pair(d.get("kernel", 2), "kernel", where, 1)
        stride = _pair(d.get("stride", list(kernel)), "stride", where, 1)
        return Pool(mode, kernel, stride, _pair(d.get("padding", 0), "padding", where, 0))
    if kind == "flatten":
        return Flatten()
    branch = d.get("branch")
    if not isinstance(branch, list) or not branch:
        raise InvalidStructure(
            "a residual block needs a non-empty 'branch' list of conv or linear layers",
            field=f"{where}.branch",
        )
    layers = tuple(_stage(b, f"{where}.branch[{k}]", True) for k, b in enumerate(branch))
    sc = d.get("shortcut")
    shortcut = None if sc is None else _stage(sc, f"{where}.shortcut", True)
    return Residual(layers, shortcut, _act(d, where))


# -- the network ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    """A chain of stages on inputs of ``input_shape`` (docs/theory.md §13).

    Raises
    ------
    InvalidStructure
        Naming the stage and field: a kernel larger than its padded input, a linear layer
        on an image (``flatten`` first), a conv on features, a projection whose output does
        not fit, a block whose branch does not return to its input's width.
    """

    input_shape: tuple[int, ...]
    stages: tuple[Stage, ...]
    kind: str = field(default="network", init=False)

    def __post_init__(self) -> None:
        shape = tuple(self.input_shape)
        if len(shape) not in (1, 3) or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in shape
        ):
            raise InvalidStructure(
                f"input must be [C, H, W] or [n] with positive integers; got {list(shape)}",
                field="input",
            )
        object.__setattr__(self, "input_shape", tuple(int(x) for x in shape))
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise InvalidStructure("a network needs at least one stage", field="stages")
        _ = self.graph  # validates shapes

    @classmethod
    def from_json(cls, d: Mapping) -> Network:
        if not isinstance(d, Mapping) or "stages" not in d or "input" not in d:
            raise InvalidStructure(
                "a network is {'input': [C, H, W] or [n], 'stages': [...]}", field="stages"
            )
        stages = d["stages"]
        if not isinstance(stages, list):
            raise InvalidStructure("stages must be a list", field="stages")
        inp = d["input"]
        if not isinstance(inp, list | tuple):
            raise InvalidStructure(f"input must be a list; got {inp!r}", field="input")
        return cls(tuple(inp), tuple(_stage(s, f"stages[{k}]") for k, s in enumerate(stages)))

    def to_json(self) -> dict:
        return {"input": list(self.input_shape), "stages": [s.to_json() for s in self.stages]}

    # -- the graph ---------------------------------------------------------------------------
    @cached_property
    def _built(self) -> tuple[Graph, tuple[LayerInfo, ...], tuple[tuple[int, ...], ...]]:
        return _Builder(self).build()

    @property
    def graph(self) -> Graph:
        return self._built[0]

    @property
    def layers(self) -> tuple[LayerInfo, ...]:
        """One :class:`LayerInfo` per unit, in layout order."""
        return self._built[1]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self._built[2][-1]

    @property
    def n_params(self) -> int:
        return self.graph.n_params

    @property
    def bias(self) -> bool:
        return any(info.stage.bias for info in self.layers)

    def where(self, index: int) -> str:
        return self.graph.where(index)

    def parameter_arithmetic(self) -> str:
        terms = []
        for u in self.graph.units:
            cols = "+".join(
                f"{s.width}·{s.group}" if s.group > 1 else f"{s.width}" for s in u.segments
            )
            terms.append(f"{u.rows}·{cols}" + (f" + {u.rows}" if u.bias is not None else ""))
        return f"{' + '.join(terms)} = {self.n_params}"

    def size_hint(self, got: int) -> str:
        return f"the network has {self.parameter_arithmetic()} parameters (got {got})"

    def describe(self) -> str:
        names = []
        for s in self.stages:
            if isinstance(s, Conv):
                names.append(f"conv{s.out}")
            elif isinstance(s, Linear):
                names.append(f"linear{s.out}")
            elif isinstance(s, Pool):
                names.append("gap" if s.glob else f"{s.mode}pool")
            elif isinstance(s, Flatten):
                names.append("flatten")
            else:
                inner = "-".join(str(b.out) for b in s.branch)
                names.append(f"res[{inner}{'+proj' if s.shortcut else ''}]")
        return f"network{list(self.input_shape)} {' → '.join(names)}"

    # -- students -------------------------------------------------------------------------
    def reduced(
        self, spaces: Sequence[int], widths: Sequence[int], gone: frozenset[int] = frozenset()
    ) -> Network:
        """The network left when spaces ``spaces`` (teacher numbers) have ``widths`` and the
        units ``gone`` (teacher unit indices) were removed by ψ."""
        width = dict(zip(spaces, widths, strict=True))
        units = iter(self.graph.units)

        def layer(st):
            u = next(units)
            return None if u.index in gone else replace(st, out=width[u.out])

        out: list[Stage] = []
        for st in self.stages:
            if isinstance(st, Conv | Linear):
                kept = layer(st)
                if kept is not None:
                    out.append(kept)
            elif isinstance(st, Residual):
                branch = tuple(layer(b) for b in st.branch)
                sc = None if st.shortcut is None else layer(st.shortcut)
                if all(b is None for b in branch):
                    continue
                out.append(Residual(branch, sc, st.activation))
            else:
                out.append(st)
        return Network(self.input_shape, tuple(out))


class _Builder:
    """Walks the stages once: shapes, spaces (numbered by first producer), units, blocks."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.widths: list[int] = [net.input_shape[0]]
        self.units: list[Unit] = []
        self.infos: list[LayerInfo] = []
        self.blocks: list[Block] = []
        self.offset = 0
        self.shapes: list[tuple[int, ...]] = []

    def new_space(self, width: int) -> int:
        self.widths.append(width)
        return len(self.widths)

    def layer(self, st, shape, space, out_space, where, top, block, act_in) -> tuple[int, ...]:
        if isinstance(st, Conv):
            if len(shape) != 3:
                raise InvalidStructure(
                    f"a conv layer reads images (C, H, W); its input here is {len(shape)}-d "
                    f"features {list(shape)}",
                    field=f"{where}.type",
                )
            c, h, w = shape
            (kh, kw), (sh, sw), (ph, pw) = st.kernel, st.stride, st.padding
            if h + 2 * ph < kh or w + 2 * pw < kw:
                raise InvalidStructure(
                    f"kernel {kh}×{kw} is larger than its padded input {h + 2 * ph}×{w + 2 * pw}",
                    field=f"{where}.kernel",
                )
            out_shape = (st.out, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
            group = kh * kw
        else:
            if len(shape) != 1:
                raise InvalidStructure(
                    f"a linear layer reads features; its input here is an image {list(shape)}: "
                    "add a flatten stage (or a global pool and a flatten) before it",
                    field=f"{where}.type",
                )
            c = self.widths[space - 1]
            group = shape[0] // c
            out_shape = (st.out,)
        width = self.widths[space - 1]
        seg = Segment(space, width, group, self.offset)
        self.offset += st.out * width * group
        bias = None
        if st.bias:
            bias = self.offset
            self.offset += st.out
        n = len(self.units)
        kind = "conv" if isinstance(st, Conv) else "linear"
        self.units.append(
            Unit(n, n + 1, out_space, st.out, (seg,), bias, f"layer {n + 1} ({kind}, {where})")
        )
        self.infos.append(LayerInfo(st, where, top, block, shape, out_shape, act_in))
        return out_shape

    def build(self):
        net = self.net
        shape = net.input_shape
        space, act = 1, None  # the activation the current values have passed
        for k, st in enumerate(net.stages):
            where = f"stages[{k}]"
            if isinstance(st, Conv | Linear):
                out = self.new_space(st.out)
                shape = self.layer(st, shape, space, out, where, k, None, act)
                space, act = out, st.activation
            elif isinstance(st, Pool):
                if len(shape) != 3:
                    raise InvalidStructure(
                        f"pooling reads images; its input here is features {list(shape)}",
                        field=f"{where}.type",
                    )
                c, h, w = shape
                if st.glob:
                    shape = (c, 1, 1)
                else:
                    (kh, kw), (sh, sw), (ph, pw) = st.kernel, st.stride or st.kernel, st.padding
                    if h + 2 * ph < kh or w + 2 * pw < kw:
                        raise InvalidStructure(
                            f"pool kernel {kh}×{kw} is larger than its padded input "
                            f"{h + 2 * ph}×{w + 2 * pw}",
                            field=f"{where}.kernel",
                        )
                    shape = (c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
                if st.mode == "avg" and act not in _CONVEX_RANGE:
                    act = None
            elif isinstance(st, Flatten):
                if len(shape) == 3:
                    shape = (shape[0] * shape[1] * shape[2],)
            else:
                shape, space, act = self.residual(st, k, shape, space, act)
            self.shapes.append(shape)
        if not self.units:
            raise InvalidStructure(
                "a network needs at least one conv or linear layer", field="stages"
            )
        graph = Graph(
            tuple(self.widths), tuple(self.units), tuple(self.blocks), frozenset({1, space})
        )
        return graph, tuple(self.infos), tuple(self.shapes)

    def residual(self, st: Residual, k: int, shape, space: int, act):
        where = f"stages[{k}]"
        number = len(self.blocks) + 1
        first_unit = len(self.units)
        width_in = self.widths[space - 1]
        if st.shortcut is None:
            last = st.branch[-1]
            if last.out != width_in:
                raise InvalidStructure(
                    f"with an identity shortcut the branch must return to its input's width "
                    f"{width_in}; its last layer has out = {last.out}",
                    field=f"{where}.branch[{len(st.branch) - 1}].out",
                )
        inner: list[int] = []
        cur, cur_shape, cur_act = space, shape, act
        writes = space if st.shortcut is None else None
        for j, b in enumerate(st.branch):
            w = f"{where}.branch[{j}]"
            if j < len(st.branch) - 1:
                out = self.new_space(b.out)
                inner.append(out)
            else:
                out = writes if writes is not None else self.new_space(b.out)
                writes = out
            cur_shape = self.layer(b, cur_shape, cur, out, w, None, number, cur_act)
            cur, cur_act = out, b.activation
        projection = None
        if st.shortcut is not None:
            sc = st.shortcut
            if sc.activation != "identity":
                raise InvalidStructure(
                    f"a projection shortcut has no activation (the block's comes after the "
                    f"sum); got {sc.activation!r}",
                    field=f"{where}.shortcut.activation",
                )
            if sc.out != st.branch[-1].out:
                raise InvalidStructure(
                    f"the projection must write the branch's width {st.branch[-1].out}; it has "
                    f"out = {sc.out}",
                    field=f"{where}.shortcut.out",
                )
            sc_shape = self.layer(sc, shape, space, writes, f"{where}.shortcut", None, number, act)
            if sc_shape != cur_shape:
                raise InvalidStructure(
                    f"the projection's output {list(sc_shape)} does not match the branch's "
                    f"{list(cur_shape)} (stride or padding)",
                    field=f"{where}.shortcut",
                )
            projection = len(self.units) - 1
        elif cur_shape != shape:
            raise InvalidStructure(
                f"the branch changes the shape {list(shape)} to {list(cur_shape)}; an identity "
                "shortcut needs the same shape (give a projection shortcut)",
                field=f"{where}.branch",
            )
        branch = tuple(range(first_unit, first_unit + len(st.branch)))
        self.blocks.append(
            Block(number, branch, projection, space, writes, tuple(inner), st.activation)
        )
        return cur_shape, writes, st.activation
